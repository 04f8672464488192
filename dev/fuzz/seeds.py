"""Seed inputs for the libFuzzer targets of dev/fuzz: one small valid file per reader (and a few
near misses), written from the formats in README.md. Usage: python3 dev/fuzz/seeds.py OUTDIR
(writes OUTDIR/<target>/*). Called by dev/fuzz/run.sh."""
import json
import os
import random
import struct
import sys

out = sys.argv[1]
rng = random.Random(1)


def write(target, name, data):
    os.makedirs(os.path.join(out, target), exist_ok=True)
    with open(os.path.join(out, target, name), "wb") as f:
        f.write(data)


def header(*fields):
    return struct.pack("<256i", *(list(fields) + [0] * (256 - len(fields))))


def floats(n, lo=-0.5, hi=0.5):
    return struct.pack("<%df" % n, *[rng.uniform(lo, hi) for _ in range(n)])


# token shards: llm.c's format
def shard(tokens, magic=20240520, count=None):
    n = len(tokens) if count is None else count
    return header(magic, 1, n) + struct.pack("<%dH" % len(tokens), *tokens)


write("shard", "valid40", shard([rng.randrange(50257) for _ in range(40)]))
write("shard", "valid9", shard(list(range(9))))
write("shard", "big_tokens", shard([60000, 65535] * 10))
write("shard", "count_mismatch", shard(list(range(20)), count=30))

# checkpoints: maxT=4 V=8 Vp=8 L=2 NH=1 C=4; MoE E=2 K=1 moe_every=1 H=8
maxT, V, Vp, L, NH, C = 4, 8, 8, 2, 1, 4


def sizes(E, H):
    Lm = L if E > 1 else 0
    Ld = L - Lm
    return [Vp * C, maxT * C, L * C, L * C, L * 3 * C * C, L * 3 * C, L * C * C, L * C, L * C, L * C,
            Ld * 4 * C * C, Ld * 4 * C, Ld * C * 4 * C, Ld * C, Lm * E * C, Lm * E * H * C, Lm * E * H,
            Lm * E * C * H, Lm * E * C, C, C]


n_dense, n_moe = sum(sizes(1, 0)), sum(sizes(2, 8))
write("checkpoint", "dense_v3", header(20240326, 3, maxT, V, L, NH, C, Vp) + floats(n_dense))
write("checkpoint", "moe_v1", header(20241111, 1, maxT, V, L, NH, C, Vp, 2, 1, 1, 8, 1) + floats(n_moe))
bf16 = struct.pack("<%dH" % n_dense, *[struct.unpack("<I", struct.pack("<f", rng.uniform(-1, 1)))[0] >> 16 for _ in range(n_dense)])
write("checkpoint", "dense_bf16_v5", header(20240326, 5, maxT, V, L, NH, C, Vp) + bf16)

# training state of step 7, rank 0 of 1, for 16 parameters
n = 16
state = header(20241113, 1, 7, 0, 1) + struct.pack("<5q", n, 1, 0, 3, 99) + floats(n) + floats(n, 0.0, 1.0)
write("state", "valid16", state)
write("state", "truncated", state[:-6])

# tokenizer files: GPT-2's 256 byte tokens (ids 0-255 of its encoder.json), two merges, <|endoftext|>
gpt2 = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "data", "gpt2", "encoder.json"), encoding="utf-8"))
vocab = {tok: i for tok, i in gpt2.items() if i < 256}
merges = [("h", "e"), ("l", "l")]
for i, (a, b) in enumerate(merges):
    vocab[a + b] = 256 + i
vocab["<|endoftext|>"] = 256 + len(merges)
enc = json.dumps(vocab, ensure_ascii=False).encode("utf-8")
bpe = ("#version: 0.2\n" + "".join("%s %s\n" % m for m in merges)).encode("utf-8")
write("tokenizer_files", "small_pair", struct.pack("<H", len(enc)) + enc + bpe)
write("tokenizer_files", "no_merges", struct.pack("<H", len(enc)) + enc + b"#version: 0.2\n")

# text
write("text", "ascii", b"Hello world, it's 2024!\n\n  The end.")
write("text", "unicode", "Grüße, 東京 — naïve café ✓ 123\t".encode("utf-8"))
write("text", "invalid_utf8", b"\xff\xfe abc \xc3( \xe2\x82 end")

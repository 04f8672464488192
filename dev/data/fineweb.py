"""
FineWeb (HuggingFaceFW/fineweb, the sample-10BT or sample-100BT subset) as GPT-2 token shards in
llm.c's format, as llm.c's dev/data/fineweb.py makes them: every document is encoded with
tiktoken's "gpt2" on its own and preceded by the end-of-text token 50256; documents fill shards of
--shard_size tokens in order (a document that does not fit continues in the next shard); the first
shard is the validation split (fineweb_val_000000.bin), the others training shards
(fineweb_train_000001.bin, ...).

    /usr/bin/python3 dev/data/fineweb.py -v 10B                 stream from the Hugging Face hub
    /usr/bin/python3 dev/data/fineweb.py --input sample.jsonl   a local file, offline

Online it needs `pip install datasets` (streamed: nothing is downloaded beyond what is tokenized;
--max_tokens stops early). Offline, tiktoken's gpt2 encoding is built from data/gpt2/encoder.json
(the same ids; dev/data/check_tokenizer.py checks them), and --input reads a JSON-lines file with a "text" string on every
line (the hub's rows, e.g. saved from a streamed sample) or a text file whose documents are
separated by lines holding only <|endoftext|> (as shared/data/gutenberg). Shard format: a header
of 256 int32 little-endian, [0] = 20240520, [1] = 1, [2] = token count; then uint16 tokens. Each
shard is written under a temporary name and renamed. A bad input line stops with one error line
naming the file and line.
"""
import argparse
import json
import os
import sys

EOT = 50256
MAGIC, VERSION = 20240520, 1


def fail(msg):
    sys.exit(f"error: {msg}")


def documents_from_file(path):
    """yields the documents of a local --input file, checking every line"""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        fail(f"cannot read --input {path}: {e.strerror}")
    with f:
        if path.endswith(".jsonl") or path.endswith(".json"):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"{path}:{lineno}: not a JSON line ({e.msg})")
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    fail(f"{path}:{lineno}: the line has no \"text\" string")
                yield row["text"]
        else:
            doc = []
            for line in f:
                if line.rstrip("\n") == "<|endoftext|>":
                    if doc:
                        yield "".join(doc)
                    doc = []
                else:
                    doc.append(line)
            if doc:
                yield "".join(doc)


def documents_from_hub(version):
    try:
        from datasets import load_dataset
    except ImportError:
        fail("streaming FineWeb needs the datasets package (pip install datasets); offline, pass --input FILE")
    name = {"10B": "sample-10BT", "100B": "sample-100BT"}[version]
    try:
        for row in load_dataset("HuggingFaceFW/fineweb", name=name, split="train", streaming=True):
            yield row["text"]
    except Exception as e:  # network and hub errors come in many types; one line either way
        fail(f"cannot stream HuggingFaceFW/fineweb {name}: {e} (offline, pass --input FILE)")


def write_shard(path, tokens):
    import numpy as np
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, len(tokens)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
    os.replace(tmp, path)
    print(f"wrote {path}: {len(tokens):,} tokens")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--version", choices=["10B", "100B"], default="10B", help="the hub's sample (default 10B)")
    ap.add_argument("-s", "--shard_size", type=int, default=10**8, help="tokens per shard (default 1e8, llm.c's)")
    ap.add_argument("-i", "--input", help="a local .jsonl (\"text\" per line) or <|endoftext|>-separated text file")
    ap.add_argument("-o", "--out", help="output folder (default data/fineweb<version>)")
    ap.add_argument("--encoder", default="data/gpt2/encoder.json", help="GPT-2's encoder.json, used offline (default data/gpt2)")
    ap.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    args = ap.parse_args()
    if args.shard_size < 1 or args.shard_size > 2**31 - 1:
        fail(f"--shard_size {args.shard_size} must be in [1, 2^31-1] (the header holds an int32 count)")
    if args.max_tokens < 0:
        fail(f"--max_tokens {args.max_tokens} must be >= 0")
    try:
        import tiktoken
    except ImportError:
        fail("tiktoken is needed (pip install tiktoken)")
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception:  # offline with no tiktoken cache: the same encoding from the repo's GPT-2 files
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from check_tokenizer import local_encoding
        if not os.path.isfile(args.encoder):
            fail(f"tiktoken cannot download gpt2 offline and {args.encoder} is missing (bash dev/data/tinyshakespeare.sh gets it)")
        enc = local_encoding(tiktoken, args.encoder)
    out = args.out or os.path.join("data", f"fineweb{args.version}")
    os.makedirs(out, exist_ok=True)
    docs = documents_from_file(args.input) if args.input else documents_from_hub(args.version)

    shard, buf, total = 0, [], 0
    for text in docs:
        tokens = [EOT] + enc.encode_ordinary(text)
        if args.max_tokens:
            tokens = tokens[: args.max_tokens - total]
        total += len(tokens)
        while tokens:  # fill the current shard; the rest of the document starts the next one
            take = min(len(tokens), args.shard_size - len(buf))
            buf.extend(tokens[:take])
            tokens = tokens[take:]
            if len(buf) == args.shard_size:
                split = "val" if shard == 0 else "train"
                write_shard(os.path.join(out, f"fineweb_{split}_{shard:06d}.bin"), buf)
                shard, buf = shard + 1, []
        if args.max_tokens and total >= args.max_tokens:
            break
    if buf:
        split = "val" if shard == 0 else "train"
        write_shard(os.path.join(out, f"fineweb_{split}_{shard:06d}.bin"), buf)
        shard += 1
    if total == 0:
        fail("no documents: nothing written")
    print(f"{total:,} tokens in {shard} shards in {out}")


if __name__ == "__main__":
    main()

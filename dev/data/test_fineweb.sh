#!/usr/bin/env bash
# dev/data/fineweb.py offline, on a local sample made from the Gutenberg validation books (300
# paragraphs as documents, in both input forms): shard names and headers, shard sizes, and the
# tokens against the C tokenizer's (dev/data/tokenize, -s eot) on the same documents; then bad
# inputs, each one error line and a non-zero exit. Prints ok/FAIL/skip lines.
set -u
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-/usr/bin/python3}
VAL=../shared/data/gutenberg/val.txt
if ! "$PYTHON" -c "import tiktoken, numpy" 2>/dev/null; then echo "skip fineweb (no tiktoken or numpy for $PYTHON)"; exit 0; fi
if [ ! -f "$VAL" ]; then echo "skip fineweb (no $VAL to make a sample from)"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
make -s dev/data/tokenize || { echo "FAIL fineweb/build dev/data/tokenize does not build"; exit 1; }

# the sample: paragraphs of 200+ characters, each a document ending in "\n"
"$PYTHON" - "$VAL" "$tmp" <<'EOF'
import json, sys
paras = [p for p in open(sys.argv[1], encoding="utf-8").read().split("\n\n") if len(p) >= 200 and "<|endoftext|>" not in p][:300]
with open(sys.argv[2] + "/sample.jsonl", "w", encoding="utf-8") as j, open(sys.argv[2] + "/sample.txt", "w", encoding="utf-8") as t:
    for p in paras:
        j.write(json.dumps({"id": len(p), "text": p + "\n"}, ensure_ascii=False) + "\n")
        t.write(p + "\n<|endoftext|>\n")
EOF

ok() { echo "ok   fineweb/$1 $2"; }
fail() { echo "FAIL fineweb/$1 $2"; }

"$PYTHON" dev/data/fineweb.py --input "$tmp/sample.jsonl" -s 8000 -o "$tmp/jsonl" >"$tmp/out1" 2>&1 || fail run "$(tail -1 "$tmp/out1")"
"$PYTHON" dev/data/fineweb.py --input "$tmp/sample.txt" -s 8000 -o "$tmp/txt" >"$tmp/out2" 2>&1 || fail run_txt "$(tail -1 "$tmp/out2")"
./dev/data/tokenize -i "$tmp/sample.txt" -s eot -v 0 -o "$tmp/c" >/dev/null || fail c_tokenizer "dev/data/tokenize failed"

"$PYTHON" - "$tmp" <<'EOF'
import glob, os, sys
import numpy as np
tmp = sys.argv[1]
def shards(d):
    return sorted(glob.glob(d + "/fineweb_*.bin"), key=lambda p: p.split("_")[-1])
def read(p):
    raw = open(p, "rb").read()
    h = np.frombuffer(raw[:1024], dtype="<i4")
    t = np.frombuffer(raw[1024:], dtype="<u2")
    return h, t
files = shards(tmp + "/jsonl")
names = [os.path.basename(p) for p in files]
want = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, len(files))]
good_headers = True
toks = []
for i, p in enumerate(files):
    h, t = read(p)
    good_headers &= bool(h[0] == 20240520 and h[1] == 1 and h[2] == len(t) and not h[3:].any())
    good_headers &= bool(len(t) == 8000 or i == len(files) - 1)
    toks.append(t)
allt = np.concatenate(toks)
ok = lambda c, name, msg: print(("ok   " if c else "FAIL ") + "fineweb/" + name + " " + msg)
ok(names == want and len(files) >= 3, "shard_names", f"{len(files)} shards: {names[0]}, {names[1]}, ..., {names[-1]}")
ok(good_headers, "headers", "magic 20240520, version 1, the token count, the rest 0; every shard but the last holds 8,000 tokens")
_, c = read(tmp + "/c_train.bin")
ok(np.array_equal(allt, c), "same_as_c_tokenizer",
   f"{len(allt):,} tokens, {int((allt == 50256).sum())} documents each after an EOT, equal to dev/data/tokenize -s eot's {len(c):,}")
txt = np.concatenate([read(p)[1] for p in shards(tmp + "/txt")])
ok(np.array_equal(allt, txt), "text_input", "the <|endoftext|>-separated text gives the same tokens as the JSON lines")
EOF

# bad input: one error line naming the problem, non-zero exit, no shard left behind
printf '{"text": "fine"}\n{"text": oops}\n' >"$tmp/bad.jsonl"
printf '{"text": "fine"}\n{"title": "no text"}\n' >"$tmp/notext.jsonl"
check_bad() { # NAME EXPECTED_SUBSTRING ARGS...
    local name=$1 want=$2; shift 2
    rm -rf "$tmp/bad_out"
    out=$("$PYTHON" dev/data/fineweb.py "$@" -o "$tmp/bad_out" 2>&1); rc=$?
    if [ $rc -ne 0 ] && [ "$(echo "$out" | wc -l)" -eq 1 ] && [[ "$out" == error:*"$want"* ]] && [ -z "$(ls "$tmp/bad_out" 2>/dev/null)" ]; then
        ok "bad_input/$name" "\"$out\""
    else
        fail "bad_input/$name" "exit $rc: $out"
    fi
}
check_bad malformed_json "bad.jsonl:2: not a JSON line" --input "$tmp/bad.jsonl"
check_bad missing_text "notext.jsonl:2: the line has no \"text\" string" --input "$tmp/notext.jsonl"
check_bad missing_file "cannot read --input" --input "$tmp/nothere.jsonl"
check_bad shard_size "--shard_size 0 must be in" --input "$tmp/sample.jsonl" -s 0

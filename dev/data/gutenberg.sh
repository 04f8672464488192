#!/usr/bin/env bash
# The Gutenberg corpus of ../shared/data/gutenberg (360 English books for training, 11 others for
# validation; public domain, cleaned; see shared/data/README.md) as llm.c-format token shards.
# Run from anywhere: bash dev/data/gutenberg.sh
#
# - the corpus has no canonical download (it is a cleaned, deduplicated selection), so it is read
#   from shared/data beside the repository, md5-checked; GPT-2's tokenizer files come from
#   dev/data/tinyshakespeare.sh's sources (it is run first when data/gpt2 is missing)
# - tokenized by the C tokenizer (dev/data/tokenize.c, -s eot): each book is encoded on its own
#   and preceded by GPT-2's end-of-text token 50256
# - writes data/gutenberg/gutenberg_val.bin (all of val.txt, 1,098,945 tokens) and
#   data/gutenberg/gutenberg_train_000.bin, _001.bin, ... (the train books in order, cut into
#   shards of at most 10M tokens on book boundaries where possible; ~36M tokens in all)
# A shard already in place is kept when its md5 list (data/gutenberg/MD5) matches.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHARED="$(cd "$ROOT/.." && pwd)/shared/data/gutenberg"
OUT="$ROOT/data/gutenberg"
TRAIN_MD5=ccf53aaa7681aabac3c870f8145fc361
VAL_MD5=39ee10ea621755947a60538e76c9d16a
SHARD_TOKENS=${SHARD_TOKENS:-10000000}

check_md5() { # FILE MD5
    [ -f "$1" ] && [ "$(md5sum "$1" | cut -d' ' -f1)" = "$2" ] && return 0
    echo "gutenberg.sh: $1 is missing or has the wrong md5 (want $2); see shared/data/README.md" >&2
    exit 1
}
check_md5 "$SHARED/train.txt.gz" $TRAIN_MD5
check_md5 "$SHARED/val.txt" $VAL_MD5
[ -f "$ROOT/data/gpt2/encoder.json" ] && [ -f "$ROOT/data/gpt2/vocab.bpe" ] || bash "$ROOT/dev/data/tinyshakespeare.sh"

mkdir -p "$OUT"
if [ -f "$OUT/MD5" ] && (cd "$OUT" && md5sum --status -c MD5 2>/dev/null); then
    echo "have $(wc -l <"$OUT/MD5") Gutenberg shards in $OUT (md5s match)"
    exit 0
fi

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"${CC:-gcc}" -O2 -o "$BUILD/tokenize" "$ROOT/dev/data/tokenize.c"
TOK="$BUILD/tokenize -e $ROOT/data/gpt2/encoder.json -m $ROOT/data/gpt2/vocab.bpe"
rm -f "$OUT"/gutenberg_*.bin "$OUT/MD5"

# validation: all 11 books
$TOK -i "$SHARED/val.txt" -s eot -v all -o "$OUT/gutenberg"

# training: books appended to a part until it reaches SHARD_TOKENS (estimated at 4.2 bytes per
# token, so a part ends on a book boundary), each part tokenized into one shard
gunzip -c "$SHARED/train.txt.gz" | awk -v dir="$BUILD" -v max_bytes=$((SHARD_TOKENS * 42 / 10)) '
    function next_part() { if (out != "") close(out); out = sprintf("%s/part_%03d.txt", dir, part++); bytes = 0 }
    BEGIN { part = 0; next_part() }
    $0 == "<|endoftext|>" && bytes >= max_bytes { next_part(); print > out; bytes += 14; next }
    { print > out; bytes += length($0) + 1 }'
for part in "$BUILD"/part_*.txt; do
    n=$(basename "$part" .txt); n=${n#part_}
    $TOK -i "$part" -s eot -v 0 -o "$BUILD/shard"
    mv "$BUILD/shard_train.bin" "$OUT/gutenberg_train_$n.bin"
    echo "wrote $OUT/gutenberg_train_$n.bin"
done
(cd "$OUT" && md5sum gutenberg_*.bin >MD5.tmp && mv MD5.tmp MD5)
echo "Gutenberg shards in $OUT: $(wc -l <"$OUT/MD5") files"

#!/usr/bin/env bash
# Tiny Shakespeare as llm.c-format token shards, plus GPT-2's tokenizer files.
# Run from anywhere: bash dev/data/tinyshakespeare.sh
#
# - gets input.txt, encoder.json and vocab.bpe from their canonical sources (short timeouts),
#   or, offline, copies them from shared/data beside the repository; checks their md5s either way
#   (a file already in place with the right md5 is kept)
# - builds dev/data/tokenize.c with gcc -O2 in a temporary directory
# - writes data/gpt2/{encoder.json,vocab.bpe}, data/tinyshakespeare/input.txt and
#   data/tinyshakespeare/tiny_shakespeare_{val,train}.bin: 32,768 + 305,260 tokens, split and
#   tokenized as llm.c's dev/data/tinyshakespeare.py does (see dev/data/tokenize.c, -s para)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHARED="$(cd "$ROOT/.." && pwd)/shared/data"
GPT2_URL="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
TS_URL="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

md5_of() { md5sum "$1" | cut -d' ' -f1; }

download() { # URL DEST
    if command -v curl >/dev/null 2>&1; then
        curl -fsSL --connect-timeout 5 --max-time 60 -o "$2" "$1" 2>/dev/null
    elif command -v wget >/dev/null 2>&1; then
        wget -q --timeout=10 --tries=1 -O "$2" "$1" 2>/dev/null
    else
        return 1
    fi
}

# fetch DEST URL MD5 FALLBACK: keep DEST if its md5 is right, else download URL, else copy FALLBACK
fetch() {
    local dest="$1" url="$2" md5="$3" fallback="$4" tmp="$1.tmp"
    mkdir -p "$(dirname "$dest")"
    if [ -f "$dest" ] && [ "$(md5_of "$dest")" = "$md5" ]; then
        echo "have $dest"
        return
    fi
    rm -f "$tmp"
    if download "$url" "$tmp" && [ "$(md5_of "$tmp")" = "$md5" ]; then
        mv "$tmp" "$dest"
        echo "downloaded $url"
        return
    fi
    rm -f "$tmp"
    if [ -f "$fallback" ] && [ "$(md5_of "$fallback")" = "$md5" ]; then
        cp "$fallback" "$tmp" && chmod 644 "$tmp" && mv "$tmp" "$dest"
        echo "offline: copied $fallback"
        return
    fi
    echo "tinyshakespeare.sh: cannot get $(basename "$dest"): $url failed and $fallback is missing or has the wrong md5" >&2
    exit 1
}

fetch "$ROOT/data/gpt2/encoder.json" "$GPT2_URL/encoder.json" dffec25a898b1f5e569bec4dffd7e5c0 "$SHARED/gpt2/encoder.json"
fetch "$ROOT/data/gpt2/vocab.bpe" "$GPT2_URL/vocab.bpe" 75a37753dd7a28a2c5df80c28bf06e4e "$SHARED/gpt2/vocab.bpe"
fetch "$ROOT/data/tinyshakespeare/input.txt" "$TS_URL" 6fb458f1232090904fb40fe944165e91 "$SHARED/tinyshakespeare/input.txt"

BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"${CC:-gcc}" -O2 -o "$BUILD/tokenize" "$ROOT/dev/data/tokenize.c"
"$BUILD/tokenize" -e "$ROOT/data/gpt2/encoder.json" -m "$ROOT/data/gpt2/vocab.bpe" \
    -i "$ROOT/data/tinyshakespeare/input.txt" -o "$ROOT/data/tinyshakespeare/tiny_shakespeare"

#!/usr/bin/env bash
# Builds the libFuzzer targets of dev/fuzz with clang (ASan + UBSan) and runs each for SECONDS
# (default 20) from seed files (seeds.py) plus the corpus it grew before, printing one ok/FAIL line
# per target (skip when clang or its fuzzer runtime is missing). A crash leaves its input in
# dev/fuzz/out/crash_<target>-*. Run from anywhere: bash dev/fuzz/run.sh [SECONDS [TARGET...]]
set -u
cd "$(dirname "$0")/../.."
EACH=${1:-20}
shift $(( $# > 0 ? 1 : 0 ))
TARGETS=${*:-shard checkpoint state tokenizer_files text}
CLANG=$(command -v clang || command -v clang-14 || true)
probe=$(mktemp --suffix=.c)
echo 'int LLVMFuzzerTestOneInput(const char* d, unsigned long n) { return 0; }' >"$probe"
if [ -z "$CLANG" ] || ! "$CLANG" -fsanitize=fuzzer "$probe" -o "${probe%.c}" 2>/dev/null; then
    echo "skip fuzz (clang with its libFuzzer runtime not found: apt-get install clang)"
    rm -f "$probe" "${probe%.c}"
    exit 0
fi
rm -f "$probe" "${probe%.c}"
out=dev/fuzz/out
mkdir -p "$out"
python3 dev/fuzz/seeds.py "$out/seeds"
for t in $TARGETS; do
    bin="$out/fuzz_$t"
    if ! "$CLANG" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I. "dev/fuzz/fuzz_$t.c" -o "$bin" -lm 2>"$out/$t.build"; then
        echo "FAIL fuzz/$t does not build: $(head -3 "$out/$t.build")"
        continue
    fi
    mkdir -p "$out/corpus_$t"
    # -max_len: the inputs stay small (a few KB) so each run is fast; readers check sizes, not length
    "$bin" -max_total_time="$EACH" -max_len=8192 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$out/crash_$t-" "$out/corpus_$t" "$out/seeds/$t" >"$out/$t.log" 2>&1
    rc=$?
    runs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.log" | grep -o '[0-9]*$')
    files=$(ls "$out/corpus_$t" | wc -l)
    if [ $rc -eq 0 ]; then
        echo "ok   fuzz/$t ${runs:-?} inputs in ${EACH} s, no crash, leak or sanitizer report (corpus $files files)"
    else
        echo "FAIL fuzz/$t exit $rc after ${runs:-?} inputs: $(grep -a -m1 -E 'ERROR|runtime error|deadly signal' "$out/$t.log") (input: $(ls "$out"/crash_$t-* 2>/dev/null | head -1))"
    fi
done
rm -f /dev/shm/llmoe_fuzz_* /tmp/llmoe_fuzz_* 2>/dev/null

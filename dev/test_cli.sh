#!/usr/bin/env bash
# Tests of the trainer binary as a user runs it: bad flags and bad files give one error line and a
# non-zero exit without touching the output folder; a resumed run reproduces the uninterrupted
# run's losses bit for bit. Prints ok/FAIL lines. Run from the repository root after `make`.
set -u
BIN=./train_gpt2_moe_cpu
TRAIN=data/tinyshakespeare/tiny_shakespeare_train.bin
VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# a small, fast configuration: d4 with 4 experts, 2 x 32 tokens per step
SMALL="-e d4 -E 4 -K 2 -b 2 -t 32 -v 0 -s 0 -i $TRAIN -j $VAL"

# expect_error NAME PATTERN ARGS...: non-zero exit, exactly one line on stderr, matching PATTERN
expect_error() {
    local name=$1 pattern=$2; shift 2
    "$BIN" "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? lines
    lines=$(wc -l <"$tmp/err")
    if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && grep -q -- "$pattern" "$tmp/err"; then
        echo "ok   bad_input/cli_$name exit $rc: $(cat "$tmp/err")"
    else
        echo "FAIL bad_input/cli_$name exit $rc, $lines stderr lines (want 1 matching '$pattern'): $(head -c 300 "$tmp/err")"
    fi
}

# files: a shard with a wrong magic, a truncated one, one with a token >= vocab
python3 - "$tmp" <<'PY'
import struct, sys
d = sys.argv[1]
def shard(path, tokens, magic=20240520, cut=0):
    h = struct.pack("<256i", magic, 1, len(tokens), *([0] * 253))
    b = h + struct.pack("<%dH" % len(tokens), *tokens)
    open(path, "wb").write(b[:len(b) - cut] if cut else b)
shard(d + "/magic.bin", list(range(2000)), magic=1234)
shard(d + "/trunc.bin", list(range(2000)), cut=10)
shard(d + "/vocab.bin", [60000] * 2000)
PY

expect_error unknown_flag "unknown flag -Q" $SMALL -Q 1
expect_error not_a_number "expected an integer" $SMALL -b abc
expect_error missing_value "needs a value" $SMALL -x
expect_error k_greater_than_E "exceeds the number of experts" -e d4 -E 4 -K 5
expect_error T_greater_than_maxT "exceeds the model's maxT" $SMALL -t 2048
expect_error batch_not_dividing "not a positive multiple of B\*T" $SMALL -d 100
expect_error bad_descriptor "neither a descriptor" -e d5
expect_error checkpoint_wrong_magic "bad magic" -e "$tmp/magic.bin"
expect_error shard_wrong_magic "bad magic" $SMALL -i "$tmp/magic.bin" -x 1
expect_error shard_truncated "truncated" $SMALL -i "$tmp/trunc.bin" -x 1
expect_error token_out_of_range "token 60000" $SMALL -i "$tmp/vocab.bin" -x 1
expect_error resume_without_checkpoint "no checkpoint" $SMALL -o "$tmp/empty" -y 1
expect_error lsh_without_experts "needs E > 1 experts" -e d4 -b 2 -t 32 -v 0 -s 0 -J 2
expect_error lsh_key_overflow "64-bit key" $SMALL -J 32 -P 16
expect_error lsh_dp_zero "flag -P: expected an integer >= 1" $SMALL -J 2 -P 0
expect_error lsh_sources_not_dividing_B "must divide the batch" $SMALL -J 2 -V 3
mkdir -p "$tmp/keep" && echo "previous run" >"$tmp/keep/main.log"
expect_error nothing_overwritten "top-k" -e d4 -E 4 -K 9 -o "$tmp/keep"
if [ "$(cat "$tmp/keep/main.log")" = "previous run" ]; then echo "ok   bad_input/cli_output_untouched"; else echo "FAIL bad_input/cli_output_untouched"; fi

# resume: run 12 steps with a checkpoint at 6; then resume a copy of the step-6 checkpoint and run
# to 12. The losses of steps 6..11 must be identical strings (bit-exact fp32 on the CPU)
SCHED="-x 12 -l 1e-3 -u 3 -q 0.1 -c 0.1 -n 6"
if "$BIN" $SMALL $SCHED -o "$tmp/full" >"$tmp/full.out" 2>&1; then
    mkdir -p "$tmp/resumed"
    cp "$tmp/full/model_00000006.bin" "$tmp/full/state_00000006_00000.bin" "$tmp/resumed/"
    if "$BIN" $SMALL $SCHED -o "$tmp/resumed" -y 1 >"$tmp/resumed.out" 2>&1; then
        a=$(grep -E '^s:([6-9]|1[01]) trl' "$tmp/full/main.log" | cut -d' ' -f1-5)
        b=$(grep -E '^s:([6-9]|1[01]) trl' "$tmp/resumed/main.log" | cut -d' ' -f1-5)
        n=$(echo "$b" | grep -c trl)
        if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$n" -eq 6 ]; then
            echo "ok   resume/bit_exact $n resumed steps equal the uninterrupted run: $(echo "$b" | tail -1)"
        else
            echo "FAIL resume/bit_exact full: $(echo $a) resumed: $(echo $b)"
        fi
        if cmp -s "$tmp/full/model_00000012.bin" "$tmp/resumed/model_00000012.bin"; then
            echo "ok   resume/same_final_weights model_00000012.bin identical"
        else
            echo "FAIL resume/same_final_weights model_00000012.bin differs"
        fi
    else
        echo "FAIL resume/bit_exact resumed run failed: $(tail -3 "$tmp/resumed.out")"
    fi
    ls "$tmp/full" | grep -q '\.tmp$' && echo "FAIL checkpoint/no_tmp_files" || echo "ok   checkpoint/no_tmp_files in the output folder"
else
    echo "FAIL resume/bit_exact first run failed: $(tail -3 "$tmp/full.out")"
fi

# a training run improves the loss (20 steps on one shard, lr 1e-3)
if "$BIN" $SMALL -x 20 -l 1e-3 -o "$tmp/learn" >"$tmp/learn.out" 2>&1; then
    first=$(grep '^s:0 trl' "$tmp/learn/main.log" | sed 's/.*ce:\([0-9.]*\).*/\1/')
    last=$(grep '^s:19 trl' "$tmp/learn/main.log" | sed 's/.*ce:\([0-9.]*\).*/\1/')
    if awk "BEGIN{exit !($last < $first - 1.0)}"; then echo "ok   train/loss_decreases ce $first -> $last over 20 steps (want a drop > 1.0)";
    else echo "FAIL train/loss_decreases ce $first -> $last over 20 steps (want a drop > 1.0)"; fi
else
    echo "FAIL train/loss_decreases run failed: $(tail -3 "$tmp/learn.out")"
fi

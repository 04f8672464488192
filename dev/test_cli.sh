#!/usr/bin/env bash
# Tests of the trainer binary as a user runs it: bad flags and bad files give one error line and a
# non-zero exit without touching the output folder; a resumed run reproduces the uninterrupted
# run's losses bit for bit. Prints ok/FAIL lines. Run from the repository root after `make`.
set -u
BIN=${BIN:-./train_gpt2_moe_cpu} # BIN=other/binary runs these tests on another build
TRAIN=data/tinyshakespeare/tiny_shakespeare_train.bin
VAL=data/tinyshakespeare/tiny_shakespeare_val.bin
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# a small, fast configuration: d4 with 4 experts, 2 x 32 tokens per step
SMALL="-e d4 -E 4 -K 2 -b 2 -t 32 -v 0 -s 0 -i $TRAIN -j $VAL"

PREFIX=bad_input/cli_
source "$(dirname "$0")/expect_error.sh" # expect_error NAME PATTERN ARGS...: one "error:" line, non-zero exit

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

expect_error unknown_flag "unknown flag -X" $SMALL -X 1
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
expect_error compensation_above_one "flag -C: expected a number in \[0, 1\], got '1.5'" $SMALL -J 2 -C 1.5
expect_error wire_flag_not_binary "flag -Q: expected an integer" $SMALL -Q 2
# every float flag is range-checked; sizes are computed in 64 bits
expect_error final_lr_negative "flag -q: expected a number in \[0, 1\], got '-0.5'" $SMALL -q -0.5
expect_error lr_zero "flag -l: expected a number > 0" $SMALL -l 0
expect_error weight_decay_negative "flag -c: expected a number >= 0" $SMALL -c -0.1
expect_error clip_negative "flag -G: expected a number >= 0" $SMALL -G -1
expect_error aux_weight_negative "flag -A: expected a number >= 0" $SMALL -A -1
expect_error beta1_one "flag -1: expected a number in \[0, 1)" $SMALL -1 1
expect_error beta2_above_one "flag -2: expected a number in \[0, 1)" $SMALL -2 1.5
expect_error resume_flag_two "flag -y: expected an integer in \[0, 1\]" $SMALL -y 2
expect_error batch_overflows_int "B\*T\*W = 4294967296 tokens" $SMALL -b 65536 -t 65536
expect_error batch_too_big_for_int_tensors "exceeds 2^31-1 (lower -b or -t)" $SMALL -b 1024 -t 1024
expect_error output_folder_unusable "cannot create the output folder /dev/null/run" $SMALL -x 1 -o /dev/null/run
# a learning rate that blows the weights up stops the run with one line before any checkpoint
expect_error nan_stops_before_checkpoint "is nan\|is inf\|is -nan" $SMALL -x 6 -l 1e30 -o "$tmp/nan"
if ls "$tmp/nan" | grep -q 'model_'; then echo "FAIL checkpoint/no_nan_model $(ls "$tmp/nan")"; else echo "ok   checkpoint/no_nan_model no model_*.bin written by the diverged run"; fi
# a full disk (files limited to 2 MB, so the checkpoint cannot be written): one line naming the
# file and the reason, and no temporary file or half checkpoint left
(trap '' XFSZ; ulimit -f 2048; exec "$BIN" $SMALL -x 2 -o "$tmp/full") >"$tmp/out" 2>"$tmp/err"
rc=$?
if [ $rc -ne 0 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -q "^error: writing $tmp/full/.*\.bin: .*File too large" "$tmp/err" &&
   [ -z "$(ls "$tmp/full" | grep -v '^main.log$')" ]; then
    echo "ok   checkpoint/full_disk exit $rc: $(cat "$tmp/err"); left only: $(ls "$tmp/full" | tr '\n' ' ')"
else
    echo "FAIL checkpoint/full_disk exit $rc: $(head -c 300 "$tmp/err"); left: $(ls "$tmp/full" | tr '\n' ' ')"
fi
mkdir -p "$tmp/keep" && echo "previous run" >"$tmp/keep/main.log"
expect_error nothing_overwritten "top-k" -e d4 -E 4 -K 9 -o "$tmp/keep"
if [ "$(cat "$tmp/keep/main.log")" = "previous run" ]; then echo "ok   bad_input/cli_output_untouched"; else echo "FAIL bad_input/cli_output_untouched"; fi

# resume: run 12 steps with checkpoints at 6 and 12. A copy of that folder whose newest model
# (12) is truncated resumes from 6, says so in one warning, and must reproduce the uninterrupted
# run: the same main.log (cut back to step 6, then written again; timings aside) and the same
# final weights, bit for bit (fp32 on the CPU)
SCHED="-x 12 -l 1e-3 -u 3 -q 0.1 -c 0.1 -n 6"
notime() { sed -E 's/ ms:[0-9.]+//' "$1"; }
if "$BIN" $SMALL $SCHED -o "$tmp/full" >"$tmp/full.out" 2>&1; then
    mkdir -p "$tmp/resumed"
    cp "$tmp/full/"* "$tmp/resumed/"
    truncate -s 5000 "$tmp/resumed/model_00000012.bin"
    if "$BIN" $SMALL $SCHED -o "$tmp/resumed" -y 1 >"$tmp/resumed.out" 2>"$tmp/resumed.err"; then
        n=$(grep -c 'trl' "$tmp/resumed/main.log")
        if [ "$(notime "$tmp/full/main.log")" = "$(notime "$tmp/resumed/main.log")" ] && [ "$n" -eq 12 ]; then
            echo "ok   resume/bit_exact main.log identical to the uninterrupted run's ($n step lines, none repeated): $(grep '^s:11 trl' "$tmp/resumed/main.log" | cut -d' ' -f1-5)"
        else
            echo "FAIL resume/bit_exact main.log differs from the uninterrupted run's: $(diff <(notime "$tmp/full/main.log") <(notime "$tmp/resumed/main.log") | head -5)"
        fi
        if cmp -s "$tmp/full/model_00000012.bin" "$tmp/resumed/model_00000012.bin"; then
            echo "ok   resume/same_final_weights model_00000012.bin identical"
        else
            echo "FAIL resume/same_final_weights model_00000012.bin differs"
        fi
        if grep -q "^warning: checkpoint step 12 cannot be loaded.*truncated" "$tmp/resumed.err" && grep -q "resumed from step 6" "$tmp/resumed.out"; then
            echo "ok   resume/skips_corrupt_newest $(head -c 200 "$tmp/resumed.err")"
        else
            echo "FAIL resume/skips_corrupt_newest stderr: $(head -c 300 "$tmp/resumed.err")"
        fi
    else
        echo "FAIL resume/bit_exact resumed run failed: $(tail -3 "$tmp/resumed.err")"
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

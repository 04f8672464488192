#!/usr/bin/env bash
# A small MoE GPT-2 (d6: 6 layers, C = 384; 8 experts, top-2, in every layer) on Tiny Shakespeare,
# on one GPU: 16 x 256 tokens per step, 2000 steps (~25 epochs' worth of tokens seen once each
# at this size), checkpoints every 500 steps, resumed when the output folder has one.
#   bash scripts/run_tinyshakespeare.sh            (needs nvcc and a GPU)
#   SMOKE=1 bash scripts/run_tinyshakespeare.sh    (2 steps, tiny shapes, the emulated trainer on the CPU)
set -eu
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
    make -s train_gpt2_moe_emu
    BIN=./train_gpt2_moe_emu
    OUT=${OUT:-log_smoke_tinyshakespeare}
    ARGS="-e d4 -E 4 -K 2 -b 2 -t 32 -x 2 -v 2 -m 1 -s 2 -g 8 -n 2"
else
    make -s train_gpt2_moe
    BIN=./train_gpt2_moe
    OUT=${OUT:-log_tinyshakespeare_moe}
    ARGS="-e d6 -E 8 -K 2 -F 1.25 -b 16 -t 256 -x 2000 -l 1e-3 -u 100 -q 0.1 -c 0.1 -v 100 -m 20 -s 500 -n 500"
fi
RESUME=0
ls "$OUT"/model_*.bin >/dev/null 2>&1 && RESUME=1 # continue where an earlier run stopped
$BIN $ARGS -o "$OUT" -y $RESUME \
    -i data/tinyshakespeare/tiny_shakespeare_train.bin -j data/tinyshakespeare/tiny_shakespeare_val.bin

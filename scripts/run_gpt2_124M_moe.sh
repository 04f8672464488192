#!/usr/bin/env bash
# A GPT-2 124M-shaped MoE on FineWeb10B on the 8 GPUs of one node, in the spirit of llm.c's
# scripts/run_gpt2_124M.sh: d12 (12 layers, C = 768, 12 heads), every second layer an MoE layer of
# 8 experts (top-2, capacity 1.25: ~2x the active parameters of GPT-2 small per MoE layer), 0.5M
# tokens per step (8 GPUs x 32 x 1024, 2 micro-steps), lr 6e-4 with 700 warmup steps and cosine
# decay to 0, weight decay 0.1, 18865 steps (~10B tokens); one process per GPU, experts split
# evenly (one each), NCCL between them. Checkpoints every 2000 steps; resumed when there is one.
# Needs the shards of llm.c's dev/data/fineweb.py in dev/data/fineweb10B/ (the path: FINEWEB).
#   bash scripts/run_gpt2_124M_moe.sh
#   SMOKE=1 bash scripts/run_gpt2_124M_moe.sh   (2 steps, tiny shapes, 2 emulated ranks on the CPU, Tiny Shakespeare)
set -eu
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
    make -s train_gpt2_moe_emu_mpi
    LAUNCH="mpirun --allow-run-as-root --oversubscribe -np 2 ./train_gpt2_moe_emu_mpi"
    OUT=${OUT:-log_smoke_gpt2_124M_moe}
    DATA="-i data/tinyshakespeare/tiny_shakespeare_train.bin -j data/tinyshakespeare/tiny_shakespeare_val.bin"
    ARGS="-e d4 -E 4 -K 2 -M 2 -b 1 -t 32 -d 64 -x 2 -v 2 -m 1 -s 0 -n 2"
else
    make -s train_gpt2_moe
    LAUNCH="mpirun -np ${NP:-8} ./train_gpt2_moe"
    OUT=${OUT:-log_gpt2_124M_moe}
    FINEWEB=${FINEWEB:-dev/data/fineweb10B}
    DATA="-i $FINEWEB/fineweb_train_*.bin -j $FINEWEB/fineweb_val_*.bin"
    ARGS="-e d12 -E 8 -K 2 -M 2 -F 1.25 -b 32 -t 1024 -d 524288 -l 0.0006 -u 700 -q 0.0 -c 0.1 -x 18865 -v 250 -m 20 -s 5000 -n 2000"
fi
RESUME=0
ls "$OUT"/model_*.bin >/dev/null 2>&1 && RESUME=1
$LAUNCH $ARGS $DATA -o "$OUT" -y $RESUME

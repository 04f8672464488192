#!/usr/bin/env bash
# The GPT-2 124M-shaped MoE of run_gpt2_124M_moe.sh over several nodes of 8 GPUs: one process per
# GPU from a hostfile (HOSTS, one "host slots=8" line per node), 16 experts in every second layer
# (one per GPU on 2 nodes: the all-to-all crosses nodes, where LSH compression will pay), the
# same 0.5M tokens per step (16 GPUs x 32 x 1024). NCCL picks the network (InfiniBand when there
# is one); NCCL_DEBUG=INFO shows its choice. Checkpoints every 2000 steps; resumed when there is one.
#   HOSTS=hostfile NP=16 bash scripts/run_gpt2_124M_moe_multinode.sh
#   SMOKE=1 bash scripts/run_gpt2_124M_moe_multinode.sh   (2 steps, tiny shapes, 4 emulated ranks on the CPU)
set -eu
cd "$(dirname "$0")/.."
if [ "${SMOKE:-0}" = 1 ]; then
    make -s train_gpt2_moe_emu_mpi
    LAUNCH="mpirun --allow-run-as-root --oversubscribe -np 4 ./train_gpt2_moe_emu_mpi"
    OUT=${OUT:-log_smoke_gpt2_124M_moe_multinode}
    DATA="-i data/tinyshakespeare/tiny_shakespeare_train.bin -j data/tinyshakespeare/tiny_shakespeare_val.bin"
    ARGS="-e d4 -E 8 -K 2 -M 2 -b 1 -t 32 -d 128 -x 2 -v 2 -m 1 -s 0 -n 2"
else
    make -s train_gpt2_moe
    NP=${NP:-16}
    LAUNCH="mpirun -np $NP --hostfile ${HOSTS:?HOSTS: a hostfile, one 'host slots=8' line per node} -x NCCL_DEBUG -x LLMOE_TRANSPORT ./train_gpt2_moe"
    OUT=${OUT:-log_gpt2_124M_moe_multinode}
    FINEWEB=${FINEWEB:-dev/data/fineweb10B}
    DATA="-i $FINEWEB/fineweb_train_*.bin -j $FINEWEB/fineweb_val_*.bin"
    ARGS="-e d12 -E $NP -K 2 -M 2 -F 1.25 -b 32 -t 1024 -d 524288 -l 0.0006 -u 700 -q 0.0 -c 0.1 -x 18865 -v 250 -m 20 -s 5000 -n 2000"
fi
RESUME=0
ls "$OUT"/model_*.bin >/dev/null 2>&1 && RESUME=1
$LAUNCH $ARGS $DATA -o "$OUT" -y $RESUME

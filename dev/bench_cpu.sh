#!/usr/bin/env bash
# CPU benchmark (make bench-cpu): the dense d6 model and MoE variants of the same shape, measured
# in one run on the same data, with ratios against the dense baseline per token and per active
# FLOP. Active FLOPs per token = 6 * (parameters a token touches) + 12 * L * C * T (attention), as
# llm.c counts them: an MoE with E experts and top-k touches k experts' MLPs, not E.
# Usage: bash dev/bench_cpu.sh [steps] [B] [T]   (defaults 8 4 64; the first step is excluded)
set -eu
cd "$(dirname "$0")/.."
STEPS=${1:-8}; B=${2:-4}; T=${3:-64}
BIN=${BIN:-./train_gpt2_moe_cpu} # BIN=... times another build (e.g. one made with make BLAS=0)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
COMMON="-e d6 -b $B -t $T -x $STEPS -v 0 -s 0 -W 0"
run() { # name, extra flags
    "$BIN" $COMMON $2 >"$out/$1.txt" 2>&1 || { cat "$out/$1.txt"; exit 1; }
    local ms active L C
    ms=$(sed -n 's/^average step \([0-9.]*\) ms.*/\1/p' "$out/$1.txt")
    active=$(sed -n 's/^| parameters *| [0-9]* total, \([0-9]*\) active.*/\1/p' "$out/$1.txt")
    echo "$1 $ms $active"
}
{
    run dense "-E 1"
    run moe_E8_k1 "-E 8 -K 1 -F 0"
    run moe_E8_k2 "-E 8 -K 2 -F 0"
} >"$out/results"
echo "CPU benchmark: d6 (L=6 C=384), B=$B T=$T, $STEPS steps (first excluded), $OMP_NUM_THREADS threads, dropless routing"
awk -v B="$B" -v T="$T" '
    { name[NR] = $1; ms[NR] = $2; act[NR] = $3 }
    END {
        L = 6; C = 384; tok = B * T
        printf "%-11s %10s %9s %13s %12s %13s %15s\n", "model", "ms/step", "tok/s", "active params", "GFLOP/step", "ratio/token", "ratio/act.FLOP"
        for (i = 1; i <= NR; i++) {
            flops = (6 * act[i] + 12 * L * C * T) * tok
            if (i == 1) { base_ms = ms[i]; base_flops = flops }
            printf "%-11s %10.1f %9.0f %13d %12.2f %13.2f %15.2f\n", name[i], ms[i], tok / (ms[i] / 1000), act[i], flops / 1e9,
                   ms[i] / base_ms, (ms[i] / flops) / (base_ms / base_flops)
        }
    }' "$out/results"

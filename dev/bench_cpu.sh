#!/usr/bin/env bash
# CPU benchmark (make bench-cpu), in one run on the same data so that every ratio compares runs
# made minutes apart, never across days:
#   1. dense d6 and d12 with OpenBLAS and with the plain C matmuls (BLAS=0), the two builds
#      alternating run by run so that drift (thermal, noisy neighbours) falls on both;
#   2. the trainer's matmuls against OpenBLAS's own sgemm on the same shapes (dev/bench_matmul);
#   3. MoE d6 (E=8, top-1 and top-2, dropless) per token against dense, and top-1 again at 4B
#      (the optimizer's passes over all E experts' weights cost the same per step at any batch),
#      and the MLPs alone: 8 experts' matmuls on B*T/8 rows each against the dense ones on B*T;
#   4. the MPI path: W=2 processes x 1 thread against W=1 x 2 threads, the same global batch.
# Active FLOPs per token = 6 * (parameters a token touches) + 12 * L * C * T (attention), as
# llm.c counts them: an MoE with E experts and top-k touches k experts' MLPs, not E.
# Usage: bash dev/bench_cpu.sh [steps] [B] [T] [rounds]   (defaults 8 4 64 2; the first step of
# each run is excluded; each figure is the best of `rounds` runs)
set -eu
cd "$(dirname "$0")/.."
STEPS=${1:-8}; B=${2:-4}; T=${3:-64}; ROUNDS=${4:-2}
BLAS_BIN=${BLAS_BIN:-./train_gpt2_moe_cpu}
LOOPS_BIN=${LOOPS_BIN:-./train_gpt2_moe_cpu_noblas}
MPI_BIN=${MPI_BIN:-./train_gpt2_moe_mpi}
THREADS=${OMP_NUM_THREADS:-$(nproc)}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

timer=() # peak resident memory of each run, where GNU time is installed (Debian: apt-get install time)
[ -x /usr/bin/time ] && timer=(/usr/bin/time -f "peak_rss_kb %M" -o "$out/rss.txt")
run() { # name binary steps extra-flags: appends "name ms active peak_MB" to $out/results
    local name=$1 bin=$2 steps=$3 flags=$4
    OMP_NUM_THREADS=$THREADS "${timer[@]}" "$bin" -b "${RUN_B:-$B}" -t $T -x "$steps" -v 0 -s 0 -W 0 $flags >"$out/run.txt" 2>&1 ||
        { cat "$out/run.txt"; exit 1; }
    record "$name"
}
record() { # name: reads the run's stdout (and its peak memory, when measured)
    local ms active mb=-
    ms=$(sed -n 's/^average step \([0-9.]*\) ms.*/\1/p' "$out/run.txt")
    active=$(sed -n 's/^| parameters *| [0-9]* total, \([0-9]*\) active.*/\1/p' "$out/run.txt")
    [ -f "$out/rss.txt" ] && mb=$(awk '$1 == "peak_rss_kb" { printf "%.0f", $2 / 1000 }' "$out/rss.txt") && rm "$out/rss.txt"
    echo "$1 $ms $active $mb" >>"$out/results"
}
best() { # name: the least disturbed of the rounds
    awk -v n="$1" '$1 == n && (ms == "" || $2 < ms) { ms = $2; act = $3; mb = $4 } END { print ms, act, mb }' "$out/results"
}

have_loops=0; [ -x "$LOOPS_BIN" ] && have_loops=1
have_mpi=0; command -v mpirun >/dev/null && [ -x "$MPI_BIN" ] && have_mpi=1
MPIRUN="mpirun --oversubscribe $([ "$(id -u)" -eq 0 ] && echo --allow-run-as-root) --bind-to none -x OMP_NUM_THREADS=1"
d12_steps=$(( STEPS > 5 ? 5 : STEPS ))
for round in $(seq "$ROUNDS"); do
    for model in "d6 $STEPS" "d12 $d12_steps"; do
        set -- $model
        run "dense_$1_blas" "$BLAS_BIN" "$2" "-e $1 -E 1"
        [ $have_loops -eq 1 ] && run "dense_$1_loops" "$LOOPS_BIN" "$2" "-e $1 -E 1"
    done
    run moe_E8_k1 "$BLAS_BIN" "$STEPS" "-e d6 -E 8 -K 1 -F 0"
    RUN_B=$((4 * B)) run dense_d6_4B "$BLAS_BIN" "$d12_steps" "-e d6 -E 1"
    RUN_B=$((4 * B)) run moe_E8_k1_4B "$BLAS_BIN" "$d12_steps" "-e d6 -E 8 -K 1 -F 0"
    run moe_E8_k2 "$BLAS_BIN" "$STEPS" "-e d6 -E 8 -K 2 -F 0"
    if [ $have_mpi -eq 1 ] && [ $((B % 2)) -eq 0 ]; then # the same global batch as moe_E8_k1
        $MPIRUN -np 2 "$MPI_BIN" -e d6 -E 8 -K 1 -F 0 -b $((B / 2)) -t $T -x "$STEPS" -v 0 -s 0 -W 0 >"$out/run.txt" 2>&1 ||
            { cat "$out/run.txt"; exit 1; }
        record mpi_W2_E8_k1
    fi
done

echo "CPU benchmark: B=$B T=$T (global), $STEPS steps (d12: $d12_steps; the first excluded), best of $ROUNDS rounds, $THREADS threads"
echo
echo "1. dense: OpenBLAS against the plain C matmuls (BLAS=0)"
printf "%-6s %14s %14s %10s %10s %8s %14s %14s\n" model "BLAS ms/step" "loops ms/step" "BLAS tok/s" "loops tok/s" speedup \
       "BLAS peak MB" "loops peak MB"
for m in d6 d12; do
    read -r ms_b _ mb_b <<<"$(best "dense_${m}_blas")"
    if [ $have_loops -eq 1 ]; then read -r ms_l _ mb_l <<<"$(best "dense_${m}_loops")"; else ms_l=""; mb_l=-; fi
    awk -v m="$m" -v b="$ms_b" -v l="$ms_l" -v mb="$mb_b" -v ml="$mb_l" -v tok=$((B * T)) 'BEGIN {
        if (l == "") printf "%-6s %14.1f %14s %10.0f %10s %8s %14s %14s\n", m, b, "-", tok / (b / 1000), "-", "-", mb, ml
        else printf "%-6s %14.1f %14.1f %10.0f %10.0f %7.2fx %14s %14s\n", m, b, l, tok / (b / 1000), tok / (l / 1000), l / b, mb, ml }'
done
[ $have_loops -eq 0 ] && echo "(no $LOOPS_BIN: make train_gpt2_moe_cpu_noblas)"

echo
echo "2. matmuls: the trainer's matmul_forward + matmul_backward against bare sgemm, same shapes"
if [ -x dev/bench_matmul ]; then
    for m in "d6 6 384" "d12 12 768"; do
        set -- $m
        line=$(OMP_NUM_THREADS=$THREADS dev/bench_matmul "$2" "$3" $B $T | tail -1)
        read -r ms_b _ <<<"$(best "dense_${1}_blas")"
        echo "$1 $line" | awk -v step="$ms_b" '{ # d6 total F GFLOP trainer X ms sgemm Y ms
            printf "%-4s %.2f GFLOP of matmuls per step: trainer %.0f GFLOP/s, sgemm %.0f GFLOP/s (%.0f%%); they take %.0f%% of the %.0f ms step (over the whole step: %.0f GFLOP/s)\n",
                   $1, $3, $3 / ($6 / 1000), $3 / ($9 / 1000), 100 * $9 / $6, 100 * $6 / step, step, $3 / (step / 1000) }'
    done
else
    echo "(no dev/bench_matmul: it needs OpenBLAS)"
fi

echo
echo "3. MoE d6 (E=8, dropless) against dense d6, OpenBLAS; top-1 again at 4B = $((4 * B)) (the optimizer's"
echo "   passes over every expert's weights, memory-bound, cost the same per step at any batch)"
printf "%-12s %10s %9s %13s %12s %13s %15s\n" model ms/step tok/s "active params" GFLOP/step ratio/token ratio/act.FLOP
moe_rows() { # batch names...: the first name is the baseline
    local b=$1; shift
    for name in "$@"; do echo "$name $(best "$name")"; done | awk -v B="$b" -v T="$T" '
        {
            L = 6; C = 384; tok = B * T
            flops = (6 * $3 + 12 * L * C * T) * tok
            if (NR == 1) { base_ms = $2; base_flops = flops }
            printf "%-12s %10.1f %9.0f %13d %12.2f %13.2f %15.2f\n", $1, $2, tok / ($2 / 1000), $3, flops / 1e9,
                   $2 / base_ms, ($2 / flops) / (base_ms / base_flops)
        }'
}
moe_rows "$B" dense_d6_blas moe_E8_k1 moe_E8_k2
moe_rows $((4 * B)) dense_d6_4B moe_E8_k1_4B
if [ -x dev/bench_experts ]; then # the MLPs alone: an expert's matmuls on B*T/8 rows against the dense ones on B*T
    echo "the MLPs alone, the same FLOPs, 8 experts of B*T/8 rows against the dense MLP (dev/bench_experts):"
    for b in "$B" $((4 * B)); do OMP_NUM_THREADS=$THREADS dev/bench_experts 6 384 "$b" "$T" 8 | head -1 | sed "s/^/B=$b: /"; done
fi

echo
echo "4. MPI: MoE d6 E=8 top-1, W=2 processes x 1 thread against W=1 x $THREADS threads, global batch $B x $T"
if grep -q '^mpi_W2_E8_k1 ' "$out/results"; then
    read -r w1 _ <<<"$(best moe_E8_k1)"
    read -r w2 _ <<<"$(best mpi_W2_E8_k1)"
    awk -v a="$w1" -v b="$w2" -v tok=$((B * T)) 'BEGIN { printf "W=1: %.1f ms/step (%.0f tok/s); W=2: %.1f ms/step (%.0f tok/s); W=2 per token: %.2fx W=1\n", a, tok / (a / 1000), b, tok / (b / 1000), b / a }'
else
    echo "(skipped: needs mpirun, $MPI_BIN (make train_gpt2_moe_mpi) and an even B)"
fi

echo
echo "5. where a step goes, phase by phase (dev/profile_step; kernels inside them: perf, README)"
if [ -x dev/profile_step ]; then
    OMP_NUM_THREADS=$THREADS dev/profile_step d6 $B $T 1 1 5
    OMP_NUM_THREADS=$THREADS dev/profile_step d6 $B $T 8 1 5
fi

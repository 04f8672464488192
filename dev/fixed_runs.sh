#!/usr/bin/env bash
# Fixed short runs of a trainer binary, for checking that a change that should not change results
# (a refactor) does not: prints one md5 per run over its stdout, main.log and every file it wrote,
# with the wall-clock fields (ms, tok/s) removed. Compare the digests of two builds:
#   bash dev/fixed_runs.sh ./train_gpt2_moe_cpu ./train_gpt2_moe_mpi > /tmp/new.txt
#   bash dev/fixed_runs.sh /tmp/old/train_gpt2_moe_cpu /tmp/old/train_gpt2_moe_mpi > /tmp/old.txt
#   diff /tmp/old.txt /tmp/new.txt
# Run from the repository root. The MPI runs are left out when the second binary or mpirun is missing.
# KEEP=dir keeps the outputs there, to diff two builds' runs when their digests differ.
set -eu
CPU=${1:-./train_gpt2_moe_cpu}
MPI=${2:-}
tmp=$(mktemp -d)
trap 'if [ -n "${KEEP:-}" ]; then rm -rf "$KEEP"; cp -r "$tmp" "$KEEP"; fi; rm -rf "$tmp"' EXIT
export OMP_NUM_THREADS=2
COMMON="-b 2 -t 32 -x 6 -v 3 -m 2 -s 6 -g 8 -n 3 -l 1e-3 -u 2 -q 0.1 -c 0.1"

digest() { # name dir: md5 of stdout and every file, timings removed
    local name=$1 dir=$2
    {
        sed -E "s|$tmp|TMP|g; s/[0-9.]+ ms//g; s/[0-9.]+ tok\/s//g; s/average step.*//" "$dir.out"
        for f in $(ls "$dir"); do
            echo "== $f"
            case $f in
                *.log) sed -E 's/ ms:[0-9.]+//; s/ lsh_ms:[0-9.]+//' "$dir/$f" ;;
                *) md5sum <"$dir/$f" ;;
            esac
        done
    } | md5sum | sed "s/-\$/$name/"
}
run() { # name binary args...
    local name=$1; shift
    "$@" -o "$tmp/$name" >"$tmp/$name.out" 2>&1
    digest "$name" "$tmp/$name"
}
run dense "$CPU" -e d4 $COMMON
run moe_capacity "$CPU" -e d4 -E 4 -K 2 -F 1.0 -M 2 $COMMON
run moe_lsh "$CPU" -e d4 -E 8 -K 2 -F 0 -J 3 -P 1 -V 2 $COMMON
run upcycled "$CPU" -e "$tmp/dense/model_00000006.bin" -E 4 -K 2 -N 0.01 $COMMON
mkdir -p "$tmp/resumed"
cp "$tmp/moe_capacity/model_00000003.bin" "$tmp/moe_capacity/state_00000003_00000.bin" "$tmp/resumed/"
"$CPU" -e d4 -E 4 -K 2 -F 1.0 -M 2 $COMMON -o "$tmp/resumed" -y 1 >"$tmp/resumed.out" 2>&1
digest resumed "$tmp/resumed"
if [ -n "$MPI" ] && command -v mpirun >/dev/null; then
    export OMP_NUM_THREADS=1
    MPIRUN="mpirun --allow-run-as-root --oversubscribe -np 2"
    run mpi_moe $MPIRUN "$MPI" -e d4 -E 4 -K 2 -F 1.0 -b 1 -t 32 -x 4 -v 2 -m 2 -s 4 -g 8 -n 2 -l 1e-3
    run mpi_lsh $MPIRUN "$MPI" -e d4 -E 4 -K 2 -F 0 -J 2 -P 2 -b 1 -t 32 -x 4 -v 2 -m 2 -s 4 -g 8 -n 2 -l 1e-3
fi

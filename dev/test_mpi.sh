#!/usr/bin/env bash
# Expert parallelism over MPI (CPU processes): test_moe_mpi at W = 1, 2, 4 against the single
# process; a checkpoint written by 2 ranks and read by 4; errors that stop every rank with one
# line; and the trainer's losses for W = 1, 2, 4 on the same global batch. Prints ok/FAIL lines
# (skip when mpirun is missing). Run from the repository root after `make test_moe_mpi
# train_gpt2_moe_mpi`.
set -u
if ! command -v mpirun >/dev/null; then
    echo "skip mpi (mpirun not found: apt-get install libopenmpi-dev openmpi-bin)"
    exit 0
fi
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
export OMP_NUM_THREADS=1 # W processes on 2 cores
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1. equivalence with the single-process run, forced routing, gradients
for w in 1 2 4; do
    timeout 300 $MPIRUN -np $w ./test_moe_mpi 2>&1 | grep -E '^(ok|FAIL)'
    [ "${PIPESTATUS[0]}" -eq 0 ] || echo "FAIL mpi/test_moe_mpi_W$w exited non-zero"
done

# 2. checkpoint across world sizes
timeout 120 $MPIRUN -np 2 ./test_moe_mpi --write "$tmp/ck.bin" 2>&1 | grep -E '^(ok|FAIL)'
timeout 120 $MPIRUN -np 4 ./test_moe_mpi --read "$tmp/ck.bin" 2>&1 | grep -E '^(ok|FAIL)'

# 3. errors: every rank exits non-zero, our message appears once, nothing hangs
expect_error() { # name pattern command...
    local name=$1 pattern=$2; shift 2
    timeout 120 "$@" >"$tmp/out" 2>"$tmp/err"
    local rc=$? n
    n=$(grep -c '^error:' "$tmp/err")
    if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$n" -eq 1 ] && grep -q -- "$pattern" "$tmp/err"; then
        echo "ok   bad_input/mpi_$name exit $rc: $(grep '^error:' "$tmp/err")"
    else
        echo "FAIL bad_input/mpi_$name exit $rc (124 = hung), $n error lines: $(head -c 300 "$tmp/err")"
    fi
}
SMALL="-e d4 -b 1 -t 32 -x 2 -v 0 -s 0"
expect_error one_rank_cannot_read "rank 2: dataloader" $MPIRUN -np 4 ./test_moe_mpi --fail-rank 2
expect_error experts_not_divisible "cannot be split evenly over W=3" $MPIRUN -np 3 ./train_gpt2_moe_mpi $SMALL -E 4
expect_error mismatched_flags "differs from rank 0" $MPIRUN -np 1 ./train_gpt2_moe_mpi $SMALL -E 4 : -np 1 ./train_gpt2_moe_mpi $SMALL -E 8
python3 - "$tmp/trunc.bin" <<'PY'
import struct, sys
t = list(range(3000))
b = struct.pack("<256i", 20240520, 1, len(t), *([0] * 253)) + struct.pack("<%dH" % len(t), *t)
open(sys.argv[1], "wb").write(b[:-10])
PY
expect_error truncated_shard "truncated" $MPIRUN -np 2 ./train_gpt2_moe_mpi $SMALL -E 4 -i "$tmp/trunc.bin"

# 4. the trainer on W = 1, 2, 4 processes, same global batch of 4 x 32 tokens, 10 steps: the
# losses agree to fp32 reassociation (gradient sums over ranks), bound 2e-5
for cf in 0 1.0; do
    for w in 1 2 4; do
        b=$((4 / w))
        timeout 600 $MPIRUN -np $w ./train_gpt2_moe_mpi -e d4 -E 4 -K 2 -F $cf -b $b -t 32 -d 128 -x 10 -v 0 -s 0 \
            -l 1e-3 -o "$tmp/w${w}_cf$cf" >"$tmp/w${w}_cf$cf.out" 2>&1 || echo "FAIL mpi/trainer_W${w}_cf$cf: $(tail -2 "$tmp/w${w}_cf$cf.out")"
    done
    python3 - "$tmp" "$cf" <<'PY'
import sys, re
tmp, cf = sys.argv[1], sys.argv[2]
def losses(w):
    out = {}
    for line in open(f"{tmp}/w{w}_cf{cf}/main.log"):
        m = re.match(r"s:(\d+) trl:([0-9.]+).* drop:(\d+)", line)
        if m: out[int(m.group(1))] = (float(m.group(2)), int(m.group(3)))
    return out
try:
    l = {w: losses(w) for w in (1, 2, 4)}
    worst = max(abs(l[w][s][0] - l[1][s][0]) for w in (2, 4) for s in l[1])
    same_drop = all(l[w][s][1] == l[1][s][1] for w in (2, 4) for s in l[1])
    ok = len(l[1]) == 10 and all(len(l[w]) == 10 for w in (2, 4)) and worst < 2e-5 and same_drop
    table = " ".join(f"s{s}:{l[1][s][0]:.6f}/{l[2][s][0]:.6f}/{l[4][s][0]:.6f}" for s in (0, 9))
    print(f"{'ok  ' if ok else 'FAIL'} mpi/trainer_losses_W1_W2_W4_capacity{cf} max diff {worst:.1e} (bound 2e-5), same dropped slots: {same_drop}; W1/W2/W4 {table}")
    for s in sorted(l[1]):
        print(f"     capacity {cf} step {s}: loss W=1 {l[1][s][0]:.6f}  W=2 {l[2][s][0]:.6f}  W=4 {l[4][s][0]:.6f}  dropped slots {l[1][s][1]}")
except Exception as e:
    print(f"FAIL mpi/trainer_losses_W1_W2_W4_capacity{cf} {e}")
PY
done
for w in 2 4; do
    grep -h "a2a" "$tmp/w${w}_cf0/main.log" | head -1 | grep -o "a2a_sent.*" | sed "s/^/     W=$w rank 0, step 0, MB per all-to-all (dispatch, combine, their backwards): /"
done

# 5. resume under MPI: the ranks agree on the newest checkpoint every rank can load. A W=2 run
# with checkpoints at 3 and 6, copied with rank 1's state of step 6 deleted, resumes both ranks
# from step 3 and reproduces the uninterrupted run; resumed with W=4 it stops with one line that
# names the rank without a state file, without hanging
RUN2="-e d4 -E 4 -K 2 -b 1 -t 32 -x 6 -n 3 -v 0 -s 0 -l 1e-3"
notime() { sed -E 's/ ms:[0-9.]+//' "$1"; }
if timeout 300 $MPIRUN -np 2 ./train_gpt2_moe_mpi $RUN2 -o "$tmp/r2" >"$tmp/r2.out" 2>&1; then
    mkdir -p "$tmp/r2b"
    cp "$tmp/r2/"* "$tmp/r2b/"
    rm "$tmp/r2b/state_00000006_00001.bin"
    timeout 300 $MPIRUN -np 2 ./train_gpt2_moe_mpi $RUN2 -o "$tmp/r2b" -y 1 >"$tmp/r2b.out" 2>"$tmp/r2b.err"
    rc=$?
    if [ $rc -eq 0 ] && grep -q "resumed from step 3" "$tmp/r2b.out" && grep -q "step 6 .*incomplete" "$tmp/r2b.err" &&
       [ "$(notime "$tmp/r2/main.log")" = "$(notime "$tmp/r2b/main.log")" ] && cmp -s "$tmp/r2/model_00000006.bin" "$tmp/r2b/model_00000006.bin"; then
        echo "ok   mpi/resume_agrees_on_step both ranks resumed from step 3 (rank 1 had no state for 6); main.log and model_00000006.bin equal the uninterrupted run's"
    else
        echo "FAIL mpi/resume_agrees_on_step exit $rc: $(grep -h 'resumed\|error\|warning' "$tmp/r2b.out" "$tmp/r2b.err" | head -3)"
    fi
    expect_error resume_with_more_ranks "rank 2: flag -y 1: no checkpoint (model_\*.bin with state_\*_00002.bin)" \
        $MPIRUN -np 4 ./train_gpt2_moe_mpi -e d4 -E 4 -K 2 -b 1 -t 32 -x 6 -n 3 -v 0 -s 0 -l 1e-3 -o "$tmp/r2" -y 1
else
    echo "FAIL mpi/resume_agrees_on_step first run failed: $(tail -2 "$tmp/r2.out")"
fi

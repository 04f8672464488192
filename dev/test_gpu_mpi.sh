#!/usr/bin/env bash
# Expert parallelism of the GPU trainer, emulated on the CPU under mpirun (train_gpt2_moe_emu_mpi:
# fp32, the MPI transport of gpu_comm.cuh), against the CPU trainer's MPI build on the same global
# batch: losses and dropped slots for W = 1, 2, 4; with LSH at W = 2, 4 against the CPU trainer's
# single process simulating W sources (-V W); a router that gives one rank no tokens; a
# checkpoint written by 2 ranks read by 4; resume and repeat bit-exact; a rank that cannot resume
# stops all. Prints ok/FAIL lines (skip without mpirun). Run from the repository root after
# `make train_gpt2_moe_emu_mpi train_gpt2_moe_mpi train_gpt2_moe_cpu`.
set -u
if ! command -v mpirun >/dev/null || [ ! -x ./train_gpt2_moe_emu_mpi ] || [ ! -x ./train_gpt2_moe_mpi ] || [ ! -x ./train_gpt2_moe_cpu ]; then
    echo "skip gpu_mpi (needs mpirun, train_gpt2_moe_emu_mpi, train_gpt2_moe_mpi and train_gpt2_moe_cpu)"
    exit 0
fi
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
GPU=./train_gpt2_moe_emu_mpi
CPU=./train_gpt2_moe_mpi
CPU_SOLO=./train_gpt2_moe_cpu
export OMP_NUM_THREADS=1 # W processes on 2 cores
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
DATA="-i data/tinyshakespeare/tiny_shakespeare_train.bin -j data/tinyshakespeare/tiny_shakespeare_val.bin"
RUN="-E 4 -K 2 -t 32 -d 128 -x 3 -v 3 -m 1 -s 0 -l 1e-3 $DATA" # global batch 4 x 32 tokens
notime() { sed -E 's/ ms:[0-9.]+//' "$1"; }

# the losses, dropped slots and wire MB of two main.logs (and rank 0's LSH centroids per row,
# unless a fifth argument says the CPU log is one process simulating the ranks): one line
compare_logs() { # name cpu_log gpu_log bound [simulated]
    python3 - "$@" <<'PY'
import re, sys
name, a, b, bound = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
simulated = len(sys.argv) > 5
def field(line, key):
    m = re.search(r" %s:([0-9.]+)" % key, line)
    return m.group(1) if m else None
def read(path):
    out = []
    for line in open(path):
        m = re.match(r"s:(\d+) (tel|trl):([0-9.]+)", line)
        if m: out.append((int(m.group(1)), m.group(2), float(m.group(3)), field(line, "drop"), field(line, "wire_mb"),
                          None if simulated else field(line, "lsh_rate")))
    return out
x, y = read(a), read(b)
ok = len(x) == len(y) > 0 and all(p[:2] == q[:2] and p[3:] == q[3:] for p, q in zip(x, y))
worst = max(abs(p[2] - q[2]) for p, q in zip(x, y)) if ok else float("inf")
rows = " ".join(f"{p[1]}@{p[0]}:{p[2]:.6f}/{q[2]:.6f}" + (f"(drop {p[3]})" if p[3] else "") + (f"(lsh {q[5]})" if q[5] else "")
                for p, q in zip(x, y))
same = "same dropped slots, wire MB" + (" and rank 0's centroid counts" if any(q[5] for q in y) else "")
print(f"{'ok  ' if ok and worst <= bound else 'FAIL'} gpu_mpi/{name} max diff {worst:.1e} (bound {bound:g}), {same}: {ok}; CPU/GPU {rows}")
PY
}

# 1. W = 1, 2, 4 against the CPU trainer's MPI runs (capacity 1.0 drops slots; and dropless at W = 2).
# Bound 2e-5: fp32 gradient sums over ranks in another order (the CPU trainer's own W bound)
for cf in 1.0 0; do
    for w in 1 2 4; do
        [ "$cf" = 0 ] && [ $w -ne 2 ] && continue
        b=$((4 / w))
        timeout 600 $MPIRUN -np $w $CPU -e d4 $RUN -F $cf -b $b -o "$tmp/cpu_w${w}_$cf" >"$tmp/cpu.out" 2>&1 || echo "FAIL gpu_mpi/cpu_run_W$w: $(tail -2 "$tmp/cpu.out")"
        timeout 600 $MPIRUN -np $w $GPU -e d4 $RUN -F $cf -b $b -o "$tmp/gpu_w${w}_$cf" >"$tmp/gpu.out" 2>&1 || echo "FAIL gpu_mpi/gpu_run_W$w: $(tail -2 "$tmp/gpu.out")"
        compare_logs "W${w}_capacity$cf" "$tmp/cpu_w${w}_$cf/main.log" "$tmp/gpu_w${w}_$cf/main.log" 2e-5
    done
done
grep -h "a2a_sent" "$tmp/gpu_w2_1.0/main.log" | head -1 | grep -o "a2a_sent.*" | sed "s/^/     W=2 rank 0, step 0, MB per all-to-all (dispatch, combine, their backwards): /"

# LSH: W real ranks (mpirun -np W, -V 1) hash the same groups as one CPU process simulating W
# source ranks (-V W): the same losses and centroids on the wire (bound as above); and rank 0's
# own centroid counts as the CPU trainer's MPI build's
for w in 2 4; do
    LSHRUN="-e d4 $RUN -F 0 -J 2 -P 2"
    timeout 600 $CPU_SOLO $LSHRUN -b 4 -V $w -o "$tmp/cpu_lsh$w" >"$tmp/cpu.out" 2>&1 || echo "FAIL gpu_mpi/cpu_lsh_V$w: $(tail -2 "$tmp/cpu.out")"
    timeout 600 $MPIRUN -np $w $CPU $LSHRUN -b $((4 / w)) -o "$tmp/cpu_mpi_lsh$w" >"$tmp/cpu.out" 2>&1 || echo "FAIL gpu_mpi/cpu_lsh_W$w: $(tail -2 "$tmp/cpu.out")"
    timeout 600 $MPIRUN -np $w $GPU $LSHRUN -b $((4 / w)) -o "$tmp/gpu_lsh$w" >"$tmp/gpu.out" 2>&1 || echo "FAIL gpu_mpi/gpu_lsh_W$w: $(tail -2 "$tmp/gpu.out")"
    compare_logs "W${w}_lsh_vs_cpu_V$w" "$tmp/cpu_lsh$w/main.log" "$tmp/gpu_lsh$w/main.log" 2e-5 simulated
    compare_logs "W${w}_lsh_vs_cpu_W$w" "$tmp/cpu_mpi_lsh$w/main.log" "$tmp/gpu_lsh$w/main.log" 2e-5
done

# 2. a checkpoint whose routers send every token to rank 1's experts: rank 0's experts get no
# rows at all, and every rank still posts its all-to-alls (no hang); the CPU trainer agrees
python3 - "$tmp/gpu_w2_0/model_00000003.bin" "$tmp/forced.bin" <<'PY'
import struct, sys
src, dst = sys.argv[1], sys.argv[2]
data = bytearray(open(src, "rb").read())
h = struct.unpack_from("<256i", data)
maxT, V, L, NH, C, Vp, E, K, every, H = h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]
Lm = L // every; Ld = L - Lm
sizes = [Vp*C, maxT*C, L*C, L*C, L*3*C*C, L*3*C, L*C*C, L*C, L*C, L*C, Ld*4*C*C, Ld*4*C, Ld*C*4*C, Ld*C,
         Lm*E*C, Lm*E*H*C, Lm*E*H, Lm*E*C*H, Lm*E*C, C, C]
off = [1024]
for n in sizes: off.append(off[-1] + 4 * n)
def put(k, i, v): struct.pack_into("<f", data, off[k] + 4 * i, v)
for i in range(L * C): # ln2 maps every row to about ln2b = 1
    put(8, i, struct.unpack_from("<f", data, off[8] + 4 * i)[0] * 0.01); put(9, i, 1.0)
for m in range(Lm):
    for e in range(E):
        for c in range(C): put(14, (m * E + e) * C + c, (1.0 if e >= E // 2 else -1.0) + 0.01 * e)
open(dst, "wb").write(data)
PY
FORCED="-e $tmp/forced.bin -t 32 -d 128 -x 2 -v 2 -m 1 -s 0 -l 1e-3 -F 0 -Z 0 $DATA" # (-Z 0: these logits are ~C)
timeout 300 $MPIRUN -np 2 $CPU $FORCED -b 2 -o "$tmp/forced_cpu" >"$tmp/fc.out" 2>&1
timeout 300 $MPIRUN -np 2 $GPU $FORCED -b 2 -o "$tmp/forced_gpu" >"$tmp/fg.out" 2>&1
rc=$?
if [ $rc -eq 0 ] && grep -q "load/uniform 0.00 0.00" "$tmp/fg.out"; then
    compare_logs forced_to_rank_1_no_hang "$tmp/forced_cpu/main.log" "$tmp/forced_gpu/main.log" 2e-5
else
    echo "FAIL gpu_mpi/forced_to_rank_1_no_hang exit $rc (124 = hung): $(grep -m1 '^step' "$tmp/fg.out") $(tail -1 "$tmp/fg.out")"
fi

# 3. the W = 2 checkpoint read by 4 ranks: the same validation loss as the W = 2 run's last
timeout 300 $MPIRUN -np 4 $GPU -e "$tmp/gpu_w2_1.0/model_00000003.bin" -F 1.0 -b 1 -t 32 -d 128 -x 0 -v 1 -m 1 -s 0 $DATA -o "$tmp/read4" >"$tmp/r4.out" 2>&1
a=$(grep '^s:3 tel' "$tmp/gpu_w2_1.0/main.log" | cut -d: -f3)
b=$(grep '^s:0 tel' "$tmp/read4/main.log" | cut -d: -f3)
if [ -n "$a" ] && [ "$a" = "$b" ]; then echo "ok   gpu_mpi/checkpoint_W2_read_by_W4 val loss $b, as the W=2 run's at its last step";
else echo "FAIL gpu_mpi/checkpoint_W2_read_by_W4 W=2 run: '$a', read by 4: '$b' $(tail -1 "$tmp/r4.out")"; fi

# 4. resume at W = 2 from step 2 of 4, and the same run again: both bit-exact
SCHED="-e d4 -E 4 -K 2 -F 1.0 -b 2 -t 32 -d 128 -x 4 -n 2 -v 2 -m 1 -s 0 -l 1e-3 $DATA"
timeout 600 $MPIRUN -np 2 $GPU $SCHED -o "$tmp/full" >"$tmp/full.out" 2>&1
timeout 600 $MPIRUN -np 2 $GPU $SCHED -o "$tmp/again" >"$tmp/again.out" 2>&1
mkdir -p "$tmp/resumed"
cp "$tmp/full/model_00000002.bin" "$tmp/full/state_00000002_0000"[01].bin "$tmp/full/main.log" "$tmp/resumed/"
timeout 600 $MPIRUN -np 2 $GPU $SCHED -o "$tmp/resumed" -y 1 >"$tmp/resumed.out" 2>&1
if [ "$(notime "$tmp/full/main.log")" = "$(notime "$tmp/resumed/main.log")" ] && cmp -s "$tmp/full/model_00000004.bin" "$tmp/resumed/model_00000004.bin"; then
    echo "ok   gpu_mpi/resume_bit_exact W=2: main.log and model_00000004.bin identical to the uninterrupted run's"
else
    echo "FAIL gpu_mpi/resume_bit_exact $(diff <(notime "$tmp/full/main.log") <(notime "$tmp/resumed/main.log") | head -3) $(tail -1 "$tmp/resumed.out")"
fi
if [ "$(notime "$tmp/full/main.log")" = "$(notime "$tmp/again/main.log")" ] && cmp -s "$tmp/full/model_00000004.bin" "$tmp/again/model_00000004.bin"; then
    echo "ok   gpu_mpi/two_runs_identical W=2: the same command twice, the same main.log and weights"
else
    echo "FAIL gpu_mpi/two_runs_identical $(diff <(notime "$tmp/full/main.log") <(notime "$tmp/again/main.log") | head -3)"
fi

# 5. a rank that cannot start stops all, with one line naming it
mkdir -p "$tmp/half"
cp "$tmp/full/model_00000002.bin" "$tmp/full/state_00000002_00000.bin" "$tmp/half/"
timeout 120 $MPIRUN -np 2 $GPU $SCHED -o "$tmp/half" -y 1 >"$tmp/half.out" 2>"$tmp/half.err"
rc=$?
n=$(grep -c '^error:' "$tmp/half.err")
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ "$n" -eq 1 ] && grep -q "^error: rank 1: flag -y 1: no checkpoint" "$tmp/half.err"; then
    echo "ok   gpu_mpi/rank_that_cannot_resume_stops_all exit $rc: $(grep '^error:' "$tmp/half.err")"
else
    echo "FAIL gpu_mpi/rank_that_cannot_resume_stops_all exit $rc (124 = hung), $n error lines: $(head -c 300 "$tmp/half.err")"
fi

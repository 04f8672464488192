#!/usr/bin/env bash
# The run scripts of scripts/ in their smoke mode (SMOKE=1: 2 steps, tiny shapes, the emulated GPU
# trainer on the CPU, under mpirun for the multi-GPU ones): each trains 2 steps and writes a
# checkpoint, and run again it resumes from it. scripts/run_gutenberg.sh (the CPU trainer, 12 runs)
# runs 1 step, then 2 (resuming every run), then again (every run finished), and its logs feed the
# plot scripts dev/plot_gutenberg.py and dev/plot_log.py and the gradient check dev/lsh_grad_error.
# Prints ok/FAIL/skip lines.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
PYTHON=${PYTHON:-/usr/bin/python3}
source "$(dirname "$0")/expect_error.sh" # expect_error NAME PATTERN ARGS...: one "error:" line, non-zero exit
gutenberg() {
    local out="$tmp/gutenberg" n
    SMOKE=1 STEPS=1 OUT="$out" timeout 900 bash scripts/run_gutenberg.sh >"$tmp/g1" 2>&1
    SMOKE=1 OUT="$out" timeout 900 bash scripts/run_gutenberg.sh >"$tmp/g2" 2>&1
    SMOKE=1 OUT="$out" timeout 900 bash scripts/run_gutenberg.sh >"$tmp/g3" 2>&1
    n=$(grep -c '^run ' "$tmp/g1")
    if [ "$n" -ge 12 ] && [ "$(grep -c '^step    1/1' "$tmp/g1")" = "$n" ] && [ "$(grep -c 'resumed from step 1' "$tmp/g2")" = "$n" ] &&
       [ "$(grep -c '^step    2/2' "$tmp/g2")" = "$n" ] && [ "$(grep -c 'finished already' "$tmp/g3")" = "$n" ] &&
       [ "$(ls "$out"/*/model_00000002.bin | wc -l)" = "$n" ] && [ "$(ls "$out"/*/model_00000001.bin 2>/dev/null | wc -l)" = 0 ]; then
        echo "ok   scripts/run_gutenberg smoke: $n runs trained 1 step, resumed to 2, then found finished; only the last checkpoints kept"
    else
        echo "FAIL scripts/run_gutenberg smoke: $(tail -3 "$tmp/g1" "$tmp/g2" "$tmp/g3" | tr '\n' ' ' | head -c 400)"
        return
    fi
    lsh_grad_error "$out"
    if ! "$PYTHON" -c "import matplotlib" 2>/dev/null; then echo "skip plots (no matplotlib for $PYTHON)"; return; fi
    "$PYTHON" dev/plot_gutenberg.py "$out" -o "$tmp/plots" --tokens 128 >"$tmp/p1" 2>&1
    # the table's value for lsh20 is main.log's val loss at step 2
    want=$(grep '^s:2 tel:' "$out/lsh20/main.log" | cut -d: -f3)
    got=$(grep '^lsh20,' "$tmp/plots/results.csv" | cut -d, -f4)
    if [ "$(ls "$tmp/plots"/*.png | wc -l)" = 3 ] && [ "$(wc -l <"$tmp/plots/results.csv")" = $((n + 1)) ] &&
       "$PYTHON" -c "import sys; sys.exit(abs(float('$want') - float('$got')) > 1e-5)" 2>/dev/null; then
        echo "ok   plots/plot_gutenberg 3 PNGs, results.csv with $n runs (lsh20's val loss $got, main.log says $want), curves.csv"
    else
        echo "FAIL plots/plot_gutenberg $(tail -3 "$tmp/p1" | tr '\n' ' ')"
    fi
    # TIME=1 times lsh20 again from its last checkpoint, two rounds; the table takes the faster
    SMOKE=1 TIME=1 TIME_STEPS=2 RUNS=lsh20 OUT="$out" timeout 300 bash scripts/run_gutenberg.sh >"$tmp/t1" 2>&1
    want=$(awk '{ print $4 }' "$out/lsh20/timing.txt" 2>/dev/null | sort -g | head -1)
    "$PYTHON" dev/plot_gutenberg.py "$out" -o "$tmp/plots" --tokens 128 >"$tmp/p2" 2>&1
    got=$(tr -d '\r' <"$tmp/plots/results.csv" | grep '^lsh20,' | cut -d, -f10,11) # csv rows end in \r\n
    if [ "$(grep -c '^round [12] ms [0-9.]* lsh_ms [0-9.]*$' "$out/lsh20/timing.txt" 2>/dev/null)" = 2 ] &&
       [ "$(tr -d '\r' <"$tmp/plots/results.csv" | grep -c '^dense,.*,0$')" = 1 ] &&
       "$PYTHON" -c "import sys; sys.exit(abs(float('$want') - float('${got%,*}')) > 1e-3 or '${got#*,}' != '1')" 2>/dev/null; then
        echo "ok   scripts/run_gutenberg TIME=1: lsh20 timed in 2 rounds; the table's step time is the faster round's, $want ms"
    else
        echo "FAIL scripts/run_gutenberg TIME=1: want $want,1 got '$got': $(tail -n 2 "$tmp/t1" "$tmp/p2" | tr '\n' ' ' | head -c 300)"
    fi
    echo "round 1 ms fast lsh_ms 2" >"$out/lsh20/timing.txt"
    BIN=$PYTHON PREFIX=plots/ expect_error bad_timing "timing.txt:1: expected" dev/plot_gutenberg.py "$out" -o "$tmp/plots"
    rm "$out/lsh20/timing.txt"
    # equal-quality steps by hand: a curve 10 @0, 6 @100, 5 @200 reaches 5.5 at step 150, 6 at 100,
    # 12 at 0 and never 4
    got=$(cd dev && "$PYTHON" -c "from plot_gutenberg import steps_to_reach as f; r = {'val': {0: 10.0, 100: 6.0, 200: 5.0}}; print(f(r, 5.5), f(r, 6.0), f(r, 12.0), f(r, 4.0))" 2>&1)
    if [ "$got" = "150.0 100.0 0 None" ]; then
        echo "ok   plots/steps_to_reach interpolates between val points: $got"
    else
        echo "FAIL plots/steps_to_reach want '150.0 100.0 0 None', got '$got'"
    fi
    if "$PYTHON" dev/plot_log.py "$out/dense" "$out/lsh20" -o "$tmp/one.png" >/dev/null 2>&1 && [ -s "$tmp/one.png" ]; then
        echo "ok   plots/plot_log loss, lr, norm, expert load and LSH panels of two logs in one PNG"
    else
        echo "FAIL plots/plot_log did not write a PNG"
    fi
    printf 's:0 trl:1.0 ce:1.0\ns:1 trl:oops\n' >"$tmp/bad.log"
    BIN=$PYTHON PREFIX=plots/ expect_error bad_log "bad.log:2: not a main.log line" dev/plot_log.py "$tmp/bad.log" -o "$tmp/bad.png"
    # a run just started (its log at step 0) beside finished ones: the table is at step 0 and
    # there is no crossover to print (a run in progress must not stop the plots). The val losses
    # are set so that moe_e8k1 falls by 0.1 by step 2 and reaches lsh20's step-0 loss at step 1:
    # the crossovers, were they computed, would divide by the zero steps of the common point
    mkdir -p "$tmp/early/new" "$tmp/early/lsh20" "$tmp/early/moe_e8k1" && grep '^s:0 ' "$out/lsh20/main.log" >"$tmp/early/new/main.log"
    base0=$(grep '^s:0 tel:' "$out/moe_e8k1/main.log" | cut -d: -f3)
    for r in moe_e8k1 lsh20; do
        awk -v v="$base0" -v r=$r '/^s:0 tel:/ && r == "lsh20" { printf "s:0 tel:%.6f\n", v - 0.05; next }
            /^s:2 tel:/ && r == "moe_e8k1" { printf "s:2 tel:%.6f\n", v - 0.1; next } { print }' "$out/$r/main.log" >"$tmp/early/$r/main.log"
    done
    if "$PYTHON" dev/plot_gutenberg.py "$tmp/early" -o "$tmp/early_plots" --tokens 128 >"$tmp/p4" 2>&1 &&
       grep -q '^val loss at step 0 ' "$tmp/p4" && ! grep -q 'saves' "$tmp/p4"; then
        echo "ok   plots/plot_gutenberg a run at step 0 beside a finished one: table at step 0, no crossovers"
    else
        echo "FAIL plots/plot_gutenberg with a run at step 0: $(tail -n 2 "$tmp/p4" | tr '\n' ' ' | head -c 300)"
    fi
    # runs lost with their folders: --earlier takes lsh10 and dense from the table above, and TIME=1
    # times lsh10 from the first finished E=8 K=1 run's checkpoint (moe_e8k1), dense from new weights
    cp -r "$tmp/plots" "$tmp/before"
    rm -rf "$out/lsh10" "$out/dense"
    SMOKE=1 TIME=1 TIME_STEPS=2 TIME_ROUNDS=1 RUNS="dense lsh10" OUT="$out" timeout 300 bash scripts/run_gutenberg.sh >"$tmp/t2" 2>&1
    "$PYTHON" dev/plot_gutenberg.py "$out" --earlier "$tmp/before" -o "$tmp/after" --tokens 128 >"$tmp/p3" 2>&1
    want=$(tr -d '\r' <"$tmp/before/results.csv" | grep '^lsh10,' | cut -d, -f1-8)
    got=$(tr -d '\r' <"$tmp/after/results.csv" | grep '^lsh10,')
    if grep -q '^round 1 ms [0-9.]* lsh_ms [0-9.]* from moe_e8k1$' "$out/lsh10/timing.txt" 2>/dev/null &&
       grep -q '^round 1 ms [0-9.]* lsh_ms - from new$' "$out/dense/timing.txt" 2>/dev/null &&
       [ "$(wc -l <"$tmp/after/results.csv")" = $((n + 1)) ] && [ "${got%,*,*,*}" = "$want" ] && [ "${got##*,}" = 1 ] &&
       grep -q "(no main.log in $out): dense, lsh10$" "$tmp/p3"; then
        echo "ok   plots/plot_gutenberg --earlier: lost runs dense and lsh10 kept from the earlier table; TIME=1 timed lsh10 from moe_e8k1's checkpoint, dense from new weights"
    else
        echo "FAIL plots/plot_gutenberg --earlier: want '$want,...,1' got '$got': $(tail -n 2 "$tmp/t2" "$tmp/p3" | tr '\n' ' ' | head -c 300)"
    fi
    printf 'run,what\nx,y\n' >"$tmp/before/results.csv"
    BIN=$PYTHON PREFIX=plots/ expect_error bad_earlier "results.csv:2: not a results.csv" dev/plot_gutenberg.py "$out" --earlier "$tmp/before" -o "$tmp/after"
}
# dev/lsh_grad_error on a smoke run's 2-step MoE checkpoint: a row per tensor, and on weights this
# fresh the rates are ~20%, 60% and 90%, so one draw's error on the experts' weights must fall
# from lsh10 to lsh30; a dense checkpoint is refused
lsh_grad_error() {
    local val=data/gutenberg/gutenberg_val.bin rows e10 e30
    [ -x dev/lsh_grad_error ] || { echo "FAIL lsh_grad_error: dev/lsh_grad_error not built (make dev/lsh_grad_error)"; return; }
    dev/lsh_grad_error "$1/lsh20/model_00000002.bin" $val 2 2 4 32 >"$tmp/ge" 2>"$tmp/ge.err"
    rows=$(grep -cE '^[a-z0-9]+ +[0-9.]+( \| +[0-9.]+ +[0-9.]+ +[0-9.]+){3}$' "$tmp/ge")
    read -r e10 e30 <<<"$(awk '$1 == "expfcw" { print $4, $12 }' "$tmp/ge")"
    if [ "$rows" = 17 ] && awk -v a="$e10" -v b="$e30" 'BEGIN { exit !(a > b && b > 0) }'; then
        echo "ok   lsh_grad_error 17 tensors; expfcw's error relative to the exact gradient: $e10 at lsh10, $e30 at lsh30"
    else
        echo "FAIL lsh_grad_error $rows rows (want 17), expfcw lsh10 '$e10' lsh30 '$e30': $(head -c 300 "$tmp/ge.err")"
    fi
    BIN=dev/lsh_grad_error PREFIX=lsh_grad_error/ expect_error dense "not an MoE checkpoint" "$1/dense/model_00000002.bin" $val
}
for script in scripts/*.sh; do
    name=$(basename "$script" .sh)
    if [ "$name" = run_gutenberg ]; then gutenberg; continue; fi
    [ -x ./train_gpt2_moe_emu ] || { echo "skip scripts/$name (no emulated GPU trainer: needs the CUDA headers)"; continue; }
    case $name in *124M*) command -v mpirun >/dev/null || { echo "skip scripts/$name (no mpirun)"; continue; } ;; esac
    out="$tmp/$name"
    if SMOKE=1 OUT="$out" timeout 600 bash "$script" >"$tmp/$name.1" 2>&1 && grep -q "^step    2/2" "$tmp/$name.1" && [ -f "$out/model_00000002.bin" ] &&
       SMOKE=1 OUT="$out" timeout 600 bash "$script" >"$tmp/$name.2" 2>&1 && grep -q "resumed from step 2" "$tmp/$name.2"; then
        echo "ok   scripts/$name smoke run: $(grep '^step    2/2' "$tmp/$name.1" | cut -d'|' -f1-3); run again, it resumed from step 2"
    else
        echo "FAIL scripts/$name smoke run: $(tail -3 "$tmp/$name.1" "$tmp/$name.2" 2>/dev/null | tr '\n' ' ' | head -c 400)"
    fi
done

# dev/perf_phases.sh (the profile by phase in README "Benchmark") on a few d4 steps: the phases'
# shares add up to 100% and the matmuls are among them (a short run's startup, page faults
# included, can outweigh them); a missing binary gives one error line
if ! command -v perf >/dev/null || ! perf record -q -o "$tmp/perf.data" true >/dev/null 2>&1; then
    echo "skip dev/perf_phases (no perf, or perf may not record here)"
elif [ ! -x ./train_gpt2_moe_cpu ]; then
    echo "FAIL dev/perf_phases: no ./train_gpt2_moe_cpu (run_gutenberg.sh builds it)"
else
    DELAY=0 bash dev/perf_phases.sh ./train_gpt2_moe_cpu -e d4 -E 4 -K 1 -b 2 -t 64 -x 4 -v 0 -s 0 -W 0 >"$tmp/phases" 2>&1
    if awk '{ sum += $1 } /matmuls/ && $1 + 0 >= 5 { mm = 1 } END { exit !mm || NR < 4 || sum < 99.5 || sum > 100.5 }' "$tmp/phases"; then
        echo "ok   dev/perf_phases d4 MoE: $(head -3 "$tmp/phases" | tr -s ' ' | tr '\n' ';')"
    else
        echo "FAIL dev/perf_phases: $(tr -s ' \n' ' ;' <"$tmp/phases" | head -c 400)"
    fi
    BIN=bash PREFIX=dev/perf_phases/ expect_error no_binary "is not an executable" dev/perf_phases.sh "$tmp/none"
fi

# make bench-cpu's step profile and MLP comparison on tiny shapes: their lines, and bad arguments
# give one error line
if [ -x dev/profile_step ] && [ -x dev/bench_experts ]; then
    if dev/profile_step d4 1 16 4 1 1 >"$tmp/prof" 2>&1 && grep -q "E=4 K=1" "$tmp/prof" && grep -qE "^adamw +[0-9.]+ ms" "$tmp/prof" &&
       grep -qE "^step +[0-9.]+ ms" "$tmp/prof"; then
        echo "ok   dev/profile_step d4 MoE: $(grep '^step' "$tmp/prof" | tr -s ' ')"
    else
        echo "FAIL dev/profile_step: $(head -c 300 "$tmp/prof")"
    fi
    line=$(dev/bench_experts 1 64 2 32 4 1 2>&1)
    if [[ "$line" =~ ^MLPs\ of\ L=1\ layers,\ N=64\ rows,\ C=64,\ H=256:\ dense\ [0-9.]+\ ms.*E=4\ experts\ of\ ~16\ rows\ [0-9.]+\ ms ]]; then
        echo "ok   dev/bench_experts tiny: $line"
    else
        echo "FAIL dev/bench_experts: $line"
    fi
    BIN=dev/bench_experts PREFIX=dev/bench_experts/ expect_error more_experts_than_rows "bad L, C, B\*T, E" 1 64 1 2 8
    BIN=dev/profile_step PREFIX=dev/profile_step/ expect_error bad_descriptor "is not a descriptor" d5 1 16
else
    echo "FAIL dev/profile_step, dev/bench_experts: not built (make test builds them)"
fi

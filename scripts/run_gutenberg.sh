#!/usr/bin/env bash
# Issue 14's study on the CPU trainer: dense vs MoE vs MoE + LSH-compressed all-to-all on the
# Gutenberg corpus (dev/data/gutenberg.sh), d4 (4 layers, C = 256), 1000 steps of 32 x 128 = 4096
# tokens, one seed and one data order for every run. Every MoE run simulates V = 2 source ranks,
# so an LSH group (the rows one rank sends one expert) holds 4096 / (8 experts x 2 sources) = 256
# rows on average for E = 8, K = 1 (and for E = 16, K = 2). Each run writes $OUT/<name>/main.log
# and a checkpoint every 250 steps; run the script again and it resumes unfinished runs and skips
# finished ones (only a finished run's last checkpoint is kept). ~50-60 min per run on 2 cores.
#   bash scripts/run_gutenberg.sh                       every run, in the order below
#   RUNS="dense moe_e8k1" bash scripts/run_gutenberg.sh  some of them
#   SMOKE=1 bash scripts/run_gutenberg.sh               2 steps of each (STEPS=n: n), tiny shapes (CI)
#   TIME=1 bash scripts/run_gutenberg.sh                time the finished runs (below)
# Plots and the table: python3 dev/plot_gutenberg.py $OUT
# TIME=1 re-times each finished run on a quiet machine (the training's step times suffer whatever
# else shared the cores): TIME_STEPS steps (20; the first excluded) from its last checkpoint with
# its own flags, in TIME_ROUNDS rounds (2) that take the runs in turn, so that drift falls on all.
# Each round appends "round R ms <mean step> lsh_ms <median LSH time>" to $OUT/<name>/timing.txt;
# plot_gutenberg.py takes the least disturbed round instead of the training's median step. A run
# whose checkpoint is gone (its folder lost, its results kept by plot_gutenberg.py --earlier) is
# timed from the last checkpoint of a finished run of the same model (-E, -K, -H) with its own
# flags, and its line ends "from <that run>": the weights change its step time only through the
# routing and the LSH buckets, alike in two trained runs of one shape. Dense with no checkpoint
# starts from new weights (its step time does not depend on them).
set -eu
cd "$(dirname "$0")/.."

# name and flags of each run, most informative first. The LSH rate (centroids / rows) falls as the
# model trains (the rows one rank sends one expert grow alike and share buckets), so the settings
# are picked by their rate on a trained model (lsh10's step-500 checkpoint, 256-row groups):
# one hash of d' = 26 gives 10%, two hashes of d' = 8 give 19.5%, two of d' = 26 give 29%
# (at step 0, on random weights, they give 20%, 60% and 90%).
ALL_RUNS=(
    "dense           -E 1"
    "moe_e8k1        -E 8 -K 1 -V 2"
    "lsh10           -E 8 -K 1 -V 2 -J 1 -P 26"
    "lsh10_nocomp    -E 8 -K 1 -V 2 -J 1 -P 26 -C 0"
    "lsh20           -E 8 -K 1 -V 2 -J 2 -P 8"
    "lsh30           -E 8 -K 1 -V 2 -J 2 -P 26"
    "lsh10_half      -E 8 -K 1 -V 2 -J 1 -P 26 -C 0.5"
    "lsh20_bf16      -E 8 -K 1 -V 2 -J 2 -P 8 -Q 1"
    "lsh20_nocomp    -E 8 -K 1 -V 2 -J 2 -P 8 -C 0"
    "lsh30_nocomp    -E 8 -K 1 -V 2 -J 2 -P 26 -C 0"
    "moe_e16k2       -E 16 -K 2 -H 512 -V 2"
    "moe_e8k1_bf16   -E 8 -K 1 -V 2 -Q 1"
)

if [ "${SMOKE:-0}" = 1 ]; then
    OUT=${OUT:-log_smoke_gutenberg}
    STEPS=${STEPS:-2}
    SHAPE="-b 4 -t 32"
    COMMON="-e d4 $SHAPE -x $STEPS -v 2 -m 1 -s 0 -n 1"
else
    OUT=${OUT:-log_gutenberg}
    SHAPE="-b 32 -t 128"
    COMMON="-e d4 $SHAPE -x 1000 -l 1e-3 -u 100 -q 0.1 -c 0.1 -v 100 -m 20 -s 0 -n 250 -S 1337"
    STEPS=1000
fi
DATA=(-i "data/gutenberg/gutenberg_train_*.bin" -j data/gutenberg/gutenberg_val.bin)
bash dev/data/gutenberg.sh >/dev/null
make -s train_gpt2_moe_cpu
mkdir -p "$OUT"
selected() { [ -z "${RUNS:-}" ] || [[ " $RUNS " == *" $1 "* ]]; }
model_of() { echo " $* " | grep -oE -- ' -[EKH] [0-9]+' | tr -d ' \n'; } # "-E8-K1" of a run's flags

if [ "${TIME:-0}" = 1 ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    for round in $(seq "${TIME_ROUNDS:-2}"); do
        for run in "${ALL_RUNS[@]}"; do
            set -- $run
            name=$1; shift
            selected "$name" || continue
            ckpt="$OUT/$name/model_$(printf %08d $STEPS).bin" from=""
            if [ ! -f "$ckpt" ] && [ ! -f "$OUT/$name/main.log" ]; then # lost: borrow a checkpoint
                ckpt="" shape=$(model_of "$@")
                for other in "${ALL_RUNS[@]}"; do # "name flags..."
                    f="$OUT/${other%% *}/model_$(printf %08d $STEPS).bin"
                    if [ -z "$ckpt" ] && [ -f "$f" ] && [ "$(model_of "${other#* }")" = "$shape" ]; then ckpt=$f from=" from ${other%% *}"; fi
                done
                [ -n "$ckpt" ] || { [ "$shape" = "-E1" ] && ckpt=d4 from=" from new"; }
            fi
            [ -n "$ckpt" ] && [ "$ckpt" = d4 -o -f "$ckpt" ] || { echo "run $name: not finished, not timed"; continue; }
            ./train_gpt2_moe_cpu -e "$ckpt" $SHAPE -x "${TIME_STEPS:-20}" -v 0 -s 0 "$@" -o "$tmp/$name" "${DATA[@]}" >"$tmp/out"
            ms=$(sed -n 's/^average step \([0-9.]*\) ms.*/\1/p' "$tmp/out")
            lsh_ms=$(grep -o 'lsh_ms:[0-9.]*' "$tmp/$name/main.log" | cut -d: -f2 | sort -g |
                     awk '{ v[NR] = $1 } END { print NR ? v[int(NR / 2) + 1] : "-" }')
            mkdir -p "$OUT/$name"
            echo "round $round ms $ms lsh_ms $lsh_ms$from" | tee -a "$OUT/$name/timing.txt" | sed "s/^/run $name: /"
            rm -rf "${tmp:?}/$name"
        done
    done
    exit 0
fi

for run in "${ALL_RUNS[@]}"; do
    set -- $run
    name=$1; shift
    selected "$name" || continue
    dir="$OUT/$name"
    if [ -f "$dir/model_$(printf %08d $STEPS).bin" ]; then echo "run $name: finished already"; continue; fi
    RESUME=0
    ls "$dir"/model_*.bin >/dev/null 2>&1 && RESUME=1 # continue where an earlier run stopped
    echo "run $name: $*"
    ./train_gpt2_moe_cpu $COMMON "$@" -o "$dir" -y $RESUME "${DATA[@]}"
    # a finished run keeps its last checkpoint only (each is ~0.4 GB with AdamW's state)
    last=$(printf %08d $STEPS)
    for f in "$dir"/model_*.bin "$dir"/state_*.bin; do
        case $(basename "$f") in model_$last.bin|state_${last}_*.bin) ;; *) rm -f "$f" ;; esac
    done
done

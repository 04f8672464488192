#!/usr/bin/env bash
# Where a CPU trainer's step goes, kernel by kernel, summed into phases: `perf record` over the
# steady steps (the first DELAY ms, startup and the first steps, are skipped; DELAY=0 for none),
# then each symbol's share of the samples added to its phase (the patterns below). For the profile
# before and after a change: run it on the two builds, one after the other.
# Usage: bash dev/perf_phases.sh BINARY [trainer flags]   (DELAY=ms, default 5000; run from the
# repository root, where the trainer finds its data), e.g.
#   bash dev/perf_phases.sh ./train_gpt2_moe_cpu -e d6 -E 1 -b 4 -t 64 -x 40 -v 0 -s 0 -W 0
set -eu
[ $# -ge 1 ] || { echo "usage: $0 BINARY [trainer flags]" >&2; exit 1; }
command -v perf >/dev/null || { echo "error: perf_phases.sh needs perf (Debian: apt-get install linux-perf)" >&2; exit 1; }
[ -x "$1" ] || { echo "error: perf_phases.sh: $1 is not an executable" >&2; exit 1; }
DELAY=${DELAY:-5000}
[[ "$DELAY" =~ ^[0-9]{1,7}$ ]] || { echo "error: perf_phases.sh: DELAY=$DELAY is not a number of ms" >&2; exit 1; }
delay=(); [ "$DELAY" -gt 0 ] && delay=(-D "$DELAY") # perf refuses -D 0
data=$(mktemp)
trap 'rm -f "$data"' EXIT
perf record -q "${delay[@]}" -o "$data" "$@" >/dev/null 2>&1 || { echo "error: perf_phases.sh: perf record $* failed" >&2; exit 1; }
perf report -i "$data" --no-children --sort dso,symbol --stdio -F overhead,dso,sym -t '|' 2>/dev/null |
    awk -F'|' '
    /^#/ || NF < 3 { next }
    {
        pct = $1 + 0; dso = $2; sym = $3
        gsub(/^ +| +$/, "", dso); gsub(/^\[[.k]\] +| +$/, "", sym); sub(/\._omp_fn\.[0-9]+$/, "", sym)
        if (sym ~ /^(sgemm|cblas_|matmul_)/) p = "matmuls (sgemm and its packing, or the plain C loops)"
        else if (sym ~ /^attention_/) p = "attention"
        else if (sym ~ /^(softmax_|crossentropy|__logf|__expf|exp_fast)/) p = "softmax + cross-entropy over the vocabulary"
        else if (sym ~ /^(gelu_|__tanhf|__expm1f|__coshf)/) p = "GELU"
        else if (sym ~ /^layernorm_/) p = "layernorm"
        else if (sym ~ /^(gpt2_update|adamw)/) p = "AdamW"
        else if (sym ~ /^(sum_squares|gpt2_grad_norm|zero_floats|gpt2_zero_grad)/) p = "gradient norm, zeroing"
        else if (sym ~ /^(moe_|experts_by_rows|wire_round|lsh_)/) p = "MoE routing, dispatch, combine"
        else if (sym ~ /^(residual_|encoder_)/) p = "residual, embeddings"
        else if (sym ~ /^__mem(set|move|cpy)/) p = "memset, memcpy"
        else if (dso ~ /libgomp/) p = "OpenMP runtime (threads waiting)"
        else if (dso ~ /kernel/) p = "kernel (page faults, scheduling)"
        else p = "other"
        share[p] += pct; total += pct
    }
    END {
        if (total == 0) { print "error: perf_phases.sh: no samples (a run shorter than DELAY?)" > "/dev/stderr"; exit 1 }
        for (p in share) printf "%6.1f%%  %s\n", 100 * share[p] / total, p
    }' | sort -rn

#!/usr/bin/env bash
# The run scripts of scripts/ in their smoke mode (SMOKE=1: 2 steps, tiny shapes, the emulated GPU
# trainer on the CPU, under mpirun for the multi-GPU ones): each trains 2 steps and writes a
# checkpoint, and run again it resumes from it. Prints ok/FAIL lines.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for script in scripts/*.sh; do
    name=$(basename "$script" .sh)
    case $name in *124M*) command -v mpirun >/dev/null || { echo "skip scripts/$name (no mpirun)"; continue; } ;; esac
    out="$tmp/$name"
    if SMOKE=1 OUT="$out" timeout 600 bash "$script" >"$tmp/$name.1" 2>&1 && grep -q "^step    2/2" "$tmp/$name.1" && [ -f "$out/model_00000002.bin" ] &&
       SMOKE=1 OUT="$out" timeout 600 bash "$script" >"$tmp/$name.2" 2>&1 && grep -q "resumed from step 2" "$tmp/$name.2"; then
        echo "ok   scripts/$name smoke run: $(grep '^step    2/2' "$tmp/$name.1" | cut -d'|' -f1-3); run again, it resumed from step 2"
    else
        echo "FAIL scripts/$name smoke run: $(tail -3 "$tmp/$name.1" "$tmp/$name.2" 2>/dev/null | tr '\n' ' ' | head -c 400)"
    fi
done

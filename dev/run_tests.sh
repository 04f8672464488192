#!/usr/bin/env bash
# Runs every CPU test of llm.moe and prints one closing line "N passed, N failed, N skipped".
# Called by `make test` (which builds the binaries first). Each test program prints lines that start
# with "ok", "FAIL" or "skip"; this script counts them across programs. Exit code non-zero on any
# failure, or when a program dies without printing its own summary.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-/usr/bin/python3}
log=$(mktemp)
status=0

run() { # run a test program, keep its lines, note a crash
    echo "== $*"
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then echo "   ($* exited with $rc)"; status=1; fi
}

# 1. the PyTorch reference states: regenerated when torch is here, so reference and C never drift
if "$PYTHON" -c "import torch" 2>/dev/null; then
    run "$PYTHON" dev/reference/moe_reference.py --outdir dev/reference/states
else
    echo "skip reference-regeneration (no torch for $PYTHON: using the states committed in dev/reference/states)" | tee -a "$log"
fi
# 2. the C suites: fp32 against PyTorch and the rest, fp64 finite differences, the headers' own
run ./test_moe
# the plain C matmuls too, when test_moe itself runs on OpenBLAS (make BLAS=0 builds these)
[ -x ./test_moe_noblas ] && run ./test_moe_noblas
run ./test_moe_f64
run ./dev/test_dataloader
run ./dev/test_lshmoe
# the same programs under AddressSanitizer + UBSan, one line each: every check passed and the
# sanitizers reported nothing (one thread: forked children of a threaded process make
# LeakSanitizer warn about threads it cannot suspend)
sanitized="./test_moe_asan ./dev/test_dataloader_asan ./dev/test_lshmoe_asan"
# the CUDA-on-CPU layer (dev/cuda/cuda_emu.h): its tests, and again under the sanitizers
# and the GPU trainer's tests against the CPU trainer, through it (fp32, bf16)
if [ -x ./dev/cuda/test_emu ]; then
    run ./dev/cuda/test_emu
    for k in lsh_hash lsh_buckets lsh_bucket_sum lsh_compensate lsh_compress_backward lsh_stats; do # lshmoe.cu's kernels
        run ./dev/cuda/${k}_emu
    done
    run ./test_moe_emu
    run ./test_moe_emu_bf16
    sanitized="$sanitized ./dev/cuda/test_emu_asan ./test_moe_emu_asan"
else
    echo "skip cuda-emulation (no CUDA toolkit headers: cuda_runtime.h and cuda_bf16.h are needed)" | tee -a "$log"
fi
for t in $sanitized; do
    out=$(OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 "$t" 2>&1)
    rc=$?
    summary=$(echo "$out" | tail -1)
    reports=$(echo "$out" | grep -v -E '^(ok|FAIL) ' | grep -c -E 'runtime error|ERROR: (Address|Leak)Sanitizer')
    echo "$out" | grep -E '^(ok|FAIL) +emu/asan/' | tee -a "$log" # the overruns only this build can catch
    if [ $rc -eq 0 ] && [ "$reports" -eq 0 ] && echo "$summary" | grep -q ' 0 failed$'; then
        echo "ok   sanitizers/${t##*/} $summary, no ASan/UBSan/LSan report" | tee -a "$log"
    else
        echo "FAIL sanitizers/${t##*/} exit $rc, $reports sanitizer reports, last line: $summary" | tee -a "$log"
        echo "$out" | grep -E -A5 'runtime error|Sanitizer|^FAIL' | head -40
        status=1
    fi
done
# the compile gate for CUDA code: nvcc for sm_80 and sm_90, ptxas spills and local memory as errors
if [ -n "${NVCC:-}" ]; then
    for target in dev/cuda/test_emu_gpu train_gpt2_moe test_moe_gpu dev/cuda/lsh_hash dev/cuda/lsh_buckets dev/cuda/lsh_bucket_sum \
                  dev/cuda/lsh_compensate dev/cuda/lsh_compress_backward dev/cuda/lsh_stats; do
        if make -s "$target" >"$log.nvcc" 2>&1; then
            links=""
            if [ "$target" = train_gpt2_moe ] && ldd train_gpt2_moe | grep -q libnccl && ldd train_gpt2_moe | grep -q libmpi; then
                links=", linked with NCCL and MPI (the expert-parallel code path)"
            fi
            echo "ok   nvcc/${target##*/} compiles for sm_80 and sm_90 with no register spill or local memory$links" | tee -a "$log"
        else
            echo "FAIL nvcc/${target##*/} does not compile: $(head -c 400 "$log.nvcc")" | tee -a "$log"
            status=1
        fi
    done
    rm -f "$log.nvcc"
else
    echo "skip nvcc (not found: the CUDA compile gate needs the toolkit)" | tee -a "$log"
fi
# 3. the tokenizer against tiktoken (skips itself when tiktoken is missing)
run "$PYTHON" dev/data/check_tokenizer.py
# 4. the trainer binary: flags, bad input, resume
run bash dev/test_cli.sh
# the GPU trainer's binary, emulated, against the CPU trainer's with the same command lines
if [ -x ./train_gpt2_moe_emu ] && [ -x ./train_gpt2_moe_emu_fp32 ]; then
    run bash dev/test_gpu_cli.sh
fi
# the run scripts, 2 steps each (the GPU ones on the emulated trainer), and the plot scripts
run bash dev/test_scripts.sh
# the FineWeb shard script, offline on a local sample
run bash dev/data/test_fineweb.sh
# 5. expert parallelism over MPI (skips itself without mpirun): the CPU trainer, then the GPU
# trainer emulated under mpirun against it
if [ -x ./test_moe_mpi ] && [ -x ./train_gpt2_moe_mpi ]; then
    run bash dev/test_mpi.sh
    run bash dev/test_gpu_mpi.sh
else
    echo "skip mpi (no mpicc: apt-get install libopenmpi-dev openmpi-bin)" | tee -a "$log"
fi
# 6. every file reader under libFuzzer (ASan + UBSan), 15 s each (skips itself without clang)
run bash dev/fuzz/run.sh "${FUZZ_SECONDS:-15}"
# 7. GPU tests are not run here
echo "skip test-gpu (no GPU on this machine: run make test-gpu on the device)" | tee -a "$log"

passed=$(grep -c '^ok' "$log")
failed=$(grep -c '^FAIL' "$log")
skipped=$(grep -c '^skip' "$log")
rm -f "$log"
[ "$failed" -eq 0 ] || status=1
echo "$passed passed, $failed failed, $skipped skipped"
exit $status

# llm.moe: every build and run target. `make run` trains the quick-start MoE on the CPU, `make test`
# runs the CPU test suite and the CUDA code on the CPU through the emulation layer (dev/cuda/).
# OpenMP is used when the compiler has it; the CUDA targets need the CUDA toolkit (nvcc and its
# headers) and are skipped with a message when it is missing.
CC ?= gcc
# -fassociative-math (with the two flags it needs) lets gcc vectorise the dot products; unlike
# -Ofast it keeps NaN and infinity semantics, so bad values are still caught
CFLAGS = -O3 -march=native -fno-math-errno -fno-trapping-math -fno-signed-zeros -fassociative-math -std=gnu99 -Wall -Wno-unused-result -Wno-unknown-pragmas
LDLIBS = -lm
PYTHON ?= /usr/bin/python3

# OpenMP: detected by compiling an empty program with -fopenmp
ifeq ($(NO_OMP),1)
  $(info OpenMP disabled (NO_OMP=1))
else ifeq ($(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes),yes)
  CFLAGS += -fopenmp -DOMP
else
  $(info OpenMP not found: building single-threaded)
endif

# BLAS: the matmuls of the CPU trainer through OpenBLAS's OpenMP build (Debian:
# libopenblas-openmp-dev), whose threads are the trainer's own OpenMP threads, so BLAS and the
# OpenMP loops never compete for cores. BLAS=0, or no OpenBLAS: the plain C loops (the reference)
BLAS_ARCH := $(shell $(CC) -print-multiarch 2>/dev/null)
BLAS_INCLUDE := /usr/include/$(BLAS_ARCH)/openblas-openmp
BLAS_LIBDIR := /usr/lib/$(BLAS_ARCH)/openblas-openmp
ifeq ($(BLAS),0)
  $(info BLAS=0: the CPU trainer's matmuls are the plain C loops)
else ifeq ($(shell test -f $(BLAS_INCLUDE)/cblas.h && test -f $(BLAS_LIBDIR)/libopenblas.so && echo yes),yes)
  CPU_BLAS = -DUSE_BLAS -I$(BLAS_INCLUDE)
  CPU_BLAS_LIBS = -L$(BLAS_LIBDIR) -Wl,-rpath,$(BLAS_LIBDIR) -lopenblas
else
  $(info OpenBLAS not found: the CPU trainer uses its plain C matmuls; apt-get install libopenblas-openmp-dev for a ~3x faster build)
endif

NVCC := $(shell which nvcc 2>/dev/null)
MPICC := $(shell which mpicc 2>/dev/null)
CXX = g++

# CUDA: nvcc builds real GPU code for sm_80 and sm_90 (GPU_ARCHS=...), and ptxas warnings for
# register spills or local memory fail the build. The emulation builds the same .cu files with g++
# against the toolkit's headers (cuda_runtime.h, cuda_bf16.h), for the CPU.
CUDA_INCLUDE := $(if $(NVCC),$(abspath $(dir $(NVCC))../include),/usr/local/cuda/include)
HAVE_CUDA_HEADERS := $(shell test -f $(CUDA_INCLUDE)/cuda_bf16.h && echo yes)
GPU_ARCHS ?= 80 90
NVCC_FLAGS = -O3 -std=c++17 $(foreach a,$(GPU_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
             -Xptxas=-warn-spills,-warn-lmem-usage -Werror all-warnings -I.
EMU_FLAGS = -std=c++17 -O3 -march=native -fno-math-errno -fno-trapping-math -fno-signed-zeros -fassociative-math \
            -Wall -Wno-unknown-pragmas -fopenmp -DCUDA_EMULATION -I. -I$(CUDA_INCLUDE)
EMU_HEADERS = cuda_common.h dev/cuda/cuda_emu.h utils.h dev/testing.h
GPU_SOURCES = train_gpt2_moe.cu matmul.cuh gpu_comm.cuh lshmoe.cu cuda_common.h $(HEADERS)
GPU_LIBS = -lcublasLt -lcublas
# several GPUs: MPI starts the processes and NCCL moves the rows, when both are installed
NCCL_HEADER := $(firstword $(wildcard $(CUDA_INCLUDE)/nccl.h /usr/local/include/nccl.h /usr/include/nccl.h))
ifneq ($(and $(MPICC),$(NCCL_HEADER)),)
  GPU_MULTI = -DUSE_MPI -DUSE_NCCL $(shell $(MPICC) --showme:compile) -I$(dir $(NCCL_HEADER))
  GPU_MULTI_LIBS = $(shell $(MPICC) --showme:link) -L/usr/local/lib -lnccl
endif
MPICXX := $(shell which mpicxx 2>/dev/null)

.PHONY: all run test test-gpu bench bench-cpu data clean

# every header a trainer or test includes: editing one rebuilds every binary
HEADERS = utils.h comm.h model.h moe_layout.h train.h dataloader.h tokenizer.h lshmoe.h
TEST_HEADERS = $(HEADERS) dev/testing.h

all: train_gpt2_moe_cpu test_moe test_moe_f64 dev/test_dataloader dev/test_lshmoe dev/data/tokenize

train_gpt2_moe_cpu: train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)

test_moe: test_moe.c train_gpt2_moe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)

# the same tests on the plain C matmuls (what BLAS=0 builds), so both backends stay tested
test_moe_noblas: test_moe.c train_gpt2_moe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the trainer on the plain C matmuls next to the BLAS one, for make bench-cpu
train_gpt2_moe_cpu_noblas: train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the trainer's matmuls against bare sgemm (make bench-cpu), a step's time phase by phase, and the
# MLPs of an MoE step against the dense ones
dev/bench_matmul: dev/bench_matmul.c train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
dev/profile_step: dev/profile_step.c train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
dev/bench_experts: dev/bench_experts.c train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
# the Gutenberg study's LSH gradients against the exact ones (README)
dev/lsh_grad_error: dev/lsh_grad_error.c train_gpt2_moe.c $(HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)

# the same trainer in double precision, for finite-difference checks
test_moe_f64: test_moe.c train_gpt2_moe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) -DTEST_F64 $< -o $@ $(LDLIBS)

# the headers' own test programs
dev/test_dataloader: dev/test_dataloader.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

dev/test_lshmoe: dev/test_lshmoe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) -I. $< -o $@ $(LDLIBS)

# the test suite under AddressSanitizer and UndefinedBehaviorSanitizer (make test runs it)
SANITIZE = -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer
test_moe_asan: test_moe.c train_gpt2_moe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) $(CPU_BLAS) $(SANITIZE) $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
dev/test_dataloader_asan: dev/test_dataloader.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) $(SANITIZE) -I. $< -o $@ $(LDLIBS)
dev/test_lshmoe_asan: dev/test_lshmoe.c $(TEST_HEADERS)
	$(CC) $(CFLAGS) $(SANITIZE) -I. $< -o $@ $(LDLIBS)
ASAN_TARGETS = test_moe_asan dev/test_dataloader_asan dev/test_lshmoe_asan

# the CUDA-on-CPU layer's own tests: g++ (and again under ASan + UBSan), and nvcc as a compile gate
dev/cuda/test_emu: dev/cuda/test_emu.cu $(EMU_HEADERS)
	$(CXX) $(EMU_FLAGS) -x c++ $< -o $@ -lm
dev/cuda/test_emu_asan: dev/cuda/test_emu.cu $(EMU_HEADERS)
	$(CXX) $(EMU_FLAGS) $(SANITIZE) -O1 -x c++ $< -o $@ -lm
dev/cuda/test_emu_gpu: dev/cuda/test_emu.cu cuda_common.h utils.h dev/testing.h
	$(NVCC) $(NVCC_FLAGS) -x cu $< -o $@

# lshmoe.cu's kernels, one runnable file each: checked against lshmoe.h, then timed (bytes per call
# against the kernel's minimum). nvcc for a GPU (make test-gpu); emulated for the checks in make
# test, built without reassociation or fused multiply-adds, so the checks can be bit for bit
LSH_KERNEL_FILES = lsh_hash lsh_buckets lsh_bucket_sum lsh_compensate lsh_compress_backward lsh_stats
LSH_KERNELS_GPU = $(addprefix dev/cuda/,$(LSH_KERNEL_FILES))
LSH_KERNELS_EMU = $(addsuffix _emu,$(LSH_KERNELS_GPU))
LSH_KERNEL_DEPS = dev/cuda/lsh_common.h lshmoe.cu lshmoe.h cuda_common.h utils.h dev/testing.h
$(LSH_KERNELS_EMU): dev/cuda/%_emu: dev/cuda/%.cu $(LSH_KERNEL_DEPS) dev/cuda/cuda_emu.h
	$(CXX) -std=c++17 -O2 -ffp-contract=off -Wall -Wno-unknown-pragmas -fopenmp -DCUDA_EMULATION -I. -I$(CUDA_INCLUDE) -x c++ $< -o $@ -lm
$(LSH_KERNELS_GPU): dev/cuda/%: dev/cuda/%.cu $(LSH_KERNEL_DEPS)
	$(NVCC) $(NVCC_FLAGS) -x cu $< -o $@

# the GPU trainer: nvcc for a real GPU; through the emulation for the CPU (bf16, and fp32 for tests)
train_gpt2_moe: $(GPU_SOURCES)
ifeq ($(NVCC),)
	@echo "nvcc not found: the GPU trainer needs the CUDA toolkit (train_gpt2_moe_emu runs it on the CPU)" && false
else
	$(NVCC) $(NVCC_FLAGS) $(GPU_MULTI) -Xcompiler -fopenmp -x cu $< -o $@ $(GPU_LIBS) $(GPU_MULTI_LIBS) -lgomp
endif
train_gpt2_moe_emu: $(GPU_SOURCES) dev/cuda/cuda_emu.h
	$(CXX) $(EMU_FLAGS) -x c++ $< -o $@ -lm
train_gpt2_moe_emu_fp32: $(GPU_SOURCES) dev/cuda/cuda_emu.h
	$(CXX) $(EMU_FLAGS) -DENABLE_FP32 -x c++ $< -o $@ -lm
# several emulated GPUs under mpirun (fp32, so runs compare tightly with the CPU trainer's MPI build)
train_gpt2_moe_emu_mpi: $(GPU_SOURCES) dev/cuda/cuda_emu.h
ifeq ($(MPICXX),)
	@echo "mpicxx not found: install libopenmpi-dev openmpi-bin for the emulated MPI build" && false
else
	OMPI_CXX=$(CXX) $(MPICXX) $(EMU_FLAGS) -DENABLE_FP32 -DUSE_MPI -x c++ $< -o $@ -lm
endif

# its tests against the CPU trainer: emulated in fp32 and bf16, under ASan + UBSan, and by nvcc
test_moe_emu: test_moe.cu train_gpt2_moe.c $(GPU_SOURCES) $(EMU_HEADERS)
	$(CXX) $(EMU_FLAGS) -DENABLE_FP32 -x c++ $< -o $@ -lm
test_moe_emu_bf16: test_moe.cu train_gpt2_moe.c $(GPU_SOURCES) $(EMU_HEADERS)
	$(CXX) $(EMU_FLAGS) -x c++ $< -o $@ -lm
test_moe_emu_asan: test_moe.cu train_gpt2_moe.c $(GPU_SOURCES) $(EMU_HEADERS)
	$(CXX) $(EMU_FLAGS) $(SANITIZE) -O1 -x c++ $< -o $@ -lm
test_moe_gpu: test_moe.cu train_gpt2_moe.c $(GPU_SOURCES) dev/testing.h
	$(NVCC) $(NVCC_FLAGS) -Xcompiler -fopenmp -x cu $< -o $@ $(GPU_LIBS) -lgomp
EMU_TARGETS := $(if $(HAVE_CUDA_HEADERS),dev/cuda/test_emu dev/cuda/test_emu_asan $(LSH_KERNELS_EMU) test_moe_emu test_moe_emu_bf16 test_moe_emu_asan train_gpt2_moe_emu train_gpt2_moe_emu_fp32 $(if $(MPICXX),train_gpt2_moe_emu_mpi,),)

# expert parallelism over MPI between CPU processes: mpirun -np W ./train_gpt2_moe_mpi ...
train_gpt2_moe_mpi: train_gpt2_moe.c $(HEADERS)
ifeq ($(MPICC),)
	@echo "mpicc not found: install libopenmpi-dev openmpi-bin for the MPI build" && false
else
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) $(CPU_BLAS) -DUSE_MPI $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
endif

test_moe_mpi: test_moe.c train_gpt2_moe.c $(TEST_HEADERS)
ifeq ($(MPICC),)
	@echo "mpicc not found: install libopenmpi-dev openmpi-bin for the MPI tests" && false
else
	OMPI_CC=$(CC) $(MPICC) $(CFLAGS) $(CPU_BLAS) -Wno-unused-function -DUSE_MPI -DTEST_MPI $< -o $@ $(LDLIBS) $(CPU_BLAS_LIBS)
endif

dev/data/tokenize: dev/data/tokenize.c tokenizer.h
	$(CC) -O2 -std=gnu99 -Wall $< -o $@ $(LDLIBS)

# the quick start: a small MoE (d4, 8 experts, top-2) on Tiny Shakespeare, a few minutes on 2 cores
# (on the GPU trainer when nvcc is here and nvidia-smi finds a GPU, else on the CPU trainer)
QUICKSTART = -e d4 -E 8 -K 2 -b 8 -t 64 -x 300 -v 50 -m 10 -s 300 -g 64 -l 1e-3 -u 20 -q 0.1 -o log_quickstart
HAVE_GPU := $(if $(NVCC),$(shell nvidia-smi >/dev/null 2>&1 && echo yes),)
ifeq ($(HAVE_GPU),yes)
run: train_gpt2_moe
	./train_gpt2_moe $(QUICKSTART)
else
run: train_gpt2_moe_cpu
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} ./train_gpt2_moe_cpu $(QUICKSTART)
endif

# CPU tests; GPU tests are reported as skipped. Regenerates the PyTorch reference states first
# when torch is installed, else uses the ones committed in dev/reference/states
# (the MPI tests join when mpicc is installed, and report themselves skipped otherwise)
MPI_TEST_TARGETS := $(if $(MPICC),test_moe_mpi train_gpt2_moe_mpi,)
test: test_moe $(if $(CPU_BLAS),test_moe_noblas,) test_moe_f64 dev/test_dataloader dev/test_lshmoe $(ASAN_TARGETS) $(EMU_TARGETS) train_gpt2_moe_cpu dev/lsh_grad_error dev/profile_step dev/bench_experts dev/data/tokenize $(MPI_TEST_TARGETS)
	PYTHON=$(PYTHON) NVCC=$(NVCC) bash dev/run_tests.sh

# on a machine with a GPU: the same tests, compiled by nvcc, on the device
test-gpu:
ifeq ($(NVCC),)
	@echo "skip test-gpu: nvcc not found (GPU tests run on a machine with a GPU)"
else
	$(MAKE) dev/cuda/test_emu_gpu test_moe_gpu train_gpt2_moe $(LSH_KERNELS_GPU)
	@if nvidia-smi >/dev/null 2>&1; then ./dev/cuda/test_emu_gpu && ./test_moe_gpu && bash dev/test_gpu_cli.sh ./train_gpt2_moe && \
	  for k in $(LSH_KERNELS_GPU); do ./$$k || exit 1; done; \
	else echo "skip test-gpu: no GPU here (nvidia-smi finds none)"; fi
endif

bench: bench-cpu

bench-cpu: train_gpt2_moe_cpu train_gpt2_moe_cpu_noblas dev/profile_step dev/bench_experts $(if $(CPU_BLAS),dev/bench_matmul,) $(if $(MPICC),train_gpt2_moe_mpi,)
	bash dev/bench_cpu.sh

data: dev/data/tokenize
	bash dev/data/tinyshakespeare.sh

clean:
	rm -f train_gpt2_moe_cpu train_gpt2_moe_mpi test_moe test_moe_noblas test_moe_f64 test_moe_mpi dev/data/tokenize dev/test_dataloader dev/test_lshmoe $(ASAN_TARGETS) dev/cuda/test_emu dev/cuda/test_emu_asan dev/cuda/test_emu_gpu $(LSH_KERNELS_GPU) $(LSH_KERNELS_EMU) \
	      train_gpt2_moe train_gpt2_moe_emu train_gpt2_moe_emu_fp32 train_gpt2_moe_emu_mpi test_moe_emu test_moe_emu_bf16 test_moe_emu_asan test_moe_gpu \
	      train_gpt2_moe_cpu_noblas dev/bench_matmul dev/profile_step dev/bench_experts dev/lsh_grad_error

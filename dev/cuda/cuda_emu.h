/*
dev/cuda/cuda_emu.h: CUDA on the CPU. A .cu file that includes this header (through cuda_common.h,
with CUDA_EMULATION defined) compiles with g++ as ordinary CPU code, while nvcc compiles the same
file as real CUDA. Every kernel runs here: each CUDA thread is a fiber, __syncthreads and the warp
operations are rendezvous points between fibers, and the CUDA runtime calls a trainer makes
(cudaMalloc, cudaMemcpy, streams, events, ...) have CPU bodies with the same contract. This is how
llm.moe tests its kernels against the CPU trainer without a GPU, and how a user steps through a
CUDA kernel with gdb on a laptop.

What it does
- __global__ / __device__ / __host__ are empty; threadIdx, blockIdx, blockDim, gridDim read the
  scheduler's state; warpSize is 32. NVIDIA's own cuda_runtime.h (types, dim3, float4, ...) and
  cuda_bf16.h (bf16 conversions and arithmetic, round-to-nearest-even as on the GPU) are used as
  they are, host-only.
- One fiber per CUDA thread, with its own stack (a guard page below it). A block runs on one OS
  thread: the scheduler runs each ready thread until it reaches a barrier, a warp operation or its
  end, in one of three orders (emu_set_order or CUDA_EMU_ORDER=forward|reverse|random): code that
  is only correct for some interleaving fails in another. Blocks run in parallel under OpenMP
  (emu_set_parallel_blocks, CUDA_EMU_BLOCKS); atomics are real atomics (compare-and-swap for
  floats).
- Volta semantics, checked: a thread that has exited does not count at a barrier; threads waiting
  at __syncthreads reached from different call sites, lanes of a warp that disagree on the
  operation, the call site, the mask or the width of a shuffle, a mask that leaves out the calling
  lane or names lanes the block does not have, a shuffle that reads a lane outside its mask, and a
  deadlock (threads waiting that no thread can release) are each reported as one error line and a
  non-zero exit, never a hang.
- __shared__ is `static thread_local` (one copy per OS thread, so per running block); dynamic
  shared memory is EMU_DYNAMIC_SHARED(type, name) (cuda_common.h maps it to `extern __shared__`
  under nvcc), an allocation of exactly the launch's size, so AddressSanitizer sees an overrun.
  cudaMalloc allocates exactly the size asked for, for the same reason. Under ASan the fiber
  switches are announced to it (__sanitizer_start_switch_fiber).
- launch_kernel(kernel, grid, block, smem, stream, args...) is the one way to launch: here it
  checks the configuration (an invalid one sets cudaErrorInvalidConfiguration, as a GPU would, for
  cudaGetLastError) and runs the grid; cuda_common.h defines it as kernel<<<...>>> under nvcc.

Not covered, by design: cooperative groups (write warp reductions with raw shuffles), __activemask
(it reports the hardware's convergence, which fibers do not model: pass explicit masks), any
communication between blocks other than atomics and the end of a kernel, inline PTX without a C++
fallback, streams running concurrently (every call completes before it returns), texture and
surface memory, dynamic parallelism. Timing means nothing here.

Example (a block-wide sum, run in all three orders by the tests):
  __global__ void block_sum(float* out, const float* x, int n) {
      __shared__ float partial[32];
      float v = 0.0f;
      for (int i = threadIdx.x; i < n; i += blockDim.x) { v += x[i]; }
      for (int off = 16; off > 0; off /= 2) { v += __shfl_down_sync(0xffffffffu, v, off); }
      if (threadIdx.x % 32 == 0) { partial[threadIdx.x / 32] = v; }
      __syncthreads();
      ...
  }
  launch_kernel(block_sum, dim3(1), dim3(256), 0, 0, d_out, d_x, n);
*/
#ifndef CUDA_EMU_H
#define CUDA_EMU_H

#ifdef __CUDACC__
#error "dev/cuda/cuda_emu.h is the CPU emulation of CUDA: compile with g++, not nvcc"
#endif

// the CUDA qualifiers mean nothing on the CPU; defined before NVIDIA's headers, which then keep them
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#include <cuda_runtime.h>
#include <cuda_bf16.h>

#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <type_traits>
#include <malloc.h>
#include <sys/mman.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_ASAN 1
#endif
#endif
#ifdef EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
#endif

namespace emu {

// ----------------------------------------------------------------------------
// configuration and errors

enum Order { ORDER_FORWARD, ORDER_REVERSE, ORDER_RANDOM };

struct Config {
    Order order;
    uint64_t seed;       // of the random order
    int parallel_blocks; // OS threads running blocks (OpenMP); 1 = sequential
    size_t stack_bytes;  // per CUDA thread
};

inline Config make_config() {
    Config c = {ORDER_FORWARD, 1, 1, (size_t)64 << 10};
#ifdef EMU_ASAN
    c.stack_bytes = (size_t)512 << 10; // ASan's frames are larger
#endif
    const char* order = getenv("CUDA_EMU_ORDER");
    if (order != NULL) {
        if (strcmp(order, "reverse") == 0) { c.order = ORDER_REVERSE; }
        else if (strcmp(order, "random") == 0) { c.order = ORDER_RANDOM; }
        else if (strcmp(order, "forward") != 0) { fprintf(stderr, "error: CUDA_EMU_ORDER=%s: expected forward, reverse or random\n", order); exit(EXIT_FAILURE); }
    }
    const char* blocks = getenv("CUDA_EMU_BLOCKS");
    if (blocks != NULL) { c.parallel_blocks = atoi(blocks) > 0 ? atoi(blocks) : 1; }
    const char* kb = getenv("CUDA_EMU_STACK_KB");
    if (kb != NULL && atoi(kb) >= 16) { c.stack_bytes = (size_t)atoi(kb) << 10; }
    return c;
}

inline Config& config() {
    static Config c = make_config();
    return c;
}

inline const char* order_name(Order o) { return o == ORDER_FORWARD ? "forward" : o == ORDER_REVERSE ? "reverse" : "random"; }

// ----------------------------------------------------------------------------
// fibers: a stack and a saved stack pointer. On x86-64 a switch saves the callee-saved registers
// and the FPU/SSE control words on the old stack and restores them from the new one (~20 ns
// round trip, against ~500 ns for glibc's swapcontext, which also saves the signal mask with a
// system call); elsewhere it is swapcontext.

struct Fiber {
    char* stack;   // lowest usable address (a guard page lies below)
    size_t size;
    void* fake_stack; // ASan's per-fiber state
#if defined(__x86_64__)
    void* sp;
#else
    ucontext_t uc;
#endif
};

} // namespace emu

#if defined(__x86_64__)
extern "C" void emu_switch_context(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline(void);
// emu_switch_context(&save, load): pushes rbp rbx r12-r15 and the x87/SSE control words, stores
// rsp in *save, loads load into rsp, pops the same and returns into the other fiber. A new fiber's
// stack is laid out so that the first switch "returns" into emu_fiber_trampoline, which calls the
// function in r12 with the argument in rbx.
asm(R"(
    .text
    .p2align 4
    .weak emu_switch_context
    .type emu_switch_context, @function
emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $16, %rsp
    fnstcw (%rsp)
    stmxcsr 8(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    fldcw (%rsp)
    ldmxcsr 8(%rsp)
    addq $16, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_context, .-emu_switch_context
    .p2align 4
    .weak emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    movq %rbx, %rdi
    callq *%r12
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
#else
#include <ucontext.h>
#endif

namespace emu {

// a stack of `size` bytes with a PROT_NONE guard page below it: a kernel that overflows its stack
// faults instead of writing over another thread's
inline char* stack_alloc(size_t size) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    char* base = (char*)mmap(NULL, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) { fprintf(stderr, "error: cuda emulation: mmap of a %zu-byte fiber stack failed\n", size); exit(EXIT_FAILURE); }
    mprotect(base, page, PROT_NONE);
    return base + page;
}

// prepares f to run fn(arg) on its stack at the first switch into it
inline void fiber_prepare(Fiber* f, void (*fn)(void*), void* arg) {
#ifdef EMU_ASAN
    __asan_unpoison_memory_region(f->stack, f->size); // a reused stack still carries its last frames' redzones
#endif
#if defined(__x86_64__)
    uintptr_t top = ((uintptr_t)(f->stack + f->size)) & ~(uintptr_t)15;
    uint64_t* a = (uint64_t*)(top - 24);           // 8 mod 16: after `ret` rsp is 16-aligned
    a[0] = (uint64_t)(uintptr_t)&emu_fiber_trampoline; // return address of the first switch
    a[-1] = 0;                                      // rbp
    a[-2] = (uint64_t)(uintptr_t)arg;               // rbx
    a[-3] = (uint64_t)(uintptr_t)fn;                // r12
    a[-4] = a[-5] = a[-6] = 0;                      // r13 r14 r15
    a[-8] = 0x037F;                                 // x87 control word: defaults
    a[-7] = 0x1F80;                                 // MXCSR: defaults (round to nearest, masked)
    f->sp = (void*)&a[-8];
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack;
    f->uc.uc_stack.ss_size = f->size;
    f->uc.uc_link = NULL;
    makecontext(&f->uc, (void (*)(void))fn, 1, arg);
#endif
}

// ----------------------------------------------------------------------------
// the state of a running block

enum State { READY, AT_BARRIER, AT_WARP, DONE };
enum WarpKind { WARP_SHFL, WARP_SHFL_UP, WARP_SHFL_DOWN, WARP_SHFL_XOR, WARP_BALLOT, WARP_SYNC };

inline const char* warp_kind_name(int k) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync", "__ballot_sync", "__syncwarp"};
    return names[k];
}

struct Thread {
    Fiber fiber;
    uint3 idx;
    int tid;              // linear index in the block
    State state;
    const char* file;     // where it waits
    int line;
    uint64_t result;      // of its last warp operation
};

struct WarpOp {           // the operation a warp's lanes are gathering for
    int active;
    int done_kind, done_line; // the last operation the warp completed, and its mask
    const char* done_file;
    unsigned done_mask;
    int kind, width;
    unsigned mask, arrived;
    const char* file;
    int line;
    uint64_t values[32];
    int args[32];         // srcLane, delta or laneMask per lane
};

struct Block {
    Thread* threads;      // (n) in linear order
    int n, live;          // threads, and those that have not exited
    int at_barrier;
    const char* barrier_file;
    int barrier_line;
    WarpOp* warps;        // (ceil(n/32))
    uint3 idx;
    dim3 dim, grid;
    void (*body)(void*);  // runs the kernel for the current thread
    void* body_arg;
};

// per OS thread: the block it runs, the thread running in it, the scheduler's own context, and
// reusable memory
struct Worker {
    Block* block;
    Thread* thread;
    Fiber scheduler;      // the OS thread's own stack (its bounds for ASan)
    char** stacks;        // a pool of fiber stacks, kept between blocks and launches
    int num_stacks;
    size_t stack_bytes;
    Thread* threads;      // (1024) and warps (32): the largest block
    WarpOp* warps;
    void* dyn_smem;       // dynamic shared memory of the running block (exactly the launch's size)
};

inline Worker& worker() {
    static thread_local Worker w;
    return w;
}

[[noreturn]] inline void fail(const char* fmt, ...) {
    Worker& w = worker();
    fflush(stdout);
    fprintf(stderr, "error: cuda emulation: ");
    if (w.block != NULL) {
        fprintf(stderr, "block (%u,%u,%u)", w.block->idx.x, w.block->idx.y, w.block->idx.z);
        if (w.thread != NULL) { fprintf(stderr, " thread (%u,%u,%u)", w.thread->idx.x, w.thread->idx.y, w.thread->idx.z); }
        fprintf(stderr, ": ");
    }
    va_list args;
    va_start(args, fmt);
    vfprintf(stderr, fmt, args);
    va_end(args);
    fprintf(stderr, "\n");
    fflush(stderr);
    _exit(EXIT_FAILURE); // as a GPU trap ends the process: fibers and other blocks are left where they are
}

// ----------------------------------------------------------------------------
// switching between the scheduler and the threads of a block

inline void switch_fibers(Fiber* from, Fiber* to, int from_exits) {
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(from_exits ? NULL : &from->fake_stack, to->stack, to->size);
#else
    (void)from_exits;
#endif
#if defined(__x86_64__)
    emu_switch_context(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
#ifdef EMU_ASAN
    const void* bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(from->fake_stack, &bottom, &size);
#endif
}

// the current CUDA thread waits: back to the scheduler until it is ready again
inline void yield_to_scheduler(void) {
    Worker& w = worker();
    switch_fibers(&w.thread->fiber, &w.scheduler, 0);
}

inline void release_barrier(Block* b) {
    for (int i = 0; i < b->n; i++) { if (b->threads[i].state == AT_BARRIER) { b->threads[i].state = READY; } }
    b->at_barrier = 0;
}

// the body of every fiber: the kernel for one CUDA thread, then its exit
inline void fiber_main(void* arg) {
    Worker& w = worker();
#ifdef EMU_ASAN
    const void* bottom;
    size_t size;
    __sanitizer_finish_switch_fiber(NULL, &bottom, &size); // the scheduler's stack
    w.scheduler.stack = (char*)bottom;
    w.scheduler.size = size;
#endif
    Thread* t = (Thread*)arg;
    Block* b = w.block;
    b->body(b->body_arg);
    t->state = DONE;
    b->live--;
    // Volta: an exited thread no longer counts at a barrier
    if (b->at_barrier > 0 && b->at_barrier == b->live) { release_barrier(b); }
    switch_fibers(&t->fiber, &w.scheduler, 1);
    fail("a finished fiber was resumed"); // not reached
}

inline void report_deadlock(Block* b) {
    char what[512] = "";
    int k = 0;
    if (b->at_barrier > 0) {
        k += snprintf(what + k, sizeof(what) - k, "%d of %d threads wait at __syncthreads (%s:%d), %d exited", b->at_barrier,
                      b->n, b->barrier_file, b->barrier_line, b->n - b->live);
    }
    for (int wi = 0; wi < (b->n + 31) / 32 && k < (int)sizeof(what) - 1; wi++) {
        WarpOp* op = &b->warps[wi];
        if (!op->active) { continue; }
        unsigned missing = op->mask & ~op->arrived, exited = 0;
        for (int l = 0; l < 32; l++) {
            if (((missing >> l) & 1) && b->threads[wi * 32 + l].state == DONE) { exited |= 1u << l; }
        }
        k += snprintf(what + k, sizeof(what) - k, "%swarp %d: lanes 0x%08x wait in %s (%s:%d) for lanes 0x%08x (0x%08x of them exited)",
                      k ? "; " : "", wi, op->arrived, warp_kind_name(op->kind), op->file, op->line, missing, exited);
    }
    worker().thread = NULL;
    fail("deadlock: %s", what);
}

// a permutation of 0..n-1 for one scheduling round: forward, reverse, or random from
// (seed, block, round), so every run of the same program interleaves the same way
inline void round_order(int* order, int n, Order mode, uint64_t seed, uint64_t block, int round) {
    for (int i = 0; i < n; i++) { order[i] = mode == ORDER_REVERSE ? n - 1 - i : i; }
    if (mode != ORDER_RANDOM) { return; }
    uint64_t s = seed ^ (block * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)round << 40);
    for (int i = n - 1; i > 0; i--) {
        s += 0x9E3779B97F4A7C15ull;
        uint64_t z = s;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        int j = (int)(z % (uint64_t)(i + 1));
        int tmp = order[i]; order[i] = order[j]; order[j] = tmp;
    }
}

// runs one block to the end: every ready thread in turn, round after round, until all exited
inline void run_block(Block* b, uint64_t block_linear) {
    Worker& w = worker();
    const Config& cfg = config();
    if (w.stack_bytes != cfg.stack_bytes) { w.num_stacks = 0; w.stack_bytes = cfg.stack_bytes; } // (stacks of the old size leak: tests only)
    if (w.threads == NULL) {
        w.threads = (Thread*)calloc(1024, sizeof(Thread));
        w.warps = (WarpOp*)calloc(32, sizeof(WarpOp));
        w.stacks = (char**)calloc(1024, sizeof(char*));
    }
    while (w.num_stacks < b->n) { w.stacks[w.num_stacks++] = stack_alloc(w.stack_bytes); }
    b->threads = w.threads;
    b->warps = w.warps;
    memset(b->warps, 0, ((b->n + 31) / 32) * sizeof(WarpOp));
    for (int i = 0; i < b->n; i++) {
        Thread* t = &b->threads[i];
        memset(t, 0, sizeof(Thread));
        t->tid = i;
        t->idx = make_uint3(i % b->dim.x, (i / b->dim.x) % b->dim.y, i / (b->dim.x * b->dim.y));
        t->state = READY;
        t->fiber.stack = w.stacks[i];
        t->fiber.size = w.stack_bytes;
        fiber_prepare(&t->fiber, fiber_main, t);
    }
    b->live = b->n;
    b->at_barrier = 0;
    w.block = b;
    int order[1024];
    for (int round = 0; b->live > 0; round++) {
        round_order(order, b->n, cfg.order, cfg.seed, block_linear, round);
        int ran = 0;
        for (int k = 0; k < b->n; k++) {
            Thread* t = &b->threads[order[k]];
            if (t->state != READY) { continue; }
            w.thread = t;
            switch_fibers(&w.scheduler, &t->fiber, 0);
            w.thread = NULL;
            ran = 1;
        }
        if (!ran) { report_deadlock(b); }
    }
    w.block = NULL;
}

// ----------------------------------------------------------------------------
// what kernels call

inline Thread* current_thread(void) {
    Thread* t = worker().thread;
    if (t == NULL) { fail("threadIdx or a device function used outside a kernel"); }
    return t;
}
inline Block* current_block(void) {
    Block* b = worker().block;
    if (b == NULL) { fail("blockIdx, blockDim or gridDim used outside a kernel"); }
    return b;
}

inline void syncthreads(const char* file, int line) {
    Worker& w = worker();
    Block* b = w.block;
    Thread* t = current_thread();
    if (b->at_barrier > 0 && (b->barrier_line != line || strcmp(b->barrier_file, file) != 0)) {
        fail("__syncthreads reached from different places: here (%s:%d) while %d threads wait at %s:%d", file, line,
             b->at_barrier, b->barrier_file, b->barrier_line);
    }
    b->barrier_file = file;
    b->barrier_line = line;
    t->state = AT_BARRIER;
    t->file = file;
    t->line = line;
    b->at_barrier++;
    if (b->at_barrier == b->live) { release_barrier(b); }
    yield_to_scheduler(); // even the last to arrive: the round order decides who goes on first
}

// the result of warp operation op for lane l
inline uint64_t warp_result(const WarpOp* op, int l) {
    if (op->kind == WARP_BALLOT) {
        uint64_t bits = 0;
        for (int k = 0; k < 32; k++) { if (((op->mask >> k) & 1) && op->values[k] != 0) { bits |= 1ull << k; } }
        return bits;
    }
    if (op->kind == WARP_SYNC) { return 0; }
    int width = op->width, base = l & ~(width - 1), pos = l & (width - 1), arg = op->args[l], src = l;
    if (op->kind == WARP_SHFL) { src = base + (arg & (width - 1)); }
    if (op->kind == WARP_SHFL_UP) { src = pos >= arg ? l - arg : l; }
    if (op->kind == WARP_SHFL_DOWN) { src = pos + arg < width ? l + arg : l; }
    if (op->kind == WARP_SHFL_XOR) { src = l ^ arg; if ((src & ~(width - 1)) != base) { src = l; } }
    if (src < 0 || src > 31 || !((op->mask >> src) & 1)) {
        fail("%s (%s:%d): lane %d reads lane %d, which is not in the mask 0x%08x", warp_kind_name(op->kind), op->file, op->line, l, src, op->mask);
    }
    return op->values[src];
}

// one lane's part in a warp operation: it waits until every lane of the mask has arrived
inline uint64_t warp_op(int kind, unsigned mask, uint64_t value, int arg, int width, const char* file, int line) {
    Worker& w = worker();
    Block* b = w.block;
    Thread* t = current_thread();
    int lane = t->tid % 32, wi = t->tid / 32;
    int lanes_here = b->n - wi * 32 < 32 ? b->n - wi * 32 : 32;
    unsigned exists = lanes_here == 32 ? 0xffffffffu : ((1u << lanes_here) - 1);
    if (!((mask >> lane) & 1)) { fail("%s (%s:%d): the mask 0x%08x leaves out the calling lane %d", warp_kind_name(kind), file, line, mask, lane); }
    if (mask & ~exists) { fail("%s (%s:%d): the mask 0x%08x names lanes 0x%08x that this block (%d threads) does not have", warp_kind_name(kind), file, line, mask, mask & ~exists, b->n); }
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) { fail("%s (%s:%d): width %d is not a power of 2 in [1, 32]", warp_kind_name(kind), file, line, width); }
    WarpOp* op = &b->warps[wi];
    // lanes that already made this call with another mask: they will not come again
    if (!op->active && op->done_file != NULL && op->done_kind == kind && op->done_line == line && strcmp(op->done_file, file) == 0 &&
        op->done_mask != mask && !((op->done_mask >> lane) & 1) && (mask & op->done_mask) != 0) {
        fail("warp %d: lane %d calls %s (%s:%d) with mask 0x%08x, but lanes 0x%08x made this call with mask 0x%08x", wi, lane,
             warp_kind_name(kind), file, line, mask, op->done_mask, op->done_mask);
    }
    if (!op->active) {
        op->active = 1;
        op->kind = kind; op->width = width; op->mask = mask; op->arrived = 0; op->file = file; op->line = line;
    } else if (op->kind != kind || op->mask != mask || op->width != width || op->line != line || strcmp(op->file, file) != 0) {
        fail("warp %d: lane %d calls %s (%s:%d) with mask 0x%08x, width %d, while lanes 0x%08x wait in %s (%s:%d) with mask 0x%08x, width %d",
             wi, lane, warp_kind_name(kind), file, line, mask, width, op->arrived, warp_kind_name(op->kind), op->file, op->line, op->mask, op->width);
    }
    op->values[lane] = value;
    op->args[lane] = arg;
    op->arrived |= 1u << lane;
    t->state = AT_WARP;
    t->file = file;
    t->line = line;
    if (op->arrived == op->mask) {
        for (int l = 0; l < 32; l++) {
            if (!((op->mask >> l) & 1)) { continue; }
            Thread* lt = &b->threads[wi * 32 + l];
            lt->result = warp_result(op, l);
            lt->state = READY;
        }
        op->active = 0;
        op->done_kind = op->kind; op->done_file = op->file; op->done_line = op->line; op->done_mask = op->mask;
    }
    yield_to_scheduler();
    return t->result;
}

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp operations move values of up to 8 bytes");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}

// ----------------------------------------------------------------------------
// the emulated CUDA runtime's own state

struct Runtime {
    cudaError_t last_error;  // sticky until cudaGetLastError reads it
    size_t allocated;        // bytes live in cudaMalloc (as malloc_usable_size counts them)
    const void* funcs[64];   // kernels given a larger dynamic shared memory (cudaFuncSetAttribute)
    int smem_limits[64];
    int num_funcs;
};

inline Runtime& runtime() {
    static Runtime r;
    return r;
}

// the dynamic shared memory a kernel may launch with: 48 KB, or what cudaFuncSetAttribute allowed
inline size_t smem_limit(const void* kernel) {
    Runtime& r = runtime();
    for (int i = 0; i < r.num_funcs; i++) { if (r.funcs[i] == kernel) { return (size_t)r.smem_limits[i]; } }
    return 48 * 1024;
}

inline cudaError_t set_error(cudaError_t e) {
    if (e != cudaSuccess) { runtime().last_error = e; }
    return e;
}

// the memory of the running block's dynamic shared memory (EMU_DYNAMIC_SHARED)
inline void* dynamic_smem(void) { return worker().dyn_smem; }

} // namespace emu

// ----------------------------------------------------------------------------
// the names kernels use

#define threadIdx (emu::current_thread()->idx)
#define blockIdx (emu::current_block()->idx)
#define blockDim (emu::current_block()->dim)
#define gridDim (emu::current_block()->grid)
#define __syncthreads() emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ((void)emu::warp_op(emu::WARP_SYNC, emu_syncwarp_mask(__VA_ARGS__), 0, 0, 32, __FILE__, __LINE__))
inline unsigned emu_syncwarp_mask(unsigned mask = 0xffffffffu) { return mask; }
#define __shfl_sync(mask, var, lane, ...) emu_shfl(emu::WARP_SHFL, mask, var, lane, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) emu_shfl(emu::WARP_SHFL_UP, mask, var, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) emu_shfl(emu::WARP_SHFL_DOWN, mask, var, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lanemask, ...) emu_shfl(emu::WARP_SHFL_XOR, mask, var, lanemask, __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) ((unsigned)emu::warp_op(emu::WARP_BALLOT, mask, (pred) ? 1u : 0u, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) (__ballot_sync(mask, pred) != 0)
#define __all_sync(mask, pred) (__ballot_sync(mask, pred) == (mask))
#define EMU_DYNAMIC_SHARED(type, name) type* name = (type*)emu::dynamic_smem()

template <typename T>
inline T emu_shfl(int kind, unsigned mask, T var, int arg, const char* file, int line, int width = 32) {
    return emu::from_bits<T>(emu::warp_op(kind, mask, emu::to_bits(var), arg, width, file, line));
}

constexpr int warpSize = 32;

// atomics: real ones, since blocks run on several OS threads; floats through compare-and-swap
template <typename T> inline T emu_atomic_add(T* addr, T v) { return __atomic_fetch_add(addr, v, __ATOMIC_RELAXED); }
inline float emu_atomic_add(float* addr, float v) {
    uint32_t* p = (uint32_t*)addr;
    uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED), want;
    do {
        float f;
        memcpy(&f, &old, 4);
        f += v;
        memcpy(&want, &f, 4);
    } while (!__atomic_compare_exchange_n(p, &old, want, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    float f;
    memcpy(&f, &old, 4);
    return f;
}
inline int atomicAdd(int* a, int v) { return emu_atomic_add(a, v); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return emu_atomic_add(a, v); }
inline float atomicAdd(float* a, float v) { return emu_atomic_add(a, v); }
template <typename T, typename F> inline T emu_atomic_update(T* addr, F f) { // old value; *addr = f(old)
    T old = __atomic_load_n(addr, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(addr, &old, f(old), 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    return old;
}
inline int atomicMax(int* a, int v) { return emu_atomic_update(a, [v](int o) { return o > v ? o : v; }); }
inline int atomicMin(int* a, int v) { return emu_atomic_update(a, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return emu_atomic_update(a, [v](unsigned o) { return o > v ? o : v; }); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* a, int compare, int v) { __atomic_compare_exchange_n(a, &compare, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED); return compare; }
inline unsigned atomicCAS(unsigned* a, unsigned compare, unsigned v) { __atomic_compare_exchange_n(a, &compare, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED); return compare; }
inline void __threadfence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// device math and bit intrinsics as their host twins (the GPU's fast approximations __expf,
// __logf, ... are exact here: tests bound them as on the GPU, never bit for bit)
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    return __builtin_bswap32(x);
}
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline size_t min(size_t a, size_t b) { return a < b ? a : b; }
inline size_t max(size_t a, size_t b) { return a > b ? a : b; }

// ----------------------------------------------------------------------------
// launching a grid

// the one way to launch a kernel (cuda_common.h: kernel<<<grid, block, smem, stream>>>(args...)
// under nvcc). Checks the configuration as a GPU does, then runs every block.
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
    (void)stream;
    unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
        grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || smem > emu::smem_limit((const void*)kernel)) {
        emu::set_error(cudaErrorInvalidConfiguration);
        return;
    }
    static_assert(sizeof...(KernelArgs) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
    auto call = [&]() { kernel(args...); }; // each CUDA thread gets its own copies of the arguments
    auto body = [](void* c) { (*(decltype(call)*)c)(); };
    long long nblocks = (long long)grid.x * grid.y * grid.z;
    int parallel = emu::config().parallel_blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(parallel) if (parallel > 1 && nblocks > 1)
    for (long long bl = 0; bl < nblocks; bl++) {
        emu::Block b = {};
        b.n = (int)threads;
        b.dim = block;
        b.grid = grid;
        b.idx = make_uint3((unsigned)(bl % grid.x), (unsigned)((bl / grid.x) % grid.y), (unsigned)(bl / ((long long)grid.x * grid.y)));
        b.body = body;
        b.body_arg = (void*)&call;
        emu::Worker& w = emu::worker();
        w.dyn_smem = smem > 0 ? malloc(smem) : NULL; // exactly smem bytes, so ASan sees an overrun
        emu::run_block(&b, (uint64_t)bl);
        free(w.dyn_smem);
        w.dyn_smem = NULL;
    }
}

inline void emu_set_order(emu::Order order, uint64_t seed) { emu::config().order = order; emu::config().seed = seed; }
inline void emu_set_parallel_blocks(int n) { emu::config().parallel_blocks = n > 0 ? n : 1; }

// ----------------------------------------------------------------------------
// the CUDA runtime calls, with CPU bodies and CUDA's contracts. Every call completes before it
// returns, so streams and events order nothing; "device" memory is host memory.

struct CUstream_st { int unused; };
struct CUevent_st { double seconds; };

extern "C" {
inline cudaError_t cudaMalloc(void** p, size_t size) {
    *p = size > 0 ? malloc(size) : NULL; // exactly size bytes: ASan sees an overrun
    if (size > 0 && *p == NULL) { return emu::set_error(cudaErrorMemoryAllocation); }
    emu::runtime().allocated += malloc_usable_size(*p);
    return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) { emu::runtime().allocated -= malloc_usable_size(p); free(p); return cudaSuccess; }
inline cudaError_t cudaMallocHost(void** p, size_t size) { return cudaMalloc(p, size); }
inline cudaError_t cudaFreeHost(void* p) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, enum cudaMemcpyKind kind) {
    (void)kind;
    if (n > 0) { memmove(dst, src, n); }
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, enum cudaMemcpyKind kind, cudaStream_t s) { (void)s; return cudaMemcpy(dst, src, n, kind); }
inline cudaError_t cudaMemset(void* p, int value, size_t n) { if (n > 0) { memset(p, value, n); } return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t s) { (void)s; return cudaMemset(p, value, n); }
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = (cudaStream_t)calloc(1, sizeof(CUstream_st)); return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { free(s); return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { (void)s; return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned int flags) { (void)s; (void)e; (void)flags; return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t)calloc(1, sizeof(CUevent_st)); return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
    (void)s;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    e->seconds = ts.tv_sec + 1e-9 * ts.tv_nsec;
    return cudaSuccess;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { (void)e; return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) { *ms = (float)(1000.0 * (end->seconds - start->seconds)); return cudaSuccess; }
inline cudaError_t cudaGetLastError(void) { cudaError_t e = emu::runtime().last_error; emu::runtime().last_error = cudaSuccess; return e; }
inline cudaError_t cudaPeekAtLastError(void) { return emu::runtime().last_error; }
inline const char* cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        default: return "cudaError (emulated)";
    }
}
inline const char* cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorMemoryAllocation: return "out of memory";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorInvalidDevice: return "invalid device ordinal";
        default: return "unknown error (emulated)";
    }
}
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : emu::set_error(cudaErrorInvalidDevice); }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
// an emulated device: an H100's numbers where a kernel's shape depends on them
inline cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp* p, int d) {
    if (d != 0) { return emu::set_error(cudaErrorInvalidDevice); }
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "CUDA emulation on the CPU");
    p->major = 9; p->minor = 0;
    p->multiProcessorCount = 132;
    p->maxThreadsPerBlock = 1024;
    p->maxThreadsPerMultiProcessor = 2048;
    p->sharedMemPerBlock = 48 * 1024;
    p->sharedMemPerBlockOptin = 227 * 1024;
    p->warpSize = 32;
    p->totalGlobalMem = (size_t)80 << 30;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int d) {
    (void)d;
    cudaDeviceProp p;
    cudaGetDeviceProperties(&p, 0);
    switch (attr) {
        case cudaDevAttrMultiProcessorCount: *value = p.multiProcessorCount; break;
        case cudaDevAttrMaxThreadsPerBlock: *value = p.maxThreadsPerBlock; break;
        case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)p.sharedMemPerBlockOptin; break;
        case cudaDevAttrComputeCapabilityMajor: *value = p.major; break;
        case cudaDevAttrComputeCapabilityMinor: *value = p.minor; break;
        default: *value = 0; break;
    }
    return cudaSuccess;
}
inline cudaError_t cudaFuncSetAttribute(const void* f, enum cudaFuncAttribute attr, int value) {
    emu::Runtime& r = emu::runtime();
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) { return cudaSuccess; }
    if (value < 0 || value > 227 * 1024) { return emu::set_error(cudaErrorInvalidValue); }
    int i = 0;
    while (i < r.num_funcs && r.funcs[i] != f) { i++; }
    if (i == 64) { return emu::set_error(cudaErrorInvalidValue); }
    r.funcs[i] = f;
    r.smem_limits[i] = value;
    if (i == r.num_funcs) { r.num_funcs++; }
    return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total) { *total = (size_t)80 << 30; *free_bytes = *total - emu::runtime().allocated; return cudaSuccess; }
}

#endif // CUDA_EMU_H

/*
dev/cuda/test_emu.cu: tests of the CUDA-on-CPU layer (dev/cuda/cuda_emu.h). Correct kernels must
give the right answer in every thread order (forward, reverse, random); deliberately broken ones
must be caught: a missing barrier (a wrong answer in some order), a half-warp shuffle (a deadlock
report), lanes that disagree, divergent barriers, a bad launch, and, in the AddressSanitizer
build, a shared-memory and a global-memory overrun.
  make dev/cuda/test_emu && ./dev/cuda/test_emu          (g++, -DCUDA_EMULATION)
  make dev/cuda/test_emu_asan && ./dev/cuda/test_emu_asan
The correct kernels' checks also compile with nvcc, for make test-gpu on a real GPU.
*/
#include "cuda_common.h"
#include "dev/testing.h"

// ----------------------------------------------------------------------------
// correct kernels

// every (block, thread) of a 3-D grid of 3-D blocks writes its linear id once
__global__ void index_kernel(int* hits, int* where) {
    int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int id = block * blockDim.x * blockDim.y * blockDim.z + thread;
    atomicAdd(&hits[id], 1);
    where[id] = block * 10000 + thread;
}

// sum of n values by one block: strided loads, a warp reduction with shuffles, one barrier
__global__ void block_sum_kernel(float* out, const float* x, int n) {
    __shared__ float partial[32];
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { v += x[i]; }
    for (int off = 16; off > 0; off /= 2) { v += __shfl_down_sync(0xffffffffu, v, off); }
    if (threadIdx.x % 32 == 0) { partial[threadIdx.x / 32] = v; }
    __syncthreads();
    if (threadIdx.x < 32) {
        unsigned warps = blockDim.x / 32;
        float w = threadIdx.x < warps ? partial[threadIdx.x] : 0.0f;
        for (int off = 16; off > 0; off /= 2) { w += __shfl_xor_sync(0xffffffffu, w, off); }
        if (threadIdx.x == 0) { out[blockIdx.x] = w; }
    }
}

// inclusive prefix sum of one block through shared memory (Hillis-Steele); with_barriers = 0
// leaves out the barriers between reading and writing, the classic race (unsigned: the race reads
// stale values, and their sums may wrap)
__global__ void scan_kernel(int* out, const int* in, int with_barriers) {
    __shared__ unsigned buf[256];
    int t = threadIdx.x;
    buf[t] = (unsigned)in[t];
    if (with_barriers) { __syncthreads(); }
    for (int off = 1; off < (int)blockDim.x; off *= 2) {
        unsigned add = t >= off ? buf[t - off] : 0;
        if (with_barriers) { __syncthreads(); }
        buf[t] += add;
        if (with_barriers) { __syncthreads(); }
    }
    out[t] = (int)buf[t];
}

// each warp's lanes exchange values in every way the hardware offers; out holds, per lane:
// [0] broadcast of lane 5, [1] inclusive scan by shfl_up, [2] sum by shfl_down (lane 0),
// [3] sum by a xor butterfly, [4] sums within segments of 8 (xor, width 8), [5] ballot of odd lanes,
// [6] any(lane == 7), [7] all(lane < 32), [8] shfl_down within width 16, [9] after __syncwarp
__global__ void warp_kernel(int* out) {
    int lane = threadIdx.x % 32;
    int v = lane + 1;
    int* o = out + threadIdx.x * 10;
    o[0] = __shfl_sync(0xffffffffu, v, 5);
    int s = v;
    for (int off = 1; off < 32; off *= 2) {
        int u = __shfl_up_sync(0xffffffffu, s, off);
        if (lane >= off) { s += u; }
    }
    o[1] = s;
    int d = v;
    for (int off = 16; off > 0; off /= 2) { d += __shfl_down_sync(0xffffffffu, d, off); }
    o[2] = d;
    int x = v;
    for (int off = 16; off > 0; off /= 2) { x += __shfl_xor_sync(0xffffffffu, x, off); }
    o[3] = x;
    int seg = v;
    for (int off = 4; off > 0; off /= 2) { seg += __shfl_xor_sync(0xffffffffu, seg, off, 8); }
    o[4] = seg;
    o[5] = (int)__ballot_sync(0xffffffffu, lane % 2 == 1);
    o[6] = __any_sync(0xffffffffu, lane == 7);
    o[7] = __all_sync(0xffffffffu, lane < 32);
    o[8] = __shfl_down_sync(0xffffffffu, v, 1, 16);
    __syncwarp();
    o[9] = __shfl_sync(0xffffffffu, lane, 31 - lane);
}

// Volta: threads that return before a barrier do not count at it
__global__ void early_exit_kernel(int* out, int active) {
    __shared__ int total;
    if ((int)threadIdx.x >= active) { return; }
    if (threadIdx.x == 0) { total = 0; }
    __syncthreads();
    atomicAdd(&total, 1);
    __syncthreads();
    out[threadIdx.x] = total;
}

// dynamic shared memory: each thread writes its slot, then reads its neighbour's
__global__ void dynamic_smem_kernel(float* out, int n) {
    EMU_DYNAMIC_SHARED(float, dsmem);
    int t = threadIdx.x;
    dsmem[t] = (float)(t * t);
    __syncthreads();
    out[t] = dsmem[(t + 1) % n];
}

// each thread publishes its value and reads its right neighbour's; with_barrier = 0 forgets the
// barrier between the two: right only when the neighbour happens to run first
__global__ void neighbour_kernel(int* out, const int* in, int with_barrier) {
    __shared__ int slots[256];
    int t = threadIdx.x;
    slots[t] = in[t];
    if (with_barrier) { __syncthreads(); }
    out[t] = t + 1 < (int)blockDim.x ? slots[t + 1] : 0;
}

// many blocks add into one counter (int) and one float (exact: sums of small integers)
__global__ void atomic_kernel(int* count, float* total) {
    atomicAdd(count, 1);
    atomicAdd(total, 1.0f);
}

// bf16 round trip inside a kernel: x -> bf16 -> float, and a product of two bf16 values
__global__ void bf16_kernel(float* out, const float* x, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        __nv_bfloat16 b = __float2bfloat16(x[i]);
        out[i] = __bfloat162float(b * b);
    }
}

// ----------------------------------------------------------------------------
// helpers

template <typename T> static T* device_copy(const T* host, size_t n) {
    T* d;
    cudaCheck(cudaMalloc((void**)&d, n * sizeof(T)));
    if (host != NULL) { cudaCheck(cudaMemcpy(d, host, n * sizeof(T), cudaMemcpyHostToDevice)); }
    else { cudaCheck(cudaMemset(d, 0, n * sizeof(T))); }
    return d;
}
template <typename T> static void host_copy(T* host, const T* d, size_t n) {
    cudaCheck(cudaMemcpy(host, d, n * sizeof(T), cudaMemcpyDeviceToHost));
}

// bf16 round-to-nearest-even on the bits, written independently of cuda_bf16.h
static float bf16_round_reference(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) { return f; } // NaN stays NaN
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

// ----------------------------------------------------------------------------
// checks that hold for correct kernels, on the emulation (in the order set) and on a GPU

static void test_correct_kernels(const char* order) {
    char name[128];
    // indexing: a 3x2x2 grid of 4x3x2 blocks, every id hit once
    {
        dim3 grid(3, 2, 2), block(4, 3, 2);
        int n = 12 * 24;
        int* hits = device_copy<int>(NULL, n);
        int* where = device_copy<int>(NULL, n);
        launch_kernel(index_kernel, grid, block, 0, 0, hits, where);
        cudaCheck(cudaGetLastError());
        int h[288], w[288], bad = 0;
        host_copy(h, hits, n);
        host_copy(w, where, n);
        for (int i = 0; i < n; i++) { bad += h[i] != 1 || w[i] != (i / 24) * 10000 + i % 24; }
        snprintf(name, sizeof(name), "emu/%s/indexing_3d", order);
        check(bad == 0, name, "%d of %d ids wrong (grid 3x2x2, block 4x3x2)", bad, n);
        cudaFree(hits); cudaFree(where);
    }
    // a block sum of 1000 integers, exact in fp32
    {
        int n = 1000;
        float x[1000], out[2];
        for (int i = 0; i < n; i++) { x[i] = (float)(i % 17); }
        float* dx = device_copy(x, n);
        float* dout = device_copy<float>(NULL, 2);
        launch_kernel(block_sum_kernel, dim3(2), dim3(256), 0, 0, dout, dx, n);
        cudaCheck(cudaGetLastError());
        host_copy(out, dout, 2);
        double want = 0;
        for (int i = 0; i < n; i++) { want += x[i]; }
        snprintf(name, sizeof(name), "emu/%s/block_sum", order);
        check(out[0] == want && out[1] == want, name, "%.0f and %.0f (want %.0f): shuffles and one barrier", out[0], out[1], want);
        cudaFree(dx); cudaFree(dout);
    }
    // the scan with its barriers
    {
        int in[256], out[256], bad = 0;
        for (int i = 0; i < 256; i++) { in[i] = (i * 7 + 3) % 11; }
        int* din = device_copy(in, 256);
        int* dout = device_copy<int>(NULL, 256);
        launch_kernel(scan_kernel, dim3(1), dim3(256), 0, 0, dout, din, 1);
        host_copy(out, dout, 256);
        for (int i = 0, s = 0; i < 256; i++) { s += in[i]; bad += out[i] != s; }
        snprintf(name, sizeof(name), "emu/%s/scan_with_barriers", order);
        check(bad == 0, name, "%d of 256 prefix sums wrong", bad);
        cudaFree(din); cudaFree(dout);
    }
    // the warp operations: two warps, values 1..32 per warp
    {
        int out[640];
        int* dout = device_copy<int>(NULL, 640);
        launch_kernel(warp_kernel, dim3(1), dim3(64), 0, 0, dout);
        cudaCheck(cudaGetLastError());
        host_copy(out, dout, 640);
        int bad = 0;
        for (int t = 0; t < 64; t++) {
            int lane = t % 32, v = lane + 1, seg = lane / 8;
            const int* o = out + t * 10;
            int want[10] = {6, v * (v + 1) / 2, 0, 528, 0, (int)0xaaaaaaaau, 1, 1, (lane % 16) < 15 ? v + 1 : v, 31 - lane};
            want[2] = lane == 0 ? 528 : o[2]; // only lane 0's shfl_down sum is defined
            want[4] = 8 * (8 * seg + 1) + 28; // sum of 8*seg+1 .. 8*seg+8
            for (int k = 0; k < 10; k++) { bad += o[k] != want[k]; }
        }
        snprintf(name, sizeof(name), "emu/%s/warp_operations", order);
        check(bad == 0, name, "%d of 640 values wrong: broadcast, up-scan, down-sum, xor butterfly, width 8 and 16, ballot, any, all, a reversal after __syncwarp", bad);
        cudaFree(dout);
    }
    // early exit: 100 of 128 threads meet at the barriers
    {
        int out[128];
        int* dout = device_copy<int>(NULL, 128);
        launch_kernel(early_exit_kernel, dim3(1), dim3(128), 0, 0, dout, 100);
        cudaCheck(cudaGetLastError());
        host_copy(out, dout, 128);
        int bad = 0;
        for (int t = 0; t < 128; t++) { bad += out[t] != (t < 100 ? 100 : 0); }
        snprintf(name, sizeof(name), "emu/%s/exited_threads_leave_barrier", order);
        check(bad == 0, name, "%d wrong: 28 threads return before __syncthreads, the other 100 pass it", bad);
        cudaFree(dout);
    }
    // dynamic shared memory
    {
        int n = 96;
        float out[96];
        float* dout = device_copy<float>(NULL, n);
        launch_kernel(dynamic_smem_kernel, dim3(1), dim3(n), n * sizeof(float), 0, dout, n);
        cudaCheck(cudaGetLastError());
        host_copy(out, dout, n);
        int bad = 0;
        for (int t = 0; t < n; t++) { bad += out[t] != (float)(((t + 1) % n) * ((t + 1) % n)); }
        snprintf(name, sizeof(name), "emu/%s/dynamic_shared_memory", order);
        check(bad == 0, name, "%d of %d wrong", bad, n);
        cudaFree(dout);
    }
    // atomics across 64 blocks
    {
        int* count = device_copy<int>(NULL, 1);
        float* total = device_copy<float>(NULL, 1);
        launch_kernel(atomic_kernel, dim3(64), dim3(128), 0, 0, count, total);
        cudaCheck(cudaGetLastError());
        int c;
        float f;
        host_copy(&c, count, 1);
        host_copy(&f, total, 1);
        snprintf(name, sizeof(name), "emu/%s/atomics", order);
        check(c == 8192 && f == 8192.0f, name, "int %d, float %.0f (want 8192 each, from 64 blocks)", c, f);
        cudaFree(count); cudaFree(total);
    }
}

// bf16: NVIDIA's cuda_bf16.h on the host rounds to nearest even, as the GPU does; checked
// against the bit formula on 1M random floats, inside a kernel and on the host
static void test_bf16(void) {
    int n = 1 << 20;
    float* x = (float*)malloc(n * sizeof(float));
    float* out = (float*)malloc(n * sizeof(float));
    uint64_t rng = 5;
    for (int i = 0; i < n; i++) {
        uint32_t u = random_u32(&rng);
        u = (u & 0x8fffffffu) | 0x30000000u; // normal numbers of moderate size, both signs
        memcpy(&x[i], &u, 4);
    }
    int host_bad = 0;
    for (int i = 0; i < n; i++) { host_bad += __bfloat162float(__float2bfloat16(x[i])) != bf16_round_reference(x[i]); }
    float* dx = device_copy(x, n);
    float* dout = device_copy<float>(NULL, n);
    launch_kernel(bf16_kernel, dim3(CEIL_DIV(n, 1024)), dim3(1024), 0, 0, dout, dx, n);
    cudaCheck(cudaGetLastError());
    host_copy(out, dout, n);
    int dev_bad = 0;
    for (int i = 0; i < n; i++) {
        float b = bf16_round_reference(x[i]);
        dev_bad += out[i] != bf16_round_reference(b * b); // the product of two bf16 is exact in fp32
    }
    check(host_bad == 0 && dev_bad == 0, "emu/bf16_round_to_nearest_even", "%d host and %d kernel values differ from the RNE bit formula of 1M floats", host_bad, dev_bad);
    float tie = 1.0f + 1.0f / 256; // halfway between two bf16 values: to the even one (1.0)
    check(__bfloat162float(__float2bfloat16(tie)) == 1.0f && __bfloat162float(__float2bfloat16(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256,
          "emu/bf16_ties_to_even", "1+2^-8 -> %g, 1+3*2^-8 -> %g", __bfloat162float(__float2bfloat16(tie)), __bfloat162float(__float2bfloat16(1.0f + 3.0f / 256)));
    cudaFree(dx); cudaFree(dout);
    free(x); free(out);
}

#ifdef CUDA_EMULATION
// ----------------------------------------------------------------------------
// what only the emulation checks: broken kernels are caught

static const char* order_names[3] = {"forward", "reverse", "random"};

// how many outputs of a kernel with a missing barrier are wrong. salt makes every launch's values
// new, so stale shared memory of an earlier launch cannot pass for the right answer
static int wrong_without_barrier(void (*kernel)(int*, const int*, int), int is_scan, int salt) {
    int in[256], out[256], bad = 0;
    for (int i = 0; i < 256; i++) { in[i] = (i * 5 + salt) % 13 + 100 * salt; }
    int* din = device_copy(in, 256);
    int* dout = device_copy<int>(NULL, 256);
    launch_kernel(kernel, dim3(1), dim3(256), 0, 0, dout, din, 0);
    host_copy(out, dout, 256);
    for (int i = 0, s = 0; i < 256; i++) {
        s += in[i];
        bad += out[i] != (is_scan ? s : (i + 1 < 256 ? in[i + 1] : 0));
    }
    cudaFree(din); cudaFree(dout);
    return bad;
}

__global__ void half_warp_shuffle_kernel(float* out) {
    if (threadIdx.x >= 16) { return; }
    float v = (float)threadIdx.x;
    for (int off = 8; off > 0; off /= 2) { v += __shfl_xor_sync(0xffffffffu, v, off); } // names lanes that left
    out[threadIdx.x] = v;
}

__global__ void divergent_barrier_kernel(float* out) {
    if (threadIdx.x % 2 == 0) { __syncthreads(); }
    else { __syncthreads(); }
    out[threadIdx.x] = 1.0f;
}

__global__ void mask_disagreement_kernel(float* out) {
    float v = (float)threadIdx.x;
    unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffffffffu;
    v += __shfl_xor_sync(mask, v, 1);
    out[threadIdx.x] = v;
}

__global__ void mask_without_self_kernel(float* out) {
    out[threadIdx.x] = __shfl_sync(0x0000fffeu, 1.0f, 1); // lane 0 calls with a mask that leaves it out
}

__global__ void mask_beyond_block_kernel(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); // 48 threads: warp 1 has 16 lanes
}

__global__ void barrier_vs_warp_deadlock_kernel(float* out) {
    float v = 1.0f;
    if (threadIdx.x == 0) { __syncthreads(); } // lane 0 waits at the barrier...
    else { v = __shfl_sync(0xffffffffu, v, 0); } // ...while the others wait for lane 0 in a shuffle
    out[threadIdx.x] = v;
}

__global__ void global_overrun_kernel(float* x, int n) {
    x[threadIdx.x] = 1.0f; // launched with n + 1 threads for n floats
    (void)n;
}

__global__ void shared_overrun_kernel(float* out) {
    EMU_DYNAMIC_SHARED(float, overrun_smem);
    overrun_smem[threadIdx.x + 1] = 1.0f; // one float past the launch's dynamic shared memory
    out[threadIdx.x] = overrun_smem[threadIdx.x];
}

static void run_half_warp(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 32); launch_kernel(half_warp_shuffle_kernel, dim3(1), dim3(32), 0, 0, d); }
static void run_divergent(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 64); launch_kernel(divergent_barrier_kernel, dim3(1), dim3(64), 0, 0, d); }
static void run_mask_disagree(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 32); launch_kernel(mask_disagreement_kernel, dim3(1), dim3(32), 0, 0, d); }
static void run_mask_self(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 32); launch_kernel(mask_without_self_kernel, dim3(1), dim3(32), 0, 0, d); }
static void run_mask_beyond(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 48); launch_kernel(mask_beyond_block_kernel, dim3(1), dim3(48), 0, 0, d); }
static void run_barrier_vs_warp(const void* arg) { (void)arg; float* d = device_copy<float>(NULL, 32); launch_kernel(barrier_vs_warp_deadlock_kernel, dim3(1), dim3(32), 0, 0, d); }
static void run_global_overrun(const void* arg) {
    (void)arg;
    float* d = device_copy<float>(NULL, 100);
    launch_kernel(global_overrun_kernel, dim3(1), dim3(101), 0, 0, d, 100);
}
static void run_shared_overrun(const void* arg) {
    (void)arg;
    float* d = device_copy<float>(NULL, 64);
    launch_kernel(shared_overrun_kernel, dim3(1), dim3(64), 64 * sizeof(float), 0, d);
}

// a child that must die with a sanitizer report containing want
static void check_sanitizer_catches(const char* name, void (*fn)(const void*), const char* want) {
    char msg[8192];
    int status = run_in_child(fn, NULL, msg, sizeof(msg));
    const char* hit = strstr(msg, want);
    const char* line = strstr(msg, "ERROR: AddressSanitizer");
    char first[200] = "";
    if (line != NULL) { snprintf(first, sizeof(first), "%.*s", (int)strcspn(line, "\n"), line); }
    check(status != 0 && hit != NULL, name, "exit %d: %s", status, first[0] ? first : "no AddressSanitizer report");
}

static void test_broken_kernels(void) {
    // missing barriers: the neighbour exchange passes in reverse order (each neighbour has run
    // first) and fails in the other two, which is why every kernel test runs all three orders;
    // the scan without its barriers fails in all three
    int wrong[3], scan_wrong[3];
    for (int o = 0; o < 3; o++) {
        emu_set_order((emu::Order)o, 7);
        wrong[o] = wrong_without_barrier(neighbour_kernel, 0, o + 1);
        scan_wrong[o] = wrong_without_barrier(scan_kernel, 1, o + 4);
    }
    emu_set_order(emu::ORDER_FORWARD, 1);
    check(wrong[0] > 0 && wrong[1] == 0 && wrong[2] > 0, "emu/broken/missing_barrier_caught",
          "neighbour exchange without its barrier: %d wrong in forward, %d in reverse, %d in random order (of 256)", wrong[0], wrong[1], wrong[2]);
    check(scan_wrong[0] > 0 && scan_wrong[1] > 0 && scan_wrong[2] > 0, "emu/broken/scan_without_barriers_caught",
          "prefix sums wrong: %d forward, %d reverse, %d random (of 256)", scan_wrong[0], scan_wrong[1], scan_wrong[2]);
    {
        int in[256], out[256], bad = 0;
        for (int i = 0; i < 256; i++) { in[i] = i * 3; }
        int* din = device_copy(in, 256);
        int* dout = device_copy<int>(NULL, 256);
        for (int o = 0; o < 3; o++) {
            emu_set_order((emu::Order)o, 9);
            launch_kernel(neighbour_kernel, dim3(1), dim3(256), 0, 0, dout, din, 1);
            host_copy(out, dout, 256);
            for (int i = 0; i < 256; i++) { bad += out[i] != (i + 1 < 256 ? in[i + 1] : 0); }
        }
        emu_set_order(emu::ORDER_FORWARD, 1);
        check(bad == 0, "emu/neighbour_with_barrier", "%d wrong over the three orders", bad);
        cudaFree(din); cudaFree(dout);
    }
    const char* pre = "error: cuda emulation: block (0,0,0) thread";
    check_exits("emu/broken/half_warp_shuffle", run_half_warp, NULL, "error: cuda emulation: block (0,0,0): deadlock: warp 0: lanes 0x0000ffff wait in __shfl_xor_sync",
                "for lanes 0xffff0000", "(0xffff0000 of them exited)");
    check_exits("emu/broken/divergent_barrier", run_divergent, NULL, pre, "__syncthreads reached from different places", "test_emu.cu");
    check_exits("emu/broken/lanes_disagree_on_mask", run_mask_disagree, NULL, pre, "calls __shfl_xor_sync", "but lanes 0x0000ffff made this call with mask 0x0000ffff");
    check_exits("emu/broken/mask_leaves_out_caller", run_mask_self, NULL, pre, "the mask 0x0000fffe leaves out the calling lane 0", "__shfl_sync");
    check_exits("emu/broken/mask_beyond_block", run_mask_beyond, NULL, pre, "names lanes 0xffff0000", "(48 threads) does not have");
    check_exits("emu/broken/barrier_vs_shuffle_deadlock", run_barrier_vs_warp, NULL, "error: cuda emulation: block (0,0,0): deadlock:",
                "1 of 32 threads wait at __syncthreads", "warp 0: lanes 0xfffffffe wait in __shfl_sync");
    // a bad launch: an error for cudaGetLastError, as on a GPU, and nothing runs
    float* d = device_copy<float>(NULL, 4);
    launch_kernel(bf16_kernel, dim3(1), dim3(1025), 0, 0, d, d, 4);
    cudaError_t e1 = cudaGetLastError();
    launch_kernel(bf16_kernel, dim3(0), dim3(32), 0, 0, d, d, 4);
    cudaError_t e2 = cudaGetLastError();
    launch_kernel(dynamic_smem_kernel, dim3(1), dim3(32), 64 * 1024, 0, d, 32); // 64 KB without cudaFuncSetAttribute
    cudaError_t e3 = cudaGetLastError();
    cudaError_t e4 = cudaGetLastError();
    check(e1 == cudaErrorInvalidConfiguration && e2 == cudaErrorInvalidConfiguration && e3 == cudaErrorInvalidConfiguration && e4 == cudaSuccess,
          "emu/broken/bad_launch_configuration", "1025 threads: %s; an empty grid: %s; 64 KB of shared memory without the attribute: %s; then %s",
          cudaGetErrorName(e1), cudaGetErrorName(e2), cudaGetErrorName(e3), cudaGetErrorName(e4));
    cudaFree(d);
#ifdef EMU_ASAN
    check_sanitizer_catches("emu/asan/global_overrun", run_global_overrun, "heap-buffer-overflow");
    check_sanitizer_catches("emu/asan/dynamic_shared_overrun", run_shared_overrun, "heap-buffer-overflow");
#else
    (void)run_global_overrun; (void)run_shared_overrun; (void)check_sanitizer_catches;
#endif
}

// the cost of one switch into a fiber and back (printed, not checked: timings are benchmarks)
__global__ void empty_barrier_kernel(int rounds) {
    for (int r = 0; r < rounds; r++) { __syncthreads(); }
}
static void print_switch_cost(void) {
    int rounds = 200;
    double t0 = now_seconds();
    launch_kernel(empty_barrier_kernel, dim3(1), dim3(1024), 0, 0, rounds);
    double t = now_seconds() - t0;
    printf("     emu: %.0f ns per fiber switch round trip (%d barriers of 1024 threads in %.1f ms)\n", 1e9 * t / (1024.0 * rounds), rounds, 1e3 * t);
}
#endif

int main(void) {
#ifdef CUDA_EMULATION
    for (int o = 0; o < 3; o++) {
        emu_set_order((emu::Order)o, 11);
        emu_set_parallel_blocks(o == 2 ? 2 : 1); // blocks on two OS threads in one of the orders
        test_correct_kernels(order_names[o]);
    }
    emu_set_order(emu::ORDER_FORWARD, 1);
    emu_set_parallel_blocks(1);
    test_bf16();
    test_broken_kernels();
    print_switch_cost();
#else
    test_correct_kernels("gpu");
    test_bf16();
#endif
    return test_summary();
}

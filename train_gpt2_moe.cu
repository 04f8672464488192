/*
GPT-2 with Mixture-of-Experts layers: the GPU trainer (CUDA, bf16 with fp32 master weights).

The twin of train_gpt2_moe.c, kernel for layer: the same flags, checkpoints, data, logs and
samples (the host code is the shared headers'), with each layer's forward and backward as CUDA
kernels, in the order data flows, and every matrix multiply through matmul.cuh (cuBLASLt). This
version trains dense GPT-2 (E = 1) on one GPU; MoE layers and expert parallelism over NCCL are
the next step, and the trainer says so when asked for them.

Per layer l, for the N = B*T tokens (shapes in the comments):
  layernorm_forward             ln1 = LN(residual)               (the first: after the encoder)
  matmul_forward                qkv = ln1 @ qkvw^T + qkvb        (cuBLASLt, bias epilogue)
  attention_forward             causal softmax(q k^T / sqrt(hs)) v, one warp per query row
  matmul_forward                the attention projection
  residual_layernorm_forward    residual2 = residual + proj; ln2 = LN(residual2)
  matmul_forward                fch_gelu = gelu(ln2 @ fcw^T + fcb), fch kept (GELU epilogue)
  matmul_forward                the MLP projection
  residual_layernorm_forward    residual3 = residual2 + proj; the next layer's ln1 (or lnf)
then logits = lnf @ wte^T, and classifier_forward (softmax, cross-entropy). The backward runs it
in reverse: classifier_backward writes the logits' gradient over them, matmul_backward (with the
GELU's backward as an epilogue), layernorm_backward (into the residual stream's gradient),
attention_backward, encoder_backward; then the global norm, clipping and AdamW.

Precision: parameters, activations and gradients are floatX (bf16; float with PRECISION=FP32,
for the tests), with fp32 master weights and AdamW moments in the bf16 build; every sum, norm and
softmax is computed in fp32. Every reduction has a fixed order (no float atomics), so two runs
give the same bits. Activations are written (=); parameter gradients accumulate (+=), and so does
the gradient of the residual stream.

Builds: `make train_gpt2_moe` (nvcc, sm_80 and sm_90); `make train_gpt2_moe_emu` (the same file
through the CPU emulation, dev/cuda/cuda_emu.h: every kernel runs on the CPU). See README.md.
*/
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "cuda_common.h" // defines: floatX, launch_kernel, cudaCheck, CEIL_DIV; CUDA or its CPU emulation
#include "matmul.cuh"    // defines: matmul_forward, matmul_backward (cuBLASLt, or its CPU body)
#include "utils.h"       // defines: fail_exit, printf0, mallocCheck, now_seconds, random_f32
#include "comm.h"        // defines: Comm, comm_init, comm_check_all, mean_over_ranks
#include "model.h"       // defines: GPT2Config, PARAMETER_TENSORS_OF, checkpoint_save, TrainState, ...
#include "dataloader.h"  // defines: DataLoader, dataloader_next_batch, ...
#include "tokenizer.h"   // defines: Tokenizer
#include "train.h"       // defines: TrainArgs, parse_args, run_start, StepStats, log_step, sample_mult, ...

// ----------------------------------------------------------------------------
// the model on the GPU: parameters, activations, gradient scratch

typedef PARAMETER_TENSORS_OF(floatX) ParameterTensorsX;

// what the forward keeps for the backward, for N = B*T tokens (L layers)
typedef struct {
    floatX* encoded;   // (B, T, C)
    floatX* ln1;       // (L, B, T, C)
    float* ln1_mean;   // (L, B, T)
    float* ln1_rstd;   // (L, B, T)
    floatX* qkv;       // (L, B, T, 3*C)
    floatX* atty;      // (L, B, T, C)
    floatX* att;       // (L, B, NH, T, T) softmax probabilities, 0 above the diagonal
    floatX* residual2; // (L, B, T, C)
    floatX* ln2;       // (L, B, T, C)
    float* ln2_mean;   // (L, B, T)
    float* ln2_rstd;   // (L, B, T)
    floatX* fch;       // (L, B, T, 4*C) before the GELU
    floatX* fch_gelu;  // (L, B, T, 4*C)
    floatX* residual3; // (L, B, T, C)
    floatX* lnf;       // (B, T, C)
    float* lnf_mean;   // (B, T)
    float* lnf_rstd;   // (B, T)
    floatX* logits;    // (B, T, Vp), then their gradient (written over them)
    float* losses;     // (B, T)
    floatX* proj;      // (B, T, C) scratch: a projection's output, before the residual add
} ActivationTensors;

// gradients of activations, reused by every layer of the backward
typedef struct {
    floatX* dresidual; // (B, T, C) the gradient in the residual stream (accumulates)
    floatX* dln;       // (B, T, C) at a layernorm's output
    floatX* datty;     // (B, T, C)
    floatX* dqkv;      // (B, T, 3*C)
    floatX* dfch;      // (B, T, 4*C)
    float* dpreatt;    // (B, NH, T, T) attention scores' gradient
    float* bias_parts; // (BIAS_BACKWARD_PARTS, Vp) matmul_backward's bias partial sums
    float* ln_parts;   // (LN_PARTS, 2*C) layernorm_backward's weight and bias partial sums
} GradScratch;

// positions of the batch grouped by token, for a deterministic embedding backward (host-built)
typedef struct {
    int* tokens;    // (N) the distinct tokens of the batch, ascending
    int* starts;    // (N+1) positions of tokens[k]: positions[starts[k] .. starts[k+1])
    int* positions; // (N) ascending within a token
    int count;      // distinct tokens
} TokenBuckets;

#define NORM_BLOCKS 256 // partial sums of the gradient norm: a fixed grid, so a fixed order
#define LN_PARTS 64     // layernorm_backward's row groups: a fixed grid, so a fixed order

typedef struct {
    GPT2Config config;
    Comm comm;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    size_t num_parameters;
    ParameterTensorsX params;  // device, floatX
    floatX* params_memory;
    ParameterTensorsX grads;   // device, floatX
    floatX* grads_memory;
    float* master;             // (num_parameters) fp32 master weights of the bf16 build; NULL in fp32
    float* m_memory;           // (num_parameters) AdamW moments, device, fp32
    float* v_memory;
    // activations for B x T tokens, allocated at the first forward
    ActivationTensors acts;
    GradScratch g;
    void* acts_memory;
    void* grad_scratch_memory;
    int batch_size, seq_len;
    int* inputs;               // (B, T) device
    int* targets;              // (B, T) device
    int* host_inputs;          // (B, T) of the last forward
    TokenBuckets buckets;      // device
    TokenBuckets host_buckets; // host (and host_bucket_counts (Vp))
    int* host_bucket_counts;
    float* host_losses;        // (B, T)
    float* norm_parts;         // (NORM_BLOCKS) device
    float* host_norm_parts;
    float* host_params;        // (num_parameters) host staging for checkpoints, allocated when needed
    // MoE hyperparameters and results, as the CPU trainer's (a dense model has no MoE layer)
    float capacity_factor, aux_loss_weight, z_loss_weight;
    float mean_loss, lb_loss, z_loss, total_loss; // of the last forward; mean_loss -1 without targets
    MoEStats stats;
} GPT2;

// ----------------------------------------------------------------------------
// reductions inside a warp and a block (fixed trees: results do not depend on timing)

__device__ inline float warp_sum(float v) {
    for (int off = 16; off > 0; off /= 2) { v += __shfl_xor_sync(0xffffffffu, v, off); }
    return v;
}
__device__ inline float warp_max(float v) {
    for (int off = 16; off > 0; off /= 2) { v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off)); }
    return v;
}
// every thread of the block gets the sum (or max); shared holds 32 floats; blockDim.x % 32 == 0
__device__ inline float block_reduce(float v, float* shared, int is_max) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = is_max ? warp_max(v) : warp_sum(v);
    __syncthreads(); // shared may still be read by an earlier reduction
    if (lane == 0) { shared[warp] = v; }
    __syncthreads();
    float w = lane < warps ? shared[lane] : (is_max ? -INFINITY : 0.0f);
    return is_max ? warp_max(w) : warp_sum(w);
}

// ----------------------------------------------------------------------------
// encoder: token plus position embeddings

#define GRID_STRIDE_BLOCKS 1024 // elementwise kernels loop over their elements with at most this many blocks
static inline dim3 grid_for(size_t n, int block) { size_t g = CEIL_DIV(n, (size_t)block); return dim3(g < GRID_STRIDE_BLOCKS ? (unsigned)g : GRID_STRIDE_BLOCKS); }

__global__ void encoder_forward_kernel(floatX* out, const int* inp, const floatX* wte, const floatX* wpe, int N, int T, int C) { // (N,C), (N), (Vp,C), (maxT,C)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)N * C; i += (size_t)gridDim.x * blockDim.x) {
        int n = (int)(i / C), c = (int)(i % C);
        out[i] = (floatX)((float)wte[(size_t)inp[n] * C + c] + (float)wpe[(size_t)(n % T) * C + c]);
    }
}

// dwpe (maxT, C) += dout summed over the batch: one thread per (t, c), rows b = 0..B-1 in order
__global__ void encoder_backward_wpe_kernel(floatX* dwpe, const floatX* dout, int B, int T, int C) { // (maxT,C), (B,T,C)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)T * C; i += (size_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < B; b++) { s += (float)dout[(size_t)b * T * C + i]; }
        dwpe[i] = (floatX)((float)dwpe[i] + s);
    }
}

// dwte (Vp, C) += dout of every position of a token: one thread per (distinct token, c), its
// positions in ascending order (no atomics: each row of dwte has one writer)
__global__ void encoder_backward_wte_kernel(floatX* dwte, const floatX* dout, const int* tokens, const int* starts, // (Vp,C), (N,C), (count), (count+1)
                                            const int* positions, int count, int C) {                           // (N)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)count * C; i += (size_t)gridDim.x * blockDim.x) {
        int k = (int)(i / C), c = (int)(i % C);
        float s = 0.0f;
        for (int p = starts[k]; p < starts[k + 1]; p++) { s += (float)dout[(size_t)positions[p] * C + c]; }
        floatX* w = dwte + (size_t)tokens[k] * C + c;
        *w = (floatX)((float)*w + s);
    }
}

// groups the N positions of inp by token (a counting sort on the host); counts (Vp) is scratch
static void token_buckets(TokenBuckets* b, int* counts, const int* inp, int N, int Vp) {
    memset(counts, 0, Vp * sizeof(int));
    for (int i = 0; i < N; i++) { counts[inp[i]]++; }
    b->count = 0;
    int at = 0;
    for (int v = 0; v < Vp; v++) {
        if (counts[v] == 0) { continue; }
        b->tokens[b->count] = v;
        b->starts[b->count++] = at;
        int n = counts[v];
        counts[v] = at; // where token v's next position goes
        at += n;
    }
    b->starts[b->count] = at;
    for (int i = 0; i < N; i++) { b->positions[counts[inp[i]]++] = i; }
}

// ----------------------------------------------------------------------------
// layernorm, and the residual add fused in front of it

// one warp per row: mean, then variance (two passes, as the CPU trainer), then the row
__device__ inline void layernorm_row(floatX* out, float* mean, float* rstd, const floatX* x, const floatX* weight, const floatX* bias, int C, int lane) {
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) { s += (float)x[c]; }
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = (float)x[c] - m; v += d * d; }
    float r = 1.0f / sqrtf(warp_sum(v) / C + 1e-5f);
    for (int c = lane; c < C; c += 32) { out[c] = (floatX)((r * ((float)x[c] - m)) * (float)weight[c] + (float)bias[c]); }
    if (lane == 0) { *mean = m; *rstd = r; }
}

__global__ void layernorm_forward_kernel(floatX* out, float* mean, float* rstd, // (N,C), (N), (N)
                                         const floatX* inp, const floatX* weight, const floatX* bias, int N, int C) { // (N,C), (C), (C)
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) { return; } // whole warps leave
    layernorm_row(out + (size_t)row * C, mean + row, rstd + row, inp + (size_t)row * C, weight, bias, C, threadIdx.x % 32);
}

// residual = inp1 + inp2, then out = LN(residual): one warp per row
__global__ void residual_layernorm_forward_kernel(floatX* residual, floatX* out, float* mean, float* rstd, // (N,C), (N,C), (N), (N)
                                                  const floatX* inp1, const floatX* inp2,                // (N,C), (N,C)
                                                  const floatX* weight, const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) { return; }
    size_t at = (size_t)row * C;
    for (int c = lane; c < C; c += 32) { residual[at + c] = (floatX)((float)inp1[at + c] + (float)inp2[at + c]); }
    layernorm_row(out + at, mean + row, rstd + row, residual + at, weight, bias, C, lane); // each lane reads what it wrote
}

// dinp (N,C) += the input gradient (the residual stream's), per row by one warp; dweight and
// dbias (C) += their row sums, in two steps with a fixed order: block k (one warp) sums rows
// k, k + LN_PARTS, ... into parts[k] (2C: dweight then dbias), then layernorm_backward_finish
__global__ void layernorm_backward_kernel(floatX* dinp, float* parts,                                  // (N,C), (LN_PARTS,2C)
                                          const floatX* dout, const floatX* inp, const floatX* weight,   // (N,C), (N,C), (C)
                                          const float* mean, const float* rstd, int N, int C) {          // (N), (N)
    EMU_DYNAMIC_SHARED(float, ln_sums); // (2C) this block's sums of dweight and dbias
    int lane = threadIdx.x;
    for (int c = lane; c < C; c += 32) { ln_sums[c] = 0.0f; ln_sums[C + c] = 0.0f; } // lane owns channels c: both sums
    for (int row = blockIdx.x; row < N; row += gridDim.x) {
        const floatX* dout_r = dout + (size_t)row * C;
        const floatX* x = inp + (size_t)row * C;
        float m = mean[row], r = rstd[row];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int c = lane; c < C; c += 32) {
            float norm = ((float)x[c] - m) * r, dnorm = (float)weight[c] * (float)dout_r[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean = warp_sum(dnorm_mean) / C;
        dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
        for (int c = lane; c < C; c += 32) {
            float norm = ((float)x[c] - m) * r, d = (float)dout_r[c], dnorm = (float)weight[c] * d;
            ln_sums[c] += norm * d;   // each lane owns its channels: no race
            ln_sums[C + c] += d;
            floatX* di = dinp + (size_t)row * C + c;
            *di = (floatX)((float)*di + (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r);
        }
    }
    for (int c = lane; c < C; c += 32) {
        parts[(size_t)blockIdx.x * 2 * C + c] = ln_sums[c];
        parts[(size_t)blockIdx.x * 2 * C + C + c] = ln_sums[C + c];
    }
}

__global__ void layernorm_backward_finish_kernel(floatX* dweight, floatX* dbias, const float* parts, int C) { // (C), (C), (LN_PARTS,2C)
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) { return; }
    float dw = 0.0f, db = 0.0f;
    for (int k = 0; k < LN_PARTS; k++) { dw += parts[(size_t)k * 2 * C + c]; db += parts[(size_t)k * 2 * C + C + c]; }
    dweight[c] = (floatX)((float)dweight[c] + dw);
    dbias[c] = (floatX)((float)dbias[c] + db);
}

static void layernorm_backward(floatX* dinp, floatX* dweight, floatX* dbias, float* parts, const floatX* dout, const floatX* inp,
                               const floatX* weight, const float* mean, const float* rstd, int N, int C, cudaStream_t stream) {
    launch_kernel(layernorm_backward_kernel, dim3(LN_PARTS), dim3(32), 2 * C * sizeof(float), stream, dinp, parts, dout, inp, weight, mean, rstd, N, C);
    cudaCheck(cudaGetLastError());
    launch_kernel(layernorm_backward_finish_kernel, dim3(CEIL_DIV(C, 256)), dim3(256), 0, stream, dweight, dbias, parts, C);
    cudaCheck(cudaGetLastError());
}

// ----------------------------------------------------------------------------
// attention: one warp per query row (b, h, t); the scores of the row live in shared memory

#define ATT_WARPS 4 // warps per block: T floats of shared memory each

// the row (b, h, t) of (B, NH, T) this warp works on; 0 when the grid has more warps than rows
__device__ inline int attention_row(int B, int T, int NH, int* b, int* h, int* t) {
    int row = blockIdx.x * ATT_WARPS + threadIdx.x / 32;
    if (row >= B * NH * T) { return 0; }
    *t = row % T;
    *h = (row / T) % NH;
    *b = row / (T * NH);
    return 1;
}

__global__ void attention_forward_kernel(floatX* out, floatX* att, // (B,T,C), (B,NH,T,T)
                                         const floatX* qkv, int B, int T, int C, int NH) { // (B,T,3C) holding q, k, v
    EMU_DYNAMIC_SHARED(float, att_rows); // (ATT_WARPS, T)
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, b, h, t;
    if (!attention_row(B, T, NH, &b, &h, &t)) { return; } // whole warps leave
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    const floatX* q = qkv + ((size_t)b * T + t) * C3 + h * hs;
    float* s = att_rows + (size_t)warp * T;
    // scores q.k for t2 <= t (causal), each lane its own keys, and their max
    float maxval = -10000.0f;
    for (int t2 = lane; t2 <= t; t2 += 32) {
        const floatX* k = qkv + ((size_t)b * T + t2) * C3 + C + h * hs;
        float d = 0.0f;
        for (int i = 0; i < hs; i++) { d += (float)q[i] * (float)k[i]; }
        s[t2] = d * scale;
        maxval = fmaxf(maxval, s[t2]);
    }
    maxval = warp_max(maxval);
    // softmax over the row
    float sum = 0.0f;
    for (int t2 = lane; t2 <= t; t2 += 32) { s[t2] = expf(s[t2] - maxval); sum += s[t2]; }
    sum = warp_sum(sum);
    float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
    floatX* a = att + ((size_t)(b * NH + h) * T + t) * T;
    for (int t2 = lane; t2 < T; t2 += 32) {
        float p = t2 <= t ? s[t2] * inv : 0.0f;
        a[t2] = (floatX)p;
        if (t2 <= t) { s[t2] = p; }
    }
    __syncwarp(); // the weighted sum reads every lane's probabilities
    // out = sum over t2 of p * v, each lane its own channels
    floatX* o = out + ((size_t)b * T + t) * C + h * hs;
    for (int i = lane; i < hs; i += 32) {
        float acc = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) { acc += s[t2] * (float)qkv[((size_t)b * T + t2) * C3 + 2 * C + h * hs + i]; }
        o[i] = (floatX)acc;
    }
}

// backward, part 1, one warp per query row: datt = dout . v, the softmax's backward
// dpreatt = att * (datt - sum att datt) (stored), and dq = scale * dpreatt @ k
__global__ void attention_backward_query_kernel(floatX* dqkv, float* dpreatt,                          // (B,T,3C), (B,NH,T,T)
                                                const floatX* dout, const floatX* qkv, const floatX* att, // (B,T,C), (B,T,3C), (B,NH,T,T)
                                                int B, int T, int C, int NH) {
    int lane = threadIdx.x % 32, b, h, t;
    if (!attention_row(B, T, NH, &b, &h, &t)) { return; } // whole warps leave
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    const floatX* d = dout + ((size_t)b * T + t) * C + h * hs;
    const floatX* a = att + ((size_t)(b * NH + h) * T + t) * T;
    float* dp = dpreatt + ((size_t)(b * NH + h) * T + t) * T;
    float dot = 0.0f; // sum over t2 of att * datt
    for (int t2 = lane; t2 <= t; t2 += 32) {
        const floatX* v = qkv + ((size_t)b * T + t2) * C3 + 2 * C + h * hs;
        float datt = 0.0f;
        for (int i = 0; i < hs; i++) { datt += (float)v[i] * (float)d[i]; }
        dp[t2] = datt;
        dot += (float)a[t2] * datt;
    }
    dot = warp_sum(dot);
    for (int t2 = lane; t2 < T; t2 += 32) { dp[t2] = t2 <= t ? (float)a[t2] * (dp[t2] - dot) : 0.0f; }
    __syncwarp(); // dq reads every lane's dpreatt
    floatX* dq = dqkv + ((size_t)b * T + t) * C3 + h * hs;
    for (int i = lane; i < hs; i += 32) {
        float acc = 0.0f;
        for (int t2 = 0; t2 <= t; t2++) { acc += dp[t2] * (float)qkv[((size_t)b * T + t2) * C3 + C + h * hs + i]; }
        dq[i] = (floatX)(acc * scale);
    }
}

// backward, part 2, one warp per key row (b, h, t2): dk = scale * sum over t >= t2 of dpreatt q,
// dv = sum over t >= t2 of att dout. Each row of dk and dv has one writer: no atomics.
__global__ void attention_backward_key_kernel(floatX* dqkv, const float* dpreatt,                       // (B,T,3C), (B,NH,T,T)
                                              const floatX* dout, const floatX* qkv, const floatX* att,   // (B,T,C), (B,T,3C), (B,NH,T,T)
                                              int B, int T, int C, int NH) {
    int lane = threadIdx.x % 32, b, h, t2;
    if (!attention_row(B, T, NH, &b, &h, &t2)) { return; }
    int C3 = 3 * C, hs = C / NH;
    float scale = 1.0f / sqrtf((float)hs);
    size_t head = (size_t)(b * NH + h) * T * T;
    for (int i = lane; i < hs; i += 32) {
        float dk = 0.0f, dv = 0.0f;
        for (int t = t2; t < T; t++) {
            dk += dpreatt[head + (size_t)t * T + t2] * (float)qkv[((size_t)b * T + t) * C3 + h * hs + i];
            dv += (float)att[head + (size_t)t * T + t2] * (float)dout[((size_t)b * T + t) * C + h * hs + i];
        }
        dqkv[((size_t)b * T + t2) * C3 + C + h * hs + i] = (floatX)(dk * scale);
        dqkv[((size_t)b * T + t2) * C3 + 2 * C + h * hs + i] = (floatX)dv;
    }
}

// ----------------------------------------------------------------------------
// the classifier: softmax over the first V of Vp logits, cross-entropy, and its backward

// one block per row: the max and the sum of exponentials over v < V
__device__ inline void softmax_stats(const floatX* x, int V, float* shared, float* maxval, float* sum) {
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { m = fmaxf(m, (float)x[v]); }
    m = block_reduce(m, shared, 1);
    float s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) { s += expf((float)x[v] - m); }
    *sum = block_reduce(s, shared, 0);
    *maxval = m;
}

__global__ void classifier_forward_kernel(float* losses, const floatX* logits, const int* targets, int V, int Vp) { // (N), (N,Vp), (N)
    __shared__ float shared[32];
    const floatX* x = logits + (size_t)blockIdx.x * Vp;
    float m, s;
    softmax_stats(x, V, shared, &m, &s);
    if (threadIdx.x == 0) { losses[blockIdx.x] = -logf(expf((float)x[targets[blockIdx.x]] - m) / s); }
}

// the gradient of the mean loss times dloss, written over the logits: (softmax - onehot) * dloss
// for v < V, 0 in the padding
__global__ void classifier_backward_kernel(floatX* logits, const int* targets, float dloss, int V, int Vp) { // (N,Vp), (N)
    __shared__ float shared[32];
    floatX* x = logits + (size_t)blockIdx.x * Vp;
    float m, s;
    softmax_stats(x, V, shared, &m, &s); // every read of x happens before any write (barriers inside)
    int target = targets[blockIdx.x];
    for (int v = threadIdx.x; v < Vp; v += blockDim.x) {
        float p = v < V ? expf((float)x[v] - m) / s : 0.0f;
        float indicator = v == target ? 1.0f : 0.0f;
        x[v] = (floatX)(v < V ? (p - indicator) * dloss : 0.0f);
    }
}

// ----------------------------------------------------------------------------
// the optimizer: the gradient norm, AdamW, and the fp32 -> floatX copy of the weights

// parts[block] = the sum of squares of this block's elements (a fixed grid: a fixed order)
__global__ void sum_squares_kernel(float* parts, const floatX* x, size_t n) { // (NORM_BLOCKS), (n)
    __shared__ float shared[32];
    float s = 0.0f;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) { float g = (float)x[i]; s += g * g; }
    s = block_reduce(s, shared, 0);
    if (threadIdx.x == 0) { parts[blockIdx.x] = s; }
}

// AdamW on n parameters with decoupled weight decay wd; the fp32 master weights are the truth
// when there are any (bf16 build), else the parameters themselves (fp32 build)
__global__ void adamw_kernel(floatX* params, float* master, const floatX* grads, float* m, float* v, size_t n,
                             float lr, float beta1, float beta2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float param = master != NULL ? master[i] : (float)params[i];
        float grad = (float)grads[i] * grad_scale;
        float mi = beta1 * m[i] + (1.0f - beta1) * grad;
        float vi = beta2 * v[i] + (1.0f - beta2) * grad * grad;
        m[i] = mi;
        v[i] = vi;
        float m_hat = mi / bc1, v_hat = vi / bc2;
        param -= lr * (m_hat / (sqrtf(v_hat) + eps) + wd * param);
        if (master != NULL) { master[i] = param; }
        params[i] = (floatX)param;
    }
}

__global__ void copy_to_floatX_kernel(floatX* out, const float* in, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) { out[i] = (floatX)in[i]; }
}

// ----------------------------------------------------------------------------
// building the model: parameters on the GPU, activations at the first forward

// cudaMalloc that says, when the GPU is full, how much what needed and what to lower
static void* gpu_alloc(size_t bytes, const char* what, const char* lower) {
    void* p;
    if (cudaMalloc(&p, bytes) != cudaSuccess) { fail_exit("out of GPU memory: %s need %.1f MB (%s)", what, bytes / 1e6, lower); }
    return p;
}

// a dense model of this config for this process, from host_params (count_parameters floats: the
// model a run starts from, train.h's run_start); the host copy is not kept
static void gpt2_build(GPT2* model, const GPT2Config* config, const float* host_params, Comm comm) {
    memset(model, 0, sizeof(GPT2));
    if (config->num_experts > 1) {
        fail_exit("flag -E: MoE layers on the GPU are the next step of this trainer; it trains dense models (E = 1) for now");
    }
    if (comm.world > 1) { fail_exit("several processes: expert parallelism over NCCL is the next step of the GPU trainer; run one process"); }
    if (config->channels % 8 != 0 || config->padded_vocab_size % 8 != 0) {
        fail_exit("model: C=%d and Vp=%d must be multiples of 8 for the GPU's matrix multiplies", config->channels, config->padded_vocab_size);
    }
    model->config = *config;
    model->comm = comm;
    fill_in_parameter_sizes(model->param_sizes, config, 0);
    size_t n = count_parameters(model->param_sizes);
    model->num_parameters = n;
    model->params_memory = (floatX*)gpu_alloc(n * sizeof(floatX), "the parameters", "a smaller model: -e");
    model->grads_memory = (floatX*)gpu_alloc(n * sizeof(floatX), "the gradients", "a smaller model: -e");
    point_parameters_of(&model->params, model->params_memory, model->param_sizes, sizeof(floatX));
    point_parameters_of(&model->grads, model->grads_memory, model->param_sizes, sizeof(floatX));
    // the fp32 weights on the device: the master copy (bf16), or converted once (fp32)
    float* staging = (float*)gpu_alloc(n * sizeof(float), "the fp32 master weights", "a smaller model: -e");
    cudaCheck(cudaMemcpy(staging, host_params, n * sizeof(float), cudaMemcpyHostToDevice));
    launch_kernel(copy_to_floatX_kernel, grid_for(n, 256), dim3(256), 0, 0, model->params_memory, staging, n);
    cudaCheck(cudaGetLastError());
    if (sizeof(floatX) == sizeof(float)) { cudaCheck(cudaFree(staging)); } else { model->master = staging; }
    cudaCheck(cudaMemset(model->grads_memory, 0, n * sizeof(floatX)));
    cudaCheck(cudaMalloc((void**)&model->norm_parts, NORM_BLOCKS * sizeof(float)));
    model->host_norm_parts = (float*)mallocCheck(NORM_BLOCKS * sizeof(float));
    model->aux_loss_weight = 0.01f;
    model->z_loss_weight = 0.001f;
    model->mean_loss = -1.0f;
}

// AdamW's moments on the device: zeros, or a resumed run's (host, count_parameters floats each)
static void gpt2_set_moments(GPT2* model, const float* m, const float* v) {
    size_t n = model->num_parameters;
    model->m_memory = (float*)gpu_alloc(n * sizeof(float), "AdamW's moments", "a smaller model: -e");
    model->v_memory = (float*)gpu_alloc(n * sizeof(float), "AdamW's moments", "a smaller model: -e");
    if (m != NULL) {
        cudaCheck(cudaMemcpy(model->m_memory, m, n * sizeof(float), cudaMemcpyHostToDevice));
        cudaCheck(cudaMemcpy(model->v_memory, v, n * sizeof(float), cudaMemcpyHostToDevice));
    } else {
        cudaCheck(cudaMemset(model->m_memory, 0, n * sizeof(float)));
        cudaCheck(cudaMemset(model->v_memory, 0, n * sizeof(float)));
    }
}

// carves one allocation into tensors of these byte sizes, each 256-byte aligned; returns it
static void* carve(void** ptrs[], const size_t* bytes, int count, const char* what) {
    size_t total = 0;
    for (int i = 0; i < count; i++) { total += CEIL_DIV(bytes[i], 256) * 256; }
    char* memory = (char*)gpu_alloc(total, what, "lower -b or -t");
    char* at = memory;
    for (int i = 0; i < count; i++) { *ptrs[i] = at; at += CEIL_DIV(bytes[i], 256) * 256; }
    return memory;
}

static void gpt2_allocate_activations(GPT2* model, int B, int T) {
    const GPT2Config* c = &model->config;
    size_t L = c->num_layers, C = c->channels, NH = c->num_heads, Vp = c->padded_vocab_size, N = (size_t)B * T, X = sizeof(floatX), F = sizeof(float);
    model->batch_size = B;
    model->seq_len = T;
    ActivationTensors* a = &model->acts;
    void** aptrs[] = {(void**)&a->encoded, (void**)&a->ln1, (void**)&a->ln1_mean, (void**)&a->ln1_rstd, (void**)&a->qkv, (void**)&a->atty,
                      (void**)&a->att, (void**)&a->residual2, (void**)&a->ln2, (void**)&a->ln2_mean, (void**)&a->ln2_rstd, (void**)&a->fch,
                      (void**)&a->fch_gelu, (void**)&a->residual3, (void**)&a->lnf, (void**)&a->lnf_mean, (void**)&a->lnf_rstd,
                      (void**)&a->logits, (void**)&a->losses, (void**)&a->proj};
    size_t abytes[] = {N * C * X, L * N * C * X, L * N * F, L * N * F, L * N * 3 * C * X, L * N * C * X,
                       L * B * NH * T * T * X, L * N * C * X, L * N * C * X, L * N * F, L * N * F, L * N * 4 * C * X,
                       L * N * 4 * C * X, L * N * C * X, N * C * X, N * F, N * F,
                       N * Vp * X, N * F, N * C * X};
    model->acts_memory = carve(aptrs, abytes, 20, "the activations");
    GradScratch* g = &model->g;
    void** gptrs[] = {(void**)&g->dresidual, (void**)&g->dln, (void**)&g->datty, (void**)&g->dqkv, (void**)&g->dfch, (void**)&g->dpreatt,
                      (void**)&g->bias_parts, (void**)&g->ln_parts};
    size_t gbytes[] = {N * C * X, N * C * X, N * C * X, N * 3 * C * X, N * 4 * C * X, B * NH * T * T * F,
                       BIAS_BACKWARD_PARTS * (Vp > 4 * C ? Vp : 4 * C) * F, LN_PARTS * 2 * C * F};
    model->grad_scratch_memory = carve(gptrs, gbytes, 8, "the gradient scratch");
    cudaCheck(cudaMalloc((void**)&model->inputs, N * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&model->targets, N * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&model->buckets.tokens, (3 * N + 1) * sizeof(int)));
    model->buckets.starts = model->buckets.tokens + N;
    model->buckets.positions = model->buckets.starts + N + 1;
    model->host_buckets.tokens = (int*)mallocCheck((3 * N + 1) * sizeof(int));
    model->host_buckets.starts = model->host_buckets.tokens + N;
    model->host_buckets.positions = model->host_buckets.starts + N + 1;
    model->host_bucket_counts = (int*)mallocCheck(Vp * sizeof(int));
    model->host_inputs = (int*)mallocCheck(N * sizeof(int));
    model->host_losses = (float*)mallocCheck(N * sizeof(float));
}

// ----------------------------------------------------------------------------
// forward, backward, update

void gpt2_forward(GPT2* model, const int* inputs, const int* targets, int B, int T) {
    const GPT2Config* cfg = &model->config;
    int V = cfg->vocab_size, Vp = cfg->padded_vocab_size, L = cfg->num_layers, NH = cfg->num_heads, C = cfg->channels;
    int N = B * T;
    for (int i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V) { fail_exit("gpt2_forward: input token %d out of range [0, %d)", inputs[i], V); }
        if (targets != NULL && (targets[i] < 0 || targets[i] >= V)) { fail_exit("gpt2_forward: target token %d out of range [0, %d)", targets[i], V); }
    }
    if (model->acts_memory == NULL) {
        gpt2_allocate_activations(model, B, T);
    } else if ((size_t)N > (size_t)model->batch_size * model->seq_len || T > model->seq_len) {
        fail_exit("gpt2_forward: B=%d T=%d exceed the allocated B=%d T=%d", B, T, model->batch_size, model->seq_len);
    }
    memcpy(model->host_inputs, inputs, N * sizeof(int));
    cudaCheck(cudaMemcpy(model->inputs, inputs, N * sizeof(int), cudaMemcpyHostToDevice));
    if (targets != NULL) { cudaCheck(cudaMemcpy(model->targets, targets, N * sizeof(int), cudaMemcpyHostToDevice)); }
    memset(&model->stats, 0, sizeof(MoEStats));
    ParameterTensorsX p = model->params;
    ActivationTensors a = model->acts;
    cudaStream_t s = 0;
    dim3 rows_grid(CEIL_DIV(N, 8)), rows_block(256); // layernorms: one warp per row, 8 rows per block
    dim3 att_grid(CEIL_DIV(B * NH * T, ATT_WARPS)), att_block(32 * ATT_WARPS);
    size_t att_smem = ATT_WARPS * T * sizeof(float);

    launch_kernel(encoder_forward_kernel, grid_for((size_t)N * C, 256), dim3(256), 0, s, a.encoded, model->inputs, p.wte, p.wpe, N, T, C);
    cudaCheck(cudaGetLastError());
    launch_kernel(layernorm_forward_kernel, rows_grid, rows_block, 0, s, a.ln1, a.ln1_mean, a.ln1_rstd, a.encoded, p.ln1w, p.ln1b, N, C);
    cudaCheck(cudaGetLastError());
    for (int l = 0; l < L; l++) {
        size_t lNC = (size_t)l * N * C;
        floatX* residual = l == 0 ? a.encoded : a.residual3 + lNC - (size_t)N * C;
        floatX* l_qkv = a.qkv + 3 * lNC;
        floatX* l_atty = a.atty + lNC;
        floatX* l_att = a.att + (size_t)l * B * NH * T * T;
        floatX* l_fch = a.fch + 4 * lNC;
        floatX* l_fch_gelu = a.fch_gelu + 4 * lNC;
        matmul_forward(l_qkv, a.ln1 + lNC, p.qkvw + (size_t)l * 3 * C * C, p.qkvb + (size_t)l * 3 * C, N, C, 3 * C, NULL, s);
        launch_kernel(attention_forward_kernel, att_grid, att_block, att_smem, s, l_atty, l_att, l_qkv, B, T, C, NH);
        cudaCheck(cudaGetLastError());
        matmul_forward(a.proj, l_atty, p.attprojw + (size_t)l * C * C, p.attprojb + (size_t)l * C, N, C, C, NULL, s);
        launch_kernel(residual_layernorm_forward_kernel, rows_grid, rows_block, 0, s, a.residual2 + lNC, a.ln2 + lNC, a.ln2_mean + (size_t)l * N,
                      a.ln2_rstd + (size_t)l * N, residual, a.proj, p.ln2w + (size_t)l * C, p.ln2b + (size_t)l * C, N, C);
        cudaCheck(cudaGetLastError());
        matmul_forward(l_fch_gelu, a.ln2 + lNC, p.fcw + (size_t)l * 4 * C * C, p.fcb + (size_t)l * 4 * C, N, C, 4 * C, l_fch, s);
        matmul_forward(a.proj, l_fch_gelu, p.fcprojw + (size_t)l * C * 4 * C, p.fcprojb + (size_t)l * C, N, 4 * C, C, NULL, s);
        // the residual add, and the layernorm that follows it: the next layer's ln1, or lnf
        int last = l == L - 1;
        launch_kernel(residual_layernorm_forward_kernel, rows_grid, rows_block, 0, s, a.residual3 + lNC,
                      last ? a.lnf : a.ln1 + lNC + (size_t)N * C, last ? a.lnf_mean : a.ln1_mean + (size_t)(l + 1) * N,
                      last ? a.lnf_rstd : a.ln1_rstd + (size_t)(l + 1) * N, a.residual2 + lNC, a.proj,
                      last ? p.lnfw : p.ln1w + (size_t)(l + 1) * C, last ? p.lnfb : p.ln1b + (size_t)(l + 1) * C, N, C);
        cudaCheck(cudaGetLastError());
    }
    matmul_forward(a.logits, a.lnf, p.wte, NULL, N, C, Vp, NULL, s);
    model->lb_loss = 0.0f;
    model->z_loss = 0.0f;
    if (targets != NULL) {
        launch_kernel(classifier_forward_kernel, dim3(N), dim3(512), 0, s, a.losses, a.logits, model->targets, V, Vp);
        cudaCheck(cudaGetLastError());
        cudaCheck(cudaMemcpy(model->host_losses, a.losses, N * sizeof(float), cudaMemcpyDeviceToHost));
        double mean_loss = 0.0;
        for (int i = 0; i < N; i++) { mean_loss += model->host_losses[i]; }
        model->mean_loss = (float)(mean_loss / N);
        model->total_loss = model->mean_loss;
    } else {
        model->mean_loss = -1.0f;
        model->total_loss = -1.0f;
    }
}

void gpt2_zero_grad(GPT2* model) {
    cudaCheck(cudaMemset(model->grads_memory, 0, model->num_parameters * sizeof(floatX)));
}

// the backward of the last forward's loss times loss_scale (1 / gradient accumulation steps);
// parameter gradients accumulate
void gpt2_backward(GPT2* model, float loss_scale) {
    if (model->mean_loss == -1.0f) { fail_exit("gpt2_backward: the forward pass had no targets"); }
    const GPT2Config* cfg = &model->config;
    int B = model->batch_size, T = model->seq_len; // the full allocation: training uses it
    int V = cfg->vocab_size, Vp = cfg->padded_vocab_size, L = cfg->num_layers, NH = cfg->num_heads, C = cfg->channels;
    int N = B * T;
    ParameterTensorsX p = model->params, g = model->grads;
    ActivationTensors a = model->acts;
    GradScratch d = model->g;
    cudaStream_t s = 0;
    dim3 att_grid(CEIL_DIV(B * NH * T, ATT_WARPS)), att_block(32 * ATT_WARPS);

    launch_kernel(classifier_backward_kernel, dim3(N), dim3(512), 0, s, a.logits, model->targets, loss_scale / N, V, Vp);
    cudaCheck(cudaGetLastError());
    floatX* dlogits = a.logits;
    matmul_backward(d.dln, g.wte, NULL, dlogits, a.lnf, p.wte, d.bias_parts, N, C, Vp, NULL, s);
    cudaCheck(cudaMemset(d.dresidual, 0, (size_t)N * C * sizeof(floatX)));
    layernorm_backward(d.dresidual, g.lnfw, g.lnfb, d.ln_parts, d.dln, a.residual3 + (size_t)(L - 1) * N * C, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C, s);
    for (int l = L - 1; l >= 0; l--) {
        size_t lNC = (size_t)l * N * C;
        floatX* residual = l == 0 ? a.encoded : a.residual3 + lNC - (size_t)N * C;
        // MLP: dresidual holds the gradient of residual3 = residual2 + fcproj(gelu(fc(ln2)))
        matmul_backward(d.dfch, g.fcprojw + (size_t)l * C * 4 * C, g.fcprojb + (size_t)l * C, d.dresidual, a.fch_gelu + 4 * lNC,
                        p.fcprojw + (size_t)l * C * 4 * C, d.bias_parts, N, 4 * C, C, a.fch + 4 * lNC, s); // dfch is at the GELU's input
        matmul_backward(d.dln, g.fcw + (size_t)l * 4 * C * C, g.fcb + (size_t)l * 4 * C, d.dfch, a.ln2 + lNC, p.fcw + (size_t)l * 4 * C * C,
                        d.bias_parts, N, C, 4 * C, NULL, s);
        layernorm_backward(d.dresidual, g.ln2w + (size_t)l * C, g.ln2b + (size_t)l * C, d.ln_parts, d.dln, a.residual2 + lNC,
                           p.ln2w + (size_t)l * C, a.ln2_mean + (size_t)l * N, a.ln2_rstd + (size_t)l * N, N, C, s);
        // attention: dresidual now holds the gradient of residual2 = residual + attproj(attention(ln1))
        matmul_backward(d.datty, g.attprojw + (size_t)l * C * C, g.attprojb + (size_t)l * C, d.dresidual, a.atty + lNC,
                        p.attprojw + (size_t)l * C * C, d.bias_parts, N, C, C, NULL, s);
        launch_kernel(attention_backward_query_kernel, att_grid, att_block, 0, s, d.dqkv, d.dpreatt, d.datty, a.qkv + 3 * lNC,
                      a.att + (size_t)l * B * NH * T * T, B, T, C, NH);
        cudaCheck(cudaGetLastError());
        launch_kernel(attention_backward_key_kernel, att_grid, att_block, 0, s, d.dqkv, d.dpreatt, d.datty, a.qkv + 3 * lNC,
                      a.att + (size_t)l * B * NH * T * T, B, T, C, NH);
        cudaCheck(cudaGetLastError());
        matmul_backward(d.dln, g.qkvw + (size_t)l * 3 * C * C, g.qkvb + (size_t)l * 3 * C, d.dqkv, a.ln1 + lNC, p.qkvw + (size_t)l * 3 * C * C,
                        d.bias_parts, N, C, 3 * C, NULL, s);
        layernorm_backward(d.dresidual, g.ln1w + (size_t)l * C, g.ln1b + (size_t)l * C, d.ln_parts, d.dln, residual,
                           p.ln1w + (size_t)l * C, a.ln1_mean + (size_t)l * N, a.ln1_rstd + (size_t)l * N, N, C, s);
    }
    // the embeddings: dresidual is now the gradient of the encoder's output
    token_buckets(&model->host_buckets, model->host_bucket_counts, model->host_inputs, N, Vp);
    cudaCheck(cudaMemcpy(model->buckets.tokens, model->host_buckets.tokens, (3 * (size_t)N + 1) * sizeof(int), cudaMemcpyHostToDevice));
    launch_kernel(encoder_backward_wte_kernel, grid_for((size_t)model->host_buckets.count * C, 256), dim3(256), 0, s, g.wte, d.dresidual,
                  model->buckets.tokens, model->buckets.starts, model->buckets.positions, model->host_buckets.count, C);
    cudaCheck(cudaGetLastError());
    launch_kernel(encoder_backward_wpe_kernel, grid_for((size_t)T * C, 256), dim3(256), 0, s, g.wpe, d.dresidual, B, T, C);
    cudaCheck(cudaGetLastError());
}

// the global norm of every gradient: fp32 partial sums in a fixed grid, added in double on the host
float gpt2_grad_norm(GPT2* model) {
    launch_kernel(sum_squares_kernel, dim3(NORM_BLOCKS), dim3(256), 0, 0, model->norm_parts, model->grads_memory, model->num_parameters);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(model->host_norm_parts, model->norm_parts, NORM_BLOCKS * sizeof(float), cudaMemcpyDeviceToHost));
    double sum = 0.0;
    for (int i = 0; i < NORM_BLOCKS; i++) { sum += model->host_norm_parts[i]; }
    return (float)sqrt(sum);
}

// AdamW with decoupled weight decay on the matrices and embeddings, on the gradients times
// grad_scale (grad_clip_scale of the global norm); t is the 1-based step of the bias correction
void gpt2_update(GPT2* model, float learning_rate, float beta1, float beta2, float eps, float weight_decay, float grad_scale, int t) {
    if (model->m_memory == NULL) { gpt2_set_moments(model, NULL, NULL); }
    float bc1 = 1.0f - powf(beta1, t), bc2 = 1.0f - powf(beta2, t);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = model->param_sizes[k];
        if (n > 0) {
            float wd = param_decays(k) ? weight_decay : 0.0f;
            launch_kernel(adamw_kernel, grid_for(n, 256), dim3(256), 0, 0, model->params_memory + offset,
                          model->master != NULL ? model->master + offset : (float*)NULL, model->grads_memory + offset,
                          model->m_memory + offset, model->v_memory + offset, n, learning_rate, beta1, beta2, bc1, bc2, eps, wd, grad_scale);
            cudaCheck(cudaGetLastError());
        }
        offset += n;
    }
}

void gpt2_free(GPT2* model) {
    cudaCheck(cudaFree(model->params_memory));
    cudaCheck(cudaFree(model->grads_memory));
    cudaCheck(cudaFree(model->master));
    cudaCheck(cudaFree(model->m_memory));
    cudaCheck(cudaFree(model->v_memory));
    cudaCheck(cudaFree(model->acts_memory));
    cudaCheck(cudaFree(model->grad_scratch_memory));
    cudaCheck(cudaFree(model->inputs));
    cudaCheck(cudaFree(model->targets));
    cudaCheck(cudaFree(model->buckets.tokens));
    cudaCheck(cudaFree(model->norm_parts));
    free(model->host_buckets.tokens);
    free(model->host_bucket_counts);
    free(model->host_inputs);
    free(model->host_losses);
    free(model->host_norm_parts);
    free(model->host_params);
}

// ----------------------------------------------------------------------------
// checkpoints (model.h's formats), evaluation and sampling

// the fp32 weights on the host: the master copy (bf16 build) or the parameters (fp32 build)
const float* gpt2_host_params(GPT2* model) {
    size_t n = model->num_parameters;
    if (model->host_params == NULL) { model->host_params = (float*)mallocCheck(n * sizeof(float)); }
    cudaCheck(cudaMemcpy(model->host_params, model->master != NULL ? model->master : (float*)model->params_memory, n * sizeof(float), cudaMemcpyDeviceToHost));
    return model->host_params;
}

// the model and its training state of step s->step, in dir, in the CPU trainer's files
void gpt2_save(GPT2* model, const char* dir, const TrainState* s) {
    size_t n = model->num_parameters;
    const float* params = gpt2_host_params(model);
    float* mv = (float*)mallocCheck(2 * n * sizeof(float));
    if (model->m_memory != NULL) {
        cudaCheck(cudaMemcpy(mv, model->m_memory, n * sizeof(float), cudaMemcpyDeviceToHost));
        cudaCheck(cudaMemcpy(mv + n, model->v_memory, n * sizeof(float), cudaMemcpyDeviceToHost));
    } else {
        memset(mv, 0, 2 * n * sizeof(float));
    }
    checkpoint_save(dir, s, &model->config, params, mv, mv + n, model->param_sizes, &model->comm);
    free(mv);
}

// the mean loss over steps batches of loader from its start
double gpt2_validate(GPT2* model, DataLoader* loader, int steps) {
    double val_loss = 0.0;
    dataloader_reset(loader);
    for (int i = 0; i < steps; i++) {
        dataloader_next_batch(loader);
        gpt2_forward(model, loader->inputs, loader->targets, (int)loader->B, (int)loader->T);
        val_loss += model->mean_loss;
    }
    return mean_over_ranks(val_loss / steps, &model->comm);
}

// genT tokens after an end-of-text token, sampled on the host from the last position's logits
int gpt2_generate(GPT2* model, int* out, int genT, int eot, uint64_t* rng) {
    int V = model->config.vocab_size, Vp = model->config.padded_vocab_size;
    int maxT = model->seq_len < genT + 1 ? model->seq_len : genT + 1;
    int* tokens = (int*)mallocCheck(maxT * sizeof(int));
    floatX* row = (floatX*)mallocCheck(Vp * sizeof(floatX));
    float* probs = (float*)mallocCheck(V * sizeof(float));
    tokens[0] = eot;
    int made = 0;
    for (int t = 1; t < maxT; t++) {
        gpt2_forward(model, tokens, NULL, 1, t);
        cudaCheck(cudaMemcpy(row, model->acts.logits + (size_t)(t - 1) * Vp, Vp * sizeof(floatX), cudaMemcpyDeviceToHost));
        float maxval = -INFINITY, sum = 0.0f;
        for (int v = 0; v < V; v++) { maxval = fmaxf(maxval, (float)row[v]); }
        for (int v = 0; v < V; v++) { probs[v] = expf((float)row[v] - maxval); sum += probs[v]; }
        for (int v = 0; v < V; v++) { probs[v] /= sum; }
        tokens[t] = sample_mult(probs, V, random_f32(rng));
        out[made++] = tokens[t];
    }
    free(tokens); free(row); free(probs);
    return made;
}

// ----------------------------------------------------------------------------
// main training loop: the CPU trainer's, with the model on the GPU
#ifndef TESTING
int main(int argc, char** argv) {
    Comm comm = comm_init(&argc, &argv);
    int W = comm.world;
    TrainArgs args;
    parse_args(&args, argc, argv, &comm);

    // the model: resumed, loaded from a checkpoint (maybe upcycled) or initialised (train.h), then on the GPU
    RunStart start;
    run_start(&start, &args, &comm);
    check_batch_fits(&args, &start.config, W);
    if (args.lsh_L > 0 || args.sources > 1) { fail_exit("flags -J/-V: LSH compresses the MoE all-to-all, which the GPU trainer does not run yet"); }
    matmul_init();
    GPT2 model;
    gpt2_build(&model, &start.config, start.params, comm);
    if (start.m != NULL) { gpt2_set_moments(&model, start.m, start.v); }
    free(start.params); free(start.m); free(start.v);
    model.capacity_factor = args.capacity_factor;
    model.aux_loss_weight = args.aux_w;
    model.z_loss_weight = args.z_w;
    const GPT2Config* cfg = &model.config;
    int B = args.B, T = args.T;
    int grad_accum = args.total_batch / (B * T * W);

    // data, tokenizer, output folder and main.log
    DataLoader train_loader, val_loader;
    run_open_data(&train_loader, &val_loader, &args, &start, cfg->vocab_size, &comm);
    Tokenizer tokenizer;
    int have_tokenizer = run_open_tokenizer(&tokenizer, &args, &comm);
    RunLog log = run_log_open(&args, cfg, &start, &comm);
    char device[320];
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    snprintf(device, sizeof(device), "| device                | %s, %s", prop.name, PRECISION_NAME);
    print_run_table(&args, cfg, &start, W, train_loader.num_tokens, val_loader.num_tokens, device);

    TrainState state = start.state;
    int* gen_tokens = (int*)mallocCheck(args.genT * sizeof(int));
    long long load[1];
    for (int step = start.state.step; step <= args.max_steps; step++) {
        int last_step = step == args.max_steps;

        if (every_step(step, args.val_every, last_step)) {
            log_val(&log, step, gpt2_validate(&model, &val_loader, args.val_steps), &comm);
        }
        if (step > 0 && every_step(step, args.sample_every, last_step)) {
            int n = gpt2_generate(&model, gen_tokens, args.genT, GPT2_EOT, &state.rng);
            print_sample(&tokenizer, have_tokenizer, gen_tokens, n);
        }
        if (args.output_dir != NULL && step > start.state.step && (last_step || every_step(step, args.ckpt_every, 0))) {
            state.step = step;
            state.data = dataloader_position(&train_loader);
            gpt2_save(&model, args.output_dir, &state);
            printf0("wrote checkpoint %s/model_%08d.bin and its training state\n", args.output_dir, step);
        }
        if (last_step) { break; }

        // one optimizer step: grad_accum micro-batches, then AdamW
        double t0 = now_seconds();
        StepStats st;
        step_stats_begin(&st, load, 0);
        gpt2_zero_grad(&model);
        for (int micro = 0; micro < grad_accum; micro++) {
            dataloader_next_batch(&train_loader);
            gpt2_forward(&model, train_loader.inputs, train_loader.targets, B, T);
            gpt2_backward(&model, 1.0f / (grad_accum * W));
            step_stats_add(&st, model.mean_loss, model.lb_loss, model.z_loss, grad_accum, &model.stats, NULL, 0, W, 0);
        }
        step_stats_reduce(&st, &comm);
        st.norm = gpt2_grad_norm(&model);
        check_step_finite(step, &st, &comm);
        st.lr = learning_rate_at(step, args.max_steps, args.lr, args.warmup, args.final_lr_frac);
        gpt2_update(&model, st.lr, args.beta1, args.beta2, 1e-8f, args.weight_decay, grad_clip_scale(st.norm, args.grad_clip), step + 1);
        cudaCheck(cudaDeviceSynchronize());
        st.ms = (now_seconds() - t0) * 1000.0;
        if (step > start.state.step) { log.total_ms += st.ms; log.timed_steps++; }
        log_step(&log, step, &st);
    }

    run_log_close(&log);
    if (have_tokenizer) { tokenizer_free(&tokenizer); }
    dataloader_free(&train_loader);
    dataloader_free(&val_loader);
    free(gen_tokens);
    gpt2_free(&model);
    matmul_free();
    comm_finalize(&comm);
    return 0;
}
#endif

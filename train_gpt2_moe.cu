/*
GPT-2 with Mixture-of-Experts layers: the GPU trainer (CUDA, bf16 with fp32 master weights).

The twin of train_gpt2_moe.c, kernel for layer: the same flags, checkpoints, data, logs and
samples (the host code is the shared headers'), with each layer's forward and backward as CUDA
kernels in the order data flows, every matrix multiply through matmul.cuh (cuBLASLt), and the
experts spread over W processes (one per GPU, mpirun) by all-to-alls through gpu_comm.cuh (NCCL,
or MPI). Layer l is an MoE layer when l % moe_every == moe_every - 1 (and E > 1).

Per layer l, for the N = B*T tokens of this process (shapes in the comments):
  layernorm_forward             ln1 = LN(residual)               (the first: after the encoder)
  matmul_forward                qkv = ln1 @ qkvw^T + qkvb        (cuBLASLt, bias epilogue)
  attention_forward             causal softmax(q k^T / sqrt(hs)) v, one warp per query row
  matmul_forward                the attention projection
  residual_layernorm_forward    residual2 = residual + proj; ln2 = LN(residual2)
  dense layer: matmul_forward   fch_gelu = gelu(ln2 @ fcw^T + fcb), then the MLP projection
  MoE layer: moe_layer_forward  the CPU trainer's nine steps: router_forward (fp32), the counts
                                to the host and to every rank, capacity and dispatch layout
                                (moe_layout.h, shared), moe_gather, the dispatch all-to-all, each
                                local expert's two matmuls, the combine all-to-all, moe_combine
  residual_layernorm_forward    residual3 = residual2 + proj; the next layer's ln1 (or lnf)
then logits = lnf @ wte^T, and classifier_forward (softmax, cross-entropy). The backward runs it
in reverse: classifier_backward writes the logits' gradient over them, matmul_backward (with the
GELU's backward as an epilogue), moe_layer_backward (two more all-to-alls), layernorm_backward
(into the residual stream's gradient), attention_backward, encoder_backward; then the replicated
gradients are summed over ranks, and the global norm, clipping and AdamW.

Precision: parameters, activations and gradients are floatX (bf16; float with PRECISION=FP32,
for the tests), with fp32 master weights and AdamW moments in the bf16 build; the router computes
in fp32 from the master weights; every sum, norm and softmax is fp32. Every reduction has a fixed
order (no float atomics), so two runs give the same bits. Activations are written (=); parameter
gradients accumulate (+=), and so does the gradient of the residual stream.

Builds: `make train_gpt2_moe` (nvcc, sm_80 and sm_90, with MPI and NCCL when present);
`make train_gpt2_moe_emu` (the same file through the CPU emulation, dev/cuda/cuda_emu.h: every
kernel runs on the CPU; train_gpt2_moe_emu_mpi under mpirun). See README.md.
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
#include "gpu_comm.cuh"  // defines: GpuComm, gpu_alltoall_rows, gpu_allreduce_sum (NCCL, or MPI)
#include "lshmoe.cu"     // defines: LSHLayout, LSHScratch, lsh_compress, lsh_decompress, ... (lshmoe.h's twin)
#include "utils.h"       // defines: fail_exit, printf0, mallocCheck, now_seconds, random_f32
#include "comm.h"        // defines: Comm, comm_init, allgather_ints, comm_check_all, mean_over_ranks
#include "model.h"       // defines: GPT2Config, PARAMETER_TENSORS_OF, checkpoint_save, TrainState, ...
#include "moe_layout.h"  // defines: MoERouting, MoEStats, moe_capacity_plan, moe_dispatch_layout, ...
#include "dataloader.h"  // defines: DataLoader, dataloader_next_batch, ...
#include "tokenizer.h"   // defines: Tokenizer
#include "train.h"       // defines: TrainArgs, parse_args, run_start, StepStats, log_step, sample_mult, ...

// ----------------------------------------------------------------------------
// the model on the GPU: parameters, activations, gradient scratch

typedef PARAMETER_TENSORS_OF(floatX) ParameterTensorsX;

// what the forward keeps for the backward, for N = B*T tokens (L layers: Ld dense, Lm MoE; S = N*K
// slots; WS = W*S rows one rank's experts can receive)
typedef struct {
    floatX* encoded;      // (B, T, C)
    floatX* ln1;          // (L, B, T, C)
    float* ln1_mean;      // (L, B, T)
    float* ln1_rstd;      // (L, B, T)
    floatX* qkv;          // (L, B, T, 3*C)
    floatX* atty;         // (L, B, T, C)
    floatX* att;          // (L, B, NH, T, T) softmax probabilities, 0 above the diagonal
    floatX* residual2;    // (L, B, T, C)
    floatX* ln2;          // (L, B, T, C)
    float* ln2_mean;      // (L, B, T)
    float* ln2_rstd;      // (L, B, T)
    floatX* fch;          // (Ld, B, T, 4*C) before the GELU
    floatX* fch_gelu;     // (Ld, B, T, 4*C)
    floatX* residual3;    // (L, B, T, C)
    floatX* lnf;          // (B, T, C)
    float* lnf_mean;      // (B, T)
    float* lnf_rstd;      // (B, T)
    floatX* logits;       // (B, T, Vp), then their gradient (written over them)
    float* losses;        // (B, T)
    floatX* proj;         // (B, T, C) scratch: a projection's (or MoE layer's) output, before the residual add
    float* router_logits; // (Lm, N, E)
    float* router_probs;  // (Lm, N, E)
    float* gates;         // (Lm, N, K)
    float* lb_f;          // (Lm, E) f_e of the load-balancing loss (whole batch), for the backward
    int* expert_idx;      // (Lm, N, K) chosen experts, best first
    int* slot_row;        // (Lm, S) the dispatch layout's device copies (moe_layout.h's, host-made)
    int* row_slot;        // (Lm, S)
    int* recv_perm;       // (Lm, WS) received row -> row grouped by local expert
    floatX* moe_y;        // (Lm, S, C) expert outputs back at the sender, in send order
    floatX* expin;        // (Lm, WS, C) rows this rank's experts received, grouped by expert
    floatX* exph;         // (Lm, WS, H) before the GELU
    floatX* exph_gelu;    // (Lm, WS, H)
    floatX* expout;       // (Lm, WS, C)
    float* lse;           // (N) scratch: each token's router logsumexp (the z-loss)
    double* prob_sums;    // (E) scratch: sums of the router probabilities over tokens
    floatX* sendbuf;      // (WS, C) the all-to-alls' staging rows, shared by the layers
    floatX* recvbuf;      // (WS, C)
    floatX* lsh_cent;     // (S, C) LSH: centroids sent (their gradients G_b in the backward)
    floatX* lsh_ycent;    // (S, C) LSH: expert outputs per centroid (their input gradients in the backward)
} ActivationTensors;
#define GPU_ACTIVATION_TENSORS 39

// gradients of activations, reused by every layer of the backward
typedef struct {
    floatX* dresidual;   // (B, T, C) the gradient in the residual stream (accumulates)
    floatX* dln;         // (B, T, C) at a layernorm's output
    floatX* datty;       // (B, T, C)
    floatX* dqkv;        // (B, T, 3*C)
    floatX* dfch;        // (B, T, 4*C)
    float* dpreatt;      // (B, NH, T, T) attention scores' gradient
    float* bias_parts;   // (BIAS_BACKWARD_PARTS, max(4C, H, Vp)) matmul_backward's bias partial sums
    float* ln_parts;     // (LN_PARTS, 2*C) layernorm_backward's weight and bias partial sums
    floatX* dmoe_y;      // (S, C) at the expert outputs, in send order
    floatX* dexpout;     // (WS, C)
    floatX* dexph;       // (WS, H) at the GELU's input
    floatX* dexpin;      // (WS, C)
    float* dgates;       // (N, K)
    float* dlogits;      // (N, E) the router logits'
} GradScratch;
#define GPU_GRAD_SCRATCH_TENSORS 14

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
    Comm comm;                 // the expert-parallel group: W processes, one per GPU
    GpuComm gcomm;             // its collectives on device memory (NCCL, or MPI)
    int E_local;               // experts held here: E / W
    int e0;                    // the first of them: rank * E_local
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
    MoERouting routing;        // the dispatch layout of every MoE layer, on the host (moe_layout.h)
    int* routing_memory;
    int batch_size, seq_len;
    int* inputs;               // (B, T) device
    int* targets;              // (B, T) device
    int* host_inputs;          // (B, T) of the last forward
    TokenBuckets buckets;      // device
    TokenBuckets host_buckets; // host (and host_bucket_counts (Vp))
    int* host_bucket_counts;
    float* host_losses;        // (B, T)
    float* host_lse;           // (B, T) the router's logsumexp of one MoE layer
    double* host_prob_sums;    // (E)
    int* host_total;           // (E) slots the whole batch routed to each expert
    int* host_fill;            // (E) moe_dispatch_layout's scratch
    float* host_lb_f;          // (E)
    float* norm_parts;         // (NORM_BLOCKS) device
    float* host_norm_parts;
    float* host_params;        // (num_parameters) host staging for checkpoints, allocated when needed
    // MoE hyperparameters of the run (not part of the checkpoint), as the CPU trainer's
    float capacity_factor;     // <= 0: dropless
    float aux_loss_weight;     // load-balancing loss weight
    float z_loss_weight;       // router z-loss weight
    // results of the last forward on this rank's tokens; mean_loss -1 when it had no targets
    float mean_loss, lb_loss, z_loss, total_loss;
    MoEStats stats;            // dropped slots, all-to-all rows, LSH: of the last forward and backward
    float lb_scale, z_scale;   // d(loss)/d(lb), d(loss)/d(z) of the backward in progress
    int sources;               // V: the simulated source ranks of each process (groups are (expert, source))
    // LSH compression of the all-to-alls (lshmoe.cu); lsh.L == 0: off
    LSHConfig lsh;
    uint64_t lsh_seed;         // projections are drawn per (MoE layer, step) from it
    int step;                  // the optimizer step, set by the caller
    float* lsh_R;              // (L*dp, C) device: this layer's projections
    float* host_lsh_R;         // (L*dp, C)
    LSHScratch lsh_scratch;
    LSHLayout* lsh_layouts;    // (Lm) each MoE layer's buckets, kept for its backward
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
static inline dim3 grid_for(size_t n, int block) { // at least one block: the loops check their bounds
    size_t g = CEIL_DIV(n, (size_t)block);
    return dim3(g < 1 ? 1 : (g < GRID_STRIDE_BLOCKS ? (unsigned)g : GRID_STRIDE_BLOCKS));
}

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
// the MoE layer's kernels. Where each slot goes (capacity, the dispatch layout, the receive
// layout) is computed on the host by moe_layout.h, as in the CPU trainer, from the chosen experts
// copied back once per layer; these kernels do the arithmetic and move the rows.

// the router, one warp per token: logits = x @ Wr^T in fp32 (Wr: the fp32 master weights), then,
// on lane 0 and in the CPU trainer's order, softmax, top-k by probability (ties to the lower
// expert), gates = the chosen probabilities (renormalised to sum 1 when renorm and K > 1), and the
// logsumexp of the z-loss
__global__ void router_forward_kernel(float* logits, float* probs, int* expert_idx, float* gates, float* lse, // (N,E), (N,E), (N,K), (N,K), (N)
                                      const floatX* x, const float* routerw, int N, int C, int E, int K, int renorm) { // (N,C), (E,C)
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) { return; }
    const floatX* xr = x + (size_t)row * C;
    float* lg = logits + (size_t)row * E;
    for (int e = 0; e < E; e++) {
        float d = 0.0f;
        for (int c = lane; c < C; c += 32) { d += (float)xr[c] * routerw[(size_t)e * C + c]; }
        d = warp_sum(d);
        if (lane == 0) { lg[e] = d; }
    }
    if (lane != 0) { return; } // O(E*K) per token from here
    float* pr = probs + (size_t)row * E;
    int* idx = expert_idx + (size_t)row * K;
    float* g = gates + (size_t)row * K;
    float maxval = lg[0];
    for (int e = 1; e < E; e++) { if (lg[e] > maxval) { maxval = lg[e]; } }
    float sum = 0.0f;
    for (int e = 0; e < E; e++) { pr[e] = expf(lg[e] - maxval); sum += pr[e]; }
    for (int e = 0; e < E; e++) { pr[e] /= sum; }
    lse[row] = maxval + logf(sum);
    float gate_sum = 0.0f;
    for (int j = 0; j < K; j++) { // K passes of argmax over the experts not chosen yet
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int jj = 0; jj < j; jj++) { if (idx[jj] == e) { taken = 1; } }
            if (!taken && (best < 0 || pr[e] > pr[best])) { best = e; }
        }
        idx[j] = best;
        g[j] = pr[best];
        gate_sum += pr[best];
    }
    if (renorm && K > 1) { for (int j = 0; j < K; j++) { g[j] /= gate_sum; } }
}

// sums[e] = the sum over the N tokens, in order, of probs[:, e] (N P_e of the load-balancing loss)
__global__ void router_prob_sums_kernel(double* sums, const float* probs, int N, int E) { // (E), (N,E)
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) { return; }
    double s = 0.0;
    for (int n = 0; n < N; n++) { s += probs[(size_t)n * E + e]; }
    sums[e] = s; // in double, as the CPU trainer
}

// sendbuf row r = the token row of slot row_slot[r] (the R kept slots, grouped by expert)
__global__ void moe_gather_kernel(floatX* sendbuf, const floatX* x, const int* row_slot, int R, int C, int K) { // (R,C), (N,C), (R)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)R * C; i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / C), c = (int)(i % C);
        sendbuf[i] = x[(size_t)(row_slot[r] / K) * C + c];
    }
}

// rows between the received order and the experts' order: to_experts: out[perm[i]] = in[i];
// else out[i] = in[perm[i]]
__global__ void permute_rows_kernel(floatX* out, const floatX* in, const int* perm, int R, int C, int to_experts) { // (R,C), (R,C), (R)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)R * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C, p = (size_t)perm[r];
        if (to_experts) { out[p * C + c] = in[i]; } else { out[i] = in[p * C + c]; }
    }
}

// out[i] = the sum over token i's kept slots (j in order) of gate * expert output: a gather per
// token, no atomics; a dropped slot adds nothing (the token keeps its residual for it)
__global__ void moe_combine_forward_kernel(floatX* out, const floatX* y, const float* gates, const int* slot_row, // (N,C), (S,C), (N,K), (S)
                                           int N, int C, int K) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)N * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / C, c = i % C;
        float acc = 0.0f;
        for (int j = 0; j < K; j++) {
            int r = slot_row[n * K + j];
            if (r >= 0) { acc += gates[n * K + j] * (float)y[(size_t)r * C + c]; }
        }
        out[i] = (floatX)acc;
    }
}

// the combine's backward: dy[r] = gate * dout of r's token (each kept row written once)
__global__ void moe_combine_backward_kernel(floatX* dy, const floatX* dout, const float* gates, const int* row_slot, // (R,C), (N,C), (N,K), (R)
                                            int R, int C, int K) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)R * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C;
        int s = row_slot[r];
        dy[i] = (floatX)(gates[s] * (float)dout[(size_t)(s / K) * C + c]);
    }
}

// and the gates' gradient, one warp per slot: dgates[s] = dout of its token . its expert output
// (0 for a dropped slot)
__global__ void moe_gates_backward_kernel(float* dgates, const floatX* dout, const floatX* y, const int* slot_row, // (S), (N,C), (S,C), (S)
                                          int S, int C, int K) {
    int s = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S) { return; }
    int r = slot_row[s];
    float d = 0.0f;
    if (r >= 0) { for (int c = lane; c < C; c += 32) { d += (float)dout[(size_t)(s / K) * C + c] * (float)y[(size_t)r * C + c]; } }
    d = warp_sum(d);
    if (lane == 0) { dgates[s] = d; }
}

// the dispatch's backward: dx[i] = the sum over token i's kept slots of the rows' gradients
// (written: the router's part is added next)
__global__ void moe_scatter_backward_kernel(floatX* dx, const floatX* dsend, const int* slot_row, int N, int C, int K) { // (N,C), (R,C), (S)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)N * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t n = i / C, c = i % C;
        float acc = 0.0f;
        for (int j = 0; j < K; j++) {
            int r = slot_row[n * K + j];
            if (r >= 0) { acc += (float)dsend[(size_t)r * C + c]; }
        }
        dx[i] = (floatX)acc;
    }
}

// the router's backward, one warp per token, as the CPU trainer's moe_router_backward: lane 0
// turns the gates' gradients, the load-balancing loss (f: E f_e of the whole batch) and the z-loss
// into dlogits; then every lane adds dlogits @ Wr to its channels of dx
__global__ void router_backward_kernel(floatX* dx, float* dlogits,                                 // (N,C), (N,E)
                                       const float* dgates, const float* logits, const float* probs, // (N,K), (N,E), (N,E)
                                       const int* expert_idx, const float* gates, const float* f,    // (N,K), (N,K), (E)
                                       float lb_scale, float z_scale, const float* routerw,          // (E,C) fp32
                                       int N, int C, int E, int K, int renorm) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) { return; }
    const float* pr = probs + (size_t)row * E;
    const float* lg = logits + (size_t)row * E;
    float* dl = dlogits + (size_t)row * E; // first the probabilities' gradient, then the logits'
    const int* idx = expert_idx + (size_t)row * K;
    const float* dg = dgates + (size_t)row * K;
    if (lane == 0) {
        for (int e = 0; e < E; e++) { dl[e] = lb_scale * E * f[e] / N; } // d(E sum_e f_e mean_t p_te)/dp_te
        if (renorm && K > 1) { // g_j = p_j / s: dp_j = (dg_j - sum_j' dg_j' g_j') / s
            float s = 0.0f, dot = 0.0f;
            for (int j = 0; j < K; j++) { s += pr[idx[j]]; dot += dg[j] * gates[(size_t)row * K + j]; }
            for (int j = 0; j < K; j++) { dl[idx[j]] += (dg[j] - dot) / s; }
        } else {
            for (int j = 0; j < K; j++) { dl[idx[j]] += dg[j]; }
        }
        float pd = 0.0f; // softmax backward, plus the z-loss: d(lse^2)/dlogit_e = 2 lse p_e
        for (int e = 0; e < E; e++) { pd += pr[e] * dl[e]; }
        float maxval = lg[0];
        for (int e = 1; e < E; e++) { if (lg[e] > maxval) { maxval = lg[e]; } }
        float sum = 0.0f;
        for (int e = 0; e < E; e++) { sum += expf(lg[e] - maxval); }
        float dlse = z_scale * 2.0f * (maxval + logf(sum)) / N;
        for (int e = 0; e < E; e++) { dl[e] = pr[e] * (dl[e] - pd) + dlse * pr[e]; }
    }
    __syncwarp(); // every lane reads lane 0's dlogits
    for (int c = lane; c < C; c += 32) {
        float acc = 0.0f;
        for (int e = 0; e < E; e++) { acc += dl[e] * routerw[(size_t)e * C + c]; }
        floatX* d = dx + (size_t)row * C + c;
        *d = (floatX)((float)*d + acc);
    }
}

// drouterw (E,C) += dlogits^T @ x: one thread per (e, c), the tokens in order
__global__ void router_backward_weight_kernel(floatX* drouterw, const float* dlogits, const floatX* x, int N, int C, int E) { // (E,C), (N,E), (N,C)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)E * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t e = i / C, c = i % C;
        float s = 0.0f;
        for (int n = 0; n < N; n++) { s += dlogits[(size_t)n * E + e] * (float)x[(size_t)n * C + c]; }
        drouterw[i] = (floatX)((float)drouterw[i] + s);
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

// a model of this config for this process of comm (its experts only), from host_params
// (count_parameters floats of this rank: the model a run starts from, train.h's run_start);
// the host copy is not kept
static void gpt2_build(GPT2* model, const GPT2Config* config, const float* host_params, Comm comm) {
    memset(model, 0, sizeof(GPT2));
    if (config->num_experts > 1 && config->num_experts % comm.world != 0) {
        fail_exit("flag -E: E=%d experts cannot be split evenly over W=%d processes", config->num_experts, comm.world);
    }
    if (config->channels % 8 != 0 || config->padded_vocab_size % 8 != 0 || (config->num_experts > 1 && config->expert_hidden % 8 != 0)) {
        fail_exit("model: C=%d, Vp=%d and H=%d must be multiples of 8 for the GPU's matrix multiplies", config->channels,
                  config->padded_vocab_size, config->expert_hidden);
    }
    model->config = *config;
    model->comm = comm;
    model->E_local = experts_per_rank(config, comm.world);
    model->e0 = comm.rank * model->E_local;
    gpu_comm_init(&model->gcomm, &model->comm);
    fill_in_parameter_sizes(model->param_sizes, config, model->E_local);
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
    model->capacity_factor = 0.0f;
    model->aux_loss_weight = 0.01f;
    model->z_loss_weight = 0.001f;
    model->mean_loss = -1.0f;
    model->sources = 1;
}

// switches LSH compression on for an MoE model (before its first forward); 0 or an error in err
static int gpt2_set_lsh(GPT2* model, LSHConfig lsh, int sources, uint64_t seed, char* err, size_t errlen) {
    if (moe_lsh_check(model->config.num_experts, lsh, sources, model->comm.world, err, errlen) != 0) { return -1; }
    if (model->acts_memory != NULL) { snprintf(err, errlen, "gpt2_set_lsh: call it before the first forward"); return -1; }
    model->lsh = lsh;
    model->sources = sources;
    model->lsh_seed = seed;
    return 0;
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
    size_t L = c->num_layers, Ld = num_dense_layers(c), Lm = num_moe_layers(c), C = c->channels, NH = c->num_heads;
    size_t Vp = c->padded_vocab_size, N = (size_t)B * T, X = sizeof(floatX), F = sizeof(float), I = sizeof(int);
    size_t E = Lm > 0 ? c->num_experts : 0, K = Lm > 0 ? c->top_k : 0, H = Lm > 0 ? c->expert_hidden : 0;
    size_t S = N * K, WS = (size_t)model->comm.world * S, lsh = model->lsh.L > 0, G = E * model->sources;
    model->batch_size = B;
    model->seq_len = T;
    ActivationTensors* a = &model->acts;
    void** aptrs[GPU_ACTIVATION_TENSORS] = {
        (void**)&a->encoded, (void**)&a->ln1, (void**)&a->ln1_mean, (void**)&a->ln1_rstd, (void**)&a->qkv, (void**)&a->atty,
        (void**)&a->att, (void**)&a->residual2, (void**)&a->ln2, (void**)&a->ln2_mean, (void**)&a->ln2_rstd, (void**)&a->fch,
        (void**)&a->fch_gelu, (void**)&a->residual3, (void**)&a->lnf, (void**)&a->lnf_mean, (void**)&a->lnf_rstd,
        (void**)&a->logits, (void**)&a->losses, (void**)&a->proj, (void**)&a->router_logits, (void**)&a->router_probs,
        (void**)&a->gates, (void**)&a->lb_f, (void**)&a->expert_idx, (void**)&a->slot_row, (void**)&a->row_slot,
        (void**)&a->recv_perm, (void**)&a->moe_y, (void**)&a->expin, (void**)&a->exph, (void**)&a->exph_gelu,
        (void**)&a->expout, (void**)&a->lse, (void**)&a->prob_sums, (void**)&a->sendbuf, (void**)&a->recvbuf,
        (void**)&a->lsh_cent, (void**)&a->lsh_ycent};
    size_t abytes[GPU_ACTIVATION_TENSORS] = {
        N * C * X, L * N * C * X, L * N * F, L * N * F, L * N * 3 * C * X, L * N * C * X,
        L * B * NH * T * T * X, L * N * C * X, L * N * C * X, L * N * F, L * N * F, Ld * N * 4 * C * X,
        Ld * N * 4 * C * X, L * N * C * X, N * C * X, N * F, N * F,
        N * Vp * X, N * F, N * C * X, Lm * N * E * F, Lm * N * E * F,
        Lm * S * F, Lm * E * F, Lm * S * I, Lm * S * I, Lm * S * I,
        Lm * WS * I, Lm * S * C * X, Lm * WS * C * X, Lm * WS * H * X, Lm * WS * H * X,
        Lm * WS * C * X, N * F, E * sizeof(double), WS * C * X, WS * C * X, lsh * S * C * X, lsh * S * C * X};
    model->acts_memory = carve(aptrs, abytes, GPU_ACTIVATION_TENSORS, "the activations");
    GradScratch* g = &model->g;
    void** gptrs[GPU_GRAD_SCRATCH_TENSORS] = {
        (void**)&g->dresidual, (void**)&g->dln, (void**)&g->datty, (void**)&g->dqkv, (void**)&g->dfch, (void**)&g->dpreatt,
        (void**)&g->bias_parts, (void**)&g->ln_parts, (void**)&g->dmoe_y, (void**)&g->dexpout, (void**)&g->dexph, (void**)&g->dexpin,
        (void**)&g->dgates, (void**)&g->dlogits};
    size_t widest = Vp > 4 * C ? Vp : 4 * C;
    widest = H > widest ? H : widest;
    size_t gbytes[GPU_GRAD_SCRATCH_TENSORS] = {
        N * C * X, N * C * X, N * C * X, N * 3 * C * X, N * 4 * C * X, B * NH * T * T * F,
        BIAS_BACKWARD_PARTS * widest * F, LN_PARTS * 2 * C * F, S * C * X, WS * C * X, WS * H * X, WS * C * X,
        S * F, N * E * F};
    model->grad_scratch_memory = carve(gptrs, gbytes, GPU_GRAD_SCRATCH_TENSORS, "the gradient scratch");
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
    if (lsh) {
        model->lsh_R = (float*)gpu_alloc((size_t)model->lsh.L * model->lsh.dp * C * sizeof(float), "LSH projections", "lower -J or -P");
        model->host_lsh_R = (float*)mallocCheck((size_t)model->lsh.L * model->lsh.dp * C * sizeof(float));
        lsh_scratch_init(&model->lsh_scratch, (int)S, (int)G, (int)C);
        model->lsh_layouts = (LSHLayout*)mallocCheck(Lm * sizeof(LSHLayout));
        for (size_t m = 0; m < Lm; m++) { lsh_layout_alloc(&model->lsh_layouts[m], (int)S, (int)G); }
    }
    if (Lm > 0) {
        model->routing_memory = moe_routing_allocate(&model->routing, (int)Lm, S, model->comm.world, (int)E, model->E_local, model->sources, (int)lsh);
        model->host_lse = (float*)mallocCheck(N * sizeof(float));
        model->host_prob_sums = (double*)mallocCheck(E * sizeof(double));
        model->host_lb_f = (float*)mallocCheck(E * sizeof(float));
        model->host_total = (int*)mallocCheck(2 * E * sizeof(int));
        model->host_fill = model->host_total + E;
    }
}

// ----------------------------------------------------------------------------
// the MoE layer: the kernels above in the nine steps of the CPU trainer's moe_layer_forward

// the router weights of MoE layer m in fp32: the master copy (bf16 build) or the parameters (fp32)
static const float* router_weights(const GPT2* model, int m) {
    size_t offset = 0;
    for (int k = 0; k < PARAM_ROUTERW; k++) { offset += model->param_sizes[k]; }
    const float* base = model->master != NULL ? model->master : (const float*)model->params_memory;
    return base + offset + (size_t)m * model->config.num_experts * model->config.channels;
}

// the MoE tensors of layer m, for a forward of N tokens; the others as they are
static ActivationTensors moe_layer_acts(const GPT2* model, int m, int N) {
    const GPT2Config* c = &model->config;
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden, S = (size_t)N * c->top_k;
    size_t WS = (size_t)model->comm.world * model->batch_size * model->seq_len * c->top_k;
    ActivationTensors a = model->acts;
    a.router_logits += m * N * E;
    a.router_probs += m * N * E;
    a.gates += m * S;
    a.lb_f += m * E;
    a.expert_idx += m * S;
    a.slot_row += m * S;
    a.row_slot += m * S;
    a.recv_perm += m * WS;
    a.moe_y += m * S * C;
    a.expin += m * WS * C;
    a.exph += m * WS * H;
    a.exph_gelu += m * WS * H;
    a.expout += m * WS * C;
    return a;
}

static MoERouting moe_layer_routing(const GPT2* model, int m, int N) {
    const GPT2Config* c = &model->config;
    size_t WS = (size_t)model->comm.world * model->batch_size * model->seq_len * c->top_k;
    return moe_routing_layer(model->routing, m, (size_t)N * c->top_k, WS, model->comm.world, c->num_experts, model->E_local,
                             model->sources, model->lsh.L > 0);
}

// the forward of MoE layer m on this rank's N tokens x (N,C) after ln2; out (N,C) is written.
// Returns this rank's share of the layer's load-balancing and z-losses through lb and z.
static void moe_layer_forward(GPT2* model, int m, floatX* out, const floatX* x, int N, float* lb, float* z) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K, rank = model->comm.rank;
    ActivationTensors a = moe_layer_acts(model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);
    ParameterTensorsX p = model->params;
    MoEStats* st = &model->stats;
    cudaStream_t s = 0;
    // 1. route (fp32); the chosen experts, logsumexps and probability sums go to the host
    launch_kernel(router_forward_kernel, dim3(CEIL_DIV(N, 8)), dim3(256), 0, s, a.router_logits, a.router_probs, a.expert_idx, a.gates,
                  a.lse, x, router_weights(model, m), N, C, E, K, cfg->renorm_gates);
    cudaCheck(cudaGetLastError());
    launch_kernel(router_prob_sums_kernel, dim3(CEIL_DIV(E, 64)), dim3(64), 0, s, a.prob_sums, a.router_probs, N, E);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(rt.expert_idx, a.expert_idx, S * sizeof(int), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(model->host_lse, a.lse, N * sizeof(float), cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(model->host_prob_sums, a.prob_sums, E * sizeof(double), cudaMemcpyDeviceToHost));
    // 2. every rank's counts: capacity and f_e need the whole batch; the losses as the CPU trainer's
    int* my_counts = rt.kept; // allgather's send buffer may not alias its output
    for (int e = 0; e < E; e++) { my_counts[e] = 0; }
    for (int i = 0; i < S; i++) { my_counts[rt.expert_idx[i]]++; }
    allgather_ints(my_counts, rt.counts, E, &model->comm);
    int* total = moe_total_counts(model->host_total, rt.counts, W, E);
    long long slots = (long long)S * W;
    double lbd = 0.0, zd = 0.0;
    for (int e = 0; e < E; e++) {
        lbd += ((double)total[e] / slots) * (model->host_prob_sums[e] / N);
        model->host_lb_f[e] = (float)((double)total[e] / slots);
    }
    for (int i = 0; i < N; i++) { zd += (double)model->host_lse[i] * model->host_lse[i]; }
    *lb = (float)(E * lbd);
    *z = (float)(zd / N);
    cudaCheck(cudaMemcpy(a.lb_f, model->host_lb_f, E * sizeof(float), cudaMemcpyHostToDevice));
    // 3-4. capacity over the whole batch, then this rank's kept slots sorted by expert (moe_layout.h)
    int cap = moe_capacity(model->capacity_factor, (long long)N * W, K, E);
    st->dropped_slots += moe_capacity_plan(rt.kept, rt.counts, W, E, cap);
    moe_dispatch_layout(rt.slot_row, rt.row_slot, rt.send_offsets, model->host_fill, rt.expert_idx, rt.kept + (size_t)rank * E, S, E);
    int R_send = rt.send_offsets[E];
    cudaCheck(cudaMemcpy(a.slot_row, rt.slot_row, S * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(a.row_slot, rt.row_slot, R_send * sizeof(int), cudaMemcpyHostToDevice));
    // 5. gather the kept rows by expert
    launch_kernel(moe_gather_kernel, grid_for((size_t)R_send * C, 256), dim3(256), 0, s, model->acts.sendbuf, x, a.row_slot, R_send, C, K);
    cudaCheck(cudaGetLastError());
    int V = model->sources, G = E * V;
    long long crossing = moe_groups_layout(rt.group_rows, rt.send_offsets, rt.row_slot, N, K, E, V, rank, W);
    st->wire_rows[0] += crossing;
    const floatX* dispatched = model->acts.sendbuf;
    if (model->lsh.L > 0) {
        // LSH-MoE sec. 3: each group (e, v) becomes its bucket centroids; the count exchange
        // carries the centroid counts, known only after hashing
        lsh_projections_init(model->host_lsh_R, model->lsh.L, model->lsh.dp, C, lsh_seed(model->lsh_seed, m, model->step));
        cudaCheck(cudaMemcpy(model->lsh_R, model->host_lsh_R, (size_t)model->lsh.L * model->lsh.dp * C * sizeof(float), cudaMemcpyHostToDevice));
        LSHLayout* lay = &model->lsh_layouts[m];
        lsh_compress(lay, model->acts.lsh_cent, (const floatX*)model->acts.sendbuf, rt.group_rows, G, C, model->lsh_R, &model->lsh,
                     &model->lsh_scratch, &st->lsh);
        memcpy(rt.group_cents, lay->group_cents_host, (G + 1) * sizeof(int));
        int per_owner = E / (W * V), *my_wire = model->host_fill; // (E): centroid rows this rank sends each expert
        crossing = 0;
        for (int e = 0; e < E; e++) {
            my_wire[e] = 0;
            for (int v = 0; v < V; v++) {
                int mg = rt.group_cents[e * V + v + 1] - rt.group_cents[e * V + v];
                my_wire[e] += mg;
                if (e / per_owner != rank * V + v) { crossing += mg; }
            }
        }
        allgather_ints(my_wire, rt.wire, E, &model->comm);
        dispatched = model->acts.lsh_cent;
    } else {
        memcpy(rt.wire, rt.kept, (size_t)W * E * sizeof(int));
    }
    st->wire_rows[1] += crossing;
    // 6. dispatch: each rank receives its experts' rows, regrouped by expert
    moe_send_rows(rt.send_rows, rt.wire, rank, W, E);
    int R = moe_receive_layout(rt.recv_perm, rt.expert_offsets, rt.recv_rows, rt.wire, W, E, model->e0, El);
    cudaCheck(cudaMemcpy(a.recv_perm, rt.recv_perm, R * sizeof(int), cudaMemcpyHostToDevice));
    gpu_alltoall_rows(dispatched, rt.send_rows, model->acts.recvbuf, rt.recv_rows, C, &model->gcomm);
    launch_kernel(permute_rows_kernel, grid_for((size_t)R * C, 256), dim3(256), 0, s, a.expin, model->acts.recvbuf, a.recv_perm, R, C, 1);
    cudaCheck(cudaGetLastError());
    // 7. the experts held here, each a GPT-2 MLP over its rows (an expert with no rows is skipped)
    for (int el = 0; el < El; el++) {
        int r0 = rt.expert_offsets[el], n = rt.expert_offsets[el + 1] - r0;
        if (n == 0) { continue; }
        size_t me = (size_t)m * El + el;
        matmul_forward(a.exph_gelu + (size_t)r0 * H, a.expin + (size_t)r0 * C, p.expfcw + me * H * C, p.expfcb + me * H, n, C, H,
                       a.exph + (size_t)r0 * H, s);
        matmul_forward(a.expout + (size_t)r0 * C, a.exph_gelu + (size_t)r0 * H, p.expprojw + me * C * H, p.expprojb + me * C, n, H, C, NULL, s);
    }
    // 8. combine: the outputs go back to their senders; with LSH one per centroid, plus the residual (Eq. 5)
    launch_kernel(permute_rows_kernel, grid_for((size_t)R * C, 256), dim3(256), 0, s, model->acts.recvbuf, a.expout, a.recv_perm, R, C, 0);
    cudaCheck(cudaGetLastError());
    if (model->lsh.L > 0) {
        gpu_alltoall_rows(model->acts.recvbuf, rt.recv_rows, model->acts.lsh_ycent, rt.send_rows, C, &model->gcomm);
        lsh_decompress(&model->lsh_layouts[m], a.moe_y, (const floatX*)model->acts.lsh_ycent, (const floatX*)model->acts.sendbuf,
                       (const floatX*)model->acts.lsh_cent, C, &model->lsh, &st->lsh);
    } else {
        gpu_alltoall_rows(model->acts.recvbuf, rt.recv_rows, a.moe_y, rt.send_rows, C, &model->gcomm);
    }
    // 9. the gate-weighted sum per token
    launch_kernel(moe_combine_forward_kernel, grid_for((size_t)N * C, 256), dim3(256), 0, s, out, a.moe_y, a.gates, a.slot_row, N, C, K);
    cudaCheck(cudaGetLastError());
    moe_count_alltoalls(st, 0, rt.send_rows, rt.recv_rows, rank, W);
}

// the backward of MoE layer m: dout (N,C) at its output, x (N,C) its input; dx (N,C) is written
static void moe_layer_backward(GPT2* model, int m, floatX* dx, const floatX* dout, const floatX* x, int N) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K;
    ActivationTensors a = moe_layer_acts(model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);
    ParameterTensorsX p = model->params, g = model->grads;
    GradScratch d = model->g;
    cudaStream_t s = 0;
    int R_send = rt.send_offsets[E], R = rt.expert_offsets[El];
    // 9. combine backward: gradients at the expert outputs and at the gates
    launch_kernel(moe_combine_backward_kernel, grid_for((size_t)R_send * C, 256), dim3(256), 0, s, d.dmoe_y, dout, a.gates, a.row_slot, R_send, C, K);
    cudaCheck(cudaGetLastError());
    launch_kernel(moe_gates_backward_kernel, dim3(CEIL_DIV(S, 8)), dim3(256), 0, s, d.dgates, dout, a.moe_y, a.slot_row, S, C, K);
    cudaCheck(cudaGetLastError());
    const floatX* dsent = d.dmoe_y;
    if (model->lsh.L > 0) { // one gradient row per centroid, G_b = the sum of its rows': this all-to-all shrinks too
        lsh_decompress_backward(&model->lsh_layouts[m], model->acts.lsh_cent, (const floatX*)d.dmoe_y, C, &model->stats.lsh);
        dsent = model->acts.lsh_cent;
    }
    // 8. the output gradients go to the experts' owners
    gpu_alltoall_rows(dsent, rt.send_rows, model->acts.recvbuf, rt.recv_rows, C, &model->gcomm);
    launch_kernel(permute_rows_kernel, grid_for((size_t)R * C, 256), dim3(256), 0, s, d.dexpout, model->acts.recvbuf, a.recv_perm, R, C, 1);
    cudaCheck(cudaGetLastError());
    // 7. the experts' backward: weight gradients here, input gradients back
    for (int el = 0; el < El; el++) {
        int r0 = rt.expert_offsets[el], n = rt.expert_offsets[el + 1] - r0;
        if (n == 0) { continue; }
        size_t me = (size_t)m * El + el;
        matmul_backward(d.dexph + (size_t)r0 * H, g.expprojw + me * C * H, g.expprojb + me * C, d.dexpout + (size_t)r0 * C,
                        a.exph_gelu + (size_t)r0 * H, p.expprojw + me * C * H, d.bias_parts, n, H, C, a.exph + (size_t)r0 * H, s);
        matmul_backward(d.dexpin + (size_t)r0 * C, g.expfcw + me * H * C, g.expfcb + me * H, d.dexph + (size_t)r0 * H,
                        a.expin + (size_t)r0 * C, p.expfcw + me * H * C, d.bias_parts, n, C, H, NULL, s);
    }
    // 6. dispatch backward: the input gradients go back to their senders
    launch_kernel(permute_rows_kernel, grid_for((size_t)R * C, 256), dim3(256), 0, s, model->acts.recvbuf, d.dexpin, a.recv_perm, R, C, 0);
    cudaCheck(cudaGetLastError());
    if (model->lsh.L > 0) { // dx_i = g_i + (J^T G_b - G_b) / n_b (compensated), or J^T G_b / n_b
        gpu_alltoall_rows(model->acts.recvbuf, rt.recv_rows, model->acts.lsh_ycent, rt.send_rows, C, &model->gcomm);
        cudaCheck(cudaMemset(model->acts.sendbuf, 0, (size_t)R_send * C * sizeof(floatX)));
        lsh_compress_backward(&model->lsh_layouts[m], model->acts.sendbuf, (const floatX*)d.dmoe_y, (const floatX*)model->acts.lsh_ycent,
                              (const floatX*)model->acts.lsh_cent, C, &model->lsh, &model->stats.lsh);
    } else {
        gpu_alltoall_rows(model->acts.recvbuf, rt.recv_rows, model->acts.sendbuf, rt.send_rows, C, &model->gcomm);
    }
    // 5. summed per token
    launch_kernel(moe_scatter_backward_kernel, grid_for((size_t)N * C, 256), dim3(256), 0, s, dx, model->acts.sendbuf, a.slot_row, N, C, K);
    cudaCheck(cudaGetLastError());
    // 1-2. the router's backward, with f_e of the whole batch
    launch_kernel(router_backward_kernel, dim3(CEIL_DIV(N, 8)), dim3(256), 0, s, dx, d.dlogits, d.dgates, a.router_logits, a.router_probs,
                  a.expert_idx, a.gates, a.lb_f, model->lb_scale, model->z_scale, router_weights(model, m), N, C, E, K, cfg->renorm_gates);
    cudaCheck(cudaGetLastError());
    launch_kernel(router_backward_weight_kernel, grid_for((size_t)E * C, 256), dim3(256), 0, s, g.routerw + (size_t)m * E * C, d.dlogits, x, N, C, E);
    cudaCheck(cudaGetLastError());
    moe_count_alltoalls(&model->stats, 2, rt.send_rows, rt.recv_rows, model->comm.rank, W);
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
    float lb_sum = 0.0f, z_sum = 0.0f;

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
        matmul_forward(l_qkv, a.ln1 + lNC, p.qkvw + (size_t)l * 3 * C * C, p.qkvb + (size_t)l * 3 * C, N, C, 3 * C, NULL, s);
        launch_kernel(attention_forward_kernel, att_grid, att_block, att_smem, s, l_atty, l_att, l_qkv, B, T, C, NH);
        cudaCheck(cudaGetLastError());
        matmul_forward(a.proj, l_atty, p.attprojw + (size_t)l * C * C, p.attprojb + (size_t)l * C, N, C, C, NULL, s);
        launch_kernel(residual_layernorm_forward_kernel, rows_grid, rows_block, 0, s, a.residual2 + lNC, a.ln2 + lNC, a.ln2_mean + (size_t)l * N,
                      a.ln2_rstd + (size_t)l * N, residual, a.proj, p.ln2w + (size_t)l * C, p.ln2b + (size_t)l * C, N, C);
        cudaCheck(cudaGetLastError());
        if (is_moe_layer(cfg, l)) {
            float lb, z;
            moe_layer_forward(model, moe_layer_index(cfg, l), a.proj, a.ln2 + lNC, N, &lb, &z);
            lb_sum += lb;
            z_sum += z;
        } else {
            size_t d = dense_layer_index(cfg, l);
            floatX* l_fch = a.fch + d * 4 * N * C;
            floatX* l_fch_gelu = a.fch_gelu + d * 4 * N * C;
            matmul_forward(l_fch_gelu, a.ln2 + lNC, p.fcw + d * 4 * C * C, p.fcb + d * 4 * C, N, C, 4 * C, l_fch, s);
            matmul_forward(a.proj, l_fch_gelu, p.fcprojw + d * C * 4 * C, p.fcprojb + d * C, N, 4 * C, C, NULL, s);
        }
        // the residual add, and the layernorm that follows it: the next layer's ln1, or lnf
        int last = l == L - 1;
        launch_kernel(residual_layernorm_forward_kernel, rows_grid, rows_block, 0, s, a.residual3 + lNC,
                      last ? a.lnf : a.ln1 + lNC + (size_t)N * C, last ? a.lnf_mean : a.ln1_mean + (size_t)(l + 1) * N,
                      last ? a.lnf_rstd : a.ln1_rstd + (size_t)(l + 1) * N, a.residual2 + lNC, a.proj,
                      last ? p.lnfw : p.ln1w + (size_t)(l + 1) * C, last ? p.lnfb : p.ln1b + (size_t)(l + 1) * C, N, C);
        cudaCheck(cudaGetLastError());
    }
    matmul_forward(a.logits, a.lnf, p.wte, NULL, N, C, Vp, NULL, s);
    model->lb_loss = lb_sum;
    model->z_loss = z_sum;
    if (targets != NULL) {
        launch_kernel(classifier_forward_kernel, dim3(N), dim3(512), 0, s, a.losses, a.logits, model->targets, V, Vp);
        cudaCheck(cudaGetLastError());
        cudaCheck(cudaMemcpy(model->host_losses, a.losses, N * sizeof(float), cudaMemcpyDeviceToHost));
        double mean_loss = 0.0;
        for (int i = 0; i < N; i++) { mean_loss += model->host_losses[i]; }
        model->mean_loss = (float)(mean_loss / N);
        model->total_loss = model->mean_loss + model->aux_loss_weight * lb_sum + model->z_loss_weight * z_sum;
    } else {
        model->mean_loss = -1.0f;
        model->total_loss = -1.0f;
    }
}

void gpt2_zero_grad(GPT2* model) {
    cudaCheck(cudaMemset(model->grads_memory, 0, model->num_parameters * sizeof(floatX)));
}

// backward of the last forward's total loss times loss_scale; parameter gradients accumulate.
// loss_scale = 1 / (gradient accumulation steps * W): summed over ranks (gpt2_allreduce_grads),
// the gradients are those of the mean loss over the whole batch.
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
    model->lb_scale = loss_scale * model->aux_loss_weight;
    model->z_scale = loss_scale * model->z_loss_weight;

    launch_kernel(classifier_backward_kernel, dim3(N), dim3(512), 0, s, a.logits, model->targets, loss_scale / N, V, Vp);
    cudaCheck(cudaGetLastError());
    floatX* dlogits = a.logits;
    matmul_backward(d.dln, g.wte, NULL, dlogits, a.lnf, p.wte, d.bias_parts, N, C, Vp, NULL, s);
    cudaCheck(cudaMemset(d.dresidual, 0, (size_t)N * C * sizeof(floatX)));
    layernorm_backward(d.dresidual, g.lnfw, g.lnfb, d.ln_parts, d.dln, a.residual3 + (size_t)(L - 1) * N * C, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C, s);
    for (int l = L - 1; l >= 0; l--) {
        size_t lNC = (size_t)l * N * C;
        floatX* residual = l == 0 ? a.encoded : a.residual3 + lNC - (size_t)N * C;
        // MLP or MoE: dresidual holds the gradient of residual3 = residual2 + mlp(ln2)
        if (is_moe_layer(cfg, l)) {
            moe_layer_backward(model, moe_layer_index(cfg, l), d.dln, d.dresidual, a.ln2 + lNC, N);
        } else {
            size_t dl = dense_layer_index(cfg, l);
            matmul_backward(d.dfch, g.fcprojw + dl * C * 4 * C, g.fcprojb + dl * C, d.dresidual, a.fch_gelu + dl * 4 * N * C,
                            p.fcprojw + dl * C * 4 * C, d.bias_parts, N, 4 * C, C, a.fch + dl * 4 * N * C, s); // dfch is at the GELU's input
            matmul_backward(d.dln, g.fcw + dl * 4 * C * C, g.fcb + dl * 4 * C, d.dfch, a.ln2 + lNC, p.fcw + dl * 4 * C * C,
                            d.bias_parts, N, C, 4 * C, NULL, s);
        }
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

// data parallelism for the replicated tensors: their gradients are summed over ranks. Expert
// gradients stay on their owner (they already hold every rank's tokens' contributions).
void gpt2_allreduce_grads(GPT2* model) {
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        if (!param_is_expert(k)) { gpu_allreduce_sum(model->grads_memory + offset, model->param_sizes[k], &model->gcomm); }
        offset += model->param_sizes[k];
    }
}

// the sum of squares of grads [from, to): fp32 partial sums in a fixed grid, added in double here
static double grad_sum_squares(GPT2* model, size_t from, size_t to) {
    if (to <= from) { return 0.0; }
    launch_kernel(sum_squares_kernel, dim3(NORM_BLOCKS), dim3(256), 0, 0, model->norm_parts, model->grads_memory + from, to - from);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(model->host_norm_parts, model->norm_parts, NORM_BLOCKS * sizeof(float), cudaMemcpyDeviceToHost));
    double sum = 0.0;
    for (int i = 0; i < NORM_BLOCKS; i++) { sum += model->host_norm_parts[i]; }
    return sum;
}

// the global norm of every gradient of the model (all ranks' experts): the replicated tensors (the
// same on every rank) once, the experts summed over ranks
float gpt2_grad_norm(GPT2* model) {
    size_t experts_from = 0, experts_to;
    for (int k = 0; k < PARAM_EXPFCW; k++) { experts_from += model->param_sizes[k]; }
    experts_to = experts_from;
    for (int k = PARAM_EXPFCW; k <= PARAM_EXPPROJB; k++) { experts_to += model->param_sizes[k]; }
    double replicated = grad_sum_squares(model, 0, experts_from) + grad_sum_squares(model, experts_to, model->num_parameters);
    double experts = grad_sum_squares(model, experts_from, experts_to);
    allreduce_doubles(&experts, 1, &model->comm);
    return (float)sqrt(replicated + experts);
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
    gpu_comm_free(&model->gcomm);
    if (model->lsh_layouts != NULL) {
        for (int m = 0; m < num_moe_layers(&model->config); m++) { lsh_layout_free(&model->lsh_layouts[m]); }
        lsh_scratch_free(&model->lsh_scratch);
        cudaCheck(cudaFree(model->lsh_R));
    }
    free(model->lsh_layouts);
    free(model->host_lsh_R);
    free(model->routing_memory);
    free(model->host_buckets.tokens);
    free(model->host_bucket_counts);
    free(model->host_inputs);
    free(model->host_losses);
    free(model->host_lse);
    free(model->host_prob_sums);
    free(model->host_lb_f);
    free(model->host_total);
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
    gpu_select_device(&comm);
    matmul_init();
    GPT2 model;
    gpt2_build(&model, &start.config, start.params, comm);
    if (start.m != NULL) { gpt2_set_moments(&model, start.m, start.v); }
    free(start.params); free(start.m); free(start.v);
    model.capacity_factor = args.capacity_factor;
    model.aux_loss_weight = args.aux_w;
    model.z_loss_weight = args.z_w;
    // the wire carries floatX rows: bf16 already in the bf16 build, and the fp32 test build has no
    // bf16 rows to send (-Q is the CPU trainer's way to try a bf16 wire)
    if (args.wire_bf16 && sizeof(floatX) != 2) { fail_exit("flag -Q 1: this fp32 build sends fp32 rows; the bf16 build's wire is bf16 already"); }
    LSHConfig lsh = {args.lsh_L, args.lsh_dp, args.lsh_center, args.lsh_compensate};
    char err[1024];
    if (gpt2_set_lsh(&model, lsh, args.sources, args.seed, err, sizeof(err)) != 0) { fail_exit("flags -J/-P/-V: %s", err); }
    const GPT2Config* cfg = &model.config;
    int B = args.B, T = args.T;
    int grad_accum = args.total_batch / (B * T * W);

    // data, tokenizer, output folder and main.log
    DataLoader train_loader, val_loader;
    run_open_data(&train_loader, &val_loader, &args, &start, cfg->vocab_size, &comm);
    Tokenizer tokenizer;
    int have_tokenizer = run_open_tokenizer(&tokenizer, &args, &comm);
    RunLog log = run_log_open(&args, cfg, &start, &comm);
    log.wire_bytes = (int)sizeof(floatX);
    char device[320];
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    snprintf(device, sizeof(device), "| device                | %s, %s", prop.name, PRECISION_NAME);
    print_run_table(&args, cfg, &start, W, train_loader.num_tokens, val_loader.num_tokens, device);

    TrainState state = start.state;
    int* gen_tokens = (int*)mallocCheck(args.genT * sizeof(int));
    long long* load = (long long*)callocCheck(log.E > 0 ? log.E : 1, sizeof(long long));
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

        // one optimizer step: grad_accum micro-batches, gradients summed over ranks, AdamW
        double t0 = now_seconds();
        StepStats st;
        step_stats_begin(&st, load, log.E);
        gpt2_zero_grad(&model);
        model.step = step;
        for (int micro = 0; micro < grad_accum; micro++) {
            dataloader_next_batch(&train_loader);
            gpt2_forward(&model, train_loader.inputs, train_loader.targets, B, T);
            gpt2_backward(&model, 1.0f / (grad_accum * W));
            step_stats_add(&st, model.mean_loss, model.lb_loss, model.z_loss, grad_accum, &model.stats,
                           model.routing.counts, log.Lm, W, log.E);
        }
        gpt2_allreduce_grads(&model);
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
    free(load);
    gpt2_free(&model);
    matmul_free();
    comm_finalize(&comm);
    return 0;
}
#endif

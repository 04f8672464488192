/*
GPT-2 with Mixture-of-Experts layers: the CPU reference trainer (fp32, OpenMP).

This file is the readable specification of the model: every layer's forward and backward is
written out by hand, in the order data flows, as in llm.c's train_gpt2.c. Layer l is an MoE layer
when l % moe_every == moe_every - 1 (and E > 1); other layers keep GPT-2's dense MLP.

An MoE layer (moe_layer_forward), for the N = B*T token rows x after ln2 on this process:
  1. moe_router_forward    logits = x @ Wr^T (fp32), softmax, top-k, gates, z-loss
  2. allgather_ints        every rank's per-expert slot counts; moe_load_balance_forward gives
                           the load-balancing loss of the whole batch
  3. moe_capacity_plan     each expert keeps its first cap slots in (source rank, slot) order
  4. moe_dispatch_layout   the kept slots sorted stably by expert (moe_layout.h, shared with the GPU)
  5. moe_dispatch_forward  gather their rows; lsh_groups_compress (optional, lshmoe.h) replaces
                           each (expert, source) group by its bucket centroids
  6. alltoall_rows         dispatch: each rank receives its experts' rows (MPI, or a copy)
  7. moe_experts_forward   each expert is a GPT-2 MLP of hidden size H over its rows
  8. alltoall_rows         combine: the outputs go back; lsh_groups_decompress adds the residual
  9. moe_combine_forward   out[t] = sum over t's kept slots of gate * expert output
moe_layer_backward runs the same steps in reverse, with two more all-to-alls.

Expert parallelism: W processes under mpirun (-DUSE_MPI, comm.h), rank r holds experts
[r*E/W, (r+1)*E/W); everything else is replicated and its gradients summed (gpt2_allreduce_grads).
Without MPI, W = 1 and the same code runs with the all-to-alls as copies.

Conventions: activations are written (=), gradients accumulate (+=); the gradient buffers start
at zero and gpt2_update zeroes them as it reads them. Shapes are in comments: B batch, T time,
C channels, V vocab, Vp padded vocab, L layers, NH heads, E experts, K top-k, H expert hidden,
N = B*T tokens, S = N*K slots, W processes, Ld / Lm the number of dense / MoE layers.

Build and run: see README.md (`make run`, `make test`).
*/
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef OMP
#include <omp.h>
#endif
#include "utils.h"      // defines: fail_exit, printf0, mallocCheck, callocCheck, AtomicFile, now_seconds, normal_fill
#include "comm.h"       // defines: Comm, alltoall_rows, allgather_ints, allreduce_floats, comm_check_all, ...
#include "model.h"      // defines: GPT2Config, ParameterTensors, PARAM_*, checkpoint_load, checkpoint_save, ...
#include "moe_layout.h" // defines: MoEStats, moe_capacity_plan, moe_dispatch_layout, moe_groups_layout, ...
#include "lshmoe.h"     // defines: LSHConfig, lsh_group_compress, lsh_group_decompress, ...
#include "dataloader.h" // defines: DataLoader, dataloader_init, dataloader_next_batch, ...
#include "tokenizer.h"  // defines: Tokenizer, tokenizer_decode, safe_printf
#include "train.h"      // defines: TrainArgs, parse_args, run_start, StepStats, log_step, ...
#ifdef USE_BLAS
#include <cblas.h>      // the Makefile's BLAS build (OpenBLAS); make BLAS=0 keeps the loops below
#endif

// ----------------------------------------------------------------------------
// activations and the MoE layers' routing (the config and the parameters are in model.h)

#define NUM_ACTIVATION_TENSORS 31
typedef struct {
    float* encoded;       // (B, T, C)
    float* ln1;           // (L, B, T, C)
    float* ln1_mean;      // (L, B, T)
    float* ln1_rstd;      // (L, B, T)
    float* qkv;           // (L, B, T, 3*C)
    float* atty;          // (L, B, T, C)
    float* preatt;        // (L, B, NH, T, T)
    float* att;           // (L, B, NH, T, T)
    float* attproj;       // (L, B, T, C)
    float* residual2;     // (L, B, T, C)
    float* ln2;           // (L, B, T, C)
    float* ln2_mean;      // (L, B, T)
    float* ln2_rstd;      // (L, B, T)
    float* fch;           // (Ld, B, T, 4*C)
    float* fch_gelu;      // (Ld, B, T, 4*C)
    float* mlpout;        // (L, B, T, C) output of the dense MLP or of the MoE layer
    float* residual3;     // (L, B, T, C)
    float* lnf;           // (B, T, C)
    float* lnf_mean;      // (B, T)
    float* lnf_rstd;      // (B, T)
    float* logits;        // (B, T, Vp)
    float* probs;         // (B, T, Vp)
    float* losses;        // (B, T)
    float* router_logits; // (Lm, N, E)
    float* router_probs;  // (Lm, N, E)
    float* gates;         // (Lm, N, K)
    float* moe_y;         // (Lm, S, C) expert outputs back at the sender, in send order (S = N*K)
    float* expin;         // (Lm, W*S, C) rows received by this rank's experts, grouped by expert
    float* exph;          // (Lm, W*S, H)
    float* exph_gelu;     // (Lm, W*S, H)
    float* expout;        // (Lm, W*S, C)
} ActivationTensors;

// W*S rows bound what one rank's experts can receive (dropless, every token to one rank).
// grads = 1: the sizes of their gradients, where tensors without one (the layernorms' statistics,
// the logits and probabilities, the losses) get none: the backward writes dlogits over the probs.
void fill_in_activation_sizes(size_t* act_sizes, const GPT2Config* config, size_t B, size_t T, int W, int grads) {
    size_t C = config->channels, NH = config->num_heads, L = config->num_layers, Vp = config->padded_vocab_size;
    size_t Ld = num_dense_layers(config), Lm = num_moe_layers(config);
    size_t E = config->num_experts, K = config->top_k, H = config->expert_hidden;
    size_t N = B * T, S = N * K, WS = (size_t)W * S;
    if (Lm == 0) { WS = 0; }
    size_t G = grads ? 0 : 1;
    size_t sizes[NUM_ACTIVATION_TENSORS] = {
        N * C, L * N * C, G * L * N, G * L * N, L * N * 3 * C, L * N * C, L * B * NH * T * T, L * B * NH * T * T,
        L * N * C, L * N * C, L * N * C, G * L * N, G * L * N, Ld * N * 4 * C, Ld * N * 4 * C, L * N * C,
        L * N * C, N * C, G * N, G * N, G * N * Vp, G * N * Vp, G * N,
        Lm * N * E, Lm * N * E, Lm * N * K, Lm * S * C, Lm * WS * C, Lm * WS * H, Lm * WS * H, Lm * WS * C};
    memcpy(act_sizes, sizes, sizeof(sizes));
}

float* malloc_and_point_activations(ActivationTensors* acts, const size_t* act_sizes) {
    size_t num_activations = 0;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { num_activations += act_sizes[i]; }
    float* acts_memory = (float*)callocCheck(num_activations, sizeof(float));
    float** ptrs[] = {
        &acts->encoded, &acts->ln1, &acts->ln1_mean, &acts->ln1_rstd, &acts->qkv, &acts->atty,
        &acts->preatt, &acts->att, &acts->attproj, &acts->residual2, &acts->ln2, &acts->ln2_mean,
        &acts->ln2_rstd, &acts->fch, &acts->fch_gelu, &acts->mlpout, &acts->residual3, &acts->lnf,
        &acts->lnf_mean, &acts->lnf_rstd, &acts->logits, &acts->probs, &acts->losses,
        &acts->router_logits, &acts->router_probs, &acts->gates, &acts->moe_y, &acts->expin, &acts->exph,
        &acts->exph_gelu, &acts->expout};
    float* iter = acts_memory;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) {
        *(ptrs[i]) = act_sizes[i] > 0 ? iter : NULL;
        iter += act_sizes[i];
    }
    return acts_memory;
}

// buffers the MoE layers share (one layer runs at a time): the all-to-alls' staging rows, their
// LSH centroids, and small per-layer scratch, each with one meaning
typedef struct {
    float* sendbuf;   // (W*S, C) rows this rank sends, grouped by expert (their gradients in the backward)
    float* recvbuf;   // (W*S, C) rows it receives
    float* lsh_cent;  // (S, C) LSH: centroids sent (their gradients in the backward)
    float* lsh_ycent; // (S, C) LSH: expert outputs per centroid (their input gradients in the backward)
    float* lsh_R;     // (L*dp, C) LSH projections of the layer and step
    void* lsh_scratch; // lsh_scratch_bytes(S, C)
    int* total;       // (E) slots the whole batch routed to each expert
    int* fill;        // (E) moe_dispatch_layout's scratch
    int* my_wire;     // (E) LSH: centroid rows this rank sends each expert
} MoEBuffers;

typedef struct {
    GPT2Config config;
    Comm comm;   // the expert-parallel group: W processes (W = 1 without MPI)
    int E_local; // experts held here: E / W
    int e0;      // the first of them: rank * E_local
    // weights, their gradients, AdamW moments: one allocation of num_parameters floats each
    ParameterTensors params;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    float* params_memory;
    size_t num_parameters;
    ParameterTensors grads;
    float* grads_memory;
    float* m_memory;
    float* v_memory;
    // activations, their gradients, routing and MoE buffers, allocated at the first forward
    ActivationTensors acts;
    size_t act_sizes[NUM_ACTIVATION_TENSORS];
    float* acts_memory;
    size_t grads_act_sizes[NUM_ACTIVATION_TENSORS];
    ActivationTensors grads_acts;
    float* grads_acts_memory;
    MoERouting routing;
    int* routing_memory;
    MoEBuffers buffers;
    int batch_size; // B of the allocation (this rank's tokens)
    int seq_len;    // T of the allocation
    int* inputs;    // (B, T) of the last forward
    int* targets;   // (B, T) of the last forward
    // MoE hyperparameters of the run (not part of the checkpoint)
    float capacity_factor; // <= 0: dropless
    float aux_loss_weight; // load-balancing loss weight
    float z_loss_weight;   // router z-loss weight
    // results of the last forward on this rank's tokens; -1 when it had no targets
    float mean_loss;  // cross-entropy
    float lb_loss;    // load-balancing loss summed over MoE layers, unweighted
    float z_loss;     // z-loss summed over MoE layers, unweighted
    float total_loss; // what the backward differentiates: ce + aux_w * lb + z_w * z
    MoEStats stats;   // dropped slots, all-to-all rows, LSH: of the last forward and backward
    float lb_scale, z_scale; // d(loss)/d(lb), d(loss)/d(z) of the backward in progress
    int sources;      // V: the simulated source ranks of each process (groups are (expert, source))
    // LSH compression of the all-to-alls (lshmoe.h); lsh.L == 0: off
    LSHConfig lsh;
    uint64_t lsh_seed; // projections are drawn per (MoE layer, step) from it
    int wire_bf16;     // round every row an all-to-all carries to bf16 (-Q 1), as a bf16 wire would
    int step;          // the optimizer step, set by the caller
} GPT2;

// ----------------------------------------------------------------------------
// dense layers (as llm.c's train_gpt2.c)

void encoder_forward(float* out,                             // (B,T,C)
                     const int* inp, const float* wte, const float* wpe, // (B,T), (Vp,C), (maxT,C)
                     int B, int T, int C) {
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* out_bt = out + b * T * C + t * C;
            const float* wte_ix = wte + inp[b * T + t] * C;
            const float* wpe_t = wpe + t * C;
            for (int i = 0; i < C; i++) { out_bt[i] = wte_ix[i] + wpe_t[i]; }
        }
    }
}

void encoder_backward(float* dwte, float* dwpe,       // (Vp,C), (maxT,C)
                      const float* dout, const int* inp, // (B,T,C), (B,T)
                      int B, int T, int C) {
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const float* dout_bt = dout + b * T * C + t * C;
            float* dwte_ix = dwte + inp[b * T + t] * C;
            float* dwpe_t = dwpe + t * C;
            for (int i = 0; i < C; i++) { dwte_ix[i] += dout_bt[i]; dwpe_t[i] += dout_bt[i]; }
        }
    }
}

void layernorm_forward(float* out, float* mean, float* rstd,  // (N,C), (N), (N)
                       const float* inp, const float* weight, const float* bias, // (N,C), (C), (C)
                       int N, int C) {
    const float eps = 1e-5f;
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* x = inp + i * C;
        float m = 0.0f;
        for (int c = 0; c < C; c++) { m += x[c]; }
        m = m / C;
        float v = 0.0f;
        for (int c = 0; c < C; c++) { float d = x[c] - m; v += d * d; }
        v = v / C;
        float s = 1.0f / sqrtf(v + eps);
        float* o = out + i * C;
        for (int c = 0; c < C; c++) { o[c] = (s * (x[c] - m)) * weight[c] + bias[c]; }
        mean[i] = m;
        rstd[i] = s;
    }
}

#define LAYERNORM_COLUMNS 64
void layernorm_backward(float* dinp, float* dweight, float* dbias, // (N,C), (C), (C)
                        const float* dout, const float* inp, const float* weight, // (N,C), (N,C), (C)
                        const float* mean, const float* rstd, int N, int C) { // (N), (N)
    // dinp, row by row: two reductions, the mean of dnorm and of dnorm * norm
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        const float* dout_i = dout + i * C;
        const float* inp_i = inp + i * C;
        float* dinp_i = dinp + i * C;
        float m = mean[i], s = rstd[i];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int c = 0; c < C; c++) {
            float norm = (inp_i[c] - m) * s;
            float dnorm = weight[c] * dout_i[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * norm;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        for (int c = 0; c < C; c++) {
            float norm = (inp_i[c] - m) * s;
            float dnorm = weight[c] * dout_i[c];
            dinp_i[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
    // dweight, dbias: sums over the rows in order, a block of columns per thread, so the result
    // does not depend on the thread count
    #pragma omp parallel for schedule(static)
    for (int c0 = 0; c0 < C; c0 += LAYERNORM_COLUMNS) {
        int c1 = C - c0 < LAYERNORM_COLUMNS ? C : c0 + LAYERNORM_COLUMNS;
        for (int i = 0; i < N; i++) {
            const float* dout_i = dout + i * C;
            const float* inp_i = inp + i * C;
            for (int c = c0; c < c1; c++) {
                float norm = (inp_i[c] - mean[i]) * rstd[i];
                dbias[c] += dout_i[c];
                dweight[c] += norm * dout_i[c];
            }
        }
    }
}

// out = inp @ weight^T + bias. The loops below are the specification and the build without BLAS:
// rows go in tiles of 8 so that each weight row, loaded once into L1, serves 8 dot products (the
// (Vp, C) LM head is far bigger than cache, and streaming it once per row would make the step
// memory-bound); each output is one sequential dot product, so the result does not depend on the
// thread count. The BLAS build computes the same products with OpenBLAS's sgemm (its OpenMP build
// shares the trainer's threads): ~3x faster, the same bits run to run, but its blocking makes a
// result depend on the thread count and the matrix shapes by fp32 rounding (README).
#define MATMUL_TILE 8
void matmul_forward(float* out,                        // (N,OC)
                    const float* inp,                  // (N,C)
                    const float* weight, const float* bias, // (OC,C), (OC) or NULL
                    int N, int C, int OC) {
#ifdef USE_BLAS
    if (N == 0 || OC == 0) { return; }
    if (bias != NULL) { // out = bias, then out += inp @ weight^T
        #pragma omp parallel for schedule(static)
        for (int i = 0; i < N; i++) { memcpy(out + (size_t)i * OC, bias, (size_t)OC * sizeof(float)); }
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, bias != NULL ? 1.0f : 0.0f, out, OC);
    return;
#endif
    #pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < N; i0 += MATMUL_TILE) {
        int rows = N - i0 < MATMUL_TILE ? N - i0 : MATMUL_TILE;
        for (int o = 0; o < OC; o++) {
            const float* w = weight + (size_t)o * C;
            float b = (bias != NULL) ? bias[o] : 0.0f;
            for (int u = 0; u < rows; u++) {
                const float* x = inp + (size_t)(i0 + u) * C;
                float val = 0.0f;
                for (int c = 0; c < C; c++) { val += x[c] * w[c]; }
                out[(size_t)(i0 + u) * OC + o] = val + b;
            }
        }
    }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, // (N,C), (OC,C), (OC) or NULL
                     const float* dout, const float* inp, const float* weight, // (N,OC), (N,C), (OC,C)
                     int N, int C, int OC) {
#ifdef USE_BLAS
    if (N == 0 || OC == 0) { return; }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    if (dbias != NULL) { // sums over rows in order, each output channel by one thread
        #pragma omp parallel for schedule(static)
        for (int o = 0; o < OC; o++) {
            float sum = 0.0f;
            for (int i = 0; i < N; i++) { sum += dout[(size_t)i * OC + o]; }
            dbias[o] += sum;
        }
    }
    return;
#endif
    // dinp += dout @ weight: tiles of rows, each weight row read once per tile
    #pragma omp parallel for schedule(static)
    for (int i0 = 0; i0 < N; i0 += MATMUL_TILE) {
        int rows = N - i0 < MATMUL_TILE ? N - i0 : MATMUL_TILE;
        for (int o = 0; o < OC; o++) {
            const float* w = weight + (size_t)o * C;
            for (int u = 0; u < rows; u++) {
                float d = dout[(size_t)(i0 + u) * OC + o];
                float* dinp_i = dinp + (size_t)(i0 + u) * C;
                for (int c = 0; c < C; c++) { dinp_i[c] += w[c] * d; }
            }
        }
    }
    // dweight += dout^T @ inp, dbias += sum of dout: tiles of output channels, each input row
    // read once per tile
    #pragma omp parallel for schedule(static)
    for (int o0 = 0; o0 < OC; o0 += MATMUL_TILE) {
        int outs = OC - o0 < MATMUL_TILE ? OC - o0 : MATMUL_TILE;
        for (int i = 0; i < N; i++) {
            const float* x = inp + (size_t)i * C;
            for (int v = 0; v < outs; v++) {
                float d = dout[(size_t)i * OC + o0 + v];
                float* dw = dweight + (size_t)(o0 + v) * C;
                for (int c = 0; c < C; c++) { dw[c] += x[c] * d; }
                if (dbias != NULL) { dbias[o0 + v] += d; }
            }
        }
    }
}

void attention_forward(float* out, float* preatt, float* att, // (B,T,C), (B,NH,T,T), (B,NH,T,T)
                       const float* inp, int B, int T, int C, int NH) { // (B,T,3C) holding q,k,v
    int C3 = C * 3;
    int hs = C / NH;
    float scale = 1.0f / sqrtf(hs);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
                const float* query_t = inp + b * T * C3 + t * C3 + h * hs;
                float* preatt_bth = preatt + b * NH * T * T + h * T * T + t * T;
                float* att_bth = att + b * NH * T * T + h * T * T + t * T;
                // pass 1: q.k and the max, causal (t2 <= t)
                float maxval = -10000.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* key_t2 = inp + b * T * C3 + t2 * C3 + h * hs + C;
                    float val = 0.0f;
                    for (int i = 0; i < hs; i++) { val += query_t[i] * key_t2[i]; }
                    val *= scale;
                    if (val > maxval) { maxval = val; }
                    preatt_bth[t2] = val;
                }
                // pass 2: softmax
                float expsum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    float expv = expf(preatt_bth[t2] - maxval);
                    expsum += expv;
                    att_bth[t2] = expv;
                }
                float expsum_inv = expsum == 0.0f ? 0.0f : 1.0f / expsum;
                for (int t2 = 0; t2 < T; t2++) {
                    att_bth[t2] = (t2 <= t) ? att_bth[t2] * expsum_inv : 0.0f;
                }
                // pass 3: weighted sum of values
                float* out_bth = out + b * T * C + t * C + h * hs;
                for (int i = 0; i < hs; i++) { out_bth[i] = 0.0f; }
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* value_t2 = inp + b * T * C3 + t2 * C3 + h * hs + C * 2;
                    float a = att_bth[t2];
                    for (int i = 0; i < hs; i++) { out_bth[i] += a * value_t2[i]; }
                }
            }
        }
    }
}

void attention_backward(float* dinp, float* dpreatt, float* datt, // (B,T,3C), (B,NH,T,T), (B,NH,T,T)
                        const float* dout, const float* inp, const float* att, // (B,T,C), (B,T,3C), (B,NH,T,T)
                        int B, int T, int C, int NH) {
    int C3 = C * 3;
    int hs = C / NH;
    float scale = 1.0f / sqrtf(hs);
    // one thread per (batch, head): their gradients touch disjoint columns, and within one each
    // element still sums over t in order, so the result does not depend on the thread count
    #pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            for (int t = 0; t < T; t++) {
                const float* att_bth = att + b * NH * T * T + h * T * T + t * T;
                float* datt_bth = datt + b * NH * T * T + h * T * T + t * T;
                float* dpreatt_bth = dpreatt + b * NH * T * T + h * T * T + t * T;
                float* dquery_t = dinp + b * T * C3 + t * C3 + h * hs;
                const float* query_t = inp + b * T * C3 + t * C3 + h * hs;
                // backward of pass 3
                const float* dout_bth = dout + b * T * C + t * C + h * hs;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* value_t2 = inp + b * T * C3 + t2 * C3 + h * hs + C * 2;
                    float* dvalue_t2 = dinp + b * T * C3 + t2 * C3 + h * hs + C * 2;
                    for (int i = 0; i < hs; i++) {
                        datt_bth[t2] += value_t2[i] * dout_bth[i];
                        dvalue_t2[i] += att_bth[t2] * dout_bth[i];
                    }
                }
                // backward of pass 2 (softmax): the Jacobian att_t3 (delta_t2t3 - att_t2) applied to
                // datt is att * (datt - <att, datt>), one dot product instead of a (t+1)^2 loop
                float att_datt = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { att_datt += att_bth[t2] * datt_bth[t2]; }
                for (int t3 = 0; t3 <= t; t3++) { dpreatt_bth[t3] += att_bth[t3] * (datt_bth[t3] - att_datt); }
                // backward of pass 1
                for (int t2 = 0; t2 <= t; t2++) {
                    const float* key_t2 = inp + b * T * C3 + t2 * C3 + h * hs + C;
                    float* dkey_t2 = dinp + b * T * C3 + t2 * C3 + h * hs + C;
                    for (int i = 0; i < hs; i++) {
                        dquery_t[i] += key_t2[i] * dpreatt_bth[t2] * scale;
                        dkey_t2[i] += query_t[i] * dpreatt_bth[t2] * scale;
                    }
                }
            }
        }
    }
}

// e^x within 1.3 ulp (glibc's expf: 1 ulp) in a form gcc vectorises, where expf stays one call
// per element (5x faster over the softmax's 50,257 logits): x = k ln2 + r with |r| <= ln2/2, e^r by
// its Taylor series to r^7 (error < 1e-8), 2^k put straight into the exponent bits. x is clamped
// to [-87.3, 88.3] (so 2^k stays a normal float; e^-87.3 ~ 1e-38 is where expf reaches 0 anyway);
// NaN fails both comparisons and comes out NaN. The two fmaf keep ln2 split in two parts exact
// (plain a - b + c could be reassociated under -fassociative-math).
static inline float exp_fast(float x) {
    if (sizeof(float) != 4) { return expf(x); } // test_moe_f64 builds this file with float = double
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float k = floorf(x * 1.44269504f + 0.5f); // round(x / ln2)
    float r = fmaf(k, 2.12194440e-4f, fmaf(-k, 0.693359375f, x)); // x - k ln2, ln2 = 0.693359375 - 2.12194440e-4
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
    int32_t bits = ((int32_t)k + 127) << 23; // 2^k
    float two_k;
    memcpy(&two_k, &bits, sizeof(two_k));
    return p * two_k;
}

#define GELU_SCALING_FACTOR sqrtf(2.0f / M_PI)
// tanh(u) = 1 - 2 / (e^(2u) + 1): within 2e-7 of the exact tanh (glibc's tanhf: 1e-7), and
// vectorised, where glibc's tanhf is a slow call that made GELU a seventh of the step; +-1 for
// large |u|, NaN for NaN
static inline float gelu_tanh(float u) { return 1.0f - 2.0f / (exp_fast(2.0f * u) + 1.0f); }

void gelu_forward(float* out, const float* inp, int n) { // tanh approximation, as GPT-2
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        out[i] = 0.5f * x * (1.0f + gelu_tanh(GELU_SCALING_FACTOR * (x + cube)));
    }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int n) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        float tanh_out = gelu_tanh(GELU_SCALING_FACTOR * (x + cube));
        float sech2 = 1.0f - tanh_out * tanh_out; // 1 / cosh^2
        float local_grad = 0.5f * (1.0f + tanh_out) + x * 0.5f * sech2 * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += local_grad * dout[i];
    }
}

void residual_forward(float* out, const float* inp1, const float* inp2, int n) {
    for (int i = 0; i < n; i++) { out[i] = inp1[i] + inp2[i]; }
}

void residual_backward(float* dinp1, float* dinp2, const float* dout, int n) {
    for (int i = 0; i < n; i++) { dinp1[i] += dout[i]; dinp2[i] += dout[i]; }
}

// softmax over the first V of Vp logits; the padded tail gets probability 0
void softmax_forward(float* probs, const float* logits, int N, int V, int Vp) { // (N,Vp), (N,Vp)
    #pragma omp parallel for
    for (int i = 0; i < N; i++) {
        const float* logits_i = logits + (size_t)i * Vp;
        float* probs_i = probs + (size_t)i * Vp;
        float maxval = -10000.0f;
        for (int v = 0; v < V; v++) { if (logits_i[v] > maxval) { maxval = logits_i[v]; } }
        float sum = 0.0f;
        for (int v = 0; v < V; v++) { probs_i[v] = exp_fast(logits_i[v] - maxval); sum += probs_i[v]; }
        for (int v = 0; v < V; v++) { probs_i[v] /= sum; }
        for (int v = V; v < Vp; v++) { probs_i[v] = 0.0f; }
    }
}

void crossentropy_forward(float* losses, const float* probs, const int* targets, // (N), (N,Vp), (N)
                          int N, int Vp) {
    for (int i = 0; i < N; i++) { losses[i] = -logf(probs[(size_t)i * Vp + targets[i]]); }
}

// dlogits = (probs - onehot(target)) * dloss, for the mean loss over N tokens scaled by loss_scale;
// dlogits may be probs itself (in place, as llm.c's fused classifier); the padded tail gets 0
void crossentropy_softmax_backward(float* dlogits, // (N,Vp)
                                   const float* probs, const int* targets, // (N,Vp), (N)
                                   float dloss, int N, int V, int Vp) {
    #pragma omp parallel for schedule(static)
    for (int i = 0; i < N; i++) {
        float* dlogits_i = dlogits + (size_t)i * Vp;
        const float* probs_i = probs + (size_t)i * Vp;
        for (int v = V; v < Vp; v++) { dlogits_i[v] = 0.0f; }
        for (int v = 0; v < V; v++) {
            float indicator = v == targets[i] ? 1.0f : 0.0f;
            dlogits_i[v] = (probs_i[v] - indicator) * dloss;
        }
    }
}

// ----------------------------------------------------------------------------
// the MoE layer's kernels
//
// With W processes (expert parallelism), rank r owns experts [r*E/W, (r+1)*E/W). Each rank routes
// its own N tokens; the S = N*K slots travel to the experts' owners and back:
//   sender:   route -> count -> (all ranks' counts) -> capacity -> layout -> gather rows
//   dispatch: all-to-all of rows (rows to rank q are q's experts' rows, in expert order)
//   receiver: reorder by expert -> experts -> reorder by source
//   combine:  all-to-all back -> gate-weighted sum per token
// With W = 1 the all-to-alls are copies and the reorderings are the identity. Where each slot
// goes (capacity, dispatch layout, groups, receive layout) is moe_layout.h's plain C.

// router: logits = x @ Wr^T (fp32), softmax, top-k by probability (ties to the lower expert
// index), gates = the chosen probabilities (renormalised to sum 1 when renorm and K > 1).
// Counts the slots routed to each expert; returns the router z-loss of these tokens.
void moe_router_forward(float* logits, float* probs, // (N,E), (N,E)
                        int* expert_idx, float* gates, int* expert_counts, // (N,K), (N,K), (E)
                        float* z_loss,
                        const float* x, const float* routerw, // (N,C), (E,C)
                        int N, int C, int E, int K, int renorm) {
    matmul_forward(logits, x, routerw, NULL, N, C, E);
    for (int e = 0; e < E; e++) { expert_counts[e] = 0; }
    double z = 0.0;
    for (int i = 0; i < N; i++) {
        const float* logits_i = logits + i * E;
        float* probs_i = probs + i * E;
        float maxval = logits_i[0];
        for (int e = 1; e < E; e++) { if (logits_i[e] > maxval) { maxval = logits_i[e]; } }
        float sum = 0.0f;
        for (int e = 0; e < E; e++) { probs_i[e] = expf(logits_i[e] - maxval); sum += probs_i[e]; }
        for (int e = 0; e < E; e++) { probs_i[e] /= sum; }
        float lse = maxval + logf(sum);
        z += (double)lse * lse;
        // top-k: K passes of argmax over the experts not chosen yet
        float gate_sum = 0.0f;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) { if (expert_idx[i * K + jj] == e) { taken = 1; } }
                if (!taken && (best < 0 || probs_i[e] > probs_i[best])) { best = e; }
            }
            expert_idx[i * K + j] = best;
            gates[i * K + j] = probs_i[best];
            gate_sum += probs_i[best];
            expert_counts[best]++;
        }
        if (renorm && K > 1) {
            for (int j = 0; j < K; j++) { gates[i * K + j] /= gate_sum; }
        }
    }
    *z_loss = (float)(z / N);
}

// Switch load balancing E * sum_e f_e * P_e: f_e = counts[e] / slots from the routed slots of the
// whole batch (all ranks, before capacity), P_e the mean of the full softmax over these N tokens.
// Averaged over ranks (equal N each) it is the loss of the whole batch.
float moe_load_balance_forward(const float* probs, const int* counts, long long slots, int N, int E) { // (N,E), (E)
    double lb = 0.0;
    for (int e = 0; e < E; e++) {
        double P = 0.0;
        for (int i = 0; i < N; i++) { P += probs[i * E + e]; }
        lb += ((double)counts[e] / slots) * (P / N);
    }
    return (float)(E * lb);
}

// dgates: gradient at the gates (from the combine); lb_scale, z_scale: d(loss)/d(lb), d(loss)/d(z)
void moe_router_backward(float* dx, float* drouterw, // (N,C), (E,C)
                         float* dlogits, float* dprobs, // (N,E), (N,E) scratch, overwritten
                         const float* dgates, // (N,K)
                         const float* x, const float* routerw, // (N,C), (E,C)
                         const float* logits, const float* probs, // (N,E), (N,E)
                         const int* expert_idx, const float* gates, // (N,K), (N,K)
                         const int* counts, long long slots, // (E) as in moe_load_balance_forward
                         float lb_scale, float z_scale,
                         int N, int C, int E, int K, int renorm) {
    for (int i = 0; i < N; i++) {
        const float* probs_i = probs + i * E;
        const float* logits_i = logits + i * E;
        float* dprobs_i = dprobs + i * E;
        float* dlogits_i = dlogits + i * E;
        const int* idx_i = expert_idx + i * K;
        const float* dg_i = dgates + i * K;
        // load balancing: d(E * sum_e f_e * mean_t p_te)/dp_te = E * f_e / N
        for (int e = 0; e < E; e++) {
            dprobs_i[e] = lb_scale * E * (float)((double)counts[e] / slots) / N;
        }
        // gates: g_j = p_j / s with s = sum of the chosen p, so dp_j = (dg_j - sum_j' dg_j' g_j') / s
        if (renorm && K > 1) {
            float s = 0.0f, dot = 0.0f;
            for (int j = 0; j < K; j++) { s += probs_i[idx_i[j]]; dot += dg_i[j] * gates[i * K + j]; }
            for (int j = 0; j < K; j++) { dprobs_i[idx_i[j]] += (dg_i[j] - dot) / s; }
        } else {
            for (int j = 0; j < K; j++) { dprobs_i[idx_i[j]] += dg_i[j]; }
        }
        // softmax backward, plus the z-loss: d(lse^2)/dlogit_e = 2 lse p_e
        float pd = 0.0f;
        for (int e = 0; e < E; e++) { pd += probs_i[e] * dprobs_i[e]; }
        float maxval = logits_i[0];
        for (int e = 1; e < E; e++) { if (logits_i[e] > maxval) { maxval = logits_i[e]; } }
        float sum = 0.0f;
        for (int e = 0; e < E; e++) { sum += expf(logits_i[e] - maxval); }
        float lse = maxval + logf(sum);
        float dlse = z_scale * 2.0f * lse / N;
        for (int e = 0; e < E; e++) {
            dlogits_i[e] = probs_i[e] * (dprobs_i[e] - pd) + dlse * probs_i[e];
        }
    }
    matmul_backward(dx, drouterw, NULL, dlogits, x, routerw, N, C, E);
}

// gathers the kept slots' token rows into the send buffer
void moe_dispatch_forward(float* sendbuf, // (R,C) rows grouped by expert
                          const float* x, const int* row_slot, // (N,C), (R)
                          int R, int C, int K) {
    for (int r = 0; r < R; r++) {
        memcpy(sendbuf + (size_t)r * C, x + (size_t)(row_slot[r] / K) * C, C * sizeof(float));
    }
}

void moe_dispatch_backward(float* dx, // (N,C)
                           const float* dsendbuf, const int* row_slot, // (R,C), (R)
                           int R, int C, int K) {
    for (int r = 0; r < R; r++) {
        float* dx_i = dx + (size_t)(row_slot[r] / K) * C;
        const float* d = dsendbuf + (size_t)r * C;
        for (int c = 0; c < C; c++) { dx_i[c] += d[c]; }
    }
}

// what a bf16 wire does to the rows it carries (-Q 1): each float rounded to the nearest bf16, ties
// to even (NaN kept NaN). Applied in place before every all-to-all, local rows too, so the result
// does not depend on how the experts are split. The backward passes gradients through unchanged.
static inline float bf16_round(float x) {
    if (sizeof(float) != 4) { return x; } // test_moe_f64 (float = double) never sets -Q
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return x; } // NaN
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}
void wire_round_rows(const GPT2* model, float* rows, int R, int C) { // (R,C)
    if (!model->wire_bf16) { return; }
    #pragma omp parallel for
    for (long long i = 0; i < (long long)R * C; i++) { rows[i] = bf16_round(rows[i]); }
}

// received order -> expert order (out[perm[i]] = in[i]), and back (out[i] = in[perm[i]])
void moe_rows_to_experts(float* out, const float* in, const int* perm, int R, int C) { // (R,C), (R,C), (R)
    for (int i = 0; i < R; i++) { memcpy(out + (size_t)perm[i] * C, in + (size_t)i * C, C * sizeof(float)); }
}
void moe_rows_to_sources(float* out, const float* in, const int* perm, int R, int C) {
    for (int i = 0; i < R; i++) { memcpy(out + (size_t)i * C, in + (size_t)perm[i] * C, C * sizeof(float)); }
}

// the experts' indices, most rows first (insertion sort, stable): run side by side, the big ones
// start first and the small ones fill in behind them (largest-first scheduling), so that no thread
// is left alone with a big one at the end (MoE d6 E=8 K=1 B=4: ~6 ms of a 350 ms step)
static void experts_by_rows(int* order, const int* expert_offsets, int E) { // (E), (E+1)
    for (int i = 0; i < E; i++) {
        int rows = expert_offsets[i + 1] - expert_offsets[i], j = i;
        for (; j > 0 && expert_offsets[order[j - 1] + 1] - expert_offsets[order[j - 1]] < rows; j--) { order[j] = order[j - 1]; }
        order[j] = i;
    }
}

// each expert is a GPT-2 MLP: y = W2 gelu(W1 x + b1) + b2, over its own rows
void moe_experts_forward(float* exph, float* exph_gelu, float* expout, // (R,H), (R,H), (R,C)
                         const float* expin, const int* expert_offsets, // (R,C), (E+1)
                         const float* expfcw, const float* expfcb, // (E,H,C), (E,H)
                         const float* expprojw, const float* expprojb, // (E,C,H), (E,C)
                         int E, int C, int H) {
    // experts side by side, one thread each (the matmuls and GELU inside run on that thread): an
    // expert's few rows are too small a matmul to split well over threads; the biggest first
    int order[MAX_EXPERTS];
    experts_by_rows(order, expert_offsets, E);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < E; i++) {
        int e = order[i], r0 = expert_offsets[e], n = expert_offsets[e + 1] - r0;
        if (n == 0) { continue; }
        matmul_forward(exph + (size_t)r0 * H, expin + (size_t)r0 * C, expfcw + (size_t)e * H * C, expfcb + e * H, n, C, H);
        gelu_forward(exph_gelu + (size_t)r0 * H, exph + (size_t)r0 * H, n * H);
        matmul_forward(expout + (size_t)r0 * C, exph_gelu + (size_t)r0 * H, expprojw + (size_t)e * C * H, expprojb + e * C, n, H, C);
    }
}

void moe_experts_backward(float* dexpin, float* dexph, float* dexph_gelu, // (R,C), (R,H), (R,H)
                          float* dexpfcw, float* dexpfcb, float* dexpprojw, float* dexpprojb, // (E,H,C), (E,H), (E,C,H), (E,C)
                          const float* dexpout, // (R,C)
                          const float* expin, const float* exph, const float* exph_gelu, // (R,C), (R,H), (R,H)
                          const int* expert_offsets, // (E+1)
                          const float* expfcw, const float* expprojw, // (E,H,C), (E,C,H)
                          int E, int C, int H) {
    int order[MAX_EXPERTS];
    experts_by_rows(order, expert_offsets, E);
    #pragma omp parallel for schedule(dynamic, 1)
    for (int i = 0; i < E; i++) {
        int e = order[i], r0 = expert_offsets[e], n = expert_offsets[e + 1] - r0;
        if (n == 0) { continue; }
        matmul_backward(dexph_gelu + (size_t)r0 * H, dexpprojw + (size_t)e * C * H, dexpprojb + e * C,
                        dexpout + (size_t)r0 * C, exph_gelu + (size_t)r0 * H, expprojw + (size_t)e * C * H, n, H, C);
        gelu_backward(dexph + (size_t)r0 * H, exph + (size_t)r0 * H, dexph_gelu + (size_t)r0 * H, n * H);
        matmul_backward(dexpin + (size_t)r0 * C, dexpfcw + (size_t)e * H * C, dexpfcb + e * H,
                        dexph + (size_t)r0 * H, expin + (size_t)r0 * C, expfcw + (size_t)e * H * C, n, C, H);
    }
}

// out[i] = sum over token i's kept slots of gate * expert output (y: rows in send order)
void moe_combine_forward(float* out, // (N,C)
                         const float* y, const float* gates, const int* slot_row, // (R,C), (N,K), (S)
                         int N, int C, int K) {
    for (int i = 0; i < N; i++) {
        float* out_i = out + (size_t)i * C;
        for (int c = 0; c < C; c++) { out_i[c] = 0.0f; }
        for (int j = 0; j < K; j++) {
            int r = slot_row[i * K + j];
            if (r < 0) { continue; } // dropped: the token keeps only its residual for this slot
            const float* y_r = y + (size_t)r * C;
            float g = gates[i * K + j];
            for (int c = 0; c < C; c++) { out_i[c] += g * y_r[c]; }
        }
    }
}

void moe_combine_backward(float* dy, float* dgates, // (R,C), (N,K)
                          const float* dout, const float* y, const float* gates, const int* slot_row, // (N,C), (R,C), (N,K), (S)
                          int N, int C, int K) {
    for (int i = 0; i < N; i++) {
        const float* dout_i = dout + (size_t)i * C;
        for (int j = 0; j < K; j++) {
            int r = slot_row[i * K + j];
            if (r < 0) { continue; }
            const float* y_r = y + (size_t)r * C;
            float* dy_r = dy + (size_t)r * C;
            float g = gates[i * K + j];
            float dg = 0.0f;
            for (int c = 0; c < C; c++) { dy_r[c] += g * dout_i[c]; dg += dout_i[c] * y_r[c]; }
            dgates[i * K + j] += dg;
        }
    }
}


// ----------------------------------------------------------------------------
// LSH compression of one MoE layer's all-to-alls: lshmoe.h's four group-level calls, applied to
// every group (e, v) of the send buffer, rows [group_rows[g], group_rows[g+1]) with g = e*V + v

// LSH-MoE sec. 3: each group is hashed and replaced by its bucket centroids (buffers.lsh_cent,
// centroid rows [group_cents[g], group_cents[g+1])); buffers.my_wire (E) receives the centroid rows
// sent to each expert. Returns the centroid rows that cross ranks.
long long lsh_groups_compress(GPT2* model, const MoERouting* rt, int m) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, V = model->sources, W = model->comm.world, rank = model->comm.rank;
    MoEBuffers* buf = &model->buffers;
    lsh_projections_init(buf->lsh_R, model->lsh.L, model->lsh.dp, C, lsh_seed(model->lsh_seed, m, model->step));
    int per_owner = E / (W * V);
    long long crossing = 0;
    rt->group_cents[0] = 0;
    for (int e = 0; e < E; e++) {
        buf->my_wire[e] = 0;
        for (int v = 0; v < V; v++) {
            int g = e * V + v, r0 = rt->group_rows[g], n = rt->group_rows[g + 1] - r0, c0 = rt->group_cents[g];
            int mg = lsh_group_compress(buf->lsh_cent + (size_t)c0 * C, rt->bucket_of_row + r0, rt->bucket_size + c0,
                                        buf->sendbuf + (size_t)r0 * C, n, C, buf->lsh_R, &model->lsh,
                                        buf->lsh_scratch, &model->stats.lsh);
            rt->group_cents[g + 1] = c0 + mg;
            buf->my_wire[e] += mg;
            if (e / per_owner != rank * V + v) { crossing += mg; }
        }
    }
    return crossing;
}

// LSH-MoE Eq. 5: y (S,C) in send order, each row its centroid's output (buffers.lsh_ycent) plus the
// residual x_i - c_b the sender kept (without compensation, the centroid's output alone)
void lsh_groups_decompress(GPT2* model, float* y, const MoERouting* rt) {
    int C = model->config.channels, G = model->config.num_experts * model->sources;
    MoEBuffers* buf = &model->buffers;
    for (int g = 0; g < G; g++) {
        int r0 = rt->group_rows[g], c0 = rt->group_cents[g];
        lsh_group_decompress(y + (size_t)r0 * C, buf->lsh_ycent + (size_t)c0 * C, buf->sendbuf + (size_t)r0 * C,
                             buf->lsh_cent + (size_t)c0 * C, rt->bucket_of_row + r0, rt->group_rows[g + 1] - r0, C,
                             &model->lsh, &model->stats.lsh);
    }
}

// backward of the decompression: one gradient row per centroid, G_b = sum of its rows' gradients
// dy (S,C), into buffers.lsh_cent; this is what the combine's backward sends
void lsh_groups_decompress_backward(GPT2* model, const float* dy, const MoERouting* rt) {
    int C = model->config.channels, G = model->config.num_experts * model->sources;
    for (int g = 0; g < G; g++) {
        int r0 = rt->group_rows[g], c0 = rt->group_cents[g];
        lsh_group_decompress_backward(model->buffers.lsh_cent + (size_t)c0 * C, dy + (size_t)r0 * C, rt->bucket_of_row + r0,
                                      rt->group_rows[g + 1] - r0, rt->group_cents[g + 1] - c0, C, &model->stats.lsh);
    }
}

// backward of the compression, with the buckets held fixed: the gradient of each send row into
// buffers.sendbuf, dx_i = g_i + (J^T G_b - G_b) / n_b (compensated) or J^T G_b / n_b, from dy (S,C)
// and the centroids' input gradients J^T G_b (buffers.lsh_ycent)
void lsh_groups_compress_backward(GPT2* model, const float* dy, const MoERouting* rt) {
    int C = model->config.channels, G = model->config.num_experts * model->sources;
    MoEBuffers* buf = &model->buffers;
    memset(buf->sendbuf, 0, (size_t)rt->group_rows[G] * C * sizeof(float));
    for (int g = 0; g < G; g++) {
        int r0 = rt->group_rows[g], c0 = rt->group_cents[g];
        lsh_group_compress_backward(buf->sendbuf + (size_t)r0 * C, dy + (size_t)r0 * C, buf->lsh_ycent + (size_t)c0 * C,
                                    buf->lsh_cent + (size_t)c0 * C, rt->bucket_of_row + r0, rt->bucket_size + c0,
                                    rt->group_rows[g + 1] - r0, C, &model->lsh, &model->stats.lsh);
    }
}

// ----------------------------------------------------------------------------
// the MoE layer: the kernels above in the nine steps of the list at the top of the file

// the routing tensors of MoE layer m, for a forward of N tokens
MoERouting moe_layer_routing(const GPT2* model, int m, int N) {
    const GPT2Config* c = &model->config;
    size_t WS = (size_t)model->comm.world * model->batch_size * model->seq_len * c->top_k; // rows one rank's experts can receive
    return moe_routing_layer(model->routing, m, (size_t)N * c->top_k, WS, model->comm.world, c->num_experts, model->E_local,
                             model->sources, model->lsh.L > 0);
}

// the rows this rank sends its experts' owners (and gets gradients back for): with LSH one per
// centroid, else one per kept slot
int moe_sent_rows(const GPT2* model, const MoERouting* rt) {
    int E = model->config.num_experts;
    return model->lsh.L > 0 ? rt->group_cents[E * model->sources] : rt->send_offsets[E];
}

// the MoE tensors of layer m among a's (activations or their gradients); the others as they are
ActivationTensors moe_layer_acts(ActivationTensors a, const GPT2* model, int m, int N) {
    const GPT2Config* c = &model->config;
    size_t C = c->channels, E = c->num_experts, H = c->expert_hidden, S = (size_t)N * c->top_k;
    size_t WS = (size_t)model->comm.world * model->batch_size * model->seq_len * c->top_k;
    a.router_logits += m * N * E;
    a.router_probs += m * N * E;
    a.gates += m * S;
    a.moe_y += m * S * C;
    a.expin += m * WS * C;
    a.exph += m * WS * H;
    a.exph_gelu += m * WS * H;
    a.expout += m * WS * C;
    return a;
}

// the forward of MoE layer m on this rank's N tokens x (N,C) after ln2; out (N,C) is written.
// Returns this rank's share of the layer's load-balancing and z-losses through lb and z.
void moe_layer_forward(GPT2* model, int m, float* out, const float* x, int N, float* lb, float* z) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K, V = model->sources, rank = model->comm.rank;
    const ParameterTensors* p = &model->params;
    ActivationTensors a = moe_layer_acts(model->acts, model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);
    MoEBuffers* buf = &model->buffers;
    MoEStats* st = &model->stats;

    // 1-2. route this rank's tokens, then share the counts: capacity and f_e need the whole batch
    int* my_counts = rt.counts + (size_t)rank * E;
    moe_router_forward(a.router_logits, a.router_probs, rt.expert_idx, a.gates, my_counts, z, x,
                       p->routerw + (size_t)m * E * C, N, C, E, K, cfg->renorm_gates);
    memcpy(rt.kept, my_counts, E * sizeof(int)); // allgather's send buffer may not alias its output
    allgather_ints(rt.kept, rt.counts, E, &model->comm);
    *lb = moe_load_balance_forward(a.router_probs, moe_total_counts(buf->total, rt.counts, W, E), (long long)S * W, N, E);
    // 3-4. capacity over the whole batch, then this rank's kept slots sorted by expert
    int cap = moe_capacity(model->capacity_factor, (long long)N * W, K, E);
    st->dropped_slots += moe_capacity_plan(rt.kept, rt.counts, W, E, cap);
    moe_dispatch_layout(rt.slot_row, rt.row_slot, rt.send_offsets, buf->fill, rt.expert_idx, rt.kept + (size_t)rank * E, S, E);
    // 5. gather their rows, by expert then by source; with LSH each group becomes its centroids,
    // whose counts the count exchange carries (known only after hashing)
    moe_dispatch_forward(buf->sendbuf, x, rt.row_slot, rt.send_offsets[E], C, K);
    long long crossing = moe_groups_layout(rt.group_rows, rt.send_offsets, rt.row_slot, N, K, E, V, rank, W);
    st->wire_rows[0] += crossing;
    float* dispatched = buf->sendbuf;
    if (model->lsh.L > 0) {
        crossing = lsh_groups_compress(model, &rt, m);
        allgather_ints(buf->my_wire, rt.wire, E, &model->comm);
        dispatched = buf->lsh_cent;
    } else {
        memcpy(rt.wire, rt.kept, (size_t)W * E * sizeof(int));
    }
    st->wire_rows[1] += crossing;
    // 6. dispatch: each rank receives its experts' rows, regrouped by expert
    moe_send_rows(rt.send_rows, rt.wire, rank, W, E);
    int R = moe_receive_layout(rt.recv_perm, rt.expert_offsets, rt.recv_rows, rt.wire, W, E, model->e0, El);
    wire_round_rows(model, dispatched, moe_sent_rows(model, &rt), C);
    alltoall_rows(dispatched, rt.send_rows, buf->recvbuf, rt.recv_rows, C, &model->comm);
    moe_rows_to_experts(a.expin, buf->recvbuf, rt.recv_perm, R, C);
    // 7. the experts held here
    moe_experts_forward(a.exph, a.exph_gelu, a.expout, a.expin, rt.expert_offsets,
                        p->expfcw + (size_t)m * El * H * C, p->expfcb + (size_t)m * El * H,
                        p->expprojw + (size_t)m * El * C * H, p->expprojb + (size_t)m * El * C, El, C, H);
    // 8. combine: the outputs go back to their senders; with LSH one per centroid, plus the residual
    moe_rows_to_sources(buf->recvbuf, a.expout, rt.recv_perm, R, C);
    wire_round_rows(model, buf->recvbuf, R, C);
    if (model->lsh.L > 0) {
        alltoall_rows(buf->recvbuf, rt.recv_rows, buf->lsh_ycent, rt.send_rows, C, &model->comm);
        lsh_groups_decompress(model, a.moe_y, &rt);
    } else {
        alltoall_rows(buf->recvbuf, rt.recv_rows, a.moe_y, rt.send_rows, C, &model->comm);
    }
    // 9. the gate-weighted sum per token
    moe_combine_forward(out, a.moe_y, a.gates, rt.slot_row, N, C, K);
    moe_count_alltoalls(st, 0, rt.send_rows, rt.recv_rows, rank, W);
}

// the backward of MoE layer m: dout (N,C) at its output, x (N,C) its input; dx (N,C) accumulates
void moe_layer_backward(GPT2* model, int m, float* dx, const float* dout, const float* x, int N) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K, rank = model->comm.rank;
    const ParameterTensors* p = &model->params;
    ParameterTensors* g = &model->grads;
    ActivationTensors a = moe_layer_acts(model->acts, model, m, N);
    ActivationTensors da = moe_layer_acts(model->grads_acts, model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);
    MoEBuffers* buf = &model->buffers;
    int R = rt.expert_offsets[El];
    // 9. combine backward: gradients at the gates and at the expert outputs
    moe_combine_backward(da.moe_y, da.gates, dout, a.moe_y, a.gates, rt.slot_row, N, C, K);
    float* dsent = da.moe_y;
    if (model->lsh.L > 0) { // one gradient row per centroid, so this all-to-all shrinks too
        lsh_groups_decompress_backward(model, da.moe_y, &rt);
        dsent = buf->lsh_cent;
    }
    wire_round_rows(model, dsent, moe_sent_rows(model, &rt), C);
    // 8. the output gradients go to the experts' owners
    alltoall_rows(dsent, rt.send_rows, buf->recvbuf, rt.recv_rows, C, &model->comm);
    moe_rows_to_experts(da.expout, buf->recvbuf, rt.recv_perm, R, C);
    // 7. the experts' backward: weight gradients here, input gradients back
    moe_experts_backward(da.expin, da.exph, da.exph_gelu,
                         g->expfcw + (size_t)m * El * H * C, g->expfcb + (size_t)m * El * H,
                         g->expprojw + (size_t)m * El * C * H, g->expprojb + (size_t)m * El * C,
                         da.expout, a.expin, a.exph, a.exph_gelu,
                         rt.expert_offsets, p->expfcw + (size_t)m * El * H * C, p->expprojw + (size_t)m * El * C * H, El, C, H);
    // 6. dispatch backward: the input gradients go back to their senders
    moe_rows_to_sources(buf->recvbuf, da.expin, rt.recv_perm, R, C);
    wire_round_rows(model, buf->recvbuf, R, C);
    if (model->lsh.L > 0) {
        alltoall_rows(buf->recvbuf, rt.recv_rows, buf->lsh_ycent, rt.send_rows, C, &model->comm);
        lsh_groups_compress_backward(model, da.moe_y, &rt);
    } else {
        alltoall_rows(buf->recvbuf, rt.recv_rows, buf->sendbuf, rt.send_rows, C, &model->comm);
    }
    // 5. scatter-added per token
    moe_dispatch_backward(dx, buf->sendbuf, rt.row_slot, rt.send_offsets[E], C, K);
    // 1-2. router backward, with f_e of the whole batch
    moe_router_backward(dx, g->routerw + (size_t)m * E * C, da.router_logits, da.router_probs,
                        da.gates, x, p->routerw + (size_t)m * E * C, a.router_logits,
                        a.router_probs, rt.expert_idx, a.gates, moe_total_counts(buf->total, rt.counts, W, E),
                        (long long)S * W, model->lb_scale, model->z_scale, N, C, E, K, cfg->renorm_gates);
    moe_count_alltoalls(&model->stats, 2, rt.send_rows, rt.recv_rows, rank, W);
}

// ----------------------------------------------------------------------------
// the model: build, forward, backward, update

// Builds a model of config for this process of comm (its experts only) around params_memory,
// this rank's parameters (count_parameters floats, host), which it takes over; NULL: zeros.
// Everything else is allocated at the first forward.
void gpt2_build(GPT2* model, const GPT2Config* config, float* params_memory, Comm comm) {
    memset(model, 0, sizeof(GPT2));
    model->config = *config;
    model->comm = comm;
    model->E_local = experts_per_rank(config, comm.world);
    model->e0 = comm.rank * model->E_local;
    fill_in_parameter_sizes(model->param_sizes, config, model->E_local);
    model->num_parameters = count_parameters(model->param_sizes);
    model->params_memory = params_memory != NULL ? params_memory : (float*)callocCheck(model->num_parameters, sizeof(float));
    point_parameters(&model->params, model->params_memory, model->param_sizes);
    model->capacity_factor = 0.0f;
    model->aux_loss_weight = 0.01f;
    model->z_loss_weight = 0.001f;
    model->mean_loss = -1.0f;
    model->sources = 1;
}

// GPT-2's initialisation (model.h) of this rank's parameters
void gpt2_init_random(GPT2* model, uint64_t seed) {
    gpt2_init_params(&model->params, model->param_sizes, &model->config, model->E_local, model->e0, seed);
}

// switches LSH compression on for an MoE model (before its first forward); 0 or an error in err
int gpt2_set_lsh(GPT2* model, LSHConfig lsh, int sources, uint64_t seed, char* err, size_t errlen) {
    if (moe_lsh_check(model->config.num_experts, lsh, sources, model->comm.world, err, errlen) != 0) { return -1; }
    if (model->acts_memory != NULL) { snprintf(err, errlen, "gpt2_set_lsh: call it before the first forward"); return -1; }
    model->lsh = lsh;
    model->sources = sources;
    model->lsh_seed = seed;
    return 0;
}

// activations, routing and MoE buffers for this rank's B x T tokens
void gpt2_allocate_activations(GPT2* model, size_t B, size_t T) {
    const GPT2Config* cfg = &model->config;
    size_t C = cfg->channels, E = cfg->num_experts, S = B * T * cfg->top_k, W = model->comm.world;
    int lsh = model->lsh.L > 0;
    model->batch_size = B;
    model->seq_len = T;
    fill_in_activation_sizes(model->act_sizes, cfg, B, T, W, 0);
    model->acts_memory = malloc_and_point_activations(&model->acts, model->act_sizes);
    model->routing_memory = moe_routing_allocate(&model->routing, num_moe_layers(cfg), B * T * cfg->top_k, W, E, model->E_local, model->sources, lsh);
    model->inputs = (int*)mallocCheck(B * T * sizeof(int));
    model->targets = (int*)mallocCheck(B * T * sizeof(int));
    if (num_moe_layers(cfg) == 0) { return; }
    MoEBuffers* buf = &model->buffers;
    buf->sendbuf = (float*)callocCheck(W * S * C, sizeof(float));
    buf->recvbuf = (float*)callocCheck(W * S * C, sizeof(float));
    buf->total = (int*)callocCheck(3 * E, sizeof(int));
    buf->fill = buf->total + E;
    buf->my_wire = buf->total + 2 * E;
    if (lsh) {
        buf->lsh_cent = (float*)callocCheck(S * C, sizeof(float));
        buf->lsh_ycent = (float*)callocCheck(S * C, sizeof(float));
        buf->lsh_R = (float*)mallocCheck((size_t)model->lsh.L * model->lsh.dp * C * sizeof(float));
        buf->lsh_scratch = mallocCheck(lsh_scratch_bytes((int)S, (int)C));
    }
}

void gpt2_forward(GPT2* model, const int* inputs, const int* targets, size_t B, size_t T) {
    const GPT2Config* cfg = &model->config;
    size_t V = cfg->vocab_size, Vp = cfg->padded_vocab_size, L = cfg->num_layers;
    size_t NH = cfg->num_heads, C = cfg->channels;
    size_t N = B * T;
    for (size_t i = 0; i < N; i++) {
        if (inputs[i] < 0 || (size_t)inputs[i] >= V) { fail_exit("gpt2_forward: input token %d out of range [0, %zu)", inputs[i], V); }
        if (targets != NULL && (targets[i] < 0 || (size_t)targets[i] >= V)) { fail_exit("gpt2_forward: target token %d out of range [0, %zu)", targets[i], V); }
    }
    // lazily allocate activations for the first (largest) B, T seen
    if (model->acts_memory == NULL) {
        gpt2_allocate_activations(model, B, T);
    } else if (B * T > (size_t)model->batch_size * model->seq_len || T > (size_t)model->seq_len) {
        fail_exit("gpt2_forward: B=%zu T=%zu exceed the allocated B=%d T=%d", B, T, model->batch_size, model->seq_len);
    }
    memcpy(model->inputs, inputs, N * sizeof(int));
    if (targets != NULL) { memcpy(model->targets, targets, N * sizeof(int)); }

    ParameterTensors p = model->params;
    ActivationTensors a = model->acts;
    float lb_sum = 0.0f, z_sum = 0.0f;
    memset(&model->stats, 0, sizeof(MoEStats));
    encoder_forward(a.encoded, inputs, p.wte, p.wpe, B, T, C);
    for (size_t l = 0; l < L; l++) {
        float* residual = l == 0 ? a.encoded : a.residual3 + (l - 1) * N * C;
        float* l_ln1 = a.ln1 + l * N * C;
        float* l_qkv = a.qkv + l * N * 3 * C;
        float* l_atty = a.atty + l * N * C;
        float* l_preatt = a.preatt + l * B * NH * T * T;
        float* l_att = a.att + l * B * NH * T * T;
        float* l_attproj = a.attproj + l * N * C;
        float* l_residual2 = a.residual2 + l * N * C;
        float* l_ln2 = a.ln2 + l * N * C;
        float* l_mlpout = a.mlpout + l * N * C;
        float* l_residual3 = a.residual3 + l * N * C;
        layernorm_forward(l_ln1, a.ln1_mean + l * N, a.ln1_rstd + l * N, residual, p.ln1w + l * C, p.ln1b + l * C, N, C);
        matmul_forward(l_qkv, l_ln1, p.qkvw + l * 3 * C * C, p.qkvb + l * 3 * C, N, C, 3 * C);
        attention_forward(l_atty, l_preatt, l_att, l_qkv, B, T, C, NH);
        matmul_forward(l_attproj, l_atty, p.attprojw + l * C * C, p.attprojb + l * C, N, C, C);
        residual_forward(l_residual2, residual, l_attproj, N * C);
        layernorm_forward(l_ln2, a.ln2_mean + l * N, a.ln2_rstd + l * N, l_residual2, p.ln2w + l * C, p.ln2b + l * C, N, C);
        if (is_moe_layer(cfg, l)) {
            float lb, z;
            moe_layer_forward(model, moe_layer_index(cfg, l), l_mlpout, l_ln2, N, &lb, &z);
            lb_sum += lb;
            z_sum += z;
        } else {
            size_t d = dense_layer_index(cfg, l);
            float* l_fch = a.fch + d * N * 4 * C;
            float* l_fch_gelu = a.fch_gelu + d * N * 4 * C;
            matmul_forward(l_fch, l_ln2, p.fcw + d * 4 * C * C, p.fcb + d * 4 * C, N, C, 4 * C);
            gelu_forward(l_fch_gelu, l_fch, N * 4 * C);
            matmul_forward(l_mlpout, l_fch_gelu, p.fcprojw + d * C * 4 * C, p.fcprojb + d * C, N, 4 * C, C);
        }
        residual_forward(l_residual3, l_residual2, l_mlpout, N * C);
    }
    float* residual = a.residual3 + (L - 1) * N * C;
    layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, p.lnfw, p.lnfb, N, C);
    matmul_forward(a.logits, a.lnf, p.wte, NULL, N, C, Vp);
    softmax_forward(a.probs, a.logits, N, V, Vp);
    model->lb_loss = lb_sum;
    model->z_loss = z_sum;
    if (targets != NULL) {
        crossentropy_forward(a.losses, a.probs, targets, N, Vp);
        double mean_loss = 0.0;
        for (size_t i = 0; i < N; i++) { mean_loss += a.losses[i]; }
        model->mean_loss = (float)(mean_loss / N);
        model->total_loss = model->mean_loss + model->aux_loss_weight * lb_sum + model->z_loss_weight * z_sum;
    } else {
        model->mean_loss = -1.0f;
        model->total_loss = -1.0f;
    }
}

// the passes over all gradients go in blocks of this many floats (256 KiB), a thread each
#define GRAD_BLOCK 65536

// x[0..n) = 0 by every thread: one thread alone cannot saturate memory
static void zero_floats(float* x, size_t n) {
    size_t blocks = (n + GRAD_BLOCK - 1) / GRAD_BLOCK;
    #pragma omp parallel for schedule(static)
    for (size_t b = 0; b < blocks; b++) {
        size_t i0 = b * GRAD_BLOCK, len = n - i0 < GRAD_BLOCK ? n - i0 : GRAD_BLOCK;
        memset(x + i0, 0, len * sizeof(float));
    }
}

void gpt2_zero_grad(GPT2* model) {
    if (model->grads_memory != NULL) { zero_floats(model->grads_memory, model->num_parameters); }
}

// backward of the last forward's total loss times loss_scale; parameter gradients accumulate.
// loss_scale = 1 / (gradient accumulation steps * W): summed over ranks (gpt2_allreduce_grads),
// the gradients are those of the mean loss over the whole batch.
void gpt2_backward(GPT2* model, float loss_scale) {
    if (model->mean_loss == -1.0f) { fail_exit("gpt2_backward: the forward pass had no targets"); }
    if (model->grads_memory == NULL) {
        model->grads_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
        point_parameters(&model->grads, model->grads_memory, model->param_sizes);
        fill_in_activation_sizes(model->grads_act_sizes, &model->config, model->batch_size, model->seq_len, model->comm.world, 1);
        model->grads_acts_memory = malloc_and_point_activations(&model->grads_acts, model->grads_act_sizes);
    }
    const GPT2Config* cfg = &model->config;
    size_t B = model->batch_size, T = model->seq_len; // the full allocation: training uses it
    size_t V = cfg->vocab_size, Vp = cfg->padded_vocab_size, L = cfg->num_layers;
    size_t NH = cfg->num_heads, C = cfg->channels;
    size_t N = B * T;
    size_t num_acts = 0;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { num_acts += model->grads_act_sizes[i]; }
    zero_floats(model->grads_acts_memory, num_acts);

    ParameterTensors p = model->params;
    ParameterTensors g = model->grads;
    ActivationTensors a = model->acts;
    ActivationTensors da = model->grads_acts;
    model->lb_scale = loss_scale * model->aux_loss_weight;
    model->z_scale = loss_scale * model->z_loss_weight;

    float* dlogits = a.probs; // (N, Vp) written over the probs, which the backward needs no more
    crossentropy_softmax_backward(dlogits, a.probs, model->targets, loss_scale / N, N, V, Vp);
    matmul_backward(da.lnf, g.wte, NULL, dlogits, a.lnf, p.wte, N, C, Vp);
    float* residual = a.residual3 + (L - 1) * N * C;
    float* dresidual = da.residual3 + (L - 1) * N * C;
    layernorm_backward(dresidual, g.lnfw, g.lnfb, da.lnf, residual, p.lnfw, a.lnf_mean, a.lnf_rstd, N, C);
    for (int l = L - 1; l >= 0; l--) {
        residual = l == 0 ? a.encoded : a.residual3 + (l - 1) * N * C;
        dresidual = l == 0 ? da.encoded : da.residual3 + (l - 1) * N * C;
        float* dl_residual3 = da.residual3 + l * N * C;
        float* dl_residual2 = da.residual2 + l * N * C;
        float* dl_mlpout = da.mlpout + l * N * C;
        float* l_ln2 = a.ln2 + l * N * C;
        float* dl_ln2 = da.ln2 + l * N * C;
        residual_backward(dl_residual2, dl_mlpout, dl_residual3, N * C);
        if (is_moe_layer(cfg, l)) {
            moe_layer_backward(model, moe_layer_index(cfg, l), dl_ln2, dl_mlpout, l_ln2, N);
        } else {
            size_t d = dense_layer_index(cfg, l);
            float* l_fch = a.fch + d * N * 4 * C;
            float* l_fch_gelu = a.fch_gelu + d * N * 4 * C;
            float* dl_fch = da.fch + d * N * 4 * C;
            float* dl_fch_gelu = da.fch_gelu + d * N * 4 * C;
            matmul_backward(dl_fch_gelu, g.fcprojw + d * C * 4 * C, g.fcprojb + d * C, dl_mlpout, l_fch_gelu, p.fcprojw + d * C * 4 * C, N, 4 * C, C);
            gelu_backward(dl_fch, l_fch, dl_fch_gelu, N * 4 * C);
            matmul_backward(dl_ln2, g.fcw + d * 4 * C * C, g.fcb + d * 4 * C, dl_fch, l_ln2, p.fcw + d * 4 * C * C, N, C, 4 * C);
        }
        layernorm_backward(dl_residual2, g.ln2w + l * C, g.ln2b + l * C, dl_ln2, a.residual2 + l * N * C, p.ln2w + l * C,
                           a.ln2_mean + l * N, a.ln2_rstd + l * N, N, C);
        residual_backward(dresidual, da.attproj + l * N * C, dl_residual2, N * C);
        matmul_backward(da.atty + l * N * C, g.attprojw + l * C * C, g.attprojb + l * C, da.attproj + l * N * C,
                        a.atty + l * N * C, p.attprojw + l * C * C, N, C, C);
        attention_backward(da.qkv + l * N * 3 * C, da.preatt + l * B * NH * T * T, da.att + l * B * NH * T * T,
                           da.atty + l * N * C, a.qkv + l * N * 3 * C, a.att + l * B * NH * T * T, B, T, C, NH);
        matmul_backward(da.ln1 + l * N * C, g.qkvw + l * 3 * C * C, g.qkvb + l * 3 * C, da.qkv + l * N * 3 * C,
                        a.ln1 + l * N * C, p.qkvw + l * 3 * C * C, N, C, 3 * C);
        layernorm_backward(dresidual, g.ln1w + l * C, g.ln1b + l * C, da.ln1 + l * N * C, residual, p.ln1w + l * C,
                           a.ln1_mean + l * N, a.ln1_rstd + l * N, N, C);
    }
    encoder_backward(g.wte, g.wpe, da.encoded, model->inputs, B, T, C);
}

// data parallelism for the replicated tensors: their gradients are summed over ranks. Expert
// gradients stay on their owner (they already hold every rank's tokens' contributions).
void gpt2_allreduce_grads(GPT2* model) {
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        if (!param_is_expert(k)) { allreduce_floats(model->grads_memory + offset, model->param_sizes[k], &model->comm); }
        offset += model->param_sizes[k];
    }
}

// sum of x[i]^2 in double: blocks summed in parallel, then added in block order, so the result
// does not depend on the thread count
static double sum_squares(const float* x, size_t n) {
    double total = 0.0;
    size_t blocks = (n + GRAD_BLOCK - 1) / GRAD_BLOCK;
    #pragma omp parallel for ordered schedule(static, 1)
    for (size_t b = 0; b < blocks; b++) {
        size_t i0 = b * GRAD_BLOCK, i1 = n - i0 < GRAD_BLOCK ? n : i0 + GRAD_BLOCK;
        double s = 0.0;
        for (size_t i = i0; i < i1; i++) { s += (double)x[i] * x[i]; }
        #pragma omp ordered
        total += s;
    }
    return total;
}

// global gradient norm over every parameter of the model (all ranks' experts), in double
float gpt2_grad_norm(const GPT2* model) {
    double sums[2] = {0.0, 0.0}; // replicated (the same on every rank), this rank's experts
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        sums[param_is_expert(k)] += sum_squares(model->grads_memory + offset, model->param_sizes[k]);
        offset += model->param_sizes[k];
    }
    allreduce_doubles(&sums[1], 1, &model->comm);
    return (float)sqrt(sums[0] + sums[1]);
}

// AdamW with decoupled weight decay on the matrices and embeddings, on the gradients times
// grad_scale (grad_clip_scale of the global norm); t is the 1-based step of the bias correction.
// It zeroes each gradient as it reads it, for the next step: a separate pass (gpt2_zero_grad)
// took 13-17 ms of a 340 ms d6 MoE step, the zeroing here 3-7 ms (README, "Benchmark").
void gpt2_update(GPT2* model, float learning_rate, float beta1, float beta2, float eps,
                 float weight_decay, float grad_scale, int t) {
    if (model->m_memory == NULL) {
        model->m_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
        model->v_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
    }
    float bc1 = 1.0f - powf(beta1, t), bc2 = 1.0f - powf(beta2, t);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        float wd = param_decays(k) ? weight_decay : 0.0f;
        #pragma omp parallel for
        for (size_t i = offset; i < offset + model->param_sizes[k]; i++) {
            float param = model->params_memory[i];
            float grad = model->grads_memory[i] * grad_scale;
            float m = beta1 * model->m_memory[i] + (1.0f - beta1) * grad;
            float v = beta2 * model->v_memory[i] + (1.0f - beta2) * grad * grad;
            model->m_memory[i] = m;
            model->v_memory[i] = v;
            model->grads_memory[i] = 0.0f;
            float m_hat = m / bc1, v_hat = v / bc2;
            model->params_memory[i] = param - learning_rate * (m_hat / (sqrtf(v_hat) + eps) + wd * param);
        }
        offset += model->param_sizes[k];
    }
}

void gpt2_free(GPT2* model) {
    free(model->params_memory);
    free(model->grads_memory);
    free(model->m_memory);
    free(model->v_memory);
    free(model->acts_memory);
    free(model->grads_acts_memory);
    free(model->routing_memory);
    free(model->inputs);
    free(model->targets);
    MoEBuffers* buf = &model->buffers;
    free(buf->sendbuf);
    free(buf->recvbuf);
    free(buf->total);
    free(buf->lsh_cent);
    free(buf->lsh_ycent);
    free(buf->lsh_R);
    free(buf->lsh_scratch);
}

// ----------------------------------------------------------------------------
// checkpoints (the formats are model.h's), evaluation and sampling

// loads a checkpoint (upcycling a dense one when upcycle->num_experts > 1) for this process
// of comm; 0, or -1 with err set
int gpt2_load_checkpoint(GPT2* model, const char* path, const GPT2Config* upcycle, float noise,
                         uint64_t seed, Comm comm, char* err, size_t errlen) {
    GPT2Config c;
    float* params;
    if (checkpoint_load(path, upcycle, noise, seed, comm.rank, comm.world, &c, &params, err, errlen) != 0) { return -1; }
    gpt2_build(model, &c, params, comm);
    return 0;
}

// the model in the single-process format (collective: rank 0 gathers the experts and writes)
void gpt2_write_checkpoint(const GPT2* model, const char* path) {
    checkpoint_write(path, &model->config, model->params_memory, model->param_sizes, &model->comm);
}

// the model and every rank's training state of step s->step, in dir (collective)
void gpt2_save(const GPT2* model, const char* dir, const TrainState* s) {
    checkpoint_save(dir, s, &model->config, model->params_memory, model->m_memory, model->v_memory, model->param_sizes, &model->comm);
}

// the mean loss over steps batches of loader from its start, averaged over ranks
double gpt2_validate(GPT2* model, DataLoader* loader, int steps) {
    double val_loss = 0.0;
    dataloader_reset(loader);
    for (int i = 0; i < steps; i++) {
        dataloader_next_batch(loader);
        gpt2_forward(model, loader->inputs, loader->targets, loader->B, loader->T);
        val_loss += model->mean_loss;
    }
    return mean_over_ranks(val_loss / steps, &model->comm);
}

// generates genT tokens after an end-of-text token; dropless routing so that the sample does not
// depend on the capacity of a batch of one. Tokens go to out (genT), returns how many were made.
// Collective: every rank generates (the MoE layers exchange rows), the same tokens.
int gpt2_generate(GPT2* model, int* out, int genT, int eot, uint64_t* rng) {
    int maxT = model->seq_len < genT + 1 ? model->seq_len : genT + 1;
    int* tokens = (int*)mallocCheck(maxT * sizeof(int));
    tokens[0] = eot;
    float cf = model->capacity_factor;
    model->capacity_factor = 0.0f;
    int made = 0;
    for (int t = 1; t < maxT; t++) {
        gpt2_forward(model, tokens, NULL, 1, t);
        const float* probs = model->acts.probs + (size_t)(t - 1) * model->config.padded_vocab_size;
        tokens[t] = sample_mult(probs, model->config.vocab_size, random_f32(rng));
        out[made++] = tokens[t];
    }
    model->capacity_factor = cf;
    free(tokens);
    return made;
}

// ----------------------------------------------------------------------------
// main training loop
#ifndef TESTING
int main(int argc, char** argv) {
    Comm comm = comm_init(&argc, &argv);
    int W = comm.world;
    TrainArgs args;
    parse_args(&args, argc, argv, &comm);

    // the model: resumed, loaded from a checkpoint (maybe upcycled) or initialised (train.h)
    RunStart start;
    run_start(&start, &args, &comm);
    check_batch_fits(&args, &start.config, W);
    GPT2 model;
    gpt2_build(&model, &start.config, start.params, comm);
    model.m_memory = start.m; // AdamW's moments when resumed, else NULL (allocated at the first update)
    model.v_memory = start.v;
    model.capacity_factor = args.capacity_factor;
    model.aux_loss_weight = args.aux_w;
    model.z_loss_weight = args.z_w;
    model.wire_bf16 = args.wire_bf16;
    LSHConfig lsh = {args.lsh_L, args.lsh_dp, args.lsh_center, args.lsh_compensate};
    char err[1024];
    if (gpt2_set_lsh(&model, lsh, args.sources, args.seed, err, sizeof(err)) != 0) { fail_exit("flags -J/-P/-V: %s", err); }
    const GPT2Config* cfg = &model.config;
    int B = args.B, T = args.T; // B is per process, as in llm.c
    int grad_accum = args.total_batch / (B * T * W);

    // data, tokenizer, output folder and main.log
    DataLoader train_loader, val_loader;
    run_open_data(&train_loader, &val_loader, &args, &start, cfg->vocab_size, &comm);
    Tokenizer tokenizer;
    int have_tokenizer = run_open_tokenizer(&tokenizer, &args, &comm);
    RunLog log = run_log_open(&args, cfg, &start, &comm);
    char threads[128] = "";
#ifdef OMP
    snprintf(threads, sizeof(threads), "| OpenMP threads        | %d per process", omp_get_max_threads());
#endif
    print_run_table(&args, cfg, &start, W, train_loader.num_tokens, val_loader.num_tokens, threads[0] ? threads : NULL);

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
        model.step = step; // the gradients are zero: just allocated, or zeroed by gpt2_update
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
        st.ms = (now_seconds() - t0) * 1000.0;
        if (step > start.state.step) { log.total_ms += st.ms; log.timed_steps++; } // the first pays for allocation
        log_step(&log, step, &st);
    }

    run_log_close(&log);
    if (have_tokenizer) { tokenizer_free(&tokenizer); }
    dataloader_free(&train_loader);
    dataloader_free(&val_loader);
    free(gen_tokens);
    free(load);
    gpt2_free(&model);
    comm_finalize(&comm);
    return 0;
}
#endif

/*
GPT-2 with Mixture-of-Experts layers: the CPU reference trainer (fp32, OpenMP).

This file is the readable specification of the model: every layer's forward and backward is
written out by hand, in the order data flows, as in llm.c's train_gpt2.c. Layer l is an MoE layer
when l % moe_every == moe_every - 1 (and E > 1); other layers keep GPT-2's dense MLP.

An MoE layer (moe_layer_forward), for the N = B*T token rows x after ln2 on this process:
  moe_router_forward    logits = x @ Wr^T (fp32), softmax, top-k, gates, z-loss; the counts of
                        all ranks give the load-balancing loss (moe_load_balance_forward)
  moe_capacity_plan     each expert keeps its first cap slots in (source rank, slot) order
  moe_dispatch_layout   the kept slots sorted stably by expert (plain C, shared with the GPU path)
  moe_dispatch_forward  gather their rows; lsh_group_compress (optional, lshmoe.h) replaces each
                        (expert, source) group by its bucket centroids
  alltoall_rows         dispatch: each rank receives its experts' rows (MPI, or a copy)
  moe_experts_forward   each expert is a GPT-2 MLP of hidden size H over its rows
  alltoall_rows         combine: the outputs go back; lsh_group_decompress adds the residual
  moe_combine_forward   out[t] = sum over t's kept slots of gate * expert output
moe_layer_backward runs the same steps in reverse, with two more all-to-alls.

Expert parallelism: W processes under mpirun (-DUSE_MPI), rank r holds experts [r*E/W,
(r+1)*E/W); everything else is replicated and its gradients summed (gpt2_allreduce_grads).
Without MPI, W = 1 and the same code runs with the all-to-alls as copies.

Conventions: activations are written (=), gradients accumulate (+=); the gradient buffers are
zeroed by gpt2_zero_grad. Shapes are in comments: B batch, T time, C channels, V vocab, Vp padded
vocab, L layers, NH heads, E experts, K top-k, H expert hidden, N = B*T tokens, S = N*K slots,
Ld / Lm the number of dense / MoE layers.

Build and run: see README.md (`make run`, `make test`).
*/
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdarg.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <limits.h>
#include <assert.h>
#include <dirent.h>
#include <unistd.h>
#include <sys/stat.h>
#ifdef OMP
#include <omp.h>
#endif
#ifdef USE_MPI
#include <mpi.h>
#endif
#include "tokenizer.h"  // defines: Tokenizer, tokenizer_init, tokenizer_decode, tokenizer_free
#include "dataloader.h" // defines: DataLoader, dataloader_init, dataloader_next_batch, ...
#include "lshmoe.h"     // defines: LSHConfig, lsh_group_compress, lsh_group_decompress, ...

// ----------------------------------------------------------------------------
// error checking: each macro names the failing call, the file and the line

// printf on rank 0 only (every process is rank 0 without MPI)
static int process_rank = 0;
#define printf0(...) do { if (process_rank == 0) { printf(__VA_ARGS__); } } while (0)

// Errors print one line and exit non-zero. While every rank runs the same checks on the same
// input (flags, config), only rank 0 prints, so W processes give one line, not W.
static int errors_on_every_rank = 0; // set where ranks can fail for different reasons
static void fail_exit(const char* fmt, ...) {
    if (process_rank == 0 || errors_on_every_rank) {
        va_list args;
        va_start(args, fmt);
        fprintf(stderr, "error: ");
        if (process_rank > 0) { fprintf(stderr, "rank %d: ", process_rank); }
        vfprintf(stderr, fmt, args);
        fprintf(stderr, "\n");
        va_end(args);
    }
    exit(EXIT_FAILURE);
}

static void* malloc_check(size_t size, const char* file, int line) {
    void* ptr = malloc(size);
    if (ptr == NULL && size > 0) { fail_exit("malloc of %zu bytes failed at %s:%d", size, file, line); }
    return ptr;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static void* calloc_check(size_t n, size_t size, const char* file, int line) {
    void* ptr = calloc(n, size);
    if (ptr == NULL && n * size > 0) { fail_exit("calloc of %zu bytes failed at %s:%d", n * size, file, line); }
    return ptr;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

static FILE* fopen_check(const char* path, const char* mode, const char* file, int line) {
    FILE* fp = fopen(path, mode);
    if (fp == NULL) { fail_exit("could not open %s (mode %s) at %s:%d", path, mode, file, line); }
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

static void fwrite_check(const void* ptr, size_t size, size_t n, FILE* fp, const char* file, int line) {
    if (fwrite(ptr, size, n, fp) != n) { fail_exit("fwrite of %zu items failed at %s:%d", n, file, line); }
}
#define fwriteCheck(ptr, size, n, fp) fwrite_check(ptr, size, n, fp, __FILE__, __LINE__)

static void fclose_check(FILE* fp, const char* file, int line) {
    if (fclose(fp) != 0) { fail_exit("fclose failed at %s:%d", file, line); }
}
#define fcloseCheck(fp) fclose_check(fp, __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// random numbers: xorshift* for sampling and init, Box-Muller for normals (deterministic)

static uint32_t random_u32(uint64_t* state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static float random_f32(uint64_t* state) { // in [0, 1)
    return (random_u32(state) >> 8) / 16777216.0f;
}
static void normal_fill(float* out, size_t n, float std, uint64_t* state) {
    for (size_t i = 0; i < n; i++) {
        float u1 = random_f32(state), u2 = random_f32(state);
        out[i] = std * sqrtf(-2.0f * logf(1.0f - u1)) * cosf(2.0f * (float)M_PI * u2);
    }
}

// ----------------------------------------------------------------------------
// expert-parallel communication: W processes, MPI between them when built with -DUSE_MPI.
// Without MPI (or with W = 1) the same calls are local copies, so one code path serves both.

typedef struct {
    int rank;  // this process
    int world; // W
    int* scratch; // (4*W) counts and displacements for the v-collectives
#ifdef USE_MPI
    MPI_Comm mpi;
#endif
} Comm;

#ifdef USE_MPI
static void mpi_check(int status, const char* call, const char* file, int line) {
    if (status != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(status, msg, &len);
        fail_exit("%s failed at %s:%d: %s", call, file, line, msg);
    }
}
#define mpiCheck(call) mpi_check((call), #call, __FILE__, __LINE__)
#endif

Comm comm_make(int rank, int world) {
    Comm c;
    memset(&c, 0, sizeof(c));
    c.rank = rank;
    c.world = world;
    c.scratch = (int*)callocCheck(4 * world, sizeof(int));
    return c;
}

// the world of processes this run was launched with (mpirun), or a world of one
Comm comm_init(int* argc, char*** argv) {
#ifdef USE_MPI
    mpiCheck(MPI_Init(argc, argv));
    int rank, world;
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &world));
    Comm c = comm_make(rank, world);
    c.mpi = MPI_COMM_WORLD;
#else
    (void)argc; (void)argv;
    Comm c = comm_make(0, 1);
#endif
    process_rank = c.rank;
    return c;
}

// a world of one inside an MPI run (tests compare W ranks against it)
Comm comm_self(void) {
    Comm c = comm_make(0, 1);
#ifdef USE_MPI
    c.mpi = MPI_COMM_SELF;
#endif
    return c;
}

void comm_free(Comm* c) { free(c->scratch); c->scratch = NULL; }

void comm_finalize(Comm* c) {
    comm_free(c);
#ifdef USE_MPI
    MPI_Finalize();
#endif
}

// each rank sends send_rows[q] rows of C floats to rank q, in rank order, and receives
// recv_rows[q] rows from rank q, stored in rank order
void alltoall_rows(const float* send, const int* send_rows, float* recv, const int* recv_rows, // (sum send_rows, C), (W), ..
                   int C, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) {
        int W = comm->world;
        int* sc = comm->scratch; int* sd = sc + W; int* rc = sc + 2 * W; int* rd = sc + 3 * W;
        for (int q = 0, so = 0, ro = 0; q < W; q++) {
            sc[q] = send_rows[q] * C; sd[q] = so; so += sc[q];
            rc[q] = recv_rows[q] * C; rd[q] = ro; ro += rc[q];
        }
        mpiCheck(MPI_Alltoallv(send, sc, sd, MPI_FLOAT, recv, rc, rd, MPI_FLOAT, comm->mpi));
        return;
    }
#endif
    (void)recv_rows;
    if (send != recv) { memcpy(recv, send, (size_t)send_rows[0] * C * sizeof(float)); }
}

// recv (W*n) = every rank's n ints, in rank order
void allgather_ints(const int* send, int* recv, int n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Allgather(send, n, MPI_INT, recv, n, MPI_INT, comm->mpi)); return; }
#endif
    (void)comm;
    memcpy(recv, send, n * sizeof(int));
}

// in place: buf = sum over ranks of buf
void allreduce_floats(float* buf, size_t n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1 && n > 0) { mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, comm->mpi)); }
#endif
    (void)buf; (void)n; (void)comm;
}

void allreduce_doubles(double* buf, int n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, comm->mpi)); }
#endif
    (void)buf; (void)n; (void)comm;
}

// out (W*n) on rank 0 = every rank's n floats in rank order; out is unused elsewhere
void gather_floats(const float* send, float* out, size_t n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Gather(send, (int)n, MPI_FLOAT, out, (int)n, MPI_FLOAT, 0, comm->mpi)); return; }
#endif
    (void)comm;
    memcpy(out, send, n * sizeof(float));
}

void comm_barrier(const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Barrier(comm->mpi)); }
#endif
    (void)comm;
}

// A collective check: every rank says whether it failed (with a message). If any did, rank 0
// prints the lowest failing rank's message as one line and every rank exits non-zero, so a
// problem seen by one rank neither hangs the others nor prints W times.
void comm_check_all(int failed, const char* msg, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) {
        int first = failed ? comm->rank : comm->world;
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm->mpi));
        if (first == comm->world) { return; }
        char buf[1024] = {0};
        if (comm->rank == first) { snprintf(buf, sizeof(buf), "%s", msg); }
        mpiCheck(MPI_Bcast(buf, sizeof(buf), MPI_CHAR, first, comm->mpi));
        if (comm->rank == 0) {
            if (first > 0) { fprintf(stderr, "error: rank %d: %s\n", first, buf); }
            else { fprintf(stderr, "error: %s\n", buf); }
        }
        MPI_Finalize();
        exit(EXIT_FAILURE);
    }
#endif
    (void)comm;
    if (failed) { fail_exit("%s", msg); }
}

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

void layernorm_backward(float* dinp, float* dweight, float* dbias, // (N,C), (C), (C)
                        const float* dout, const float* inp, const float* weight, // (N,C), (N,C), (C)
                        const float* mean, const float* rstd, int N, int C) { // (N), (N)
    for (int i = 0; i < N; i++) {
        const float* dout_i = dout + i * C;
        const float* inp_i = inp + i * C;
        float* dinp_i = dinp + i * C;
        float m = mean[i], s = rstd[i];
        // two reductions: the mean of dnorm and of dnorm * norm
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
            dbias[c] += dout_i[c];
            dweight[c] += norm * dout_i[c];
            dinp_i[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

// out = inp @ weight^T + bias. Rows go in tiles of 8 so that each weight row, loaded once into L1,
// serves 8 dot products: the (Vp, C) LM head is far bigger than cache, and streaming it once per
// row would make the step memory-bound. Each output is one sequential dot product, so the result
// does not depend on the thread count (resume is bit-exact).
#define MATMUL_TILE 8
void matmul_forward(float* out,                        // (N,OC)
                    const float* inp,                  // (N,C)
                    const float* weight, const float* bias, // (OC,C), (OC) or NULL
                    int N, int C, int OC) {
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
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            for (int h = 0; h < NH; h++) {
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
                // backward of pass 2 (softmax)
                for (int t2 = 0; t2 <= t; t2++) {
                    for (int t3 = 0; t3 <= t; t3++) {
                        float indicator = t2 == t3 ? 1.0f : 0.0f;
                        float local_derivative = att_bth[t2] * (indicator - att_bth[t3]);
                        dpreatt_bth[t3] += local_derivative * datt_bth[t2];
                    }
                }
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

#define GELU_SCALING_FACTOR sqrtf(2.0f / M_PI)
void gelu_forward(float* out, const float* inp, int n) { // tanh approximation, as GPT-2
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALING_FACTOR * (x + cube)));
    }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int n) {
    for (int i = 0; i < n; i++) {
        float x = inp[i];
        float cube = 0.044715f * x * x * x;
        float tanh_arg = GELU_SCALING_FACTOR * (x + cube);
        float tanh_out = tanhf(tanh_arg);
        float coshf_out = coshf(tanh_arg);
        float sech_out = 1.0f / (coshf_out * coshf_out);
        float local_grad = 0.5f * (1.0f + tanh_out) + x * 0.5f * sech_out * GELU_SCALING_FACTOR * (1.0f + 3.0f * 0.044715f * x * x);
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
        for (int v = 0; v < V; v++) { probs_i[v] = expf(logits_i[v] - maxval); sum += probs_i[v]; }
        for (int v = 0; v < V; v++) { probs_i[v] /= sum; }
        for (int v = V; v < Vp; v++) { probs_i[v] = 0.0f; }
    }
}

void crossentropy_forward(float* losses, const float* probs, const int* targets, // (N), (N,Vp), (N)
                          int N, int Vp) {
    for (int i = 0; i < N; i++) { losses[i] = -logf(probs[(size_t)i * Vp + targets[i]]); }
}

// dlogits += (probs - onehot(target)) * dloss, for the mean loss over N tokens scaled by loss_scale
void crossentropy_softmax_backward(float* dlogits, // (N,Vp)
                                   const float* probs, const int* targets, // (N,Vp), (N)
                                   float dloss, int N, int V, int Vp) {
    for (int i = 0; i < N; i++) {
        float* dlogits_i = dlogits + (size_t)i * Vp;
        const float* probs_i = probs + (size_t)i * Vp;
        for (int v = 0; v < V; v++) {
            float indicator = v == targets[i] ? 1.0f : 0.0f;
            dlogits_i[v] += (probs_i[v] - indicator) * dloss;
        }
    }
}

// ----------------------------------------------------------------------------
// the MoE layer
//
// With W processes (expert parallelism), rank r owns experts [r*E/W, (r+1)*E/W). Each rank routes
// its own N tokens; the S = N*K slots travel to the experts' owners and back:
//   sender:   route -> count -> (all ranks' counts) -> capacity -> layout -> gather rows
//   dispatch: all-to-all of rows (rows to rank q are q's experts' rows, in expert order)
//   receiver: reorder by expert -> experts -> reorder by source
//   combine:  all-to-all back -> gate-weighted sum per token
// With W = 1 the all-to-alls are copies and the reorderings are the identity.

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

// total (E) = the slots all W ranks routed to each expert; returns total
int* moe_total_counts(int* total, const int* counts, int W, int E) { // (E), (W,E)
    for (int e = 0; e < E; e++) {
        total[e] = 0;
        for (int q = 0; q < W; q++) { total[e] += counts[q * E + e]; }
    }
    return total;
}

// capacity per expert: ceil(capacity_factor * N * K / E) slots, N the tokens of the whole batch
// (all ranks); <= 0 means dropless
int moe_capacity(float capacity_factor, long long N, int K, int E) {
    if (capacity_factor <= 0.0f) { return INT_MAX; }
    return (int)ceil((double)capacity_factor * N * K / E);
}

// The dispatch layout, plain C shared by the CPU and GPU paths. counts (W,E): slots each rank
// routed to each expert (every rank knows all of them after an all-gather). An expert keeps its
// first cap slots in the order (source rank, slot), the order a single process with the whole
// batch would see. kept (W,E) receives the kept counts; returns the number of dropped slots.
long long moe_capacity_plan(int* kept, const int* counts, int W, int E, int cap) { // (W,E), (W,E)
    long long dropped = 0;
    for (int e = 0; e < E; e++) {
        long long room = cap;
        for (int q = 0; q < W; q++) {
            int c = counts[q * E + e];
            int k = room <= 0 ? 0 : (c < room ? c : (int)room);
            kept[q * E + e] = k;
            room -= k;
            dropped += c - k;
        }
    }
    return dropped;
}

// Sender side: slots s = i*K + j (token i, j-th choice) sorted stably by expert, keeping the first
// kept[e] of each expert. Row r of the send buffer holds slot row_slot[r]; expert e's rows are
// [send_offsets[e], send_offsets[e+1]); slot_row[s] = -1 for a dropped slot.
void moe_dispatch_layout(int* slot_row, int* row_slot, int* send_offsets, int* fill, // (S), (S), (E+1), (E) scratch
                         const int* expert_idx, const int* kept, int S, int E) { // (S), (E)
    send_offsets[0] = 0;
    for (int e = 0; e < E; e++) { send_offsets[e + 1] = send_offsets[e] + kept[e]; fill[e] = 0; }
    for (int s = 0; s < S; s++) {
        int e = expert_idx[s];
        if (fill[e] < kept[e]) {
            int r = send_offsets[e] + fill[e]++;
            slot_row[s] = r;
            row_slot[r] = s;
        } else {
            slot_row[s] = -1;
        }
    }
}

// Receiver side: rows arrive by source rank, each source's rows by expert. recv_perm[i] is the
// position of received row i once regrouped by local expert (then source, then slot);
// expert_offsets over the regrouped rows; recv_rows[q] = rows from rank q. Returns the row count.
int moe_receive_layout(int* recv_perm, int* expert_offsets, int* recv_rows, // (R), (E_local+1), (W)
                       const int* kept, int W, int E, int e0, int E_local) { // (W,E)
    expert_offsets[0] = 0;
    for (int el = 0; el < E_local; el++) {
        int n = 0;
        for (int q = 0; q < W; q++) { n += kept[q * E + e0 + el]; }
        expert_offsets[el + 1] = expert_offsets[el] + n;
    }
    int i = 0;
    for (int q = 0; q < W; q++) {
        recv_rows[q] = 0;
        for (int el = 0; el < E_local; el++) {
            int before = 0; // rows of this expert from lower ranks
            for (int qq = 0; qq < q; qq++) { before += kept[qq * E + e0 + el]; }
            for (int k = 0; k < kept[q * E + e0 + el]; k++) { recv_perm[i++] = expert_offsets[el] + before + k; }
            recv_rows[q] += kept[q * E + e0 + el];
        }
    }
    return i;
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

// received order -> expert order (out[perm[i]] = in[i]), and back (out[i] = in[perm[i]])
void moe_rows_to_experts(float* out, const float* in, const int* perm, int R, int C) { // (R,C), (R,C), (R)
    for (int i = 0; i < R; i++) { memcpy(out + (size_t)perm[i] * C, in + (size_t)i * C, C * sizeof(float)); }
}
void moe_rows_to_sources(float* out, const float* in, const int* perm, int R, int C) {
    for (int i = 0; i < R; i++) { memcpy(out + (size_t)i * C, in + (size_t)perm[i] * C, C * sizeof(float)); }
}

// each expert is a GPT-2 MLP: y = W2 gelu(W1 x + b1) + b2, over its own rows
void moe_experts_forward(float* exph, float* exph_gelu, float* expout, // (R,H), (R,H), (R,C)
                         const float* expin, const int* expert_offsets, // (R,C), (E+1)
                         const float* expfcw, const float* expfcb, // (E,H,C), (E,H)
                         const float* expprojw, const float* expprojb, // (E,C,H), (E,C)
                         int E, int C, int H) {
    for (int e = 0; e < E; e++) {
        int r0 = expert_offsets[e], n = expert_offsets[e + 1] - r0;
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
    for (int e = 0; e < E; e++) {
        int r0 = expert_offsets[e], n = expert_offsets[e + 1] - r0;
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
// the model: config, parameters, activations

typedef struct {
    int max_seq_len;       // maxT
    int vocab_size;        // V
    int padded_vocab_size; // Vp, V rounded up to a multiple of 128
    int num_layers;        // L
    int num_heads;         // NH
    int channels;          // C
    int num_experts;       // E; E <= 1 is a dense GPT-2
    int top_k;             // K
    int moe_every;         // layer l is MoE when l % moe_every == moe_every - 1
    int expert_hidden;     // H
    int renorm_gates;      // renormalise the top-k gates to sum 1 (K > 1)
} GPT2Config;

int is_moe_layer(const GPT2Config* c, int l) { return c->num_experts > 1 && l % c->moe_every == c->moe_every - 1; }
int num_moe_layers(const GPT2Config* c) { return c->num_experts > 1 ? c->num_layers / c->moe_every : 0; }
int num_dense_layers(const GPT2Config* c) { return c->num_layers - num_moe_layers(c); }
// index of layer l among the MoE layers (if MoE) or among the dense layers (if dense)
int moe_layer_index(const GPT2Config* c, int l) { return l / c->moe_every; }
int dense_layer_index(const GPT2Config* c, int l) { return c->num_experts > 1 ? l - l / c->moe_every : l; }

#define NUM_PARAMETER_TENSORS 21
typedef struct {
    float* wte;      // (Vp, C)
    float* wpe;      // (maxT, C)
    float* ln1w;     // (L, C)
    float* ln1b;     // (L, C)
    float* qkvw;     // (L, 3*C, C)
    float* qkvb;     // (L, 3*C)
    float* attprojw; // (L, C, C)
    float* attprojb; // (L, C)
    float* ln2w;     // (L, C)
    float* ln2b;     // (L, C)
    float* fcw;      // (Ld, 4*C, C)
    float* fcb;      // (Ld, 4*C)
    float* fcprojw;  // (Ld, C, 4*C)
    float* fcprojb;  // (Ld, C)
    float* routerw;  // (Lm, E, C)
    float* expfcw;   // (Lm, E, H, C)
    float* expfcb;   // (Lm, E, H)
    float* expprojw; // (Lm, E, C, H)
    float* expprojb; // (Lm, E, C)
    float* lnfw;     // (C)
    float* lnfb;     // (C)
} ParameterTensors;

// AdamW decays the matrices and embeddings only (not biases, not layernorms), as nanoGPT
static const int param_decays[NUM_PARAMETER_TENSORS] = {
    1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0};

// E_local: the experts this process holds (E / W; all E in a single process)
void fill_in_parameter_sizes(size_t* param_sizes, const GPT2Config* config, int E_local) {
    size_t Vp = config->padded_vocab_size, C = config->channels, maxT = config->max_seq_len;
    size_t L = config->num_layers, Ld = num_dense_layers(config), Lm = num_moe_layers(config);
    size_t E = config->num_experts, El = E_local, H = config->expert_hidden;
    param_sizes[0] = Vp * C;
    param_sizes[1] = maxT * C;
    param_sizes[2] = L * C;
    param_sizes[3] = L * C;
    param_sizes[4] = L * (3 * C) * C;
    param_sizes[5] = L * (3 * C);
    param_sizes[6] = L * C * C;
    param_sizes[7] = L * C;
    param_sizes[8] = L * C;
    param_sizes[9] = L * C;
    param_sizes[10] = Ld * (4 * C) * C;
    param_sizes[11] = Ld * (4 * C);
    param_sizes[12] = Ld * C * (4 * C);
    param_sizes[13] = Ld * C;
    param_sizes[14] = Lm * E * C; // the router is replicated: every rank routes its own tokens
    param_sizes[15] = Lm * El * H * C;
    param_sizes[16] = Lm * El * H;
    param_sizes[17] = Lm * El * C * H;
    param_sizes[18] = Lm * El * C;
    param_sizes[19] = C;
    param_sizes[20] = C;
}

// the expert tensors (15..18) live on their owner; the others are replicated on every rank
int is_expert_tensor(int k) { return k >= 15 && k <= 18; }

// one allocation carved into the tensors
float* malloc_and_point_parameters(ParameterTensors* params, const size_t* param_sizes) {
    size_t num_parameters = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { num_parameters += param_sizes[i]; }
    float* params_memory = (float*)callocCheck(num_parameters, sizeof(float));
    float** ptrs[] = {
        &params->wte, &params->wpe, &params->ln1w, &params->ln1b, &params->qkvw, &params->qkvb,
        &params->attprojw, &params->attprojb, &params->ln2w, &params->ln2b, &params->fcw, &params->fcb,
        &params->fcprojw, &params->fcprojb, &params->routerw, &params->expfcw, &params->expfcb,
        &params->expprojw, &params->expprojb, &params->lnfw, &params->lnfb};
    float* iter = params_memory;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { *(ptrs[i]) = iter; iter += param_sizes[i]; }
    return params_memory;
}

#define NUM_ACTIVATION_TENSORS 35
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
    float* sendbuf;       // (W*S, C) all-to-all staging, reused by every layer
    float* recvbuf;       // (W*S, C)
    float* lsh_cent;      // (S, C) LSH: centroids sent (their gradients in the backward)
    float* lsh_ycent;     // (S, C) LSH: expert outputs per centroid (their input gradients)
} ActivationTensors;

// W*S rows bound what one rank's experts can receive (dropless, every token to one rank)
void fill_in_activation_sizes(size_t* act_sizes, const GPT2Config* config, size_t B, size_t T, int W, int lsh) {
    size_t C = config->channels, NH = config->num_heads, L = config->num_layers, Vp = config->padded_vocab_size;
    size_t Ld = num_dense_layers(config), Lm = num_moe_layers(config);
    size_t E = config->num_experts, K = config->top_k, H = config->expert_hidden;
    size_t N = B * T, S = N * K, WS = (size_t)W * S;
    if (Lm == 0) { WS = 0; }
    size_t sizes[NUM_ACTIVATION_TENSORS] = {
        N * C, L * N * C, L * N, L * N, L * N * 3 * C, L * N * C, L * B * NH * T * T, L * B * NH * T * T,
        L * N * C, L * N * C, L * N * C, L * N, L * N, Ld * N * 4 * C, Ld * N * 4 * C, L * N * C,
        L * N * C, N * C, N, N, N * Vp, N * Vp, N,
        Lm * N * E, Lm * N * E, Lm * N * K, Lm * S * C, Lm * WS * C, Lm * WS * H, Lm * WS * H, Lm * WS * C,
        WS * C, WS * C, lsh ? S * C : 0, lsh ? S * C : 0};
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
        &acts->exph_gelu, &acts->expout, &acts->sendbuf, &acts->recvbuf, &acts->lsh_cent, &acts->lsh_ycent};
    float* iter = acts_memory;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { *(ptrs[i]) = iter; iter += act_sizes[i]; }
    return acts_memory;
}

// the integer side of routing, per MoE layer. A group is the rows one source sends to one expert:
// (expert e, source v) with V sources per process (V > 1 simulates V ranks in one process).
#define NUM_ROUTING_TENSORS 16
typedef struct {
    int* expert_idx;     // (Lm, N, K) chosen experts, best first
    int* counts;         // (Lm, W, E) slots every rank routed to each expert, before capacity
    int* kept;           // (Lm, W, E) of those, the slots each expert keeps
    int* wire;           // (Lm, W, E) rows each rank sends each expert: kept, or centroids with LSH
    int* slot_row;       // (Lm, S) row of each slot in the send buffer, -1 if dropped
    int* row_slot;       // (Lm, S) slot of each send-buffer row
    int* send_offsets;   // (Lm, E+1) send rows of expert e: [send_offsets[e], send_offsets[e+1])
    int* recv_rows;      // (Lm, W) rows received from each rank
    int* recv_perm;      // (Lm, W*S) received row -> row grouped by local expert
    int* expert_offsets; // (Lm, E_local+1) rows of local expert e: [offsets[e], offsets[e+1])
    int* send_rows;      // (Lm, W) rows sent to each rank
    int* group_rows;     // (Lm, E*V+1) send rows of group g = e*V + v: [group_rows[g], group_rows[g+1])
    int* group_cents;    // (Lm, E*V+1) LSH: centroid rows of group g
    int* bucket_of_row;  // (Lm, S) LSH: bucket of each send row within its group
    int* bucket_size;    // (Lm, S) LSH: rows in each bucket, at the group's centroid offset
    int* scratch;        // (E) shared by the layers
} MoERouting;

int* malloc_and_point_routing(MoERouting* r, const GPT2Config* config, size_t B, size_t T, int W, int E_local, int V, int lsh) {
    size_t Lm = num_moe_layers(config), E = config->num_experts, K = config->top_k, S = B * T * K;
    size_t G1 = E * V + 1, LS = lsh ? Lm * S : 0;
    size_t sizes[NUM_ROUTING_TENSORS] = {Lm * S, Lm * W * E, Lm * W * E, Lm * W * E, Lm * S, Lm * S, Lm * (E + 1), Lm * W,
                                         Lm * W * S, Lm * (E_local + 1), Lm * W, Lm * G1, Lm * G1, LS, LS, E};
    size_t total = 0;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { total += sizes[i]; }
    int* memory = (int*)callocCheck(total + 1, sizeof(int));
    int** ptrs[NUM_ROUTING_TENSORS] = {&r->expert_idx, &r->counts, &r->kept, &r->wire, &r->slot_row, &r->row_slot,
                                       &r->send_offsets, &r->recv_rows, &r->recv_perm, &r->expert_offsets, &r->send_rows,
                                       &r->group_rows, &r->group_cents, &r->bucket_of_row, &r->bucket_size, &r->scratch};
    int* iter = memory;
    for (int i = 0; i < NUM_ROUTING_TENSORS; i++) { *(ptrs[i]) = iter; iter += sizes[i]; }
    return memory;
}

typedef struct {
    GPT2Config config;
    Comm comm;   // the expert-parallel group: W processes (W = 1 without MPI)
    int E_local; // experts held here: E / W
    int e0;      // the first of them: rank * E_local
    // weights, their gradients, AdamW moments
    ParameterTensors params;
    size_t param_sizes[NUM_PARAMETER_TENSORS];
    float* params_memory;
    size_t num_parameters;
    ParameterTensors grads;
    float* grads_memory;
    float* m_memory;
    float* v_memory;
    // activations and their gradients, allocated at the first forward for (B, T)
    ActivationTensors acts;
    size_t act_sizes[NUM_ACTIVATION_TENSORS];
    float* acts_memory;
    ActivationTensors grads_acts;
    float* grads_acts_memory;
    MoERouting routing;
    int* routing_memory;
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
    long long dropped_slots; // of the whole batch (all ranks), summed over MoE layers
    // all-to-all rows this rank sent to / received from other ranks in the last forward and
    // backward, summed over MoE layers: [0] dispatch, [1] combine, [2] combine's backward,
    // [3] dispatch's backward (bytes = rows * C * 4)
    long long a2a_sent[4], a2a_recv[4];
    float lb_scale, z_scale; // d(loss)/d(lb), d(loss)/d(z) of the backward in progress
    // the sources of the groups: V per process. Source rank*V + v sends group (e, v) to the owner
    // of e among W*V ranks; rows with another owner cross the wire. wire_rows counts them per
    // all-to-all in the last forward (all four all-to-alls carry as many): [0] uncompressed,
    // [1] as sent (centroids with LSH)
    int sources;
    long long wire_rows[2];
    // LSH compression of the all-to-alls (lshmoe.h); lsh.L == 0: off
    LSHConfig lsh;
    uint64_t lsh_seed; // projections are drawn per (MoE layer, step) from it
    int step;          // the optimizer step, set by the caller
    float* lsh_R;      // (L*dp, C)
    void* lsh_scratch; // lsh_scratch_bytes(S, C)
    LSHStats lsh_stats; // summed since the caller last reset it
} GPT2;

// builds an empty model of this config: parameters allocated (zero), nothing else
void gpt2_allocate(GPT2* model, const GPT2Config* config, Comm comm) {
    memset(model, 0, sizeof(GPT2));
    model->config = *config;
    model->comm = comm;
    model->E_local = config->num_experts > 1 ? config->num_experts / comm.world : 0;
    model->e0 = comm.rank * model->E_local;
    fill_in_parameter_sizes(model->param_sizes, config, model->E_local);
    model->num_parameters = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { model->num_parameters += model->param_sizes[i]; }
    model->params_memory = malloc_and_point_parameters(&model->params, model->param_sizes);
    model->capacity_factor = 0.0f;
    model->aux_loss_weight = 0.01f;
    model->z_loss_weight = 0.001f;
    model->mean_loss = -1.0f;
    model->sources = 1;
}

// switches LSH compression on for an MoE model (before its first forward); 0 or an error in err
int gpt2_set_lsh(GPT2* model, LSHConfig lsh, int sources, uint64_t seed, char* err, size_t errlen) {
    const GPT2Config* c = &model->config;
    if (lsh.L > 0) {
        if (c->num_experts <= 1) { snprintf(err, errlen, "LSH compresses the MoE all-to-all: it needs E > 1 experts (-E)"); return -1; }
        if (lsh_config_check(lsh.L, lsh.dp, err, errlen) != 0) { return -1; }
        if (lsh.center > 1 || lsh.center < 0 || lsh.compensate > 1 || lsh.compensate < 0) { snprintf(err, errlen, "LSH centring and compensation are 0 or 1"); return -1; }
    }
    if (sources < 1 || (c->num_experts > 1 && c->num_experts % (sources * model->comm.world) != 0)) {
        snprintf(err, errlen, "%d simulated ranks x %d processes must divide E=%d", sources, model->comm.world, c->num_experts);
        return -1;
    }
    if (model->acts_memory != NULL) { snprintf(err, errlen, "gpt2_set_lsh: call it before the first forward"); return -1; }
    model->lsh = lsh;
    model->sources = sources;
    model->lsh_seed = seed;
    lsh_stats_reset(&model->lsh_stats);
    return 0;
}

// a stream of random numbers for one expert's tensor, the same whichever rank holds the expert
static uint64_t expert_seed(uint64_t seed, int tensor, int moe_layer, int expert) {
    return (seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)(tensor + 1) << 48) ^ ((uint64_t)(moe_layer + 1) << 32) ^ (uint64_t)(expert + 1) * 0xBF58476D1CE4E5B9ull;
}

// GPT-2 init (as llm.c): N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L), zero
// biases, unit layernorms; the router N(0, 0.02) too. Each expert draws from its own stream,
// so the model is the same for any number of ranks.
void gpt2_init_random(GPT2* model, uint64_t seed) {
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    const GPT2Config* c = &model->config;
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    ParameterTensors* p = &model->params;
    float* weights[] = {p->wte, p->wpe, p->qkvw, p->attprojw, p->fcw, p->fcprojw, p->routerw};
    int tensor_ids[] = {0, 1, 4, 6, 10, 12, 14};
    for (int i = 0; i < 7; i++) {
        int id = tensor_ids[i];
        float std = (id == 6 || id == 12) ? residual_std : 0.02f;
        normal_fill(weights[i], model->param_sizes[id], std, &rng);
    }
    size_t C = c->channels, H = c->expert_hidden;
    for (int m = 0; m < num_moe_layers(c); m++) {
        for (int el = 0; el < model->E_local; el++) {
            size_t me = (size_t)m * model->E_local + el;
            uint64_t r1 = expert_seed(seed, 15, m, model->e0 + el), r2 = expert_seed(seed, 17, m, model->e0 + el);
            normal_fill(p->expfcw + me * H * C, H * C, 0.02f, &r1);
            normal_fill(p->expprojw + me * C * H, C * H, residual_std, &r2);
        }
    }
    for (size_t i = 0; i < model->param_sizes[2]; i++) { p->ln1w[i] = 1.0f; p->ln2w[i] = 1.0f; }
    for (int i = 0; i < c->channels; i++) { p->lnfw[i] = 1.0f; }
}

// groups: the send rows of expert e (in slot order, so in token order) split by source
// v = token * V / N (= token / (N/V): each source owns whole sequences), into g = e*V + v; counts
// the rows that cross between ranks (the owner of e among the W*V sources is e / (E/(W*V)), the
// source is rank*V + v)
void moe_groups_layout(int* group_rows, long long* wire, // (E*V+1), [0] += crossing rows
                       const int* send_offsets, const int* row_slot, int N, int K, int E, int V, int rank, int W) {
    int per_owner = E / (W * V);
    for (int e = 0; e < E; e++) {
        int r = send_offsets[e];
        for (int v = 0; v < V; v++) {
            group_rows[e * V + v] = r;
            while (r < send_offsets[e + 1] && (int)((long long)(row_slot[r] / K) * V / N) == v) { r++; }
            if (e / per_owner != rank * V + v) { *wire += r - group_rows[e * V + v]; }
        }
    }
    group_rows[E * V] = send_offsets[E];
}

// the routing tensors of MoE layer m, for a forward of N tokens (the shared scratch as it is)
MoERouting moe_layer_routing(const GPT2* model, int m, int N) {
    const GPT2Config* c = &model->config;
    size_t E = c->num_experts, W = model->comm.world, S = (size_t)N * c->top_k, G1 = E * model->sources + 1;
    size_t WS = W * model->batch_size * model->seq_len * c->top_k; // rows one rank's experts can receive
    MoERouting r = model->routing;
    r.expert_idx += m * S;
    r.counts += m * W * E;
    r.kept += m * W * E;
    r.wire += m * W * E;
    r.slot_row += m * S;
    r.row_slot += m * S;
    r.send_offsets += m * (E + 1);
    r.recv_rows += m * W;
    r.recv_perm += m * WS;
    r.expert_offsets += m * (model->E_local + 1);
    r.send_rows += m * W;
    r.group_rows += m * G1;
    r.group_cents += m * G1;
    if (model->lsh.L > 0) {
        r.bucket_of_row += m * S;
        r.bucket_size += m * S;
    }
    return r;
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

// the forward of one MoE layer on this rank's N tokens x (after ln2); out (N,C) is written.
// Returns this rank's share of the layer's load-balancing and z-losses through lb and z.
void moe_layer_forward(GPT2* model, int m, float* out, const float* x, int N, float* lb, float* z) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K, V = model->sources, G = E * V;
    int rank = model->comm.rank, lsh = model->lsh.L > 0;
    const ParameterTensors* p = &model->params;
    ActivationTensors a = moe_layer_acts(model->acts, model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);

    // route this rank's tokens, then share the counts: capacity and f_e need the whole batch
    int* my_counts = rt.counts + (size_t)rank * E;
    moe_router_forward(a.router_logits, a.router_probs, rt.expert_idx, a.gates, my_counts, z, x,
                       p->routerw + (size_t)m * E * C, N, C, E, K, cfg->renorm_gates);
    memcpy(rt.kept, my_counts, E * sizeof(int)); // allgather's send buffer may not alias its output
    allgather_ints(rt.kept, rt.counts, E, &model->comm);
    int* total = moe_total_counts(rt.scratch, rt.counts, W, E);
    *lb = moe_load_balance_forward(a.router_probs, total, (long long)S * W, N, E);
    int cap = moe_capacity(model->capacity_factor, (long long)N * W, K, E);
    model->dropped_slots += moe_capacity_plan(rt.kept, rt.counts, W, E, cap);

    // gather the kept rows by expert, then by source within an expert
    moe_dispatch_layout(rt.slot_row, rt.row_slot, rt.send_offsets, rt.scratch, rt.expert_idx, rt.kept + (size_t)rank * E, S, E);
    moe_dispatch_forward(a.sendbuf, x, rt.row_slot, rt.send_offsets[E], C, K);
    long long crossing = 0;
    moe_groups_layout(rt.group_rows, &crossing, rt.send_offsets, rt.row_slot, N, K, E, V, rank, W);
    model->wire_rows[0] += crossing;
    const float* dispatched = a.sendbuf; // what the all-to-all sends: rows, or their centroids
    if (lsh) {
        // LSH-MoE sec. 3: hash each group, send only its bucket centroids
        lsh_projections_init(model->lsh_R, model->lsh.L, model->lsh.dp, C, lsh_seed(model->lsh_seed, m, model->step));
        int* my_wire = rt.scratch;
        int per_owner = E / (W * V);
        crossing = 0;
        rt.group_cents[0] = 0;
        for (int e = 0; e < E; e++) {
            my_wire[e] = 0;
            for (int v = 0; v < V; v++) {
                int g = e * V + v, r0 = rt.group_rows[g], n = rt.group_rows[g + 1] - r0, c0 = rt.group_cents[g];
                int mg = lsh_group_compress(a.lsh_cent + (size_t)c0 * C, rt.bucket_of_row + r0, rt.bucket_size + c0,
                                            a.sendbuf + (size_t)r0 * C, n, C, model->lsh_R, &model->lsh,
                                            model->lsh_scratch, &model->lsh_stats);
                rt.group_cents[g + 1] = c0 + mg;
                my_wire[e] += mg;
                if (e / per_owner != rank * V + v) { crossing += mg; }
            }
        }
        model->wire_rows[1] += crossing;
        // the count exchange carries centroid counts, known only after hashing
        allgather_ints(my_wire, rt.wire, E, &model->comm);
        dispatched = a.lsh_cent;
    } else {
        model->wire_rows[1] += crossing;
        memcpy(rt.wire, rt.kept, (size_t)W * E * sizeof(int));
    }
    // dispatch: each rank gets its experts' rows
    for (int q = 0; q < W; q++) {
        rt.send_rows[q] = 0;
        for (int e = q * El; e < (q + 1) * El; e++) { rt.send_rows[q] += rt.wire[rank * E + e]; }
    }
    int R = moe_receive_layout(rt.recv_perm, rt.expert_offsets, rt.recv_rows, rt.wire, W, E, model->e0, El);
    alltoall_rows(dispatched, rt.send_rows, a.recvbuf, rt.recv_rows, C, &model->comm);
    moe_rows_to_experts(a.expin, a.recvbuf, rt.recv_perm, R, C);
    // the experts held here
    moe_experts_forward(a.exph, a.exph_gelu, a.expout, a.expin, rt.expert_offsets,
                        p->expfcw + (size_t)m * El * H * C, p->expfcb + (size_t)m * El * H,
                        p->expprojw + (size_t)m * El * C * H, p->expprojb + (size_t)m * El * C, El, C, H);
    // combine: outputs back to their senders, gate-weighted sum per token
    moe_rows_to_sources(a.recvbuf, a.expout, rt.recv_perm, R, C);
    alltoall_rows(a.recvbuf, rt.recv_rows, lsh ? a.lsh_ycent : a.moe_y, rt.send_rows, C, &model->comm);
    if (lsh) {
        // LSH-MoE Eq. 5: each row's output is its centroid's plus the residual the sender kept
        for (int g = 0; g < G; g++) {
            int r0 = rt.group_rows[g], c0 = rt.group_cents[g];
            lsh_group_decompress(a.moe_y + (size_t)r0 * C, a.lsh_ycent + (size_t)c0 * C, a.sendbuf + (size_t)r0 * C,
                                 a.lsh_cent + (size_t)c0 * C, rt.bucket_of_row + r0, rt.group_rows[g + 1] - r0, C,
                                 &model->lsh, &model->lsh_stats);
        }
    }
    moe_combine_forward(out, a.moe_y, a.gates, rt.slot_row, N, C, K);
    for (int q = 0; q < W; q++) {
        if (q == rank) { continue; }
        model->a2a_sent[0] += rt.send_rows[q]; model->a2a_recv[0] += rt.recv_rows[q];
        model->a2a_sent[1] += rt.recv_rows[q]; model->a2a_recv[1] += rt.send_rows[q];
    }
}

// the backward of one MoE layer: dout (N,C) at its output; dx (N,C) accumulates
void moe_layer_backward(GPT2* model, int m, float* dx, const float* dout, const float* x, int N) {
    const GPT2Config* cfg = &model->config;
    int C = cfg->channels, E = cfg->num_experts, K = cfg->top_k, H = cfg->expert_hidden;
    int W = model->comm.world, El = model->E_local, S = N * K, G = E * model->sources, lsh = model->lsh.L > 0;
    const ParameterTensors* p = &model->params;
    ParameterTensors* g = &model->grads;
    ActivationTensors a = moe_layer_acts(model->acts, model, m, N);
    ActivationTensors da = moe_layer_acts(model->grads_acts, model, m, N);
    MoERouting rt = moe_layer_routing(model, m, N);
    int R = rt.expert_offsets[El];
    // combine backward: gradients at the expert outputs go to the experts' owners
    moe_combine_backward(da.moe_y, da.gates, dout, a.moe_y, a.gates, rt.slot_row, N, C, K);
    const float* dsent = da.moe_y;
    if (lsh) { // one gradient row per centroid: G_b = sum of its rows' gradients
        for (int gi = 0; gi < G; gi++) {
            int r0 = rt.group_rows[gi], c0 = rt.group_cents[gi];
            lsh_group_decompress_backward(a.lsh_cent + (size_t)c0 * C, da.moe_y + (size_t)r0 * C, rt.bucket_of_row + r0,
                                          rt.group_rows[gi + 1] - r0, rt.group_cents[gi + 1] - c0, C, &model->lsh_stats);
        }
        dsent = a.lsh_cent;
    }
    alltoall_rows(dsent, rt.send_rows, a.recvbuf, rt.recv_rows, C, &model->comm);
    moe_rows_to_experts(da.expout, a.recvbuf, rt.recv_perm, R, C);
    moe_experts_backward(da.expin, da.exph, da.exph_gelu,
                         g->expfcw + (size_t)m * El * H * C, g->expfcb + (size_t)m * El * H,
                         g->expprojw + (size_t)m * El * C * H, g->expprojb + (size_t)m * El * C,
                         da.expout, a.expin, a.exph, a.exph_gelu,
                         rt.expert_offsets, p->expfcw + (size_t)m * El * H * C, p->expprojw + (size_t)m * El * C * H, El, C, H);
    // dispatch backward: input gradients back to the senders, scatter-added per token
    moe_rows_to_sources(a.recvbuf, da.expin, rt.recv_perm, R, C);
    alltoall_rows(a.recvbuf, rt.recv_rows, lsh ? a.lsh_ycent : a.sendbuf, rt.send_rows, C, &model->comm);
    if (lsh) { // dx_i = g_i + (J^T G_b - G_b) / n_b (compensated), or J^T G_b / n_b
        memset(a.sendbuf, 0, (size_t)rt.send_offsets[E] * C * sizeof(float));
        for (int gi = 0; gi < G; gi++) {
            int r0 = rt.group_rows[gi], c0 = rt.group_cents[gi];
            lsh_group_compress_backward(a.sendbuf + (size_t)r0 * C, da.moe_y + (size_t)r0 * C, a.lsh_ycent + (size_t)c0 * C,
                                        a.lsh_cent + (size_t)c0 * C, rt.bucket_of_row + r0, rt.bucket_size + c0,
                                        rt.group_rows[gi + 1] - r0, C, &model->lsh, &model->lsh_stats);
        }
    }
    moe_dispatch_backward(dx, a.sendbuf, rt.row_slot, rt.send_offsets[E], C, K);
    // router backward, with f_e of the whole batch
    int* total = moe_total_counts(rt.scratch, rt.counts, W, E);
    moe_router_backward(dx, g->routerw + (size_t)m * E * C, da.router_logits, da.router_probs,
                        da.gates, x, p->routerw + (size_t)m * E * C, a.router_logits,
                        a.router_probs, rt.expert_idx, a.gates,
                        total, (long long)S * W, model->lb_scale, model->z_scale, N, C, E, K, cfg->renorm_gates);
    for (int q = 0; q < W; q++) {
        if (q == model->comm.rank) { continue; }
        model->a2a_sent[2] += rt.send_rows[q]; model->a2a_recv[2] += rt.recv_rows[q];
        model->a2a_sent[3] += rt.recv_rows[q]; model->a2a_recv[3] += rt.send_rows[q];
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
        model->batch_size = B;
        model->seq_len = T;
        int lsh = model->lsh.L > 0;
        fill_in_activation_sizes(model->act_sizes, cfg, B, T, model->comm.world, lsh);
        model->acts_memory = malloc_and_point_activations(&model->acts, model->act_sizes);
        model->routing_memory = malloc_and_point_routing(&model->routing, cfg, B, T, model->comm.world, model->E_local, model->sources, lsh);
        if (lsh) {
            model->lsh_R = (float*)mallocCheck((size_t)model->lsh.L * model->lsh.dp * C * sizeof(float));
            model->lsh_scratch = mallocCheck(lsh_scratch_bytes((int)(B * T * cfg->top_k), (int)C));
        }
        model->inputs = (int*)mallocCheck(B * T * sizeof(int));
        model->targets = (int*)mallocCheck(B * T * sizeof(int));
    } else if (B * T > (size_t)model->batch_size * model->seq_len || T > (size_t)model->seq_len) {
        fail_exit("gpt2_forward: B=%zu T=%zu exceed the allocated B=%d T=%d", B, T, model->batch_size, model->seq_len);
    }
    memcpy(model->inputs, inputs, N * sizeof(int));
    if (targets != NULL) { memcpy(model->targets, targets, N * sizeof(int)); }

    ParameterTensors p = model->params;
    ActivationTensors a = model->acts;
    float lb_sum = 0.0f, z_sum = 0.0f;
    model->dropped_slots = 0;
    for (int i = 0; i < 4; i++) { model->a2a_sent[i] = model->a2a_recv[i] = 0; }
    model->wire_rows[0] = model->wire_rows[1] = 0;
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

void gpt2_zero_grad(GPT2* model) {
    if (model->grads_memory != NULL) { memset(model->grads_memory, 0, model->num_parameters * sizeof(float)); }
}

// backward of the last forward's total loss times loss_scale; parameter gradients accumulate.
// loss_scale = 1 / (gradient accumulation steps * W): summed over ranks (gpt2_allreduce_grads),
// the gradients are those of the mean loss over the whole batch.
void gpt2_backward(GPT2* model, float loss_scale) {
    if (model->mean_loss == -1.0f) { fail_exit("gpt2_backward: the forward pass had no targets"); }
    if (model->grads_memory == NULL) {
        model->grads_memory = malloc_and_point_parameters(&model->grads, model->param_sizes);
        model->grads_acts_memory = malloc_and_point_activations(&model->grads_acts, model->act_sizes);
    }
    const GPT2Config* cfg = &model->config;
    size_t B = model->batch_size, T = model->seq_len; // the full allocation: training uses it
    size_t V = cfg->vocab_size, Vp = cfg->padded_vocab_size, L = cfg->num_layers;
    size_t NH = cfg->num_heads, C = cfg->channels;
    size_t N = B * T;
    size_t num_acts = 0;
    for (int i = 0; i < NUM_ACTIVATION_TENSORS; i++) { num_acts += model->act_sizes[i]; }
    memset(model->grads_acts_memory, 0, num_acts * sizeof(float));

    ParameterTensors p = model->params;
    ParameterTensors g = model->grads;
    ActivationTensors a = model->acts;
    ActivationTensors da = model->grads_acts;
    model->lb_scale = loss_scale * model->aux_loss_weight;
    model->z_scale = loss_scale * model->z_loss_weight;

    crossentropy_softmax_backward(da.logits, a.probs, model->targets, loss_scale / N, N, V, Vp);
    matmul_backward(da.lnf, g.wte, NULL, da.logits, a.lnf, p.wte, N, C, Vp);
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
        if (!is_expert_tensor(k)) { allreduce_floats(model->grads_memory + offset, model->param_sizes[k], &model->comm); }
        offset += model->param_sizes[k];
    }
}

// global gradient norm over every parameter of the model (all ranks' experts), in double
float gpt2_grad_norm(const GPT2* model) {
    double sums[2] = {0.0, 0.0}; // replicated (the same on every rank), this rank's experts
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        double s = 0.0;
        for (size_t i = offset; i < offset + model->param_sizes[k]; i++) { s += (double)model->grads_memory[i] * model->grads_memory[i]; }
        sums[is_expert_tensor(k)] += s;
        offset += model->param_sizes[k];
    }
    allreduce_doubles(&sums[1], 1, &model->comm);
    return (float)sqrt(sums[0] + sums[1]);
}

// clips the global gradient norm to grad_clip (as torch.nn.utils.clip_grad_norm_, off when
// grad_clip <= 0), then AdamW with decoupled weight decay on the matrices; returns the norm
float gpt2_update(GPT2* model, float learning_rate, float beta1, float beta2, float eps,
                  float weight_decay, float grad_clip, int t) {
    if (model->m_memory == NULL) {
        model->m_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
        model->v_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
    }
    float norm = gpt2_grad_norm(model);
    float scale = 1.0f;
    if (grad_clip > 0.0f) {
        float coef = grad_clip / (norm + 1e-6f);
        if (coef < 1.0f) { scale = coef; }
    }
    float bc1 = 1.0f - powf(beta1, t), bc2 = 1.0f - powf(beta2, t);
    size_t offset = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        float wd = param_decays[k] ? weight_decay : 0.0f;
        #pragma omp parallel for
        for (size_t i = offset; i < offset + model->param_sizes[k]; i++) {
            float param = model->params_memory[i];
            float grad = model->grads_memory[i] * scale;
            float m = beta1 * model->m_memory[i] + (1.0f - beta1) * grad;
            float v = beta2 * model->v_memory[i] + (1.0f - beta2) * grad * grad;
            model->m_memory[i] = m;
            model->v_memory[i] = v;
            float m_hat = m / bc1, v_hat = v / bc2;
            model->params_memory[i] = param - learning_rate * (m_hat / (sqrtf(v_hat) + eps) + wd * param);
        }
        offset += model->param_sizes[k];
    }
    return norm;
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
    free(model->lsh_R);
    free(model->lsh_scratch);
}

// ----------------------------------------------------------------------------
// checkpoints: llm.c's format for dense models, our own magic for MoE models (README.md lists
// every header field). Readers validate and explain; writers go through a temporary file.

#define LLMC_MODEL_MAGIC 20240326 // llm.c: version 3 fp32, version 5 bf16
#define MOE_MODEL_MAGIC 20241111  // version 1 fp32
#define STATE_MAGIC 20241113      // training state, version 1

// the descriptors of llm.c, with GPT-2's vocabulary
int gpt2_config_from_descriptor(GPT2Config* c, const char* descriptor) {
    int depth;
    char rest;
    if (sscanf(descriptor, "d%d%c", &depth, &rest) != 1) { return -1; }
    int channels;
    switch (depth) {
        case 4: channels = 256; break;
        case 6: channels = 384; break;
        case 12: channels = 768; break;
        case 24: channels = 1024; break;
        case 36: channels = 1280; break;
        case 48: channels = 1600; break;
        default: return -1;
    }
    memset(c, 0, sizeof(GPT2Config));
    c->num_layers = depth;
    c->channels = channels;
    c->num_heads = channels / 64;
    c->max_seq_len = 1024;
    c->vocab_size = 50257;
    c->padded_vocab_size = 50304;
    return 0;
}

// validates a config and explains the first problem in err; 0 if valid
int gpt2_config_check(const GPT2Config* c, char* err, size_t errlen) {
    if (c->max_seq_len <= 0 || c->max_seq_len > (1 << 20)) { snprintf(err, errlen, "maxT=%d out of range", c->max_seq_len); return -1; }
    if (c->vocab_size <= 0 || c->vocab_size > 65536) { snprintf(err, errlen, "V=%d out of range (uint16 tokens)", c->vocab_size); return -1; }
    if (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size > (1 << 20)) { snprintf(err, errlen, "Vp=%d must be in [V=%d, 2^20]", c->padded_vocab_size, c->vocab_size); return -1; }
    if (c->num_layers <= 0 || c->num_layers > 1024) { snprintf(err, errlen, "L=%d out of range", c->num_layers); return -1; }
    if (c->channels <= 0 || c->channels > 65536) { snprintf(err, errlen, "C=%d out of range", c->channels); return -1; }
    if (c->num_heads <= 0 || c->channels % c->num_heads != 0) { snprintf(err, errlen, "NH=%d must divide C=%d", c->num_heads, c->channels); return -1; }
    if (c->num_experts > 1) {
        if (c->num_experts > 4096) { snprintf(err, errlen, "E=%d out of range", c->num_experts); return -1; }
        if (c->top_k < 1 || c->top_k > c->num_experts) { snprintf(err, errlen, "top-k K=%d must be in [1, E=%d]", c->top_k, c->num_experts); return -1; }
        if (c->moe_every < 1 || c->moe_every > c->num_layers) { snprintf(err, errlen, "moe_every=%d must be in [1, L=%d]", c->moe_every, c->num_layers); return -1; }
        if (c->expert_hidden <= 0 || c->expert_hidden > (1 << 20)) { snprintf(err, errlen, "expert hidden H=%d out of range", c->expert_hidden); return -1; }
        if (c->renorm_gates != 0 && c->renorm_gates != 1) { snprintf(err, errlen, "renorm=%d must be 0 or 1", c->renorm_gates); return -1; }
    }
    return 0;
}

// writes the whole model in the single-process format: rank 0 writes, gathering each MoE layer's
// expert slices from their owners (collective: every rank calls it)
void gpt2_write_checkpoint(const GPT2* model, const char* path) {
    const GPT2Config* c = &model->config;
    const Comm* comm = &model->comm;
    int header[256] = {0};
    int moe = c->num_experts > 1;
    header[0] = moe ? MOE_MODEL_MAGIC : LLMC_MODEL_MAGIC;
    header[1] = moe ? 1 : 3;
    header[2] = c->max_seq_len;
    header[3] = c->vocab_size;
    header[4] = c->num_layers;
    header[5] = c->num_heads;
    header[6] = c->channels;
    header[7] = c->padded_vocab_size;
    if (moe) {
        header[8] = c->num_experts;
        header[9] = c->top_k;
        header[10] = c->moe_every;
        header[11] = c->expert_hidden;
        header[12] = c->renorm_gates;
    }
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE* fp = NULL;
    if (comm->rank == 0) {
        fp = fopenCheck(tmp, "wb");
        fwriteCheck(header, sizeof(int), 256, fp);
    }
    int Lm = num_moe_layers(c);
    float* gathered = NULL;
    const float* tensor = model->params_memory;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = model->param_sizes[k];
        if (is_expert_tensor(k) && Lm > 0) {
            size_t slice = n / Lm; // one MoE layer's local experts
            if (gathered == NULL) { gathered = (float*)mallocCheck(model->param_sizes[15] / Lm * comm->world * sizeof(float)); }
            for (int m = 0; m < Lm; m++) {
                gather_floats(tensor + m * slice, gathered, slice, comm);
                if (fp) { fwriteCheck(gathered, sizeof(float), slice * comm->world, fp); }
            }
        } else if (fp && n > 0) {
            fwriteCheck(tensor, sizeof(float), n, fp);
        }
        tensor += n;
    }
    free(gathered);
    if (fp) {
        fcloseCheck(fp);
        if (rename(tmp, path) != 0) { fail_exit("could not rename %s to %s", tmp, path); }
    }
    comm_barrier(comm); // on return the file exists for every rank
}

// reads n parameters stored as fp32 (version 3 / MoE 1) or bf16 (llm.c version 5) into out
static int read_params(float* out, size_t n, int bf16, FILE* fp) {
    if (!bf16) { return fread(out, sizeof(float), n, fp) == n ? 0 : -1; }
    uint16_t buf[4096];
    for (size_t i = 0; i < n; i += 4096) {
        size_t chunk = n - i < 4096 ? n - i : 4096;
        if (fread(buf, sizeof(uint16_t), chunk, fp) != chunk) { return -1; }
        for (size_t j = 0; j < chunk; j++) {
            union { uint32_t u; float f; } bits = {(uint32_t)buf[j] << 16}; // bf16 is fp32's top half
            out[i + j] = bits.f;
        }
    }
    return 0;
}

// reads the tensors of a checkpoint (positioned after its header) into model, whose config must
// be the file's: replicated tensors whole, expert tensors only this rank's slice of each layer
static int read_model_tensors(GPT2* model, FILE* fp, int bf16) {
    size_t elem = bf16 ? 2 : 4;
    int Lm = num_moe_layers(&model->config), W = model->comm.world, r = model->comm.rank;
    float* tensor = model->params_memory;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = model->param_sizes[k];
        if (is_expert_tensor(k) && Lm > 0) {
            size_t slice = n / Lm;
            for (int m = 0; m < Lm; m++) {
                // layer m's experts of all ranks, then this rank's slice of them
                if (fseek(fp, (long)(r * slice * elem), SEEK_CUR) != 0) { return -1; }
                if (read_params(tensor + m * slice, slice, bf16, fp) != 0) { return -1; }
                if (fseek(fp, (long)((W - 1 - r) * slice * elem), SEEK_CUR) != 0) { return -1; }
            }
        } else if (read_params(tensor, n, bf16, fp) != 0) {
            return -1;
        }
        tensor += n;
    }
    return 0;
}

// Loads a checkpoint into a model for this process (its experts only, when W > 1). With
// upcycle != NULL and upcycle->num_experts > 1, a dense (llm.c) checkpoint becomes an MoE model:
// every expert of an MoE layer starts as a copy of that layer's dense MLP plus N(0, noise) and the
// router starts at N(0, 0.02). Returns 0, or -1 with err set.
int gpt2_load_checkpoint(GPT2* model, const char* path, const GPT2Config* upcycle, float noise,
                         uint64_t seed, Comm comm, char* err, size_t errlen) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) { snprintf(err, errlen, "%s: cannot open checkpoint", path); return -1; }
    int header[256];
    if (fread(header, sizeof(int), 256, fp) != 256) {
        snprintf(err, errlen, "%s: truncated checkpoint (no full 1024-byte header)", path);
        fclose(fp);
        return -1;
    }
    GPT2Config c;
    memset(&c, 0, sizeof(c));
    int bf16 = 0;
    if (header[0] == LLMC_MODEL_MAGIC) {
        if (header[1] != 3 && header[1] != 5) {
            snprintf(err, errlen, "%s: llm.c checkpoint version %d not supported (3 = fp32, 5 = bf16)", path, header[1]);
            fclose(fp);
            return -1;
        }
        bf16 = header[1] == 5;
    } else if (header[0] == MOE_MODEL_MAGIC) {
        if (header[1] != 1) {
            snprintf(err, errlen, "%s: MoE checkpoint version %d not supported (expected 1)", path, header[1]);
            fclose(fp);
            return -1;
        }
        c.num_experts = header[8];
        c.top_k = header[9];
        c.moe_every = header[10];
        c.expert_hidden = header[11];
        c.renorm_gates = header[12];
        if (c.num_experts <= 1) { snprintf(err, errlen, "%s: MoE checkpoint with E=%d (must be > 1)", path, c.num_experts); fclose(fp); return -1; }
    } else {
        snprintf(err, errlen, "%s: bad magic %d (expected %d for llm.c or %d for llm.moe MoE checkpoints)",
                 path, header[0], LLMC_MODEL_MAGIC, MOE_MODEL_MAGIC);
        fclose(fp);
        return -1;
    }
    c.max_seq_len = header[2];
    c.vocab_size = header[3];
    c.num_layers = header[4];
    c.num_heads = header[5];
    c.channels = header[6];
    c.padded_vocab_size = header[7];
    char cerr[256];
    if (gpt2_config_check(&c, cerr, sizeof(cerr)) != 0) {
        snprintf(err, errlen, "%s: bad header: %s", path, cerr);
        fclose(fp);
        return -1;
    }
    // the file size must match the header exactly, checked before allocating anything
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_in_parameter_sizes(sizes, &c, c.num_experts > 1 ? c.num_experts : 0);
    size_t n = 0;
    for (int i = 0; i < NUM_PARAMETER_TENSORS; i++) { n += sizes[i]; }
    size_t expected = 256 * sizeof(int) + n * (bf16 ? 2 : 4);
    fseek(fp, 0, SEEK_END);
    long actual = ftell(fp);
    fseek(fp, 256 * sizeof(int), SEEK_SET);
    if (actual < 0 || (size_t)actual != expected) {
        snprintf(err, errlen, "%s: file has %ld bytes but its header describes %zu (%s)", path, actual, expected,
                 (actual >= 0 && (size_t)actual < expected) ? "truncated" : "trailing data");
        fclose(fp);
        return -1;
    }
    int upcycling = upcycle != NULL && upcycle->num_experts > 1 && c.num_experts <= 1;
    GPT2Config mc = c;
    if (upcycling) {
        mc.num_experts = upcycle->num_experts;
        mc.top_k = upcycle->top_k;
        mc.moe_every = upcycle->moe_every;
        mc.expert_hidden = upcycle->expert_hidden > 0 ? upcycle->expert_hidden : 4 * c.channels;
        mc.renorm_gates = upcycle->renorm_gates;
        if (mc.expert_hidden != 4 * c.channels) {
            snprintf(err, errlen, "%s: upcycling copies the dense MLP into each expert, so H must be 4C=%d (got %d)", path, 4 * c.channels, mc.expert_hidden);
            fclose(fp);
            return -1;
        }
        if (gpt2_config_check(&mc, cerr, sizeof(cerr)) != 0) { snprintf(err, errlen, "%s: upcycled config: %s", path, cerr); fclose(fp); return -1; }
    }
    if (mc.num_experts > 1 && mc.num_experts % comm.world != 0) {
        snprintf(err, errlen, "%s: E=%d experts cannot be split evenly over W=%d processes", path, mc.num_experts, comm.world);
        fclose(fp);
        return -1;
    }
    if (!upcycling) {
        gpt2_allocate(model, &c, comm);
        if (read_model_tensors(model, fp, bf16) != 0) { snprintf(err, errlen, "%s: read failed", path); fclose(fp); gpt2_free(model); return -1; }
        fclose(fp);
        return 0;
    }
    // upcycling: read the dense model, then build the MoE model around it
    GPT2 dense;
    gpt2_allocate(&dense, &c, comm);
    if (read_model_tensors(&dense, fp, bf16) != 0) { snprintf(err, errlen, "%s: read failed", path); fclose(fp); gpt2_free(&dense); return -1; }
    fclose(fp);
    gpt2_allocate(model, &mc, comm);
    ParameterTensors* d = &dense.params;
    ParameterTensors* p = &model->params;
    // the tensors shared by both layouts: embeddings, attention, layernorms
    int shared[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 19, 20};
    float** dst[] = {&p->wte, &p->wpe, &p->ln1w, &p->ln1b, &p->qkvw, &p->qkvb, &p->attprojw, &p->attprojb, &p->ln2w, &p->ln2b, &p->lnfw, &p->lnfb};
    float** src[] = {&d->wte, &d->wpe, &d->ln1w, &d->ln1b, &d->qkvw, &d->qkvb, &d->attprojw, &d->attprojb, &d->ln2w, &d->ln2b, &d->lnfw, &d->lnfb};
    for (int i = 0; i < 12; i++) { memcpy(*dst[i], *src[i], dense.param_sizes[shared[i]] * sizeof(float)); }
    size_t C = c.channels, H = mc.expert_hidden, El = model->E_local;
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 7;
    normal_fill(p->routerw, model->param_sizes[14], 0.02f, &rng);
    for (int l = 0; l < c.num_layers; l++) {
        const float* fcw = d->fcw + l * 4 * C * C;
        const float* fcb = d->fcb + l * 4 * C;
        const float* fcprojw = d->fcprojw + l * C * 4 * C;
        const float* fcprojb = d->fcprojb + l * C;
        if (is_moe_layer(&mc, l)) {
            size_t m = moe_layer_index(&mc, l);
            for (size_t el = 0; el < El; el++) {
                float* w1 = p->expfcw + (m * El + el) * H * C;
                memcpy(w1, fcw, H * C * sizeof(float));
                memcpy(p->expfcb + (m * El + el) * H, fcb, H * sizeof(float));
                memcpy(p->expprojw + (m * El + el) * C * H, fcprojw, C * H * sizeof(float));
                memcpy(p->expprojb + (m * El + el) * C, fcprojb, C * sizeof(float));
                if (noise > 0.0f) { // breaks the symmetry between identical experts
                    uint64_t r = expert_seed(seed, 15, m, model->e0 + el);
                    for (size_t i = 0; i < H * C; i++) { float z; normal_fill(&z, 1, noise, &r); w1[i] += z; }
                }
            }
        } else {
            size_t dl = dense_layer_index(&mc, l);
            memcpy(p->fcw + dl * 4 * C * C, fcw, 4 * C * C * sizeof(float));
            memcpy(p->fcb + dl * 4 * C, fcb, 4 * C * sizeof(float));
            memcpy(p->fcprojw + dl * C * 4 * C, fcprojw, C * 4 * C * sizeof(float));
            memcpy(p->fcprojb + dl * C, fcprojb, C * sizeof(float));
        }
    }
    gpt2_free(&dense);
    return 0;
}

// training state of one rank: AdamW moments, step, data position, sampling RNG. With W ranks
// each writes its own file (its experts' moments differ); a resume needs the same W.
typedef struct {
    int step;
    DataLoaderPosition data;
    uint64_t rng;
} TrainState;

void state_path(char* out, size_t n, const char* dir, int step, int rank) {
    snprintf(out, n, "%s/state_%08d_%05d.bin", dir, step, rank);
}

void state_write(const GPT2* model, const TrainState* s, const char* path) {
    int header[256] = {0};
    header[0] = STATE_MAGIC;
    header[1] = 1;
    header[2] = s->step;
    header[3] = model->comm.rank;
    header[4] = model->comm.world;
    int64_t fields[5] = {(int64_t)model->num_parameters, s->data.epoch, s->data.shard_idx, s->data.sample_idx, (int64_t)s->rng};
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE* fp = fopenCheck(tmp, "wb");
    fwriteCheck(header, sizeof(int), 256, fp);
    fwriteCheck(fields, sizeof(int64_t), 5, fp);
    fwriteCheck(model->m_memory, sizeof(float), model->num_parameters, fp);
    fwriteCheck(model->v_memory, sizeof(float), model->num_parameters, fp);
    fcloseCheck(fp);
    if (rename(tmp, path) != 0) { fail_exit("could not rename %s to %s", tmp, path); }
}

int state_read(GPT2* model, TrainState* s, const char* path, char* err, size_t errlen) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) { snprintf(err, errlen, "%s: cannot open training state", path); return -1; }
    int header[256];
    int64_t fields[5];
    if (fread(header, sizeof(int), 256, fp) != 256 || fread(fields, sizeof(int64_t), 5, fp) != 5) {
        snprintf(err, errlen, "%s: truncated training state header", path);
        fclose(fp);
        return -1;
    }
    if (header[0] != STATE_MAGIC || header[1] != 1) {
        snprintf(err, errlen, "%s: bad magic/version %d/%d (expected %d/1)", path, header[0], header[1], STATE_MAGIC);
        fclose(fp);
        return -1;
    }
    if (header[3] != model->comm.rank || header[4] != model->comm.world) {
        snprintf(err, errlen, "%s: state of rank %d of %d, this is rank %d of %d (resume with the same number of processes)",
                 path, header[3], header[4], model->comm.rank, model->comm.world);
        fclose(fp);
        return -1;
    }
    if (fields[0] != (int64_t)model->num_parameters) {
        snprintf(err, errlen, "%s: state is for %lld parameters, the model has %zu", path, (long long)fields[0], model->num_parameters);
        fclose(fp);
        return -1;
    }
    if (model->m_memory == NULL) {
        model->m_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
        model->v_memory = (float*)callocCheck(model->num_parameters, sizeof(float));
    }
    size_t n = model->num_parameters;
    if (fread(model->m_memory, sizeof(float), n, fp) != n || fread(model->v_memory, sizeof(float), n, fp) != n || fgetc(fp) != EOF) {
        snprintf(err, errlen, "%s: wrong size for %zu parameters (truncated or trailing data)", path, n);
        fclose(fp);
        return -1;
    }
    fclose(fp);
    s->step = header[2];
    s->data.epoch = fields[1];
    s->data.shard_idx = fields[2];
    s->data.sample_idx = fields[3];
    s->rng = (uint64_t)fields[4];
    return 0;
}

// ----------------------------------------------------------------------------
// sampling and the learning-rate schedule

int sample_mult(const float* probs, int n, float coin) { // coin in [0, 1)
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) { return i; }
    }
    return n - 1;
}

// generates genT tokens after an end-of-text token; dropless routing so that the sample does not
// depend on the capacity of a batch of one. Tokens go to out (genT), returns how many were made.
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

// linear warmup, then cosine decay to lr * final_frac (as llm.c)
float learning_rate_at(int step, int max_steps, float lr, int warmup, float final_frac) {
    if (step < warmup) { return lr * (step + 1) / warmup; }
    float min_lr = lr * final_frac;
    float ratio = max_steps > warmup ? (float)(step - warmup) / (max_steps - warmup) : 1.0f;
    if (ratio > 1.0f) { ratio = 1.0f; }
    float coeff = 0.5f * (1.0f + cosf((float)M_PI * ratio));
    return min_lr + coeff * (lr - min_lr);
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// command line (llm.c's flags, plus the MoE ones in capitals)

typedef struct {
    const char* train_pattern; // -i
    const char* val_pattern;   // -j
    const char* output_dir;    // -o
    const char* model;         // -e descriptor (d4, d6, d12, ...) or checkpoint file
    const char* tokenizer_dir; // -k folder with encoder.json and vocab.bpe
    int B, T;                  // -b, -t
    int total_batch;           // -d tokens per optimizer step (-1: B*T)
    float lr, final_lr_frac;   // -l, -q
    int warmup;                // -u
    float weight_decay;        // -c
    float grad_clip;           // -G (0: off)
    int max_steps;             // -x
    int val_every, val_steps;  // -v, -m
    int sample_every, genT;    // -s, -g
    int ckpt_every;            // -n
    int resume;                // -y
    uint64_t seed;             // -S
    int shuffle;               // -W
    // MoE (set: given on the command line)
    int E, K, moe_every, H, renorm; // -E -K -M -H -R
    int set_E, set_K, set_M, set_H, set_R;
    float capacity_factor, aux_w, z_w, upcycle_noise; // -F -A -Z -N
    // LSH compression of the all-to-all
    int lsh_L, lsh_dp, lsh_compensate, lsh_center, sources; // -J -P -C -O -V
} TrainArgs;

void print_usage(void) {
    fprintf(stderr,
        "Usage: ./train_gpt2_moe_cpu [options]\n"
        "  -i <pattern> train token shards (default data/tinyshakespeare/tiny_shakespeare_train.bin)\n"
        "  -j <pattern> val token shards (default data/tinyshakespeare/tiny_shakespeare_val.bin)\n"
        "  -o <dir>     output folder for main.log and checkpoints (default none)\n"
        "  -e <model>   descriptor d4|d6|d12|d24|d36|d48 or a checkpoint file (default d4)\n"
        "  -k <dir>     tokenizer folder with encoder.json and vocab.bpe (default data/gpt2)\n"
        "  -b <int>     batch size B (default 4)          -t <int> sequence length T (default 64)\n"
        "  -d <int>     total batch in tokens, a multiple of B*T (default B*T)\n"
        "  -l <float>   learning rate (default 3e-4)      -u <int> warmup steps (default 0)\n"
        "  -q <float>   final lr fraction (default 1.0)   -c <float> weight decay (default 0.0)\n"
        "  -G <float>   gradient clip norm, 0 off (default 1.0)\n"
        "  -x <int>     steps (default 40)                -S <int> seed (default 1337)\n"
        "  -v <int>     val every (default 20)            -m <int> val batches (default 20)\n"
        "  -s <int>     sample every (default 20)         -g <int> sample tokens (default 64)\n"
        "  -n <int>     checkpoint every, 0 = at the end only (default 0)\n"
        "  -y <0|1>     resume from the latest checkpoint in -o (default 0)\n"
        "  -W <0|1>     shuffle the training data (default 1)\n"
        "  MoE: -E <int> experts (default 1 = dense)   -K <int> top-k (default 2, or 1 if E=1)\n"
        "       -M <int> every M-th layer is MoE (1)   -H <int> expert hidden size (default 4C)\n"
        "       -F <float> capacity factor, <=0 dropless (1.25)   -R <0|1> renormalise gates (1)\n"
        "       -A <float> load-balancing loss weight (0.01)   -Z <float> z-loss weight (0.001)\n"
        "       -N <float> noise std on upcycled experts (0.0)\n"
        "  LSH:  -J <int> hash functions, 0 = off (0)  -P <int> projection width d' (4)\n"
        "       -C <0|1> residual compensation (1)     -O <0|1> centre each group before hashing (1)\n"
        "       -V <int> simulated source ranks per process: groups are (expert, source) (1)\n");
}

static int parse_int(const char* flag, const char* s, int min) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < min || v > INT_MAX) { fail_exit("flag %s: expected an integer >= %d, got '%s'", flag, min, s); }
    return (int)v;
}

static float parse_float(const char* flag, const char* s) {
    char* end;
    float v = strtof(s, &end);
    if (*s == '\0' || *end != '\0' || !isfinite(v)) { fail_exit("flag %s: expected a number, got '%s'", flag, s); }
    return v;
}

void parse_args(TrainArgs* a, int argc, char** argv, int world) {
    memset(a, 0, sizeof(TrainArgs));
    a->train_pattern = "data/tinyshakespeare/tiny_shakespeare_train.bin";
    a->val_pattern = "data/tinyshakespeare/tiny_shakespeare_val.bin";
    a->model = "d4";
    a->tokenizer_dir = "data/gpt2";
    a->B = 4; a->T = 64; a->total_batch = -1;
    a->lr = 3e-4f; a->final_lr_frac = 1.0f; a->warmup = 0; a->weight_decay = 0.0f; a->grad_clip = 1.0f;
    a->max_steps = 40; a->val_every = 20; a->val_steps = 20; a->sample_every = 20; a->genT = 64;
    a->seed = 1337; a->shuffle = 1;
    a->E = 1; a->K = 2; a->moe_every = 1; a->H = 0; a->renorm = 1;
    a->capacity_factor = 1.25f; a->aux_w = 0.01f; a->z_w = 0.001f;
    a->lsh_L = 0; a->lsh_dp = 4; a->lsh_compensate = 1; a->lsh_center = 1; a->sources = 1;
    for (int i = 1; i < argc; i += 2) {
        const char* f = argv[i];
        if (strcmp(f, "-h") == 0) { print_usage(); exit(EXIT_SUCCESS); }
        if (f[0] != '-' || strlen(f) != 2) { fail_exit("unknown argument '%s' (-h lists the flags)", f); }
        if (i + 1 >= argc) { fail_exit("flag %s needs a value (-h lists the flags)", f); }
        const char* v = argv[i + 1];
        switch (f[1]) {
            case 'i': a->train_pattern = v; break;
            case 'j': a->val_pattern = v; break;
            case 'o': a->output_dir = v; break;
            case 'e': a->model = v; break;
            case 'k': a->tokenizer_dir = v; break;
            case 'b': a->B = parse_int(f, v, 1); break;
            case 't': a->T = parse_int(f, v, 1); break;
            case 'd': a->total_batch = parse_int(f, v, -1); break;
            case 'l': a->lr = parse_float(f, v); break;
            case 'u': a->warmup = parse_int(f, v, 0); break;
            case 'q': a->final_lr_frac = parse_float(f, v); break;
            case 'c': a->weight_decay = parse_float(f, v); break;
            case 'G': a->grad_clip = parse_float(f, v); break;
            case 'x': a->max_steps = parse_int(f, v, 0); break;
            case 'v': a->val_every = parse_int(f, v, 0); break;
            case 'm': a->val_steps = parse_int(f, v, 1); break;
            case 's': a->sample_every = parse_int(f, v, 0); break;
            case 'g': a->genT = parse_int(f, v, 1); break;
            case 'n': a->ckpt_every = parse_int(f, v, 0); break;
            case 'y': a->resume = parse_int(f, v, 0); break;
            case 'S': a->seed = (uint64_t)parse_int(f, v, 0); break;
            case 'W': a->shuffle = parse_int(f, v, 0); break;
            case 'E': a->E = parse_int(f, v, 1); a->set_E = 1; break;
            case 'K': a->K = parse_int(f, v, 1); a->set_K = 1; break;
            case 'M': a->moe_every = parse_int(f, v, 1); a->set_M = 1; break;
            case 'H': a->H = parse_int(f, v, 0); a->set_H = 1; break;
            case 'R': a->renorm = parse_int(f, v, 0); a->set_R = 1; break;
            case 'F': a->capacity_factor = parse_float(f, v); break;
            case 'A': a->aux_w = parse_float(f, v); break;
            case 'Z': a->z_w = parse_float(f, v); break;
            case 'N': a->upcycle_noise = parse_float(f, v); break;
            case 'J': a->lsh_L = parse_int(f, v, 0); break;
            case 'P': a->lsh_dp = parse_int(f, v, 1); break;
            case 'C': a->lsh_compensate = parse_int(f, v, 0); break;
            case 'O': a->lsh_center = parse_int(f, v, 0); break;
            case 'V': a->sources = parse_int(f, v, 1); break;
            default: fail_exit("unknown flag %s (-h lists the flags)", f);
        }
    }
    if (a->E == 1 && !a->set_K) { a->K = 1; }
    if (a->resume > 1 || a->shuffle > 1 || a->renorm > 1 || a->lsh_compensate > 1 || a->lsh_center > 1) {
        fail_exit("flags -y, -W, -R, -C and -O take 0 or 1");
    }
    if (a->B % a->sources != 0) { fail_exit("flag -V: %d simulated ranks must divide the batch B=%d (each owns whole sequences)", a->sources, a->B); }
    if (a->resume && a->output_dir == NULL) { fail_exit("flag -y 1 needs an output folder -o to resume from"); }
    if (a->E > 1 && a->K > a->E) { fail_exit("flag -K: top-k K=%d exceeds the number of experts E=%d", a->K, a->E); }
    if (a->E == 1 && (a->set_K || a->set_M || a->set_H) && a->K != 1) { fail_exit("flag -K: top-k K=%d needs E >= K experts (-E is 1)", a->K); }
    if (a->lr <= 0.0f) { fail_exit("flag -l: learning rate must be > 0"); }
    if (a->total_batch == -1) { a->total_batch = a->B * a->T * world; }
    if (a->total_batch <= 0 || a->total_batch % (a->B * a->T * world) != 0) {
        fail_exit("flag -d: total batch %d tokens is not a positive multiple of B*T*W = %d", a->total_batch, a->B * a->T * world);
    }
}

// finds the latest step in dir with a model file and this rank's state file; -1 if none
int find_latest_checkpoint(const char* dir, int rank) {
    DIR* d = opendir(dir);
    if (d == NULL) { return -1; }
    int best = -1;
    struct dirent* ent;
    while ((ent = readdir(d)) != NULL) {
        int step;
        char tail;
        if (sscanf(ent->d_name, "model_%8d.bi%c", &step, &tail) == 2 && tail == 'n' && strlen(ent->d_name) == 18) {
            char path[4096];
            state_path(path, sizeof(path), dir, step, rank);
            if (access(path, R_OK) == 0 && step > best) { best = step; }
        }
    }
    closedir(d);
    return best;
}

// FNV-1a of the binary's build and the command line: every rank must run the same of both
uint64_t run_fingerprint(int argc, char** argv) {
    uint64_t h = 0xcbf29ce484222325ull;
    const char* build = __DATE__ " " __TIME__ " " __FILE__;
    for (const char* c = build; *c; c++) { h = (h ^ (unsigned char)*c) * 0x100000001b3ull; }
    h = (h ^ sizeof(GPT2)) * 0x100000001b3ull;
    for (int i = 1; i < argc; i++) {
        for (const char* c = argv[i]; *c; c++) { h = (h ^ (unsigned char)*c) * 0x100000001b3ull; }
        h = (h ^ 0xff) * 0x100000001b3ull;
    }
    return h;
}

// mean over ranks of one number per rank (the losses: every rank has the same number of tokens)
double mean_over_ranks(double x, const Comm* comm) {
    allreduce_doubles(&x, 1, comm);
    return x / comm->world;
}

// ----------------------------------------------------------------------------
// main training loop
#ifndef TESTING
int main(int argc, char** argv) {
    Comm comm = comm_init(&argc, &argv);
    int W = comm.world;
    char err[1024];
    {   // every rank must run the same binary with the same flags
        uint64_t fp = run_fingerprint(argc, argv);
        int mine[2] = {(int)(fp >> 32), (int)(fp & 0xffffffffu)};
        int* all = (int*)mallocCheck(2 * W * sizeof(int));
        allgather_ints(mine, all, 2, &comm);
        int differs = all[0] != mine[0] || all[1] != mine[1];
        snprintf(err, sizeof(err), "the binary or the command line differs from rank 0's (every rank must run the same)");
        comm_check_all(differs, err, &comm);
        free(all);
    }
    TrainArgs args;
    parse_args(&args, argc, argv, W);

    // the model: from a checkpoint (possibly resumed or upcycled) or from a descriptor
    GPT2 model;
    GPT2Config moe_flags = {0};
    moe_flags.num_experts = args.E;
    moe_flags.top_k = args.K;
    moe_flags.moe_every = args.moe_every;
    moe_flags.expert_hidden = args.H;
    moe_flags.renorm_gates = args.renorm;
    TrainState state = {0};
    state.rng = args.seed ^ 0xA5A5A5A5ull; // the same on every rank: all ranks sample the same tokens
    int resume_step = -1;
    if (args.resume) {
        resume_step = find_latest_checkpoint(args.output_dir, comm.rank);
        if (resume_step < 0) { fail_exit("flag -y 1: no checkpoint (model_*.bin + state_*_%05d.bin) in %s", comm.rank, args.output_dir); }
    }
    const char* model_path = args.model;
    char resume_path[4096];
    if (resume_step >= 0) {
        snprintf(resume_path, sizeof(resume_path), "%s/model_%08d.bin", args.output_dir, resume_step);
        model_path = resume_path;
    }
    GPT2Config descriptor;
    if (resume_step < 0 && gpt2_config_from_descriptor(&descriptor, model_path) == 0) {
        if (args.E > 1) {
            descriptor.num_experts = args.E;
            descriptor.top_k = args.K;
            descriptor.moe_every = args.moe_every;
            descriptor.expert_hidden = args.H > 0 ? args.H : 4 * descriptor.channels;
            descriptor.renorm_gates = args.renorm;
        }
        if (gpt2_config_check(&descriptor, err, sizeof(err)) != 0) { fail_exit("model %s: %s", model_path, err); }
        if (args.E > 1 && args.E % W != 0) { fail_exit("flag -E: E=%d experts cannot be split evenly over W=%d processes", args.E, W); }
        gpt2_allocate(&model, &descriptor, comm);
        gpt2_init_random(&model, args.seed);
    } else {
        if (model_path[0] == 'd' && access(model_path, F_OK) != 0) {
            fail_exit("flag -e: '%s' is neither a descriptor (d4 d6 d12 d24 d36 d48) nor a checkpoint file", model_path);
        }
        int rc = gpt2_load_checkpoint(&model, model_path, &moe_flags, args.upcycle_noise, args.seed, comm, err, sizeof(err));
        comm_check_all(rc != 0, err, &comm);
        const GPT2Config* c = &model.config;
        if (c->num_experts > 1 && ((args.set_E && args.E != c->num_experts) || (args.set_K && args.K != c->top_k) ||
                                   (args.set_M && args.moe_every != c->moe_every) || (args.set_H && args.H != c->expert_hidden) ||
                                   (args.set_R && args.renorm != c->renorm_gates))) {
            fail_exit("flags -E/-K/-M/-H/-R conflict with checkpoint %s (E=%d K=%d moe_every=%d H=%d renorm=%d)",
                      model_path, c->num_experts, c->top_k, c->moe_every, c->expert_hidden, c->renorm_gates);
        }
    }
    model.capacity_factor = args.capacity_factor;
    model.aux_loss_weight = args.aux_w;
    model.z_loss_weight = args.z_w;
    LSHConfig lsh = {args.lsh_L, args.lsh_dp, args.lsh_center, args.lsh_compensate};
    if (gpt2_set_lsh(&model, lsh, args.sources, args.seed, err, sizeof(err)) != 0) { fail_exit("flags -J/-P/-V: %s", err); }
    const GPT2Config* cfg = &model.config;
    if (args.T > cfg->max_seq_len) { fail_exit("flag -t: T=%d exceeds the model's maxT=%d", args.T, cfg->max_seq_len); }
    int B = args.B, T = args.T; // B is per process, as in llm.c
    int grad_accum = args.total_batch / (B * T * W);

    // data: every rank checks its shards first, so that a rank that cannot read them stops all
    // ranks with one message instead of leaving the others waiting in a collective
    size_t min_tokens = (size_t)B * T * W + 1;
    int bad = dataloader_check_pattern(args.train_pattern, min_tokens, err, sizeof(err)) != 0 ||
              dataloader_check_pattern(args.val_pattern, min_tokens, err, sizeof(err)) != 0;
    comm_check_all(bad, err, &comm);
    errors_on_every_rank = 1; // from here on a failure may be one rank's own
    DataLoader train_loader, val_loader;
    dataloader_init(&train_loader, args.train_pattern, B, T, comm.rank, W, args.shuffle, args.seed, cfg->vocab_size);
    dataloader_init(&val_loader, args.val_pattern, B, T, comm.rank, W, 0, args.seed, cfg->vocab_size);
    if (resume_step >= 0) {
        char path[4096];
        state_path(path, sizeof(path), args.output_dir, resume_step, comm.rank);
        int rc = state_read(&model, &state, path, err, sizeof(err));
        comm_check_all(rc != 0, err, &comm);
        dataloader_resume(&train_loader, state.data);
    }

    // tokenizer, for the samples (optional: without it the samples print as token ids)
    Tokenizer tokenizer;
    int have_tokenizer = 0;
    char enc_path[4096], bpe_path[4096];
    snprintf(enc_path, sizeof(enc_path), "%s/encoder.json", args.tokenizer_dir);
    snprintf(bpe_path, sizeof(bpe_path), "%s/vocab.bpe", args.tokenizer_dir);
    if (comm.rank == 0 && access(enc_path, R_OK) == 0 && access(bpe_path, R_OK) == 0) {
        tokenizer_init(&tokenizer, enc_path, bpe_path);
        have_tokenizer = 1;
    } else {
        printf0("tokenizer files not found in %s: samples print as token ids\n", args.tokenizer_dir);
    }

    FILE* logfile = NULL;
    if (args.output_dir != NULL) {
        mkdir(args.output_dir, 0755);
        if (comm.rank == 0) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/main.log", args.output_dir);
            logfile = fopenCheck(path, resume_step >= 0 ? "a" : "w");
        }
    }

    size_t total_params = model.num_parameters, active = model.num_parameters;
    if (cfg->num_experts > 1) {
        size_t per_expert = (size_t)num_moe_layers(cfg) * (2 * (size_t)cfg->expert_hidden * cfg->channels + cfg->expert_hidden + cfg->channels);
        total_params += per_expert * (cfg->num_experts - model.E_local); // the other ranks' experts
        active = total_params - per_expert * (cfg->num_experts - cfg->top_k); // only K of E touch a token
    }
    printf0("+-----------------------+----------------------------------------------------+\n");
    printf0("| model                 | %-50s |\n", model_path);
    printf0("| L, C, NH, maxT, V, Vp | %d, %d, %d, %d, %d, %d\n", cfg->num_layers, cfg->channels, cfg->num_heads, cfg->max_seq_len, cfg->vocab_size, cfg->padded_vocab_size);
    if (cfg->num_experts > 1) {
        printf0("| MoE                   | E=%d K=%d moe_every=%d H=%d renorm=%d capacity=%.2f aux=%g z=%g\n",
                cfg->num_experts, cfg->top_k, cfg->moe_every, cfg->expert_hidden, cfg->renorm_gates,
                args.capacity_factor, args.aux_w, args.z_w);
    } else {
        printf0("| MoE                   | none (dense GPT-2)\n");
    }
    printf0("| parameters            | %zu total, %zu active per token\n", total_params, active);
    printf0("| processes             | W=%d%s", W, W > 1 && cfg->num_experts > 1 ? ", experts split evenly" : "");
    if (args.sources > 1) { printf0(", %d simulated source ranks each", args.sources); }
    printf0("\n");
    if (args.lsh_L > 0) {
        printf0("| LSH                   | L=%d hash functions, d'=%d, compensation %s, centring %s\n",
                args.lsh_L, args.lsh_dp, args.lsh_compensate ? "on" : "off", args.lsh_center ? "on" : "off");
    }
    printf0("| batch                 | B=%d T=%d per process, %d tokens per step (grad accum %d)\n", B, T, args.total_batch, grad_accum);
    printf0("| train / val tokens    | %zu / %zu\n", train_loader.num_tokens, val_loader.num_tokens);
#ifdef OMP
    printf0("| OpenMP threads        | %d per process\n", omp_get_max_threads());
#endif
    printf0("+-----------------------+----------------------------------------------------+\n");

    int E = cfg->num_experts > 1 ? cfg->num_experts : 0;
    int Lm = num_moe_layers(cfg);
    int* gen_tokens = (int*)mallocCheck(args.genT * sizeof(int));
    long long* load = (long long*)callocCheck(E > 0 ? E : 1, sizeof(long long));
    int start_step = resume_step >= 0 ? state.step : 0;
    if (resume_step >= 0) { printf0("resumed from step %d (%s)\n", resume_step, model_path); }
    double total_ms = 0.0;
    for (int step = start_step; step <= args.max_steps; step++) {
        int last_step = step == args.max_steps;

        if (args.val_every > 0 && (step % args.val_every == 0 || last_step)) {
            double val_loss = 0.0;
            dataloader_reset(&val_loader);
            for (int i = 0; i < args.val_steps; i++) {
                dataloader_next_batch(&val_loader);
                gpt2_forward(&model, val_loader.inputs, val_loader.targets, B, T);
                val_loss += model.mean_loss;
            }
            val_loss = mean_over_ranks(val_loss / args.val_steps, &comm);
            printf0("val loss %.6f\n", val_loss);
            if (logfile) { fprintf(logfile, "s:%d tel:%.6f\n", step, val_loss); fflush(logfile); }
        }

        if (args.sample_every > 0 && step > 0 && (step % args.sample_every == 0 || last_step)) {
            // every rank generates (the MoE layers are collective), rank 0 prints
            int n = gpt2_generate(&model, gen_tokens, args.genT, 50256, &state.rng);
            printf0("generating:\n---\n");
            for (int i = 0; i < n && comm.rank == 0; i++) {
                if (have_tokenizer) { safe_printf(tokenizer_decode(&tokenizer, gen_tokens[i])); }
                else { printf("%d ", gen_tokens[i]); }
            }
            printf0("\n---\n");
            fflush(stdout);
        }

        if (args.output_dir != NULL && step > start_step && (last_step || (args.ckpt_every > 0 && step % args.ckpt_every == 0))) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/model_%08d.bin", args.output_dir, step);
            gpt2_write_checkpoint(&model, path);
            state.step = step;
            state.data = dataloader_position(&train_loader);
            state_path(path, sizeof(path), args.output_dir, step, comm.rank);
            state_write(&model, &state, path);
            printf0("wrote checkpoint %s/model_%08d.bin and its training state\n", args.output_dir, step);
        }
        if (last_step) { break; }

        double t0 = now_seconds();
        gpt2_zero_grad(&model);
        model.step = step;
        lsh_stats_reset(&model.lsh_stats);
        double ce = 0.0, lb = 0.0, z = 0.0, dropped = 0.0;
        long long a2a[8] = {0}; // rows: sent then received, for the four all-to-alls
        double wire[2] = {0.0, 0.0}; // rows crossing ranks per all-to-all: uncompressed, as sent
        for (int e = 0; e < E; e++) { load[e] = 0; }
        for (int micro = 0; micro < grad_accum; micro++) {
            dataloader_next_batch(&train_loader);
            gpt2_forward(&model, train_loader.inputs, train_loader.targets, B, T);
            gpt2_backward(&model, 1.0f / (grad_accum * W));
            ce += model.mean_loss / grad_accum;
            lb += model.lb_loss / grad_accum;
            z += model.z_loss / grad_accum;
            dropped += model.dropped_slots;
            for (int i = 0; i < 4; i++) { a2a[i] += model.a2a_sent[i]; a2a[4 + i] += model.a2a_recv[i]; }
            wire[0] += model.wire_rows[0];
            wire[1] += model.wire_rows[1];
            for (int m = 0; m < Lm; m++) { // counts of the whole batch: every rank has them
                for (int q = 0; q < W; q++) {
                    for (int e = 0; e < E; e++) { load[e] += model.routing.counts[((size_t)m * W + q) * E + e]; }
                }
            }
        }
        gpt2_allreduce_grads(&model);
        float lr = learning_rate_at(step, args.max_steps, args.lr, args.warmup, args.final_lr_frac);
        float norm = gpt2_update(&model, lr, 0.9f, 0.95f, 1e-8f, args.weight_decay, args.grad_clip, step + 1);
        allreduce_doubles(wire, 2, &comm); // over all ranks: what the step moved between ranks
        double wire_mb[2] = {wire[0] * cfg->channels * 4 / 1e6, wire[1] * cfg->channels * 4 / 1e6}; // fp32 rows, per all-to-all
        ce = mean_over_ranks(ce, &comm);
        lb = mean_over_ranks(lb, &comm);
        z = mean_over_ranks(z, &comm);
        double sent_mb[4], recv_mb[4], sent_total = 0.0;
        for (int i = 0; i < 4; i++) { // this rank's bytes to and from other ranks
            sent_mb[i] = a2a[i] * (double)cfg->channels * sizeof(float) / 1e6;
            recv_mb[i] = a2a[4 + i] * (double)cfg->channels * sizeof(float) / 1e6;
            sent_total += sent_mb[i];
        }
        double ms = (now_seconds() - t0) * 1000.0;
        if (step > start_step) { total_ms += ms; } // the first step pays for allocation
        double total = ce + args.aux_w * lb + args.z_w * z;
        printf0("step %4d/%d | loss %.6f | ce %.4f", step + 1, args.max_steps, total, ce);
        if (E > 0) {
            long long slots = (long long)grad_accum * B * T * W * cfg->top_k * Lm;
            // per layer means of the aux losses; each expert's load relative to a uniform split
            printf0(" lb %.3f z %.2f drop %.1f%% | load/uniform", lb / Lm, z / Lm, 100.0 * dropped / slots);
            for (int e = 0; e < E; e++) { printf0(" %.2f", (double)load[e] * E / slots); }
            if (W > 1) { printf0(" | a2a %.2f MB sent", sent_total); }
            if (args.lsh_L > 0) {
                printf0(" | lsh rate %.3f bucket %.1f err %.3f | wire %.2f of %.2f MB", lsh_stats_rate(&model.lsh_stats),
                        lsh_stats_bucket_mean(&model.lsh_stats), lsh_stats_rel_error(&model.lsh_stats), wire_mb[1], wire_mb[0]);
            }
        }
        printf0(" | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s\n", norm, lr, ms, args.total_batch / (ms / 1000.0));
        if (logfile) {
            fprintf(logfile, "s:%d trl:%.6f ce:%.6f lb:%.6f z:%.6f drop:%.0f norm:%.4f lr:%.6e ms:%.2f", step, total, ce, lb, z, dropped, norm, lr, ms);
            if (E > 0 && W * args.sources > 1) { // crossing ranks (real or simulated), MB per all-to-all
                fprintf(logfile, " wire_mb:%.4f wire_mb_uncompressed:%.4f", wire_mb[1], wire_mb[0]);
            }
            if (args.lsh_L > 0) { // rank 0's LSH: centroids / rows, ||x - c|| / ||x||, seconds in lshmoe.h
                const LSHStats* ls = &model.lsh_stats;
                fprintf(logfile, " lsh_rate:%.4f lsh_bucket:%.3f lsh_err:%.4f lsh_ms:%.2f", lsh_stats_rate(ls),
                        lsh_stats_bucket_mean(ls), lsh_stats_rel_error(ls),
                        1000.0 * (ls->t_hash + ls->t_bucket + ls->t_centroid + ls->t_compensate + ls->t_backward));
            }
            if (W > 1 && E > 0) { // rank 0's traffic in MB: dispatch, combine, combine-backward, dispatch-backward
                fprintf(logfile, " a2a_sent_mb:%.3f,%.3f,%.3f,%.3f a2a_recv_mb:%.3f,%.3f,%.3f,%.3f",
                        sent_mb[0], sent_mb[1], sent_mb[2], sent_mb[3], recv_mb[0], recv_mb[1], recv_mb[2], recv_mb[3]);
            }
            fprintf(logfile, "\n");
            fflush(logfile);
        }
    }
    int timed = args.max_steps - start_step - 1;
    if (timed > 0) { printf0("average step %.1f ms over %d steps (the first excluded)\n", total_ms / timed, timed); }

    if (logfile) { fclose(logfile); }
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

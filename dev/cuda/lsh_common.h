/*
dev/cuda/lsh_common.h: what the LSH kernel files of dev/cuda share. Each file runs one kernel of
lshmoe.cu on a batch of groups (the rows one source sends to one expert: clustered rows, so
buckets hold several), checks it against lshmoe.h, the CPU specification, in fp32 and in bf16,
and times it. The check is bit for bit wherever the kernel takes lshmoe.h's sums in its order
(everything but the hash's dot products, which nvcc may fuse into multiply-adds: there keys may
differ at near ties, counted by lsh_hash_margin). The timing prints, per call, the bytes the
kernel must move at least (each input read once, each output written once), the bytes its loads
and stores ask for as written (before any cache), and its time against a device-to-device copy
of the minimum bytes, measured in the same run. Timings mean something on a GPU only; the
emulated builds (make test) run a small batch for the checks and time one call.

  LSHBatch b;
  lsh_batch_init(&b, argc, argv);    // flags: -g groups -r rows per group -c C -L -d dp -i iterations
  ... the kernel on b.x (rows), lshmoe.h on the same rows, group by group (b.bucket_of_row ...) ...
  lsh_bench("name", min_bytes, asked_bytes, call, &ctx, &b);
  int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }
  (lsh_main: the batch, run in fp32 and in bf16, the summary line)
*/
#ifndef LSH_COMMON_H
#define LSH_COMMON_H

#include "lshmoe.cu"
#include "dev/testing.h"

#ifdef CUDA_EMULATION
static const int lsh_emulated = 1;
#else
static const int lsh_emulated = 0;
#endif

// a batch of G groups and lshmoe.h's answer for it, group by group
typedef struct {
    int G, C, n, m, iters;
    LSHConfig cfg;
    int* group_rows;         // (G+1) host: group g is rows [group_rows[g], group_rows[g+1])
    float* x;                // (n, C) rows, bf16-exact (so fp32 and bf16 kernels read the same values)
    float* R;                // (L*dp, C) the projections; d_R on the device
    float* d_R;
    float* mean;             // (G, C) each group's mean (lsh_group_mean)
    uint64_t* keys;          // (n) lshmoe.h's keys
    int* bucket_of_row;      // (n) lshmoe.h's bucket ids, within the group
    int* bucket_size;        // (m) rows of each centroid's bucket, groups in turn
    int* group_cents;        // (G+1) centroid offsets of the groups
    float* cent;             // (m, C) lshmoe.h's centroids
} LSHBatch;

static inline int lsh_flag(int argc, char** argv, const char* name, int dflt) {
    for (int i = 1; i + 1 < argc; i++) {
        if (strcmp(argv[i], name) == 0) {
            int v = atoi(argv[i + 1]);
            if (v < 1) { fail_exit("flag %s: expected an integer >= 1, got '%s'", name, argv[i + 1]); }
            return v;
        }
    }
    return dflt;
}

static inline float lsh_bf16_round(float v) { return (float)(__nv_bfloat16)v; }

// The defaults: on a GPU the trainer's regime (64 groups of ~256 rows, C = 768, L = 6, d' = 4);
// emulated, a small batch with an empty and a one-row group
static inline void lsh_batch_init(LSHBatch* b, int argc, char** argv) {
    memset(b, 0, sizeof(*b));
    b->G = lsh_flag(argc, argv, "-g", lsh_emulated ? 6 : 64);
    int rows = lsh_flag(argc, argv, "-r", lsh_emulated ? 48 : 256);
    b->C = lsh_flag(argc, argv, "-c", lsh_emulated ? 64 : 768);
    b->cfg = (LSHConfig){lsh_flag(argc, argv, "-L", 6), lsh_flag(argc, argv, "-d", 4), 1, 1};
    b->iters = lsh_emulated ? 1 : lsh_flag(argc, argv, "-i", 100);
    char err[256];
    if (lsh_config_check(b->cfg.L, b->cfg.dp, err, sizeof(err)) != 0) { fail_exit("flags -L/-d: %s", err); }
    int G = b->G, C = b->C;
    uint64_t rng = 1234;
    b->group_rows = (int*)mallocCheck((G + 1) * sizeof(int));
    b->group_rows[0] = 0;
    for (int g = 0; g < G; g++) { // sizes in [rows/2, 3 rows/2), group 0 empty, group 1 one row
        int ng = g == 0 ? 0 : g == 1 ? 1 : rows / 2 + (int)(lsh_splitmix64(&rng) % (uint64_t)rows);
        b->group_rows[g + 1] = b->group_rows[g] + ng;
    }
    int n = b->n = b->group_rows[G];
    size_t nC = (size_t)n * C, RC = (size_t)b->cfg.L * b->cfg.dp * C;
    // each group: a shared offset (centring matters) plus one of n_g/4 prototypes plus small noise
    b->x = (float*)mallocCheck((nC + 1) * sizeof(float));
    float* proto = (float*)mallocCheck(((size_t)rows * 2 * C + C) * sizeof(float));
    for (int g = 0; g < G; g++) {
        int r0 = b->group_rows[g], ng = b->group_rows[g + 1] - r0, P = ng / 4 > 0 ? ng / 4 : 1;
        for (size_t i = 0; i < (size_t)(P + 1) * C; i++) { proto[i] = (float)lsh_normal(&rng); }
        for (int i = 0; i < ng; i++) {
            const float* pr = proto + (size_t)(1 + lsh_splitmix64(&rng) % (uint64_t)P) * C;
            for (int c = 0; c < C; c++) {
                b->x[(size_t)(r0 + i) * C + c] = lsh_bf16_round(0.5f * proto[c] + pr[c] + 0.1f * (float)lsh_normal(&rng));
            }
        }
    }
    free(proto);
    b->R = (float*)mallocCheck(RC * sizeof(float));
    lsh_projections_init(b->R, b->cfg.L, b->cfg.dp, C, lsh_seed(7, 0, 0));
    cudaCheck(cudaMalloc((void**)&b->d_R, RC * sizeof(float)));
    cudaCheck(cudaMemcpy(b->d_R, b->R, RC * sizeof(float), cudaMemcpyHostToDevice));
    // lshmoe.h, group by group
    b->mean = (float*)callocCheck((size_t)G * C, sizeof(float));
    b->keys = (uint64_t*)mallocCheck((n + 1) * sizeof(uint64_t));
    b->bucket_of_row = (int*)mallocCheck((n + 1) * sizeof(int));
    b->bucket_size = (int*)mallocCheck((n + 1) * sizeof(int));
    b->group_cents = (int*)mallocCheck((G + 1) * sizeof(int));
    b->cent = (float*)mallocCheck((nC + 1) * sizeof(float));
    b->group_cents[0] = 0;
    for (int g = 0; g < G; g++) {
        int r0 = b->group_rows[g], ng = b->group_rows[g + 1] - r0, c0 = b->group_cents[g];
        void* scratch = mallocCheck(lsh_scratch_bytes(ng, C));
        int mg = lsh_group_compress(b->cent + (size_t)c0 * C, b->bucket_of_row + r0, b->bucket_size + c0, b->x + (size_t)r0 * C,
                                    ng, C, b->R, &b->cfg, scratch, NULL);
        memcpy(b->keys + r0, scratch, ng * sizeof(uint64_t));
        if (ng > 0) {
            double* acc = (double*)mallocCheck(C * sizeof(double));
            lsh_group_mean(b->mean + (size_t)g * C, acc, b->x + (size_t)r0 * C, ng, C);
            free(acc);
        }
        b->group_cents[g + 1] = c0 + mg;
        free(scratch);
    }
    b->m = b->group_cents[G];
    printf("%d groups of 0, 1 and %d to %d rows, %d in all, C = %d, L = %d, d' = %d: lshmoe.h makes %d centroids (rate %.3f)%s\n", G,
           rows / 2, rows / 2 + rows - 1, n, C, b->cfg.L, b->cfg.dp, b->m, n > 0 ? (double)b->m / n : 0.0, lsh_emulated ? "; emulated on the CPU" : "");
}

static inline void lsh_batch_free(LSHBatch* b) {
    free(b->group_rows); free(b->x); free(b->R); free(b->mean); free(b->keys); free(b->bucket_of_row); free(b->bucket_size);
    free(b->group_cents); free(b->cent);
    cudaCheck(cudaFree(b->d_R));
}

// lshmoe.h's buckets as a device layout, built on the host, so that each kernel after the hash
// is checked on the specification's own bucket map
static inline void lsh_batch_layout(LSHLayout* lay, const LSHBatch* b) {
    int n = b->n, G = b->G;
    lsh_layout_alloc(lay, n, G);
    lay->n = n; lay->m = b->m; lay->G = G;
    int* h = (int*)callocCheck((size_t)(n + 1) * 5, sizeof(int)); // the five (n+1) arrays, as lsh_layout_alloc carves them
    int *cent_of_row = h, *bucket_local = h + (n + 1), *cent_size = h + 2 * (n + 1), *cent_start = h + 3 * (n + 1), *cent_rows = h + 4 * (n + 1);
    for (int g = 0; g < G; g++) {
        int r0 = b->group_rows[g], r1 = b->group_rows[g + 1], c0 = b->group_cents[g], at = r0;
        for (int c = c0; c < b->group_cents[g + 1]; c++) { cent_size[c] = b->bucket_size[c]; cent_start[c] = at; at += cent_size[c]; }
        int* fill = (int*)callocCheck(b->group_cents[g + 1] - c0 + 1, sizeof(int));
        for (int r = r0; r < r1; r++) {
            int c = c0 + b->bucket_of_row[r];
            bucket_local[r] = b->bucket_of_row[r];
            cent_of_row[r] = c;
            cent_rows[cent_start[c] + fill[c - c0]++] = r;
        }
        free(fill);
    }
    cudaCheck(cudaMemcpy(lay->cent_of_row, h, (size_t)(n + 1) * 5 * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(lay->group_rows, b->group_rows, (G + 1) * sizeof(int), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(lay->group_cents, b->group_cents, (G + 1) * sizeof(int), cudaMemcpyHostToDevice));
    memcpy(lay->group_cents_host, b->group_cents, (G + 1) * sizeof(int));
    free(h);
}

// device copies of host floats as T, and back
template <typename T>
static inline T* lsh_to_device(const float* x, size_t n) {
    T* h = (T*)mallocCheck((n + 1) * sizeof(T));
    for (size_t i = 0; i < n; i++) { h[i] = (T)x[i]; }
    T* d;
    cudaCheck(cudaMalloc((void**)&d, (n + 1) * sizeof(T)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(T), cudaMemcpyHostToDevice));
    free(h);
    return d;
}
template <typename T>
static inline float* lsh_to_host(const T* d, size_t n) {
    T* h = (T*)mallocCheck((n + 1) * sizeof(T));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(T), cudaMemcpyDeviceToHost));
    float* x = (float*)mallocCheck((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) { x[i] = (float)h[i]; }
    free(h);
    return x;
}

// random values, bf16-exact; and a result of lshmoe.h rounded once to T, as the kernels round
static inline float* lsh_random(size_t n, uint64_t seed) {
    float* v = (float*)mallocCheck((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) { v[i] = lsh_bf16_round((float)lsh_normal(&seed)); }
    return v;
}
template <typename T>
static inline void lsh_round_to(float* v, size_t n) { for (size_t i = 0; i < n; i++) { v[i] = (float)(T)v[i]; } }

// how many of n values differ in their bits (-0.0f and 0.0f differ; a NaN never matches)
static inline size_t lsh_bits_differ(const float* a, const float* b, size_t n) {
    size_t d = 0;
    for (size_t i = 0; i < n; i++) { d += memcmp(&a[i], &b[i], sizeof(float)) != 0; }
    return d;
}

template <typename T> static const char* lsh_type_name(void);
template <> inline const char* lsh_type_name<float>(void) { return "fp32"; }
template <> inline const char* lsh_type_name<__nv_bfloat16>(void) { return "bf16"; }

// Times call(ctx) over b->iters calls (after one warm-up) with CUDA events, and a device copy of
// the same minimum bytes (half read, half written) the same way; prints one line
static inline void lsh_bench(const char* name, double min_bytes, double asked_bytes, void (*call)(void*), void* ctx, const LSHBatch* b) {
    size_t half = (size_t)(min_bytes / 2) + 16;
    char *src, *dst;
    cudaCheck(cudaMalloc((void**)&src, half));
    cudaCheck(cudaMalloc((void**)&dst, half));
    cudaCheck(cudaMemset(src, 0, half));
    cudaEvent_t t0, t1;
    cudaCheck(cudaEventCreate(&t0));
    cudaCheck(cudaEventCreate(&t1));
    float ms_kernel = 0.0f, ms_copy = 0.0f;
    call(ctx);
    cudaCheck(cudaEventRecord(t0, 0));
    for (int i = 0; i < b->iters; i++) { call(ctx); }
    cudaCheck(cudaEventRecord(t1, 0));
    cudaCheck(cudaEventSynchronize(t1));
    cudaCheck(cudaEventElapsedTime(&ms_kernel, t0, t1));
    cudaCheck(cudaMemcpy(dst, src, half, cudaMemcpyDeviceToDevice));
    cudaCheck(cudaEventRecord(t0, 0));
    for (int i = 0; i < b->iters; i++) { cudaCheck(cudaMemcpyAsync(dst, src, half, cudaMemcpyDeviceToDevice, 0)); }
    cudaCheck(cudaEventRecord(t1, 0));
    cudaCheck(cudaEventSynchronize(t1));
    cudaCheck(cudaEventElapsedTime(&ms_copy, t0, t1));
    double us = 1e3 * ms_kernel / b->iters, us_copy = 1e3 * ms_copy / b->iters;
    printf("bench %s: %.3f MB minimum per call, %.3f MB as its loads and stores are written (%.1fx); %.1f us, %.1f GB/s of the "
           "minimum; a copy of the minimum %.1f us: %.2fx a copy%s\n",
           name, min_bytes / 1e6, asked_bytes / 1e6, asked_bytes / (min_bytes > 0 ? min_bytes : 1), us,
           us > 0 ? min_bytes / (us * 1e3) : 0.0, us_copy, us_copy > 0 ? us / us_copy : 0.0, lsh_emulated ? " (emulated: times mean nothing)" : "");
    cudaCheck(cudaEventDestroy(t0));
    cudaCheck(cudaEventDestroy(t1));
    cudaCheck(cudaFree(src));
    cudaCheck(cudaFree(dst));
}

// a kernel file's main: the batch, then its checks and timings in fp32 and in bf16
static inline int lsh_main(int argc, char** argv, void (*run_fp32)(const LSHBatch*), void (*run_bf16)(const LSHBatch*)) {
    LSHBatch b;
    lsh_batch_init(&b, argc, argv);
    run_fp32(&b);
    run_bf16(&b);
    lsh_batch_free(&b);
    return test_summary();
}

#endif // LSH_COMMON_H

/*
lshmoe.cu: LSH-MoE compression of the MoE all-to-all (Nie et al., NeurIPS 2024) on the GPU, the
CUDA twin of lshmoe.h, which stays the specification (its definitions 1-9). It compresses a batch
of groups at once: the rows one source sends to one expert in one layer, contiguous, group g at
rows [group_rows[g], group_rows[g+1]) of x. Given the same keys, its buckets are lshmoe.h's, and
its centroids, compensation and backward take the same sums in the same order (bit for bit unless
a compiler reorders them: the CPU build's -fassociative-math moves them by ~1e-8 in fp32); a key
can differ from lshmoe.h's only where two projections of a row nearly tie (nvcc may fuse a dot
product's multiply-adds).
Rows are T = float or __nv_bfloat16 (sums in fp32, as the trainer's other kernels); the hash
projections R come from lshmoe.h's lsh_projections_init (host) and lsh_seed. No dependency on
the trainer: cuda_common.h (CUDA, or its CPU emulation) and lshmoe.h only.

Kernels (one thread per group, row or (centroid | row, channel); fixed orders, no atomics):
  lsh_group_mean_kernel        centring: each group's mean, double sums in row order (def. 3)
  lsh_hash_kernel              a row's L cross-polytope hashes and their packed key (defs. 3-4)
  lsh_buckets_kernel           per group: bucket ids in order of first appearance (def. 5)
  lsh_bucket_rows_kernel       per group: each bucket's size, rows (in order) and global index
  lsh_bucket_sum_kernel        a bucket's rows summed in row order from -0.0f, / n_b for the
                               centroids (def. 6) or not for G_b of the backward (def. 8)
  lsh_compensate_kernel        Eq. 5: yhat_i = y_b + (x_i - c_b), or y_b alone (def. 7)
  lsh_compress_backward_kernel dx_i += dcent_b (n_b = 1), g_i + (dcent_b - G_b)/n_b, or dcent_b/n_b
  lsh_stats_kernel             per group: sum ||x_i - c_b||^2 and ||x_i||^2 in double, max n_b

Host API: a layer's compression (LSHLayout, device arrays the caller keeps until its backward):
  LSHScratch s; lsh_scratch_init(&s, max_rows, max_groups, C);  ...  lsh_scratch_free(&s);
  m = lsh_compress(&lay, cent, x, group_rows_host, G, C, R, &cfg, &s, stats); // m centroids;
                                                     // lay.group_cents_host (G+1) their offsets
  lsh_decompress(&lay, yhat, ycent, x, cent, C, &cfg, stats);          // Eq. 5, per row
  lsh_decompress_backward(&lay, Gsum, g, C, stats);                     // G_b: one row per centroid
  lsh_compress_backward(&lay, dx, g, dcent, Gsum, C, &cfg, stats);      // dx accumulates
Example (one MoE layer; the expert runs on the m centroid rows):
  lsh_projections_init(R_host, cfg.L, cfg.dp, C, lsh_seed(seed, layer, step)); // copy to R (device)
  int m = lsh_compress(&lay, cent, x, group_rows, G, C, R, &cfg, &scratch, &stats);
  ... ycent = expert(cent) ...;  lsh_decompress(&lay, y, ycent, x, cent, C, &cfg, &stats);
  ... g = d loss / d y ...;      lsh_decompress_backward(&lay, Gsum, g, C, &stats);
  ... dcent = expert backward at cent with output gradient Gsum ...
  lsh_compress_backward(&lay, dx, g, dcent, Gsum, C, &cfg, &stats);
*/
#ifndef LSHMOE_CU
#define LSHMOE_CU

#include "cuda_common.h"
#include "lshmoe.h"

// one layer's compression: device arrays of n rows (the groups' total) and m <= n centroids
typedef struct {
    int n, m, G;            // rows, centroids, groups
    int* group_rows;        // (G+1) device copy of the groups' row offsets
    int* group_cents;       // (G+1) device: centroid offsets of the groups
    int* group_cents_host;  // (G+1) host
    int* cent_of_row;       // (n) the centroid (global index) of each row
    int* bucket_local;      // (n) scratch: bucket ids within the group, then the bucket sizes
    int* cent_size;         // (n) rows of each centroid's bucket, the first m written
    int* cent_start;        // (n+1) the bucket's rows are cent_rows[cent_start[b] .. cent_start[b] + cent_size[b])
    int* cent_rows;         // (n) rows of every bucket, in row order
} LSHLayout;

// scratch shared by the layers: keys, the groups' hash tables and means, and host copies
typedef struct {
    uint64_t* keys;         // (max_rows) device
    uint64_t* table_keys;   // (4 * max_rows + 2 * max_groups) device: a table of lsh_table_slots(n_g) per group
    int* table_ids;
    size_t* table_offset;   // (max_groups) device
    size_t* table_offset_host;
    float* mean;            // (max_groups, C) device
    int* group_m;           // (max_groups) device: centroids of each group
    int* group_m_host;
    double* stats;          // (max_groups, 3) device: err2, norm2, max bucket
    double* stats_host;
    int max_rows, max_groups;
} LSHScratch;

// ----------------------------------------------------------------------------
// kernels

// mean (G, C): group g's mean, double sums in row order, one rounding to float (definition 3)
template <typename T>
__global__ void lsh_group_mean_kernel(float* mean, const T* x, const int* group_rows, int G, int C) { // (G,C), (n,C), (G+1)
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)G * C; i += (size_t)gridDim.x * blockDim.x) {
        int g = (int)(i / C), c = (int)(i % C), r0 = group_rows[g], n = group_rows[g + 1] - r0;
        double acc = 0.0;
        for (int r = r0; r < r0 + n; r++) { acc += (double)(float)x[(size_t)r * C + c]; }
        mean[i] = n > 0 ? (float)(acc / (double)n) : 0.0f;
    }
}

// keys (n): for each row, L cross-polytope hashes h_j = argmax_k |(R_j x)_k| with its sign (the
// first k wins a tie), packed as sum_j h_j (2dp)^j (definitions 3-4); the dot products are fp32
// sums over c in order, of R times x, or of R times (x - the group mean) with centring
template <typename T>
__global__ void lsh_hash_kernel(uint64_t* keys, const T* x, const float* R, const float* mean, // (n), (n,C), (L*dp,C), (G,C) or NULL
                                const int* group_rows, int G, int n, int C, int L, int dp) {
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < n; r += gridDim.x * blockDim.x) {
        const float* mu = NULL;
        if (mean != NULL) {
            int g = 0;
            while (g + 1 < G && group_rows[g + 1] <= r) { g++; } // the group of row r
            mu = mean + (size_t)g * C;
        }
        const T* xr = x + (size_t)r * C;
        uint64_t radix = 2 * (uint64_t)dp, key = 0;
        for (int j = L - 1; j >= 0; j--) {
            int best = 0, neg = 0;
            float best_abs = -1.0f;
            for (int k = 0; k < dp; k++) {
                const float* Rk = R + ((size_t)j * dp + k) * C;
                float acc = 0.0f;
                if (mu == NULL) { for (int c = 0; c < C; c++) { acc += Rk[c] * (float)xr[c]; } }
                else { for (int c = 0; c < C; c++) { acc += Rk[c] * ((float)xr[c] - mu[c]); } }
                float a = acc < 0.0f ? -acc : acc;
                if (a > best_abs) { best_abs = a; best = k; neg = acc < 0.0f; }
            }
            key = key * radix + (uint64_t)(2 * best + neg);
        }
        keys[r] = key;
    }
}

// one thread per group: bucket ids in order of first appearance (definition 5), through an open
// addressing table of lsh_table_slots(n_g) slots at table_offset[g]; bucket_local[r] = the id
// of row r, group_m[g] = its bucket count
__global__ void lsh_buckets_kernel(int* bucket_local, int* group_m, uint64_t* table_keys, int* table_ids, const size_t* table_offset,
                                   const uint64_t* keys, const int* group_rows, int G) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < G; g += gridDim.x * blockDim.x) {
        int r0 = group_rows[g], n = group_rows[g + 1] - r0, m = 0;
        size_t slots = 2;
        while (slots < 2 * (size_t)n) { slots *= 2; }
        uint64_t* tk = table_keys + table_offset[g];
        int* tid = table_ids + table_offset[g];
        for (size_t s = 0; s < slots; s++) { tid[s] = -1; }
        for (int i = 0; i < n; i++) {
            uint64_t key = keys[r0 + i];
            size_t s = (size_t)lsh_mix64(key) & (slots - 1);
            while (tid[s] >= 0 && tk[s] != key) { s = (s + 1) & (slots - 1); }
            if (tid[s] < 0) { tk[s] = key; tid[s] = m++; }
            bucket_local[r0 + i] = tid[s];
        }
        group_m[g] = m;
    }
}

// one thread per group, once the centroid offsets are known: each bucket's global index, its size,
// and its rows in order (a counting sort of the group's rows by bucket, stable)
__global__ void lsh_bucket_rows_kernel(int* cent_of_row, int* cent_size, int* cent_start, int* cent_rows, const int* bucket_local,
                                       const int* group_rows, const int* group_cents, int G) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < G; g += gridDim.x * blockDim.x) {
        int r0 = group_rows[g], n = group_rows[g + 1] - r0, c0 = group_cents[g], m = group_cents[g + 1] - c0;
        for (int b = 0; b < m; b++) { cent_size[c0 + b] = 0; }
        for (int i = 0; i < n; i++) { cent_of_row[r0 + i] = c0 + bucket_local[r0 + i]; cent_size[c0 + bucket_local[r0 + i]]++; }
        int at = r0; // a group's buckets list its rows within the group's own span of cent_rows
        for (int b = 0; b < m; b++) { cent_start[c0 + b] = at; at += cent_size[c0 + b]; }
        for (int b = 0; b < m; b++) { cent_size[c0 + b] = 0; } // refilled below as the fill cursor
        for (int i = 0; i < n; i++) {
            int b = c0 + bucket_local[r0 + i];
            cent_rows[cent_start[b] + cent_size[b]++] = r0 + i;
        }
    }
}

// out (m, C): each bucket's rows of in, summed in row order from -0.0f (x + -0.0f == x, so a
// one-row bucket is its row bit for bit); divide: by n_b (the centroids), or not (G_b)
template <typename T>
__global__ void lsh_bucket_sum_kernel(T* out, const T* in, const int* cent_size, const int* cent_start, const int* cent_rows,
                                      int m, int C, int divide) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)m * C; i += (size_t)gridDim.x * blockDim.x) {
        int b = (int)(i / C), c = (int)(i % C), nb = cent_size[b];
        float s = -0.0f;
        for (int k = 0; k < nb; k++) { s += (float)in[(size_t)cent_rows[cent_start[b] + k] * C + c]; }
        out[i] = (T)(divide && nb != 1 ? s / (float)nb : s);
    }
}

// Eq. 5 (definition 7): yhat_i = y_b + a * (x_i - c_b) (a = 1 in the paper), exactly y_b where
// x_i == c_b (so a one-row bucket stays the uncompressed path bit for bit); a = 0: yhat_i = y_b
template <typename T>
__global__ void lsh_compensate_kernel(T* yhat, const T* ycent, const T* x, const T* cent, const int* cent_of_row, int n, int C, float compensate) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C, b = (size_t)cent_of_row[r];
        float yb = (float)ycent[b * C + c];
        if (compensate == 0.0f) { yhat[i] = (T)yb; continue; }
        float xc = (float)x[i], cc = (float)cent[b * C + c];
        yhat[i] = (T)(xc == cc ? yb : yb + compensate * (xc - cc));
    }
}

// definition 8: dx_i += dcent_b where n_b = 1 (the uncompressed path), a * g_i + (dcent_b - a * G_b)
// / n_b with compensation weight a != 0, dcent_b / n_b without
template <typename T>
__global__ void lsh_compress_backward_kernel(T* dx, const T* g, const T* dcent, const T* Gsum, const int* cent_of_row, const int* cent_size,
                                             int n, int C, float compensate) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)n * C; i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / C, c = i % C, b = (size_t)cent_of_row[r];
        int nbi = cent_size[b];
        float db = (float)dcent[b * C + c], add;
        if (nbi == 1) { add = db; }
        else if (compensate != 0.0f) { add = compensate * (float)g[i] + (db - compensate * (float)Gsum[b * C + c]) / (float)nbi; }
        else { add = db / (float)nbi; }
        dx[i] = (T)((float)dx[i] + add);
    }
}

// per group: sum_i ||x_i - c_b||^2, sum_i ||x_i||^2 (double, rows then channels in order, as
// lsh_reconstruction_error) and the largest bucket: out (G, 3)
template <typename T>
__global__ void lsh_stats_kernel(double* out, const T* x, const T* cent, const int* cent_of_row, const int* cent_size,
                                 const int* group_rows, const int* group_cents, int G, int C) {
    for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < G; g += gridDim.x * blockDim.x) {
        double e = 0.0, s = 0.0;
        int maxb = 0;
        for (int r = group_rows[g]; r < group_rows[g + 1]; r++) {
            const T* xr = x + (size_t)r * C;
            const T* cb = cent + (size_t)cent_of_row[r] * C;
            for (int c = 0; c < C; c++) {
                double d = (double)(float)xr[c] - (double)(float)cb[c];
                e += d * d;
                s += (double)(float)xr[c] * (double)(float)xr[c];
            }
        }
        for (int b = group_cents[g]; b < group_cents[g + 1]; b++) { maxb = cent_size[b] > maxb ? cent_size[b] : maxb; }
        out[3 * g] = e;
        out[3 * g + 1] = s;
        out[3 * g + 2] = maxb;
    }
}

// ----------------------------------------------------------------------------
// host API

static inline dim3 lsh_grid(size_t n, int block) {
    size_t b = CEIL_DIV(n, (size_t)block);
    return dim3(b < 1 ? 1 : (b > 1024 ? 1024 : (unsigned)b));
}

static inline void lsh_scratch_init(LSHScratch* s, int max_rows, int max_groups, int C) {
    memset(s, 0, sizeof(*s));
    s->max_rows = max_rows;
    s->max_groups = max_groups;
    size_t slots = 4 * (size_t)max_rows + 2 * (size_t)max_groups; // >= the sum over groups of lsh_table_slots(n_g) (< 4 n_g + 2)
    cudaCheck(cudaMalloc((void**)&s->keys, (size_t)(max_rows > 0 ? max_rows : 1) * sizeof(uint64_t)));
    cudaCheck(cudaMalloc((void**)&s->table_keys, slots * sizeof(uint64_t)));
    cudaCheck(cudaMalloc((void**)&s->table_ids, slots * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&s->table_offset, max_groups * sizeof(size_t)));
    cudaCheck(cudaMalloc((void**)&s->mean, (size_t)max_groups * C * sizeof(float)));
    cudaCheck(cudaMalloc((void**)&s->group_m, max_groups * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&s->stats, 3 * (size_t)max_groups * sizeof(double)));
    s->table_offset_host = (size_t*)mallocCheck(max_groups * sizeof(size_t));
    s->group_m_host = (int*)mallocCheck(max_groups * sizeof(int));
    s->stats_host = (double*)mallocCheck(3 * (size_t)max_groups * sizeof(double));
}

static inline void lsh_scratch_free(LSHScratch* s) {
    cudaCheck(cudaFree(s->keys)); cudaCheck(cudaFree(s->table_keys)); cudaCheck(cudaFree(s->table_ids));
    cudaCheck(cudaFree(s->table_offset)); cudaCheck(cudaFree(s->mean)); cudaCheck(cudaFree(s->group_m)); cudaCheck(cudaFree(s->stats));
    free(s->table_offset_host); free(s->group_m_host); free(s->stats_host);
}

// the device arrays of a layout for up to n rows in G groups (the caller may carve them from a
// bigger allocation instead, as the trainer does for every MoE layer)
static inline void lsh_layout_alloc(LSHLayout* lay, int n, int G) {
    memset(lay, 0, sizeof(*lay));
    cudaCheck(cudaMalloc((void**)&lay->group_rows, (G + 1) * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&lay->group_cents, (G + 1) * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&lay->cent_of_row, (size_t)(n + 1) * 5 * sizeof(int)));
    lay->bucket_local = lay->cent_of_row + n + 1;
    lay->cent_size = lay->bucket_local + n + 1;
    lay->cent_start = lay->cent_size + n + 1;
    lay->cent_rows = lay->cent_start + n + 1;
    lay->group_cents_host = (int*)mallocCheck((G + 1) * sizeof(int));
}

static inline void lsh_layout_free(LSHLayout* lay) {
    cudaCheck(cudaFree(lay->group_rows));
    cudaCheck(cudaFree(lay->group_cents));
    cudaCheck(cudaFree(lay->cent_of_row));
    free(lay->group_cents_host);
}

// Hashes (after centring when cfg->center), buckets and averages the G groups of x (rows
// [group_rows_host[g], group_rows_host[g+1])): cent (m, C) holds each group's centroids in turn,
// lay->group_cents_host their offsets; returns m. R (L*dp, C) on the device. stats may be NULL.
template <typename T>
static int lsh_compress(LSHLayout* lay, T* cent, const T* x, const int* group_rows_host, int G, int C, const float* R,
                        const LSHConfig* cfg, LSHScratch* s, LSHStats* stats) {
    int n = group_rows_host[G];
    if (n > s->max_rows || G > s->max_groups) { fail_exit("lsh_compress: %d rows in %d groups exceed the scratch (%d, %d)", n, G, s->max_rows, s->max_groups); }
    lay->n = n;
    lay->G = G;
    cudaStream_t st = 0;
    double t0 = stats != NULL ? lsh_now() : 0.0;
    cudaCheck(cudaMemcpy(lay->group_rows, group_rows_host, (G + 1) * sizeof(int), cudaMemcpyHostToDevice));
    if (cfg->center) {
        launch_kernel(lsh_group_mean_kernel<T>, lsh_grid((size_t)G * C, 256), dim3(256), 0, st, s->mean, x, lay->group_rows, G, C);
        cudaCheck(cudaGetLastError());
    }
    launch_kernel(lsh_hash_kernel<T>, lsh_grid(n, 64), dim3(64), 0, st, s->keys, x, R, cfg->center ? (const float*)s->mean : (const float*)NULL,
                  lay->group_rows, G, n, C, cfg->L, cfg->dp);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) { cudaCheck(cudaDeviceSynchronize()); }
    double t1 = stats != NULL ? lsh_now() : 0.0;
    size_t at = 0; // each group's hash table: lsh_table_slots(n_g) slots
    for (int g = 0; g < G; g++) { s->table_offset_host[g] = at; at += lsh_table_slots(group_rows_host[g + 1] - group_rows_host[g]); }
    cudaCheck(cudaMemcpy(s->table_offset, s->table_offset_host, G * sizeof(size_t), cudaMemcpyHostToDevice));
    launch_kernel(lsh_buckets_kernel, lsh_grid(G, 32), dim3(32), 0, st, lay->bucket_local, s->group_m, s->table_keys, s->table_ids,
                  s->table_offset, s->keys, lay->group_rows, G);
    cudaCheck(cudaGetLastError());
    cudaCheck(cudaMemcpy(s->group_m_host, s->group_m, G * sizeof(int), cudaMemcpyDeviceToHost));
    lay->group_cents_host[0] = 0;
    for (int g = 0; g < G; g++) { lay->group_cents_host[g + 1] = lay->group_cents_host[g] + s->group_m_host[g]; }
    lay->m = lay->group_cents_host[G];
    cudaCheck(cudaMemcpy(lay->group_cents, lay->group_cents_host, (G + 1) * sizeof(int), cudaMemcpyHostToDevice));
    launch_kernel(lsh_bucket_rows_kernel, lsh_grid(G, 32), dim3(32), 0, st, lay->cent_of_row, lay->cent_size, lay->cent_start, lay->cent_rows,
                  lay->bucket_local, lay->group_rows, lay->group_cents, G);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) { cudaCheck(cudaDeviceSynchronize()); }
    double t2 = stats != NULL ? lsh_now() : 0.0;
    launch_kernel(lsh_bucket_sum_kernel<T>, lsh_grid((size_t)lay->m * C, 256), dim3(256), 0, st, cent, x, lay->cent_size, lay->cent_start,
                  lay->cent_rows, lay->m, C, 1);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) {
        launch_kernel(lsh_stats_kernel<T>, lsh_grid(G, 32), dim3(32), 0, st, s->stats, x, (const T*)cent, lay->cent_of_row, lay->cent_size,
                      lay->group_rows, lay->group_cents, G, C);
        cudaCheck(cudaGetLastError());
        cudaCheck(cudaMemcpy(s->stats_host, s->stats, 3 * (size_t)G * sizeof(double), cudaMemcpyDeviceToHost));
        for (int g = 0; g < G; g++) {
            stats->err2 += s->stats_host[3 * g];
            stats->norm2 += s->stats_host[3 * g + 1];
            if ((int64_t)s->stats_host[3 * g + 2] > stats->max_bucket) { stats->max_bucket = (int64_t)s->stats_host[3 * g + 2]; }
        }
        stats->groups += G;
        stats->rows += n;
        stats->centroids += lay->m;
        stats->t_hash += t1 - t0;
        stats->t_bucket += t2 - t1;
        stats->t_centroid += lsh_now() - t2;
    }
    return lay->m;
}

// Eq. 5: yhat (n, C) from the experts' outputs per centroid ycent (m, C) and the residual x - cent
template <typename T>
static void lsh_decompress(const LSHLayout* lay, T* yhat, const T* ycent, const T* x, const T* cent, int C, const LSHConfig* cfg, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    launch_kernel(lsh_compensate_kernel<T>, lsh_grid((size_t)lay->n * C, 256), dim3(256), 0, 0, yhat, ycent, x, cent, lay->cent_of_row,
                  lay->n, C, cfg->compensate);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) { cudaCheck(cudaDeviceSynchronize()); stats->t_compensate += lsh_now() - t0; }
}

// the decompression's backward: Gsum (m, C), G_b = the sum of its rows' gradients g (n, C)
template <typename T>
static void lsh_decompress_backward(const LSHLayout* lay, T* Gsum, const T* g, int C, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    launch_kernel(lsh_bucket_sum_kernel<T>, lsh_grid((size_t)lay->m * C, 256), dim3(256), 0, 0, Gsum, g, lay->cent_size, lay->cent_start,
                  lay->cent_rows, lay->m, C, 0);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) { cudaCheck(cudaDeviceSynchronize()); stats->t_backward += lsh_now() - t0; }
}

// the compression's backward with the buckets held fixed: dx (n, C) += definition 8, from g
// (n, C), the centroids' input gradients dcent (m, C) and Gsum (m, C)
template <typename T>
static void lsh_compress_backward(const LSHLayout* lay, T* dx, const T* g, const T* dcent, const T* Gsum, int C, const LSHConfig* cfg, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    launch_kernel(lsh_compress_backward_kernel<T>, lsh_grid((size_t)lay->n * C, 256), dim3(256), 0, 0, dx, g, dcent, Gsum, lay->cent_of_row,
                  lay->cent_size, lay->n, C, cfg->compensate);
    cudaCheck(cudaGetLastError());
    if (stats != NULL) { cudaCheck(cudaDeviceSynchronize()); stats->t_backward += lsh_now() - t0; }
}

#endif // LSHMOE_CU

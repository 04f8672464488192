/*
lshmoe.h: LSH compression of the MoE all-to-all (LSH-MoE, Nie et al., NeurIPS 2024, arXiv
2411.08446, sec. 3, Algorithm 1, Eqs. 3-5). It works on one group: the n rows (width C, fp32,
row-major, contiguous) that one rank sends to one expert in one layer. Cross-polytope LSH with L
hash functions of projection width dp (d') gives each row a key; rows with the same key form a
bucket; only the m bucket centroids (means) cross the wire; the expert's output per centroid comes
back and the sender adds the residual it kept: yhat_i = y_b(i) + (x_i - c_b(i)) (Eq. 5), or
yhat_i = y_b(i) without compensation, or (ours) a weighted residual y_b(i) + a*(x_i - c_b(i)). The backward is the exact gradient with the buckets held
fixed (ours: the paper is silent). Plain pointers, counts and seeds: no dependency on the trainer.

API (per group; the four calls in the order the trainer makes them):
  m = lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, &stats);
  lsh_group_decompress(yhat, ycent, x, cent, bucket_of_row, n, C, &cfg, &stats);  // Eq. 5
  lsh_group_decompress_backward(G, g, bucket_of_row, n, m, C, &stats);           // G_b = sum g_i
  lsh_group_compress_backward(dx, g, dcent, G, bucket_of_row, bucket_size, n, C, &cfg, &stats);
plus lsh_config_check, lsh_projections_init, lsh_seed, lsh_scratch_bytes, lsh_hash_margin, LSHStats
helpers, and the single steps (lsh_hash, lsh_buckets, lsh_centroids_forward, ...) that the wrappers call.

Example:
  LSHConfig cfg = {6, 4, 1, 1}; // L, dp, center, compensate
  char err[256];
  if (lsh_config_check(cfg.L, cfg.dp, err, sizeof(err))) { fprintf(stderr, "%s\n", err); exit(1); }
  float* R = (float*)malloc((size_t)cfg.L * cfg.dp * C * sizeof(float));    // (L*dp, C)
  void* scratch = malloc(lsh_scratch_bytes(nmax, C));
  lsh_projections_init(R, cfg.L, cfg.dp, C, lsh_seed(seed, layer, step));
  int m = lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, &stats);
  ... send cent (m, C), expert computes ycent (m, C), receive ycent ...
  lsh_group_decompress(yhat, ycent, x, cent, bucket_of_row, n, C, &cfg, &stats);
  ... backward: g (n, C) is the gradient at yhat ...
  lsh_group_decompress_backward(G, g, bucket_of_row, n, m, C, &stats);  // send G (m, C)
  ... expert backward at cent with output gradient G gives dcent (m, C), receive it ...
  lsh_group_compress_backward(dx, g, dcent, G, bucket_of_row, bucket_size, n, C, &cfg, &stats);

Conventions: outputs are written (=), except dx, which accumulates (+=) as every gradient in
the trainer does; output buffers never alias inputs. fp32 throughout, sums in the stated order,
so the results below are exact specifications a reference (dev/reference) can reproduce.

Definitions (exact)
1. splitmix64, state s (uint64, wrapping arithmetic):
     s += 0x9E3779B97F4A7C15; z = s; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
     z = (z ^ (z >> 27)) * 0x94D049BB133111EB; return z ^ (z >> 31);
   uniform: u = (double)(next() >> 11) * 2^-53, in [0, 1).
   normal (Box-Muller in double, one normal per pair of uniforms, no second value kept):
     u1 = uniform(); u2 = uniform(); z = sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2)
   (6.283185307179586 is the double 2.0 * M_PI; 1.0 - u1 is exact and > 0). libm's log and cos,
   as Python's math.log and math.cos call them: same libm, same bits. (float) rounds to nearest
   even, as struct.pack('<f') and numpy.float32 do. A pure-Python transcription of 1-2 reproduces
   R bit for bit (golden values in dev/test_lshmoe.c), also under the Makefile's CFLAGS.
2. Projections R (L*dp, C): state = seed, then R[r*C + c] = (float)normal() in row-major order
   (r = 0..L*dp-1 outer, c = 0..C-1 inner). Hash function j = 0..L-1 uses rows [j*dp, (j+1)*dp).
   Per (layer, step) seeds (ours: reseeding so bucket errors are not the same all run):
     lsh_seed(seed, layer, step) = mix(b + G), b = mix(a + G) ^ (uint64)step,
                                   a = mix(seed + G) ^ (uint64)layer
   with G = 0x9E3779B97F4A7C15, mix the three finaliser lines of splitmix64 above, and layer and
   step converted to uint64 as two's complement (int64 first). mix is a bijection, so for one seed
   and step distinct layers give distinct seeds, and for one layer distinct steps do.
3. Hash j of a row x (length C): for k = 0..dp-1, v_k = fp32 dot product of row j*dp+k of R with
   x, summed sequentially: float acc = 0; for c = 0..C-1: acc += R[(j*dp+k)*C + c] * x[c];
   i* = argmax_k |v_k|, the first k wins a tie (strict >; a NaN never wins, k = 0 if all are
   NaN); h_j = 2*i* + (v_i* < 0 ? 1 : 0), one of 2*dp values (the sign is part of the hash, as
   in cross-polytope LSH; the paper prints the argmax alone). Centring (cfg.center, ours): the
   group mean mu (C) is mean[c] = (float)(sum_i (double)x[i][c] / (double)n), the sum in double
   in row order; then the dot product is acc += R[..] * (x[c] - mean[c]) (the difference in
   fp32). Centring changes the hash only, never the centroids. A float64 reference agrees except
   where two |v_k| nearly tie. (Compiled with -fassociative-math or FMA contraction, as the
   Makefile's CFLAGS do, the compiler may reorder the dot product: again only near-ties move.)
4. Key: key = sum_j h_j * (2*dp)^j in uint64 (h_0 the least significant digit): a mixed-radix
   number, so distinct tuples never collide. Valid when (2*dp)^L <= 2^64: lsh_config_check.
5. Buckets: bucket ids in order of first appearance in the group (row 0 is in bucket 0, the next
   row with a new key opens bucket 1, ...), so results depend on the keys alone. n_b = rows in b;
   m = number of buckets, 0 for n = 0. O(n) expected (open addressing table in scratch).
6. Centroids: c_b = s_b / (float)n_b, s_b the fp32 sum of b's rows in row order (started from
   -0.0f, so a one-row bucket's sum, and centroid, is the row itself bit for bit).
7. Compensation forward, with weight a = cfg.compensate (1: the paper's Eq. 5; 0: off; ours: any
   a in between scales the residual): yhat[i][c] = ycent[b][c] + a * (x[i][c] - cent[b][c]) (for
   a = 1 the product is exact, so this is the paper's form bit for bit), except that where
   x[i][c] == cent[b][c] it is ycent[b][c] itself: numerically the same, but it keeps a one-row
   bucket bit-exact under the Makefile's -fassociative-math, with which GCC 12 rewrites the plain
   form and is then an ulp off (the singleton test catches it). Off (a = 0): yhat_i = ycent_b.
8. Backward with the buckets fixed (ours; DESIGN.md step 6), g (n, C) the gradient at yhat:
   G_b = sum of g_i over b in fp32 in row order, started from -0.0f (lsh_compensate_backward);
   the expert's backward at c_b with output gradient G_b gives dcent_b = J_b^T G_b; then
     n_b == 1:            dx_i += dcent_b
     compensation a != 0: dx_i += a * g_i + (dcent_b - a * G_b) / (float)n_b
     compensation off:    dx_i += dcent_b / (float)n_b
   each evaluated per element in fp32 in the order written. For n_b == 1 both formulas equal
   dcent_b in exact arithmetic, but g + (dcent - g) can be an ulp off in fp32: the explicit
   branch makes a one-row bucket reproduce the uncompressed path (dx_i += J^T g_i) bit for bit.
9. Statistics (LSHStats, summed over groups): rows n, centroids m, compression rate m/n, mean
   bucket size n/m, the largest bucket, relative reconstruction error
   sqrt(sum_i ||x_i - c_b(i)||^2 / sum_i ||x_i||^2) (sums in double over all rows of all groups),
   and seconds (CLOCK_MONOTONIC) spent hashing (with the mean), bucketing, computing centroids
   (with the error), compensating, and in the two backward steps.
Bounds: 1 <= L <= 64, 1 <= dp <= 1024, (2*dp)^L <= 2^64 (so dp = 1 allows L <= 64, dp = 4
L <= 21, dp = 8 L <= 16, dp = 16 L <= 12, dp = 1024 L <= 5). n is an int; offsets are size_t.
Cost: hashing is n*L*dp*C multiply-adds (OpenMP over rows when compiled with it; rows are
independent, so the result does not depend on the thread count); buckets O(n) expected;
centroids, compensation and backward one pass over the rows each. Stats add one more pass (the
reconstruction error): pass stats = NULL on steps that do not log.
*/
#ifndef LSHMOE_H
#define LSHMOE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <math.h>
#include <time.h>

// ----------------------------------------------------------------------------
// configuration

typedef struct {
    int L;          // hash functions; their keys are ANDed (ours), more functions, more buckets
    int dp;         // d', rows of each projection; a hash takes 2*dp values
    int center;     // subtract the group mean before hashing (ours)
    float compensate; // residual weight a: 1 = LSH-MoE Eq. 5, 0 = off (yhat_i = y_b(i), the ablation),
                      // in between (ours) a scaled residual yhat_i = y_b(i) + a * (x_i - c_b(i))
} LSHConfig;

#define LSH_MAX_L 64
#define LSH_MAX_DP 1024

// 0 if (L, dp) is usable, else non-zero and one line in err naming the bad value
static inline int lsh_config_check(int L, int dp, char* err, size_t errlen) {
    if (err != NULL && errlen > 0) { err[0] = '\0'; }
    if (L < 1 || L > LSH_MAX_L) {
        if (err != NULL) { snprintf(err, errlen, "lsh: L = %d hash functions, must be in [1, %d]", L, LSH_MAX_L); }
        return 1;
    }
    if (dp < 1 || dp > LSH_MAX_DP) {
        if (err != NULL) { snprintf(err, errlen, "lsh: dp = %d projection rows, must be in [1, %d]", dp, LSH_MAX_DP); }
        return 1;
    }
    // the largest key, (2dp)^L - 1, built digit by digit as lsh_key_pack does, must fit in 64 bits
    uint64_t radix = 2 * (uint64_t)dp, maxkey = 0;
    for (int j = 0; j < L; j++) {
        if (maxkey > (UINT64_MAX - (radix - 1)) / radix) {
            if (err != NULL) {
                snprintf(err, errlen, "lsh: L = %d, dp = %d: (2*dp)^L = %d^%d buckets do not fit a 64-bit key "
                         "(need (2*dp)^L <= 2^64; largest L for this dp is %d)", L, dp, 2 * dp, L, j);
            }
            return 1;
        }
        maxkey = maxkey * radix + (radix - 1);
    }
    return 0;
}

// ----------------------------------------------------------------------------
// random projections: pure functions of a seed

// lshmoe.cu's bucket kernel hashes keys with lsh_mix64 too: nvcc compiles it for the device as well
#ifdef __CUDACC__
#define LSH_HOST_DEVICE __host__ __device__
#else
#define LSH_HOST_DEVICE
#endif
static inline LSH_HOST_DEVICE uint64_t lsh_mix64(uint64_t z) { // splitmix64's finaliser
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t lsh_splitmix64(uint64_t* state) {
    *state += 0x9E3779B97F4A7C15ULL;
    return lsh_mix64(*state);
}

// in [0, 1), a multiple of 2^-53
static inline double lsh_uniform(uint64_t* state) {
    return (double)(lsh_splitmix64(state) >> 11) * (1.0 / 9007199254740992.0);
}

// Box-Muller, one normal per two uniforms; 1 - u1 is in (0, 1] so the log is finite
static inline double lsh_normal(uint64_t* state) {
    double u1 = lsh_uniform(state);
    double u2 = lsh_uniform(state);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

static inline void lsh_projections_init(float* R, // (L*dp, C)
                                        int L, int dp, int C, uint64_t seed) {
    uint64_t state = seed;
    size_t count = (size_t)L * (size_t)dp * (size_t)C;
    for (size_t i = 0; i < count; i++) { R[i] = (float)lsh_normal(&state); }
}

// one seed per (seed, layer, step), so projections can be redrawn each step and stay resumable
static inline uint64_t lsh_seed(uint64_t seed, int layer, int64_t step) {
    uint64_t s = seed;
    s = lsh_splitmix64(&s) ^ (uint64_t)(int64_t)layer;
    s = lsh_splitmix64(&s) ^ (uint64_t)step;
    return lsh_splitmix64(&s);
}

// ----------------------------------------------------------------------------
// hashing

static inline uint64_t lsh_key_pack(const int* h, // (L) each in [0, 2*dp)
                                    int L, int dp) {
    uint64_t radix = 2 * (uint64_t)dp, key = 0;
    for (int j = L - 1; j >= 0; j--) { key = key * radix + (uint64_t)h[j]; }
    return key;
}

// group mean for centring: double sums in row order, one rounding to float at the end
static inline void lsh_group_mean(float* mean, // (C)
                                  double* acc, // (C) scratch
                                  const float* x, // (n, C)
                                  int n, int C) {
    for (int c = 0; c < C; c++) { acc[c] = 0.0; }
    for (int i = 0; i < n; i++) {
        const float* xi = x + (size_t)i * C;
        for (int c = 0; c < C; c++) { acc[c] += (double)xi[c]; }
    }
    for (int c = 0; c < C; c++) { mean[c] = n > 0 ? (float)(acc[c] / (double)n) : 0.0f; }
}

// one cross-polytope hash: argmax_k |(Rj x)_k| with its sign, in [0, 2*dp)
static inline int lsh_crosspolytope(const float* Rj, // (dp, C) rows j*dp.. of R
                                    const float* x, // (C)
                                    const float* mean, // (C) or NULL: no centring
                                    int dp, int C) {
    int best = 0, neg = 0;
    float best_abs = -1.0f;
    // four dot products at a time, each still summed sequentially over c (definition 3)
    for (int k0 = 0; k0 < dp; k0 += 4) {
        int nk = dp - k0 < 4 ? dp - k0 : 4;
        const float* r0 = Rj + (size_t)k0 * C;
        const float* r1 = nk > 1 ? r0 + C : r0;
        const float* r2 = nk > 2 ? r0 + 2 * (size_t)C : r0;
        const float* r3 = nk > 3 ? r0 + 3 * (size_t)C : r0;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        if (mean == NULL) {
            for (int c = 0; c < C; c++) {
                float xc = x[c];
                a0 += r0[c] * xc; a1 += r1[c] * xc; a2 += r2[c] * xc; a3 += r3[c] * xc;
            }
        } else {
            for (int c = 0; c < C; c++) {
                float xc = x[c] - mean[c];
                a0 += r0[c] * xc; a1 += r1[c] * xc; a2 += r2[c] * xc; a3 += r3[c] * xc;
            }
        }
        float v[4] = {a0, a1, a2, a3};
        for (int t = 0; t < nk; t++) {
            float a = v[t] < 0.0f ? -v[t] : v[t];
            if (a > best_abs) { best_abs = a; best = k0 + t; neg = v[t] < 0.0f; }
        }
    }
    return 2 * best + neg;
}

static inline void lsh_hash(uint64_t* keys, // (n)
                            const float* x, // (n, C)
                            const float* R, // (L*dp, C)
                            const float* mean, // (C) or NULL: no centring
                            int n, int C, int L, int dp) {
    #ifdef _OPENMP
    #pragma omp parallel for schedule(static) if (n >= 64)
    #endif
    for (int i = 0; i < n; i++) {
        const float* xi = x + (size_t)i * C;
        uint64_t radix = 2 * (uint64_t)dp, key = 0;
        for (int j = L - 1; j >= 0; j--) { // lsh_key_pack, digit by digit
            key = key * radix + (uint64_t)lsh_crosspolytope(R + (size_t)j * dp * C, xi, mean, dp, C);
        }
        keys[i] = key;
    }
}

// how close row x came to another key: the smallest, over its L hashes, of (|v_best| -
// |v_second|) / |v_best|, in double. A key computed with other rounding (a fused multiply-add, a
// GPU, bf16 rows) can differ from lsh_hash's only where this is tiny; with dp = 1 the hash is
// the sign alone, which rounding flips only at 0, so 1
static inline double lsh_hash_margin(const float* x, // (C)
                                     const float* mean, // (C) or NULL
                                     const float* R, // (L*dp, C)
                                     int C, int L, int dp) {
    double worst = 1.0;
    for (int j = 0; j < L && dp > 1; j++) {
        double a1 = -1.0, a2 = -1.0;
        for (int k = 0; k < dp; k++) {
            double v = 0.0;
            for (int c = 0; c < C; c++) { v += (double)R[((size_t)j * dp + k) * C + c] * ((double)x[c] - (mean ? mean[c] : 0.0)); }
            v = fabs(v);
            if (v > a1) { a2 = a1; a1 = v; } else if (v > a2) { a2 = v; }
        }
        double m = a1 > 0.0 ? (a1 - (a2 > 0.0 ? a2 : 0.0)) / a1 : 0.0;
        if (m < worst) { worst = m; }
    }
    return worst;
}

// ----------------------------------------------------------------------------
// buckets

// table slots for n keys: a power of two >= 2n (load <= 1/2), at least 2
static inline size_t lsh_table_slots(int n) {
    size_t slots = 2;
    while (slots < 2 * (size_t)(n > 0 ? n : 0)) { slots *= 2; }
    return slots;
}

static inline size_t lsh_buckets_scratch_bytes(int n) {
    return lsh_table_slots(n) * (sizeof(uint64_t) + sizeof(int));
}

// everything lsh_group_compress needs: keys (n), bucket table, mean accumulator and mean (C)
static inline size_t lsh_scratch_bytes(int n, int C) {
    return (size_t)(n > 0 ? n : 0) * sizeof(uint64_t) + lsh_buckets_scratch_bytes(n)
           + (size_t)C * (sizeof(double) + sizeof(float));
}

// bucket ids in order of first appearance; returns m. scratch: lsh_buckets_scratch_bytes(n)
// bytes, 8-byte aligned (malloc's are)
static inline int lsh_buckets(int* bucket_of_row, // (n)
                              int* bucket_size, // (n), the first m written
                              const uint64_t* keys, // (n)
                              int n, void* scratch) {
    if (n <= 0) { return 0; }
    size_t slots = lsh_table_slots(n), mask = slots - 1;
    uint64_t* tkey = (uint64_t*)scratch; // (slots)
    int* tid = (int*)(tkey + slots); // (slots), -1 = empty
    for (size_t s = 0; s < slots; s++) { tid[s] = -1; }
    int m = 0;
    for (int i = 0; i < n; i++) {
        uint64_t key = keys[i];
        size_t s = (size_t)lsh_mix64(key) & mask; // keys are structured (small digits): mix first
        while (tid[s] >= 0 && tkey[s] != key) { s = (s + 1) & mask; }
        if (tid[s] < 0) { tkey[s] = key; tid[s] = m; bucket_size[m] = 0; m++; }
        bucket_of_row[i] = tid[s];
        bucket_size[tid[s]]++;
    }
    return m;
}

// ----------------------------------------------------------------------------
// centroids and compensation, forward and backward

// rows summed per bucket in row order, from -0.0f (x + -0.0f == x for every x, signed zeros too)
static inline void lsh_bucket_sum(float* out, // (m, C)
                                  const float* in, // (n, C)
                                  const int* bucket_of_row, // (n)
                                  int n, int m, int C) {
    for (size_t i = 0; i < (size_t)m * C; i++) { out[i] = -0.0f; }
    for (int i = 0; i < n; i++) {
        float* ob = out + (size_t)bucket_of_row[i] * C;
        const float* ii = in + (size_t)i * C;
        for (int c = 0; c < C; c++) { ob[c] += ii[c]; }
    }
}

// LSH-MoE sec. 3.2: the centroid stands in for its bucket on the wire
static inline void lsh_centroids_forward(float* cent, // (m, C)
                                         const float* x, // (n, C)
                                         const int* bucket_of_row, // (n)
                                         const int* bucket_size, // (m)
                                         int n, int m, int C) {
    lsh_bucket_sum(cent, x, bucket_of_row, n, m, C);
    for (int b = 0; b < m; b++) {
        if (bucket_size[b] == 1) { continue; } // s / 1 == s: leave the row untouched
        float nb = (float)bucket_size[b];
        float* cb = cent + (size_t)b * C;
        for (int c = 0; c < C; c++) { cb[c] = cb[c] / nb; }
    }
}

// LSH-MoE Eq. 5: yhat_i = y_b + a * (x_i - c_b), the residual the sender kept (a = 1 in the paper)
static inline void lsh_compensate_forward(float* yhat, // (n, C)
                                          const float* ycent, // (m, C)
                                          const float* x, // (n, C)
                                          const float* cent, // (m, C)
                                          const int* bucket_of_row, // (n)
                                          int n, int C, float compensate) {
    for (int i = 0; i < n; i++) {
        int b = bucket_of_row[i];
        float* yi = yhat + (size_t)i * C;
        const float* yb = ycent + (size_t)b * C;
        if (compensate == 0.0f) { memcpy(yi, yb, (size_t)C * sizeof(float)); continue; }
        const float* xi = x + (size_t)i * C;
        const float* cb = cent + (size_t)b * C;
        for (int c = 0; c < C; c++) {
            float xc = xi[c], cc = cb[c];
            yi[c] = xc == cc ? yb[c] : yb[c] + compensate * (xc - cc); // definition 7
        }
    }
}

// backward of the compensation: each centroid's output fed all its rows, so G_b = sum of g_i
static inline void lsh_compensate_backward(float* G, // (m, C)
                                           const float* g, // (n, C)
                                           const int* bucket_of_row, // (n)
                                           int n, int m, int C) {
    lsh_bucket_sum(G, g, bucket_of_row, n, m, C);
}

// backward of the centroids (DESIGN.md step 6): dx_i += a * g_i + (dcent_b - a * G_b) / n_b (a = 1:
// the paper's compensation), or dcent_b / n_b without; dcent = J_b^T G_b from the expert's backward
static inline void lsh_centroids_backward(float* dx, // (n, C) accumulated
                                          const float* g, // (n, C)
                                          const float* dcent, // (m, C)
                                          const float* G, // (m, C)
                                          const int* bucket_of_row, // (n)
                                          const int* bucket_size, // (m)
                                          int n, int C, float compensate) {
    for (int i = 0; i < n; i++) {
        int b = bucket_of_row[i];
        float* dxi = dx + (size_t)i * C;
        const float* gi = g + (size_t)i * C;
        const float* db = dcent + (size_t)b * C;
        const float* Gb = G + (size_t)b * C;
        if (bucket_size[b] == 1) { // both formulas are exactly dcent_b here: the uncompressed path
            for (int c = 0; c < C; c++) { dxi[c] += db[c]; }
        } else if (compensate != 0.0f) {
            float nb = (float)bucket_size[b], a = compensate;
            for (int c = 0; c < C; c++) { dxi[c] += a * gi[c] + (db[c] - a * Gb[c]) / nb; }
        } else {
            float nb = (float)bucket_size[b];
            for (int c = 0; c < C; c++) { dxi[c] += db[c] / nb; }
        }
    }
}

// ----------------------------------------------------------------------------
// statistics

typedef struct {
    int64_t groups;      // groups compressed (empty ones included)
    int64_t rows;        // rows routed, sum of n
    int64_t centroids;   // centroids sent, sum of m
    int64_t max_bucket;  // largest n_b seen
    double err2;         // sum_i ||x_i - c_b(i)||^2
    double norm2;        // sum_i ||x_i||^2
    double t_hash, t_bucket, t_centroid, t_compensate, t_backward; // seconds
} LSHStats;

static inline double lsh_now(void) { // seconds, monotonic
#ifdef CLOCK_MONOTONIC
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
#else
    return (double)clock() / CLOCKS_PER_SEC; // strict C99 without POSIX: CPU time instead
#endif
}

static inline void lsh_stats_reset(LSHStats* s) { memset(s, 0, sizeof(*s)); }

static inline void lsh_stats_add(LSHStats* into, const LSHStats* s) {
    into->groups += s->groups;
    into->rows += s->rows;
    into->centroids += s->centroids;
    if (s->max_bucket > into->max_bucket) { into->max_bucket = s->max_bucket; }
    into->err2 += s->err2;
    into->norm2 += s->norm2;
    into->t_hash += s->t_hash;
    into->t_bucket += s->t_bucket;
    into->t_centroid += s->t_centroid;
    into->t_compensate += s->t_compensate;
    into->t_backward += s->t_backward;
}

static inline double lsh_stats_rate(const LSHStats* s) { // m/n, 0 for no rows
    return s->rows > 0 ? (double)s->centroids / (double)s->rows : 0.0;
}
static inline double lsh_stats_bucket_mean(const LSHStats* s) { // n/m
    return s->centroids > 0 ? (double)s->rows / (double)s->centroids : 0.0;
}
static inline double lsh_stats_rel_error(const LSHStats* s) { // sqrt(sum ||x-c||^2 / sum ||x||^2)
    return s->norm2 > 0.0 ? sqrt(s->err2 / s->norm2) : 0.0;
}

// adds one group's sum_i ||x_i - c_b(i)||^2 and sum_i ||x_i||^2 (double sums)
static inline void lsh_reconstruction_error(double* err2, double* norm2,
                                            const float* x, // (n, C)
                                            const float* cent, // (m, C)
                                            const int* bucket_of_row, // (n)
                                            int n, int C) {
    double e = 0.0, s = 0.0;
    for (int i = 0; i < n; i++) {
        const float* xi = x + (size_t)i * C;
        const float* cb = cent + (size_t)bucket_of_row[i] * C;
        for (int c = 0; c < C; c++) {
            double d = (double)xi[c] - (double)cb[c];
            e += d * d;
            s += (double)xi[c] * (double)xi[c];
        }
    }
    *err2 += e;
    *norm2 += s;
}

static inline void lsh_stats_print(FILE* f, const char* name, const LSHStats* s) {
    fprintf(f, "%s: rows %lld centroids %lld rate %.4f bucket mean %.2f max %lld rel err %.4f | "
            "ms hash %.2f bucket %.2f centroid %.2f compensate %.2f backward %.2f\n",
            name, (long long)s->rows, (long long)s->centroids, lsh_stats_rate(s), lsh_stats_bucket_mean(s),
            (long long)s->max_bucket, lsh_stats_rel_error(s), 1e3 * s->t_hash, 1e3 * s->t_bucket,
            1e3 * s->t_centroid, 1e3 * s->t_compensate, 1e3 * s->t_backward);
}

// bytes of the four row all-to-alls of one MoE layer, without and with LSH: each carries one row
// of C elements per routed row (without) or per centroid (with). The caller decides what counts
// (e.g. only rows leaving the rank) and adds the small count exchanges.
enum { LSH_A2A_DISPATCH, LSH_A2A_COMBINE, LSH_A2A_COMBINE_BACKWARD, LSH_A2A_DISPATCH_BACKWARD };
static inline void lsh_alltoall_bytes(double without_lsh[4], double with_lsh[4],
                                      int64_t rows, int64_t centroids, int C, int bytes_per_elem) {
    for (int a = 0; a < 4; a++) {
        without_lsh[a] = (double)rows * C * bytes_per_elem;
        with_lsh[a] = (double)centroids * C * bytes_per_elem;
    }
}

// ----------------------------------------------------------------------------
// one group: the four calls the trainer makes (stats may be NULL)

// hash (after centring if cfg->center), bucket, average; returns m. scratch:
// lsh_scratch_bytes(n, C) bytes, 8-byte aligned; its first n uint64 hold the keys afterwards
static inline int lsh_group_compress(float* cent, // (m, C), m <= n
                                     int* bucket_of_row, // (n)
                                     int* bucket_size, // (n), the first m written
                                     const float* x, // (n, C)
                                     int n, int C,
                                     const float* R, // (L*dp, C)
                                     const LSHConfig* cfg, void* scratch, LSHStats* stats) {
    uint64_t* keys = (uint64_t*)scratch; // (n)
    void* table = (void*)(keys + (n > 0 ? n : 0));
    double* acc = (double*)((char*)table + lsh_buckets_scratch_bytes(n)); // (C)
    float* mean = (float*)(acc + C); // (C)
    double t0 = stats != NULL ? lsh_now() : 0.0;
    if (n > 0) {
        if (cfg->center) { lsh_group_mean(mean, acc, x, n, C); }
        lsh_hash(keys, x, R, cfg->center ? mean : NULL, n, C, cfg->L, cfg->dp);
    }
    double t1 = stats != NULL ? lsh_now() : 0.0;
    int m = lsh_buckets(bucket_of_row, bucket_size, keys, n, table);
    double t2 = stats != NULL ? lsh_now() : 0.0;
    lsh_centroids_forward(cent, x, bucket_of_row, bucket_size, n, m, C);
    if (stats != NULL) {
        lsh_reconstruction_error(&stats->err2, &stats->norm2, x, cent, bucket_of_row, n, C);
        for (int b = 0; b < m; b++) {
            if (bucket_size[b] > stats->max_bucket) { stats->max_bucket = bucket_size[b]; }
        }
        stats->groups += 1;
        stats->rows += n;
        stats->centroids += m;
        stats->t_hash += t1 - t0;
        stats->t_bucket += t2 - t1;
        stats->t_centroid += lsh_now() - t2;
    }
    return m;
}

static inline void lsh_group_decompress(float* yhat, // (n, C)
                                        const float* ycent, // (m, C)
                                        const float* x, // (n, C)
                                        const float* cent, // (m, C)
                                        const int* bucket_of_row, // (n)
                                        int n, int C, const LSHConfig* cfg, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    lsh_compensate_forward(yhat, ycent, x, cent, bucket_of_row, n, C, cfg->compensate);
    if (stats != NULL) { stats->t_compensate += lsh_now() - t0; }
}

static inline void lsh_group_decompress_backward(float* G, // (m, C)
                                                 const float* g, // (n, C)
                                                 const int* bucket_of_row, // (n)
                                                 int n, int m, int C, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    lsh_compensate_backward(G, g, bucket_of_row, n, m, C);
    if (stats != NULL) { stats->t_backward += lsh_now() - t0; }
}

static inline void lsh_group_compress_backward(float* dx, // (n, C) accumulated
                                               const float* g, // (n, C)
                                               const float* dcent, // (m, C)
                                               const float* G, // (m, C)
                                               const int* bucket_of_row, // (n)
                                               const int* bucket_size, // (m)
                                               int n, int C, const LSHConfig* cfg, LSHStats* stats) {
    double t0 = stats != NULL ? lsh_now() : 0.0;
    lsh_centroids_backward(dx, g, dcent, G, bucket_of_row, bucket_size, n, C, cfg->compensate);
    if (stats != NULL) { stats->t_backward += lsh_now() - t0; }
}

#endif // LSHMOE_H

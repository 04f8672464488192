/*
Tests of lshmoe.h, a program of its own (the Makefile builds dev/test_lshmoe with the trainers'
CFLAGS; dev/run_tests.sh runs it):
  make dev/test_lshmoe && ./dev/test_lshmoe
The toy expert is y = tanh(W c + b), C -> C. Random data come from the test's own generator (an
MMIX LCG with Marsaglia's polar method), independent of the library's splitmix64 + Box-Muller.
The golden values below were computed by a pure-Python transcription of definitions 1-2 of the
header comment (math.log, math.cos, struct for the float32 rounding); they matched bit for bit.
Bit-exact checks assume IEEE arithmetic.
*/
#include "lshmoe.h"
#include "testing.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// the test's own random numbers: 64-bit LCG (Knuth's MMIX constants), top 53 bits

static uint64_t tl_state = 1;
static void tl_seed(uint64_t s) { tl_state = s * 2 + 1; }
static double tl_uniform(void) { // [0, 1)
    tl_state = tl_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (double)(tl_state >> 11) * (1.0 / 9007199254740992.0);
}
static double tl_normal(void) { // Marsaglia's polar method (the second value is thrown away)
    double u, v, s;
    do {
        u = 2.0 * tl_uniform() - 1.0;
        v = 2.0 * tl_uniform() - 1.0;
        s = u * u + v * v;
    } while (s >= 1.0 || s == 0.0);
    return u * sqrt(-2.0 * log(s) / s);
}
static void tl_fill_normal(float* a, size_t count) {
    for (size_t i = 0; i < count; i++) { a[i] = (float)tl_normal(); }
}

// the cross-polytope hash written out again, in double: argmax |R x| and its sign
static int tl_crosspolytope_ref(const double* Rj, // (dp, C)
                                const double* x, // (C)
                                int dp, int C, double* margin) { // margin: top |v| minus runner-up
    int best = 0;
    double best_abs = -1.0, second = -1.0, best_v = 0.0;
    for (int k = 0; k < dp; k++) {
        double v = 0.0;
        for (int c = 0; c < C; c++) { v += Rj[k * C + c] * x[c]; }
        double a = fabs(v);
        if (a > best_abs) { second = best_abs; best_abs = a; best = k; best_v = v; }
        else if (a > second) { second = a; }
    }
    if (margin != NULL) { *margin = best_abs - second; }
    return 2 * best + (best_v < 0.0 ? 1 : 0);
}

// toy expert y = tanh(W c + b) (C -> C) on m rows, and its backward dc = W^T ((1 - y^2) * G)
static void tl_expert_forward(float* y, // (m, C)
                              const float* c, // (m, C)
                              const float* W, // (C, C)
                              const float* bias, // (C)
                              int m, int C) {
    for (int i = 0; i < m; i++) {
        for (int o = 0; o < C; o++) {
            float acc = bias[o];
            for (int k = 0; k < C; k++) { acc += W[o * C + k] * c[i * C + k]; }
            y[i * C + o] = tanhf(acc);
        }
    }
}
static void tl_expert_backward(float* dc, // (m, C)
                               const float* y, // (m, C)
                               const float* G, // (m, C)
                               const float* W, // (C, C)
                               int m, int C) {
    for (int i = 0; i < m; i++) {
        for (int k = 0; k < C; k++) { dc[i * C + k] = 0.0f; }
        for (int o = 0; o < C; o++) {
            float dz = (1.0f - y[i * C + o] * y[i * C + o]) * G[i * C + o];
            for (int k = 0; k < C; k++) { dc[i * C + k] += W[o * C + k] * dz; }
        }
    }
}

// the same forward in double with a given bucket map: loss = sum_i,c w[i][c] * yhat[i][c]
static double tl_loss_double(const double* x, // (n, C)
                             const float* w, // (n, C)
                             const float* W, const float* bias, const int* bucket_of_row, // (n)
                             const int* bucket_size, int n, int m, int C, double compensate) {
    double* cent = (double*)calloc((size_t)m * C, sizeof(double));
    double* y = (double*)malloc((size_t)m * C * sizeof(double));
    for (int i = 0; i < n; i++) {
        for (int c = 0; c < C; c++) { cent[bucket_of_row[i] * C + c] += x[i * C + c]; }
    }
    for (int b = 0; b < m; b++) {
        for (int c = 0; c < C; c++) { cent[b * C + c] /= bucket_size[b]; }
        for (int o = 0; o < C; o++) {
            double acc = bias[o];
            for (int k = 0; k < C; k++) { acc += (double)W[o * C + k] * cent[b * C + k]; }
            y[b * C + o] = tanh(acc);
        }
    }
    double loss = 0.0;
    for (int i = 0; i < n; i++) {
        int b = bucket_of_row[i];
        for (int c = 0; c < C; c++) {
            double yh = y[b * C + c] + compensate * (x[i * C + c] - cent[b * C + c]);
            loss += (double)w[i * C + c] * yh;
        }
    }
    free(cent);
    free(y);
    return loss;
}

static int tl_cmp_u64(const void* a, const void* b) {
    uint64_t x = *(const uint64_t*)a, y = *(const uint64_t*)b;
    return x < y ? -1 : x > y;
}
static int tl_count_distinct_u64(uint64_t* a, size_t n) { // sorts a
    qsort(a, n, sizeof(uint64_t), tl_cmp_u64);
    int d = n > 0;
    for (size_t i = 1; i < n; i++) { d += a[i] != a[i - 1]; }
    return d;
}
static double tl_max_abs_diff(const float* a, const float* b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) { double d = fabs((double)a[i] - (double)b[i]); if (d > m) { m = d; } }
    return m;
}

// rows = layernorm(s * u + z_i): unit direction u shared by all rows, z_i ~ N(0, I)
static void tl_layernormed_rows(float* x, // (n, C)
                                int n, int C, double s) {
    double* u = (double*)malloc((size_t)C * sizeof(double));
    double* v = (double*)malloc((size_t)C * sizeof(double));
    double norm = 0.0;
    for (int c = 0; c < C; c++) { u[c] = tl_normal(); norm += u[c] * u[c]; }
    for (int c = 0; c < C; c++) { u[c] /= sqrt(norm); }
    for (int i = 0; i < n; i++) {
        double mean = 0.0, var = 0.0;
        for (int c = 0; c < C; c++) { v[c] = s * u[c] + tl_normal(); mean += v[c]; }
        mean /= C;
        for (int c = 0; c < C; c++) { var += (v[c] - mean) * (v[c] - mean); }
        var /= C;
        for (int c = 0; c < C; c++) { x[(size_t)i * C + c] = (float)((v[c] - mean) / sqrt(var + 1e-5)); }
    }
    free(u);
    free(v);
}

static void test_lshmoe(void) {
    char err[256];

    // --- projections: the documented generator, bit for bit, and its moments
    {
        static const double golden[16] = { // R (2, 8) for seed 1337, from the Python transcription
            0x1.c2d4eep-2, -0x1.519534p-1, -0x1.815f42p-2, 0x1.96ccdep-1, 0x1.706fb4p-2, 0x1.625a34p+0, -0x1.e8bb0ep-4,
            0x1.334d82p-1, 0x1.0f91fap-1, -0x1.c00d2cp-3, 0x1.1a2742p+0, -0x1.77197cp-2, -0x1.9da068p+0, 0x1.0080bap-3,
            0x1.cf8eeap-3, -0x1.8c5716p+0}; // float32 values (bits 0x3ee16a77 0xbf28ca9a ...)
        float R[16];
        lsh_projections_init(R, 1, 2, 8, 1337);
        int bad = 0;
        for (int i = 0; i < 16; i++) { // under TEST_F64 R is not rounded to float: within half a float ulp
            bad += sizeof(float) == 4 ? (double)R[i] != golden[i] : fabs(R[i] - golden[i]) > ldexp(fabs(golden[i]), -24);
        }
        check(bad == 0, "lsh_projections_golden", "%d of 16 differ from the Python transcription (R[0] = %.9g)", bad, (double)R[0]);
        uint64_t s1 = lsh_seed(1337, 2, 100), s2 = lsh_seed(0, -1, -5);
        check(s1 == 0xbe5abe4c9e701fedULL && s2 == 0xd8edc582a36c8907ULL, "lsh_seed_golden",
              "lsh_seed(1337,2,100) = 0x%016llx, lsh_seed(0,-1,-5) = 0x%016llx", (unsigned long long)s1, (unsigned long long)s2);

        int L = 4, dp = 16, C = 256;
        size_t count = (size_t)L * dp * C;
        float* Ra = (float*)malloc(count * sizeof(float));
        float* Rb = (float*)malloc(count * sizeof(float));
        lsh_projections_init(Ra, L, dp, C, 42);
        double sum = 0.0, sum2 = 0.0;
        for (size_t i = 0; i < count; i++) { sum += Ra[i]; sum2 += (double)Ra[i] * Ra[i]; }
        double mean = sum / count, var = sum2 / count - mean * mean;
        double bm = 4.5 / sqrt((double)count), bv = 4.5 * sqrt(2.0 / count);
        check(fabs(mean) <= bm && fabs(var - 1.0) <= bv, "lsh_projections_moments",
              "%zu normals: mean %.4f (|.| <= %.4f), variance %.4f (1 +- %.4f)", count, mean, bm, var, bv);
        lsh_projections_init(Rb, L, dp, C, 42);
        int same = memcmp(Ra, Rb, count * sizeof(float)) == 0;
        lsh_projections_init(Rb, L, dp, C, 43);
        size_t ndiff = 0;
        for (size_t i = 0; i < count; i++) { ndiff += Ra[i] != Rb[i]; }
        check(same && ndiff == count, "lsh_projections_deterministic",
              "seed 42 twice: %s; seeds 42 vs 43: %zu of %zu entries differ", same ? "identical" : "DIFFERENT", ndiff, count);
        free(Ra);
        free(Rb);

        // lsh_seed: distinct over layers x steps, and across base seeds
        int nl = 12, ns = 1000;
        uint64_t* seeds = (uint64_t*)malloc((size_t)nl * ns * 2 * sizeof(uint64_t));
        for (int l = 0; l < nl; l++) {
            for (int t = 0; t < ns; t++) {
                seeds[(size_t)l * ns + t] = lsh_seed(1337, l, t);
                seeds[(size_t)nl * ns + (size_t)l * ns + t] = lsh_seed(1338, l, t);
            }
        }
        int distinct = tl_count_distinct_u64(seeds, (size_t)nl * ns * 2);
        check(distinct == nl * ns * 2, "lsh_seed_distinct", "%d distinct of %d (seeds 1337 and 1338, 12 layers x 1000 steps)",
              distinct, nl * ns * 2);
        free(seeds);
    }

    // --- hash: library keys against a float64 re-evaluation of definitions 3-4, near-ties excepted
    {
        int n = 400, C = 48, L = 3, dp = 8;
        float* x = (float*)malloc((size_t)n * C * sizeof(float));
        float* R = (float*)malloc((size_t)L * dp * C * sizeof(float));
        double* Rd = (double*)malloc((size_t)L * dp * C * sizeof(double));
        double* xd = (double*)malloc((size_t)C * sizeof(double));
        uint64_t* keys = (uint64_t*)malloc((size_t)n * sizeof(uint64_t));
        float mean[48];
        double acc[48];
        tl_seed(7);
        tl_fill_normal(x, (size_t)n * C);
        for (size_t i = 0; i < (size_t)n * C; i++) { x[i] += 0.5f; } // a common offset, so centring matters
        lsh_projections_init(R, L, dp, C, 99);
        for (size_t i = 0; i < (size_t)L * dp * C; i++) { Rd[i] = R[i]; }
        for (int center = 0; center <= 1; center++) {
            lsh_group_mean(mean, acc, x, n, C);
            lsh_hash(keys, x, R, center ? mean : NULL, n, C, L, dp);
            double meand[48];
            for (int c = 0; c < C; c++) {
                double s = 0.0;
                for (int i = 0; i < n; i++) { s += x[(size_t)i * C + c]; }
                meand[c] = center ? s / n : 0.0;
            }
            int mismatched = 0, near_ties = 0;
            for (int i = 0; i < n; i++) {
                for (int c = 0; c < C; c++) { xd[c] = (double)x[(size_t)i * C + c] - meand[c]; }
                int h[3], tie = 0;
                for (int j = 0; j < L; j++) {
                    double margin;
                    h[j] = tl_crosspolytope_ref(Rd + (size_t)j * dp * C, xd, dp, C, &margin);
                    tie |= margin < 1e-4;
                }
                uint64_t key = (uint64_t)h[0] + 16 * ((uint64_t)h[1] + 16 * (uint64_t)h[2]);
                if (tie) { near_ties++; } else { mismatched += key != keys[i]; }
            }
            check(mismatched == 0, center ? "lsh_hash_matches_float64_centred" : "lsh_hash_matches_float64",
                  "%d of %d keys differ from the float64 evaluation (%d near-ties, margin < 1e-4, skipped)",
                  mismatched, n, near_ties);
        }
        free(x);
        free(R);
        free(Rd);
        free(xd);
        free(keys);
    }

    // --- keys: mixed radix, exhaustive for L=3, dp=4; config bounds
    {
        int L = 3, dp = 4, radix = 2 * dp, total = radix * radix * radix;
        uint64_t keys[512];
        int in_range = 1;
        for (int t = 0; t < total; t++) {
            int h[3] = {t % radix, (t / radix) % radix, t / (radix * radix)};
            keys[t] = lsh_key_pack(h, L, dp);
            in_range &= keys[t] < (uint64_t)total;
        }
        int distinct = tl_count_distinct_u64(keys, (size_t)total);
        check(distinct == total && in_range, "lsh_key_pack_exhaustive", "L=3 dp=4: %d distinct keys of %d tuples, all < %d",
              distinct, total, total);
        int hmax[16], hone[16];
        for (int j = 0; j < 16; j++) { hmax[j] = 15; hone[j] = j == 15; }
        uint64_t kmax = lsh_key_pack(hmax, 16, 8), kone = lsh_key_pack(hone, 16, 8);
        check(kmax == UINT64_MAX && kone == (1ULL << 60), "lsh_key_pack_largest", "L=16 dp=8: all 15s -> 0x%016llx, "
              "h_15 = 1 -> 0x%016llx (2^60)", (unsigned long long)kmax, (unsigned long long)kone);

        int rc_over = lsh_config_check(32, 16, err, sizeof(err));
        check(rc_over != 0 && strstr(err, "64-bit") != NULL, "lsh_config_check_overflow", "L=32 dp=16 rejected: '%s'", err);
        int rc_bad = lsh_config_check(0, 4, err, sizeof(err)) != 0 && lsh_config_check(2, 0, err, sizeof(err)) != 0
                     && lsh_config_check(65, 1, err, sizeof(err)) != 0 && lsh_config_check(1, 1025, err, sizeof(err)) != 0;
        check(rc_bad, "lsh_config_check_bounds", "L=0, dp=0, L=65, dp=1025 rejected; last: '%s'", err);
        // for every dp the largest accepted L satisfies (2dp)^L <= 2^64 < (2dp)^(L+1)
        int wrong = 0;
        unsigned __int128 two64 = (unsigned __int128)1 << 64;
        for (int d = 1; d <= LSH_MAX_DP; d++) {
            int Lmax = 0;
            while (Lmax < LSH_MAX_L && lsh_config_check(Lmax + 1, d, NULL, 0) == 0) { Lmax++; }
            unsigned __int128 p = 1;
            for (int j = 0; j < Lmax; j++) { p *= (unsigned __int128)(2 * d); }
            wrong += !(Lmax >= 1 && p <= two64 && p * (unsigned __int128)(2 * d) > two64);
        }
        check(wrong == 0 && lsh_config_check(16, 8, NULL, 0) == 0 && lsh_config_check(17, 8, NULL, 0) != 0
              && lsh_config_check(64, 1, NULL, 0) == 0 && lsh_config_check(12, 16, NULL, 0) == 0
              && lsh_config_check(5, 1024, NULL, 0) == 0 && lsh_config_check(6, 1024, NULL, 0) != 0,
              "lsh_config_check_largest", "dp=1..1024: largest accepted L is the largest with (2dp)^L <= 2^64 "
              "(%d wrong); e.g. dp=8 L=16, dp=1 L=64, dp=16 L=12, dp=1024 L=5 accepted (L=17 at dp=8 and L=6 at dp=1024 rejected)", wrong);
    }

    // --- buckets: first-appearance order, against a quadratic reference
    {
        uint64_t keys[7] = {5, 3, 5, 7, 3, 3, 9};
        int bucket_of_row[7], bucket_size[7];
        void* scratch = malloc(lsh_buckets_scratch_bytes(7));
        int m = lsh_buckets(bucket_of_row, bucket_size, keys, 7, scratch);
        int expect_b[7] = {0, 1, 0, 2, 1, 1, 3}, expect_s[4] = {2, 3, 1, 1};
        check(m == 4 && memcmp(bucket_of_row, expect_b, sizeof(expect_b)) == 0 && memcmp(bucket_size, expect_s, sizeof(expect_s)) == 0,
              "lsh_buckets_first_appearance", "keys 5 3 5 7 3 3 9 -> m %d, buckets %d %d %d %d %d %d %d, sizes %d %d %d %d",
              m, bucket_of_row[0], bucket_of_row[1], bucket_of_row[2], bucket_of_row[3], bucket_of_row[4],
              bucket_of_row[5], bucket_of_row[6], bucket_size[0], bucket_size[1], bucket_size[2], bucket_size[3]);
        free(scratch);

        int n = 5000;
        uint64_t* k = (uint64_t*)malloc((size_t)n * sizeof(uint64_t));
        int* bor = (int*)malloc((size_t)n * sizeof(int));
        int* bs = (int*)malloc((size_t)n * sizeof(int));
        int* ref = (int*)malloc((size_t)n * sizeof(int));
        uint64_t* first_key = (uint64_t*)malloc((size_t)n * sizeof(uint64_t));
        scratch = malloc(lsh_buckets_scratch_bytes(n));
        tl_seed(11);
        for (int i = 0; i < n; i++) { // 700 distinct keys spread over the 64-bit range, plus 0 and ~0
            uint64_t r = (uint64_t)(tl_uniform() * 700);
            k[i] = r == 0 ? 0 : r == 1 ? UINT64_MAX : r * 0x9E3779B97F4A7C15ULL;
        }
        m = lsh_buckets(bor, bs, k, n, scratch);
        int mref = 0, bad = 0;
        for (int i = 0; i < n; i++) {
            int b = -1;
            for (int q = 0; q < mref; q++) { if (first_key[q] == k[i]) { b = q; break; } }
            if (b < 0) { first_key[mref] = k[i]; b = mref++; }
            ref[i] = b;
            bad += bor[i] != ref[i];
        }
        long total = 0;
        for (int b = 0; b < m; b++) { total += bs[b]; }
        check(m == mref && bad == 0 && total == n, "lsh_buckets_random", "n %d: m %d (reference %d), %d rows disagree, "
              "sizes sum to %ld", n, m, mref, bad, total);
        free(k); free(bor); free(bs); free(ref); free(first_key); free(scratch);
    }

    // --- collision probability of one cross-polytope hash (L=1) against an independent implementation
    // Theory (why these assertions): for unit u, v at angle theta and Gaussian R, Ru and Rv are
    // standard Gaussian vectors with per-coordinate correlation rho = cos(theta), so
    // P(collision) = sum over the 2dp cells A of P(Ru in A, Rv in A); by Mehler's formula each term
    // is a power series in rho with non-negative coefficients, hence non-increasing in theta on
    // [0, 90] deg; at 90 deg Ru, Rv are independent and each cell has probability 1/(2dp), so
    // P = 1/(2dp) exactly (1/16 for dp = 8; dropping the sign would give 1/8); at 0 deg P = 1.
    {
        int C = 32, dp = 8, N = 6000, nangles = 7;
        double angles[7] = {0, 15, 30, 45, 60, 75, 90};
        double plib[7], pref[7];
        float* R = (float*)malloc((size_t)dp * C * sizeof(float));
        double* Rd = (double*)malloc((size_t)dp * C * sizeof(double));
        float x[2 * 32];
        double u[32], w[32], xd0[32], xd1[32];
        uint64_t keys[2];
        tl_seed(2024);
        for (int a = 0; a < nangles; a++) {
            double th = angles[a] * 3.14159265358979323846 / 180.0;
            int clib = 0, cref = 0;
            for (int t = 0; t < N; t++) {
                double nu = 0.0, dot = 0.0, nw = 0.0;
                for (int c = 0; c < C; c++) { u[c] = tl_normal(); nu += u[c] * u[c]; }
                for (int c = 0; c < C; c++) { u[c] /= sqrt(nu); w[c] = tl_normal(); dot += w[c] * u[c]; }
                for (int c = 0; c < C; c++) { w[c] -= dot * u[c]; nw += w[c] * w[c]; }
                for (int c = 0; c < C; c++) {
                    w[c] /= sqrt(nw);
                    x[c] = (float)u[c];
                    x[C + c] = (float)(cos(th) * u[c] + sin(th) * w[c]);
                    xd0[c] = x[c];
                    xd1[c] = x[C + c];
                }
                lsh_projections_init(R, 1, dp, C, lsh_seed(777, a, t)); // fresh projection per pair
                lsh_hash(keys, x, R, NULL, 2, C, 1, dp);
                clib += keys[0] == keys[1];
                for (size_t i = 0; i < (size_t)dp * C; i++) { Rd[i] = tl_normal(); }
                cref += tl_crosspolytope_ref(Rd, xd0, dp, C, NULL) == tl_crosspolytope_ref(Rd, xd1, dp, C, NULL);
            }
            plib[a] = (double)clib / N;
            pref[a] = (double)cref / N;
            double pool = 0.5 * (plib[a] + pref[a]);
            double se = sqrt(2.0 * pool * (1.0 - pool) / N);
            char name[64];
            snprintf(name, sizeof(name), "lsh_collision_%02.0fdeg", angles[a]);
            check(fabs(plib[a] - pref[a]) <= 4.5 * se, name, "dp=%d: library %.4f, independent %.4f, |diff| %.4f <= 4.5 se %.4f "
                  "(%d pairs each)", dp, plib[a], pref[a], fabs(plib[a] - pref[a]), 4.5 * se, N);
        }
        check(plib[0] == 1.0, "lsh_collision_identical", "theta 0: rate %.4f == 1", plib[0]);
        double p0 = 1.0 / (2 * dp), se0 = sqrt(p0 * (1.0 - p0) / N);
        check(fabs(plib[nangles - 1] - p0) <= 4.5 * se0, "lsh_collision_orthogonal", "theta 90: rate %.4f, theory 1/(2dp) = %.4f, "
              "|diff| %.4f <= 4.5 se %.4f", plib[nangles - 1], p0, fabs(plib[nangles - 1] - p0), 4.5 * se0);
        int mono = 1;
        double worst = -1.0;
        for (int a = 0; a + 1 < nangles; a++) {
            double se = sqrt(plib[a] * (1 - plib[a]) / N + plib[a + 1] * (1 - plib[a + 1]) / N);
            double excess = plib[a + 1] - plib[a] - 4.5 * se; // rise beyond the sampling bound
            if (excess > 0) { mono = 0; }
            if (excess > worst || a == 0) { worst = excess; }
        }
        check(mono, "lsh_collision_monotone", "rates %.3f %.3f %.3f %.3f %.3f %.3f %.3f non-increasing in theta "
              "(max rise minus 4.5 se: %.4f <= 0)", plib[0], plib[1], plib[2], plib[3], plib[4], plib[5], plib[6], worst);
        free(R);
        free(Rd);
    }

    // --- identical rows share a bucket; their centroid is the row, their output the expert's
    {
        int n = 12, C = 32, L = 4, dp = 8;
        int rowsA[4] = {0, 3, 6, 9}, rowsB[3] = {1, 5, 10};
        float* x = (float*)malloc((size_t)n * C * sizeof(float));
        float* R = (float*)malloc((size_t)L * dp * C * sizeof(float));
        float* cent = (float*)malloc((size_t)n * C * sizeof(float));
        float* ycent = (float*)malloc((size_t)n * C * sizeof(float));
        float* yhat = (float*)malloc((size_t)n * C * sizeof(float));
        float W[32 * 32], bias[32], A[32], B[32], yA[32];
        int bucket_of_row[12], bucket_size[12];
        void* scratch = malloc(lsh_scratch_bytes(n, C));
        tl_seed(5);
        tl_fill_normal(x, (size_t)n * C);
        tl_fill_normal(W, (size_t)C * C);
        for (int i = 0; i < C * C; i++) { W[i] *= 0.2f; }
        tl_fill_normal(bias, (size_t)C);
        // A: multiples of 2^-8 in [-8, 8) (12 significant bits, so sums of 4 are exact);
        // B: general floats (sums round: its centroid is within a few ulps, not bitwise)
        for (int c = 0; c < C; c++) { A[c] = (float)((int)(tl_uniform() * 4096) - 2048) / 256.0f; }
        tl_fill_normal(B, (size_t)C);
        for (int r = 0; r < 4; r++) { memcpy(x + (size_t)rowsA[r] * C, A, sizeof(A)); }
        for (int r = 0; r < 3; r++) { memcpy(x + (size_t)rowsB[r] * C, B, sizeof(B)); }
        lsh_projections_init(R, L, dp, C, 3);
        LSHConfig cfg = {L, dp, 0, 1};
        int m = lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, NULL);
        int bA = bucket_of_row[rowsA[0]], bB = bucket_of_row[rowsB[0]], together = 1;
        for (int r = 0; r < 4; r++) { together &= bucket_of_row[rowsA[r]] == bA; }
        for (int r = 0; r < 3; r++) { together &= bucket_of_row[rowsB[r]] == bB; }
        check(together && bucket_size[bA] == 4 && bucket_size[bB] == 3 && m == n - 5, "lsh_identical_rows_one_bucket",
              "4 copies of A in bucket %d (size %d), 3 of B in bucket %d (size %d), m %d of n %d",
              bA, bucket_size[bA], bB, bucket_size[bB], m, n);
        check(memcmp(cent + (size_t)bA * C, A, sizeof(A)) == 0, "lsh_identical_rows_centroid_exact",
              "4 copies of exactly summable A: centroid == A bitwise (max diff %.3g)", tl_max_abs_diff(cent + (size_t)bA * C, A, C));
        double worst = 0.0;
        for (int c = 0; c < C; c++) {
            double ratio = fabs((double)cent[(size_t)bB * C + c] - B[c]) / (FLT_EPSILON * fabs((double)B[c]));
            if (ratio > worst) { worst = ratio; }
        }
        check(worst <= 3.0, "lsh_identical_rows_centroid_rounded", "3 copies of general B: |c - B| <= %.2f eps |B| (bound 3: "
              "two rounded adds and a division)", worst);
        tl_expert_forward(ycent, cent, W, bias, m, C);
        lsh_group_decompress(yhat, ycent, x, cent, bucket_of_row, n, C, &cfg, NULL);
        tl_expert_forward(yA, A, W, bias, 1, C);
        int exact = 1;
        for (int r = 0; r < 4; r++) { exact &= memcmp(yhat + (size_t)rowsA[r] * C, yA, sizeof(yA)) == 0; }
        check(exact, "lsh_identical_rows_output", "with compensation each copy of A gets expert(A) bitwise (x - c = 0)");
        free(x); free(R); free(cent); free(ycent); free(yhat); free(scratch);
    }

    // --- all buckets singletons: the uncompressed path, bit for bit, forward and backward
    {
        int n = 64, C = 32, L = 4, dp = 32;
        size_t nC = (size_t)n * C;
        float* x = (float*)malloc(nC * sizeof(float));
        float* R = (float*)malloc((size_t)L * dp * C * sizeof(float));
        float* cent = (float*)malloc(nC * sizeof(float));
        float* ycent = (float*)malloc(nC * sizeof(float));
        float* y = (float*)malloc(nC * sizeof(float)); // uncompressed: expert on x
        float* yhat = (float*)malloc(nC * sizeof(float));
        float* g = (float*)malloc(nC * sizeof(float));
        float* G = (float*)malloc(nC * sizeof(float));
        float* dcent = (float*)malloc(nC * sizeof(float));
        float* dxu = (float*)malloc(nC * sizeof(float)); // uncompressed: expert backward on x
        float* dx0 = (float*)malloc(nC * sizeof(float));
        float* dx = (float*)malloc(nC * sizeof(float));
        float* expect = (float*)malloc(nC * sizeof(float));
        float W[32 * 32], bias[32];
        int bucket_of_row[64], bucket_size[64];
        void* scratch = malloc(lsh_scratch_bytes(n, C));
        tl_seed(9);
        tl_fill_normal(x, nC);
        tl_fill_normal(g, nC);
        tl_fill_normal(dx0, nC);
        tl_fill_normal(W, (size_t)C * C);
        for (int i = 0; i < C * C; i++) { W[i] *= 0.2f; }
        tl_fill_normal(bias, (size_t)C);
        lsh_projections_init(R, L, dp, C, 17);
        tl_expert_forward(y, x, W, bias, n, C);
        tl_expert_backward(dxu, y, g, W, n, C);
        for (size_t i = 0; i < nC; i++) { expect[i] = dx0[i] + dxu[i]; } // what dx += J^T g gives
        for (int compensate = 1; compensate >= 0; compensate--) {
            LSHConfig cfg = {L, dp, 1, compensate};
            int m = lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, NULL);
            tl_expert_forward(ycent, cent, W, bias, m, C);
            lsh_group_decompress(yhat, ycent, x, cent, bucket_of_row, n, C, &cfg, NULL);
            // rows are in their own buckets in row order, so bucket b is row b
            int fwd = m == n && memcmp(cent, x, nC * sizeof(float)) == 0 && memcmp(yhat, y, nC * sizeof(float)) == 0;
            lsh_group_decompress_backward(G, g, bucket_of_row, n, m, C, NULL);
            tl_expert_backward(dcent, ycent, G, W, m, C);
            memcpy(dx, dx0, nC * sizeof(float));
            lsh_group_compress_backward(dx, g, dcent, G, bucket_of_row, bucket_size, n, C, &cfg, NULL);
            int bwd = memcmp(G, g, nC * sizeof(float)) == 0 && memcmp(dx, expect, nC * sizeof(float)) == 0;
            check(m == n && fwd && bwd, compensate ? "lsh_singletons_exact_compensated" : "lsh_singletons_exact_plain",
                  "L=%d dp=%d: m %d of n %d; centroids == rows, yhat == expert(x), G == g, dx == dx0 + J^T g, all bitwise: %s %s "
                  "(max diff %.3g %.3g)", L, dp, m, n, fwd ? "yes" : "NO", bwd ? "yes" : "NO",
                  tl_max_abs_diff(yhat, y, nC), tl_max_abs_diff(dx, expect, nC));
        }
        free(x); free(R); free(cent); free(ycent); free(y); free(yhat); free(g); free(G); free(dcent);
        free(dxu); free(dx0); free(dx); free(expect); free(scratch);
    }

    // --- finite differences of the whole group (centroids, expert, compensation) with buckets frozen.
    // The analytic gradient comes from the library's float backward (plus the toy expert's float
    // backward); the numerical one from central differences of a double re-evaluation of the same
    // forward, h = 1e-5 (truncation ~1e-10, rounding ~1e-11). The float analytic path carries ~1e-6
    // relative error, so the bound is 2e-5 * max(1, max|dx|); a missing /n_b or compensation term
    // is off by O(0.1), which the on-vs-off comparison below shows.
    {
        enum { n = 10, C = 6, m = 5 };
        int bucket_of_row[n] = {0, 1, 0, 2, 1, 0, 3, 2, 0, 4}, bucket_size[m] = {4, 2, 2, 1, 1};
        float x[n * C], w[n * C], W[C * C], bias[C], cent[m * C], ycent[m * C], G[m * C], dcent[m * C];
        float dx[3][n * C];
        const float weights[3] = {0.0f, 1.0f, 0.5f}; // off, the paper's, the scaled residual (-C 0.5)
        const char* names[3] = {"lsh_backward_fd_plain", "lsh_backward_fd_compensated", "lsh_backward_fd_half"};
        double xd[n * C];
        tl_seed(31);
        tl_fill_normal(x, n * C);
        tl_fill_normal(w, n * C);
        tl_fill_normal(W, C * C);
        for (int i = 0; i < C * C; i++) { W[i] *= 0.5f; }
        tl_fill_normal(bias, C);
        for (int k = 0; k < 3; k++) {
            float compensate = weights[k];
            lsh_centroids_forward(cent, x, bucket_of_row, bucket_size, n, m, C);
            tl_expert_forward(ycent, cent, W, bias, m, C);
            lsh_compensate_backward(G, w, bucket_of_row, n, m, C); // g = dloss/dyhat = w
            tl_expert_backward(dcent, ycent, G, W, m, C);
            for (int i = 0; i < n * C; i++) { dx[k][i] = 0.0f; }
            lsh_centroids_backward(dx[k], w, dcent, G, bucket_of_row, bucket_size, n, C, compensate);
            double maxerr = 0.0, maxg = 0.0, h = 1e-5;
            for (int i = 0; i < n * C; i++) { xd[i] = x[i]; }
            for (int i = 0; i < n * C; i++) {
                double keep = xd[i];
                xd[i] = keep + h;
                double lp = tl_loss_double(xd, w, W, bias, bucket_of_row, bucket_size, n, m, C, compensate);
                xd[i] = keep - h;
                double lm = tl_loss_double(xd, w, W, bias, bucket_of_row, bucket_size, n, m, C, compensate);
                xd[i] = keep;
                double fd = (lp - lm) / (2.0 * h);
                if (fabs(fd - dx[k][i]) > maxerr) { maxerr = fabs(fd - dx[k][i]); }
                if (fabs(fd) > maxg) { maxg = fabs(fd); }
            }
            double tol = 2e-5 * (maxg > 1.0 ? maxg : 1.0);
            check(maxerr <= tol, names[k], "buckets of 4,2,2,1,1 rows, residual weight %g: max |analytic - FD| %.2e <= %.2e (max |dx| %.3f)",
                  compensate, maxerr, tol, maxg);
        }
        double onoff = tl_max_abs_diff(dx[0], dx[1], n * C);
        check(onoff > 1e-2, "lsh_backward_fd_sensitive", "compensated vs plain gradients differ by %.3f, far above the FD bound",
              onoff);
    }

    // --- empty groups and groups of one row
    {
        int C = 16;
        float cent[16 * 2], sentinel[16 * 2], x1[16], yhat[16], y1[16], G[16], dx[16], g1[16];
        int bucket_of_row[2] = {-7, -7}, bucket_size[2] = {-7, -7};
        float R[2 * 4 * 16];
        void* scratch = malloc(lsh_scratch_bytes(0, C) > lsh_scratch_bytes(1, C) ? lsh_scratch_bytes(0, C) : lsh_scratch_bytes(1, C));
        for (int i = 0; i < 32; i++) { cent[i] = sentinel[i] = 12345.0f; }
        lsh_projections_init(R, 2, 4, C, 1);
        LSHStats stats;
        lsh_stats_reset(&stats);
        LSHConfig cfg = {2, 4, 1, 1};
        int m = lsh_group_compress(cent, bucket_of_row, bucket_size, NULL, 0, C, R, &cfg, scratch, &stats);
        lsh_group_decompress(NULL, NULL, NULL, NULL, bucket_of_row, 0, C, &cfg, &stats);
        lsh_group_decompress_backward(NULL, NULL, bucket_of_row, 0, 0, C, &stats);
        lsh_group_compress_backward(NULL, NULL, NULL, NULL, bucket_of_row, bucket_size, 0, C, &cfg, &stats);
        int untouched = memcmp(cent, sentinel, sizeof(cent)) == 0 && bucket_of_row[0] == -7 && bucket_size[0] == -7;
        check(m == 0 && untouched && stats.groups == 1 && stats.rows == 0 && lsh_stats_rate(&stats) == 0.0,
              "lsh_empty_group", "n 0: m %d, outputs untouched: %s, NULL data pointers accepted", m, untouched ? "yes" : "NO");

        tl_seed(3);
        tl_fill_normal(x1, C);
        tl_fill_normal(y1, C);
        tl_fill_normal(g1, C);
        int ok = 1;
        for (int center = 0; center <= 1; center++) {
            cfg.center = center;
            m = lsh_group_compress(cent, bucket_of_row, bucket_size, x1, 1, C, R, &cfg, scratch, NULL);
            lsh_group_decompress(yhat, y1, x1, cent, bucket_of_row, 1, C, &cfg, NULL);
            lsh_group_decompress_backward(G, g1, bucket_of_row, 1, m, C, NULL);
            for (int c = 0; c < C; c++) { dx[c] = 0.0f; }
            lsh_group_compress_backward(dx, g1, y1, G, bucket_of_row, bucket_size, 1, C, &cfg, NULL);
            ok &= m == 1 && bucket_of_row[0] == 0 && bucket_size[0] == 1 && memcmp(cent, x1, sizeof(x1)) == 0
                  && memcmp(yhat, y1, sizeof(y1)) == 0 && memcmp(G, g1, sizeof(g1)) == 0 && memcmp(dx, y1, sizeof(y1)) == 0;
        }
        uint64_t key_centred = ((uint64_t*)scratch)[0]; // a centred single row is all zeros: v = 0, h = 0
        check(ok && key_centred == 0, "lsh_one_row_group", "n 1 (centred and not): m 1, centroid == row, yhat == ycent, "
              "G == g, dx == dcent bitwise; centred key %llu == 0", (unsigned long long)key_centred);
        free(scratch);
    }

    // --- determinism of the whole compress step
    {
        int n = 1000, C = 64, L = 3, dp = 4;
        float* x = (float*)malloc((size_t)n * C * sizeof(float));
        float* R = (float*)malloc((size_t)L * dp * C * sizeof(float));
        float* cent = (float*)malloc((size_t)n * C * sizeof(float));
        int* b1 = (int*)malloc((size_t)n * sizeof(int));
        int* b2 = (int*)malloc((size_t)n * sizeof(int));
        int* s1 = (int*)malloc((size_t)n * sizeof(int));
        void* scratch = malloc(lsh_scratch_bytes(n, C));
        tl_seed(77);
        tl_layernormed_rows(x, n, C, 4.0);
        LSHConfig cfg = {L, dp, 1, 1};
        lsh_projections_init(R, L, dp, C, lsh_seed(5, 3, 10));
        int m1 = lsh_group_compress(cent, b1, s1, x, n, C, R, &cfg, scratch, NULL);
        lsh_projections_init(R, L, dp, C, lsh_seed(5, 3, 10));
        int m2 = lsh_group_compress(cent, b2, s1, x, n, C, R, &cfg, scratch, NULL);
        int same = m1 == m2 && memcmp(b1, b2, (size_t)n * sizeof(int)) == 0;
        lsh_projections_init(R, L, dp, C, lsh_seed(5, 3, 11));
        int m3 = lsh_group_compress(cent, b2, s1, x, n, C, R, &cfg, scratch, NULL);
        int moved = 0;
        for (int i = 0; i < n; i++) { moved += b1[i] != b2[i]; }
        check(same && moved > 0, "lsh_compress_deterministic", "same (seed, layer, step): identical buckets (m %d, %d); "
              "next step: m %d, %d rows in other buckets", m1, m2, m3, moved);
        free(x); free(R); free(cent); free(b1); free(b2); free(s1); free(scratch);
    }

    // --- the knob: compression rate on layernormed rows sharing a direction, with and without centring
    {
        int n = 2048, C = 64, ncfg = 8;
        int Ls[8] = {1, 2, 4, 2, 4, 6, 2, 4}, dps[8] = {2, 2, 2, 4, 4, 4, 8, 8};
        float* x = (float*)malloc((size_t)n * C * sizeof(float));
        float* cent = (float*)malloc((size_t)n * C * sizeof(float));
        float* R = (float*)malloc((size_t)6 * 8 * C * sizeof(float));
        int* bucket_of_row = (int*)malloc((size_t)n * sizeof(int));
        int* bucket_size = (int*)malloc((size_t)n * sizeof(int));
        void* scratch = malloc(lsh_scratch_bytes(n, C));
        tl_seed(123);
        tl_layernormed_rows(x, n, C, 3.0 * sqrt((double)C)); // shared direction 3x the noise norm
        int centring_helps = 1;
        LSHStats total;
        lsh_stats_reset(&total);
        for (int k = 0; k < ncfg; k++) {
            lsh_projections_init(R, Ls[k], dps[k], C, lsh_seed(1, 0, k));
            LSHStats st[2];
            for (int center = 0; center <= 1; center++) {
                LSHConfig cfg = {Ls[k], dps[k], center, 1};
                lsh_stats_reset(&st[center]);
                lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, &st[center]);
            }
            lsh_stats_add(&total, &st[1]);
            double r0 = lsh_stats_rate(&st[0]), r1 = lsh_stats_rate(&st[1]);
            centring_helps &= st[1].centroids > st[0].centroids;
            char name[64];
            snprintf(name, sizeof(name), "lsh_rate_L%d_dp%d", Ls[k], dps[k]);
            check(r0 > 0.0 && r0 <= 1.0 && r1 > 0.0 && r1 <= 1.0, name, "n %d C %d: m/n %.4f (rel err %.3f, largest bucket %lld) "
                  "plain, %.4f (rel err %.3f, largest %lld) centred", n, C, r0, lsh_stats_rel_error(&st[0]),
                  (long long)st[0].max_bucket, r1, lsh_stats_rel_error(&st[1]), (long long)st[1].max_bucket);
        }
        check(centring_helps, "lsh_centring_more_buckets", "rows sharing a direction 3x the noise: centring gives more "
              "centroids for all %d (L, dp)", ncfg);
        lsh_stats_print(stdout, "     lsh stats, centred configs summed", &total);

        // stats bookkeeping against a direct count
        LSHConfig cfg = {2, 4, 1, 1};
        LSHStats st;
        lsh_stats_reset(&st);
        int m = lsh_group_compress(cent, bucket_of_row, bucket_size, x, n, C, R, &cfg, scratch, &st);
        double e2 = 0.0, x2 = 0.0;
        int maxb = 0;
        for (int b = 0; b < m; b++) { if (bucket_size[b] > maxb) { maxb = bucket_size[b]; } }
        for (int i = 0; i < n; i++) {
            for (int c = 0; c < C; c++) {
                double xv = x[(size_t)i * C + c], d = xv - cent[(size_t)bucket_of_row[i] * C + c];
                e2 += d * d;
                x2 += xv * xv;
            }
        }
        double rel = sqrt(e2 / x2);
        double without[4], with[4];
        lsh_alltoall_bytes(without, with, st.rows, st.centroids, 768, 2);
        check(st.groups == 1 && st.rows == n && st.centroids == m && st.max_bucket == maxb
              && fabs(lsh_stats_rel_error(&st) - rel) <= 1e-12 && without[LSH_A2A_DISPATCH_BACKWARD] == (double)n * 768 * 2
              && with[LSH_A2A_COMBINE] == (double)m * 768 * 2, "lsh_stats",
              "rows %lld centroids %lld rate %.4f rel err %.4f (direct %.4f); bf16 C=768 dispatch %.0f -> %.0f bytes",
              (long long)st.rows, (long long)st.centroids, lsh_stats_rate(&st), lsh_stats_rel_error(&st), rel,
              without[LSH_A2A_DISPATCH], with[LSH_A2A_DISPATCH]);
        free(x); free(cent); free(R); free(bucket_of_row); free(bucket_size); free(scratch);
    }
}

int main(void) {
    test_lshmoe();
    return test_summary();
}

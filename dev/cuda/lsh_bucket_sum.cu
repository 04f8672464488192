/*
dev/cuda/lsh_bucket_sum.cu: lshmoe.cu's lsh_bucket_sum_kernel, a bucket's rows summed in row order
from -0.0f, one thread per (centroid, channel). Divided by the bucket's size it makes the
centroids (lshmoe.h's lsh_centroids_forward); undivided, the backward's G_b, the sum of the
gradients of a bucket's rows (lsh_compensate_backward). Both checked bit for bit against
lshmoe.h on its own buckets, in fp32 and bf16 (lshmoe.h's fp32 result rounded once, as the
kernel rounds), then timed.
  GPU:      make dev/cuda/lsh_bucket_sum && ./dev/cuda/lsh_bucket_sum [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_bucket_sum_emu && ./dev/cuda/lsh_bucket_sum_emu
*/
#include "dev/cuda/lsh_common.h"

template <typename T>
struct SumCall {
    const LSHBatch* b;
    LSHLayout lay;
    T* out;       // (m, C)
    const T* in;  // (n, C)
    int divide;
};

template <typename T>
static void sum_call(void* p) {
    SumCall<T>* s = (SumCall<T>*)p;
    int m = s->b->m, C = s->b->C;
    launch_kernel(lsh_bucket_sum_kernel<T>, lsh_grid((size_t)m * C, 256), dim3(256), 0, 0, s->out, s->in, (const int*)s->lay.cent_size,
                  (const int*)s->lay.cent_start, (const int*)s->lay.cent_rows, m, C, s->divide);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void run(const LSHBatch* b) {
    int n = b->n, m = b->m, C = b->C;
    size_t nC = (size_t)n * C, mC = (size_t)m * C;
    const char* tn = lsh_type_name<T>();
    char name[128];
    SumCall<T> s;
    s.b = b;
    lsh_batch_layout(&s.lay, b);
    cudaCheck(cudaMalloc((void**)&s.out, (mC + 1) * sizeof(T)));
    // the centroids of the rows, and G_b of random gradients
    float* g = lsh_random(nC, 11);
    float* G_ref = (float*)mallocCheck((mC + 1) * sizeof(float));
    float* cent_ref = (float*)mallocCheck((mC + 1) * sizeof(float));
    float* cent_rounded = (float*)mallocCheck((mC + 1) * sizeof(float));
    memcpy(cent_rounded, b->cent, mC * sizeof(float));
    lsh_round_to<T>(cent_rounded, mC);
    for (int gi = 0; gi < b->G; gi++) {
        int r0 = b->group_rows[gi], c0 = b->group_cents[gi];
        lsh_compensate_backward(G_ref + (size_t)c0 * C, g + (size_t)r0 * C, b->bucket_of_row + r0, b->group_rows[gi + 1] - r0,
                                b->group_cents[gi + 1] - c0, C);
    }
    lsh_round_to<T>(G_ref, mC);
    memcpy(cent_ref, cent_rounded, mC * sizeof(float));
    T* x = lsh_to_device<T>(b->x, nC);
    T* gd = lsh_to_device<T>(g, nC);
    for (int divide = 1; divide >= 0; divide--) {
        s.in = divide ? x : gd;
        s.divide = divide;
        sum_call<T>(&s);
        float* got = lsh_to_host<T>(s.out, mC);
        size_t d = lsh_bits_differ(got, divide ? cent_ref : G_ref, mC);
        snprintf(name, sizeof(name), "lsh_bucket_sum/%s/%s", tn, divide ? "centroids" : "G_b");
        check(d == 0, name, "%zu of %zu values differ in their bits from lshmoe.h's %s", d, mC,
              divide ? "lsh_centroids_forward" : "lsh_compensate_backward");
        free(got);
    }
    s.in = x;
    s.divide = 1;
    snprintf(name, sizeof(name), "lsh_bucket_sum_kernel/%s (centroids)", tn);
    lsh_bench(name, (double)(nC + mC) * sizeof(T) + n * 4.0 + m * 8.0, (double)(nC + mC) * sizeof(T) + nC * 4.0 + mC * 8.0, sum_call<T>, &s, b);
    free(g); free(G_ref); free(cent_ref); free(cent_rounded);
    lsh_layout_free(&s.lay);
    cudaCheck(cudaFree(s.out)); cudaCheck(cudaFree(x)); cudaCheck(cudaFree(gd));
}

int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }

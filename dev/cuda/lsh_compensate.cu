/*
dev/cuda/lsh_compensate.cu: lshmoe.cu's lsh_compensate_kernel, LSH-MoE's Eq. 5 per (row, channel):
yhat_i = y_b + (x_i - c_b), exactly y_b where x_i == c_b (a one-row bucket), or y_b alone without
compensation; checked bit for bit against lshmoe.h's lsh_compensate_forward on its buckets, with
and without compensation, in fp32 and bf16, then timed.
  GPU:      make dev/cuda/lsh_compensate && ./dev/cuda/lsh_compensate [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_compensate_emu && ./dev/cuda/lsh_compensate_emu
*/
#include "dev/cuda/lsh_common.h"

template <typename T>
struct CompensateCall {
    const LSHBatch* b;
    LSHLayout lay;
    T *yhat, *ycent, *x, *cent; // (n, C), (m, C), (n, C), (m, C)
    float compensate; // the residual's weight: 1, 0.5 (the scaled residual) or 0
};

template <typename T>
static void compensate_call(void* p) {
    CompensateCall<T>* k = (CompensateCall<T>*)p;
    int n = k->b->n, C = k->b->C;
    launch_kernel(lsh_compensate_kernel<T>, lsh_grid((size_t)n * C, 256), dim3(256), 0, 0, k->yhat, (const T*)k->ycent, (const T*)k->x,
                  (const T*)k->cent, (const int*)k->lay.cent_of_row, n, C, k->compensate);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void run(const LSHBatch* b) {
    int n = b->n, m = b->m, C = b->C;
    size_t nC = (size_t)n * C, mC = (size_t)m * C;
    const char* tn = lsh_type_name<T>();
    char name[128];
    CompensateCall<T> k;
    k.b = b;
    lsh_batch_layout(&k.lay, b);
    float* ycent = lsh_random(mC, 21);  // the experts' outputs per centroid
    float* cent = (float*)mallocCheck((mC + 1) * sizeof(float));
    memcpy(cent, b->cent, mC * sizeof(float));
    lsh_round_to<T>(cent, mC);            // the centroids as the GPU holds them
    k.ycent = lsh_to_device<T>(ycent, mC);
    k.x = lsh_to_device<T>(b->x, nC);
    k.cent = lsh_to_device<T>(cent, mC);
    cudaCheck(cudaMalloc((void**)&k.yhat, (nC + 1) * sizeof(T)));
    float* ref = (float*)mallocCheck((nC + 1) * sizeof(float));
    const float weights[3] = {1.0f, 0.5f, 0.0f};
    const char* wname[3] = {"compensated", "half_compensated", "uncompensated"};
    for (int w = 0; w < 3; w++) {
        float compensate = weights[w];
        for (int g = 0; g < b->G; g++) {
            int r0 = b->group_rows[g], c0 = b->group_cents[g];
            lsh_compensate_forward(ref + (size_t)r0 * C, ycent + (size_t)c0 * C, b->x + (size_t)r0 * C, cent + (size_t)c0 * C,
                                   b->bucket_of_row + r0, b->group_rows[g + 1] - r0, C, compensate);
        }
        lsh_round_to<T>(ref, nC);
        k.compensate = compensate;
        compensate_call<T>(&k);
        float* got = lsh_to_host<T>(k.yhat, nC);
        size_t d = lsh_bits_differ(got, ref, nC);
        snprintf(name, sizeof(name), "lsh_compensate/%s/%s", tn, wname[w]);
        check(d == 0, name, "%zu of %zu values differ in their bits from lshmoe.h's lsh_compensate_forward", d, nC);
        free(got);
    }
    k.compensate = 1.0f;
    snprintf(name, sizeof(name), "lsh_compensate_kernel/%s", tn);
    lsh_bench(name, (double)(2 * nC + 2 * mC) * sizeof(T) + n * 4.0, (double)4 * nC * sizeof(T) + nC * 4.0, compensate_call<T>, &k, b);
    free(ycent); free(cent); free(ref);
    lsh_layout_free(&k.lay);
    cudaCheck(cudaFree(k.yhat)); cudaCheck(cudaFree(k.ycent)); cudaCheck(cudaFree(k.x)); cudaCheck(cudaFree(k.cent));
}

int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }

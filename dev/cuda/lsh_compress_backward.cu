/*
dev/cuda/lsh_compress_backward.cu: lshmoe.cu's lsh_compress_backward_kernel, the compression's
backward with the buckets held fixed (DESIGN.md; lshmoe.h definition 8), per (row, channel):
dx_i += dcent_b where n_b = 1, g_i + (dcent_b - G_b) / n_b with compensation, dcent_b / n_b
without. Checked bit for bit against lshmoe.h's lsh_centroids_backward on its buckets, both
ways, in fp32 and bf16, then timed.
  GPU:      make dev/cuda/lsh_compress_backward && ./dev/cuda/lsh_compress_backward [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_compress_backward_emu && ./dev/cuda/lsh_compress_backward_emu
*/
#include "dev/cuda/lsh_common.h"

template <typename T>
struct BackwardCall {
    const LSHBatch* b;
    LSHLayout lay;
    T *dx, *g, *dcent, *Gsum; // (n, C) accumulated, (n, C), (m, C), (m, C)
    float compensate; // the residual's weight: 1, 0.5 (the scaled residual) or 0
};

template <typename T>
static void backward_call(void* p) {
    BackwardCall<T>* k = (BackwardCall<T>*)p;
    int n = k->b->n, C = k->b->C;
    launch_kernel(lsh_compress_backward_kernel<T>, lsh_grid((size_t)n * C, 256), dim3(256), 0, 0, k->dx, (const T*)k->g, (const T*)k->dcent,
                  (const T*)k->Gsum, (const int*)k->lay.cent_of_row, (const int*)k->lay.cent_size, n, C, k->compensate);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void run(const LSHBatch* b) {
    int n = b->n, m = b->m, C = b->C;
    size_t nC = (size_t)n * C, mC = (size_t)m * C;
    const char* tn = lsh_type_name<T>();
    char name[128];
    BackwardCall<T> k;
    k.b = b;
    lsh_batch_layout(&k.lay, b);
    float *g = lsh_random(nC, 31), *dcent = lsh_random(mC, 32), *Gsum = lsh_random(mC, 33), *dx0 = lsh_random(nC, 34);
    k.g = lsh_to_device<T>(g, nC);
    k.dcent = lsh_to_device<T>(dcent, mC);
    k.Gsum = lsh_to_device<T>(Gsum, mC);
    float* ref = (float*)mallocCheck((nC + 1) * sizeof(float));
    const float weights[3] = {1.0f, 0.5f, 0.0f};
    const char* wname[3] = {"compensated", "half_compensated", "uncompensated"};
    for (int w = 0; w < 3; w++) {
        float compensate = weights[w];
        memcpy(ref, dx0, nC * sizeof(float));
        for (int gi = 0; gi < b->G; gi++) {
            int r0 = b->group_rows[gi], c0 = b->group_cents[gi];
            lsh_centroids_backward(ref + (size_t)r0 * C, g + (size_t)r0 * C, dcent + (size_t)c0 * C, Gsum + (size_t)c0 * C, b->bucket_of_row + r0,
                                   b->bucket_size + c0, b->group_rows[gi + 1] - r0, C, compensate);
        }
        lsh_round_to<T>(ref, nC);
        k.dx = lsh_to_device<T>(dx0, nC);
        k.compensate = compensate;
        backward_call<T>(&k);
        float* got = lsh_to_host<T>(k.dx, nC);
        size_t d = lsh_bits_differ(got, ref, nC);
        snprintf(name, sizeof(name), "lsh_compress_backward/%s/%s", tn, wname[w]);
        check(d == 0, name, "%zu of %zu values differ in their bits from lshmoe.h's lsh_centroids_backward", d, nC);
        free(got);
        if (w == 2) { break; }
        cudaCheck(cudaFree(k.dx));
    }
    k.compensate = 1.0f;
    snprintf(name, sizeof(name), "lsh_compress_backward_kernel/%s", tn);
    lsh_bench(name, (double)(3 * nC + 2 * mC) * sizeof(T) + n * 4.0 + m * 4.0, (double)5 * nC * sizeof(T) + nC * 8.0, backward_call<T>, &k, b);
    free(g); free(dcent); free(Gsum); free(dx0); free(ref);
    lsh_layout_free(&k.lay);
    cudaCheck(cudaFree(k.dx)); cudaCheck(cudaFree(k.g)); cudaCheck(cudaFree(k.dcent)); cudaCheck(cudaFree(k.Gsum));
}

int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }

/*
dev/cuda/lsh_stats.cu: lshmoe.cu's lsh_stats_kernel, one thread per group: sum_i ||x_i - c_b||^2
and sum_i ||x_i||^2 in double (rows, then channels, in order, as lshmoe.h's
lsh_reconstruction_error) and the group's largest bucket, for the step line's lsh_err and
bucket figures. Checked against lshmoe.h on its buckets, in fp32 and bf16: the sizes exactly,
the sums within 1e-12 relative (nvcc may fuse d * d + e into a double multiply-add: 2^-53 per
term, a few thousand terms), bit for bit where nothing is fused (the emulated build); then timed.
  GPU:      make dev/cuda/lsh_stats && ./dev/cuda/lsh_stats [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_stats_emu && ./dev/cuda/lsh_stats_emu
*/
#include "dev/cuda/lsh_common.h"

template <typename T>
struct StatsCall {
    const LSHBatch* b;
    LSHLayout lay;
    double* out; // (G, 3)
    T *x, *cent; // (n, C), (m, C)
};

template <typename T>
static void stats_call(void* p) {
    StatsCall<T>* k = (StatsCall<T>*)p;
    launch_kernel(lsh_stats_kernel<T>, lsh_grid(k->b->G, 32), dim3(32), 0, 0, k->out, (const T*)k->x, (const T*)k->cent,
                  (const int*)k->lay.cent_of_row, (const int*)k->lay.cent_size, (const int*)k->lay.group_rows,
                  (const int*)k->lay.group_cents, k->b->G, k->b->C);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void run(const LSHBatch* b) {
    int n = b->n, m = b->m, C = b->C, G = b->G;
    size_t nC = (size_t)n * C, mC = (size_t)m * C;
    const char* tn = lsh_type_name<T>();
    char name[128];
    StatsCall<T> k;
    k.b = b;
    lsh_batch_layout(&k.lay, b);
    float* cent = (float*)mallocCheck((mC + 1) * sizeof(float));
    memcpy(cent, b->cent, mC * sizeof(float));
    lsh_round_to<T>(cent, mC); // the centroids as the GPU holds them
    k.x = lsh_to_device<T>(b->x, nC);
    k.cent = lsh_to_device<T>(cent, mC);
    cudaCheck(cudaMalloc((void**)&k.out, 3 * (size_t)G * sizeof(double)));
    stats_call<T>(&k);
    double* got = (double*)mallocCheck(3 * (size_t)G * sizeof(double));
    cudaCheck(cudaMemcpy(got, k.out, 3 * (size_t)G * sizeof(double), cudaMemcpyDeviceToHost));
    double worst = 0.0;
    int bits = 0, sizes = 0;
    for (int g = 0; g < G; g++) {
        int r0 = b->group_rows[g], c0 = b->group_cents[g], maxb = 0;
        double want[2] = {0.0, 0.0};
        lsh_reconstruction_error(&want[0], &want[1], b->x + (size_t)r0 * C, cent + (size_t)c0 * C, b->bucket_of_row + r0,
                                 b->group_rows[g + 1] - r0, C);
        for (int c = c0; c < b->group_cents[g + 1]; c++) { maxb = b->bucket_size[c] > maxb ? b->bucket_size[c] : maxb; }
        for (int a = 0; a < 2; a++) {
            double e = fabs(got[3 * g + a] - want[a]) / (want[a] > 0.0 ? want[a] : 1.0);
            worst = e > worst ? e : worst;
            bits += memcmp(&got[3 * g + a], &want[a], sizeof(double)) != 0;
        }
        sizes += got[3 * g + 2] != (double)maxb;
    }
    snprintf(name, sizeof(name), "lsh_stats/%s/errors_and_largest_bucket", tn);
    check(worst <= 1e-12 && sizes == 0 && (bits == 0 || !lsh_emulated), name,
          "sums within %.1e of lshmoe.h's lsh_reconstruction_error (bound 1e-12), %d of %d differ in their bits%s; %d of %d largest "
          "buckets differ", worst, bits, 2 * G, lsh_emulated ? " (emulated: must be 0)" : "", sizes, G);
    snprintf(name, sizeof(name), "lsh_stats_kernel/%s", tn);
    lsh_bench(name, (double)(nC + mC) * sizeof(T) + n * 4.0 + m * 4.0 + G * 24.0, (double)2 * nC * sizeof(T) + n * 4.0 + m * 4.0 + G * 24.0,
              stats_call<T>, &k, b);
    free(cent); free(got);
    lsh_layout_free(&k.lay);
    cudaCheck(cudaFree(k.x)); cudaCheck(cudaFree(k.cent)); cudaCheck(cudaFree(k.out));
}

int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }

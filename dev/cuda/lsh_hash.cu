/*
dev/cuda/lsh_hash.cu: lshmoe.cu's centring and hash kernels, lsh_group_mean_kernel (each group's
mean, double sums in row order) and lsh_hash_kernel (a row's L cross-polytope hashes packed in
one key), against lshmoe.h's lsh_group_mean and lsh_hash, in fp32 and bf16, then timed.
The means are checked bit for bit; a key may differ only at a near tie (nvcc fuses the dot
products' multiply-adds, lshmoe.h does not), counted with lsh_hash_margin < 1e-4.
  GPU:      make dev/cuda/lsh_hash && ./dev/cuda/lsh_hash [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_hash_emu && ./dev/cuda/lsh_hash_emu
*/
#include "dev/cuda/lsh_common.h"

template <typename T>
struct HashCall {
    const LSHBatch* b;
    LSHLayout lay;
    const T* x;
    float* mean;
    uint64_t* keys;
    int center;
};

template <typename T>
static void mean_call(void* p) {
    HashCall<T>* h = (HashCall<T>*)p;
    launch_kernel(lsh_group_mean_kernel<T>, lsh_grid((size_t)h->b->G * h->b->C, 256), dim3(256), 0, 0, h->mean, h->x,
                  h->lay.group_rows, h->b->G, h->b->C);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void hash_call(void* p) {
    HashCall<T>* h = (HashCall<T>*)p;
    const LSHBatch* b = h->b;
    launch_kernel(lsh_hash_kernel<T>, lsh_grid(b->n, 64), dim3(64), 0, 0, h->keys, h->x, (const float*)b->d_R,
                  h->center ? (const float*)h->mean : (const float*)NULL, h->lay.group_rows, b->G, b->n, b->C, b->cfg.L, b->cfg.dp);
    cudaCheck(cudaGetLastError());
}

template <typename T>
static void run(const LSHBatch* b) {
    int n = b->n, G = b->G, C = b->C, L = b->cfg.L, dp = b->cfg.dp;
    const char* tn = lsh_type_name<T>();
    HashCall<T> h;
    h.b = b;
    lsh_batch_layout(&h.lay, b);
    h.x = lsh_to_device<T>(b->x, (size_t)n * C);
    cudaCheck(cudaMalloc((void**)&h.mean, (size_t)G * C * sizeof(float)));
    cudaCheck(cudaMalloc((void**)&h.keys, (n + 1) * sizeof(uint64_t)));
    uint64_t* keys = (uint64_t*)mallocCheck((n + 1) * sizeof(uint64_t));
    uint64_t* plain_ref = (uint64_t*)mallocCheck((n + 1) * sizeof(uint64_t));
    lsh_hash(plain_ref, b->x, b->R, NULL, n, C, L, dp); // without centring: no group enters a key
    char name[128];
    mean_call<T>(&h);
    float* mean = (float*)mallocCheck((size_t)G * C * sizeof(float));
    cudaCheck(cudaMemcpy(mean, h.mean, (size_t)G * C * sizeof(float), cudaMemcpyDeviceToHost));
    snprintf(name, sizeof(name), "lsh_hash/%s/group_mean", tn);
    size_t d = lsh_bits_differ(mean, b->mean, (size_t)G * C);
    check(d == 0, name, "%zu of %zu values differ in their bits from lshmoe.h's lsh_group_mean", d, (size_t)G * C);
    for (int center = 1; center >= 0; center--) {
        h.center = center;
        hash_call<T>(&h);
        cudaCheck(cudaMemcpy(keys, h.keys, n * sizeof(uint64_t), cudaMemcpyDeviceToHost));
        const uint64_t* ref = center ? b->keys : plain_ref;
        int differ = 0, ties = 0;
        double closest = 1.0;
        for (int g = 0; g < G; g++) {
            for (int r = b->group_rows[g]; r < b->group_rows[g + 1]; r++) {
                if (keys[r] == ref[r]) { continue; }
                differ++;
                double mg = lsh_hash_margin(b->x + (size_t)r * C, center ? b->mean + (size_t)g * C : NULL, b->R, C, L, dp);
                closest = mg < closest ? mg : closest;
                ties += mg < 1e-4;
            }
        }
        snprintf(name, sizeof(name), "lsh_hash/%s/keys_%s", tn, center ? "centred" : "plain");
        check(differ == ties, name, "%d of %d keys differ from lshmoe.h's, %d of them near ties (margin < 1e-4; closest %.1e)", differ, n,
              ties, differ > 0 ? closest : 0.0);
    }
    double Tb = sizeof(T), xb = (double)n * C * Tb, Rb = (double)L * dp * C * 4, meanb = (double)G * C * 4;
    snprintf(name, sizeof(name), "lsh_group_mean_kernel/%s", tn);
    lsh_bench(name, xb + meanb, xb + meanb + (double)G * C * 8, mean_call<T>, &h, b);
    h.center = 1;
    snprintf(name, sizeof(name), "lsh_hash_kernel/%s (centred)", tn);
    lsh_bench(name, xb + Rb + meanb + n * 8.0, (double)n * L * dp * C * (Tb + 4 + 4) + n * 8.0, hash_call<T>, &h, b);
    free(keys); free(plain_ref); free(mean);
    lsh_layout_free(&h.lay);
    cudaCheck(cudaFree((void*)h.x)); cudaCheck(cudaFree(h.mean)); cudaCheck(cudaFree(h.keys));
}

int main(int argc, char** argv) { return lsh_main(argc, argv, run<float>, run<__nv_bfloat16>); }

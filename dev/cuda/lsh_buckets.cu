/*
dev/cuda/lsh_buckets.cu: lshmoe.cu's bucketing kernels, one thread per group: lsh_buckets_kernel
(bucket ids in order of first appearance, through an open-addressing table, as lshmoe.h's
lsh_buckets) and lsh_bucket_rows_kernel (each bucket's global index, size and rows in order), on
lshmoe.h's keys, checked exactly against lshmoe.h, then timed. Keys only: no fp32/bf16 variants.
  GPU:      make dev/cuda/lsh_buckets && ./dev/cuda/lsh_buckets [-g groups -r rows -c C -L L -d dp -i iters]
  emulated: make dev/cuda/lsh_buckets_emu && ./dev/cuda/lsh_buckets_emu
*/
#include "dev/cuda/lsh_common.h"

typedef struct {
    const LSHBatch* b;
    LSHLayout lay;          // built by the kernels (lay_ref: from lshmoe.h's buckets on the host)
    uint64_t* keys;         // (n) lshmoe.h's keys, on the device
    uint64_t* table_keys;   // the groups' hash tables, lsh_table_slots(n_g) slots each
    int* table_ids;
    size_t* table_offset;   // (G)
    int* group_m;           // (G)
} BucketCall;

static void buckets_call(void* p) {
    BucketCall* k = (BucketCall*)p;
    launch_kernel(lsh_buckets_kernel, lsh_grid(k->b->G, 32), dim3(32), 0, 0, k->lay.bucket_local, k->group_m, k->table_keys, k->table_ids,
                  (const size_t*)k->table_offset, (const uint64_t*)k->keys, (const int*)k->lay.group_rows, k->b->G);
    cudaCheck(cudaGetLastError());
}

static void bucket_rows_call(void* p) {
    BucketCall* k = (BucketCall*)p;
    launch_kernel(lsh_bucket_rows_kernel, lsh_grid(k->b->G, 32), dim3(32), 0, 0, k->lay.cent_of_row, k->lay.cent_size, k->lay.cent_start,
                  k->lay.cent_rows, (const int*)k->lay.bucket_local, (const int*)k->lay.group_rows, (const int*)k->lay.group_cents, k->b->G);
    cudaCheck(cudaGetLastError());
}

// the first n of an (n+1)-strided int array of a layout, device to host
static int* layout_ints(const int* d, int n) {
    int* h = (int*)mallocCheck((n + 1) * sizeof(int));
    cudaCheck(cudaMemcpy(h, d, (n + 1) * sizeof(int), cudaMemcpyDeviceToHost));
    return h;
}

int main(int argc, char** argv) {
    LSHBatch b;
    lsh_batch_init(&b, argc, argv);
    int n = b.n, G = b.G, m = b.m;
    BucketCall k;
    k.b = &b;
    LSHLayout ref;
    lsh_batch_layout(&ref, &b);
    lsh_batch_layout(&k.lay, &b); // its group offsets; the kernels overwrite the rest
    cudaCheck(cudaMemset(k.lay.cent_of_row, 0xff, (size_t)(n + 1) * 5 * sizeof(int)));
    size_t* offset = (size_t*)mallocCheck(G * sizeof(size_t)), slots = 0;
    for (int g = 0; g < G; g++) { offset[g] = slots; slots += lsh_table_slots(b.group_rows[g + 1] - b.group_rows[g]); }
    cudaCheck(cudaMalloc((void**)&k.keys, (n + 1) * sizeof(uint64_t)));
    cudaCheck(cudaMemcpy(k.keys, b.keys, n * sizeof(uint64_t), cudaMemcpyHostToDevice));
    cudaCheck(cudaMalloc((void**)&k.table_keys, slots * sizeof(uint64_t)));
    cudaCheck(cudaMalloc((void**)&k.table_ids, slots * sizeof(int)));
    cudaCheck(cudaMalloc((void**)&k.table_offset, G * sizeof(size_t)));
    cudaCheck(cudaMemcpy(k.table_offset, offset, G * sizeof(size_t), cudaMemcpyHostToDevice));
    cudaCheck(cudaMalloc((void**)&k.group_m, G * sizeof(int)));

    buckets_call(&k);
    int* local = layout_ints(k.lay.bucket_local, n);
    int* gm = (int*)mallocCheck(G * sizeof(int));
    cudaCheck(cudaMemcpy(gm, k.group_m, G * sizeof(int), cudaMemcpyDeviceToHost));
    int ids_differ = 0, m_differ = 0;
    for (int r = 0; r < n; r++) { ids_differ += local[r] != b.bucket_of_row[r]; }
    for (int g = 0; g < G; g++) { m_differ += gm[g] != b.group_cents[g + 1] - b.group_cents[g]; }
    check(ids_differ == 0 && m_differ == 0, "lsh_buckets/bucket_ids", "%d of %d bucket ids and %d of %d group bucket counts differ from lshmoe.h's",
          ids_differ, n, m_differ, G);

    bucket_rows_call(&k);
    int differ = 0;
    int* got[4] = {layout_ints(k.lay.cent_of_row, n), layout_ints(k.lay.cent_size, n), layout_ints(k.lay.cent_start, n), layout_ints(k.lay.cent_rows, n)};
    int* want[4] = {layout_ints(ref.cent_of_row, n), layout_ints(ref.cent_size, n), layout_ints(ref.cent_start, n), layout_ints(ref.cent_rows, n)};
    int len[4] = {n, m, m, n};
    for (int a = 0; a < 4; a++) {
        for (int i = 0; i < len[a]; i++) { differ += got[a][i] != want[a][i]; }
        free(got[a]); free(want[a]);
    }
    check(differ == 0, "lsh_buckets/bucket_rows", "%d entries of the rows' centroids, bucket sizes, starts and row lists differ from lshmoe.h's "
          "buckets (%d rows, %d centroids)", differ, n, m);

    lsh_bench("lsh_buckets_kernel", n * 8.0 + n * 4.0 + G * 4.0, n * 8.0 + n * 4.0 + G * 4.0 + slots * 4.0 + n * 12.0 * 2, buckets_call, &k, &b);
    lsh_bench("lsh_bucket_rows_kernel", n * 4.0 * 4 + m * 4.0 * 2, n * 4.0 * 6 + m * 4.0 * 5, bucket_rows_call, &k, &b);
    free(offset); free(local); free(gm);
    lsh_layout_free(&ref); lsh_layout_free(&k.lay);
    cudaCheck(cudaFree(k.keys)); cudaCheck(cudaFree(k.table_keys)); cudaCheck(cudaFree(k.table_ids));
    cudaCheck(cudaFree(k.table_offset)); cudaCheck(cudaFree(k.group_m));
    lsh_batch_free(&b);
    return test_summary();
}

/*
The MLPs of an MoE step against those of the dense step, the same FLOPs (make bench-cpu runs it):
L layers of E experts with N/E rows each, through the trainer's moe_experts_forward and
moe_experts_backward (one thread per expert, OpenBLAS single-threaded inside, as in training),
against L dense MLPs on all N rows (matmul_forward, gelu_forward, ... with every thread inside the
matmuls, as the dense layers run). Each layer has its own weights, so they come from memory as in
a step. Why MoE costs more per token at a small batch: an expert's matmul on N/E rows runs slower
than one on N rows.
Usage: dev/bench_experts L C B T E [reps]   (e.g. 6 384 4 64 8 for MoE d6 E=8 at B=4, T=64)
*/
#define TESTING
#include "../train_gpt2_moe.c"

// L x E MLPs' weights (or their gradients), carved in this order out of an allocation from at;
// returns where the next tensor starts
typedef struct { float* fcw; float* projw; float* fcb; float* projb; } MLPs; // (L,E,H,C), (L,E,C,H), (L,E,H), (L,E,C)
static float* point_mlps(MLPs* m, float* at, size_t LE, int C, int H) {
    m->fcw = at; at += LE * H * C;
    m->projw = at; at += LE * C * H;
    m->fcb = at; at += LE * H;
    m->projb = at; at += LE * C;
    return at;
}

int main(int argc, char** argv) {
    if (argc < 6) { fprintf(stderr, "usage: %s L C B T E [reps]\n", argv[0]); return 1; }
    int L = atoi(argv[1]), C = atoi(argv[2]), N = atoi(argv[3]) * atoi(argv[4]), E = atoi(argv[5]);
    int reps = argc > 6 ? atoi(argv[6]) : 3, H = 4 * C;
    if (L < 1 || L > 64 || C < 1 || C > 4096 || N < 1 || N > 65536 || E < 1 || E > N || E > MAX_EXPERTS || reps < 1) {
        fprintf(stderr, "error: bad L, C, B*T, E or reps\n");
        return 1;
    }
    // one allocation carved into the tensors: random weights, inputs and output gradients first,
    // then zeroed gradients and scratch
    size_t LE = (size_t)L * E, mlps = LE * (2 * (size_t)H * C + H + C);
    size_t n_random = mlps + 2 * (size_t)N * C, n_zero = mlps + 4 * (size_t)N * H + 2 * (size_t)N * C;
    float* mem = (float*)callocCheck(n_random + n_zero, sizeof(float));
    uint64_t rng = 1337;
    normal_fill(mem, n_random, 0.02f, &rng);
    MLPs w, g; // the weights and their gradients
    float* p = point_mlps(&w, mem, LE, C, H);
    float* x = p; p += (size_t)N * C; // (N,C)
    float* dy = p; p += (size_t)N * C; // (N,C)
    p = point_mlps(&g, p, LE, C, H);
    float* h = p; p += (size_t)N * H; // (N,H)
    float* hg = p; p += (size_t)N * H; // (N,H)
    float* dh = p; p += (size_t)N * H; // (N,H)
    float* dhg = p; p += (size_t)N * H; // (N,H)
    float* y = p; p += (size_t)N * C; // (N,C)
    float* dx = p; // (N,C)
    int* offsets = (int*)mallocCheck((size_t)(E + 1) * sizeof(int)); // (E+1): rows split evenly
    for (int e = 0; e <= E; e++) { offsets[e] = (int)((long long)N * e / E); }

    double best_experts = 1e30, best_dense = 1e30; // best of reps: the least disturbed run
    for (int r = 0; r <= reps; r++) { // r = 0 warms up (first touch, OpenBLAS's threads)
        double t0 = now_seconds();
        for (int l = 0; l < L; l++) { // the dense MLPs: layer l's first expert's weights, all N rows
            size_t m = (size_t)l * E * H * C, hb = (size_t)l * E * H, cb = (size_t)l * E * C; // layer l's offsets
            matmul_forward(h, x, w.fcw + m, w.fcb + hb, N, C, H);
            gelu_forward(hg, h, N * H);
            matmul_forward(y, hg, w.projw + m, w.projb + cb, N, H, C);
            memset(dhg, 0, (size_t)N * H * sizeof(float));
            matmul_backward(dhg, g.projw + m, g.projb + cb, dy, hg, w.projw + m, N, H, C);
            gelu_backward(dh, h, dhg, N * H);
            matmul_backward(dx, g.fcw + m, g.fcb + hb, dh, x, w.fcw + m, N, C, H);
        }
        double t1 = now_seconds();
        for (int l = 0; l < L; l++) { // the experts: E of them, N/E rows each
            size_t m = (size_t)l * E * H * C, hb = (size_t)l * E * H, cb = (size_t)l * E * C;
            moe_experts_forward(h, hg, y, x, offsets, w.fcw + m, w.fcb + hb, w.projw + m, w.projb + cb, E, C, H);
            memset(dhg, 0, (size_t)N * H * sizeof(float));
            moe_experts_backward(dx, dh, dhg, g.fcw + m, g.fcb + hb, g.projw + m, g.projb + cb,
                                 dy, x, h, hg, offsets, w.fcw + m, w.projw + m, E, C, H);
        }
        double t2 = now_seconds();
        if (r > 0 && t1 - t0 < best_dense) { best_dense = t1 - t0; }
        if (r > 0 && t2 - t1 < best_experts) { best_experts = t2 - t1; }
    }
    double flops = 12.0 * N * C * H * L; // two matmuls, forward 2NCH each, backward 4NCH each
    printf("MLPs of L=%d layers, N=%d rows, C=%d, H=%d: dense %.1f ms (%.0f GFLOP/s); E=%d experts of ~%d rows %.1f ms (%.0f GFLOP/s): %.2fx\n",
           L, N, C, H, best_dense * 1e3, flops / best_dense / 1e9, E, N / E, best_experts * 1e3, flops / best_experts / 1e9,
           best_experts / best_dense);
    free(mem);
    free(offsets);
    return 0;
}

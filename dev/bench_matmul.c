/*
The trainer's matmuls against OpenBLAS's own sgemm, on the shapes of one training step of a GPT-2
model (make bench-cpu runs it). For each linear layer of the model it times the trainer's
matmul_forward + matmul_backward (bias, transposes and all) and then the three bare cblas_sgemm
calls those two functions must make, on the same buffers, and prints both rates; the step's
matmul time is what the trainer spends in matmuls per step, to set against its ms/step. The last
line (total GFLOP, trainer ms, sgemm ms per step) is what dev/bench_cpu.sh reads.
Usage: dev/bench_matmul L C B T [reps]   (e.g. 6 384 4 64 for d6 at B=4, T=64)
Needs the BLAS build (OpenBLAS): the bare sgemm is the baseline.
*/
#define TESTING
#include "../train_gpt2_moe.c"

#ifndef USE_BLAS
int main(void) { fprintf(stderr, "error: dev/bench_matmul needs OpenBLAS (libopenblas-openmp-dev)\n"); return 1; }
#else
static float* random_floats(size_t n, uint64_t* rng) {
    float* x = (float*)mallocCheck(n * sizeof(float));
    normal_fill(x, n, 1.0f, rng);
    return x;
}

int main(int argc, char** argv) {
    if (argc < 5) { fprintf(stderr, "usage: %s L C B T [reps]\n", argv[0]); return 1; }
    int L = atoi(argv[1]), C = atoi(argv[2]), N = atoi(argv[3]) * atoi(argv[4]);
    int reps = argc > 5 ? atoi(argv[5]) : 5;
    if (L < 1 || C < 1 || C > 8192 || N < 1 || N > 65536 || reps < 1) { fprintf(stderr, "error: bad L, C, B*T or reps\n"); return 1; }
    int Vp = 50304;
    // the linear layers of one step: (in, out, has bias, how many per step)
    struct { const char* name; int C, OC, bias, count; } layers[] = {
        {"qkv", C, 3 * C, 1, L}, {"attproj", C, C, 1, L}, {"fc", C, 4 * C, 1, L},
        {"fcproj", 4 * C, C, 1, L}, {"lm_head", C, Vp, 0, 1},
    };
    int nl = sizeof(layers) / sizeof(layers[0]);
    uint64_t rng = 1337;
    double total_flops = 0.0, total_trainer = 0.0, total_sgemm = 0.0;
    printf("%-8s %6s %6s %6s %12s %12s %8s\n", "layer", "N", "in", "out", "trainer GF/s", "sgemm GF/s", "ratio");
    for (int l = 0; l < nl; l++) {
        int Cin = layers[l].C, OC = layers[l].OC;
        float* inp = random_floats((size_t)N * Cin, &rng);
        float* weight = random_floats((size_t)OC * Cin, &rng);
        float* bias = layers[l].bias ? random_floats(OC, &rng) : NULL;
        float* dout = random_floats((size_t)N * OC, &rng);
        float* out = (float*)callocCheck((size_t)N * OC, sizeof(float));
        float* dinp = (float*)callocCheck((size_t)N * Cin, sizeof(float));
        float* dweight = (float*)callocCheck((size_t)OC * Cin, sizeof(float));
        float* dbias = layers[l].bias ? (float*)callocCheck(OC, sizeof(float)) : NULL;
        double flops = 6.0 * N * Cin * OC; // forward 2NCO, backward 4NCO
        double best_trainer = 1e30, best_sgemm = 1e30; // best of reps: the least disturbed run
        for (int r = 0; r <= reps; r++) { // r = 0 warms caches and OpenBLAS's threads
            double t0 = now_seconds();
            matmul_forward(out, inp, weight, bias, N, Cin, OC);
            matmul_backward(dinp, dweight, dbias, dout, inp, weight, N, Cin, OC);
            double t1 = now_seconds();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, Cin, 1.0f, inp, Cin, weight, Cin, 0.0f, out, OC);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, Cin, OC, 1.0f, dout, OC, weight, Cin, 1.0f, dinp, Cin);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, Cin, N, 1.0f, dout, OC, inp, Cin, 1.0f, dweight, Cin);
            double t2 = now_seconds();
            if (r > 0 && t1 - t0 < best_trainer) { best_trainer = t1 - t0; }
            if (r > 0 && t2 - t1 < best_sgemm) { best_sgemm = t2 - t1; }
        }
        printf("%-8s %6d %6d %6d %12.1f %12.1f %8.2f\n", layers[l].name, N, Cin, OC,
               flops / best_trainer / 1e9, flops / best_sgemm / 1e9, best_sgemm / best_trainer);
        total_flops += flops * layers[l].count;
        total_trainer += best_trainer * layers[l].count;
        total_sgemm += best_sgemm * layers[l].count;
        free(inp); free(weight); free(bias); free(dout); free(out); free(dinp); free(dweight); free(dbias);
    }
    printf("%-8s %27s %12.1f %12.1f %8.2f\n", "step", "", total_flops / total_trainer / 1e9, total_flops / total_sgemm / 1e9,
           total_sgemm / total_trainer);
    printf("total %.3f GFLOP trainer %.2f ms sgemm %.2f ms\n", total_flops / 1e9, total_trainer * 1e3, total_sgemm * 1e3);
    return 0;
}
#endif

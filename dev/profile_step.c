/*
Where one training step of the CPU trainer spends its time, phase by phase: forward, backward,
the gradient norm and AdamW (which zeroes the gradients for the next step), timed on random
tokens after a warm-up step (the first step pays for first-touch page faults and AdamW's moments). For the kernels inside the
forward and backward, run the trainer under perf (README, "Benchmark").
Usage: dev/profile_step descriptor B T [E K [steps]]   (e.g. d6 4 64 for dense, d6 4 64 8 1)
*/
#define TESTING
#include "../train_gpt2_moe.c"

int main(int argc, char** argv) {
    if (argc < 4 || argc == 5) { fprintf(stderr, "usage: %s descriptor B T [E K [steps]]\n", argv[0]); return 1; }
    GPT2Config c;
    if (gpt2_config_from_descriptor(&c, argv[1]) != 0) { fail_exit("%s is not a descriptor (d4, d6, d12, ...)", argv[1]); }
    int B = atoi(argv[2]), T = atoi(argv[3]);
    if (argc > 5 && atoi(argv[4]) > 1) { // MoE in every layer, dropless, GPT-2's MLP size per expert
        c.num_experts = atoi(argv[4]);
        c.top_k = atoi(argv[5]);
        c.moe_every = 1;
        c.expert_hidden = 4 * c.channels;
    }
    int steps = argc > 6 ? atoi(argv[6]) : 5;
    char err[256];
    if (gpt2_config_check(&c, err, sizeof(err)) != 0) { fail_exit("config: %s", err); }
    if (B < 1 || T < 1 || T > c.max_seq_len || (size_t)B * T > 65536 || steps < 1) { fail_exit("bad B, T or steps"); }
    GPT2 model;
    gpt2_build(&model, &c, NULL, comm_self());
    gpt2_init_random(&model, 1337);
    int* tokens = (int*)mallocCheck((size_t)(B * T + 1) * sizeof(int));
    uint64_t rng = 42;
    for (int i = 0; i <= B * T; i++) { tokens[i] = random_u32(&rng) % c.vocab_size; }

    const char* names[] = {"forward", "backward", "grad_norm", "adamw"}; // in step order
    double total[4] = {0};
    for (int step = 0; step <= steps; step++) { // step 0 warms up and is not counted
        double t[5];
        t[0] = now_seconds();
        gpt2_forward(&model, tokens, tokens + 1, B, T);
        t[1] = now_seconds();
        gpt2_backward(&model, 1.0f);
        t[2] = now_seconds();
        float norm = gpt2_grad_norm(&model);
        t[3] = now_seconds();
        gpt2_update(&model, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, grad_clip_scale(norm, 1.0f), step + 1);
        t[4] = now_seconds();
        for (int i = 0; step > 0 && i < 4; i++) { total[i] += t[i + 1] - t[i]; }
    }
    double sum = 0.0;
    for (int i = 0; i < 4; i++) { sum += total[i]; }
    printf("%s B=%d T=%d E=%d K=%d, %zu parameters, %d steps after a warm-up, %d threads\n", argv[1], B, T,
           c.num_experts > 1 ? c.num_experts : 1, c.num_experts > 1 ? c.top_k : 1, model.num_parameters, steps,
#ifdef OMP
           omp_get_max_threads()
#else
           1
#endif
    );
    for (int i = 0; i < 4; i++) { printf("%-10s %8.1f ms %5.1f%%\n", names[i], total[i] / steps * 1e3, 100.0 * total[i] / sum); }
    printf("%-10s %8.1f ms\n", "step", sum / steps * 1e3);
    free(tokens);
    gpt2_free(&model);
    return 0;
}

/*
Where LSH compression's cost enters training (README, "Gutenberg study"): the gradient one step of
LSH-MoE computes, against the exact gradient of the same weights on the same tokens, tensor by
tensor. For each of the study's three rates it draws several hash projections per batch (the
trainer draws new ones every step) and splits the difference d = g_lsh - g_exact into
  error:  one draw's |d|, what one step sees;
  bias:   |mean of d over draws|, the part no redrawing of the hash removes;
  shared: |mean of d over draws and batches|, the part common to every batch, which steps do not
          average out (bias and shared are estimated free of the finite number of draws and batches);
and, as the scale the optimizer already lives with, the exact gradient's batch-to-batch noise.
All relative to the exact gradient's norm (per batch, averaged). The study's settings: V=2
simulated sources, capacity 1.25, residual compensation; B=32 T=128 unless given.
Usage: dev/lsh_grad_error checkpoint val_tokens [batches [draws [B T]]]
*/
#define TESTING
#include "../train_gpt2_moe.c"

// the study's rates (scripts/run_gutenberg.sh): L hashes of d' dimensions
static const struct { const char* name; int L, dp; } rates[] = {{"lsh10", 1, 26}, {"lsh20", 2, 8}, {"lsh30", 2, 26}};
#define NUM_RATES 3

// a model of config around a copy of params, LSH of L hashes of dp dimensions (L = 0: exact)
static void build(GPT2* model, const GPT2Config* c, const float* params, size_t n, int L, int dp) {
    float* copy = (float*)mallocCheck(n * sizeof(float));
    memcpy(copy, params, n * sizeof(float));
    gpt2_build(model, c, copy, comm_self());
    model->capacity_factor = 1.25f;
    LSHConfig lsh = {L, dp, 1, 1.0f};
    char err[256];
    if (gpt2_set_lsh(model, lsh, 2, 1337, err, sizeof(err)) != 0) { fail_exit("%s", err); }
}

// the gradient of model's loss on one batch, into out (all parameters)
static void gradient(float* out, GPT2* model, const int* inputs, const int* targets, int B, int T, int step) {
    model->step = step; // LSH draws its projections per (layer, step)
    gpt2_zero_grad(model);
    gpt2_forward(model, inputs, targets, B, T);
    gpt2_backward(model, 1.0f);
    memcpy(out, model->grads_memory, model->num_parameters * sizeof(float));
}

// per tensor k: sum of (a - b)^2 (b NULL: of a^2) into acc[k]
static void add_sq(double* acc, const float* a, const float* b, const size_t* sizes) {
    size_t off = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        double s = 0.0;
        for (size_t i = off; i < off + sizes[k]; i++) {
            double d = (double)a[i] - (b != NULL ? b[i] : 0.0f);
            s += d * d;
        }
        acc[k] += s;
        off += sizes[k];
    }
}

int main(int argc, char** argv) {
    if (argc < 3 || argc == 6 || argc > 7) { fprintf(stderr, "usage: %s checkpoint val_tokens [batches [draws [B T]]]\n", argv[0]); return 1; }
    int batches = argc > 3 ? atoi(argv[3]) : 4, draws = argc > 4 ? atoi(argv[4]) : 4;
    int B = argc > 6 ? atoi(argv[5]) : 32, T = argc > 6 ? atoi(argv[6]) : 128;
    if (batches < 2 || batches > 64 || draws < 2 || draws > 64) { fail_exit("batches and draws must be in [2, 64] (noise and bias need two of each)"); }
    if (B < 1 || T < 1 || (size_t)B * T > 65536) { fail_exit("bad B or T"); }
    GPT2Config c;
    float* params;
    char err[1024];
    if (checkpoint_load(argv[1], NULL, 0.0f, 0, 0, 1, &c, &params, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    if (c.num_experts <= 1) { fail_exit("%s: not an MoE checkpoint", argv[1]); }
    if (T > c.max_seq_len) { fail_exit("T=%d is longer than %s's %d positions", T, argv[1], c.max_seq_len); }
    DataLoader val;
    if (dataloader_check_pattern(argv[2], (size_t)B * T + 1, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    dataloader_init(&val, argv[2], B, T, 0, 1, 0, 1337, c.vocab_size);

    // the exact gradients of every batch first, then one LSH model at a time (each holds ~2 GB of
    // activations at this size)
    size_t sizes[NUM_PARAMETER_TENSORS], BT = (size_t)B * T;
    fill_in_parameter_sizes(sizes, &c, experts_per_rank(&c, 1));
    size_t n = count_parameters(sizes);
    int* tokens = (int*)mallocCheck(batches * 2 * BT * sizeof(int)); // (batches, 2, B*T): inputs, targets
    float* g = (float*)mallocCheck(batches * n * sizeof(float));     // (batches, n): exact gradients
    float* gd = (float*)mallocCheck(n * sizeof(float));              // one draw's
    float* mean = (float*)mallocCheck(n * sizeof(float));            // d's mean over draws
    float* shared = (float*)mallocCheck(n * sizeof(float));          // d's mean over draws and batches
    double norm[NUM_PARAMETER_TENSORS] = {0}, noise[NUM_PARAMETER_TENSORS] = {0};
    double one[NUM_RATES][NUM_PARAMETER_TENSORS] = {{0}}, avg[NUM_RATES][NUM_PARAMETER_TENSORS] = {{0}};
    double all[NUM_RATES][NUM_PARAMETER_TENSORS] = {{0}};
    GPT2 model;
    build(&model, &c, params, n, 0, 0);
    for (int b = 0; b < batches; b++) {
        dataloader_next_batch(&val);
        memcpy(tokens + (2 * b) * BT, val.inputs, BT * sizeof(int));
        memcpy(tokens + (2 * b + 1) * BT, val.targets, BT * sizeof(int));
        gradient(g + b * n, &model, tokens + 2 * b * BT, tokens + (2 * b + 1) * BT, B, T, 0);
        add_sq(norm, g + b * n, NULL, sizes);
        if (b > 0) { add_sq(noise, g + b * n, g + (b - 1) * n, sizes); }
    }
    gpt2_free(&model);
    for (int r = 0; r < NUM_RATES; r++) {
        build(&model, &c, params, n, rates[r].L, rates[r].dp);
        memset(shared, 0, n * sizeof(float));
        for (int b = 0; b < batches; b++) {
            memset(mean, 0, n * sizeof(float));
            for (int d = 0; d < draws; d++) {
                gradient(gd, &model, tokens + 2 * b * BT, tokens + (2 * b + 1) * BT, B, T, 1000 * b + d);
                add_sq(one[r], gd, g + b * n, sizes);
                for (size_t i = 0; i < n; i++) { mean[i] += (gd[i] - g[b * n + i]) / draws; }
            }
            add_sq(avg[r], mean, NULL, sizes);
            for (size_t i = 0; i < n; i++) { shared[i] += mean[i] / batches; }
        }
        add_sq(all[r], shared, NULL, sizes);
        gpt2_free(&model);
        fprintf(stderr, "%s done\n", rates[r].name);
    }

    // with draws D and batches N: E|d|^2 = bias^2 + var, E|mean over draws|^2 = bias^2 + var / D, so
    // bias^2 = (D E|mean|^2 - E|d|^2) / (D - 1); the same across batches gives shared^2
    printf("%s, %d val batches of %dx%d, %d hash draws each; relative to |exact gradient|\n", argv[1], batches, B, T, draws);
    printf("%-9s %6s", "tensor", "noise");
    for (int r = 0; r < NUM_RATES; r++) { printf(" | %-6s %6s %6s", rates[r].name, "bias", "shared"); }
    printf("\n");
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        if (sizes[k] == 0 || norm[k] == 0.0) { continue; }
        double nb = norm[k] / batches;
        printf("%-9s %6.3f", param_names[k], sqrt(noise[k] / (batches - 1) / 2.0 / nb)); // E|g1 - g2|^2 = 2 var
        for (int r = 0; r < NUM_RATES; r++) {
            double e1 = one[r][k] / (batches * draws), ea = avg[r][k] / batches;
            double bias2 = (draws * ea - e1) / (draws - 1);
            double shared2 = (batches * all[r][k] - ea) / (batches - 1);
            printf(" | %6.3f %6.3f %6.3f", sqrt(e1 / nb), sqrt(fmax(bias2, 0.0) / nb), sqrt(fmax(shared2, 0.0) / nb));
        }
        printf("\n");
    }
    printf("noise: one batch's exact gradient against the mean over batches; lshNN: one draw's error;\n"
           "bias: the part every draw shares; shared: the part every batch shares too (steps keep it)\n");
    free(tokens);
    free(g);
    free(gd);
    free(mean);
    free(shared);
    free(params);
    dataloader_free(&val);
    return 0;
}

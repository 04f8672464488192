// libFuzzer target: model checkpoints (model.h). Any bytes through checkpoint_load: as a single
// process, and as rank 1 of 2 upcycling a dense file into 2 experts. Every load that succeeds must
// give finite parameters. Run by dev/fuzz/run.sh.
#include "model.h"
#include "fuzz.h"

static void load(const char* path, const GPT2Config* upcycle, int rank, int W) {
    GPT2Config c;
    float* params;
    char err[2048];
    if (checkpoint_load(path, upcycle, 0.01f, 3, rank, W, &c, &params, err, sizeof(err)) != 0) { return; }
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_in_parameter_sizes(sizes, &c, experts_per_rank(&c, W));
    size_t n = count_parameters(sizes);
    if (first_nonfinite(params, n) < n) { abort(); }
    free(params);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const char* path = fuzz_file(0, "model.bin", data, size);
    load(path, NULL, 0, 1);
    GPT2Config up = {0};
    up.num_experts = 2; up.top_k = 1; up.moe_every = 1; up.renorm_gates = 1;
    load(path, &up, 1, 2);
    return 0;
}

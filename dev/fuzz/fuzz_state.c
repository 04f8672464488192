// libFuzzer target: training-state files (model.h's state_read). Any bytes, read for a model of
// 16 parameters and for the parameter count the file size implies; a state that is accepted must
// have a non-negative step and position, a non-zero RNG and finite moments with v >= 0.
// Run by dev/fuzz/run.sh.
#include "model.h"
#include "fuzz.h"

static void read_state(const char* path, size_t n) {
    float* m = (float*)malloc((n + 1) * sizeof(float));
    float* v = (float*)malloc((n + 1) * sizeof(float));
    TrainState s;
    char err[2048];
    if (state_read(path, &s, 7, 0, 1, m, v, n, err, sizeof(err)) == 0) {
        if (s.step != 7 || s.data.epoch < 0 || s.data.shard_idx < 0 || s.data.sample_idx < 0 || s.rng == 0) { abort(); }
        for (size_t i = 0; i < n; i++) { if (!isfinite(m[i]) || !isfinite(v[i]) || v[i] < 0.0f) { abort(); } }
    }
    free(m);
    free(v);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const char* path = fuzz_file(0, "state_00000007_00000.bin", data, size);
    read_state(path, 16);
    if (size >= 1064) { read_state(path, (size - 1064) / 8); } // header + five int64, then m and v
    return 0;
}

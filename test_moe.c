/*
CPU test suite of llm.moe (llm.c's pattern: #define TESTING, include the trainer).

Compiled three times by the Makefile:
  test_moe      fp32, the trainer as it runs: against the PyTorch debug states written by
                dev/reference/moe_reference.py (logits, losses, every gradient, 10 AdamW steps),
                E=1 vs the dense MLP, checkpoints, training state, tokenizer, bad input
  test_moe_f64  the same trainer source with float -> double (-DTEST_F64), for finite-difference
                checks of the MoE layer's backward that resolve to ~1e-8 rather than float noise
  test_moe_mpi  with MPI (-DTEST_MPI), run under mpirun by dev/test_mpi.sh: W ranks against one
dataloader.h and lshmoe.h have test programs of their own (dev/test_dataloader.c, dev/test_lshmoe.c).
Each check prints one line: ok/FAIL, name, measured error and bound. Ends with
"N passed, N failed" and a non-zero exit on any failure.
*/
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <stdarg.h>
#include <string.h>
#include <math.h>
#include <time.h>
#include <limits.h>
#include <assert.h>
#include <dirent.h>
#include <unistd.h>
#include <sys/stat.h>
#include <ctype.h>
#include <glob.h>
#include <errno.h>
#include <stddef.h>
#include <signal.h>
#include <sys/resource.h>

#ifdef TEST_F64
// the whole trainer in double: every float becomes a double and the float maths calls become
// their double versions (system headers are already included above, so they are untouched)
#define float double
#define sqrtf sqrt
#define expf exp
#define logf log
#define tanhf tanh
#define coshf cosh
#define cosf cos
#define powf pow
#define strtof strtod
#endif

#define TESTING
#include "train_gpt2_moe.c"
#include "dev/testing.h" // check, test_summary, max_abs_diff, run_in_child, check_exits

// one AdamW step as the trainer's main makes it: the global norm, clipping, the update
static inline void adamw_step(GPT2* model, float lr, float beta1, float beta2, float eps, float wd, float clip, int t) {
    gpt2_update(model, lr, beta1, beta2, eps, wd, grad_clip_scale(gpt2_grad_norm(model), clip), t);
}

static char tmpdir[256];
static Comm solo; // a world of one process

static void make_tmpdir(void) {
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/test_moe_XXXXXX");
    if (mkdtemp(tmpdir) == NULL) { fail_exit("mkdtemp failed"); }
}

#ifndef TEST_F64
// ----------------------------------------------------------------------------
// against the PyTorch reference (dev/reference/moe_reference.py)

static void write_bytes(const char* path, const void* data, size_t n) {
    FILE* fp = fopenCheck(path, "wb");
    if (n > 0) { fwriteCheck(data, 1, n, fp); }
    fcloseCheck(fp);
}

static float header_float(const int* header, int i) { float f; memcpy(&f, &header[i], sizeof(float)); return f; }

static void test_reference(const char* name) {
    char model_path[512], debug_path[512], err[1024];
    snprintf(model_path, sizeof(model_path), "dev/reference/states/%s_model.bin", name);
    snprintf(debug_path, sizeof(debug_path), "dev/reference/states/%s_debug.bin", name);
    char tname[128];
    GPT2 model;
    int rc = gpt2_load_checkpoint(&model, model_path, NULL, 0.0f, 0, solo, err, sizeof(err));
    snprintf(tname, sizeof(tname), "reference/%s/load", name);
    check(rc == 0, tname, "%s", rc == 0 ? model_path : err);
    if (rc != 0) { return; }
    FILE* fp = fopenCheck(debug_path, "rb");
    int header[256];
    if (fread(header, sizeof(int), 256, fp) != 256 || header[0] != 20241112 || header[1] != 1) { fail_exit("%s: bad debug state header", debug_path); }
    int B = header[2], T = header[3], nsteps = header[4], V = header[5], N = B * T;
    int ref_dropped = header[8];
    model.capacity_factor = header_float(header, 16);
    model.aux_loss_weight = header_float(header, 17);
    model.z_loss_weight = header_float(header, 18);
    if (header[9] > 0) { // an LSH config: [9..14] L, d', centring, compensation, sources, seed
        LSHConfig lsh = {header[9], header[10], header[11], header[12]};
        if (gpt2_set_lsh(&model, lsh, header[13], (uint64_t)header[14], err, sizeof(err)) != 0) { fail_exit("%s: %s", debug_path, err); }
    }
    model.step = 0;
    float lr = header_float(header, 19), beta1 = header_float(header, 20), beta2 = header_float(header, 21);
    float eps = header_float(header, 22), wd = header_float(header, 23), clip = header_float(header, 24);
    int* x = (int*)mallocCheck(N * sizeof(int));
    int* y = (int*)mallocCheck(N * sizeof(int));
    float* logits = (float*)mallocCheck((size_t)N * V * sizeof(float));
    float losses[4];
    float* grads = (float*)mallocCheck(model.num_parameters * sizeof(float));
    float* step_losses = (float*)mallocCheck(nsteps * 2 * sizeof(float));
    if (fread(x, sizeof(int), N, fp) != (size_t)N || fread(y, sizeof(int), N, fp) != (size_t)N ||
        fread(logits, sizeof(float), (size_t)N * V, fp) != (size_t)N * V || fread(losses, sizeof(float), 4, fp) != 4 ||
        fread(grads, sizeof(float), model.num_parameters, fp) != model.num_parameters ||
        fread(step_losses, sizeof(float), nsteps * 2, fp) != (size_t)nsteps * 2 || fgetc(fp) != EOF) {
        fail_exit("%s: wrong size for this model", debug_path);
    }
    fclose(fp);

    gpt2_forward(&model, x, y, B, T);
    // logits: fp32 sums of C=16..96 terms in another order; |logit| ~ 1, so 1e-5 is ~100 ulp
    double logit_err = 0.0;
    for (int i = 0; i < N; i++) {
        double e = max_abs_diff(model.acts.logits + (size_t)i * model.config.padded_vocab_size, logits + (size_t)i * V, V);
        if (e > logit_err) { logit_err = e; }
    }
    snprintf(tname, sizeof(tname), "reference/%s/logits", name);
    check(logit_err < 1e-5, tname, "max abs err %.2e (bound 1e-5)", logit_err);
    snprintf(tname, sizeof(tname), "reference/%s/losses", name);
    double loss_err = fmax(fmax(fabs(model.mean_loss - losses[0]), fabs(model.lb_loss - losses[1])),
                           fmax(fabs(model.z_loss - losses[2]), fabs(model.total_loss - losses[3])));
    check(loss_err < 1e-5, tname, "ce %.6f lb %.6f z %.6f total %.6f, max abs err %.2e (bound 1e-5)",
          model.mean_loss, model.lb_loss, model.z_loss, model.total_loss, loss_err);
    snprintf(tname, sizeof(tname), "reference/%s/dropped", name);
    check(model.stats.dropped_slots == ref_dropped, tname, "%lld dropped slots (reference %d)", model.stats.dropped_slots, ref_dropped);
    if (header[9] > 0) { // the same buckets: same projections, hashes and keys
        snprintf(tname, sizeof(tname), "reference/%s/lsh_centroids", name);
        check(model.stats.lsh.rows == header[25] && model.stats.lsh.centroids == header[15], tname,
              "%lld centroids for %lld rows (reference %d for %d)", model.stats.lsh.centroids, model.stats.lsh.rows, header[15], header[25]);
    }

    // gradients: per tensor, error relative to the tensor's largest entry; fp32 accumulations
    // over N=16 tokens through up to 3 layers give ~1e-6, so 1e-4 leaves margin without hiding
    // a wrong formula (those show up as O(1) relative errors)
    gpt2_zero_grad(&model);
    gpt2_backward(&model, 1.0f);
    size_t off = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = model.param_sizes[k];
        if (n > 0) {
            double e = max_abs_diff(model.grads_memory + off, grads + off, n);
            double scale = max_abs(grads + off, n);
            snprintf(tname, sizeof(tname), "reference/%s/grad/%s", name, param_names[k]);
            check(e <= 1e-4 * fmax(scale, 1e-3), tname, "max abs err %.2e, max |grad| %.2e (bound 1e-4 relative)", e, scale);
        }
        off += n;
    }

    // 10 AdamW steps on the same batch; losses drift apart only through fp32 rounding
    double step_err = 0.0;
    for (int s = 0; s < nsteps; s++) {
        model.step = s; // LSH projections are drawn per step
        gpt2_forward(&model, x, y, B, T);
        double e = fmax(fabs(model.mean_loss - step_losses[2 * s]), fabs(model.total_loss - step_losses[2 * s + 1]));
        if (e > step_err) { step_err = e; }
        gpt2_zero_grad(&model);
        gpt2_backward(&model, 1.0f);
        adamw_step(&model, lr, beta1, beta2, eps, wd, clip, s + 1);
    }
    snprintf(tname, sizeof(tname), "reference/%s/adamw_10_steps", name);
    check(step_err < 1e-4, tname, "step %d ce %.6f (ref %.6f), max abs err %.2e (bound 1e-4)",
          nsteps, step_losses[2 * (nsteps - 1)], step_losses[2 * (nsteps - 1)], step_err);
    free(x); free(y); free(logits); free(grads); free(step_losses);
    gpt2_free(&model);
}
#endif

// ----------------------------------------------------------------------------
// small models built in memory

static GPT2Config tiny_config(int E, int K, int moe_every, int L) {
    GPT2Config c = {0};
    c.max_seq_len = 16; c.vocab_size = 100; c.padded_vocab_size = 128;
    c.num_layers = L; c.num_heads = 2; c.channels = 16;
    c.num_experts = E; c.top_k = K; c.moe_every = moe_every; c.expert_hidden = 24; c.renorm_gates = 1;
    return c;
}

static void random_model(GPT2* model, const GPT2Config* c, uint64_t seed) {
    gpt2_build(model, c, NULL, solo);
    uint64_t rng = seed;
    normal_fill(model->params_memory, model->num_parameters, 0.1f, &rng);
    // routers with larger weights, so that gates are far from uniform
    normal_fill(model->params.routerw, model->param_sizes[PARAM_ROUTERW], 0.5f, &rng);
    for (size_t i = 0; i < model->param_sizes[PARAM_LN1W]; i++) { model->params.ln1w[i] += 1.0f; model->params.ln2w[i] += 1.0f; }
}

static void random_tokens(int* out, int n, int V, uint64_t seed) {
    uint64_t rng = seed;
    for (int i = 0; i < n; i++) { out[i] = random_u32(&rng) % V; }
}

#ifdef TEST_F64
// ----------------------------------------------------------------------------
// finite differences, in double precision, of the total loss of a small MoE model with respect
// to the parameters of the MoE layer and of the layer before it. The routing (top-k choice and
// capacity) is piecewise constant: a perturbation of 1e-6 does not flip it, which each check
// verifies by comparing the routing before and after.

static double loss_at(GPT2* model, const int* x, const int* y, int B, int T) {
    gpt2_forward(model, x, y, B, T);
    return model->total_loss;
}

static void fd_check_model_lsh(const char* name, GPT2Config c, float capacity_factor, float aux_w, float z_w, LSHConfig lsh, int sources) {
    GPT2 model;
    random_model(&model, &c, 42);
    model.capacity_factor = capacity_factor;
    model.aux_loss_weight = aux_w;
    model.z_loss_weight = z_w;
    char err[256];
    if (gpt2_set_lsh(&model, lsh, sources, 7, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    int B = 2, T = 8, N = B * T;
    int x[16], y[16];
    random_tokens(x, N, c.vocab_size, 1);
    random_tokens(y, N, c.vocab_size, 2);
    gpt2_forward(&model, x, y, B, T);
    int dropped = model.stats.dropped_slots;
    // the routing and the LSH buckets are piecewise constant: a perturbation must not move them
    size_t S = (size_t)N * c.top_k * num_moe_layers(&c);
    int* routing0 = (int*)mallocCheck(S * 3 * sizeof(int));
    memcpy(routing0, model.routing.expert_idx, S * sizeof(int));
    memcpy(routing0 + S, model.routing.slot_row, S * sizeof(int));
    if (lsh.L > 0) { memcpy(routing0 + 2 * S, model.routing.bucket_of_row, S * sizeof(int)); }
    long long rows = model.stats.lsh.rows, cents = model.stats.lsh.centroids;
    gpt2_zero_grad(&model);
    gpt2_backward(&model, 1.0f);
    char tname[160];
    // the MoE tensors, plus ln2 (upstream of the router and the experts) and qkvw (further up)
    int tensors[] = {PARAM_ROUTERW, PARAM_EXPFCW, PARAM_EXPFCB, PARAM_EXPPROJW, PARAM_EXPPROJB, PARAM_LN2W, PARAM_LN2B, PARAM_QKVW};
    uint64_t rng = 7;
    for (int ti = 0; ti < 8; ti++) {
        int k = tensors[ti];
        size_t off = 0;
        for (int j = 0; j < k; j++) { off += model.param_sizes[j]; }
        double worst = 0.0, worst_abs = 0.0;
        int flipped = 0;
        for (int trial = 0; trial < 6; trial++) {
            size_t i = off + random_u32(&rng) % model.param_sizes[k];
            double h = 1e-5, old = model.params_memory[i];
            model.params_memory[i] = old + h;
            double lp = loss_at(&model, x, y, B, T);
            flipped |= memcmp(routing0, model.routing.expert_idx, S * sizeof(int)) != 0 || memcmp(routing0 + S, model.routing.slot_row, S * sizeof(int)) != 0;
            if (lsh.L > 0) { flipped |= memcmp(routing0 + 2 * S, model.routing.bucket_of_row, S * sizeof(int)) != 0; }
            model.params_memory[i] = old - h;
            double lm = loss_at(&model, x, y, B, T);
            flipped |= memcmp(routing0, model.routing.expert_idx, S * sizeof(int)) != 0 || memcmp(routing0 + S, model.routing.slot_row, S * sizeof(int)) != 0;
            if (lsh.L > 0) { flipped |= memcmp(routing0 + 2 * S, model.routing.bucket_of_row, S * sizeof(int)) != 0; }
            model.params_memory[i] = old;
            double fd = (lp - lm) / (2 * h);
            double an = model.grads_memory[i];
            // relative error, with a floor for entries whose gradient is tiny: there the loss's
            // own rounding (~2e-15 of a loss ~5) over 2h = 2e-5 limits differences to ~1e-10
            double rel = fabs(fd - an) / fmax(fabs(an), 1e-3);
            if (rel > worst) { worst = rel; }
            if (fabs(fd - an) > worst_abs) { worst_abs = fabs(fd - an); }
        }
        // central differences with h=1e-5 in double: truncation ~h^2 = 1e-10, rounding ~1e-10, so
        // 1e-6 relative (1e-9 absolute at the floor) is 10x above the noise
        snprintf(tname, sizeof(tname), "fd64/%s/%s", name, param_names[k]);
        check(worst < 1e-6 && !flipped, tname, "max rel err %.2e (abs %.1e) over 6 entries (bound 1e-6)%s", worst, worst_abs, flipped ? ", ROUTING FLIPPED" : "");
    }
    // the input side: d loss / d (embedding of a token) covers every path into the MoE layer
    snprintf(tname, sizeof(tname), "fd64/%s/dropped_slots", name);
    check(capacity_factor <= 0 ? dropped == 0 : dropped > 0, tname, "%d slots dropped", dropped);
    if (lsh.L > 0) { // the check is only meaningful if buckets really merged rows
        snprintf(tname, sizeof(tname), "fd64/%s/lsh_compresses", name);
        check(cents < rows, tname, "%lld centroids for %lld rows in the first forward", cents, rows);
    }
    free(routing0);
    gpt2_free(&model);
}

static void fd_check_model(const char* name, GPT2Config c, float capacity_factor, float aux_w, float z_w) {
    LSHConfig off = {0, 0, 0, 0};
    fd_check_model_lsh(name, c, capacity_factor, aux_w, z_w, off, 1);
}

static void test_finite_differences(void) {
    // router + experts + gates (renormalised, K=2), aux and z-losses on, dropless
    fd_check_model("dropless_k2", tiny_config(4, 2, 1, 2), 0.0f, 0.01f, 0.001f);
    // capacity dropping, with a dense layer before the MoE layer
    fd_check_model("capacity_k2", tiny_config(4, 2, 2, 2), 0.5f, 0.01f, 0.001f);
    // K=1: the gate is the raw probability (no renormalisation); large aux and z weights so their
    // gradients are not hidden under the cross-entropy's
    fd_check_model("top1_aux_heavy", tiny_config(4, 1, 1, 2), 0.0f, 1.0f, 0.5f);
    GPT2Config c = tiny_config(4, 2, 1, 2);
    c.renorm_gates = 0;
    fd_check_model("k2_no_renorm", c, 1.0f, 0.01f, 0.001f);
    // LSH with the buckets frozen (the exact backward of DESIGN.md), 2 simulated source ranks
    LSHConfig comp = {1, 2, 1, 1}, plain = {2, 2, 0, 0};
    fd_check_model_lsh("lsh_compensated", tiny_config(4, 2, 1, 2), 0.0f, 0.01f, 0.001f, comp, 2);
    fd_check_model_lsh("lsh_no_compensation", tiny_config(4, 2, 1, 2), 1.0f, 0.01f, 0.001f, plain, 2);
    LSHConfig half = {1, 2, 1, 0.5f}; // the scaled residual (-C 0.5)
    fd_check_model_lsh("lsh_half_compensation", tiny_config(4, 2, 1, 2), 0.0f, 0.01f, 0.001f, half, 2);
}
#endif

// ----------------------------------------------------------------------------
// E=1, K=1: the MoE layer is the dense MLP, bit for bit (forward and backward). The z-loss is a
// real gradient even for one expert (lse = the single logit), so it is off here.

static void test_single_expert_is_dense(void) {
    int N = 24, C = 16, H = 64;
    uint64_t rng = 3;
    float* x = (float*)mallocCheck(N * C * sizeof(float));
    float* w1 = (float*)mallocCheck(H * C * sizeof(float));
    float* b1 = (float*)mallocCheck(H * sizeof(float));
    float* w2 = (float*)mallocCheck(C * H * sizeof(float));
    float* b2 = (float*)mallocCheck(C * sizeof(float));
    float* wr = (float*)mallocCheck(C * sizeof(float));
    float* dout = (float*)mallocCheck(N * C * sizeof(float));
    normal_fill(x, N * C, 1.0f, &rng); normal_fill(w1, H * C, 0.2f, &rng); normal_fill(b1, H, 0.1f, &rng);
    normal_fill(w2, C * H, 0.2f, &rng); normal_fill(b2, C, 0.1f, &rng); normal_fill(wr, C, 0.5f, &rng);
    normal_fill(dout, N * C, 1.0f, &rng);
    // dense
    float* h = (float*)callocCheck(N * H, sizeof(float));
    float* hg = (float*)callocCheck(N * H, sizeof(float));
    float* y_dense = (float*)callocCheck(N * C, sizeof(float));
    matmul_forward(h, x, w1, b1, N, C, H);
    gelu_forward(hg, h, N * H);
    matmul_forward(y_dense, hg, w2, b2, N, H, C);
    float* dhg = (float*)callocCheck(N * H, sizeof(float));
    float* dh = (float*)callocCheck(N * H, sizeof(float));
    float* dx_dense = (float*)callocCheck(N * C, sizeof(float));
    float* dw1_d = (float*)callocCheck(H * C, sizeof(float));
    float* db1_d = (float*)callocCheck(H, sizeof(float));
    float* dw2_d = (float*)callocCheck(C * H, sizeof(float));
    float* db2_d = (float*)callocCheck(C, sizeof(float));
    matmul_backward(dhg, dw2_d, db2_d, dout, hg, w2, N, H, C);
    gelu_backward(dh, h, dhg, N * H);
    matmul_backward(dx_dense, dw1_d, db1_d, dh, x, w1, N, C, H);
    // MoE with one expert holding the same weights
    float logits[24], probs[24], gates[24], lb, z;
    int idx[24], counts[1], slot_row[24], row_slot[24], offsets[2];
    float* expin = (float*)callocCheck(N * C, sizeof(float));
    float* exph = (float*)callocCheck(N * H, sizeof(float));
    float* exphg = (float*)callocCheck(N * H, sizeof(float));
    float* expout = (float*)callocCheck(N * C, sizeof(float));
    float* y_moe = (float*)callocCheck(N * C, sizeof(float));
    moe_router_forward(logits, probs, idx, gates, counts, &z, x, wr, N, C, 1, 1, 1);
    lb = moe_load_balance_forward(probs, counts, N, N, 1);
    int kept[1], fill[1];
    long long dropped = moe_capacity_plan(kept, counts, 1, 1, moe_capacity(0.0f, N, 1, 1));
    moe_dispatch_layout(slot_row, row_slot, offsets, fill, idx, kept, N, 1);
    moe_dispatch_forward(expin, x, row_slot, offsets[1], C, 1);
    moe_experts_forward(exph, exphg, expout, expin, offsets, w1, b1, w2, b2, 1, C, H);
    moe_combine_forward(y_moe, expout, gates, slot_row, N, C, 1);
    check(dropped == 0 && memcmp(y_moe, y_dense, N * C * sizeof(float)) == 0, "single_expert/forward_bitwise",
          "max abs diff %.1e, lb %.3f (must be 1)", max_abs_diff(y_moe, y_dense, N * C), lb);
    float* dexpout = (float*)callocCheck(N * C, sizeof(float));
    float* dexph = (float*)callocCheck(N * H, sizeof(float));
    float* dexphg = (float*)callocCheck(N * H, sizeof(float));
    float* dexpin = (float*)callocCheck(N * C, sizeof(float));
    float* dx_moe = (float*)callocCheck(N * C, sizeof(float));
    float* dw1 = (float*)callocCheck(H * C, sizeof(float));
    float* db1 = (float*)callocCheck(H, sizeof(float));
    float* dw2 = (float*)callocCheck(C * H, sizeof(float));
    float* db2 = (float*)callocCheck(C, sizeof(float));
    float* dwr = (float*)callocCheck(C, sizeof(float));
    float dgates[24] = {0}, dlogits[24], dprobs[24];
    moe_combine_backward(dexpout, dgates, dout, expout, gates, slot_row, N, C, 1);
    moe_experts_backward(dexpin, dexph, dexphg, dw1, db1, dw2, db2, dexpout, expin, exph, exphg, offsets, w1, w2, 1, C, H);
    moe_dispatch_backward(dx_moe, dexpin, row_slot, offsets[1], C, 1);
    moe_router_backward(dx_moe, dwr, dlogits, dprobs, dgates, x, wr, logits, probs, idx, gates, counts, N, 0.01f, 0.0f, N, C, 1, 1, 1);
    int same = memcmp(dx_moe, dx_dense, N * C * sizeof(float)) == 0 && memcmp(dw1, dw1_d, H * C * sizeof(float)) == 0 &&
               memcmp(db1, db1_d, H * sizeof(float)) == 0 && memcmp(dw2, dw2_d, C * H * sizeof(float)) == 0 &&
               memcmp(db2, db2_d, C * sizeof(float)) == 0 && max_abs(dwr, C) == 0.0;
    check(same, "single_expert/backward_bitwise", "dx max abs diff %.1e, |drouterw| %.1e (must be 0)",
          max_abs_diff(dx_moe, dx_dense, N * C), max_abs(dwr, C));
    free(x); free(w1); free(b1); free(w2); free(b2); free(wr); free(dout); free(h); free(hg); free(y_dense);
    free(dhg); free(dh); free(dx_dense); free(dw1_d); free(db1_d); free(dw2_d); free(db2_d);
    free(expin); free(exph); free(exphg); free(expout); free(y_moe);
    free(dexpout); free(dexph); free(dexphg); free(dexpin); free(dx_moe); free(dw1); free(db1); free(dw2); free(db2); free(dwr);
}

// ----------------------------------------------------------------------------
// dispatch layout: stable, capacity keeps the first slots in slot order

static void test_dispatch_layout(void) {
    // 6 tokens, K=2, E=3: expert choices per slot
    int idx[12] = {0, 1, 1, 0, 0, 2, 1, 0, 0, 1, 2, 0};
    int counts[3] = {6, 4, 2}, kept[3], fill[3];
    int slot_row[12], row_slot[12], offsets[4];
    long long dropped = moe_capacity_plan(kept, counts, 1, 3, 3);
    moe_dispatch_layout(slot_row, row_slot, offsets, fill, idx, kept, 12, 3);
    // expert 0 gets slots 0,3,4 (7,8,11 dropped); expert 1 gets 1,2,6 (9 dropped); expert 2 gets 5,10
    int want_rows[12] = {0, 3, 4, 1, 2, 6, 5, -1, -1, -1, 7, -1};
    int ok = dropped == 4 && offsets[0] == 0 && offsets[1] == 3 && offsets[2] == 6 && offsets[3] == 8 &&
             memcmp(slot_row, want_rows, sizeof(want_rows)) == 0;
    for (int r = 0; r < offsets[3]; r++) { ok = ok && slot_row[row_slot[r]] == r; }
    check(ok, "dispatch_layout/capacity_stable", "%lld dropped (want 4), offsets %d %d %d %d", dropped, offsets[0], offsets[1], offsets[2], offsets[3]);
    dropped = moe_capacity_plan(kept, counts, 1, 3, moe_capacity(0.0f, 6, 2, 3));
    moe_dispatch_layout(slot_row, row_slot, offsets, fill, idx, kept, 12, 3);
    check(dropped == 0 && offsets[3] == 12, "dispatch_layout/dropless", "%lld dropped", dropped);
    check(moe_capacity(1.25f, 16, 2, 4) == 10 && moe_capacity(0.5f, 16, 2, 4) == 4, "dispatch_layout/capacity_formula",
          "cap(1.25)=%d (want 10), cap(0.5)=%d (want 4)", moe_capacity(1.25f, 16, 2, 4), moe_capacity(0.5f, 16, 2, 4));
    // three source ranks: an expert keeps its first cap slots in (source rank, slot) order
    int counts3[6] = {2, 3, 4, 1, 3, 2}; // (W=3, E=2)
    int kept3[6];
    dropped = moe_capacity_plan(kept3, counts3, 3, 2, 5);
    int want3[6] = {2, 3, 3, 1, 0, 1};
    check(dropped == 5 && memcmp(kept3, want3, sizeof(want3)) == 0, "dispatch_layout/capacity_by_source_rank",
          "kept %d %d | %d %d | %d %d (want 2 3 | 3 1 | 0 1), %lld dropped (want 5)", kept3[0], kept3[1], kept3[2], kept3[3], kept3[4], kept3[5], dropped);
    // the receiver of expert 1 (rank 1 of W=2 with E=2): rows from ranks 0 and 1, grouped by expert
    int kept2[4] = {2, 3, 1, 2}; // (W=2, E=2)
    int perm[5], eoff[2], recv_rows[2];
    int R = moe_receive_layout(perm, eoff, recv_rows, kept2, 2, 2, 1, 1);
    check(R == 5 && recv_rows[0] == 3 && recv_rows[1] == 2 && eoff[1] == 5 && perm[0] == 0 && perm[3] == 3 && perm[4] == 4,
          "dispatch_layout/receive_layout", "R=%d rows from ranks %d %d", R, recv_rows[0], recv_rows[1]);
}

#ifndef TEST_F64
// ----------------------------------------------------------------------------
// checkpoints and training state

static void test_checkpoints(void) {
    char path[512], err[1024];
    // MoE round trip
    GPT2Config c = tiny_config(4, 2, 2, 3);
    GPT2 a, b;
    random_model(&a, &c, 5);
    snprintf(path, sizeof(path), "%s/moe.bin", tmpdir);
    gpt2_write_checkpoint(&a, path);
    int rc = gpt2_load_checkpoint(&b, path, NULL, 0.0f, 0, solo, err, sizeof(err));
    check(rc == 0 && b.num_parameters == a.num_parameters && memcmp(&b.config, &a.config, sizeof(GPT2Config)) == 0 &&
          memcmp(a.params_memory, b.params_memory, a.num_parameters * sizeof(float)) == 0, "checkpoint/moe_roundtrip", "%s", rc ? err : path);
    char tmp[600];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    check(access(tmp, F_OK) != 0, "checkpoint/no_temporary_left", NULL);
    gpt2_free(&b);
    // dense: llm.c's header exactly
    GPT2Config dc = tiny_config(0, 0, 1, 2);
    GPT2 d;
    random_model(&d, &dc, 6);
    snprintf(path, sizeof(path), "%s/dense.bin", tmpdir);
    gpt2_write_checkpoint(&d, path);
    FILE* fp = fopenCheck(path, "rb");
    int header[256];
    if (fread(header, sizeof(int), 256, fp) != 256) { fail_exit("short read"); }
    fclose(fp);
    check(header[0] == 20240326 && header[1] == 3 && header[2] == 16 && header[3] == 100 && header[4] == 2 &&
          header[5] == 2 && header[6] == 16 && header[7] == 128, "checkpoint/dense_llmc_header",
          "magic %d version %d maxT %d V %d L %d NH %d C %d Vp %d", header[0], header[1], header[2], header[3], header[4], header[5], header[6], header[7]);
    rc = gpt2_load_checkpoint(&b, path, NULL, 0.0f, 0, solo, err, sizeof(err));
    check(rc == 0 && memcmp(d.params_memory, b.params_memory, d.num_parameters * sizeof(float)) == 0, "checkpoint/dense_roundtrip", "%s", rc ? err : path);
    gpt2_free(&b);
    // llm.c's bf16 checkpoints (version 5) load as fp32: each value is the top 16 bits of a float
    {
        int h5[256];
        memcpy(h5, header, sizeof(h5));
        h5[1] = 5;
        char path5[600];
        snprintf(path5, sizeof(path5), "%s/dense_bf16.bin", tmpdir);
        FILE* f5 = fopenCheck(path5, "wb");
        fwriteCheck(h5, sizeof(int), 256, f5);
        for (size_t i = 0; i < d.num_parameters; i++) {
            uint32_t bits;
            memcpy(&bits, &d.params_memory[i], 4);
            uint16_t top = (uint16_t)(bits >> 16);
            fwriteCheck(&top, 2, 1, f5);
        }
        fcloseCheck(f5);
        rc = gpt2_load_checkpoint(&b, path5, NULL, 0.0f, 0, solo, err, sizeof(err));
        size_t wrong = 0;
        for (size_t i = 0; rc == 0 && i < d.num_parameters; i++) {
            uint32_t bits;
            memcpy(&bits, &d.params_memory[i], 4);
            bits &= 0xFFFF0000u;
            float want;
            memcpy(&want, &bits, 4);
            if (b.params_memory[i] != want) { wrong++; }
        }
        check(rc == 0 && wrong == 0, "checkpoint/llmc_bf16_loads", "%s, %zu values differ from the truncated fp32", rc ? err : path5, wrong);
        if (rc == 0) { gpt2_free(&b); }
    }
    // upcycling: every expert a copy of the dense MLP, so with renormalised gates the MoE model
    // computes the dense model's function (up to fp32 rounding of sum_j g_j y = y)
    GPT2Config up = tiny_config(4, 2, 1, 2);
    up.expert_hidden = 4 * up.channels;
    rc = gpt2_load_checkpoint(&b, path, &up, 0.0f, 9, solo, err, sizeof(err));
    check(rc == 0 && b.config.num_experts == 4 && num_moe_layers(&b.config) == 2, "checkpoint/upcycle_load", "%s", rc ? err : "E=4 K=2 from dense");
    if (rc == 0) {
        int x[16], y[16];
        random_tokens(x, 16, 100, 11);
        random_tokens(y, 16, 100, 12);
        b.capacity_factor = 0.0f;
        gpt2_forward(&d, x, y, 2, 8);
        gpt2_forward(&b, x, y, 2, 8);
        double e = max_abs_diff(d.acts.logits, b.acts.logits, 16 * 128);
        check(e < 1e-5, "checkpoint/upcycle_same_function", "max abs logit diff %.2e (bound 1e-5), ce %.6f vs %.6f", e, d.mean_loss, b.mean_loss);
        gpt2_free(&b);
    }
    up.expert_hidden = 24;
    rc = gpt2_load_checkpoint(&b, path, &up, 0.0f, 9, solo, err, sizeof(err));
    check(rc != 0 && strstr(err, "H must be 4C") != NULL, "checkpoint/upcycle_rejects_H", "%s", err);
    // training state round trip, through the checkpoint a run saves (model + state)
    GPT2Config sc = tiny_config(4, 2, 1, 2);
    GPT2 s1;
    random_model(&s1, &sc, 13);
    s1.m_memory = (float*)callocCheck(s1.num_parameters, sizeof(float));
    s1.v_memory = (float*)callocCheck(s1.num_parameters, sizeof(float));
    uint64_t rng = 17;
    normal_fill(s1.m_memory, s1.num_parameters, 1.0f, &rng);
    normal_fill(s1.v_memory, s1.num_parameters, 1.0f, &rng);
    for (size_t i = 0; i < s1.num_parameters; i++) { s1.v_memory[i] = fabsf(s1.v_memory[i]); }
    TrainState st = {.step = 123, .data = {.epoch = 2, .shard_idx = 1, .sample_idx = 77}, .rng = 0xDEADBEEFCAFEull};
    TrainState st2;
    gpt2_save(&s1, tmpdir, &st);
    GPT2Config c2;
    float *p2, *m2, *v2;
    rc = checkpoint_load_step(tmpdir, 123, 0, 1, &c2, &p2, &m2, &v2, &st2, err, sizeof(err));
    check(rc == 0 && st2.step == 123 && st2.data.epoch == 2 && st2.data.shard_idx == 1 && st2.data.sample_idx == 77 &&
          st2.rng == st.rng && memcmp(s1.params_memory, p2, s1.num_parameters * sizeof(float)) == 0 &&
          memcmp(s1.m_memory, m2, s1.num_parameters * sizeof(float)) == 0 &&
          memcmp(s1.v_memory, v2, s1.num_parameters * sizeof(float)) == 0, "state/roundtrip", "%s", rc ? err : "step 123");
    if (rc == 0) { free(p2); free(m2); free(v2); }
    gpt2_free(&s1);
    gpt2_free(&a); gpt2_free(&d);
}

// bad checkpoint files: each rejected with a message naming the file and the problem
static void test_bad_checkpoints(void) {
    char good[512], bad[1024], err[1024];
    GPT2Config c = tiny_config(4, 2, 1, 2);
    GPT2 a, b;
    random_model(&a, &c, 21);
    snprintf(good, sizeof(good), "%s/good.bin", tmpdir);
    gpt2_write_checkpoint(&a, good);
    FILE* fp = fopenCheck(good, "rb");
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char* bytes = (char*)mallocCheck(size + 8);
    if (fread(bytes, 1, size, fp) != (size_t)size) { fail_exit("short read"); }
    fclose(fp);
    snprintf(bad, sizeof(bad), "%s/bad.bin", tmpdir);
    struct { const char* name; int field; int value; long size; const char* expect; } cases[] = {
        {"bad_magic", 0, 12345, -1, "bad magic"},
        {"bad_version", 1, 7, -1, "version 7"},
        {"truncated", -1, 0, size - 4, "truncated"},
        {"trailing", -1, 0, size + 4, "trailing"},
        {"header_only_partial", -1, 0, 1000, "no full 1024-byte header"},
        {"k_greater_than_E", 9, 5, -1, "top-k K=5"},
        {"heads_not_dividing", 5, 3, -1, "NH=3 must divide"},
        {"vocab_bigger_than_padded", 3, 200, -1, "Vp=128 must be"},
        {"zero_layers", 4, 0, -1, "L=0"},
    };
    int ncases = sizeof(cases) / sizeof(cases[0]);
    for (int i = 0; i < ncases; i++) {
        char* mod = (char*)callocCheck(size + 8, 1);
        memcpy(mod, bytes, size);
        if (cases[i].field >= 0) { memcpy(mod + 4 * cases[i].field, &cases[i].value, 4); }
        write_bytes(bad, mod, cases[i].size >= 0 ? (size_t)cases[i].size : (size_t)size);
        err[0] = '\0';
        int rc = gpt2_load_checkpoint(&b, bad, NULL, 0.0f, 0, solo, err, sizeof(err));
        char tname[128];
        snprintf(tname, sizeof(tname), "bad_input/checkpoint_%s", cases[i].name);
        check(rc != 0 && strstr(err, bad) != NULL && strstr(err, cases[i].expect) != NULL, tname, "\"%s\"", err);
        if (rc == 0) { gpt2_free(&b); }
        free(mod);
    }
    int rc = gpt2_load_checkpoint(&b, "/nonexistent/model.bin", NULL, 0.0f, 0, solo, err, sizeof(err));
    check(rc != 0 && strstr(err, "/nonexistent/model.bin") != NULL, "bad_input/checkpoint_missing", "\"%s\"", err);
    // a state file for another model
    GPT2Config c2 = tiny_config(8, 2, 1, 2);
    GPT2 other;
    random_model(&other, &c2, 1);
    other.m_memory = (float*)callocCheck(other.num_parameters, sizeof(float));
    other.v_memory = (float*)callocCheck(other.num_parameters, sizeof(float));
    TrainState st = {.step = 5, .rng = 1}, st2;
    char dir[600];
    snprintf(dir, sizeof(dir), "%s/other", tmpdir);
    mkdir(dir, 0755);
    gpt2_save(&other, dir, &st);
    checkpoint_state_path(bad, sizeof(bad), dir, 5, 0);
    float* mv = (float*)mallocCheck(2 * a.num_parameters * sizeof(float));
    rc = state_read(bad, &st2, 5, 0, 1, mv, mv + a.num_parameters, a.num_parameters, err, sizeof(err));
    check(rc != 0 && strstr(err, "parameters") != NULL, "bad_input/state_wrong_model", "\"%s\"", err);
    free(mv);
    free(bytes);
    gpt2_free(&other);
    gpt2_free(&a);
}

// ----------------------------------------------------------------------------
// checkpoints of a run: every field of a training state is validated (a state with a negative
// step once gave a NaN model that then overwrote the good checkpoint), a save never leaves a
// temporary file or half a checkpoint behind, and a resume skips a corrupt newest checkpoint

// a model with AdamW moments, saved as checkpoint `step` of dir
static void saved_model(GPT2* a, const char* dir, int step, uint64_t seed) {
    GPT2Config c = tiny_config(4, 2, 1, 2);
    random_model(a, &c, seed);
    a->m_memory = (float*)callocCheck(a->num_parameters, sizeof(float));
    a->v_memory = (float*)callocCheck(a->num_parameters, sizeof(float));
    uint64_t rng = seed + 1;
    normal_fill(a->m_memory, a->num_parameters, 1.0f, &rng);
    normal_fill(a->v_memory, a->num_parameters, 1.0f, &rng);
    for (size_t i = 0; i < a->num_parameters; i++) { a->v_memory[i] = fabsf(a->v_memory[i]); }
    mkdir(dir, 0755);
    TrainState st = {.step = step, .data = {.epoch = 1, .shard_idx = 0, .sample_idx = 3}, .rng = 99};
    gpt2_save(a, dir, &st);
}

static char* read_all(const char* path, long* size) {
    FILE* fp = fopenCheck(path, "rb");
    fseek(fp, 0, SEEK_END);
    *size = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char* bytes = (char*)mallocCheck(*size + 16);
    if (fread(bytes, 1, *size, fp) != (size_t)*size) { fail_exit("%s: short read", path); }
    fclose(fp);
    return bytes;
}

// whether dir holds no file other than those named keep (a comma-separated list)
static int only_files(const char* dir, const char* keep, char* found, size_t len) {
    DIR* d = opendir(dir);
    int ok = 1;
    found[0] = '\0';
    struct dirent* ent;
    while (d != NULL && (ent = readdir(d)) != NULL) {
        if (ent->d_name[0] == '.') { continue; }
        if (strstr(keep, ent->d_name) == NULL) { ok = 0; snprintf(found, len, "%s", ent->d_name); }
    }
    if (d != NULL) { closedir(d); }
    return ok;
}

static void test_bad_states(void) {
    char dir[600], path[1024], bad[1024], err[2048];
    snprintf(dir, sizeof(dir), "%s/states", tmpdir);
    GPT2 a;
    saved_model(&a, dir, 7, 71);
    size_t n = a.num_parameters;
    checkpoint_state_path(path, sizeof(path), dir, 7, 0);
    long size;
    char* bytes = read_all(path, &size);
    float* m = (float*)mallocCheck(n * sizeof(float));
    float* v = (float*)mallocCheck(n * sizeof(float));
    TrainState s;
    int rc = state_read(path, &s, 7, 0, 1, m, v, n, err, sizeof(err));
    check(rc == 0 && s.step == 7 && s.rng == 99 && memcmp(m, a.m_memory, n * sizeof(float)) == 0, "state/good_reads", "%s", rc ? err : path);
    char baddir[700];
    snprintf(baddir, sizeof(baddir), "%s/bad_states", tmpdir);
    mkdir(baddir, 0755);
    checkpoint_state_path(bad, sizeof(bad), baddir, 7, 0);
    long m0 = 1024 + 40, v0 = m0 + 4 * (long)n; // the moments follow the header and five int64
    enum { I32, I64, F32, SIZE };
    struct { const char* name; int kind; long at; double value; const char* expect; } cases[] = {
        {"bad_magic", I32, 0, 7, "bad magic"},
        {"negative_step", I32, 8, -5, "step -5 in the header"},
        {"step_not_the_file_name", I32, 8, 2000000000, "expected 7"},
        {"other_rank", I32, 12, 1, "state of rank 1 of 1"},
        {"world_zero", I32, 16, 0, "rank 0 of 0"},
        {"reserved_field", I32, 400, 3, "header field [100]"},
        {"parameter_count", I64, 1024, 12345, "12345 parameters"},
        {"negative_epoch", I64, 1024 + 8, -1, "negative data position"},
        {"negative_sample", I64, 1024 + 24, -3, "negative data position"},
        {"rng_zero", I64, 1024 + 32, 0, "RNG state 0"},
        {"m_nan", F32, m0 + 4 * 5, NAN, "not finite"},
        {"v_infinite", F32, v0 + 4 * 2, INFINITY, "not finite"},
        {"v_negative", F32, v0 + 4 * 9, -1.0, "v negative"},
        {"truncated", SIZE, size - 4, 0, "wrong size"},
        {"trailing", SIZE, size + 4, 0, "wrong size"},
        {"header_only", SIZE, 1000, 0, "truncated training state header"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char* mod = (char*)callocCheck(size + 16, 1);
        memcpy(mod, bytes, size);
        long len = size;
        if (cases[i].kind == I32) { int32_t x = (int32_t)cases[i].value; memcpy(mod + cases[i].at, &x, 4); }
        if (cases[i].kind == I64) { int64_t x = (int64_t)cases[i].value; memcpy(mod + cases[i].at, &x, 8); }
        if (cases[i].kind == F32) { float x = (float)cases[i].value; memcpy(mod + cases[i].at, &x, 4); }
        if (cases[i].kind == SIZE) { len = cases[i].at; }
        write_bytes(bad, mod, len);
        err[0] = '\0';
        rc = state_read(bad, &s, 7, 0, 1, m, v, n, err, sizeof(err));
        char tname[128];
        snprintf(tname, sizeof(tname), "bad_input/state_%s", cases[i].name);
        check(rc != 0 && strstr(err, bad) != NULL && strstr(err, cases[i].expect) != NULL, tname, "\"%s\"", err);
        free(mod);
    }
    free(bytes); free(m); free(v);
    gpt2_free(&a);
}

// the children of test_checkpoint_saves: each tries a save that must fail
typedef struct { GPT2* model; const char* dir; int step; } SaveJob;
static void save_in_child(const void* arg) {
    const SaveJob* job = (const SaveJob*)arg;
    TrainState st = {.step = job->step, .rng = 5};
    gpt2_save(job->model, job->dir, &st);
}
static void save_with_full_disk(const void* arg) {
    struct rlimit small = {4096, 4096}; // files above 4 KB cannot grow: as a full disk, write fails
    signal(SIGXFSZ, SIG_IGN);
    setrlimit(RLIMIT_FSIZE, &small);
    save_in_child(arg);
}
static void resume_in_child(const void* arg) {
    GPT2Config c;
    float *p, *m, *v;
    TrainState s;
    checkpoint_resume((const char*)arg, &solo, &c, &p, &m, &v, &s);
}

static void test_checkpoint_saves(void) {
    char dir[600], found[300], path[1024], err[2048];
    // a full disk: one line naming the file and the reason, and nothing left in the folder
    snprintf(dir, sizeof(dir), "%s/full", tmpdir);
    mkdir(dir, 0755);
    GPT2 a;
    saved_model(&a, dir, 3, 81);
    SaveJob job = {&a, dir, 9};
    check_exits("checkpoint/full_disk_one_line", save_with_full_disk, &job, "error: ", "state_00000009_00000.bin", "File too large");
    check(only_files(dir, "model_00000003.bin,state_00000003_00000.bin", found, sizeof(found)), "checkpoint/full_disk_leaves_nothing",
          "%s", found[0] ? found : "no .tmp, no model_00000009.bin, no state");
    // parameters that are not finite are never written, and the good checkpoint of that step stays
    checkpoint_model_path(path, sizeof(path), dir, 3);
    long size_before, size_after;
    char* before = read_all(path, &size_before);
    a.params_memory[17] = NAN;
    job.step = 3;
    check_exits("checkpoint/nan_not_written", save_in_child, &job, "error: ", "step 3: parameter 17", "nan");
    char* after = read_all(path, &size_after);
    check(size_before == size_after && memcmp(before, after, size_before) == 0, "checkpoint/good_file_kept", "%s unchanged", path);
    free(before); free(after);
    // a folder that does not exist
    a.params_memory[17] = 0.0f;
    job.dir = "/nonexistent/run";
    check_exits("checkpoint/no_folder", save_in_child, &job, "error: ", "cannot create /nonexistent/run/state_00000003_00000.bin", "No such file");
    gpt2_free(&a);

    // resume: the newest checkpoint (6) is corrupt, so the previous one (3) is taken
    snprintf(dir, sizeof(dir), "%s/resume", tmpdir);
    GPT2 b3, b6;
    saved_model(&b3, dir, 3, 91);
    saved_model(&b6, dir, 6, 92);
    checkpoint_model_path(path, sizeof(path), dir, 6);
    if (truncate(path, 2000) != 0) { fail_exit("truncate %s failed", path); }
    GPT2Config c;
    float *p, *m, *v;
    TrainState s;
    int step = checkpoint_resume(dir, &solo, &c, &p, &m, &v, &s);
    check(step == 3 && s.step == 3 && memcmp(p, b3.params_memory, b3.num_parameters * sizeof(float)) == 0 &&
          memcmp(v, b3.v_memory, b3.num_parameters * sizeof(float)) == 0, "resume/skips_corrupt_newest",
          "resumed from step %d (want 3: step 6's model is truncated)", step);
    free(p); free(m); free(v);
    // an incomplete newest checkpoint (no state file) is skipped too
    checkpoint_state_path(path, sizeof(path), dir, 6, 0);
    remove(path);
    gpt2_free(&b6);
    saved_model(&b6, dir, 8, 93);
    checkpoint_state_path(path, sizeof(path), dir, 8, 0);
    remove(path);
    step = checkpoint_resume(dir, &solo, &c, &p, &m, &v, &s);
    check(step == 3, "resume/skips_incomplete", "resumed from step %d (want 3: steps 6 and 8 have no state)", step);
    free(p); free(m); free(v);
    // nothing loadable: one line, non-zero exit
    checkpoint_state_path(path, sizeof(path), dir, 3, 0);
    remove(path);
    check_exits("resume/none_loadable", resume_in_child, dir, "error: ", "flag -y 1: no checkpoint", dir);
    snprintf(err, sizeof(err), "%s/empty", tmpdir);
    mkdir(err, 0755);
    check_exits("resume/empty_folder", resume_in_child, err, "error: ", "no checkpoint (model_*.bin", err);
    gpt2_free(&b3); gpt2_free(&b6);
}

// ----------------------------------------------------------------------------
// flags (train.h): ranges, 64-bit sizes (run under UBSan by the sanitizer build)

static void parse_in_child(const void* arg) {
    const char* const* argv = (const char* const*)arg;
    int argc = 0;
    while (argv[argc] != NULL) { argc++; }
    TrainArgs a;
    parse_args(&a, argc, (char**)argv, &solo);
    GPT2Config c = {0};
    if (gpt2_config_from_descriptor(&c, "d4") != 0) { fail_exit("d4 is a descriptor"); }
    check_batch_fits(&a, &c, 1);
}

static void test_flags(void) {
    struct { const char* name; const char* argv[8]; const char* expect; } cases[] = {
        {"b_times_t_overflows", {"x", "-b", "65536", "-t", "65536", NULL}, "B*T*W = 4294967296 tokens"},
        {"attention_too_big", {"x", "-b", "1024", "-t", "1024", NULL}, "B*NH*T*T = 4294967296 elements"},
        {"steps_beyond_int", {"x", "-x", "99999999999", NULL}, "flag -x: expected an integer in [0, 1073741823]"},
        {"final_lr_negative", {"x", "-q", "-0.5", NULL}, "flag -q: expected a number in [0, 1]"},
        {"lr_infinite", {"x", "-l", "inf", NULL}, "flag -l: expected a number, got 'inf'"},
        {"lr_nan", {"x", "-l", "nan", NULL}, "flag -l: expected a number, got 'nan'"},
        {"noise_negative", {"x", "-N", "-0.1", NULL}, "flag -N: expected a number >= 0"},
        {"z_weight_negative", {"x", "-Z", "-1e-3", NULL}, "flag -Z: expected a number >= 0"},
        {"beta2_one", {"x", "-2", "1.0", NULL}, "flag -2: expected a number in [0, 1)"},
        {"total_batch_negative", {"x", "-d", "-2", NULL}, "flag -d: expected an integer >= -1"},
        {"trailing_garbage", {"x", "-b", "4x", NULL}, "flag -b: expected an integer >= 1, got '4x'"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char tname[128];
        snprintf(tname, sizeof(tname), "bad_input/flags_%s", cases[i].name);
        check_exits(tname, parse_in_child, cases[i].argv, "error: flag", cases[i].expect, "");
    }
    const char* good[] = {"x", "-1", "0.8", "-2", "0.999", "-q", "0", "-d", "512", "-b", "2", "-t", "64"};
    TrainArgs a;
    parse_args(&a, 13, (char**)good, &solo);
    check(a.beta1 == 0.8f && a.beta2 == 0.999f && a.final_lr_frac == 0.0f && a.total_batch == 512, "flags/betas_and_ranges",
          "beta1 %g beta2 %g (llm.c's CPU trainer: -2 0.999), final lr fraction %g, total batch %d", a.beta1, a.beta2, a.final_lr_frac, a.total_batch);
}

// LSH with every bucket a single row reproduces the uncompressed model bit for bit, forward
// and backward (lshmoe.h keeps one-row buckets exact); and LSH that merges rows changes both
static void test_lsh_singletons_exact(void) {
    GPT2Config c = tiny_config(4, 2, 1, 2);
    GPT2 off, on, merged;
    random_model(&off, &c, 51);
    random_model(&on, &c, 51);
    random_model(&merged, &c, 51);
    char err[256];
    LSHConfig fine = {6, 64, 1, 1}, coarse = {1, 1, 0, 1}; // 128^6 buckets; 2 buckets
    int rc = gpt2_set_lsh(&off, (LSHConfig){0, 0, 0, 0}, 2, 3, err, sizeof(err)) | gpt2_set_lsh(&on, fine, 2, 3, err, sizeof(err)) |
             gpt2_set_lsh(&merged, coarse, 2, 3, err, sizeof(err));
    if (rc != 0) { fail_exit("%s", err); }
    int x[16], y[16];
    random_tokens(x, 16, 100, 61);
    random_tokens(y, 16, 100, 62);
    GPT2* models[3] = {&off, &on, &merged};
    for (int i = 0; i < 3; i++) {
        gpt2_forward(models[i], x, y, 2, 8);
        gpt2_zero_grad(models[i]);
        gpt2_backward(models[i], 1.0f);
    }
    size_t nl = 16 * 128;
    check(on.stats.lsh.centroids == on.stats.lsh.rows && on.stats.lsh.rows > 0 &&
          memcmp(off.acts.logits, on.acts.logits, nl * sizeof(float)) == 0 &&
          memcmp(off.grads_memory, on.grads_memory, off.num_parameters * sizeof(float)) == 0,
          "lsh/all_singletons_bitwise", "%lld rows, %lld centroids; logits and every gradient identical to LSH off",
          on.stats.lsh.rows, on.stats.lsh.centroids);
    double e = max_abs_diff(off.acts.logits, merged.acts.logits, nl);
    check(merged.stats.lsh.centroids < merged.stats.lsh.rows && e > 1e-4, "lsh/merging_changes_output",
          "%lld centroids for %lld rows, max logit change %.2e", merged.stats.lsh.centroids, merged.stats.lsh.rows, e);
    // wire accounting: 2 simulated ranks own experts {0,1} and {2,3}; compressed rows <= rows
    check(on.stats.wire_rows[0] > 0 && on.stats.wire_rows[1] == on.stats.wire_rows[0] && merged.stats.wire_rows[1] < merged.stats.wire_rows[0] &&
          off.stats.wire_rows[1] == off.stats.wire_rows[0] && on.stats.wire_rows[0] == off.stats.wire_rows[0], "lsh/wire_rows",
          "crossing rows per all-to-all: %lld uncompressed, %lld sent with 2 buckets per group", merged.stats.wire_rows[0], merged.stats.wire_rows[1]);
    gpt2_free(&off); gpt2_free(&on); gpt2_free(&merged);
    // bad configurations
    GPT2 d;
    GPT2Config dc = tiny_config(0, 0, 1, 2);
    random_model(&d, &dc, 1);
    rc = gpt2_set_lsh(&d, fine, 1, 0, err, sizeof(err));
    check(rc != 0 && strstr(err, "E > 1") != NULL, "bad_input/lsh_needs_experts", "\"%s\"", err);
    gpt2_free(&d);
    random_model(&d, &c, 1);
    rc = gpt2_set_lsh(&d, (LSHConfig){32, 16, 1, 1}, 1, 0, err, sizeof(err));
    check(rc != 0 && strstr(err, "64-bit key") != NULL, "bad_input/lsh_key_overflow", "\"%s\"", err);
    rc = gpt2_set_lsh(&d, (LSHConfig){2, 0, 1, 1}, 1, 0, err, sizeof(err));
    check(rc != 0, "bad_input/lsh_dp_zero", "\"%s\"", err);
    rc = gpt2_set_lsh(&d, fine, 3, 0, err, sizeof(err));
    check(rc != 0 && strstr(err, "must divide E=4") != NULL, "bad_input/lsh_sources_not_dividing_E", "\"%s\"", err);
    gpt2_free(&d);
}

// gradient accumulation: two micro-batches of B=1 with loss scale 1/2 give the same parameter
// gradients as... (dropless, where routing does not couple the batch rows)
// -Q 1: bf16_round against the nearest of the two bf16 neighbours (ties to even), and in a model
// every row the experts receive and every output they send back is a bf16 value
static void test_wire_bf16(void) {
    uint64_t rng = 99;
    int bad = 0;
    for (int i = 0; i < 1000000 && bad == 0; i++) {
        uint32_t u = random_u32(&rng);
        if (i < 4) { u = (uint32_t[]){0x3f808000u, 0x3f818000u, 0x7f7fffffu, 0x80008000u}[i]; } // ties, FLT_MAX
        float x;
        memcpy(&x, &u, 4);
        if (isnan(x)) { continue; }
        uint32_t lo_u = u & 0xffff0000u, hi_u = lo_u + 0x10000u;
        float lo, hi;
        memcpy(&lo, &lo_u, 4);
        memcpy(&hi, &hi_u, 4);
        double hid = isinf(hi) ? copysign(0x1p128, hi) : hi; // IEEE rounding: past the largest bf16, Inf counts as 2^128
        double dlo = fabs((double)x - lo), dhi = fabs((double)x - hid);
        float want = dlo < dhi ? lo : dhi < dlo ? hi : ((lo_u >> 16) & 1u) ? hi : lo;
        if (memcmp(&want, &(float){bf16_round(x)}, 4) != 0) { bad = 1; printf("  %08x -> %a, want %a\n", u, bf16_round(x), want); }
    }
    check(bad == 0 && isnan(bf16_round(NAN)), "wire_bf16/round_nearest_even", "1M random floats against the nearest bf16 (ties to even)");
    GPT2Config c = tiny_config(4, 2, 1, 2);
    GPT2 model[2];
    int B = 2, T = 8, N = B * T, x[16], y[16];
    random_tokens(x, N, c.vocab_size, 1);
    random_tokens(y, N, c.vocab_size, 2);
    for (int q = 0; q < 2; q++) {
        random_model(&model[q], &c, 42);
        model[q].capacity_factor = 0.0f;
        model[q].wire_bf16 = q;
        gpt2_forward(&model[q], x, y, B, T);
    }
    // layer 0 routes the same tokens either way; its experts see the rounded rows, so their
    // inputs are bf16_round of the fp32 ones bit for bit
    size_t R = (size_t)N * c.top_k * c.channels, diff = 0, unrounded = 0;
    for (size_t i = 0; i < R; i++) {
        diff += bf16_round(model[0].acts.expin[i]) != model[1].acts.expin[i];
        unrounded += bf16_round(model[1].acts.moe_y[i]) != model[1].acts.moe_y[i];
    }
    check(diff == 0 && unrounded == 0 && model[0].acts.expin[0] != model[1].acts.expin[0], "wire_bf16/rows_rounded", "%zu expert inputs differ from the rounded fp32 ones, %zu combined rows not bf16 (of %zu)", diff, unrounded, R);
    check(fabs(model[0].total_loss - model[1].total_loss) > 0 && fabs(model[0].total_loss - model[1].total_loss) < 1e-2,
          "wire_bf16/loss_close", "loss %.6f with -Q 1, %.6f without", model[1].total_loss, model[0].total_loss);
    gpt2_free(&model[0]);
    gpt2_free(&model[1]);
}

static void test_grad_accumulation(void) {
    GPT2Config c = tiny_config(4, 2, 1, 2);
    GPT2 big, small;
    random_model(&big, &c, 31);
    random_model(&small, &c, 31);
    big.capacity_factor = small.capacity_factor = 0.0f;
    big.aux_loss_weight = small.aux_loss_weight = 0.0f; // the lb loss is a batch statistic
    int x[16], y[16];
    random_tokens(x, 16, 100, 41);
    random_tokens(y, 16, 100, 42);
    gpt2_forward(&big, x, y, 2, 8);
    gpt2_zero_grad(&big);
    gpt2_backward(&big, 1.0f);
    gpt2_forward(&small, x, y, 1, 8); // allocates for B=1
    gpt2_zero_grad(&small);
    gpt2_backward(&small, 0.5f);
    gpt2_forward(&small, x + 8, y + 8, 1, 8);
    gpt2_backward(&small, 0.5f);
    double e = max_abs_diff(big.grads_memory, small.grads_memory, big.num_parameters);
    double s = max_abs(big.grads_memory, big.num_parameters);
    check(e < 1e-5 * s, "grad_accumulation/two_halves", "max abs err %.2e of max %.2e (bound 1e-5 relative)", e, s);
    gpt2_free(&big);
    gpt2_free(&small);
}

// one training step gives the same bits run to run, and in the plain C build for any thread count
// (1, 2, 3): the kernels split work only where each output keeps its own order of sums (layernorm's
// columns in blocks of 64, the gradient norm in blocks of 65,536, the experts side by side). The
// BLAS build runs twice on 2 threads instead: sgemm's blocking depends on the thread count (README).
// The model is big enough for several blocks of each.
static void test_threads_same_bits(void) {
#ifdef OMP
    GPT2Config c = tiny_config(4, 2, 1, 2);
    c.channels = 192; c.num_heads = 4; c.expert_hidden = 384; // 3 column blocks; expfcw 295K floats
    int x[32], y[32];
    random_tokens(x, 32, 100, 51);
    random_tokens(y, 32, 100, 52);
#ifdef USE_BLAS
    int thread_counts[3] = {2, 2, 2};
#else
    int thread_counts[3] = {1, 2, 3};
#endif
    float* first = NULL;
    size_t n = 0;
    int max_threads = omp_get_max_threads();
    for (int run = 0; run < 3; run++) {
        omp_set_num_threads(thread_counts[run]);
        GPT2 model;
        random_model(&model, &c, 61);
        gpt2_forward(&model, x, y, 2, 16);
        gpt2_zero_grad(&model);
        gpt2_backward(&model, 1.0f);
        adamw_step(&model, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 1); // clipped: the norm matters
        n = model.num_parameters;
        if (run == 0) {
            first = (float*)mallocCheck(n * sizeof(float));
            memcpy(first, model.params_memory, n * sizeof(float));
        } else {
            int same = memcmp(first, model.params_memory, n * sizeof(float)) == 0;
            check(same, "threads/same_bits", "run %d on %d threads: parameters after one step %s those of the first run on %d",
                  run + 1, thread_counts[run], same ? "equal" : "differ from", thread_counts[0]);
        }
        gpt2_free(&model);
    }
    omp_set_num_threads(max_threads);
    free(first);
#endif
}
#endif


#ifndef TEST_F64
// ----------------------------------------------------------------------------
// tokenizer.h: GPT-2 BPE encode/decode. Needs data/gpt2/{encoder.json,vocab.bpe} (shipped in the
// repo; dev/data/tinyshakespeare.sh writes them). Run from the repository root.

// writes len bytes to path; 0 on success
static int tok_test_write(const char* path, const char* data, size_t len) {
    FILE* f = fopen(path, "wb");
    if (f == NULL) { return -1; }
    size_t k = fwrite(data, 1, len, f);
    return (fclose(f) == 0 && k == len) ? 0 : -1;
}

// encodes then decodes s[0..len) and compares the bytes
static int tok_test_round_trip(Tokenizer* t, const char* s, size_t len) {
    size_t n = tokenizer_encode(t, s, len, NULL, 0); // counting mode
    int* ids = (int*)malloc((n + 1) * sizeof(int));
    char* back = (char*)malloc(len + 1);
    int ok = ids != NULL && back != NULL && tokenizer_encode(t, s, len, ids, n) == n;
    size_t k = 0;
    for (size_t i = 0; ok && i < n; i++) {
        size_t piece_len;
        const char* piece = tokenizer_decode_bytes(t, (uint32_t)ids[i], &piece_len);
        ok = piece != NULL && k + piece_len <= len;
        if (ok) { memcpy(back + k, piece, piece_len); k += piece_len; }
    }
    ok = ok && k == len && memcmp(back, s, len) == 0;
    free(ids); free(back);
    return ok;
}

// the check variant must fail with one line naming the file, and leave the tokenizer empty
static void tok_test_bad(const char* name, const char* encoder, const char* vocab, const char* culprit) {
    Tokenizer t;
    char err[512];
    int rc = tokenizer_init_check(&t, encoder, vocab, err, sizeof(err));
    int ok = rc == -1 && t.init_ok == 0 && strstr(err, culprit) != NULL && strchr(err, '\n') == NULL;
    if (ok) { printf("ok   %s (%s)\n", name, err); tests_passed++; }
    else { printf("FAIL %s rc %d, message '%s'\n", name, rc, err); tests_failed++; }
    tokenizer_free(&t);
}

static void test_tokenizer(void) {
    const char* enc_path = "data/gpt2/encoder.json";
    const char* bpe_path = "data/gpt2/vocab.bpe";
    Tokenizer t;
    char err[512];
    if (tokenizer_init_check(&t, enc_path, bpe_path, err, sizeof(err)) != 0) {
        printf("FAIL tokenizer_init %s\n", err); tests_failed++;
        return;
    }
    int ok = t.vocab_size == 50257 && t.eot_token == 50256 && strcmp(tokenizer_decode(&t, 50256), "<|endoftext|>") == 0;
    printf("%s tokenizer_init vocab_size %u, eot %d\n", ok ? "ok  " : "FAIL", t.vocab_size, t.eot_token);
    if (ok) { tests_passed++; } else { tests_failed++; }

    // (iii) a fixed sentence gives tiktoken's ids (tiktoken "gpt2", encode_ordinary)
    const char* sentence = "Hello, world! It's 2024: we're testing GPT-2's tokenizer on na\xc3\xafve caf\xc3\xa9, "
                           "\xe4\xb8\xad\xe6\x96\x87 and \xf0\x9f\x98\x80.\n\n   Spaces   too ";
    static const int expected[] = { 15496, 11, 995, 0, 632, 338, 48609, 25, 356, 821, 4856, 402, 11571, 12,
        17, 338, 11241, 7509, 319, 41492, 40304, 11, 220, 40792, 23877, 229, 290, 30325, 222, 13, 628, 220,
        220, 48086, 220, 220, 1165, 220 };
    size_t n_expected = sizeof(expected) / sizeof(expected[0]);
    int ids[64];
    size_t n = tokenizer_encode(&t, sentence, strlen(sentence), ids, 64);
    size_t first_bad = 0;
    while (first_bad < n && first_bad < n_expected && ids[first_bad] == expected[first_bad]) { first_bad++; }
    ok = n == n_expected && first_bad == n;
    if (ok) { printf("ok   tokenizer_encode_sentence %zu tokens equal tiktoken's\n", n); tests_passed++; }
    else { printf("FAIL tokenizer_encode_sentence %zu tokens (expected %zu), first difference at %zu\n", n, n_expected, first_bad); tests_failed++; }
    // snprintf-like: a short buffer still returns the full count and fills what fits
    int few[3];
    ok = tokenizer_encode(&t, sentence, strlen(sentence), few, 3) == n_expected && few[2] == expected[2];
    if (ok) { printf("ok   tokenizer_encode_short_buffer\n"); tests_passed++; }
    else { printf("FAIL tokenizer_encode_short_buffer\n"); tests_failed++; }

    // (i) round trips, including bytes that are not UTF-8
#define TOK_SAMPLE(x) { x, sizeof(x) - 1 } // sizeof keeps embedded NULs
    static const struct { const char* s; size_t len; } samples[] = {
        TOK_SAMPLE(""), TOK_SAMPLE("Hello world"), TOK_SAMPLE("  leading and trailing  "),
        TOK_SAMPLE("tab\there\nnew\r\nline\n\n\n"),
        TOK_SAMPLE("na\xc3\xafve \xe2\x80\x94 \xe2\x80\x9cquotes\xe2\x80\x9d \xc2\xbd \xc2\xb2"),
        TOK_SAMPLE("\xe4\xb8\xad\xe6\x96\x87 \xe6\x97\xa5\xe6\x9c\xac \xed\x95\x9c"),
        TOK_SAMPLE("emoji \xf0\x9f\x98\x80\xf0\x9f\x91\x8d\xf0\x9f\x8f\xbd"),
        TOK_SAMPLE("e\xcc\x81 combining"), TOK_SAMPLE("it's we've they'll I'd 'S"),
        TOK_SAMPLE("nul\0byte"), TOK_SAMPLE("\xff\xfe bad \xc3 utf8 \xed\xa0\x80 \xf4\x90\x80\x80"),
    };
#undef TOK_SAMPLE
    for (size_t i = 0; i < sizeof(samples) / sizeof(samples[0]); i++) {
        char name[64];
        snprintf(name, sizeof(name), "tokenizer_round_trip_%zu", i);
        if (tok_test_round_trip(&t, samples[i].s, samples[i].len)) { printf("ok   %s\n", name); tests_passed++; }
        else { printf("FAIL %s decode(encode(x)) != x\n", name); tests_failed++; }
    }
    ok = tokenizer_decode(&t, 50257) == NULL && tokenizer_decode(&t, 0xFFFFFFFFu) == NULL;
    if (ok) { printf("ok   tokenizer_decode_out_of_range\n"); tests_passed++; }
    else { printf("FAIL tokenizer_decode_out_of_range\n"); tests_failed++; }
    tokenizer_free(&t);

    // (ii) broken tokenizer files are refused, with one line naming the file
    char bad[300];
    snprintf(bad, sizeof(bad), "%s/tokenizer_bad.json", tmpdir);
    tok_test_bad("tokenizer_bad_missing_file", "no/such/encoder.json", bpe_path, "no/such/encoder.json");
    tok_test_write(bad, "this is not JSON", 16);
    tok_test_bad("tokenizer_bad_garbage_encoder", bad, bpe_path, bad);
    size_t enc_len = 0;
    char* enc_text = (char*)tok_read_file(enc_path, &enc_len, err, sizeof(err));
    if (enc_text != NULL) {
        tok_test_write(bad, enc_text, enc_len / 2); // cut in the middle: truncated JSON
        tok_test_bad("tokenizer_bad_truncated_encoder", bad, bpe_path, bad);
        free(enc_text);
    }
    const char* wrong_first = "#hello\n\xc4\xa0 t\n";
    tok_test_write(bad, wrong_first, strlen(wrong_first));
    tok_test_bad("tokenizer_bad_vocab_first_line", enc_path, bad, bad);
    const char* unknown = "#version: 0.2\n\xc4\xa0 t\nqqq zzz\n";
    tok_test_write(bad, unknown, strlen(unknown));
    tok_test_bad("tokenizer_bad_vocab_unknown_token", enc_path, bad, bad);
    const char* few_merges = "#version: 0.2\n\xc4\xa0 t\n\xc4\xa0 a\n"; // 2 merges where 50000 are due
    tok_test_write(bad, few_merges, strlen(few_merges));
    tok_test_bad("tokenizer_bad_vocab_truncated", enc_path, bad, bad);
    remove(bad);
}
#endif

#ifdef TEST_MPI
// ----------------------------------------------------------------------------
// expert parallelism over MPI (run under mpirun with W = 1, 2, 4 ranks). Rank 0 also runs the
// whole batch in a world of its own (the single-process run) and compares.

static Comm world;

// every rank gets rank 0's temporary folder, so they share files
static void share_tmpdir(void) {
    if (world.rank == 0) { make_tmpdir(); }
    MPI_Bcast(tmpdir, sizeof(tmpdir), MPI_CHAR, 0, world.mpi);
}

// checks on rank 0 of something every rank computed: ok only if it holds on every rank
static void check_all(int cond, const char* name, const char* fmt, double value) {
    int all = cond;
    MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, world.mpi);
    if (world.rank == 0) { check(all, name, fmt, value); }
}

// gathers the expert tensor k of every rank into out (rank 0), in the single-process layout
static void gather_expert_tensor(const GPT2* model, int k, float* out) {
    size_t off = 0;
    for (int j = 0; j < k; j++) { off += model->param_sizes[j]; }
    int Lm = num_moe_layers(&model->config);
    size_t slice = model->param_sizes[k] / Lm;
    for (int m = 0; m < Lm; m++) {
        gather_floats(model->grads_memory + off + m * slice, out + m * slice * world.world, slice, &world);
    }
}

// W ranks on the same global batch as one process: losses of 10 AdamW steps, gradients of a
// replicated (qkvw) and an expert (expfcw) tensor after the first step
// With LSH, W real ranks hash the same groups as one process simulating W source ranks.
static void test_ep_equivalence_lsh(const char* name, GPT2Config c, float capacity_factor, int force_rank_experts, LSHConfig lsh,
                                    int wire_bf16) {
    int W = world.world, Bg = 4, T = 8, Bl = Bg / W, Ng = Bg * T;
    char path[512], tname[160], err[1024];
    snprintf(path, sizeof(path), "%s/%s.bin", tmpdir, name);
    GPT2 ref;
    int x[32], y[32];
    random_tokens(x, Ng, c.vocab_size, 101);
    random_tokens(y, Ng, c.vocab_size, 102);
    if (world.rank == 0) {
        random_model(&ref, &c, 77);
        if (force_rank_experts) {
            // every token prefers the last rank's experts: ln2 maps every row to about ln2b, and the
            // router scores the last E/W experts high on that direction and the others low
            size_t C = c.channels, E = c.num_experts;
            for (size_t i = 0; i < ref.param_sizes[PARAM_LN2W]; i++) { ref.params.ln2w[i] *= 0.01f; ref.params.ln2b[i] = 1.0f; }
            for (int m = 0; m < num_moe_layers(&c); m++) {
                for (size_t e = 0; e < E; e++) {
                    int mine = (int)e >= (int)E - (int)E / W;
                    for (size_t i = 0; i < C; i++) { ref.params.routerw[(m * E + e) * C + i] = (mine ? 1.0f : -1.0f) + 0.01f * e; }
                }
            }
        }
        gpt2_write_checkpoint(&ref, path);
        ref.capacity_factor = capacity_factor;
        ref.wire_bf16 = wire_bf16;
        if (gpt2_set_lsh(&ref, lsh, W, 5, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    }
    MPI_Barrier(world.mpi);
    GPT2 ep;
    int rc = gpt2_load_checkpoint(&ep, path, NULL, 0.0f, 0, world, err, sizeof(err));
    snprintf(tname, sizeof(tname), "ep/W%d/%s/load_split", W, name);
    check_all(rc == 0, tname, "E_local %.0f", ep.E_local);
    ep.capacity_factor = capacity_factor;
    ep.wire_bf16 = wire_bf16;
    if (gpt2_set_lsh(&ep, lsh, 1, 5, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    double worst_loss = 0.0;
    int nsteps = 10;
    for (int step = 0; step < nsteps; step++) {
        ep.step = step;
        if (world.rank == 0) { ref.step = step; }
        gpt2_forward(&ep, x + world.rank * Bl * T, y + world.rank * Bl * T, Bl, T);
        double loss = mean_over_ranks(ep.total_loss, &world);
        long long dropped = ep.stats.dropped_slots;
        gpt2_zero_grad(&ep);
        gpt2_backward(&ep, 1.0f / W);
        gpt2_allreduce_grads(&ep);
        if (world.rank == 0) {
            gpt2_forward(&ref, x, y, Bg, T);
            gpt2_zero_grad(&ref);
            gpt2_backward(&ref, 1.0f);
            double e = fabs(loss - ref.total_loss);
            if (e > worst_loss) { worst_loss = e; }
            if (step == 0) {
                snprintf(tname, sizeof(tname), "ep/W%d/%s/dropped", W, name);
                check(dropped == ref.stats.dropped_slots && (capacity_factor <= 0 || dropped > 0), tname, "%lld dropped slots (single process %lld)", dropped, ref.stats.dropped_slots);
            }
        }
        if (step == 0 && lsh.L > 0) { // the same buckets: centroid counts summed over ranks
            double cents[2] = {(double)ep.stats.lsh.centroids, (double)ep.stats.lsh.rows};
            allreduce_doubles(cents, 2, &world);
            if (world.rank == 0) {
                snprintf(tname, sizeof(tname), "ep/W%d/%s/lsh_same_buckets", W, name);
                check(cents[0] == ref.stats.lsh.centroids && cents[1] == ref.stats.lsh.rows && cents[0] < cents[1], tname,
                      "%.0f centroids for %.0f rows (one process with W simulated ranks: %lld)", cents[0], cents[1], ref.stats.lsh.centroids);
            }
        }
        if (step == 0) {
            // replicated tensor: the sum over ranks reorders fp32 additions, ~1e-7 relative
            size_t off = 0;
            for (int j = 0; j < PARAM_QKVW; j++) { off += ep.param_sizes[j]; }
            double e = world.rank == 0 ? max_abs_diff(ep.grads_memory + off, ref.grads_memory + off, ep.param_sizes[PARAM_QKVW]) : 0.0;
            double sc = world.rank == 0 ? max_abs(ref.grads_memory + off, ref.param_sizes[PARAM_QKVW]) : 1.0;
            snprintf(tname, sizeof(tname), "ep/W%d/%s/grad_qkvw_replicated", W, name);
            check_all(e <= 1e-5 * sc, tname, "max abs err %.2e (bound 1e-5 of max |grad|)", e);
            // expert tensor: gathered from the owners
            float* all = world.rank == 0 ? (float*)mallocCheck(ref.param_sizes[PARAM_EXPFCW] * sizeof(float)) : NULL;
            gather_expert_tensor(&ep, 15, all);
            if (world.rank == 0) {
                size_t roff = 0;
                for (int j = 0; j < PARAM_EXPFCW; j++) { roff += ref.param_sizes[j]; }
                e = max_abs_diff(all, ref.grads_memory + roff, ref.param_sizes[PARAM_EXPFCW]);
                sc = max_abs(ref.grads_memory + roff, ref.param_sizes[PARAM_EXPFCW]);
                snprintf(tname, sizeof(tname), "ep/W%d/%s/grad_expfcw_expert", W, name);
                check(e <= 1e-5 * sc && sc > 0, tname, "max abs err %.2e of max |grad| %.2e (bound 1e-5 relative)", e, sc);
                free(all);
            }
            if (force_rank_experts) { // the last rank received every slot of the batch
                int S = Bl * T * c.top_k;
                int got = 0;
                for (int q = 0; q < W; q++) { got += ep.routing.recv_rows[q]; }
                // every token picks the same K experts (the router's top two), both on the last
                // rank; with capacity each keeps cap of them
                long long cap = moe_capacity(capacity_factor, (long long)Bg * T, c.top_k, c.num_experts);
                long long all_slots = (long long)W * S, kept = c.top_k * cap < all_slots ? c.top_k * cap : all_slots;
                int want = world.rank == W - 1 ? (int)kept : 0;
                int got_last = got;
                MPI_Bcast(&got_last, 1, MPI_INT, W - 1, world.mpi);
                snprintf(tname, sizeof(tname), "ep/W%d/%s/all_rows_to_last_rank", W, name);
                check_all(got == want, tname, "the last rank received %.0f rows, the others none", got_last);
            }
        }
        adamw_step(&ep, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 1.0f, step + 1);
        if (world.rank == 0) { adamw_step(&ref, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 1.0f, step + 1); }
    }
    // fp32 reassociation in the gradient sums (~1e-7 relative) carried through 10 Adam steps
    snprintf(tname, sizeof(tname), "ep/W%d/%s/losses_10_steps", W, name);
    check_all(worst_loss < 1e-5, tname, "max abs loss diff vs single process %.2e (bound 1e-5)", worst_loss);
    gpt2_free(&ep);
    if (world.rank == 0) { gpt2_free(&ref); }
}

static void test_ep_equivalence(const char* name, GPT2Config c, float capacity_factor, int force_rank_experts) {
    test_ep_equivalence_lsh(name, c, capacity_factor, force_rank_experts, (LSHConfig){0, 0, 0, 0}, 0);
}

// a checkpoint written by one world size loads in another: mode "write" trains 2 steps and
// writes path; mode "read" loads it split over this world, checks the logits against a
// single-process load, and writes it back, which must give the same bytes
static void test_ep_checkpoint(const char* mode, const char* path) {
    GPT2Config c = tiny_config(8, 2, 1, 2);
    int W = world.world, Bg = 4, T = 8, Bl = Bg / W;
    int x[32], y[32];
    random_tokens(x, Bg * T, c.vocab_size, 201);
    random_tokens(y, Bg * T, c.vocab_size, 202);
    char err[1024], tname[160];
    GPT2 ep;
    if (strcmp(mode, "write") == 0) {
        gpt2_build(&ep, &c, NULL, world);
        gpt2_init_random(&ep, 5);
        for (int step = 0; step < 2; step++) {
            gpt2_forward(&ep, x + world.rank * Bl * T, y + world.rank * Bl * T, Bl, T);
            gpt2_zero_grad(&ep);
            gpt2_backward(&ep, 1.0f / W);
            gpt2_allreduce_grads(&ep);
            adamw_step(&ep, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 1.0f, step + 1);
        }
        gpt2_write_checkpoint(&ep, path);
        snprintf(tname, sizeof(tname), "ep/W%d/checkpoint_write", W);
        check_all(access(path, R_OK) == 0, tname, "written by %.0f ranks", W);
        gpt2_free(&ep);
        return;
    }
    int rc = gpt2_load_checkpoint(&ep, path, NULL, 0.0f, 0, world, err, sizeof(err));
    snprintf(tname, sizeof(tname), "ep/W%d/checkpoint_load", W);
    check_all(rc == 0, tname, "E_local %.0f", ep.E_local);
    gpt2_forward(&ep, x + world.rank * Bl * T, y + world.rank * Bl * T, Bl, T);
    float* logits = world.rank == 0 ? (float*)mallocCheck((size_t)Bg * T * c.padded_vocab_size * sizeof(float)) : NULL;
    MPI_Gather(ep.acts.logits, Bl * T * c.padded_vocab_size, MPI_FLOAT, logits, Bl * T * c.padded_vocab_size, MPI_FLOAT, 0, world.mpi);
    char again[600];
    snprintf(again, sizeof(again), "%s.again", path);
    gpt2_write_checkpoint(&ep, again);
    if (world.rank == 0) {
        GPT2 one;
        rc = gpt2_load_checkpoint(&one, path, NULL, 0.0f, 0, solo, err, sizeof(err));
        gpt2_forward(&one, x, y, Bg, T);
        double e = max_abs_diff(logits, one.acts.logits, (size_t)Bg * T * c.padded_vocab_size);
        // the plain matmuls compute each row alone: bit for bit. sgemm's result for a row can
        // depend on how many rows it is given (its blocking): fp32 rounding, ~1e-7 here
#ifdef USE_BLAS
        double bound = 1e-6;
#else
        double bound = 0.0;
#endif
        snprintf(tname, sizeof(tname), "ep/W%d/checkpoint_same_logits", W);
        check(rc == 0 && e <= bound, tname, "max abs logit diff %.1e vs the single-process load (bound %s)", e, bound > 0.0 ? "1e-6, OpenBLAS" : "0, bitwise");
        char cmd[1300];
        snprintf(cmd, sizeof(cmd), "cmp -s %s %s", path, again);
        snprintf(tname, sizeof(tname), "ep/W%d/checkpoint_rewrite_identical", W);
        check(system(cmd) == 0, tname, "%s", "written back by this world, byte for byte");
        gpt2_free(&one);
        free(logits);
    }
    gpt2_free(&ep);
}

int main(int argc, char** argv) {
    world = comm_init(&argc, &argv);
    solo = comm_self();
    if (argc == 3 && strcmp(argv[1], "--fail-rank") == 0) {
        // one rank cannot read its data: everyone must stop, with one message, without hanging
        int bad = world.rank == atoi(argv[2]);
        char err[256];
        snprintf(err, sizeof(err), "dataloader: /nonexistent/shard_%d.bin: no files match this pattern", world.rank);
        comm_check_all(bad, err, &world);
        comm_finalize(&world);
        return 0;
    }
    if (argc == 3) { // checkpoint across world sizes: --write PATH or --read PATH
        test_ep_checkpoint(argv[1] + 2, argv[2]);
    } else {
        share_tmpdir();
        test_ep_equivalence("dropless", tiny_config(4, 2, 1, 2), 0.0f, 0);
        test_ep_equivalence("capacity", tiny_config(4, 2, 2, 3), 0.5f, 0);
        test_ep_equivalence("forced_to_last_rank", tiny_config(8, 2, 1, 2), 0.0f, 1);
        test_ep_equivalence("forced_with_capacity", tiny_config(8, 2, 1, 2), 1.0f, 1);
        test_ep_equivalence_lsh("lsh_compensated", tiny_config(4, 2, 1, 2), 0.0f, 0, (LSHConfig){1, 2, 1, 1}, 0);
        test_ep_equivalence_lsh("lsh_plain_capacity", tiny_config(4, 2, 1, 2), 1.0f, 0, (LSHConfig){2, 2, 0, 0}, 0);
        test_ep_equivalence_lsh("wire_bf16", tiny_config(4, 2, 1, 2), 0.0f, 0, (LSHConfig){0, 0, 0, 0}, 1);
        test_ep_equivalence_lsh("lsh_half_wire_bf16", tiny_config(4, 2, 1, 2), 0.0f, 0, (LSHConfig){1, 2, 1, 0.5f}, 1);
        MPI_Barrier(world.mpi);
        if (world.rank == 0) {
            char cmd[300];
            snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
            if (system(cmd) != 0) { printf("warning: could not remove %s\n", tmpdir); }
        }
    }
    int failed = tests_failed;
    MPI_Bcast(&failed, 1, MPI_INT, 0, world.mpi);
    if (world.rank == 0) { printf("%d passed, %d failed\n", tests_passed, tests_failed); }
    comm_finalize(&world);
    return failed == 0 ? 0 : 1;
}
#else
int main(void) {
    solo = comm_make(0, 1);
    make_tmpdir();
#ifdef TEST_F64
    test_finite_differences();
    test_single_expert_is_dense();
    test_dispatch_layout();
#else
    test_reference("dense");
    test_reference("moe");
    test_reference("cap");
    test_reference("lsh");
    test_reference("lsh_nocomp");
    test_single_expert_is_dense();
    test_dispatch_layout();
    test_grad_accumulation();
    test_lsh_singletons_exact();
    test_wire_bf16();
    test_checkpoints();
    test_bad_checkpoints();
    test_bad_states();
    test_checkpoint_saves();
    test_flags();
    test_tokenizer();
    test_threads_same_bits(); // last: the tests above fork, and forks of a process with a thread pool make LeakSanitizer warn
#endif
    char cmd[300];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0) { printf("warning: could not remove %s\n", tmpdir); }
    return test_summary();
}
#endif

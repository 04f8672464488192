/*
train.h: the parts of a training run that do not depend on where the model computes, shared by
the CPU and GPU trainers: the command line (llm.c's flags plus the MoE and LSH ones), the model a
run starts from (resumed, loaded, upcycled or initialised), the data loaders and output folder,
the learning-rate schedule and gradient clipping, the per-step statistics, the step line and
main.log, the run table, samples.

API, in the order a trainer's main calls it:
  parse_args(&args, argc, argv, &comm);            // every flag range-checked; same on every rank
  run_start(&start, &args, &comm);                 // config + host parameters (+ state if resumed)
  check_batch_fits(&args, &config, W);
  run_open_data(&train, &val, &args, &start, vocab, &comm);
  RunLog log = run_log_open(&args, &config, &start, W, &comm);   // main.log, cut to a resumed step
  print_run_table(&log, &args, &config, start.source, ...);
  ... per step: step_stats_add (per micro-batch), step_stats_reduce, check_step_finite,
      learning_rate_at, grad_clip_scale, log_step; log_val; print_sample ...

main.log lines (one per event, key:value):
  s:STEP tel:VAL_LOSS
  s:STEP trl:LOSS ce: lb: z: drop: norm: lr: ms: [wire_mb: wire_mb_uncompressed:] [lsh_rate: lsh_bucket:
  lsh_err: lsh_ms:] [a2a_sent_mb:4 values a2a_recv_mb:4 values]
*/
#ifndef TRAIN_H
#define TRAIN_H

#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include "utils.h"
#include "comm.h"
#include "model.h"
#include "moe_layout.h"
#include "dataloader.h"
#include "tokenizer.h"
#include "lshmoe.h"

#define GPT2_EOT 50256 // <|endoftext|>: samples start from it

// ----------------------------------------------------------------------------
// command line

typedef struct {
    const char* train_pattern; // -i
    const char* val_pattern;   // -j
    const char* output_dir;    // -o
    const char* model;         // -e descriptor (d4, d6, d12, ...) or checkpoint file
    const char* tokenizer_dir; // -k folder with encoder.json and vocab.bpe
    int B, T;                  // -b, -t
    int total_batch;           // -d tokens per optimizer step (-1: B*T*W)
    float lr, final_lr_frac;   // -l, -q
    int warmup;                // -u
    float weight_decay;        // -c
    float beta1, beta2;        // -1, -2 AdamW's betas
    float grad_clip;           // -G (0: off)
    int max_steps;             // -x
    int val_every, val_steps;  // -v, -m
    int sample_every, genT;    // -s, -g
    int ckpt_every;            // -n
    int resume;                // -y
    uint64_t seed;             // -S
    int shuffle;               // -W
    // MoE (set_*: given on the command line)
    int E, K, moe_every, H, renorm; // -E -K -M -H -R
    int set_E, set_K, set_M, set_H, set_R;
    float capacity_factor, aux_w, z_w, upcycle_noise; // -F -A -Z -N
    // LSH compression of the all-to-all
    int lsh_L, lsh_dp, lsh_center, sources; // -J -P -O -V
    float lsh_compensate;                   // -C, the residual's weight
    int wire_bf16;                          // -Q: the all-to-all rows rounded to bf16 (CPU trainer)
} TrainArgs;

static inline void print_usage(void) {
    fprintf(stderr,
        "Usage: ./train_gpt2_moe_cpu [options]   (and mpirun -np W ./train_gpt2_moe_mpi [options])\n"
        "  -i <pattern> train token shards (default data/tinyshakespeare/tiny_shakespeare_train.bin)\n"
        "  -j <pattern> val token shards (default data/tinyshakespeare/tiny_shakespeare_val.bin)\n"
        "  -o <dir>     output folder for main.log and checkpoints (default none)\n"
        "  -e <model>   descriptor d4|d6|d12|d24|d36|d48 or a checkpoint file (default d4)\n"
        "  -k <dir>     tokenizer folder with encoder.json and vocab.bpe (default data/gpt2)\n"
        "  -b <int>     batch size B per process (default 4)   -t <int> sequence length T (default 64)\n"
        "  -d <int>     total batch in tokens, a multiple of B*T*W (default B*T*W)\n"
        "  -l <float>   learning rate > 0 (default 3e-4)      -u <int> warmup steps (default 0)\n"
        "  -q <float>   final lr fraction in [0,1] (default 1.0)   -c <float> weight decay >= 0 (default 0.0)\n"
        "  -1 <float>   AdamW beta1 in [0,1) (default 0.9)    -2 <float> AdamW beta2 in [0,1) (default 0.95)\n"
        "  -G <float>   gradient clip norm, 0 off (default 1.0)\n"
        "  -x <int>     steps (default 40)                    -S <int> seed (default 1337)\n"
        "  -v <int>     val every, 0 off (default 20)         -m <int> val batches (default 20)\n"
        "  -s <int>     sample every, 0 off (default 20)      -g <int> sample tokens (default 64)\n"
        "  -n <int>     checkpoint every, 0 = at the end only (default 0)\n"
        "  -y <0|1>     resume from the latest checkpoint in -o (default 0)\n"
        "  -W <0|1>     shuffle the training data (default 1)\n"
        "  MoE: -E <int> experts (default 1 = dense)   -K <int> top-k (default 2, or 1 if E=1)\n"
        "       -M <int> every M-th layer is MoE (1)   -H <int> expert hidden size (default 4C)\n"
        "       -F <float> capacity factor, <=0 dropless (1.25)   -R <0|1> renormalise gates (1)\n"
        "       -A <float> load-balancing loss weight (0.01)   -Z <float> z-loss weight (0.001)\n"
        "       -N <float> noise std on upcycled experts (0.0)\n"
        "  LSH:  -J <int> hash functions, 0 = off (0)  -P <int> projection width d' (4)\n"
        "       -C <float> residual weight in [0,1]: 1 the paper's compensation, 0 off (1)\n"
        "       -O <0|1> centre each group before hashing (1)\n"
        "       -V <int> simulated source ranks per process: groups are (expert, source) (1)\n"
        "  -Q <0|1>     round every all-to-all row to bf16, as a bf16 wire would (CPU trainer; 0)\n");
}

static inline int parse_int(const char* flag, const char* s, int min, int max) {
    char* end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno != 0 || v < min || v > max) {
        if (max == INT_MAX) { fail_exit("flag %s: expected an integer >= %d, got '%s'", flag, min, s); }
        fail_exit("flag %s: expected an integer in [%d, %d], got '%s'", flag, min, max, s);
    }
    return (int)v;
}

// a finite number in [lo, hi]; range says so in the error message
static inline float parse_float(const char* flag, const char* s, float lo, float hi, const char* range) {
    char* end;
    float v = strtof(s, &end);
    if (*s == '\0' || *end != '\0' || !isfinite(v)) { fail_exit("flag %s: expected a number, got '%s'", flag, s); }
    if (v < lo || v > hi) { fail_exit("flag %s: expected a number %s, got '%s'", flag, range, s); }
    return v;
}

// FNV-1a of the build and the command line: every rank must run the same binary and flags
static inline uint64_t run_fingerprint(int argc, char** argv) {
    uint64_t h = 0xcbf29ce484222325ull;
    const char* base = strrchr(argv[0], '/');
    const char* parts[2] = {__DATE__ " " __TIME__, base != NULL ? base + 1 : argv[0]};
    for (int p = 0; p < 2; p++) {
        for (const char* c = parts[p]; *c; c++) { h = (h ^ (unsigned char)*c) * 0x100000001b3ull; }
    }
    for (int i = 1; i < argc; i++) {
        for (const char* c = argv[i]; *c; c++) { h = (h ^ (unsigned char)*c) * 0x100000001b3ull; }
        h = (h ^ 0xff) * 0x100000001b3ull;
    }
    return h;
}

// reads the flags into a; any bad flag (unknown, malformed, out of range, or inconsistent with
// another) stops every rank with one line. Collective: the ranks first check that they all run
// the same binary with the same command line.
static inline void parse_args(TrainArgs* a, int argc, char** argv, const Comm* comm) {
    uint64_t fp = run_fingerprint(argc, argv);
    int mine[2] = {(int)(fp >> 32), (int)(fp & 0xffffffffu)};
    int* all = (int*)mallocCheck(2 * comm->world * sizeof(int));
    allgather_ints(mine, all, 2, comm);
    comm_check_all(all[0] != mine[0] || all[1] != mine[1],
                   "the binary or the command line differs from rank 0's (every rank must run the same)", comm);
    free(all);
    memset(a, 0, sizeof(TrainArgs));
    a->train_pattern = "data/tinyshakespeare/tiny_shakespeare_train.bin";
    a->val_pattern = "data/tinyshakespeare/tiny_shakespeare_val.bin";
    a->model = "d4";
    a->tokenizer_dir = "data/gpt2";
    a->B = 4; a->T = 64; a->total_batch = -1;
    a->lr = 3e-4f; a->final_lr_frac = 1.0f; a->warmup = 0; a->weight_decay = 0.0f; a->grad_clip = 1.0f;
    a->beta1 = 0.9f; a->beta2 = 0.95f;
    a->max_steps = 40; a->val_every = 20; a->val_steps = 20; a->sample_every = 20; a->genT = 64;
    a->seed = 1337; a->shuffle = 1;
    a->E = 1; a->K = 2; a->moe_every = 1; a->H = 0; a->renorm = 1;
    a->capacity_factor = 1.25f; a->aux_w = 0.01f; a->z_w = 0.001f;
    a->lsh_L = 0; a->lsh_dp = 4; a->lsh_compensate = 1.0f; a->lsh_center = 1; a->sources = 1; a->wire_bf16 = 0;
    const float below_one = 1.0f - FLT_EPSILON / 2; // the largest float < 1
    for (int i = 1; i < argc; i += 2) {
        const char* f = argv[i];
        if (strcmp(f, "-h") == 0) { if (comm->rank == 0) { print_usage(); } exit(EXIT_SUCCESS); }
        if (f[0] != '-' || strlen(f) != 2) { fail_exit("unknown argument '%s' (-h lists the flags)", f); }
        if (i + 1 >= argc) { fail_exit("flag %s needs a value (-h lists the flags)", f); }
        const char* v = argv[i + 1];
        switch (f[1]) {
            case 'i': a->train_pattern = v; break;
            case 'j': a->val_pattern = v; break;
            case 'o': a->output_dir = v; break;
            case 'e': a->model = v; break;
            case 'k': a->tokenizer_dir = v; break;
            case 'b': a->B = parse_int(f, v, 1, INT_MAX); break;
            case 't': a->T = parse_int(f, v, 1, INT_MAX); break;
            case 'd': a->total_batch = parse_int(f, v, -1, INT_MAX); break;
            case 'l': a->lr = parse_float(f, v, FLT_MIN, FLT_MAX, "> 0"); break;
            case 'u': a->warmup = parse_int(f, v, 0, INT_MAX); break;
            case 'q': a->final_lr_frac = parse_float(f, v, 0.0f, 1.0f, "in [0, 1]"); break;
            case 'c': a->weight_decay = parse_float(f, v, 0.0f, FLT_MAX, ">= 0"); break;
            case '1': a->beta1 = parse_float(f, v, 0.0f, below_one, "in [0, 1)"); break;
            case '2': a->beta2 = parse_float(f, v, 0.0f, below_one, "in [0, 1)"); break;
            case 'G': a->grad_clip = parse_float(f, v, 0.0f, FLT_MAX, ">= 0"); break;
            case 'x': a->max_steps = parse_int(f, v, 0, INT_MAX / 2); break;
            case 'v': a->val_every = parse_int(f, v, 0, INT_MAX); break;
            case 'm': a->val_steps = parse_int(f, v, 1, INT_MAX); break;
            case 's': a->sample_every = parse_int(f, v, 0, INT_MAX); break;
            case 'g': a->genT = parse_int(f, v, 1, 1 << 20); break;
            case 'n': a->ckpt_every = parse_int(f, v, 0, INT_MAX); break;
            case 'y': a->resume = parse_int(f, v, 0, 1); break;
            case 'S': a->seed = (uint64_t)parse_int(f, v, 0, INT_MAX); break;
            case 'W': a->shuffle = parse_int(f, v, 0, 1); break;
            case 'E': a->E = parse_int(f, v, 1, 4096); a->set_E = 1; break;
            case 'K': a->K = parse_int(f, v, 1, 4096); a->set_K = 1; break;
            case 'M': a->moe_every = parse_int(f, v, 1, 1024); a->set_M = 1; break;
            case 'H': a->H = parse_int(f, v, 0, 1 << 20); a->set_H = 1; break;
            case 'R': a->renorm = parse_int(f, v, 0, 1); a->set_R = 1; break;
            case 'F': a->capacity_factor = parse_float(f, v, -FLT_MAX, FLT_MAX, ""); break;
            case 'A': a->aux_w = parse_float(f, v, 0.0f, FLT_MAX, ">= 0"); break;
            case 'Z': a->z_w = parse_float(f, v, 0.0f, FLT_MAX, ">= 0"); break;
            case 'N': a->upcycle_noise = parse_float(f, v, 0.0f, FLT_MAX, ">= 0"); break;
            case 'J': a->lsh_L = parse_int(f, v, 0, INT_MAX); break;
            case 'P': a->lsh_dp = parse_int(f, v, 1, INT_MAX); break;
            case 'C': a->lsh_compensate = parse_float(f, v, 0.0f, 1.0f, "in [0, 1]"); break;
            case 'Q': a->wire_bf16 = parse_int(f, v, 0, 1); break;
            case 'O': a->lsh_center = parse_int(f, v, 0, 1); break;
            case 'V': a->sources = parse_int(f, v, 1, INT_MAX); break;
            default: fail_exit("unknown flag %s (-h lists the flags)", f);
        }
    }
    if (a->E == 1 && !a->set_K) { a->K = 1; }
    if (a->B % a->sources != 0) { fail_exit("flag -V: %d simulated ranks must divide the batch B=%d (each owns whole sequences)", a->sources, a->B); }
    if (a->resume && a->output_dir == NULL) { fail_exit("flag -y 1 needs an output folder -o to resume from"); }
    if (a->E > 1 && a->K > a->E) { fail_exit("flag -K: top-k K=%d exceeds the number of experts E=%d", a->K, a->E); }
    if (a->E == 1 && (a->set_K || a->set_M || a->set_H) && a->K != 1) { fail_exit("flag -K: top-k K=%d needs E >= K experts (-E is 1)", a->K); }
    long long step_tokens = (long long)a->B * a->T * comm->world; // 64-bit: B and T may each be near 2^31
    if (step_tokens > INT_MAX) { fail_exit("flags -b/-t: B*T*W = %lld tokens per micro-batch exceeds 2^31-1", step_tokens); }
    if (a->total_batch == -1) { a->total_batch = (int)step_tokens; }
    if (a->total_batch <= 0 || a->total_batch % step_tokens != 0) {
        fail_exit("flag -d: total batch %d tokens is not a positive multiple of B*T*W = %lld", a->total_batch, step_tokens);
    }
}

// The kernels index one tensor of a layer with int: every one must hold fewer than 2^31 elements.
// Checked once the model is known, before anything is allocated.
static inline void check_batch_fits(const TrainArgs* a, const GPT2Config* c, int W) {
    long long N = (long long)a->B * a->T, K = c->num_experts > 1 ? c->top_k : 1;
    long long H = c->num_experts > 1 ? c->expert_hidden : 0;
    long long largest[5] = {N * 4 * c->channels, (long long)a->B * c->num_heads * a->T * a->T, N * c->padded_vocab_size,
                            W * N * K * (H > c->channels ? H : c->channels), N * K * W};
    const char* what[5] = {"the MLP's B*T*4C", "attention's B*NH*T*T", "the logits' B*T*Vp", "the experts' W*B*T*K*max(H,C)", "the routed slots W*B*T*K"};
    for (int i = 0; i < 5; i++) {
        if (largest[i] > INT_MAX) { fail_exit("flags -b/-t: %s = %lld elements exceeds 2^31-1 (lower -b or -t)", what[i], largest[i]); }
    }
    if (a->T > c->max_seq_len) { fail_exit("flag -t: T=%d exceeds the model's maxT=%d", a->T, c->max_seq_len); }
}

// ----------------------------------------------------------------------------
// where a run starts

typedef struct {
    GPT2Config config;
    float* params;      // this rank's parameters (host), count_parameters floats; the trainer takes it
    float* m;           // AdamW moments when resumed (host), else NULL; the trainer takes them
    float* v;
    TrainState state;   // the step to start from, the data position and the sampling RNG
    int resumed;
    char source[4096];  // what the model came from: a descriptor or a checkpoint file
} RunStart;

// The model a run starts from, on the host: resumed from the newest complete checkpoint in -o
// (-y 1), loaded from a checkpoint file (upcycled when -E > 1 meets a dense one), or initialised
// from a descriptor. Every problem stops every rank with one line.
static inline void run_start(RunStart* rs, const TrainArgs* a, const Comm* comm) {
    memset(rs, 0, sizeof(*rs));
    rs->state.rng = a->seed ^ 0xA5A5A5A5ull; // the same on every rank: all ranks sample the same tokens
    GPT2Config* c = &rs->config;
    char err[1024];
    int W = comm->world;
    if (a->resume) {
        rs->state.step = checkpoint_resume(a->output_dir, comm, c, &rs->params, &rs->m, &rs->v, &rs->state);
        rs->resumed = 1;
        checkpoint_model_path(rs->source, sizeof(rs->source), a->output_dir, rs->state.step);
    } else if (gpt2_config_from_descriptor(c, a->model) == 0) {
        if (a->E > 1) {
            c->num_experts = a->E;
            c->top_k = a->K;
            c->moe_every = a->moe_every;
            c->expert_hidden = a->H > 0 ? a->H : 4 * c->channels;
            c->renorm_gates = a->renorm;
        }
        if (gpt2_config_check(c, err, sizeof(err)) != 0) { fail_exit("model %s: %s", a->model, err); }
        if (a->E > 1 && a->E % W != 0) { fail_exit("flag -E: E=%d experts cannot be split evenly over W=%d processes", a->E, W); }
        size_t sizes[NUM_PARAMETER_TENSORS];
        int El = experts_per_rank(c, W);
        fill_in_parameter_sizes(sizes, c, El);
        rs->params = (float*)callocCheck(count_parameters(sizes), sizeof(float));
        ParameterTensors p;
        point_parameters(&p, rs->params, sizes);
        gpt2_init_params(&p, sizes, c, El, comm->rank * El, a->seed);
        snprintf(rs->source, sizeof(rs->source), "%s", a->model);
    } else {
        if (a->model[0] == 'd' && access(a->model, F_OK) != 0) {
            fail_exit("flag -e: '%s' is neither a descriptor (d4 d6 d12 d24 d36 d48) nor a checkpoint file", a->model);
        }
        GPT2Config flags = {0};
        flags.num_experts = a->E;
        flags.top_k = a->K;
        flags.moe_every = a->moe_every;
        flags.expert_hidden = a->H;
        flags.renorm_gates = a->renorm;
        int rc = checkpoint_load(a->model, &flags, a->upcycle_noise, a->seed, comm->rank, W, c, &rs->params, err, sizeof(err));
        comm_check_all(rc != 0, err, comm);
        snprintf(rs->source, sizeof(rs->source), "%s", a->model);
    }
    if (c->num_experts > 1 && ((a->set_E && a->E != c->num_experts) || (a->set_K && a->K != c->top_k) ||
                               (a->set_M && a->moe_every != c->moe_every) || (a->set_H && a->H != c->expert_hidden) ||
                               (a->set_R && a->renorm != c->renorm_gates))) {
        fail_exit("flags -E/-K/-M/-H/-R conflict with checkpoint %s (E=%d K=%d moe_every=%d H=%d renorm=%d)",
                  rs->source, c->num_experts, c->top_k, c->moe_every, c->expert_hidden, c->renorm_gates);
    }
}

// The train and val loaders of this rank. Every rank checks its shards first, so that a rank that
// cannot read them stops all ranks with one line instead of leaving the others waiting in a
// collective; a resumed position is checked the same way.
static inline void run_open_data(DataLoader* train, DataLoader* val, const TrainArgs* a, const RunStart* rs, int vocab_size, const Comm* comm) {
    char err[2048];
    int W = comm->world;
    size_t min_tokens = (size_t)a->B * a->T * W + 1;
    int bad = dataloader_check_pattern(a->train_pattern, min_tokens, err, sizeof(err)) != 0 ||
              dataloader_check_pattern(a->val_pattern, min_tokens, err, sizeof(err)) != 0;
    comm_check_all(bad, err, comm);
    errors_on_every_rank = 1; // from here on a failure may be one rank's own
    dataloader_init(train, a->train_pattern, a->B, a->T, comm->rank, W, a->shuffle, a->seed, vocab_size);
    dataloader_init(val, a->val_pattern, a->B, a->T, comm->rank, W, 0, a->seed, vocab_size);
    if (rs->resumed) {
        bad = dataloader_position_check(train, rs->state.data, err, sizeof(err)) != 0;
        comm_check_all(bad, err, comm);
        dataloader_resume(train, rs->state.data);
    }
}

// the tokenizer, for the samples (rank 0; optional: without its files samples print as ids)
static inline int run_open_tokenizer(Tokenizer* t, const TrainArgs* a, const Comm* comm) {
    char enc[4096], bpe[4096], err[1024];
    snprintf(enc, sizeof(enc), "%s/encoder.json", a->tokenizer_dir);
    snprintf(bpe, sizeof(bpe), "%s/vocab.bpe", a->tokenizer_dir);
    if (comm->rank != 0 || access(enc, R_OK) != 0 || access(bpe, R_OK) != 0) {
        printf0("tokenizer files not found in %s: samples print as token ids\n", a->tokenizer_dir);
        return 0;
    }
    if (tokenizer_init_check(t, enc, bpe, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    return 1;
}

// ----------------------------------------------------------------------------
// schedule and clipping

// linear warmup, then cosine decay to lr * final_frac (as llm.c)
static inline float learning_rate_at(int step, int max_steps, float lr, int warmup, float final_frac) {
    if (step < warmup) { return lr * (step + 1) / warmup; }
    float min_lr = lr * final_frac;
    float ratio = max_steps > warmup ? (float)(step - warmup) / (max_steps - warmup) : 1.0f;
    if (ratio > 1.0f) { ratio = 1.0f; }
    float coeff = 0.5f * (1.0f + cosf((float)M_PI * ratio));
    return min_lr + coeff * (lr - min_lr);
}

// the factor that clips the global gradient norm to grad_clip (torch.nn.utils.clip_grad_norm_);
// 1 when grad_clip <= 0 (off) or the norm is below it
static inline float grad_clip_scale(float norm, float grad_clip) {
    if (grad_clip <= 0.0f) { return 1.0f; }
    float coef = grad_clip / (norm + 1e-6f);
    return coef < 1.0f ? coef : 1.0f;
}

// ----------------------------------------------------------------------------
// statistics of one optimizer step

typedef struct {
    double ce, lb, z;       // means over micro-batches (then over ranks, step_stats_reduce)
    double dropped;         // dropped slots of the whole batch, summed over micro-batches
    long long a2a[8];       // this rank's rows to other ranks: sent then received, four all-to-alls
    double wire[2];         // rows crossing ranks per all-to-all: uncompressed, as sent (all ranks)
    long long* load;        // (E) slots the whole batch routed to each expert
    LSHStats lsh;           // this rank's LSH compression, forward and backward
    float norm, lr;
    double ms;
} StepStats;

static inline void step_stats_begin(StepStats* s, long long* load, int E) {
    memset(s, 0, sizeof(*s));
    s->load = load;
    for (int e = 0; e < E; e++) { load[e] = 0; }
}

// adds one micro-batch: its losses, its MoE counters, and counts (Lm, W, E), the slots every rank
// routed to each expert in each MoE layer
static inline void step_stats_add(StepStats* s, float ce, float lb, float z, int grad_accum, const MoEStats* ms,
                                  const int* counts, int Lm, int W, int E) {
    s->ce += ce / grad_accum;
    s->lb += lb / grad_accum;
    s->z += z / grad_accum;
    s->dropped += ms->dropped_slots;
    for (int i = 0; i < 4; i++) { s->a2a[i] += ms->a2a_sent[i]; s->a2a[4 + i] += ms->a2a_recv[i]; }
    s->wire[0] += ms->wire_rows[0];
    s->wire[1] += ms->wire_rows[1];
    lsh_stats_add(&s->lsh, &ms->lsh);
    for (int m = 0; m < Lm; m++) { // counts of the whole batch: every rank has them
        for (int q = 0; q < W; q++) {
            for (int e = 0; e < E; e++) { s->load[e] += counts[((size_t)m * W + q) * E + e]; }
        }
    }
}

// the losses as means over ranks, the wire rows summed over ranks (collective)
static inline void step_stats_reduce(StepStats* s, const Comm* comm) {
    allreduce_doubles(s->wire, 2, comm);
    s->ce = mean_over_ranks(s->ce, comm);
    s->lb = mean_over_ranks(s->lb, comm);
    s->z = mean_over_ranks(s->z, comm);
}

// a NaN or Inf in the losses or the gradient norm stops the run before the update, so no
// checkpoint is ever written from it. Every rank has the same reduced numbers: one line.
static inline void check_step_finite(int step, const StepStats* s, const Comm* comm) {
    const char* names[4] = {"the cross-entropy loss", "the load-balancing loss", "the z-loss", "the gradient norm"};
    double values[4] = {s->ce, s->lb, s->z, s->norm};
    for (int i = 0; i < 4; i++) {
        if (!isfinite(values[i])) {
            char msg[256];
            snprintf(msg, sizeof(msg), "step %d: %s is %g: stopping before the update (lower -l, or check the data)", step + 1, names[i], values[i]);
            comm_check_all(1, msg, comm);
        }
    }
}

// ----------------------------------------------------------------------------
// the output folder, main.log and the step line

typedef struct {
    FILE* file;          // main.log on rank 0 with -o, else NULL
    int max_steps, total_batch, W, E, Lm, K, C, sources, lsh;
    int wire_bytes;      // bytes per element of an all-to-all row: 4 (fp32) or 2 (bf16)
    float aux_w, z_w;
    long long slots;     // routed slots per step over the whole batch and every MoE layer
    double total_ms;     // of the timed steps
    int timed_steps;
} RunLog;

// main.log of a resumed run keeps the lines before the resumed step only: the run writes the
// rest again, so the log reads as if the run had never stopped
static inline void log_truncate(const char* path, int step) {
    FILE* in = fopen(path, "r");
    if (in == NULL) { return; }
    char err[4400];
    AtomicFile out;
    if (atomic_open(&out, path, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    char line[4096];
    while (fgets(line, sizeof(line), in) != NULL) {
        int s;
        if (sscanf(line, "s:%d", &s) == 1 && s >= step) { break; }
        atomic_write(&out, line, 1, strlen(line));
    }
    fclose(in);
    if (atomic_close(&out, err, sizeof(err)) != 0 || atomic_rename(&out, err, sizeof(err)) != 0) { fail_exit("%s", err); }
}

// Creates the output folder (every rank checks that it can write there) and opens main.log on
// rank 0, cut back to the resumed step. Collective.
static inline RunLog run_log_open(const TrainArgs* a, const GPT2Config* c, const RunStart* rs, const Comm* comm) {
    RunLog log;
    memset(&log, 0, sizeof(log));
    log.max_steps = a->max_steps;
    log.total_batch = a->total_batch;
    log.W = comm->world;
    log.E = c->num_experts > 1 ? c->num_experts : 0;
    log.Lm = num_moe_layers(c);
    log.K = c->top_k;
    log.C = c->channels;
    log.sources = a->sources;
    log.lsh = a->lsh_L > 0;
    log.wire_bytes = a->wire_bf16 ? 2 : 4; // the GPU trainer sets its activation type's size
    log.aux_w = a->aux_w;
    log.z_w = a->z_w;
    log.slots = (long long)a->total_batch * c->top_k * log.Lm;
    if (a->output_dir == NULL) { return log; }
    char err[4400] = "";
    int failed = mkdir(a->output_dir, 0755) != 0 && errno != EEXIST;
    if (failed) { snprintf(err, sizeof(err), "cannot create the output folder %s (flag -o): %s", a->output_dir, strerror(errno)); }
    else if (access(a->output_dir, W_OK | X_OK) != 0) {
        failed = 1;
        snprintf(err, sizeof(err), "cannot write into the output folder %s (flag -o): %s", a->output_dir, strerror(errno));
    }
    comm_check_all(failed, err, comm);
    if (comm->rank == 0) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/main.log", a->output_dir);
        if (rs->resumed) { log_truncate(path, rs->state.step); }
        log.file = fopenCheck(path, rs->resumed ? "a" : "w");
    }
    return log;
}

// the validation loss (the same on every rank); NaN or Inf stops the run before any checkpoint
static inline void log_val(RunLog* log, int step, double val_loss, const Comm* comm) {
    if (!isfinite(val_loss)) {
        char msg[256];
        snprintf(msg, sizeof(msg), "step %d: the validation loss is %g: stopping (lower -l, or check the data)", step, val_loss);
        comm_check_all(1, msg, comm);
    }
    printf0("val loss %.6f\n", val_loss);
    if (log->file) { fprintf(log->file, "s:%d tel:%.6f\n", step, val_loss); fflush(log->file); }
}

// the step line on stdout and in main.log (rank 0)
static inline void log_step(RunLog* log, int step, const StepStats* s) {
    const int E = log->E, W = log->W;
    double row_bytes = (double)log->C * log->wire_bytes;
    double wire_mb[2] = {s->wire[0] * row_bytes / 1e6, s->wire[1] * row_bytes / 1e6}; // per all-to-all
    double sent_mb[4], recv_mb[4], sent_total = 0.0;
    for (int i = 0; i < 4; i++) { // this rank's bytes to and from other ranks
        sent_mb[i] = s->a2a[i] * row_bytes / 1e6;
        recv_mb[i] = s->a2a[4 + i] * row_bytes / 1e6;
        sent_total += sent_mb[i];
    }
    double total = s->ce + log->aux_w * s->lb + log->z_w * s->z;
    printf0("step %4d/%d | loss %.6f | ce %.4f", step + 1, log->max_steps, total, s->ce);
    if (E > 0) {
        // per layer means of the aux losses; each expert's load relative to a uniform split
        printf0(" lb %.3f z %.2f drop %.1f%% | load/uniform", s->lb / log->Lm, s->z / log->Lm, 100.0 * s->dropped / log->slots);
        for (int e = 0; e < E; e++) { printf0(" %.2f", (double)s->load[e] * E / log->slots); }
        if (W > 1) { printf0(" | a2a %.2f MB sent", sent_total); }
        if (log->lsh) {
            printf0(" | lsh rate %.3f bucket %.1f err %.3f | wire %.2f of %.2f MB", lsh_stats_rate(&s->lsh),
                    lsh_stats_bucket_mean(&s->lsh), lsh_stats_rel_error(&s->lsh), wire_mb[1], wire_mb[0]);
        }
    }
    printf0(" | norm %.3f | lr %.2e | %.1f ms | %.0f tok/s\n", s->norm, s->lr, s->ms, log->total_batch / (s->ms / 1000.0));
    if (log->file) {
        FILE* f = log->file;
        fprintf(f, "s:%d trl:%.6f ce:%.6f lb:%.6f z:%.6f drop:%.0f norm:%.4f lr:%.6e ms:%.2f", step, total, s->ce, s->lb, s->z, s->dropped, s->norm, s->lr, s->ms);
        if (E > 0) { // each expert's share of the routed slots relative to a uniform split
            for (int e = 0; e < E; e++) { fprintf(f, "%s%.3f", e == 0 ? " load:" : ",", (double)s->load[e] * E / log->slots); }
        }
        if (E > 0 && W * log->sources > 1) { // crossing ranks (real or simulated), MB per all-to-all
            fprintf(f, " wire_mb:%.4f wire_mb_uncompressed:%.4f", wire_mb[1], wire_mb[0]);
        }
        if (log->lsh) { // rank 0's LSH: centroids / rows, ||x - c|| / ||x||, seconds in lshmoe.h
            const LSHStats* ls = &s->lsh;
            fprintf(f, " lsh_rate:%.4f lsh_bucket:%.3f lsh_err:%.4f lsh_ms:%.2f", lsh_stats_rate(ls), lsh_stats_bucket_mean(ls),
                    lsh_stats_rel_error(ls), 1000.0 * (ls->t_hash + ls->t_bucket + ls->t_centroid + ls->t_compensate + ls->t_backward));
        }
        if (W > 1 && E > 0) { // rank 0's traffic in MB: dispatch, combine, combine-backward, dispatch-backward
            fprintf(f, " a2a_sent_mb:%.3f,%.3f,%.3f,%.3f a2a_recv_mb:%.3f,%.3f,%.3f,%.3f",
                    sent_mb[0], sent_mb[1], sent_mb[2], sent_mb[3], recv_mb[0], recv_mb[1], recv_mb[2], recv_mb[3]);
        }
        fprintf(f, "\n");
        fflush(f);
    }
}

static inline void run_log_close(RunLog* log) {
    if (log->timed_steps > 0) { printf0("average step %.1f ms over %d steps (the first excluded)\n", log->total_ms / log->timed_steps, log->timed_steps); }
    if (log->file) { fclose(log->file); }
    log->file = NULL;
}

// the table a run starts with; extra_row (or NULL) is one more row, such as the threads or the device
static inline void print_run_table(const TrainArgs* a, const GPT2Config* c, const RunStart* rs, int W, size_t train_tokens,
                                   size_t val_tokens, const char* extra_row) {
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_in_parameter_sizes(sizes, c, c->num_experts > 1 ? c->num_experts : 0); // every expert, as on one process
    size_t total_params = count_parameters(sizes), active = total_params;
    if (c->num_experts > 1) {
        size_t per_expert = (size_t)num_moe_layers(c) * (2 * (size_t)c->expert_hidden * c->channels + c->expert_hidden + c->channels);
        active = total_params - per_expert * (c->num_experts - c->top_k); // only K of E touch a token
    }
    printf0("+-----------------------+----------------------------------------------------+\n");
    printf0("| model                 | %-50s |\n", rs->source);
    printf0("| L, C, NH, maxT, V, Vp | %d, %d, %d, %d, %d, %d\n", c->num_layers, c->channels, c->num_heads, c->max_seq_len, c->vocab_size, c->padded_vocab_size);
    if (c->num_experts > 1) {
        printf0("| MoE                   | E=%d K=%d moe_every=%d H=%d renorm=%d capacity=%.2f aux=%g z=%g\n",
                c->num_experts, c->top_k, c->moe_every, c->expert_hidden, c->renorm_gates, a->capacity_factor, a->aux_w, a->z_w);
    } else {
        printf0("| MoE                   | none (dense GPT-2)\n");
    }
    printf0("| parameters            | %zu total, %zu active per token\n", total_params, active);
    printf0("| processes             | W=%d%s", W, W > 1 && c->num_experts > 1 ? ", experts split evenly" : "");
    if (a->sources > 1) { printf0(", %d simulated source ranks each", a->sources); }
    printf0("\n");
    if (a->lsh_L > 0) {
        printf0("| LSH                   | L=%d hash functions, d'=%d, compensation %g%s, centring %s\n",
                a->lsh_L, a->lsh_dp, a->lsh_compensate, a->lsh_compensate == 1.0f ? " (on)" : a->lsh_compensate == 0.0f ? " (off)" : "",
                a->lsh_center ? "on" : "off");
    }
    if (a->wire_bf16 && c->num_experts > 1) { printf0("| all-to-all rows       | rounded to bf16 (-Q 1)\n"); }
    printf0("| batch                 | B=%d T=%d per process, %d tokens per step (grad accum %d)\n", a->B, a->T, a->total_batch,
            a->total_batch / (a->B * a->T * W));
    printf0("| train / val tokens    | %zu / %zu\n", train_tokens, val_tokens);
    if (extra_row != NULL) { printf0("%s\n", extra_row); }
    printf0("+-----------------------+----------------------------------------------------+\n");
    if (rs->resumed) { printf0("resumed from step %d (%s)\n", rs->state.step, rs->source); }
}

// the token whose cumulative probability first exceeds coin (in [0, 1)): sampling from probs (n)
static inline int sample_mult(const float* probs, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += probs[i];
        if (coin < cdf) { return i; }
    }
    return n - 1;
}

// a generated sample: decoded by the tokenizer (rank 0), or token ids without one
static inline void print_sample(const Tokenizer* t, int have_tokenizer, const int* tokens, int n) {
    printf0("generating:\n---\n");
    for (int i = 0; i < n && process_rank == 0; i++) {
        if (have_tokenizer) { safe_printf(tokenizer_decode(t, tokens[i])); }
        else { printf("%d ", tokens[i]); }
    }
    printf0("\n---\n");
    fflush(stdout);
}

// whether an event every `every` steps (0: never) happens at this step (and always at the last)
static inline int every_step(int step, int every, int last_step) { return every > 0 && (step % every == 0 || last_step); }

#endif // TRAIN_H

/*
model.h: the GPT-2 MoE model on the host, shared by the CPU and GPU trainers: its config and
llm.c's descriptors, the parameter tensors (an enum, their sizes, one allocation carved into
named tensors), GPT-2's initialisation, the checkpoint files (llm.c's format for dense models,
ours for MoE; upcycling a dense checkpoint into an MoE model), and the training state of a rank.
Everything works on host arrays: the GPU trainer copies its parameters across once. README.md
documents every header field of every file.

API:
  gpt2_config_from_descriptor(&c, "d12"); gpt2_config_check(&c, err, errlen);
  fill_in_parameter_sizes(sizes, &c, E_local); point_parameters(&params, memory, sizes);
  gpt2_init_params(&params, sizes, &c, E_local, e0, seed);
  checkpoint_load(path, &upcycle, noise, seed, rank, W, &c, &memory, err, errlen);
  checkpoint_write(path, &c, memory, sizes, &comm);              // one model file (collective)
  checkpoint_save(dir, &state, &c, params, m, v, sizes, &comm);  // model + every rank's state
  step = checkpoint_resume(dir, &comm, &c, &params, &m, &v, &state); // collective; exits if none

Example (a run that starts from a checkpoint, on one process):
  GPT2Config c; float* params; char err[1024];
  if (checkpoint_load("model.bin", NULL, 0.0f, 0, 0, 1, &c, &params, err, sizeof(err))) { fail_exit("%s", err); }
  size_t sizes[NUM_PARAMETER_TENSORS]; ParameterTensors p;
  fill_in_parameter_sizes(sizes, &c, experts_per_rank(&c, 1));
  point_parameters(&p, params, sizes); // p.wte, p.qkvw, ... now point into params

A checkpoint of step s in an output folder is model_%08d.bin plus one state_%08d_%05d.bin per
rank; every file goes through utils.h's AtomicFile, states first and the model last, so a model
file means a complete checkpoint.
*/
#ifndef MODEL_H
#define MODEL_H

#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "utils.h"
#include "comm.h"
#include "dataloader.h" // DataLoaderPosition

// ----------------------------------------------------------------------------
// config

typedef struct {
    int max_seq_len;       // maxT
    int vocab_size;        // V
    int padded_vocab_size; // Vp, V rounded up to a multiple of 128
    int num_layers;        // L
    int num_heads;         // NH
    int channels;          // C
    int num_experts;       // E; E <= 1 is a dense GPT-2
    int top_k;             // K
    int moe_every;         // layer l is MoE when l % moe_every == moe_every - 1
    int expert_hidden;     // H
    int renorm_gates;      // renormalise the top-k gates to sum 1 (K > 1)
} GPT2Config;

static inline int is_moe_layer(const GPT2Config* c, int l) { return c->num_experts > 1 && l % c->moe_every == c->moe_every - 1; }
static inline int num_moe_layers(const GPT2Config* c) { return c->num_experts > 1 ? c->num_layers / c->moe_every : 0; }
static inline int num_dense_layers(const GPT2Config* c) { return c->num_layers - num_moe_layers(c); }
// index of layer l among the MoE layers (if MoE) or among the dense layers (if dense)
static inline int moe_layer_index(const GPT2Config* c, int l) { return l / c->moe_every; }
static inline int dense_layer_index(const GPT2Config* c, int l) { return c->num_experts > 1 ? l - l / c->moe_every : l; }
// the experts each of W ranks holds (0 for a dense model)
static inline int experts_per_rank(const GPT2Config* c, int W) { return c->num_experts > 1 ? c->num_experts / W : 0; }

// the descriptors of llm.c, with GPT-2's vocabulary; 0, or -1 if not a descriptor
static inline int gpt2_config_from_descriptor(GPT2Config* c, const char* descriptor) {
    int depth;
    char rest;
    if (sscanf(descriptor, "d%d%c", &depth, &rest) != 1) { return -1; }
    int channels;
    switch (depth) {
        case 4: channels = 256; break;
        case 6: channels = 384; break;
        case 12: channels = 768; break;
        case 24: channels = 1024; break;
        case 36: channels = 1280; break;
        case 48: channels = 1600; break;
        default: return -1;
    }
    memset(c, 0, sizeof(GPT2Config));
    c->num_layers = depth;
    c->channels = channels;
    c->num_heads = channels / 64;
    c->max_seq_len = 1024;
    c->vocab_size = 50257;
    c->padded_vocab_size = 50304;
    return 0;
}

#define MAX_EXPERTS 4096 // per layer; the trainers keep per-expert lists of this size on the stack

// validates a config and explains the first problem in err; 0 if valid
static inline int gpt2_config_check(const GPT2Config* c, char* err, size_t errlen) {
    if (c->max_seq_len <= 0 || c->max_seq_len > (1 << 20)) { snprintf(err, errlen, "maxT=%d out of range", c->max_seq_len); return -1; }
    if (c->vocab_size <= 0 || c->vocab_size > 65536) { snprintf(err, errlen, "V=%d out of range (uint16 tokens)", c->vocab_size); return -1; }
    if (c->padded_vocab_size < c->vocab_size || c->padded_vocab_size > (1 << 20)) { snprintf(err, errlen, "Vp=%d must be in [V=%d, 2^20]", c->padded_vocab_size, c->vocab_size); return -1; }
    if (c->num_layers <= 0 || c->num_layers > 1024) { snprintf(err, errlen, "L=%d out of range", c->num_layers); return -1; }
    if (c->channels <= 0 || c->channels > 65536) { snprintf(err, errlen, "C=%d out of range", c->channels); return -1; }
    if (c->num_heads <= 0 || c->channels % c->num_heads != 0) { snprintf(err, errlen, "NH=%d must divide C=%d", c->num_heads, c->channels); return -1; }
    if (c->num_experts > 1) {
        if (c->num_experts > MAX_EXPERTS) { snprintf(err, errlen, "E=%d out of range", c->num_experts); return -1; }
        if (c->top_k < 1 || c->top_k > c->num_experts) { snprintf(err, errlen, "top-k K=%d must be in [1, E=%d]", c->top_k, c->num_experts); return -1; }
        if (c->moe_every < 1 || c->moe_every > c->num_layers) { snprintf(err, errlen, "moe_every=%d must be in [1, L=%d]", c->moe_every, c->num_layers); return -1; }
        if (c->expert_hidden <= 0 || c->expert_hidden > (1 << 20)) { snprintf(err, errlen, "expert hidden H=%d out of range", c->expert_hidden); return -1; }
        if (c->renorm_gates != 0 && c->renorm_gates != 1) { snprintf(err, errlen, "renorm=%d must be 0 or 1", c->renorm_gates); return -1; }
    }
    return 0;
}

// ----------------------------------------------------------------------------
// parameter tensors, in checkpoint order (llm.c's, with the MoE tensors after the dense MLP)

enum {
    PARAM_WTE, PARAM_WPE, PARAM_LN1W, PARAM_LN1B, PARAM_QKVW, PARAM_QKVB, PARAM_ATTPROJW, PARAM_ATTPROJB,
    PARAM_LN2W, PARAM_LN2B, PARAM_FCW, PARAM_FCB, PARAM_FCPROJW, PARAM_FCPROJB,
    PARAM_ROUTERW, PARAM_EXPFCW, PARAM_EXPFCB, PARAM_EXPPROJW, PARAM_EXPPROJB,
    PARAM_LNFW, PARAM_LNFB,
    NUM_PARAMETER_TENSORS
};

static const char* const param_names[NUM_PARAMETER_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb", "ln2w", "ln2b", "fcw", "fcb",
    "fcprojw", "fcprojb", "routerw", "expfcw", "expfcb", "expprojw", "expprojb", "lnfw", "lnfb"};

// The parameter tensors as a struct of pointers of element type T: float on the host and in the
// CPU trainer (ParameterTensors), the GPU trainer's floatX (bf16 or float) on the device.
#define PARAMETER_TENSORS_OF(T) struct { \
    T* wte;      /* (Vp, C) */ \
    T* wpe;      /* (maxT, C) */ \
    T* ln1w;     /* (L, C) */ \
    T* ln1b;     /* (L, C) */ \
    T* qkvw;     /* (L, 3*C, C) */ \
    T* qkvb;     /* (L, 3*C) */ \
    T* attprojw; /* (L, C, C) */ \
    T* attprojb; /* (L, C) */ \
    T* ln2w;     /* (L, C) */ \
    T* ln2b;     /* (L, C) */ \
    T* fcw;      /* (Ld, 4*C, C) */ \
    T* fcb;      /* (Ld, 4*C) */ \
    T* fcprojw;  /* (Ld, C, 4*C) */ \
    T* fcprojb;  /* (Ld, C) */ \
    T* routerw;  /* (Lm, E, C) */ \
    T* expfcw;   /* (Lm, E_local, H, C) */ \
    T* expfcb;   /* (Lm, E_local, H) */ \
    T* expprojw; /* (Lm, E_local, C, H) */ \
    T* expprojb; /* (Lm, E_local, C) */ \
    T* lnfw;     /* (C) */ \
    T* lnfb;     /* (C) */ \
}
typedef PARAMETER_TENSORS_OF(float) ParameterTensors;

// the expert tensors live on their owner; the others are replicated on every rank
static inline int param_is_expert(int k) { return k >= PARAM_EXPFCW && k <= PARAM_EXPPROJB; }

// AdamW decays the matrices and embeddings only (not biases, not layernorms), as nanoGPT
static inline int param_decays(int k) {
    return k == PARAM_WTE || k == PARAM_WPE || k == PARAM_QKVW || k == PARAM_ATTPROJW || k == PARAM_FCW ||
           k == PARAM_FCPROJW || k == PARAM_ROUTERW || k == PARAM_EXPFCW || k == PARAM_EXPPROJW;
}

// E_local: the experts this process holds (E / W; all E in a single process)
static inline void fill_in_parameter_sizes(size_t* sizes, const GPT2Config* config, int E_local) {
    size_t Vp = config->padded_vocab_size, C = config->channels, maxT = config->max_seq_len;
    size_t L = config->num_layers, Ld = num_dense_layers(config), Lm = num_moe_layers(config);
    size_t E = config->num_experts, El = E_local, H = config->expert_hidden;
    sizes[PARAM_WTE] = Vp * C;
    sizes[PARAM_WPE] = maxT * C;
    sizes[PARAM_LN1W] = L * C;
    sizes[PARAM_LN1B] = L * C;
    sizes[PARAM_QKVW] = L * (3 * C) * C;
    sizes[PARAM_QKVB] = L * (3 * C);
    sizes[PARAM_ATTPROJW] = L * C * C;
    sizes[PARAM_ATTPROJB] = L * C;
    sizes[PARAM_LN2W] = L * C;
    sizes[PARAM_LN2B] = L * C;
    sizes[PARAM_FCW] = Ld * (4 * C) * C;
    sizes[PARAM_FCB] = Ld * (4 * C);
    sizes[PARAM_FCPROJW] = Ld * C * (4 * C);
    sizes[PARAM_FCPROJB] = Ld * C;
    sizes[PARAM_ROUTERW] = Lm * E * C; // replicated: every rank routes its own tokens
    sizes[PARAM_EXPFCW] = Lm * El * H * C;
    sizes[PARAM_EXPFCB] = Lm * El * H;
    sizes[PARAM_EXPPROJW] = Lm * El * C * H;
    sizes[PARAM_EXPPROJB] = Lm * El * C;
    sizes[PARAM_LNFW] = C;
    sizes[PARAM_LNFB] = C;
}

static inline size_t count_parameters(const size_t* sizes) {
    size_t n = 0;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) { n += sizes[k]; }
    return n;
}

// Carves one allocation of elements of elem_size bytes (host or device: only pointer arithmetic)
// into the tensors of p, any PARAMETER_TENSORS_OF struct: its NUM_PARAMETER_TENSORS pointers in order.
static inline void point_parameters_of(void* p, void* memory, const size_t* sizes, size_t elem_size) {
    char** ptrs = (char**)p;
    char* at = (char*)memory;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) { ptrs[k] = at; at += sizes[k] * elem_size; }
}
static inline void point_parameters(ParameterTensors* p, float* memory, const size_t* sizes) {
    point_parameters_of(p, memory, sizes, sizeof(float));
}
typedef char parameter_tensors_are_pointers[sizeof(ParameterTensors) == NUM_PARAMETER_TENSORS * sizeof(float*) ? 1 : -1];

// a stream of random numbers for one expert's tensor, the same whichever rank holds the expert
static inline uint64_t expert_seed(uint64_t seed, int tensor, int moe_layer, int expert) {
    return (seed * 0x9E3779B97F4A7C15ull) ^ ((uint64_t)(tensor + 1) << 48) ^ ((uint64_t)(moe_layer + 1) << 32) ^ (uint64_t)(expert + 1) * 0xBF58476D1CE4E5B9ull;
}

// GPT-2 init (as llm.c): N(0, 0.02) weights, residual projections scaled by 1/sqrt(2L), zero
// biases, unit layernorms; the router N(0, 0.02) too. p must be zero. Each expert draws from its
// own stream, so the model is the same for any number of ranks.
static inline void gpt2_init_params(ParameterTensors* p, const size_t* sizes, const GPT2Config* c, int E_local, int e0, uint64_t seed) {
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 1;
    float residual_std = 0.02f / sqrtf(2.0f * c->num_layers);
    float* weights[] = {p->wte, p->wpe, p->qkvw, p->attprojw, p->fcw, p->fcprojw, p->routerw};
    int tensors[] = {PARAM_WTE, PARAM_WPE, PARAM_QKVW, PARAM_ATTPROJW, PARAM_FCW, PARAM_FCPROJW, PARAM_ROUTERW};
    for (int i = 0; i < 7; i++) {
        int k = tensors[i];
        float std = (k == PARAM_ATTPROJW || k == PARAM_FCPROJW) ? residual_std : 0.02f;
        normal_fill(weights[i], sizes[k], std, &rng);
    }
    size_t C = c->channels, H = c->expert_hidden;
    for (int m = 0; m < num_moe_layers(c); m++) {
        for (int el = 0; el < E_local; el++) {
            size_t me = (size_t)m * E_local + el;
            uint64_t r1 = expert_seed(seed, PARAM_EXPFCW, m, e0 + el), r2 = expert_seed(seed, PARAM_EXPPROJW, m, e0 + el);
            normal_fill(p->expfcw + me * H * C, H * C, 0.02f, &r1);
            normal_fill(p->expprojw + me * C * H, C * H, residual_std, &r2);
        }
    }
    for (size_t i = 0; i < sizes[PARAM_LN1W]; i++) { p->ln1w[i] = 1.0f; p->ln2w[i] = 1.0f; }
    for (int i = 0; i < c->channels; i++) { p->lnfw[i] = 1.0f; }
}

// index of the first NaN or Inf in x (n), or n if every value is finite
static inline size_t first_nonfinite(const float* x, size_t n) {
    for (size_t i = 0; i < n; i++) { if (!isfinite(x[i])) { return i; } }
    return n;
}

// ----------------------------------------------------------------------------
// upcycling: a dense model becomes an MoE model whose every expert starts as a copy of its
// layer's dense MLP (plus N(0, noise) on W1 to break the symmetry), the router at N(0, 0.02)

// the MoE config a dense config upcycles to with the MoE flags in flags; 0 or -1 with err
static inline int upcycle_config(GPT2Config* mc, const GPT2Config* dense, const GPT2Config* flags, char* err, size_t errlen) {
    *mc = *dense;
    mc->num_experts = flags->num_experts;
    mc->top_k = flags->top_k;
    mc->moe_every = flags->moe_every;
    mc->expert_hidden = flags->expert_hidden > 0 ? flags->expert_hidden : 4 * dense->channels;
    mc->renorm_gates = flags->renorm_gates;
    if (mc->expert_hidden != 4 * dense->channels) {
        snprintf(err, errlen, "upcycling copies the dense MLP into each expert, so H must be 4C=%d (got %d)", 4 * dense->channels, mc->expert_hidden);
        return -1;
    }
    char cerr[256];
    if (gpt2_config_check(mc, cerr, sizeof(cerr)) != 0) { snprintf(err, errlen, "upcycled config: %s", cerr); return -1; }
    return 0;
}

// p (the MoE model of config mc, this rank's experts [e0, e0 + E_local)) from d (the dense model)
static inline void upcycle_params(ParameterTensors* p, const size_t* sizes, const GPT2Config* mc, int E_local, int e0,
                                  const ParameterTensors* d, const size_t* dense_sizes, float noise, uint64_t seed) {
    // the tensors both layouts share: embeddings, attention, layernorms
    int shared[] = {PARAM_WTE, PARAM_WPE, PARAM_LN1W, PARAM_LN1B, PARAM_QKVW, PARAM_QKVB, PARAM_ATTPROJW, PARAM_ATTPROJB, PARAM_LN2W, PARAM_LN2B, PARAM_LNFW, PARAM_LNFB};
    float* dst[] = {p->wte, p->wpe, p->ln1w, p->ln1b, p->qkvw, p->qkvb, p->attprojw, p->attprojb, p->ln2w, p->ln2b, p->lnfw, p->lnfb};
    const float* src[] = {d->wte, d->wpe, d->ln1w, d->ln1b, d->qkvw, d->qkvb, d->attprojw, d->attprojb, d->ln2w, d->ln2b, d->lnfw, d->lnfb};
    for (int i = 0; i < 12; i++) { memcpy(dst[i], src[i], dense_sizes[shared[i]] * sizeof(float)); }
    size_t C = mc->channels, H = mc->expert_hidden, El = E_local;
    uint64_t rng = seed * 0x9E3779B97F4A7C15ull + 7;
    normal_fill(p->routerw, sizes[PARAM_ROUTERW], 0.02f, &rng);
    for (int l = 0; l < mc->num_layers; l++) {
        const float* fcw = d->fcw + l * 4 * C * C;
        const float* fcb = d->fcb + l * 4 * C;
        const float* fcprojw = d->fcprojw + l * C * 4 * C;
        const float* fcprojb = d->fcprojb + l * C;
        if (is_moe_layer(mc, l)) {
            size_t m = moe_layer_index(mc, l);
            for (size_t el = 0; el < El; el++) {
                float* w1 = p->expfcw + (m * El + el) * H * C;
                memcpy(w1, fcw, H * C * sizeof(float));
                memcpy(p->expfcb + (m * El + el) * H, fcb, H * sizeof(float));
                memcpy(p->expprojw + (m * El + el) * C * H, fcprojw, C * H * sizeof(float));
                memcpy(p->expprojb + (m * El + el) * C, fcprojb, C * sizeof(float));
                if (noise > 0.0f) {
                    uint64_t r = expert_seed(seed, PARAM_EXPFCW, m, e0 + el);
                    for (size_t i = 0; i < H * C; i++) { float z; normal_fill(&z, 1, noise, &r); w1[i] += z; }
                }
            }
        } else {
            size_t dl = dense_layer_index(mc, l);
            memcpy(p->fcw + dl * 4 * C * C, fcw, 4 * C * C * sizeof(float));
            memcpy(p->fcb + dl * 4 * C, fcb, 4 * C * sizeof(float));
            memcpy(p->fcprojw + dl * C * 4 * C, fcprojw, C * 4 * C * sizeof(float));
            memcpy(p->fcprojb + dl * C, fcprojb, C * sizeof(float));
        }
    }
}

// ----------------------------------------------------------------------------
// model files

#define LLMC_MODEL_MAGIC 20240326 // llm.c: version 3 fp32, version 5 bf16
#define MOE_MODEL_MAGIC 20241111  // version 1 fp32
#define STATE_MAGIC 20241113      // training state, version 1

// Opens a checkpoint and validates its header and its size against the header (before anything
// is allocated). On success *fp is positioned at the first parameter; 0, or -1 with err set.
static inline int checkpoint_open(const char* path, GPT2Config* c, int* bf16, FILE** fp, char* err, size_t errlen) {
    *fp = fopen(path, "rb");
    if (*fp == NULL) { snprintf(err, errlen, "%s: cannot open checkpoint: %s", path, strerror(errno)); return -1; }
    int header[256];
    char cerr[256];
    size_t sizes[NUM_PARAMETER_TENSORS], expected;
    long actual;
    memset(c, 0, sizeof(*c));
    *bf16 = 0;
    if (fread(header, sizeof(int), 256, *fp) != 256) {
        snprintf(err, errlen, "%s: truncated checkpoint (no full 1024-byte header)", path);
        goto fail;
    }
    if (header[0] == LLMC_MODEL_MAGIC) {
        if (header[1] != 3 && header[1] != 5) {
            snprintf(err, errlen, "%s: llm.c checkpoint version %d not supported (3 = fp32, 5 = bf16)", path, header[1]);
            goto fail;
        }
        *bf16 = header[1] == 5;
    } else if (header[0] == MOE_MODEL_MAGIC) {
        if (header[1] != 1) { snprintf(err, errlen, "%s: MoE checkpoint version %d not supported (expected 1)", path, header[1]); goto fail; }
        c->num_experts = header[8];
        c->top_k = header[9];
        c->moe_every = header[10];
        c->expert_hidden = header[11];
        c->renorm_gates = header[12];
        if (c->num_experts <= 1) { snprintf(err, errlen, "%s: MoE checkpoint with E=%d (must be > 1)", path, c->num_experts); goto fail; }
    } else {
        snprintf(err, errlen, "%s: bad magic %d (expected %d for llm.c or %d for llm.moe MoE checkpoints)",
                 path, header[0], LLMC_MODEL_MAGIC, MOE_MODEL_MAGIC);
        goto fail;
    }
    c->max_seq_len = header[2];
    c->vocab_size = header[3];
    c->num_layers = header[4];
    c->num_heads = header[5];
    c->channels = header[6];
    c->padded_vocab_size = header[7];
    if (gpt2_config_check(c, cerr, sizeof(cerr)) != 0) { snprintf(err, errlen, "%s: bad header: %s", path, cerr); goto fail; }
    fill_in_parameter_sizes(sizes, c, experts_per_rank(c, 1));
    expected = 256 * sizeof(int) + count_parameters(sizes) * (*bf16 ? 2 : 4);
    fseek(*fp, 0, SEEK_END);
    actual = ftell(*fp);
    fseek(*fp, 256 * sizeof(int), SEEK_SET);
    if (actual < 0 || (size_t)actual != expected) {
        snprintf(err, errlen, "%s: file has %ld bytes but its header describes %zu (%s)", path, actual, expected,
                 (actual >= 0 && (size_t)actual < expected) ? "truncated" : "trailing data");
        goto fail;
    }
    return 0;
fail:
    fclose(*fp);
    *fp = NULL;
    return -1;
}

// reads n parameters stored as fp32 (version 3 / MoE 1) or bf16 (llm.c version 5) into out
static inline int read_params(float* out, size_t n, int bf16, FILE* fp) {
    if (!bf16) { return fread(out, sizeof(float), n, fp) == n ? 0 : -1; }
    uint16_t buf[4096];
    for (size_t i = 0; i < n; i += 4096) {
        size_t chunk = n - i < 4096 ? n - i : 4096;
        if (fread(buf, sizeof(uint16_t), chunk, fp) != chunk) { return -1; }
        for (size_t j = 0; j < chunk; j++) {
            union { uint32_t u; float f; } bits = {(uint32_t)buf[j] << 16}; // bf16 is fp32's top half
            out[i + j] = bits.f;
        }
    }
    return 0;
}

// Reads the tensors of an open checkpoint of config c into memory (sizes: rank's of W): the
// replicated tensors whole, the expert tensors only this rank's slice of each MoE layer. Every
// value must be finite. 0, or -1 with err set.
static inline int checkpoint_read_params(float* memory, const size_t* sizes, FILE* fp, const char* path, const GPT2Config* c,
                                         int bf16, int rank, int W, char* err, size_t errlen) {
    size_t elem = bf16 ? 2 : 4;
    int Lm = num_moe_layers(c);
    float* tensor = memory;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = sizes[k];
        int failed = 0;
        if (param_is_expert(k) && Lm > 0) {
            size_t slice = n / Lm;
            for (int m = 0; m < Lm && !failed; m++) {
                // layer m's experts of all ranks, then this rank's slice of them
                failed = fseek(fp, (long)(rank * slice * elem), SEEK_CUR) != 0 || read_params(tensor + m * slice, slice, bf16, fp) != 0 ||
                         fseek(fp, (long)((W - 1 - rank) * slice * elem), SEEK_CUR) != 0;
            }
        } else {
            failed = read_params(tensor, n, bf16, fp) != 0;
        }
        if (failed) { snprintf(err, errlen, "%s: read of tensor %s failed", path, param_names[k]); return -1; }
        size_t bad = first_nonfinite(tensor, n);
        if (bad < n) { snprintf(err, errlen, "%s: tensor %s holds %g at index %zu (a checkpoint must be finite)", path, param_names[k], tensor[bad], bad); return -1; }
        tensor += n;
    }
    return 0;
}

// Loads a checkpoint for rank of W (its experts only): the config into *c and the parameters into
// a new allocation *memory. With upcycle != NULL and upcycle->num_experts > 1, a dense checkpoint
// is upcycled (upcycle_params). 0, or -1 with err set and nothing allocated.
static inline int checkpoint_load(const char* path, const GPT2Config* upcycle, float noise, uint64_t seed, int rank, int W,
                                  GPT2Config* c, float** memory, char* err, size_t errlen) {
    GPT2Config fc; // the file's config
    int bf16;
    FILE* fp;
    float* dense = NULL;
    float* target;
    size_t sizes[NUM_PARAMETER_TENSORS], file_sizes[NUM_PARAMETER_TENSORS];
    *memory = NULL;
    if (checkpoint_open(path, &fc, &bf16, &fp, err, errlen) != 0) { return -1; }
    int upcycling = upcycle != NULL && upcycle->num_experts > 1 && fc.num_experts <= 1;
    *c = fc;
    char uerr[512];
    if (upcycling && upcycle_config(c, &fc, upcycle, uerr, sizeof(uerr)) != 0) { snprintf(err, errlen, "%s: %s", path, uerr); goto fail; }
    if (c->num_experts > 1 && c->num_experts % W != 0) {
        snprintf(err, errlen, "%s: E=%d experts cannot be split evenly over W=%d processes", path, c->num_experts, W);
        goto fail;
    }
    fill_in_parameter_sizes(sizes, c, experts_per_rank(c, W));
    fill_in_parameter_sizes(file_sizes, &fc, experts_per_rank(&fc, W));
    target = (float*)callocCheck(count_parameters(file_sizes), sizeof(float));
    if (upcycling) { dense = target; } else { *memory = target; }
    if (checkpoint_read_params(target, file_sizes, fp, path, &fc, bf16, rank, W, err, errlen) != 0) { goto fail; }
    fclose(fp);
    fp = NULL;
    if (upcycling) {
        ParameterTensors d, p;
        *memory = (float*)callocCheck(count_parameters(sizes), sizeof(float));
        point_parameters(&d, dense, file_sizes);
        point_parameters(&p, *memory, sizes);
        upcycle_params(&p, sizes, c, experts_per_rank(c, W), rank * experts_per_rank(c, W), &d, file_sizes, noise, seed);
        free(dense);
    }
    return 0;
fail:
    if (fp != NULL) { fclose(fp); }
    free(dense);
    free(*memory);
    *memory = NULL;
    return -1;
}

// Rank 0 writes the header and every tensor of the single-process layout into f (other ranks pass
// NULL), gathering each MoE layer's expert slices from their owners. Collective.
static inline void checkpoint_write_to(AtomicFile* f, const GPT2Config* c, const float* params, const size_t* sizes, const Comm* comm) {
    int header[256] = {0};
    int moe = c->num_experts > 1;
    header[0] = moe ? MOE_MODEL_MAGIC : LLMC_MODEL_MAGIC;
    header[1] = moe ? 1 : 3;
    header[2] = c->max_seq_len;
    header[3] = c->vocab_size;
    header[4] = c->num_layers;
    header[5] = c->num_heads;
    header[6] = c->channels;
    header[7] = c->padded_vocab_size;
    if (moe) {
        header[8] = c->num_experts;
        header[9] = c->top_k;
        header[10] = c->moe_every;
        header[11] = c->expert_hidden;
        header[12] = c->renorm_gates;
    }
    if (f != NULL) { atomic_write(f, header, sizeof(int), 256); }
    int Lm = num_moe_layers(c);
    float* gathered = NULL;
    const float* tensor = params;
    for (int k = 0; k < NUM_PARAMETER_TENSORS; k++) {
        size_t n = sizes[k];
        if (param_is_expert(k) && Lm > 0) {
            size_t slice = n / Lm; // one MoE layer's local experts
            if (gathered == NULL) { gathered = (float*)mallocCheck(sizes[PARAM_EXPFCW] / Lm * comm->world * sizeof(float)); }
            for (int m = 0; m < Lm; m++) {
                gather_floats(tensor + m * slice, gathered, slice, comm);
                if (f != NULL) { atomic_write(f, gathered, sizeof(float), slice * comm->world); }
            }
        } else if (f != NULL) {
            atomic_write(f, tensor, sizeof(float), n);
        }
        tensor += n;
    }
    free(gathered);
}

// writes one model file (collective; rank 0 writes). Any failure stops every rank with one line.
static inline void checkpoint_write(const char* path, const GPT2Config* c, const float* params, const size_t* sizes, const Comm* comm) {
    char err[4400] = "";
    AtomicFile f;
    int failed = comm->rank == 0 && atomic_open(&f, path, err, sizeof(err)) != 0;
    comm_check_all(failed, err, comm);
    checkpoint_write_to(comm->rank == 0 ? &f : NULL, c, params, sizes, comm);
    failed = comm->rank == 0 && (atomic_close(&f, err, sizeof(err)) != 0 || atomic_rename(&f, err, sizeof(err)) != 0);
    comm_check_all(failed, err, comm);
}

// ----------------------------------------------------------------------------
// training state of one rank: AdamW moments, step, data position, sampling RNG. With W ranks
// each writes its own file (its experts' moments differ); a resume needs the same W.

typedef struct {
    int step;
    DataLoaderPosition data;
    uint64_t rng;
} TrainState;

static inline void checkpoint_model_path(char* out, size_t n, const char* dir, int step) {
    snprintf(out, n, "%s/model_%08d.bin", dir, step);
}
static inline void checkpoint_state_path(char* out, size_t n, const char* dir, int step, int rank) {
    snprintf(out, n, "%s/state_%08d_%05d.bin", dir, step, rank);
}

static inline void state_write_to(AtomicFile* f, const TrainState* s, int rank, int W, const float* m, const float* v, size_t n) {
    int header[256] = {0};
    header[0] = STATE_MAGIC;
    header[1] = 1;
    header[2] = s->step;
    header[3] = rank;
    header[4] = W;
    int64_t fields[5] = {(int64_t)n, s->data.epoch, s->data.shard_idx, s->data.sample_idx, (int64_t)s->rng};
    atomic_write(f, header, sizeof(int), 256);
    atomic_write(f, fields, sizeof(int64_t), 5);
    atomic_write(f, m, sizeof(float), n);
    atomic_write(f, v, sizeof(float), n);
}

// Reads and validates the training state of rank of W for a model of n parameters into s, m and v
// (n each): every header field, the exact size, finite moments with v >= 0. expected_step >= 0
// also requires that step (the one in the file name). 0, or -1 with err set.
static inline int state_read(const char* path, TrainState* s, int expected_step, int rank, int W, float* m, float* v, size_t n,
                             char* err, size_t errlen) {
    FILE* fp = fopen(path, "rb");
    if (fp == NULL) { snprintf(err, errlen, "%s: cannot open training state: %s", path, strerror(errno)); return -1; }
    int header[256];
    int64_t fields[5];
    size_t bad_m, bad_v;
    if (fread(header, sizeof(int), 256, fp) != 256 || fread(fields, sizeof(int64_t), 5, fp) != 5) {
        snprintf(err, errlen, "%s: truncated training state header", path);
        goto fail;
    }
    if (header[0] != STATE_MAGIC || header[1] != 1) {
        snprintf(err, errlen, "%s: bad magic/version %d/%d (expected %d/1)", path, header[0], header[1], STATE_MAGIC);
        goto fail;
    }
    if (header[2] < 0 || (expected_step >= 0 && header[2] != expected_step)) {
        snprintf(err, errlen, "%s: step %d in the header, expected %d", path, header[2], expected_step);
        goto fail;
    }
    if (header[3] != rank || header[4] != W) {
        snprintf(err, errlen, "%s: state of rank %d of %d, this is rank %d of %d (resume with the same number of processes)",
                 path, header[3], header[4], rank, W);
        goto fail;
    }
    for (int i = 5; i < 256; i++) {
        if (header[i] != 0) { snprintf(err, errlen, "%s: header field [%d] = %d, must be 0", path, i, header[i]); goto fail; }
    }
    if (fields[0] != (int64_t)n) {
        snprintf(err, errlen, "%s: state is for %lld parameters, the model has %zu", path, (long long)fields[0], n);
        goto fail;
    }
    if (fields[1] < 0 || fields[2] < 0 || fields[3] < 0) {
        snprintf(err, errlen, "%s: negative data position (epoch %lld, shard %lld, sample %lld)", path,
                 (long long)fields[1], (long long)fields[2], (long long)fields[3]);
        goto fail;
    }
    if (fields[4] == 0) { snprintf(err, errlen, "%s: sampling RNG state 0 (xorshift would stay at 0)", path); goto fail; }
    if (fread(m, sizeof(float), n, fp) != n || fread(v, sizeof(float), n, fp) != n || fgetc(fp) != EOF) {
        snprintf(err, errlen, "%s: wrong size for %zu parameters (truncated or trailing data)", path, n);
        goto fail;
    }
    fclose(fp);
    bad_m = first_nonfinite(m, n);
    bad_v = first_nonfinite(v, n);
    for (size_t i = 0; i < n && bad_v == n; i++) { if (v[i] < 0.0f) { bad_v = i; } }
    if (bad_m < n || bad_v < n) {
        snprintf(err, errlen, "%s: AdamW moments not finite (m[%zu] = %g) or v negative (v[%zu] = %g)", path,
                 bad_m, bad_m < n ? m[bad_m] : 0.0, bad_v, bad_v < n ? v[bad_v] : 0.0);
        return -1;
    }
    s->step = header[2];
    s->data.epoch = fields[1];
    s->data.shard_idx = fields[2];
    s->data.sample_idx = fields[3];
    s->rng = (uint64_t)fields[4];
    return 0;
fail:
    fclose(fp);
    return -1;
}

// ----------------------------------------------------------------------------
// checkpoints of a run: model + every rank's state, saved and resumed collectively

// Saves step s->step into dir: every rank its state, rank 0 the model (gathering the experts).
// Every file is written to a temporary name and flushed; only when all succeeded are they renamed,
// the states first and the model last, so a model file means a complete checkpoint. A failure
// (a full disk, a folder that cannot be written, parameters that are not finite) removes every
// temporary file and stops all ranks with one line naming the file and the reason.
static inline void checkpoint_save(const char* dir, const TrainState* s, const GPT2Config* c, const float* params,
                                   const float* m, const float* v, const size_t* sizes, const Comm* comm) {
    size_t n = count_parameters(sizes);
    char err[4400] = "", path[4096];
    size_t bad = first_nonfinite(params, n);
    if (bad < n) { snprintf(err, sizeof(err), "step %d: parameter %zu is %g: not writing a checkpoint", s->step, bad, params[bad]); }
    comm_check_all(bad < n, err, comm);
    AtomicFile state, model;
    checkpoint_state_path(path, sizeof(path), dir, s->step, comm->rank);
    int failed = atomic_open(&state, path, err, sizeof(err)) != 0;
    if (!failed) {
        state_write_to(&state, s, comm->rank, comm->world, m, v, n);
        failed = atomic_close(&state, err, sizeof(err)) != 0;
    }
    checkpoint_model_path(path, sizeof(path), dir, s->step);
    int model_open = 0;
    if (comm->rank == 0 && !failed) {
        failed = atomic_open(&model, path, err, sizeof(err)) != 0;
        model_open = !failed;
    }
    // the model is gathered collectively even where a file failed, so no rank waits forever
    checkpoint_write_to(model_open ? &model : NULL, c, params, sizes, comm);
    if (model_open) { failed = atomic_close(&model, err, sizeof(err)) != 0; model_open = !failed; }
    if (comm_any(failed, comm)) {
        atomic_discard(&state);
        if (model_open) { atomic_discard(&model); }
        comm_check_all(failed, err, comm); // exits: some rank failed
    }
    failed = atomic_rename(&state, err, sizeof(err)) != 0;
    comm_check_all(failed, err, comm);
    failed = comm->rank == 0 && atomic_rename(&model, err, sizeof(err)) != 0;
    comm_check_all(failed, err, comm);
}

// the newest step <= at_most with a model file and this rank's state file in dir; -1 if none
static inline int checkpoint_newest(const char* dir, int rank, int at_most) {
    DIR* d = opendir(dir);
    if (d == NULL) { return -1; }
    int best = -1;
    struct dirent* ent;
    while ((ent = readdir(d)) != NULL) {
        int step;
        char tail;
        if (sscanf(ent->d_name, "model_%8d.bi%c", &step, &tail) == 2 && tail == 'n' && strlen(ent->d_name) == 18 &&
            step > best && step <= at_most) {
            char path[4096];
            checkpoint_state_path(path, sizeof(path), dir, step, rank);
            if (access(path, R_OK) == 0) { best = step; }
        }
    }
    closedir(d);
    return best;
}

// Loads checkpoint step of dir for this rank: its model slice (*params) and training state (*m,
// *v, s), all validated. 0, or -1 with err set and nothing allocated.
static inline int checkpoint_load_step(const char* dir, int step, int rank, int W, GPT2Config* c, float** params,
                                       float** m, float** v, TrainState* s, char* err, size_t errlen) {
    char path[4096];
    checkpoint_model_path(path, sizeof(path), dir, step);
    if (checkpoint_load(path, NULL, 0.0f, 0, rank, W, c, params, err, errlen) != 0) { return -1; }
    size_t sizes[NUM_PARAMETER_TENSORS];
    fill_in_parameter_sizes(sizes, c, experts_per_rank(c, W));
    size_t n = count_parameters(sizes);
    *m = (float*)mallocCheck(n * sizeof(float));
    *v = (float*)mallocCheck(n * sizeof(float));
    checkpoint_state_path(path, sizeof(path), dir, step, rank);
    if (state_read(path, s, step, rank, W, *m, *v, n, err, errlen) != 0) {
        free(*params); free(*m); free(*v);
        *params = *m = *v = NULL;
        return -1;
    }
    return 0;
}

// The newest checkpoint of dir that every rank can load (collective): its step, with this rank's
// model slice, moments and state loaded as checkpoint_load_step does. A newer step that is
// incomplete (a rank lacks its state file) or that some rank cannot load (truncated, corrupt) is
// named in a warning and the next older one is tried. With none left, every rank stops with one
// line that names the first rank that has none.
static inline int checkpoint_resume(const char* dir, const Comm* comm, GPT2Config* c, float** params, float** m, float** v,
                                    TrainState* s) {
    char err[4400] = "";
    int at_most = INT_MAX;
    for (;;) {
        int mine = checkpoint_newest(dir, comm->rank, at_most);
        if (mine < 0) {
            snprintf(err, sizeof(err), "flag -y 1: no checkpoint%s (model_*.bin with state_*_%05d.bin) in %s",
                     at_most == INT_MAX ? "" : " that every rank can load", comm->rank, dir);
        }
        comm_check_all(mine < 0, err, comm);
        int step = comm_min_int(mine, comm), newest = -comm_min_int(-mine, comm);
        if (newest > step && comm->rank == 0) {
            warn("checkpoint step %d in %s is incomplete (a rank has no state file for it): skipped", newest, dir);
        }
        char path[4096];
        checkpoint_state_path(path, sizeof(path), dir, step, comm->rank);
        if (comm_any(access(path, R_OK) != 0, comm)) {
            if (comm->rank == 0) { warn("checkpoint step %d in %s is incomplete (a rank has no state file for it): skipped", step, dir); }
        } else {
            int failed = checkpoint_load_step(dir, step, comm->rank, comm->world, c, params, m, v, s, err, sizeof(err)) != 0;
            if (!comm_any(failed, comm)) { return step; }
            if (failed) { warn("checkpoint step %d cannot be loaded, trying an older one: %s", step, err); }
            else { free(*params); free(*m); free(*v); *params = *m = *v = NULL; }
        }
        at_most = step - 1;
    }
}

#endif // MODEL_H

/*
dataloader.h: reads llm.c token shards and serves batches of (B,T) inputs and next-token targets,
split across W processes, optionally shuffled, resumable from three integers. llm.c's shards
(FineWeb, Tiny Shakespeare from its dev/data scripts) work as they are.

Shard format (llm.c): 256 x int32 little-endian header, [0] = 20240520 (magic), [1] = 1 (version),
[2] = ntok; then ntok uint16 little-endian tokens. Nothing before or after.

API:
  dataloader_init(&loader, "data/train_*.bin", B, T, rank, W, shuffle, seed, vocab_size);
  dataloader_next_batch(&loader);      // fills loader.inputs, loader.targets, each (B*T) ints
  pos = dataloader_position(&loader);  // {epoch, shard_idx, sample_idx} of the NEXT batch
  dataloader_resume(&loader, pos);     // continue exactly there (dataloader_reset: epoch 0 start)
  dataloader_free(&loader);

Example:
  DataLoader train;
  dataloader_init(&train, "data/tiny_shakespeare_train.bin", B, T, 0, 1, 1, 1337, 50257);
  for (int step = 0; step < steps; step++) {
      dataloader_next_batch(&train);
      gpt2_forward(&model, train.inputs, train.targets, B, T);
      ...
  }
  dataloader_free(&train);
An eval loader is the same struct with should_shuffle = 0 and dataloader_reset before each eval.

Layout (as llm.c). A sample is B*T+1 contiguous tokens: inputs are the first B*T, targets the same
span shifted by one. The W ranks together read one contiguous chunk of W*B*T+1 tokens: rank r
reads at token (s * W + r) * B*T of the shard for sample s, so the W ranks' rows, in rank order,
are exactly the rows one process with batch W*B would read. A shard holds
(ntok - 1) / (B*T*W) samples; leftover tokens at its end are never read. When a shard runs out
the next one starts; after the last, the epoch counter goes up and the shards start again.

Shuffle (should_shuffle = 1): the shard order of epoch e is a Fisher-Yates permutation drawn from
splitmix64 seeded by (seed, e), and the sample order inside shard file f (index in sorted glob
order) in epoch e one seeded by (seed, e, f). Both are pure functions of those integers, so every
rank computes the same order and a resume needs only (epoch, shard_idx, sample_idx), no RNG state.
Without shuffle: shards in sorted glob order, samples in file order, every epoch the same.
A position is valid only for the same files, B, T and W it was taken with (the sample count of a
shard depends on them); dataloader_resume exits if it is out of range (dataloader_position_check).

Checks. dataloader_init runs shard_check on every file the glob matches: header readable, magic,
version, file size exactly 1024 + 2*ntok, and ntok >= B*T*W + 1 (one batch). These read 1 KB per
file, so init stays fast on FineWeb-sized data (100 x 200 MB). Token values are checked on every
read instead (each token < vocab_size, else the error names the file and the token's position):
scanning all tokens at init would read the whole dataset on every start of every rank.
shard_check_tokens does that full scan, for data tools and tests. Any error is one line on stderr,
"error: dataloader: <file>: <what is wrong>", then a non-zero exit (utils.h's fail_exit);
shard_check, shard_check_tokens, shard_read_tokens and dataloader_position_check return a code
and fill a message instead, for tests, tools and collective checks across ranks.
Reads are one fseek + fread of the B*T+1 tokens needed; the current shard stays open.
Positions and offsets are in tokens; file offsets use long (64-bit on the LP64 systems we run on).
*/
#ifndef DATALOADER_H
#define DATALOADER_H

#include <errno.h>
#include <glob.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "utils.h" // fail_exit, mallocCheck, fopenCheck

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_HEADER_INTS 256
#define SHARD_HEADER_BYTES (SHARD_HEADER_INTS * 4)

// return codes of shard_check, shard_check_tokens, shard_read_tokens
enum {
    SHARD_OK = 0,
    SHARD_EOPEN,     // fopen failed
    SHARD_EIO,       // fseek, ftell or fread failed
    SHARD_EHEADER,   // file shorter than the 1024-byte header
    SHARD_EMAGIC,    // header[0] != 20240520
    SHARD_EVERSION,  // header[1] != 1
    SHARD_ESIZE,     // negative ntok, or file size != 1024 + 2*ntok (truncated or trailing bytes)
    SHARD_EFEW,      // ntok < min_tokens (not one batch for all processes)
    SHARD_ETOKEN,    // a token >= vocab_size
};

// fills err (if given) and returns code: the non-exiting checks report through this
static inline int shard_error(char* err, size_t errlen, int code, const char* fmt, ...) {
    if (err != NULL && errlen > 0) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err, errlen, fmt, args);
        va_end(args);
    }
    return code;
}

// ----------------------------------------------------------------------------
// shard checks and reads (return a SHARD_* code, never exit)

static inline int32_t shard_read_int32_le(const uint8_t* p) {
    uint32_t u = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
    return (int32_t)u;
}

// Header, magic, version, exact file size, and at least min_tokens tokens. 0 if valid, else a
// SHARD_* code and err = "<path>: <what is wrong>". *num_tokens (if not NULL) gets ntok.
// Does not read the tokens (see shard_check_tokens).
static inline int shard_check(const char* path, size_t min_tokens, size_t* num_tokens, char* err, size_t errlen) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) {
        return shard_error(err, errlen, SHARD_EOPEN, "%s: fopen failed: %s", path, strerror(errno));
    }
    if (fseek(f, 0, SEEK_END) != 0) {
        int e = errno;
        fclose(f);
        return shard_error(err, errlen, SHARD_EIO, "%s: fseek to end failed: %s", path, strerror(e));
    }
    long size = ftell(f);
    if (size < 0) {
        int e = errno;
        fclose(f);
        return shard_error(err, errlen, SHARD_EIO, "%s: ftell failed: %s", path, strerror(e));
    }
    if (size < SHARD_HEADER_BYTES) {
        fclose(f);
        return shard_error(err, errlen, SHARD_EHEADER,
                           "%s: %ld bytes, shorter than the %d-byte header (not an llm.c token shard)",
                           path, size, SHARD_HEADER_BYTES);
    }
    uint8_t header[SHARD_HEADER_BYTES];
    if (fseek(f, 0, SEEK_SET) != 0 || fread(header, 1, SHARD_HEADER_BYTES, f) != SHARD_HEADER_BYTES) {
        int e = errno;
        fclose(f);
        return shard_error(err, errlen, SHARD_EIO, "%s: fread of the %d-byte header failed: %s",
                           path, SHARD_HEADER_BYTES, strerror(e));
    }
    fclose(f);
    int32_t magic = shard_read_int32_le(header + 0);
    int32_t version = shard_read_int32_le(header + 4);
    int32_t ntok = shard_read_int32_le(header + 8);
    if (magic != SHARD_MAGIC) {
        return shard_error(err, errlen, SHARD_EMAGIC, "%s: bad magic %d (expected %d, llm.c token shard)",
                           path, (int)magic, SHARD_MAGIC);
    }
    if (version != SHARD_VERSION) {
        return shard_error(err, errlen, SHARD_EVERSION, "%s: bad version %d (expected %d)",
                           path, (int)version, SHARD_VERSION);
    }
    if (ntok < 0) {
        return shard_error(err, errlen, SHARD_ESIZE, "%s: bad token count %d in header", path, (int)ntok);
    }
    uint64_t expected = (uint64_t)SHARD_HEADER_BYTES + 2 * (uint64_t)ntok;
    if ((uint64_t)size != expected) {
        return shard_error(err, errlen, SHARD_ESIZE,
                           "%s: file is %ld bytes, header says %d tokens so expected %llu (%s)",
                           path, size, (int)ntok, (unsigned long long)expected,
                           (uint64_t)size < expected ? "truncated" : "trailing bytes");
    }
    if ((size_t)ntok < min_tokens) {
        return shard_error(err, errlen, SHARD_EFEW,
                           "%s: %d tokens, one batch needs at least %zu (B*T*num_processes + 1)",
                           path, (int)ntok, min_tokens);
    }
    if (num_tokens != NULL) { *num_tokens = (size_t)ntok; }
    return SHARD_OK;
}

// Reads n tokens starting at token `offset` (0 = first token after the header) from the open
// shard f, decodes them into out and checks each is < vocab_size. 0 if fine, else a SHARD_* code.
static inline int shard_read_tokens(FILE* f, const char* path, size_t offset, size_t n, int vocab_size,
                                    uint8_t* buffer, // (2*n) raw little-endian bytes
                                    int* out,        // (n)
                                    char* err, size_t errlen) {
    uint64_t byte = (uint64_t)SHARD_HEADER_BYTES + 2 * (uint64_t)offset;
    if (byte > (uint64_t)LONG_MAX) {
        return shard_error(err, errlen, SHARD_EIO, "%s: byte offset %llu does not fit in fseek's long",
                           path, (unsigned long long)byte);
    }
    if (fseek(f, (long)byte, SEEK_SET) != 0) {
        return shard_error(err, errlen, SHARD_EIO, "%s: fseek to byte %llu failed: %s",
                           path, (unsigned long long)byte, strerror(errno));
    }
    size_t got = fread(buffer, 2, n, f);
    if (got != n) {
        return shard_error(err, errlen, SHARD_EIO,
                           "%s: fread of %zu tokens at position %zu got %zu (file changed since init?)",
                           path, n, offset, got);
    }
    for (size_t i = 0; i < n; i++) {
        int token = (int)buffer[2 * i] | ((int)buffer[2 * i + 1] << 8);
        if (token >= vocab_size) {
            return shard_error(err, errlen, SHARD_ETOKEN, "%s: token %d at position %zu >= vocab_size %d",
                               path, token, offset + i, vocab_size);
        }
        out[i] = token;
    }
    return SHARD_OK;
}

// shard_check plus a scan of every token against vocab_size. Reads the whole file: for data
// tools and tests, not for init.
static inline int shard_check_tokens(const char* path, int vocab_size, char* err, size_t errlen) {
    size_t ntok;
    int rc = shard_check(path, 0, &ntok, err, errlen);
    if (rc != SHARD_OK) { return rc; }
    FILE* f = fopen(path, "rb");
    if (f == NULL) {
        return shard_error(err, errlen, SHARD_EOPEN, "%s: fopen failed: %s", path, strerror(errno));
    }
    enum { CHUNK = 4096 };
    uint8_t buffer[2 * CHUNK];
    int tokens[CHUNK];
    for (size_t start = 0; start < ntok && rc == SHARD_OK; start += CHUNK) {
        size_t n = ntok - start < (size_t)CHUNK ? ntok - start : (size_t)CHUNK;
        rc = shard_read_tokens(f, path, start, n, vocab_size, buffer, tokens, err, errlen);
    }
    fclose(f);
    return rc;
}

// ----------------------------------------------------------------------------
// permutations: pure functions of (seed, epoch, stream), so no RNG state to save

static inline uint64_t dataloader_splitmix64(uint64_t* state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// stream 0: shard order of the epoch; stream f+1: sample order of shard file f
static inline uint64_t dataloader_rng_seed(uint64_t seed, uint64_t epoch, uint64_t stream) {
    uint64_t s = seed;
    s = dataloader_splitmix64(&s) ^ epoch;
    s = dataloader_splitmix64(&s) ^ stream;
    return dataloader_splitmix64(&s);
}

// uniform in [0, n), unbiased (rejection), n >= 1
static inline uint64_t dataloader_random_below(uint64_t* state, uint64_t n) {
    uint64_t limit = UINT64_MAX - UINT64_MAX % n;
    uint64_t r;
    do { r = dataloader_splitmix64(state); } while (r >= limit);
    return r % n;
}

// identity, or a Fisher-Yates shuffle of it seeded with rng_seed
static inline void dataloader_permutation(size_t* out, // (n)
                                          size_t n, int shuffle, uint64_t rng_seed) {
    for (size_t i = 0; i < n; i++) { out[i] = i; }
    if (!shuffle) { return; }
    uint64_t state = rng_seed;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)dataloader_random_below(&state, (uint64_t)i);
        size_t tmp = out[i - 1];
        out[i - 1] = out[j];
        out[j] = tmp;
    }
}

// ----------------------------------------------------------------------------
// the loader

typedef struct {
    int64_t epoch;      // full passes over all shards done
    int64_t shard_idx;  // index into this epoch's shard order
    int64_t sample_idx; // index into this shard's sample order
} DataLoaderPosition;

typedef struct DataLoader {
    // configuration
    size_t B;
    size_t T;
    int process_rank;
    int num_processes;
    int should_shuffle;
    uint64_t seed;
    int vocab_size;
    char* pattern;
    // shards, in sorted glob order
    glob_t glob_result;
    size_t num_shards;
    size_t* shard_num_tokens;  // (num_shards)
    size_t* shard_num_samples; // (num_shards) (ntok - 1) / (B*T*num_processes)
    size_t num_tokens;         // total over shards
    size_t num_batches;        // batches per epoch (same on every rank)
    // position of the next batch (always valid: sample_idx < samples of the current shard)
    int64_t epoch;
    size_t shard_idx;
    size_t sample_idx;
    // orders for the current epoch and shard; recomputed lazily when the position moves past them
    size_t* shard_order;  // (num_shards) file index of each shard in this epoch
    int64_t shard_order_epoch;
    size_t* sample_order; // (max shard_num_samples) sample of each step in the current shard
    int64_t sample_order_epoch;
    size_t sample_order_file;
    // the open shard
    FILE* file;
    size_t file_index; // valid when file != NULL
    // buffers
    uint8_t* buffer; // (2*(B*T+1)) raw bytes of one sample
    int* tokens;     // (B*T+1)
    int* inputs;     // (B*T)
    int* targets;    // (B*T)
} DataLoader;

static inline void dataloader_prepare_shard_order(DataLoader* loader) {
    if (loader->shard_order_epoch == loader->epoch) { return; }
    dataloader_permutation(loader->shard_order, loader->num_shards, loader->should_shuffle,
                           dataloader_rng_seed(loader->seed, (uint64_t)loader->epoch, 0));
    loader->shard_order_epoch = loader->epoch;
}

// file index of the current shard (computes the epoch's shard order if needed)
static inline size_t dataloader_current_file(DataLoader* loader) {
    dataloader_prepare_shard_order(loader);
    return loader->shard_order[loader->shard_idx];
}

static inline void dataloader_reset(DataLoader* loader) {
    loader->epoch = 0;
    loader->shard_idx = 0;
    loader->sample_idx = 0;
}

// checks every shard a pattern matches, without exiting: 0, or non-zero with err filled. Lets a
// multi-process trainer agree that all ranks can read their data before any rank exits.
static inline int dataloader_check_pattern(const char* filename_pattern, size_t min_tokens, char* err, size_t errlen) {
    glob_t g;
    int status = glob(filename_pattern, 0, NULL, &g);
    if (status != 0) {
        snprintf(err, errlen, "dataloader: %s: %s", filename_pattern, status == GLOB_NOMATCH ? "no files match this pattern" : "glob failed");
        globfree(&g);
        return -1;
    }
    int rc = 0;
    for (size_t i = 0; i < g.gl_pathc && rc == 0; i++) {
        size_t ntok;
        char msg[768];
        if (shard_check(g.gl_pathv[i], min_tokens, &ntok, msg, sizeof(msg)) != SHARD_OK) {
            snprintf(err, errlen, "dataloader: %s", msg);
            rc = -1;
        }
    }
    globfree(&g);
    return rc;
}

static inline void dataloader_init(DataLoader* loader, const char* filename_pattern, size_t B, size_t T,
                                   int process_rank, int num_processes, int should_shuffle, uint64_t seed,
                                   int vocab_size) {
    if (B == 0 || T == 0) { fail_exit("dataloader: %s: B=%zu and T=%zu must be positive", filename_pattern, B, T); }
    if (num_processes < 1 || process_rank < 0 || process_rank >= num_processes) {
        fail_exit("dataloader: %s: process_rank %d out of range for num_processes %d",
                        filename_pattern, process_rank, num_processes);
    }
    if (vocab_size < 1 || vocab_size > 65536) {
        fail_exit("dataloader: %s: vocab_size %d out of range (1..65536 for uint16 tokens)", filename_pattern, vocab_size);
    }
    loader->B = B;
    loader->T = T;
    loader->process_rank = process_rank;
    loader->num_processes = num_processes;
    loader->should_shuffle = should_shuffle;
    loader->seed = seed;
    loader->vocab_size = vocab_size;
    size_t pattern_len = strlen(filename_pattern) + 1;
    loader->pattern = (char*)mallocCheck(pattern_len);
    memcpy(loader->pattern, filename_pattern, pattern_len);

    int glob_status = glob(filename_pattern, 0, NULL, &loader->glob_result);
    if (glob_status == GLOB_NOMATCH) { fail_exit("dataloader: %s: no files match this pattern", filename_pattern); }
    if (glob_status != 0) { fail_exit("dataloader: %s: glob failed (code %d)", filename_pattern, glob_status); }
    loader->num_shards = loader->glob_result.gl_pathc;

    // check every shard now (1 KB each), so a bad file fails at start, not hours into a run
    size_t BT = B * T;
    size_t chunk = BT * (size_t)num_processes; // tokens all ranks consume per step
    loader->shard_num_tokens = (size_t*)mallocCheck(loader->num_shards * sizeof(size_t));
    loader->shard_num_samples = (size_t*)mallocCheck(loader->num_shards * sizeof(size_t));
    loader->shard_order = (size_t*)mallocCheck(loader->num_shards * sizeof(size_t));
    loader->num_tokens = 0;
    loader->num_batches = 0;
    size_t max_samples = 0;
    for (size_t i = 0; i < loader->num_shards; i++) {
        char err[1024];
        size_t ntok = 0;
        if (shard_check(loader->glob_result.gl_pathv[i], chunk + 1, &ntok, err, sizeof(err)) != SHARD_OK) {
            fail_exit("dataloader: %s", err);
        }
        loader->shard_num_tokens[i] = ntok;
        loader->shard_num_samples[i] = (ntok - 1) / chunk;
        loader->num_tokens += ntok;
        loader->num_batches += loader->shard_num_samples[i];
        if (loader->shard_num_samples[i] > max_samples) { max_samples = loader->shard_num_samples[i]; }
    }
    loader->sample_order = (size_t*)mallocCheck(max_samples * sizeof(size_t));
    loader->shard_order_epoch = -1;
    loader->sample_order_epoch = -1;
    loader->sample_order_file = 0;
    loader->file = NULL;
    loader->file_index = 0;

    loader->buffer = (uint8_t*)mallocCheck(2 * (BT + 1));
    loader->tokens = (int*)mallocCheck((BT + 1) * sizeof(int));
    loader->inputs = (int*)mallocCheck(BT * sizeof(int));
    loader->targets = (int*)mallocCheck(BT * sizeof(int));
    dataloader_reset(loader);
}

static inline void dataloader_next_batch(DataLoader* loader) {
    size_t BT = loader->B * loader->T;
    size_t f = dataloader_current_file(loader);
    const char* path = loader->glob_result.gl_pathv[f];
    if (loader->file == NULL || loader->file_index != f) {
        if (loader->file != NULL) { fclose(loader->file); }
        loader->file = fopenCheck(path, "rb");
        loader->file_index = f;
    }
    if (loader->sample_order_epoch != loader->epoch || loader->sample_order_file != f) {
        dataloader_permutation(loader->sample_order, loader->shard_num_samples[f], loader->should_shuffle,
                               dataloader_rng_seed(loader->seed, (uint64_t)loader->epoch, (uint64_t)f + 1));
        loader->sample_order_epoch = loader->epoch;
        loader->sample_order_file = f;
    }
    // llm.c layout: the ranks' samples are adjacent, so together they read one contiguous chunk
    size_t sample = loader->sample_order[loader->sample_idx];
    size_t offset = (sample * (size_t)loader->num_processes + (size_t)loader->process_rank) * BT;
    char err[1024];
    if (shard_read_tokens(loader->file, path, offset, BT + 1, loader->vocab_size,
                          loader->buffer, loader->tokens, err, sizeof(err)) != SHARD_OK) {
        fail_exit("dataloader: %s", err);
    }
    memcpy(loader->inputs, loader->tokens, BT * sizeof(int));
    memcpy(loader->targets, loader->tokens + 1, BT * sizeof(int));

    // advance to the next batch, keeping the position normalised
    loader->sample_idx++;
    if (loader->sample_idx == loader->shard_num_samples[f]) {
        loader->sample_idx = 0;
        loader->shard_idx++;
        if (loader->shard_idx == loader->num_shards) {
            loader->shard_idx = 0;
            loader->epoch++;
        }
    }
}

static inline DataLoaderPosition dataloader_position(const DataLoader* loader) {
    DataLoaderPosition pos;
    pos.epoch = loader->epoch;
    pos.shard_idx = (int64_t)loader->shard_idx;
    pos.sample_idx = (int64_t)loader->sample_idx;
    return pos;
}

// 0 if pos is a position of this loader's data with its B, T and process count, else -1 with
// err filled (a resume checks it on every rank before any rank moves)
static inline int dataloader_position_check(DataLoader* loader, DataLoaderPosition pos, char* err, size_t errlen) {
    if (pos.epoch < 0 || pos.shard_idx < 0 || (uint64_t)pos.shard_idx >= loader->num_shards || pos.sample_idx < 0) {
        snprintf(err, errlen, "dataloader: %s: resume position (epoch %lld, shard %lld, sample %lld) out of range for %zu shards",
                 loader->pattern, (long long)pos.epoch, (long long)pos.shard_idx, (long long)pos.sample_idx, loader->num_shards);
        return -1;
    }
    dataloader_permutation(loader->shard_order, loader->num_shards, loader->should_shuffle,
                           dataloader_rng_seed(loader->seed, (uint64_t)pos.epoch, 0));
    loader->shard_order_epoch = pos.epoch;
    size_t f = loader->shard_order[pos.shard_idx];
    if ((uint64_t)pos.sample_idx >= loader->shard_num_samples[f]) {
        snprintf(err, errlen, "dataloader: %s: resume position (epoch %lld, shard %lld, sample %lld) out of range: %s has %zu samples"
                 " with B=%zu T=%zu num_processes=%d (different data, B, T or process count?)",
                 loader->pattern, (long long)pos.epoch, (long long)pos.shard_idx, (long long)pos.sample_idx,
                 loader->glob_result.gl_pathv[f], loader->shard_num_samples[f], loader->B, loader->T, loader->num_processes);
        return -1;
    }
    return 0;
}

static inline void dataloader_resume(DataLoader* loader, DataLoaderPosition pos) {
    char err[2048];
    if (dataloader_position_check(loader, pos, err, sizeof(err)) != 0) { fail_exit("%s", err); }
    loader->epoch = pos.epoch;
    loader->shard_idx = (size_t)pos.shard_idx;
    loader->sample_idx = (size_t)pos.sample_idx;
}

static inline void dataloader_free(DataLoader* loader) {
    if (loader->file != NULL) { fclose(loader->file); }
    loader->file = NULL;
    globfree(&loader->glob_result);
    free(loader->pattern);
    free(loader->shard_num_tokens);
    free(loader->shard_num_samples);
    free(loader->shard_order);
    free(loader->sample_order);
    free(loader->buffer);
    free(loader->tokens);
    free(loader->inputs);
    free(loader->targets);
}

#endif // DATALOADER_H

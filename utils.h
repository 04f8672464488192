/*
utils.h: the plumbing every llm.moe program shares, as llm.c's llmc/utils.h: errors as one line
that names the failing call, printf0, checked allocation and file calls, files written atomically,
a wall clock and the deterministic random numbers of initialisation and sampling.

API:
  printf0("...", ...);                 // printf on rank 0 only (process_rank, set by comm_init)
  fail_exit("what is wrong: %d", x);   // "error: what is wrong: 3" on stderr, exit(EXIT_FAILURE)
  p = mallocCheck(n); fp = fopenCheck(path, "rb"); fcloseCheck(fp); ...
  AtomicFile f; atomic_open(&f, path, err, errlen); atomic_write(&f, p, size, n);
  atomic_close(&f, err, errlen); atomic_rename(&f, err, errlen);   // or atomic_discard(&f)

Example, a file that is either complete under its name or absent, never half-written:
  AtomicFile f;
  char err[512];
  if (atomic_open(&f, "out/model.bin", err, sizeof(err)) != 0) { fail_exit("%s", err); }
  atomic_write(&f, header, sizeof(int), 256);
  if (atomic_close(&f, err, sizeof(err)) != 0 || atomic_rename(&f, err, sizeof(err)) != 0) { fail_exit("%s", err); }

Errors that can differ between ranks (a file one rank cannot write) are returned with a message
rather than exited on, so that comm_check_all (comm.h) can stop every rank with one line.
*/
#ifndef UTILS_H
#define UTILS_H

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h> // madvise
#include <time.h>
#include <unistd.h>

// ----------------------------------------------------------------------------
// printing and errors

// this process's rank (0 without MPI); comm_init sets it
static int process_rank = 0;
#define printf0(...) do { if (process_rank == 0) { printf(__VA_ARGS__); } } while (0)

// one line on stderr: "error: " or "warning: ", the rank when it is not 0, the message
static inline void print_line(const char* kind, const char* fmt, va_list args) {
    fflush(stdout);
    fprintf(stderr, "%s: ", kind);
    if (process_rank > 0) { fprintf(stderr, "rank %d: ", process_rank); }
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
}

// Errors print one line and exit non-zero. While every rank runs the same checks on the same
// input (flags, config), only rank 0 prints, so W processes give one line, not W.
static int errors_on_every_rank = 0; // set where ranks can fail for different reasons
static inline void fail_exit(const char* fmt, ...) {
    if (process_rank == 0 || errors_on_every_rank) {
        va_list args;
        va_start(args, fmt);
        print_line("error", fmt, args);
        va_end(args);
    }
    exit(EXIT_FAILURE);
}

// a warning never stops the run
static inline void warn(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    print_line("warning", fmt, args);
    va_end(args);
}

// ----------------------------------------------------------------------------
// checked calls: each names the call, the file and the line that failed

// Big buffers (the parameters, their gradients, AdamW's moments, the activations) go on 2 MiB
// transparent huge pages where the kernel offers them only on request ('madvise', Debian's
// default): before a page is touched, so the first touch maps 2 MiB at once. The passes that
// stream every parameter each step then miss the TLB 512x less often (AdamW of MoE d6 E=8: 54 ->
// 47 ms of a 365 ms step, README "Benchmark"), and startup takes 30x fewer page faults.
static inline void advise_huge_pages(void* ptr, size_t size) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (ptr == NULL || size < 4 * huge) { return; }
    uintptr_t from = ((uintptr_t)ptr + huge - 1) & ~(huge - 1), to = ((uintptr_t)ptr + size) & ~(huge - 1);
    madvise((void*)from, to - from, MADV_HUGEPAGE); // a hint: where it fails, pages stay 4 KiB
#else
    (void)ptr, (void)size;
#endif
}

static inline void* malloc_check(size_t size, const char* file, int line) {
    void* ptr = malloc(size);
    if (ptr == NULL && size > 0) { fail_exit("malloc of %zu bytes failed at %s:%d", size, file, line); }
    advise_huge_pages(ptr, size);
    return ptr;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static inline void* calloc_check(size_t n, size_t size, const char* file, int line) {
    void* ptr = calloc(n, size);
    if (ptr == NULL && n * size > 0) { fail_exit("calloc of %zu bytes failed at %s:%d", n * size, file, line); }
    advise_huge_pages(ptr, n * size);
    return ptr;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

static inline FILE* fopen_check(const char* path, const char* mode, const char* file, int line) {
    FILE* fp = fopen(path, mode);
    if (fp == NULL) { fail_exit("could not open %s (mode %s): %s, at %s:%d", path, mode, strerror(errno), file, line); }
    return fp;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

static inline void fwrite_check(const void* ptr, size_t size, size_t n, FILE* fp, const char* file, int line) {
    if (fwrite(ptr, size, n, fp) != n) { fail_exit("fwrite of %zu items failed: %s, at %s:%d", n, strerror(errno), file, line); }
}
#define fwriteCheck(ptr, size, n, fp) fwrite_check(ptr, size, n, fp, __FILE__, __LINE__)

static inline void fclose_check(FILE* fp, const char* file, int line) {
    if (fclose(fp) != 0) { fail_exit("fclose failed: %s, at %s:%d", strerror(errno), file, line); }
}
#define fcloseCheck(fp) fclose_check(fp, __FILE__, __LINE__)

// ----------------------------------------------------------------------------
// atomic files: written to PATH.tmp, flushed to the disk (fsync), then renamed to PATH. The
// first failure is kept (with errno) and reported by atomic_close, which then removes the
// temporary file: a full disk leaves no .tmp behind and never a half-written file under PATH.

typedef struct {
    FILE* fp;
    char path[4096];
    char tmp[4100];
    const char* failed_call; // the first call that failed, NULL if none
    int failed_errno;
} AtomicFile;

static inline int atomic_fail(AtomicFile* f, char* err, size_t errlen) {
    if (f->fp != NULL) { fclose(f->fp); f->fp = NULL; }
    remove(f->tmp);
    snprintf(err, errlen, "writing %s: %s failed: %s", f->path, f->failed_call, strerror(f->failed_errno));
    return -1;
}

static inline int atomic_open(AtomicFile* f, const char* path, char* err, size_t errlen) {
    memset(f, 0, sizeof(*f));
    if (strlen(path) >= sizeof(f->path)) { snprintf(err, errlen, "path too long: %.200s...", path); return -1; }
    snprintf(f->path, sizeof(f->path), "%s", path);
    snprintf(f->tmp, sizeof(f->tmp), "%s.tmp", path);
    f->fp = fopen(f->tmp, "wb");
    if (f->fp == NULL) {
        snprintf(err, errlen, "cannot create %s: %s", f->tmp, strerror(errno));
        return -1;
    }
    return 0;
}

static inline void atomic_write(AtomicFile* f, const void* ptr, size_t size, size_t n) {
    if (f->failed_call != NULL || n == 0) { return; }
    if (fwrite(ptr, size, n, f->fp) != n) { f->failed_call = "fwrite"; f->failed_errno = errno; }
}

// flushes and closes the temporary file; on any failure so far removes it and explains in err
static inline int atomic_close(AtomicFile* f, char* err, size_t errlen) {
    if (f->failed_call == NULL && fflush(f->fp) != 0) { f->failed_call = "fflush"; f->failed_errno = errno; }
    if (f->failed_call == NULL && fsync(fileno(f->fp)) != 0) { f->failed_call = "fsync"; f->failed_errno = errno; }
    if (f->failed_call != NULL) { return atomic_fail(f, err, errlen); }
    int rc = fclose(f->fp);
    f->fp = NULL;
    if (rc != 0) { f->failed_call = "fclose"; f->failed_errno = errno; return atomic_fail(f, err, errlen); }
    return 0;
}

// after atomic_close: the file appears under its name
static inline int atomic_rename(AtomicFile* f, char* err, size_t errlen) {
    if (rename(f->tmp, f->path) != 0) {
        f->failed_call = "rename";
        f->failed_errno = errno;
        return atomic_fail(f, err, errlen);
    }
    return 0;
}

// gives up on the file (another file of the same checkpoint failed)
static inline void atomic_discard(AtomicFile* f) {
    if (f->fp != NULL) { fclose(f->fp); f->fp = NULL; }
    remove(f->tmp);
}

// ----------------------------------------------------------------------------
// time and random numbers

static inline double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// xorshift* for sampling and init, Box-Muller for normals: deterministic on every platform
static inline uint32_t random_u32(uint64_t* state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}
static inline float random_f32(uint64_t* state) { // in [0, 1)
    return (random_u32(state) >> 8) / 16777216.0f;
}
static inline void normal_fill(float* out, size_t n, float std, uint64_t* state) {
    for (size_t i = 0; i < n; i++) {
        float u1 = random_f32(state), u2 = random_f32(state);
        out[i] = std * sqrtf(-2.0f * logf(1.0f - u1)) * cosf(2.0f * (float)M_PI * u2);
    }
}

#endif // UTILS_H

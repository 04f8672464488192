/*
Tests of dataloader.h: shard checks, sharding across ranks, shuffling, resume, bad shards. A
program of its own (the Makefile builds dev/test_dataloader; dev/run_tests.sh runs it):
  make dev/test_dataloader && ./dev/test_dataloader
It writes small shards into a mkdtemp directory under /tmp and removes them at the end. The
exiting paths (dataloader_init on a bad shard, a bad token met by dataloader_next_batch, a bad
resume position) run in a forked child whose stderr is captured. POSIX only.
*/
#include "dataloader.h"
#include "testing.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define DL_VOCAB 50257
#define DL_MAX_FILES 64

static char dl_dir[64];
static char dl_files[DL_MAX_FILES][128];
static int dl_num_files;

// dl_dir/name, in a buffer the next call overwrites
static const char* dl_path(const char* name) {
    static char path[128];
    snprintf(path, sizeof(path), "%s/%s", dl_dir, name);
    return path;
}

// keeps a path for cleanup; the returned copy stays valid (dl_path's buffer does not)
static const char* dl_remember(const char* path) {
    if (dl_num_files == DL_MAX_FILES) { fprintf(stderr, "test_dataloader: too many files\n"); exit(EXIT_FAILURE); }
    snprintf(dl_files[dl_num_files], sizeof(dl_files[0]), "%s", path);
    return dl_files[dl_num_files++];
}

// Writes a shard with explicit header fields (so tests can corrupt them), n tokens, and
// `trailing` extra zero bytes. Returns the path.
static const char* dl_write_shard_raw(const char* name, int32_t magic, int32_t version, int32_t ntok_header,
                                      const uint16_t* tokens, size_t n, size_t trailing) {
    const char* path = dl_path(name);
    FILE* f = fopen(path, "wb");
    if (f == NULL) { perror(path); exit(EXIT_FAILURE); }
    uint8_t header[SHARD_HEADER_BYTES] = {0};
    int32_t fields[3] = {magic, version, ntok_header};
    for (int i = 0; i < 3; i++) {
        uint32_t u = (uint32_t)fields[i];
        for (int b = 0; b < 4; b++) { header[4 * i + b] = (uint8_t)(u >> (8 * b)); }
    }
    fwrite(header, 1, sizeof(header), f);
    for (size_t i = 0; i < n; i++) {
        uint8_t le[2] = {(uint8_t)(tokens[i] & 0xff), (uint8_t)(tokens[i] >> 8)};
        fwrite(le, 1, 2, f);
    }
    for (size_t i = 0; i < trailing; i++) { fputc(0, f); }
    fclose(f);
    return dl_remember(path);
}

static const char* dl_write_shard(const char* name, const uint16_t* tokens, size_t n) {
    return dl_write_shard_raw(name, SHARD_MAGIC, SHARD_VERSION, (int32_t)n, tokens, n, 0);
}

// shard whose token i is base + i * stride (mod DL_VOCAB)
static const char* dl_write_shard_seq(const char* name, size_t n, uint32_t base, uint32_t stride) {
    uint16_t* tokens = (uint16_t*)malloc(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) { tokens[i] = (uint16_t)((base + (uint64_t)i * stride) % DL_VOCAB); }
    const char* path = dl_write_shard(name, tokens, n);
    free(tokens);
    return path;
}

// the next nb batches of a fresh loader: inputs and targets, each (nb, B*T)
static void dl_collect(const char* pattern, size_t B, size_t T, int rank, int W, int shuffle, uint64_t seed,
                       int nb, int* inputs, int* targets) {
    DataLoader loader;
    dataloader_init(&loader, pattern, B, T, rank, W, shuffle, seed, DL_VOCAB);
    for (int k = 0; k < nb; k++) {
        dataloader_next_batch(&loader);
        memcpy(inputs + (size_t)k * B * T, loader.inputs, B * T * sizeof(int));
        memcpy(targets + (size_t)k * B * T, loader.targets, B * T * sizeof(int));
    }
    dataloader_free(&loader);
}

static int dl_pos_eq(DataLoaderPosition a, int64_t epoch, int64_t shard_idx, int64_t sample_idx) {
    return a.epoch == epoch && a.shard_idx == shard_idx && a.sample_idx == sample_idx;
}

static void dl_child_init(const void* pattern) {
    DataLoader loader;
    dataloader_init(&loader, pattern, 2, 4, 0, 1, 0, 0, DL_VOCAB);
    dataloader_free(&loader);
}

static void dl_child_read_epoch(const void* pattern) {
    DataLoader loader;
    dataloader_init(&loader, pattern, 2, 4, 0, 1, 0, 0, DL_VOCAB);
    for (size_t k = 0; k < loader.num_batches; k++) { dataloader_next_batch(&loader); }
    dataloader_free(&loader);
}

static void dl_child_resume(const void* pattern) {
    DataLoader loader;
    dataloader_init(&loader, pattern, 2, 4, 0, 1, 1, 0, DL_VOCAB);
    DataLoaderPosition pos = {0, 0, 999};
    dataloader_resume(&loader, pos);
    dataloader_free(&loader);
}

// exits with EXIT_FAILURE, one line on stderr, "error: dataloader: ..." containing want1, want2
static void dl_check_exits(const char* name, void (*fn)(const void*), const char* arg, const char* want1, const char* want2) {
    check_exits(name, fn, arg, "error: dataloader: ", want1, want2);
}

// shard_check (or shard_check_tokens when vocab_size > 0) gives `code` and names the file
static void dl_check_rejects(const char* name, const char* path, size_t min_tokens, int vocab_size,
                             int code, const char* want) {
    char err[1024] = "";
    int rc = vocab_size > 0 ? shard_check_tokens(path, vocab_size, err, sizeof(err))
                            : shard_check(path, min_tokens, NULL, err, sizeof(err));
    const char* base = strrchr(path, '/') + 1;
    check(rc == code && strstr(err, path) != NULL && strstr(err, base) != NULL && strstr(err, want) != NULL,
          name, "code %d (want %d): %s", rc, code, err);
}

static void test_dataloader(void) {
    snprintf(dl_dir, sizeof(dl_dir), "/tmp/test_dataloader_XXXXXX");
    if (mkdtemp(dl_dir) == NULL) { perror("mkdtemp"); check(0, "dataloader_mkdtemp", "failed"); return; }
    char pattern[256];

    // (1) one shard in order: 27 tokens, B*T = 8 -> 3 samples, the last 2 tokens never read
    {
        dl_write_shard_seq("one_000.bin", 27, 100, 1);
        snprintf(pattern, sizeof(pattern), "%s/one_*.bin", dl_dir);
        DataLoader loader;
        dataloader_init(&loader, pattern, 2, 4, 0, 1, 0, 0, DL_VOCAB);
        check(loader.num_shards == 1 && loader.num_tokens == 27 && loader.num_batches == 3,
              "dataloader_simple_counts", "shards %zu tokens %zu batches %zu (want 1 27 3)",
              loader.num_shards, loader.num_tokens, loader.num_batches);
        int bad = 0;
        for (int k = 0; k < 3; k++) {
            dataloader_next_batch(&loader);
            for (int i = 0; i < 8; i++) {
                bad += loader.inputs[i] != 100 + 8 * k + i;
                bad += loader.targets[i] != 101 + 8 * k + i;
            }
        }
        check(bad == 0, "dataloader_simple_batches", "%d wrong tokens in 3 batches", bad);
        DataLoaderPosition pos = dataloader_position(&loader);
        check(dl_pos_eq(pos, 1, 0, 0), "dataloader_simple_epoch_position", "after 3 batches (%lld,%lld,%lld), want (1,0,0)",
              (long long)pos.epoch, (long long)pos.shard_idx, (long long)pos.sample_idx);
        dataloader_next_batch(&loader);
        check(loader.inputs[0] == 100 && loader.targets[7] == 108, "dataloader_simple_epoch_wraps",
              "4th batch starts at %d ends target %d (want 100, 108)", loader.inputs[0], loader.targets[7]);
        dataloader_next_batch(&loader);
        dataloader_reset(&loader);
        pos = dataloader_position(&loader);
        dataloader_next_batch(&loader);
        check(dl_pos_eq(pos, 0, 0, 0) && loader.inputs[0] == 100 && loader.inputs[7] == 107 && loader.targets[7] == 108,
              "dataloader_simple_reset", "position (%lld,%lld,%lld), batch starts at %d",
              (long long)pos.epoch, (long long)pos.shard_idx, (long long)pos.sample_idx, loader.inputs[0]);
        dataloader_free(&loader);
    }

    // (1b) two shards in glob order, unshuffled: 2 then 3 samples, then wrap
    {
        dl_write_shard_seq("two_001.bin", 3 * 8 + 1, 2000, 1);
        dl_write_shard_seq("two_000.bin", 2 * 8 + 1 + 5, 1000, 1);
        snprintf(pattern, sizeof(pattern), "%s/two_*.bin", dl_dir);
        DataLoader loader;
        dataloader_init(&loader, pattern, 2, 4, 0, 1, 0, 0, DL_VOCAB);
        int want[7] = {1000, 1008, 2000, 2008, 2016, 1000, 1008};
        int bad = 0;
        for (int k = 0; k < 7; k++) {
            dataloader_next_batch(&loader);
            for (int i = 0; i < 8; i++) {
                bad += loader.inputs[i] != want[k] + i;
                bad += loader.targets[i] != want[k] + i + 1;
            }
        }
        DataLoaderPosition pos = dataloader_position(&loader);
        check(bad == 0 && dl_pos_eq(pos, 1, 1, 0), "dataloader_two_shards_in_order",
              "%d wrong tokens in 7 batches, position (%lld,%lld,%lld) want (1,1,0)", bad,
              (long long)pos.epoch, (long long)pos.shard_idx, (long long)pos.sample_idx);
        dataloader_free(&loader);
    }

    // (2) W ranks of batch B/W read exactly what one process of batch B reads, row for row
    // two shards of 5 and 3 samples at W*B*T = 32; 20 batches cross shards and epochs
    dl_write_shard_seq("mix_000.bin", 32 * 5 + 1 + 3, 7, 13);
    dl_write_shard_seq("mix_001.bin", 32 * 3 + 1, 10007, 13);
    snprintf(pattern, sizeof(pattern), "%s/mix_*.bin", dl_dir);
    {
        enum { NB = 20, BT = 32, T = 8 };
        static int ref_in[NB * BT], ref_tg[NB * BT], in[NB * BT], tg[NB * BT];
        for (int shuffle = 0; shuffle <= 1; shuffle++) {
            dl_collect(pattern, 4, T, 0, 1, shuffle, 1337, NB, ref_in, ref_tg);
            for (int W = 2; W <= 4; W *= 2) {
                size_t B = (size_t)(4 / W);
                int bad = 0;
                for (int r = 0; r < W; r++) {
                    dl_collect(pattern, B, T, r, W, shuffle, 1337, NB, in, tg);
                    for (int k = 0; k < NB; k++) {
                        for (size_t i = 0; i < B * T; i++) {
                            size_t ref = (size_t)k * BT + (size_t)r * B * T + i; // rank r's rows of batch k
                            bad += in[(size_t)k * B * T + i] != ref_in[ref];
                            bad += tg[(size_t)k * B * T + i] != ref_tg[ref];
                        }
                    }
                }
                char name[64];
                snprintf(name, sizeof(name), "dataloader_ranks_W%d_%s", W, shuffle ? "shuffled" : "ordered");
                check(bad == 0, name, "%d tokens differ from W=1 B=4 over %d batches", bad, NB);
            }
        }
    }

    // (3) resume: the position after k batches, given to another loader, continues identically
    {
        enum { NB = 30, BT = 32, NEXT = 10, KMAX = 20 };
        static int ref_in[NB * BT], ref_tg[NB * BT];
        DataLoaderPosition ref_pos[NB + 1];
        DataLoader loader;
        dataloader_init(&loader, pattern, 4, 8, 0, 1, 1, 42, DL_VOCAB);
        ref_pos[0] = dataloader_position(&loader);
        for (int k = 0; k < NB; k++) {
            dataloader_next_batch(&loader);
            memcpy(ref_in + k * BT, loader.inputs, BT * sizeof(int));
            memcpy(ref_tg + k * BT, loader.targets, BT * sizeof(int));
            ref_pos[k + 1] = dataloader_position(&loader);
        }
        int shard_cross = 0;
        for (int k = 1; k <= 8; k++) { shard_cross += ref_pos[k].shard_idx != ref_pos[k - 1].shard_idx; }
        check(dl_pos_eq(ref_pos[8], 1, 0, 0) && dl_pos_eq(ref_pos[16], 2, 0, 0) && shard_cross == 2,
              "dataloader_resume_positions", "epoch boundaries at 8 and 16 batches, %d shard changes in epoch 0",
              shard_cross);
        int bad = 0;
        for (int k = 0; k <= KMAX; k++) {
            DataLoader fresh;
            dataloader_init(&fresh, pattern, 4, 8, 0, 1, 1, 42, DL_VOCAB);
            dataloader_resume(&fresh, ref_pos[k]);
            for (int j = 0; j < NEXT; j++) {
                dataloader_next_batch(&fresh);
                bad += memcmp(fresh.inputs, ref_in + (k + j) * BT, BT * sizeof(int)) != 0;
                bad += memcmp(fresh.targets, ref_tg + (k + j) * BT, BT * sizeof(int)) != 0;
            }
            dataloader_free(&fresh);
        }
        check(bad == 0, "dataloader_resume_fresh", "%d of %d batches differ, resuming after 0..%d batches",
              bad / 2, (KMAX + 1) * NEXT, KMAX);
        // resume backwards in a loader already mid-run (its cached orders belong to another epoch)
        bad = 0;
        for (int k = 0; k <= KMAX; k += 3) {
            dataloader_resume(&loader, ref_pos[k]);
            for (int j = 0; j < NEXT; j++) {
                dataloader_next_batch(&loader);
                bad += memcmp(loader.inputs, ref_in + (k + j) * BT, BT * sizeof(int)) != 0;
            }
        }
        check(bad == 0, "dataloader_resume_used_loader", "%d batches differ", bad);
        dataloader_free(&loader);
        // rank 1 of 2 resumes too (positions are the same on every rank)
        static int r1_in[NB * 16];
        static int r1_tg[NB * 16];
        dl_collect(pattern, 2, 8, 1, 2, 1, 42, NB, r1_in, r1_tg);
        bad = 0;
        for (int k = 5; k <= 17; k += 3) {
            DataLoader fresh;
            dataloader_init(&fresh, pattern, 2, 8, 1, 2, 1, 42, DL_VOCAB);
            dataloader_resume(&fresh, ref_pos[k]);
            for (int j = 0; j < NEXT; j++) {
                dataloader_next_batch(&fresh);
                bad += memcmp(fresh.inputs, r1_in + (k + j) * 16, 16 * sizeof(int)) != 0;
            }
            dataloader_free(&fresh);
        }
        check(bad == 0, "dataloader_resume_rank1_of_2", "%d batches differ", bad);
    }

    // (4) shuffle: 40 + 24 samples of 4 tokens; token = 20000*shard + i, so inputs[0] names the sample
    {
        enum { S0 = 40, S1 = 24, NS = S0 + S1, EPOCHS = 3, NB = EPOCHS * NS };
        dl_write_shard_seq("perm_000.bin", 4 * S0 + 1, 0, 1);
        dl_write_shard_seq("perm_001.bin", 4 * S1 + 1, 20000, 1);
        snprintf(pattern, sizeof(pattern), "%s/perm_*.bin", dl_dir);
        static int a_in[NB * 4], a_tg[NB * 4], b_in[NB * 4], b_tg[NB * 4], c_in[NB * 4], c_tg[NB * 4];
        static int o_in[NB * 4], o_tg[NB * 4];
        dl_collect(pattern, 1, 4, 0, 1, 1, 7, NB, a_in, a_tg);
        dl_collect(pattern, 1, 4, 0, 1, 1, 7, NB, b_in, b_tg);
        dl_collect(pattern, 1, 4, 0, 1, 1, 8, NB, c_in, c_tg);
        dl_collect(pattern, 1, 4, 0, 1, 0, 7, NB, o_in, o_tg);
        check(memcmp(a_in, b_in, sizeof(a_in)) == 0 && memcmp(a_tg, b_tg, sizeof(a_tg)) == 0,
              "dataloader_shuffle_same_seed", "%d batches identical", NB);
        int diff_seed = 0, diff_order = 0, diff_epoch = 0;
        for (int k = 0; k < NS; k++) {
            diff_seed += a_in[4 * k] != c_in[4 * k];
            diff_order += a_in[4 * k] != o_in[4 * k];
            diff_epoch += a_in[4 * k] != a_in[4 * (k + NS)];
        }
        check(diff_seed > NS / 2, "dataloader_shuffle_other_seed", "%d of %d samples differ in epoch 0", diff_seed, NS);
        check(diff_order > NS / 2, "dataloader_shuffle_vs_ordered", "%d of %d samples differ in epoch 0", diff_order, NS);
        check(diff_epoch > NS / 2, "dataloader_shuffle_per_epoch", "%d of %d samples differ between epochs 0 and 1",
              diff_epoch, NS);
        // every epoch visits each sample once, one shard after the other; targets stay inputs shifted
        int bad_visit = 0, bad_contig = 0, bad_shift = 0, first_shard[EPOCHS];
        for (int e = 0; e < EPOCHS; e++) {
            int seen[NS] = {0};
            first_shard[e] = a_in[4 * e * NS] / 20000;
            for (int k = 0; k < NS; k++) {
                const int* x = a_in + 4 * (e * NS + k);
                const int* y = a_tg + 4 * (e * NS + k);
                int shard = x[0] / 20000, sample = (x[0] % 20000) / 4;
                int id = shard == 0 ? sample : S0 + sample;
                if (x[0] % 4 != 0 || id < 0 || id >= NS) { bad_visit++; continue; }
                seen[id]++;
                int want_shard = k < (first_shard[e] == 0 ? S0 : S1) ? first_shard[e] : 1 - first_shard[e];
                bad_contig += shard != want_shard;
                for (int i = 0; i < 4; i++) { bad_shift += x[i] != x[0] + i || y[i] != x[0] + i + 1; }
            }
            for (int id = 0; id < NS; id++) { bad_visit += seen[id] != 1; }
        }
        check(bad_visit == 0 && bad_contig == 0 && bad_shift == 0, "dataloader_shuffle_epoch_visits_all_once",
              "%d epochs: %d visit errors, %d out-of-shard, %d bad tokens; first shards %d %d %d",
              EPOCHS, bad_visit, bad_contig, bad_shift, first_shard[0], first_shard[1], first_shard[2]);
    }

    // (5) bad shards: a SHARD_* code and a message naming the file
    {
        uint16_t tokens[10000];
        for (int i = 0; i < 10000; i++) { tokens[i] = (uint16_t)(i % 50000); }
        const char* good = dl_write_shard("good.bin", tokens, 100);
        char err[1024] = "";
        size_t ntok = 0;
        int rc = shard_check(good, 100, &ntok, err, sizeof(err));
        int rc_tokens = shard_check_tokens(good, DL_VOCAB, err, sizeof(err));
        check(rc == SHARD_OK && rc_tokens == SHARD_OK && ntok == 100, "dataloader_check_good",
              "codes %d %d, ntok %zu %s", rc, rc_tokens, ntok, err);
        const char* p;
        p = dl_write_shard_raw("magic.bin", 12345, 1, 100, tokens, 100, 0);
        dl_check_rejects("dataloader_reject_magic", p, 1, 0, SHARD_EMAGIC, "bad magic 12345");
        p = dl_write_shard_raw("magic_v3.bin", 20240326, 3, 100, tokens, 100, 0); // a model checkpoint
        dl_check_rejects("dataloader_reject_checkpoint", p, 1, 0, SHARD_EMAGIC, "20240520");
        p = dl_write_shard_raw("version.bin", SHARD_MAGIC, 2, 100, tokens, 100, 0);
        dl_check_rejects("dataloader_reject_version", p, 1, 0, SHARD_EVERSION, "bad version 2");
        p = dl_write_shard_raw("truncated.bin", SHARD_MAGIC, 1, 100, tokens, 90, 0);
        dl_check_rejects("dataloader_reject_truncated", p, 1, 0, SHARD_ESIZE, "truncated");
        p = dl_write_shard_raw("trailing1.bin", SHARD_MAGIC, 1, 100, tokens, 100, 1);
        dl_check_rejects("dataloader_reject_trailing_byte", p, 1, 0, SHARD_ESIZE, "trailing");
        p = dl_write_shard_raw("trailing2.bin", SHARD_MAGIC, 1, 100, tokens, 101, 0);
        dl_check_rejects("dataloader_reject_trailing_token", p, 1, 0, SHARD_ESIZE, "trailing");
        p = dl_write_shard_raw("negative.bin", SHARD_MAGIC, 1, -5, tokens, 0, 0);
        dl_check_rejects("dataloader_reject_negative_count", p, 1, 0, SHARD_ESIZE, "-5");
        p = dl_path("short.bin");
        FILE* f = fopen(p, "wb");
        fwrite(tokens, 1, 100, f);
        fclose(f);
        p = dl_remember(p);
        dl_check_rejects("dataloader_reject_short_header", p, 1, 0, SHARD_EHEADER, "header");
        p = dl_path("missing.bin");
        dl_check_rejects("dataloader_reject_missing", p, 1, 0, SHARD_EOPEN, "fopen");
        dl_check_rejects("dataloader_reject_too_few", good, 101, 0, SHARD_EFEW, "101");
        // out-of-vocab token: shard_check reads only the header; the scan and every read catch it
        tokens[77] = DL_VOCAB;
        p = dl_write_shard("vocab.bin", tokens, 100);
        rc = shard_check(p, 1, NULL, err, sizeof(err));
        check(rc == SHARD_OK, "dataloader_check_header_only", "code %d: header checks do not read tokens", rc);
        dl_check_rejects("dataloader_reject_token", p, 1, DL_VOCAB, SHARD_ETOKEN, "token 50257 at position 77");
        rc = shard_check_tokens(p, DL_VOCAB + 1, err, sizeof(err));
        check(rc == SHARD_OK, "dataloader_check_token_bound", "code %d with vocab_size %d", rc, DL_VOCAB + 1);
        tokens[77] = 77;
        tokens[9000] = 65535;
        p = dl_write_shard("vocab_far.bin", tokens, 10000); // past the first 4096-token chunk of the scan
        dl_check_rejects("dataloader_reject_token_far", p, 1, DL_VOCAB, SHARD_ETOKEN, "token 65535 at position 9000");
        f = fopen(p, "rb");
        uint8_t buffer[2 * 16];
        int out[16];
        int rc_before = shard_read_tokens(f, p, 8984, 16, DL_VOCAB, buffer, out, err, sizeof(err));
        int rc_on = shard_read_tokens(f, p, 8990, 16, DL_VOCAB, buffer, out, err, sizeof(err));
        fclose(f);
        check(rc_before == SHARD_OK && rc_on == SHARD_ETOKEN && strstr(err, "vocab_far.bin") != NULL &&
              strstr(err, "position 9000") != NULL, "dataloader_read_rejects_token",
              "codes %d %d: %s", rc_before, rc_on, err);

        // the exiting paths: init checks every matched file, reads check tokens, resume checks range
        snprintf(pattern, sizeof(pattern), "%s/magic.bin", dl_dir);
        dl_check_exits("dataloader_init_exits_bad_magic", dl_child_init, pattern, "magic.bin", "bad magic 12345");
        snprintf(pattern, sizeof(pattern), "%s/t*ing1.bin", dl_dir);
        dl_check_exits("dataloader_init_exits_trailing", dl_child_init, pattern, "trailing1.bin", "trailing");
        snprintf(pattern, sizeof(pattern), "%s/nothing_*.bin", dl_dir);
        dl_check_exits("dataloader_init_exits_no_match", dl_child_init, pattern, "nothing_*.bin", "no files match");
        snprintf(pattern, sizeof(pattern), "%s/good.bin", dl_dir);
        char msg[2048];
        int status = run_in_child(dl_child_read_epoch, pattern, msg, sizeof(msg));
        check(status == 0 && msg[0] == '\0', "dataloader_child_good", "exit %d %s", status, msg);
        snprintf(pattern, sizeof(pattern), "%s/vocab.bin", dl_dir);
        dl_check_exits("dataloader_read_exits_bad_token", dl_child_read_epoch, pattern, "vocab.bin", "position 77");
        snprintf(pattern, sizeof(pattern), "%s/two_*.bin", dl_dir);
        dl_check_exits("dataloader_resume_exits_out_of_range", dl_child_resume, pattern, "sample 999", "out of range");
    }

    for (int i = 0; i < dl_num_files; i++) { remove(dl_files[i]); }
    if (rmdir(dl_dir) != 0) { perror(dl_dir); }
}

int main(void) {
    test_dataloader();
    return test_summary();
}

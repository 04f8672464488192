/*
Turns a text file into GPT-2 token shards in llm.c's format, with the C tokenizer in tokenizer.h
(the same ids as tiktoken's "gpt2"; dev/data/check_tokenizer.py checks that).

Build and run, from the repository root:
    gcc -O2 -o tokenize dev/data/tokenize.c
    ./tokenize -e data/gpt2/encoder.json -m data/gpt2/vocab.bpe \
               -i input.txt -o data/tinyshakespeare/tiny_shakespeare
writes data/tinyshakespeare/tiny_shakespeare_val.bin and _train.bin (dev/data/tinyshakespeare.sh
does all of this).

Shard format (llm.c's, so its readers and ours take the same files): a header of 256 int32
little-endian, [0] = 20240520 (magic), [1] = 1 (version), [2] = number of tokens, the rest 0;
then the tokens as uint16 little-endian. Each file is written under a temporary name and then
renamed, so a reader never sees half a shard.

Documents (-s), each preceded by the end-of-text token 50256:
    para  (default) llm.c's Tiny Shakespeare rule, from its dev/data/tinyshakespeare.py:
          text = "<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>"). So the text is cut
          after every "\n\n" (scanning left to right, as str.replace does), each document keeps
          its trailing "\n\n", and a text that ends in "\n\n" ends with an EOT and an empty
          document. Tiny Shakespeare gives 338,028 tokens: 32,768 val + 305,260 train.
    eot   documents are separated by lines holding only "<|endoftext|>" (the Gutenberg corpus
          in shared/data): each such line and its newline are removed; empty documents skipped.
    none  the whole file is one document.
Each document is encoded on its own (tiktoken's encode with the EOT allowed does the same),
and the first -v tokens (default 32768, llm.c's choice) form the validation split.

Other modes, for tests and quick looks (one of -o, -c, -d, -x is required):
    -c      print the number of tokens of the whole file encoded as one string (no EOT)
    -d      print the token ids of the whole file, one per line
    -d -z   the input is records ending in NUL bytes: print each record's ids on one line
    -x      the input is token ids (whitespace-separated): write their bytes to stdout
    -x -z   one record of ids per line: write each record's bytes followed by a NUL
*/
#define _POSIX_C_SOURCE 200809L // clock_gettime
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../../tokenizer.h"

#define SHARD_MAGIC 20240520
#define SHARD_VERSION 1
#define SHARD_HEADER_INTS 256

static void usage(FILE* f) {
    fprintf(f,
        "usage: tokenize [-e encoder.json] [-m vocab.bpe] -i input.txt (-o out_prefix | -c | -d | -x) [options]\n"
        "  -e FILE    GPT-2 encoder.json (default data/gpt2/encoder.json)\n"
        "  -m FILE    GPT-2 vocab.bpe (default data/gpt2/vocab.bpe)\n"
        "  -i FILE    input text, - for stdin\n"
        "  -o PREFIX  write token shards PREFIX_val.bin and PREFIX_train.bin\n"
        "  -v N       with -o: the first N tokens are the validation split (default 32768);\n"
        "             a split with no tokens is not written (-v 0: train only, -v all: val only)\n"
        "  -s MODE    with -o: documents are split by para (blank lines, default), eot (lines\n"
        "             holding only <|endoftext|>) or none\n"
        "  -c         print the token count of the input encoded as one string\n"
        "  -d         print the token ids of the input, one per line\n"
        "  -x         decode: read token ids, write their bytes\n"
        "  -z         with -d or -x: NUL-terminated records in, one line of ids per record\n"
        "  -h         this help\n");
}

static void die_usage(const char* fmt, const char* arg) {
    fprintf(stderr, "tokenize: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, "\n");
    usage(stderr);
    exit(EXIT_FAILURE);
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// 1234567 -> "1,234,567", as llm.c's scripts print counts
static const char* commas(size_t x, char buf[32]) {
    char digits[32];
    int n = snprintf(digits, sizeof(digits), "%zu", x), k = 0;
    for (int i = 0; i < n; i++) {
        if (i > 0 && (n - i) % 3 == 0) { buf[k++] = ','; }
        buf[k++] = digits[i];
    }
    buf[k] = '\0';
    return buf;
}

// Reads all of a file, or stdin for "-", into a NUL-terminated buffer.
static char* read_input(const char* path, size_t* len) {
    int is_stdin = strcmp(path, "-") == 0;
    FILE* f = is_stdin ? stdin : fopen(path, "rb");
    if (f == NULL) { fprintf(stderr, "tokenize: cannot open input %s (%s)\n", path, strerror(errno)); exit(EXIT_FAILURE); }
    size_t cap = 1 << 20, n = 0;
    char* buf = (char*)malloc(cap + 1);
    for (;;) {
        if (buf == NULL) { fprintf(stderr, "tokenize: out of memory reading %s\n", path); exit(EXIT_FAILURE); }
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) { break; }
        cap *= 2;
        char* bigger = (char*)realloc(buf, cap + 1);
        if (bigger == NULL) { free(buf); }
        buf = bigger;
    }
    if (ferror(f)) { fprintf(stderr, "tokenize: error reading input %s (%s)\n", path, strerror(errno)); exit(EXIT_FAILURE); }
    if (!is_stdin) { fclose(f); }
    buf[n] = '\0';
    *len = n;
    return buf;
}

// ----------------------------------------------------------------------------
// a growing array of token ids

typedef struct { int* ids; size_t len, cap; } Tokens;

static void tokens_reserve(Tokens* t, size_t need) {
    if (need <= t->cap) { return; }
    size_t cap = t->cap ? t->cap : 1 << 16;
    while (cap < need) { cap *= 2; }
    int* bigger = (int*)realloc(t->ids, cap * sizeof(int));
    if (bigger == NULL) { fprintf(stderr, "tokenize: out of memory (%zu tokens)\n", cap); exit(EXIT_FAILURE); }
    t->ids = bigger; t->cap = cap;
}

// appends the tokens of text[0..len); encodes again in the rare case the guessed room was short
static void tokens_add_text(Tokens* t, Tokenizer* tok, const char* text, size_t len) {
    tokens_reserve(t, t->len + len / 2 + 16); // GPT-2 averages about 4 bytes of English per token
    size_t n = tokenizer_encode(tok, text, len, t->ids + t->len, t->cap - t->len);
    if (n > t->cap - t->len) {
        tokens_reserve(t, t->len + n);
        tokenizer_encode(tok, text, len, t->ids + t->len, t->cap - t->len);
    }
    t->len += n;
}

static void tokens_add_document(Tokens* t, Tokenizer* tok, const char* text, size_t len) {
    tokens_reserve(t, t->len + 1);
    t->ids[t->len++] = tok->eot_token;
    tokens_add_text(t, tok, text, len);
}

// Splits the text into documents (see the -s modes at the top) and encodes them; returns the
// number of documents.
static size_t encode_documents(Tokens* t, Tokenizer* tok, const char* s, size_t n, const char* split) {
    size_t docs = 0;
    if (strcmp(split, "none") == 0) {
        tokens_add_document(t, tok, s, n);
        return 1;
    }
    if (strcmp(split, "para") == 0) {
        for (size_t start = 0;;) {
            const char* cut = NULL;
            for (const char* p = s + start; (p = (const char*)memchr(p, '\n', n - (size_t)(p - s))) != NULL; p++) {
                if ((size_t)(p - s) + 1 < n && p[1] == '\n') { cut = p + 2; break; }
            }
            size_t end = cut ? (size_t)(cut - s) : n;
            tokens_add_document(t, tok, s + start, end - start);
            docs++;
            if (cut == NULL) { return docs; }
            start = end;
        }
    }
    // eot: a marker line holds exactly "<|endoftext|>", ended by "\n" or the end of the text
    static const char marker[] = "<|endoftext|>";
    const size_t m = sizeof(marker) - 1;
    size_t doc_start = 0;
    for (size_t line = 0; line < n;) {
        const char* nl = (const char*)memchr(s + line, '\n', n - line);
        size_t line_end = nl ? (size_t)(nl - s) : n;
        size_t next = nl ? line_end + 1 : n;
        if (line_end - line == m && memcmp(s + line, marker, m) == 0) {
            if (line > doc_start) { tokens_add_document(t, tok, s + doc_start, line - doc_start); docs++; }
            doc_start = next;
        }
        line = next;
    }
    if (n > doc_start) { tokens_add_document(t, tok, s + doc_start, n - doc_start); docs++; }
    return docs;
}

// ----------------------------------------------------------------------------
// shards

static void put_le32(unsigned char* p, uint32_t x) {
    p[0] = (unsigned char)x; p[1] = (unsigned char)(x >> 8); p[2] = (unsigned char)(x >> 16); p[3] = (unsigned char)(x >> 24);
}

static void write_shard(const char* path, const int* ids, size_t count) {
    char count_str[32];
    printf("writing %s tokens to %s\n", commas(count, count_str), path);
    if (count > INT32_MAX) { fprintf(stderr, "tokenize: %s: %zu tokens do not fit the header's int32\n", path, count); exit(EXIT_FAILURE); }
    size_t plen = strlen(path);
    char* tmp = (char*)malloc(plen + 5);
    if (tmp == NULL) { fprintf(stderr, "tokenize: out of memory\n"); exit(EXIT_FAILURE); }
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    FILE* f = fopen(tmp, "wb");
    if (f == NULL) { fprintf(stderr, "tokenize: cannot create %s (%s)\n", tmp, strerror(errno)); exit(EXIT_FAILURE); }
    unsigned char header[SHARD_HEADER_INTS * 4] = { 0 };
    put_le32(header + 0, SHARD_MAGIC);
    put_le32(header + 4, SHARD_VERSION);
    put_le32(header + 8, (uint32_t)count);
    int ok = fwrite(header, 1, sizeof(header), f) == sizeof(header);
    unsigned char buf[1 << 16];
    for (size_t i = 0; i < count && ok;) {
        size_t k = 0;
        for (; i < count && k < sizeof(buf); i++, k += 2) { // uint16 little-endian
            buf[k] = (unsigned char)ids[i]; buf[k + 1] = (unsigned char)(ids[i] >> 8);
        }
        ok = fwrite(buf, 1, k, f) == k;
    }
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        fprintf(stderr, "tokenize: writing %s failed (%s)\n", path, strerror(errno));
        remove(tmp);
        exit(EXIT_FAILURE);
    }
    free(tmp);
}

static void write_shards(Tokenizer* tok, const char* input_path, const char* text, size_t n,
                         const char* prefix, size_t val_tokens, const char* split) {
    Tokens t = { NULL, 0, 0 };
    double t0 = now_seconds();
    size_t docs = encode_documents(&t, tok, text, n, split);
    double dt = now_seconds() - t0;
    char a[32], b[32], c[32];
    printf("tokenized %s: %s bytes, %s documents, %s tokens in %.2f s\n", input_path,
           commas(n, a), commas(docs, b), commas(t.len, c), dt);
    size_t n_val = val_tokens < t.len ? val_tokens : t.len;
    size_t plen = strlen(prefix);
    char* path = (char*)malloc(plen + 16);
    if (path == NULL) { fprintf(stderr, "tokenize: out of memory\n"); exit(EXIT_FAILURE); }
    if (n_val > 0) {
        snprintf(path, plen + 16, "%s_val.bin", prefix);
        write_shard(path, t.ids, n_val);
    }
    if (t.len > n_val) {
        snprintf(path, plen + 16, "%s_train.bin", prefix);
        write_shard(path, t.ids + n_val, t.len - n_val);
    }
    free(path);
    free(t.ids);
}

// ----------------------------------------------------------------------------
// test modes

static void print_ids(Tokenizer* tok, const char* text, size_t n, int records) {
    Tokens t = { NULL, 0, 0 };
    for (size_t start = 0; start < n;) {
        const char* end = records ? (const char*)memchr(text + start, '\0', n - start) : NULL;
        size_t len = end ? (size_t)(end - text) - start : n - start;
        t.len = 0;
        tokens_add_text(&t, tok, text + start, len);
        for (size_t i = 0; i < t.len; i++) {
            if (records) { printf(i ? " %d" : "%d", t.ids[i]); } else { printf("%d\n", t.ids[i]); }
        }
        if (records) { printf("\n"); }
        start += len + (end ? 1 : 0);
    }
    free(t.ids);
}

static void decode_ids(Tokenizer* tok, const char* text, size_t n, int records) {
    size_t line = 1;
    for (size_t i = 0; i < n;) {
        char c = text[i];
        if (c == '\n') { if (records) { fputc('\0', stdout); } line++; i++; continue; }
        if (c == ' ' || c == '\t' || c == '\r') { i++; continue; }
        uint64_t id = 0; size_t digits = 0;
        while (i < n && text[i] >= '0' && text[i] <= '9' && digits < 10) { id = id * 10 + (uint64_t)(text[i++] - '0'); digits++; }
        size_t len;
        const char* bytes = (digits > 0 && id < tok->vocab_size) ? tokenizer_decode_bytes(tok, (uint32_t)id, &len) : NULL;
        if (bytes == NULL || (i < n && text[i] >= '0' && text[i] <= '9')) {
            fprintf(stderr, "tokenize: input line %zu: not a token id below %u\n", line, tok->vocab_size);
            exit(EXIT_FAILURE);
        }
        fwrite(bytes, 1, len, stdout);
    }
    if (records && n > 0 && text[n - 1] != '\n') { fputc('\0', stdout); } // the last line's record
}

// ----------------------------------------------------------------------------

int main(int argc, char** argv) {
    const char* encoder_path = "data/gpt2/encoder.json";
    const char* merges_path = "data/gpt2/vocab.bpe";
    const char* input_path = NULL;
    const char* out_prefix = NULL;
    const char* split = "para";
    size_t val_tokens = 32768;
    int count_mode = 0, ids_mode = 0, decode_mode = 0, records = 0;
    for (int i = 1; i < argc; i++) {
        const char* a = argv[i];
        if (a[0] != '-' || a[1] == '\0' || a[2] != '\0') { die_usage("unexpected argument '%s'", a); }
        char flag = a[1];
        if (strchr("cdxzh", flag) != NULL) { // flags without a value
            if (flag == 'c') { count_mode = 1; }
            if (flag == 'd') { ids_mode = 1; }
            if (flag == 'x') { decode_mode = 1; }
            if (flag == 'z') { records = 1; }
            if (flag == 'h') { usage(stdout); return 0; }
            continue;
        }
        if (strchr("emiovs", flag) == NULL) { die_usage("unknown flag %s", a); }
        if (i + 1 >= argc) { die_usage("flag %s needs a value", a); }
        const char* v = argv[++i];
        if (flag == 'e') { encoder_path = v; }
        if (flag == 'm') { merges_path = v; }
        if (flag == 'i') { input_path = v; }
        if (flag == 'o') { out_prefix = v; }
        if (flag == 's') {
            if (strcmp(v, "para") != 0 && strcmp(v, "eot") != 0 && strcmp(v, "none") != 0) { die_usage("-s must be para, eot or none, not '%s'", v); }
            split = v;
        }
        if (flag == 'v') {
            char* end;
            if (strcmp(v, "all") == 0) { val_tokens = SIZE_MAX; continue; }
            unsigned long long x = strtoull(v, &end, 10);
            if (v[0] < '0' || v[0] > '9' || *end != '\0') { die_usage("-v needs a token count or 'all', not '%s'", v); }
            val_tokens = (size_t)x;
        }
    }
    if ((out_prefix != NULL) + count_mode + ids_mode + decode_mode != 1) { die_usage("%s", "give exactly one of -o, -c, -d, -x"); }
    if (input_path == NULL) { die_usage("%s", "no input file (-i)"); }
    if (records && !(ids_mode || decode_mode)) { die_usage("%s", "-z goes with -d or -x"); }

    Tokenizer tok;
    tokenizer_init(&tok, encoder_path, merges_path);
    if (tok.vocab_size > 65536) { fprintf(stderr, "tokenize: %u tokens do not fit uint16 shards\n", tok.vocab_size); return EXIT_FAILURE; }
    size_t n;
    char* text = read_input(input_path, &n);

    if (out_prefix != NULL) { write_shards(&tok, input_path, text, n, out_prefix, val_tokens, split); }
    if (count_mode) {
        double t0 = now_seconds();
        size_t count = tokenizer_encode(&tok, text, n, NULL, 0);
        double dt = now_seconds() - t0;
        printf("%zu\n", count);
        fprintf(stderr, "encoded %zu bytes into %zu tokens in %.1f ms\n", n, count, 1e3 * dt);
    }
    if (ids_mode) { print_ids(&tok, text, n, records); }
    if (decode_mode) { decode_ids(&tok, text, n, records); }
    if (fflush(stdout) != 0 || ferror(stdout)) { fprintf(stderr, "tokenize: error writing the output\n"); return EXIT_FAILURE; }
    free(text);
    tokenizer_free(&tok);
    return 0;
}

/*
tokenizer.h: GPT-2's byte-level BPE tokenizer in plain C99, encode and decode. Its output is the
same, token for token, as OpenAI's GPT-2 encoder and tiktoken's "gpt2" encoding (checked by
dev/data/check_tokenizer.py on all of Tiny Shakespeare and on random Unicode strings).

It reads the two files OpenAI published: encoder.json (token string -> id, 50257 entries) and
vocab.bpe (the 50000 merges in rank order). Encoding splits the text into pieces with GPT-2's
pre-tokenisation regex (written out by hand below, with Unicode tables for \p{L} and \p{N} at the
end of the file), then BPE-merges the bytes of each piece, lowest-ranked pair first.

API:
    Tokenizer t;
    tokenizer_init(&t, "data/gpt2/encoder.json", "data/gpt2/vocab.bpe"); // bad files: exit
    size_t n = tokenizer_encode(&t, text, len, ids, max_ids); // count, like snprintf
    const char* piece = tokenizer_decode(&t, id);  // the token's bytes, NUL-terminated
    tokenizer_free(&t);
tokenizer_init_check() is tokenizer_init that returns -1 and a message instead of exiting.
tokenizer_decode_bytes() also gives the length (the token for byte 0x00 holds a NUL).

Example:
    int ids[16];
    size_t n = tokenizer_encode(&t, "Hello world", 11, ids, 16); // n = 2: 15496 995
    for (size_t i = 0; i < n; i++) { safe_printf(tokenizer_decode(&t, ids[i])); }

Notes:
- tokenizer_encode is tiktoken's encode_ordinary: the text "<|endoftext|>" is encoded as plain
  text. Put t.eot_token (50256) between documents yourself (dev/data/tokenize.c does).
- Invalid UTF-8 never crashes: each byte that is not part of a valid UTF-8 character counts as
  one character of the "other" class (neither letter, number nor space) and is encoded by its
  byte token, so decode(encode(x)) == x holds for any bytes. tiktoken never sees such bytes (it
  encodes Python strings); for valid UTF-8 the two agree.
- \p{L} and \p{N} come from the Unicode version named above the tables; tiktoken's regex crate
  may know a newer version, which matters only for characters assigned since then.
- encode keeps a cache of encoded pieces inside the Tokenizer: one Tokenizer per thread.
*/
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// ----------------------------------------------------------------------------
// the Tokenizer

typedef struct {
    uint64_t hash;
    uint32_t key_offset, key_length; // the piece's bytes, in keys
    uint32_t ids_offset, ids_count;  // its token ids, in ids
} TokCacheEntry;

// pieces already encoded (words repeat a lot), so BPE runs once per distinct piece
typedef struct {
    uint32_t* slots;          // open addressing: entry index + 1, 0 = empty
    uint32_t mask;            // number of slots - 1 (a power of two), 0 before first use
    TokCacheEntry* entries;
    uint32_t n_entries; size_t entries_cap;
    char* keys; size_t keys_len, keys_cap;
    int* ids; size_t ids_len, ids_cap;
} TokCache;

typedef struct { int32_t rank; uint32_t start, end; } TokPair; // candidate merge of bytes [start, end)

typedef struct {
    uint32_t vocab_size;     // 50257 for GPT-2
    int eot_token;           // <|endoftext|>, 50256 for GPT-2
    int init_ok;             // 1 after a successful tokenizer_init / tokenizer_init_check
    // decode: id -> bytes
    char* token_bytes;       // every token's bytes, each followed by a NUL
    uint32_t* token_offset;  // (vocab_size) where each token starts in token_bytes
    uint32_t* token_length;  // (vocab_size) its length in bytes
    // encode: bytes -> id. A token's id is also its BPE merge rank (checked against vocab.bpe)
    uint32_t* vocab_slots;   // open addressing: id + 1, 0 = empty
    uint32_t vocab_mask;     // number of slots - 1
    // encode: BPE scratch, grown to the longest piece seen
    size_t scratch_cap;
    uint32_t* bpe_next;      // (scratch_cap + 1) start of the part after the part starting at i
    uint32_t* bpe_prev;      // (scratch_cap) start of the part before it
    TokPair* bpe_heap;       // (3 * scratch_cap) candidate merges, a min-heap on (rank, start)
    int* bpe_ids;            // (scratch_cap) the piece's token ids
    TokCache cache;
} Tokenizer;

// ----------------------------------------------------------------------------
// small helpers

#define TOK_INVALID 0xFFFFFFFFu // code point returned for a byte that is not valid UTF-8
enum { TOK_OTHER = 0, TOK_LETTER, TOK_NUMBER, TOK_SPACE }; // character classes of the regex
static int tok_char_class(uint32_t cp); // defined at the end, after the Unicode tables

static uint64_t tok_hash(const unsigned char* s, size_t n) { // FNV-1a
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) { h = (h ^ s[i]) * 1099511628211ull; }
    return h;
}

// Decodes the UTF-8 character at s[0..n), n >= 1: returns its code point and sets *len.
// Truncated sequences, overlong forms, surrogates and values past U+10FFFF return TOK_INVALID
// with *len = 1, so that a stray byte is a character of its own and the scan always advances.
static uint32_t tok_utf8_next(const unsigned char* s, size_t n, size_t* len) {
    unsigned char c = s[0];
    *len = 1;
    if (c < 0x80) { return c; }
    size_t need; uint32_t cp, lo = 0x80, hi = 0xBF; // bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) { need = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 2; cp = c & 0x0F;
        if (c == 0xE0) { lo = 0xA0; } // no overlongs
        if (c == 0xED) { hi = 0x9F; } // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3; cp = c & 0x07;
        if (c == 0xF0) { lo = 0x90; } // no overlongs
        if (c == 0xF4) { hi = 0x8F; } // nothing past U+10FFFF
    } else { return TOK_INVALID; }
    if (n < need + 1) { return TOK_INVALID; }
    for (size_t i = 1; i <= need; i++) {
        unsigned char b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) { return TOK_INVALID; }
        cp = (cp << 6) | (b & 0x3F);
    }
    *len = need + 1;
    return cp;
}

// GPT-2's bytes_to_unicode: encoder.json spells each byte as a printable character. Bytes that
// are printable in Latin-1 stand for themselves; the other 68 map to U+0100.. in byte order.
static void tok_bytes_to_unicode(uint32_t byte_to_cp[256]) {
    int n = 0;
    for (int b = 0; b < 256; b++) {
        int printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        byte_to_cp[b] = printable ? (uint32_t)b : (uint32_t)(256 + n++);
    }
}

// Writes "tokenizer: PATH: message" into err (if given); returns -1 for the caller to return.
static int tok_error(char* err, size_t err_size, const char* path, const char* fmt, ...) {
    if (err == NULL || err_size == 0) { return -1; }
    int k = snprintf(err, err_size, "tokenizer: %s: ", path);
    if (k >= 0 && (size_t)k < err_size) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err + k, err_size - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return -1;
}

// A short, printable excerpt of s[0..n) for error messages: valid UTF-8 as it is, control
// characters and stray bytes as \xNN.
static const char* tok_excerpt(const unsigned char* s, size_t n, char out[64]) {
    size_t k = 0, len;
    for (size_t i = 0; i < n && k < 40; i += len) {
        uint32_t cp = tok_utf8_next(s + i, n - i, &len);
        if (cp < 0x20 || cp == 0x7F || cp == TOK_INVALID) { k += (size_t)snprintf(out + k, 64 - k, "\\x%02x", s[i]); }
        else { memcpy(out + k, s + i, len); k += len; }
        if (i + len < n && k >= 40) { memcpy(out + k, "...", 3); k += 3; }
    }
    out[k] = '\0';
    return out;
}

// Reads a whole file into a NUL-terminated buffer; NULL (and err filled) on failure.
static unsigned char* tok_read_file(const char* path, size_t* len, char* err, size_t err_size) {
    FILE* f = fopen(path, "rb");
    if (f == NULL) { tok_error(err, err_size, path, "cannot open (%s)", strerror(errno)); return NULL; }
    size_t cap = 1 << 20, n = 0;
    unsigned char* buf = (unsigned char*)malloc(cap + 1);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) { break; } // end of file or an error, told apart below
        unsigned char* bigger = (unsigned char*)realloc(buf, 2 * cap + 1);
        if (bigger == NULL) { free(buf); buf = NULL; break; }
        buf = bigger; cap *= 2;
    }
    if (buf == NULL) { tok_error(err, err_size, path, "out of memory reading the file"); }
    else if (ferror(f)) {
        tok_error(err, err_size, path, "read error (%s)", strerror(errno));
        free(buf); buf = NULL;
    } else { buf[n] = '\0'; *len = n; }
    fclose(f);
    return buf;
}

// ----------------------------------------------------------------------------
// vocabulary hash map: token bytes -> id

static int tok_vocab_find(const Tokenizer* t, const unsigned char* s, size_t n) { // id or -1
    for (uint32_t i = (uint32_t)tok_hash(s, n) & t->vocab_mask;; i = (i + 1) & t->vocab_mask) {
        uint32_t slot = t->vocab_slots[i];
        if (slot == 0) { return -1; }
        uint32_t id = slot - 1;
        if (t->token_length[id] == n && memcmp(t->token_bytes + t->token_offset[id], s, n) == 0) {
            return (int)id;
        }
    }
}

// The BPE rank of a byte string: its id, or -1 when no merge makes it. <|endoftext|> is a
// special token, never the result of a merge (tiktoken keeps it out of mergeable_ranks).
static int tok_rank(const Tokenizer* t, const unsigned char* s, size_t n) {
    int id = tok_vocab_find(t, s, n);
    return id == t->eot_token ? -1 : id;
}

// ----------------------------------------------------------------------------
// loading encoder.json and vocab.bpe

typedef struct {
    const char* path;
    const unsigned char* s; size_t n, pos;
    char* err; size_t err_size;
} TokParser;

static void tok_skip_space(TokParser* p) {
    while (p->pos < p->n && (p->s[p->pos] == ' ' || p->s[p->pos] == '\t' ||
                             p->s[p->pos] == '\n' || p->s[p->pos] == '\r')) { p->pos++; }
}

static int tok_parse_fail(TokParser* p, const char* what) {
    if (p->pos >= p->n) {
        return tok_error(p->err, p->err_size, p->path, "unexpected end of file at byte %zu, %s (truncated file?)", p->pos, what);
    }
    unsigned char c = p->s[p->pos];
    if (c >= 0x20 && c < 0x7F) { return tok_error(p->err, p->err_size, p->path, "%s at byte %zu, found '%c'", what, p->pos, c); }
    return tok_error(p->err, p->err_size, p->path, "%s at byte %zu, found byte 0x%02x", what, p->pos, c);
}

// Maps one code point of the GPT-2 byte alphabet back to its byte; -1 if it is not in it.
static int tok_cp_to_byte(const int16_t* cp_to_byte, uint32_t cp) {
    return cp < 324 ? cp_to_byte[cp] : -1; // the alphabet ends at U+0143
}

// Parses the JSON string at p->pos (just past its opening quote is done here) and writes the
// bytes its characters stand for into out (room for at least its length). Returns the byte
// count, or -1 with the error filled in.
static long tok_parse_token_string(TokParser* p, const int16_t* cp_to_byte, unsigned char* out) {
    long n = 0;
    p->pos++; // the opening quote
    for (;;) {
        if (p->pos >= p->n) { return tok_parse_fail(p, "inside a string"); }
        size_t at = p->pos, len;
        uint32_t cp = p->s[at];
        if (cp == '"') { p->pos++; return n; }
        if (cp < 0x20) { return tok_parse_fail(p, "control character inside a string"); }
        if (cp == '\\') {
            if (at + 1 >= p->n) { p->pos = p->n; return tok_parse_fail(p, "inside an escape"); }
            unsigned char e = p->s[at + 1];
            const char* simple = strchr("\"\\/bfnrt", e);
            if (e != 0 && simple != NULL) {
                cp = (uint32_t)("\"\\/\b\f\n\r\t"[simple - "\"\\/bfnrt"]);
                p->pos = at + 2;
            } else if (e == 'u') {
                uint32_t v = 0;
                for (int i = 0; i < 4; i++) {
                    size_t k = at + 2 + (size_t)i;
                    if (k >= p->n) { p->pos = p->n; return tok_parse_fail(p, "inside a \\u escape"); }
                    int c = p->s[k];
                    int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10
                          : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : -1;
                    if (d < 0) { p->pos = k; return tok_parse_fail(p, "bad hex digit in a \\u escape"); }
                    v = v * 16 + (uint32_t)d;
                }
                cp = v; // a surrogate is not in the byte alphabet and is rejected below
                p->pos = at + 6;
            } else { p->pos = at + 1; return tok_parse_fail(p, "bad escape in a string"); }
        } else {
            cp = tok_utf8_next(p->s + at, p->n - at, &len);
            if (cp == TOK_INVALID) { return tok_parse_fail(p, "invalid UTF-8 in a string"); }
            p->pos = at + len;
        }
        int byte = tok_cp_to_byte(cp_to_byte, cp);
        if (byte < 0) {
            p->pos = at;
            return tok_error(p->err, p->err_size, p->path, "character U+%04X at byte %zu is not in GPT-2's byte alphabet", cp, at);
        }
        out[n++] = (unsigned char)byte;
    }
}

// Parses encoder.json, a JSON object {"token string": id, ...}, into t's decode tables.
static int tok_load_encoder(Tokenizer* t, const char* path, const int16_t* cp_to_byte, char* err, size_t err_size) {
    size_t n;
    unsigned char* s = tok_read_file(path, &n, err, err_size);
    if (s == NULL) { return -1; }
    TokParser p = { path, s, n, 0, err, err_size };
    int rc = -1;
    // every token's bytes are no longer than its spelling, so the file size bounds them all
    size_t cap = 1024; uint32_t count = 0, slots; // (declared before the first goto: C++ compiles this too)
    uint32_t* ids = (uint32_t*)malloc(cap * sizeof(uint32_t));
    uint32_t* offsets = (uint32_t*)malloc(cap * sizeof(uint32_t));
    uint32_t* lengths = (uint32_t*)malloc(cap * sizeof(uint32_t));
    char* bytes = (char*)malloc(n + 1);
    size_t bytes_len = 0;
    if (ids == NULL || offsets == NULL || lengths == NULL || bytes == NULL) { tok_error(err, err_size, path, "out of memory"); goto done; }
    if (n > UINT32_MAX) { tok_error(err, err_size, path, "file too large (%zu bytes)", n); goto done; }

    tok_skip_space(&p);
    if (p.pos >= n) { tok_error(err, err_size, path, "empty file, expected a JSON object"); goto done; }
    if (s[p.pos] != '{') { tok_parse_fail(&p, "expected '{' (a JSON object of token -> id)"); goto done; }
    p.pos++;
    tok_skip_space(&p);
    if (p.pos < n && s[p.pos] == '}') { tok_error(err, err_size, path, "no tokens in the JSON object"); goto done; }
    for (;;) {
        tok_skip_space(&p);
        if (p.pos >= n || s[p.pos] != '"') { tok_parse_fail(&p, "expected a token string"); goto done; }
        long len = tok_parse_token_string(&p, cp_to_byte, (unsigned char*)bytes + bytes_len);
        if (len < 0) { goto done; }
        tok_skip_space(&p);
        if (p.pos >= n || s[p.pos] != ':') { tok_parse_fail(&p, "expected ':' after a token string"); goto done; }
        p.pos++;
        tok_skip_space(&p);
        uint64_t id = 0; size_t digits = 0;
        while (p.pos < n && s[p.pos] >= '0' && s[p.pos] <= '9' && digits < 10) { id = id * 10 + (s[p.pos++] - '0'); digits++; }
        if (digits == 0) { tok_parse_fail(&p, "expected a token id (a non-negative integer)"); goto done; }
        if (p.pos < n && ((s[p.pos] >= '0' && s[p.pos] <= '9') || s[p.pos] == '.' || s[p.pos] == 'e' || s[p.pos] == 'E')) {
            tok_parse_fail(&p, "token id is not a small integer"); goto done;
        }
        if (count == cap) {
            cap *= 2;
            uint32_t* a = (uint32_t*)realloc(ids, cap * sizeof(uint32_t)); if (a) { ids = a; }
            uint32_t* b = (uint32_t*)realloc(offsets, cap * sizeof(uint32_t)); if (b) { offsets = b; }
            uint32_t* c = (uint32_t*)realloc(lengths, cap * sizeof(uint32_t)); if (c) { lengths = c; }
            if (!a || !b || !c) { tok_error(err, err_size, path, "out of memory"); goto done; }
        }
        ids[count] = (uint32_t)(id > UINT32_MAX ? UINT32_MAX : id);
        offsets[count] = (uint32_t)bytes_len;
        lengths[count] = (uint32_t)len;
        count++;
        bytes_len += (size_t)len;
        bytes[bytes_len++] = '\0'; // decode hands out C strings
        tok_skip_space(&p);
        if (p.pos < n && s[p.pos] == ',') { p.pos++; continue; }
        if (p.pos < n && s[p.pos] == '}') { p.pos++; break; }
        tok_parse_fail(&p, "expected ',' or '}' after a token id");
        goto done;
    }
    tok_skip_space(&p);
    if (p.pos != n) { tok_parse_fail(&p, "unexpected data after the JSON object"); goto done; }

    // ids must be exactly 0..count-1: lay the tokens out by id
    t->vocab_size = count;
    t->token_offset = (uint32_t*)malloc(count * sizeof(uint32_t));
    t->token_length = (uint32_t*)malloc(count * sizeof(uint32_t));
    if (t->token_offset == NULL || t->token_length == NULL) { tok_error(err, err_size, path, "out of memory"); goto done; }
    for (uint32_t i = 0; i < count; i++) { t->token_length[i] = UINT32_MAX; } // "no token yet"
    for (uint32_t i = 0; i < count; i++) {
        char ex[64];
        if (ids[i] >= count) {
            tok_error(err, err_size, path, "token '%s' has id %u, but ids must run 0..%u for %u tokens",
                      tok_excerpt((unsigned char*)bytes + offsets[i], lengths[i], ex), ids[i], count - 1, count);
            goto done;
        }
        if (t->token_length[ids[i]] != UINT32_MAX) { tok_error(err, err_size, path, "token id %u appears twice", ids[i]); goto done; }
        t->token_offset[ids[i]] = offsets[i];
        t->token_length[ids[i]] = lengths[i];
    }
    t->token_bytes = bytes; bytes = NULL;

    // hash map for encoding; a repeated token string would make encoding ambiguous
    slots = 1;
    while (slots < 2 * count) { slots *= 2; }
    t->vocab_mask = slots - 1;
    t->vocab_slots = (uint32_t*)calloc(slots, sizeof(uint32_t));
    if (t->vocab_slots == NULL) { tok_error(err, err_size, path, "out of memory"); goto done; }
    for (uint32_t id = 0; id < count; id++) {
        const unsigned char* tb = (const unsigned char*)t->token_bytes + t->token_offset[id];
        char ex[64];
        if (tok_vocab_find(t, tb, t->token_length[id]) >= 0) {
            tok_error(err, err_size, path, "token '%s' appears twice", tok_excerpt(tb, t->token_length[id], ex));
            goto done;
        }
        uint32_t i = (uint32_t)tok_hash(tb, t->token_length[id]) & t->vocab_mask;
        while (t->vocab_slots[i] != 0) { i = (i + 1) & t->vocab_mask; }
        t->vocab_slots[i] = id + 1;
    }
    for (int b = 0; b < 256; b++) {
        unsigned char c = (unsigned char)b;
        if (tok_vocab_find(t, &c, 1) < 0) { tok_error(err, err_size, path, "no token for byte 0x%02x", b); goto done; }
    }
    t->eot_token = tok_vocab_find(t, (const unsigned char*)"<|endoftext|>", 13);
    if (t->eot_token < 0) { tok_error(err, err_size, path, "no <|endoftext|> token"); goto done; }
    rc = 0;
done:
    free(s); free(ids); free(offsets); free(lengths); free(bytes);
    return rc;
}

// Decodes one vocab.bpe token spelling (UTF-8 in the byte alphabet) into bytes; -1 if invalid.
static long tok_spelling_to_bytes(const unsigned char* s, size_t n, const int16_t* cp_to_byte, unsigned char* out) {
    long k = 0;
    for (size_t i = 0, len; i < n; i += len) {
        uint32_t cp = tok_utf8_next(s + i, n - i, &len);
        int byte = cp == TOK_INVALID ? -1 : tok_cp_to_byte(cp_to_byte, cp);
        if (byte < 0) { return -1; }
        out[k++] = (unsigned char)byte;
    }
    return k;
}

// Checks vocab.bpe against the loaded encoder.json: merge number r (from 0) must join two
// existing tokens into token 256 + r. That makes a token's id its merge rank, which is all BPE
// needs (tiktoken's data_gym_to_mergeable_bpe_ranks asserts the same of these files).
static int tok_check_merges(Tokenizer* t, const char* path, const int16_t* cp_to_byte, char* err, size_t err_size) {
    size_t n;
    unsigned char* s = tok_read_file(path, &n, err, err_size);
    if (s == NULL) { return -1; }
    unsigned char* buf = (unsigned char*)malloc(n + 1);
    int rc = -1;
    char ex[64];
    uint32_t expected = t->vocab_size - 257; // everything but the 256 bytes and <|endoftext|>
    uint32_t rank = 0;
    size_t line_no = 0, blank_line = 0;
    if (buf == NULL) { tok_error(err, err_size, path, "out of memory"); goto done; }
    if (n == 0) { tok_error(err, err_size, path, "empty file, expected '#version: 0.2' on the first line"); goto done; }
    for (size_t start = 0; start < n;) {
        const unsigned char* nl = (const unsigned char*)memchr(s + start, '\n', n - start);
        size_t end = nl ? (size_t)(nl - s) : n, next = nl ? end + 1 : n;
        if (end > start && s[end - 1] == '\r') { end--; } // tolerate CRLF: '\r' is 'č' in spellings
        const unsigned char* line = s + start;
        size_t len = end - start;
        const char* cut = nl ? "" : " (the last line has no newline: truncated file?)";
        start = next;
        line_no++;
        if (line_no == 1) {
            if (len < 8 || memcmp(line, "#version", 8) != 0) {
                tok_error(err, err_size, path, "first line should be '#version: 0.2', found '%s'", tok_excerpt(line, len, ex));
                goto done;
            }
            continue;
        }
        if (len == 0) { if (blank_line == 0) { blank_line = line_no; } continue; } // fine at the end
        if (blank_line != 0) { tok_error(err, err_size, path, "line %zu is blank but merges follow it", blank_line); goto done; }
        const unsigned char* sp = (const unsigned char*)memchr(line, ' ', len);
        size_t la = sp ? (size_t)(sp - line) : 0, lb = sp ? len - la - 1 : 0;
        if (sp == NULL || la == 0 || lb == 0 || memchr(sp + 1, ' ', lb) != NULL) {
            tok_error(err, err_size, path, "line %zu: expected two tokens separated by one space, found '%s'%s", line_no, tok_excerpt(line, len, ex), cut);
            goto done;
        }
        long na = tok_spelling_to_bytes(line, la, cp_to_byte, buf);
        long nb = na < 0 ? -1 : tok_spelling_to_bytes(sp + 1, lb, cp_to_byte, buf + na);
        if (na < 0 || nb < 0) {
            tok_error(err, err_size, path, "line %zu: '%s' has a character outside GPT-2's byte alphabet%s", line_no, tok_excerpt(line, len, ex), cut);
            goto done;
        }
        if (tok_rank(t, buf, (size_t)na) < 0 || tok_rank(t, buf + na, (size_t)nb) < 0) {
            int bad_first = tok_rank(t, buf, (size_t)na) < 0;
            tok_error(err, err_size, path, "line %zu: merge names '%s', which is not in encoder.json%s", line_no,
                      bad_first ? tok_excerpt(line, la, ex) : tok_excerpt(sp + 1, lb, ex), cut);
            goto done;
        }
        int id = tok_rank(t, buf, (size_t)(na + nb));
        if (id < 0 || (uint32_t)id != 256 + rank) {
            if (id < 0) {
                tok_error(err, err_size, path, "line %zu: merge '%s' makes a token that is not in encoder.json%s", line_no, tok_excerpt(line, len, ex), cut);
            } else {
                tok_error(err, err_size, path, "line %zu: merge '%s' makes token %d of encoder.json, expected %u (256 + its rank)%s",
                          line_no, tok_excerpt(line, len, ex), id, 256 + rank, *cut ? cut : ": the files do not belong together");
            }
            goto done;
        }
        rank++;
    }
    if (rank != expected) {
        tok_error(err, err_size, path, "%u merges, but encoder.json's %u tokens need %u (truncated file?)", rank, t->vocab_size, expected);
        goto done;
    }
    rc = 0;
done:
    free(s); free(buf);
    return rc;
}

// ----------------------------------------------------------------------------
// public API: init and free

static inline void tokenizer_free(Tokenizer* t) {
    free(t->token_bytes); free(t->token_offset); free(t->token_length); free(t->vocab_slots);
    free(t->bpe_next); free(t->bpe_prev); free(t->bpe_heap); free(t->bpe_ids);
    free(t->cache.slots); free(t->cache.entries); free(t->cache.keys); free(t->cache.ids);
    memset(t, 0, sizeof(*t));
}

// Loads and checks the two files. Returns 0, or -1 with one line "tokenizer: FILE: what is
// wrong" in err (err may be NULL); on failure t is left empty (init_ok = 0, safe to free).
static inline int tokenizer_init_check(Tokenizer* t, const char* encoder_json, const char* vocab_bpe, char* err, size_t err_size) {
    memset(t, 0, sizeof(*t));
    if (err != NULL && err_size > 0) { err[0] = '\0'; }
    uint32_t byte_to_cp[256];
    int16_t cp_to_byte[324];
    tok_bytes_to_unicode(byte_to_cp);
    for (int i = 0; i < 324; i++) { cp_to_byte[i] = -1; }
    for (int b = 0; b < 256; b++) { cp_to_byte[byte_to_cp[b]] = (int16_t)b; }
    if (tok_load_encoder(t, encoder_json, cp_to_byte, err, err_size) != 0 ||
        tok_check_merges(t, vocab_bpe, cp_to_byte, err, err_size) != 0) {
        tokenizer_free(t);
        return -1;
    }
    t->init_ok = 1;
    return 0;
}

// As tokenizer_init_check, but a bad or missing file is fatal: one line on stderr, then exit.
static inline void tokenizer_init(Tokenizer* t, const char* encoder_json, const char* vocab_bpe) {
    char err[512];
    if (tokenizer_init_check(t, encoder_json, vocab_bpe, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", err);
        exit(EXIT_FAILURE);
    }
}

// ----------------------------------------------------------------------------
// decode

// The bytes of a token and their count (a token may hold a NUL byte); NULL for an invalid id.
static inline const char* tokenizer_decode_bytes(const Tokenizer* t, uint32_t token, size_t* len) {
    if (!t->init_ok || token >= t->vocab_size) { if (len) { *len = 0; } return NULL; }
    if (len) { *len = t->token_length[token]; }
    return t->token_bytes + t->token_offset[token];
}

// The bytes of a token as a NUL-terminated string (as llm.c's); NULL for an invalid id.
static inline const char* tokenizer_decode(const Tokenizer* t, uint32_t token) {
    return tokenizer_decode_bytes(t, token, NULL);
}

// Prints a decoded piece unless it is a lone unprintable byte (half of a UTF-8 character, a
// control byte), as llm.c does when it prints samples.
static inline void safe_printf(const char* piece) {
    if (piece == NULL || piece[0] == '\0') { return; }
    if (piece[1] == '\0') {
        unsigned char c = (unsigned char)piece[0];
        if (!(isprint(c) || isspace(c))) { return; }
    }
    printf("%s", piece);
}

// ----------------------------------------------------------------------------
// encode, step 1: pre-tokenisation. GPT-2 splits text with the regex
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// taking the first alternative that matches at each position. \s is Unicode White_Space.
// BPE never merges across the pieces it makes.

// Returns the end of the piece that starts at s[pos] (pos < n).
static size_t tok_next_piece(const unsigned char* s, size_t n, size_t pos) {
    // contractions, case-sensitive
    if (s[pos] == '\'' && pos + 1 < n) {
        unsigned char a = s[pos + 1], b = pos + 2 < n ? s[pos + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') { return pos + 2; }
        if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) { return pos + 3; }
    }
    size_t len;
    int cls = tok_char_class(tok_utf8_next(s + pos, n - pos, &len));
    size_t run = pos; // where the run of one class starts
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: one optional space, then a run of one class
    if (s[pos] == ' ' && pos + 1 < n) {
        int next = tok_char_class(tok_utf8_next(s + pos + 1, n - pos - 1, &len));
        if (next != TOK_SPACE) { cls = next; run = pos + 1; }
    }
    if (cls != TOK_SPACE) {
        size_t end = run;
        while (end < n && tok_char_class(tok_utf8_next(s + end, n - end, &len)) == cls) { end += len; }
        return end;
    }
    // a run of whitespace
    size_t end = pos, last = pos; // last: where the run's final character starts
    while (end < n && tok_char_class(tok_utf8_next(s + end, n - end, &len)) == TOK_SPACE) { last = end; end += len; }
    // `\s+(?!\S)`: when a non-space follows, backtrack one character and leave it to start the
    // next piece (so " word" keeps its space); a single space falls through to `\s+`
    if (end < n && last > pos) { return last; }
    return end;
}

// ----------------------------------------------------------------------------
// encode, step 2: byte pair merges within one piece

static void tok_heap_push(TokPair* heap, size_t* size, TokPair x) {
    size_t i = (*size)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        TokPair p = heap[parent];
        if (p.rank < x.rank || (p.rank == x.rank && p.start < x.start)) { break; }
        heap[i] = p;
        i = parent;
    }
    heap[i] = x;
}

static TokPair tok_heap_pop(TokPair* heap, size_t* size) {
    TokPair top = heap[0], x = heap[--(*size)];
    size_t i = 0, n = *size;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) { break; }
        if (c + 1 < n && (heap[c + 1].rank < heap[c].rank || (heap[c + 1].rank == heap[c].rank && heap[c + 1].start < heap[c].start))) { c++; }
        if (x.rank < heap[c].rank || (x.rank == heap[c].rank && x.start < heap[c].start)) { break; }
        heap[i] = heap[c];
        i = c;
    }
    if (n > 0) { heap[i] = x; }
    return top;
}

static void tok_fatal_oom(void) {
    fprintf(stderr, "tokenizer: out of memory while encoding\n");
    exit(EXIT_FAILURE);
}

// BPE-encodes the piece p[0..m) into t->bpe_ids; returns the count. tiktoken's rule: while some
// two neighbouring parts join into a token, join the pair with the lowest rank (the leftmost
// one on ties). A min-heap of candidate pairs keyed (rank, start) makes that O(m log m); entries
// left stale by earlier merges are skipped when popped.
static size_t tok_bpe(Tokenizer* t, const unsigned char* p, size_t m) {
    if (m > t->scratch_cap) {
        size_t cap = m < 64 ? 64 : m;
        if (cap > UINT32_MAX / 4) { tok_fatal_oom(); } // parts are indexed with uint32
        free(t->bpe_next); free(t->bpe_prev); free(t->bpe_heap); free(t->bpe_ids);
        t->bpe_next = (uint32_t*)malloc((cap + 1) * sizeof(uint32_t));
        t->bpe_prev = (uint32_t*)malloc(cap * sizeof(uint32_t));
        t->bpe_heap = (TokPair*)malloc(3 * cap * sizeof(TokPair));
        t->bpe_ids = (int*)malloc(cap * sizeof(int));
        if (!t->bpe_next || !t->bpe_prev || !t->bpe_heap || !t->bpe_ids) { tok_fatal_oom(); }
        t->scratch_cap = cap;
    }
    int* ids = t->bpe_ids;
    int whole = tok_rank(t, p, m);
    if (whole >= 0) { ids[0] = whole; return 1; } // tiktoken emits a piece that is a token as is
    // parts are named by their start; at first every byte is a part
    uint32_t* next = t->bpe_next; uint32_t* prev = t->bpe_prev;
    TokPair* heap = t->bpe_heap;
    size_t heap_size = 0;
    for (uint32_t i = 0; i < m; i++) { next[i] = i + 1; prev[i] = i - 1; }
    next[m] = (uint32_t)m;
    for (uint32_t i = 0; i + 1 < m; i++) {
        int r = tok_rank(t, p + i, 2);
        if (r >= 0) { TokPair x = { r, i, i + 2 }; tok_heap_push(heap, &heap_size, x); }
    }
    while (heap_size > 0) {
        TokPair x = tok_heap_pop(heap, &heap_size);
        uint32_t i = x.start, j = next[i];
        // stale unless i still starts a part whose right neighbour still ends at x.end
        // (merged parts get next = UINT32_MAX, so they fail the first test)
        if (j >= m || next[j] != x.end) { continue; }
        next[i] = x.end;                   // part i absorbs part j
        next[j] = UINT32_MAX;
        if (x.end < m) { prev[x.end] = i; }
        if (i > 0) {                       // new candidate with the left neighbour
            uint32_t a = prev[i];
            int r = tok_rank(t, p + a, x.end - a);
            if (r >= 0) { TokPair y = { r, a, x.end }; tok_heap_push(heap, &heap_size, y); }
        }
        if (x.end < m) {                   // and with the right neighbour
            uint32_t e = next[x.end];
            int r = tok_rank(t, p + i, e - i);
            if (r >= 0) { TokPair y = { r, i, e }; tok_heap_push(heap, &heap_size, y); }
        }
    }
    size_t count = 0;
    for (uint32_t i = 0; i < m; i = next[i]) { ids[count++] = tok_rank(t, p + i, next[i] - i); }
    return count;
}

// ----------------------------------------------------------------------------
// encode, step 3: the cache of encoded pieces

#define TOK_CACHE_MAX_PIECE 64        // longer pieces are rare: not worth keeping
#define TOK_CACHE_MAX_SLOTS (1u << 21) // at most 1M entries (~60 MB), then start over

static const TokCacheEntry* tok_cache_find(const TokCache* c, uint64_t h, const unsigned char* s, size_t n) {
    if (c->mask == 0) { return NULL; }
    for (uint32_t i = (uint32_t)h & c->mask;; i = (i + 1) & c->mask) {
        uint32_t slot = c->slots[i];
        if (slot == 0) { return NULL; }
        const TokCacheEntry* e = &c->entries[slot - 1];
        if (e->hash == h && e->key_length == n && memcmp(c->keys + e->key_offset, s, n) == 0) { return e; }
    }
}

static void tok_cache_reset(TokCache* c) {
    memset(c->slots, 0, ((size_t)c->mask + 1) * sizeof(uint32_t));
    c->n_entries = 0; c->keys_len = 0; c->ids_len = 0;
}

// Grows array a (of *cap items) to hold at least `need`; returns it, maybe moved, or NULL with
// a untouched when memory runs out (the cache is only an optimisation: it then stops growing).
static void* tok_grow(void* a, size_t* cap, size_t need, size_t item) {
    if (need <= *cap) { return a; }
    size_t c = *cap ? *cap : 1024;
    while (c < need) { c *= 2; }
    void* b = realloc(a, c * item);
    if (b != NULL) { *cap = c; }
    return b;
}

static void tok_cache_add(TokCache* c, uint64_t h, const unsigned char* s, size_t n, const int* ids, size_t count) {
    if (c->mask == 0 || 2 * ((size_t)c->n_entries + 1) > (size_t)c->mask + 1) { // keep load <= 1/2
        uint32_t slots = c->mask ? 2 * (c->mask + 1) : 4096;
        if (slots > TOK_CACHE_MAX_SLOTS) { tok_cache_reset(c); }
        else {
            uint32_t* fresh = (uint32_t*)calloc(slots, sizeof(uint32_t));
            if (fresh == NULL) { return; }
            free(c->slots);
            c->slots = fresh; c->mask = slots - 1;
            for (uint32_t k = 0; k < c->n_entries; k++) {
                uint32_t i = (uint32_t)c->entries[k].hash & c->mask;
                while (c->slots[i] != 0) { i = (i + 1) & c->mask; }
                c->slots[i] = k + 1;
            }
        }
    }
    void* grown;
    if ((grown = tok_grow(c->entries, &c->entries_cap, c->n_entries + 1, sizeof(TokCacheEntry))) == NULL) { return; }
    c->entries = (TokCacheEntry*)grown;
    if ((grown = tok_grow(c->keys, &c->keys_cap, c->keys_len + n, 1)) == NULL) { return; }
    c->keys = (char*)grown;
    if ((grown = tok_grow(c->ids, &c->ids_cap, c->ids_len + count, sizeof(int))) == NULL) { return; }
    c->ids = (int*)grown;
    TokCacheEntry* e = &c->entries[c->n_entries];
    e->hash = h;
    e->key_offset = (uint32_t)c->keys_len; e->key_length = (uint32_t)n;
    e->ids_offset = (uint32_t)c->ids_len; e->ids_count = (uint32_t)count;
    memcpy(c->keys + c->keys_len, s, n); c->keys_len += n;
    memcpy(c->ids + c->ids_len, ids, count * sizeof(int)); c->ids_len += count;
    uint32_t i = (uint32_t)h & c->mask;
    while (c->slots[i] != 0) { i = (i + 1) & c->mask; }
    c->slots[i] = ++c->n_entries;
}

// ----------------------------------------------------------------------------
// public API: encode

// Encodes text[0..len) (UTF-8; any bytes are safe) into token ids. Writes at most max_out ids
// to out and returns how many the whole text takes, like snprintf: out may be NULL to count.
static inline size_t tokenizer_encode(Tokenizer* t, const char* text, size_t len, int* out, size_t max_out) {
    if (!t->init_ok) { return 0; }
    const unsigned char* s = (const unsigned char*)text;
    size_t count = 0;
    for (size_t pos = 0, end; pos < len; pos = end) {
        end = tok_next_piece(s, len, pos);
        const unsigned char* piece = s + pos;
        size_t m = end - pos;
        const int* ids; size_t n;
        uint64_t h = 0;
        const TokCacheEntry* hit = NULL;
        if (m <= TOK_CACHE_MAX_PIECE) {
            h = tok_hash(piece, m);
            hit = tok_cache_find(&t->cache, h, piece, m);
        }
        if (hit != NULL) {
            ids = t->cache.ids + hit->ids_offset; n = hit->ids_count;
        } else {
            n = tok_bpe(t, piece, m);
            ids = t->bpe_ids;
            if (m <= TOK_CACHE_MAX_PIECE) { tok_cache_add(&t->cache, h, piece, m, ids, n); }
        }
        for (size_t i = 0; i < n; i++, count++) { if (count < max_out) { out[count] = ids[i]; } }
    }
    return count;
}

// ----------------------------------------------------------------------------
// Unicode character classes for the regex

// \s in the regex is the Unicode White_Space property (as in Rust's regex crate, which tiktoken
// uses): note U+001C..U+001F are not in it, although Python's str.isspace() says they are.
static int tok_is_white_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
           cp == 0x205F || cp == 0x3000;
}

// BEGIN UNICODE TABLES: generated by `/usr/bin/python3 dev/data/check_tokenizer.py --gen-tables`
// from Python's unicodedata, Unicode 14.0.0. Sorted, disjoint, inclusive ranges.
static const uint32_t tok_letter_ranges[648][2] = { // \p{L}: Lu Ll Lt Lm Lo
    {0x41,0x5a},{0x61,0x7a},{0xaa,0xaa},{0xb5,0xb5},{0xba,0xba},{0xc0,0xd6},{0xd8,0xf6},{0xf8,0x2c1},
    {0x2c6,0x2d1},{0x2e0,0x2e4},{0x2ec,0x2ec},{0x2ee,0x2ee},{0x370,0x374},{0x376,0x377},{0x37a,0x37d},{0x37f,0x37f},
    {0x386,0x386},{0x388,0x38a},{0x38c,0x38c},{0x38e,0x3a1},{0x3a3,0x3f5},{0x3f7,0x481},{0x48a,0x52f},{0x531,0x556},
    {0x559,0x559},{0x560,0x588},{0x5d0,0x5ea},{0x5ef,0x5f2},{0x620,0x64a},{0x66e,0x66f},{0x671,0x6d3},{0x6d5,0x6d5},
    {0x6e5,0x6e6},{0x6ee,0x6ef},{0x6fa,0x6fc},{0x6ff,0x6ff},{0x710,0x710},{0x712,0x72f},{0x74d,0x7a5},{0x7b1,0x7b1},
    {0x7ca,0x7ea},{0x7f4,0x7f5},{0x7fa,0x7fa},{0x800,0x815},{0x81a,0x81a},{0x824,0x824},{0x828,0x828},{0x840,0x858},
    {0x860,0x86a},{0x870,0x887},{0x889,0x88e},{0x8a0,0x8c9},{0x904,0x939},{0x93d,0x93d},{0x950,0x950},{0x958,0x961},
    {0x971,0x980},{0x985,0x98c},{0x98f,0x990},{0x993,0x9a8},{0x9aa,0x9b0},{0x9b2,0x9b2},{0x9b6,0x9b9},{0x9bd,0x9bd},
    {0x9ce,0x9ce},{0x9dc,0x9dd},{0x9df,0x9e1},{0x9f0,0x9f1},{0x9fc,0x9fc},{0xa05,0xa0a},{0xa0f,0xa10},{0xa13,0xa28},
    {0xa2a,0xa30},{0xa32,0xa33},{0xa35,0xa36},{0xa38,0xa39},{0xa59,0xa5c},{0xa5e,0xa5e},{0xa72,0xa74},{0xa85,0xa8d},
    {0xa8f,0xa91},{0xa93,0xaa8},{0xaaa,0xab0},{0xab2,0xab3},{0xab5,0xab9},{0xabd,0xabd},{0xad0,0xad0},{0xae0,0xae1},
    {0xaf9,0xaf9},{0xb05,0xb0c},{0xb0f,0xb10},{0xb13,0xb28},{0xb2a,0xb30},{0xb32,0xb33},{0xb35,0xb39},{0xb3d,0xb3d},
    {0xb5c,0xb5d},{0xb5f,0xb61},{0xb71,0xb71},{0xb83,0xb83},{0xb85,0xb8a},{0xb8e,0xb90},{0xb92,0xb95},{0xb99,0xb9a},
    {0xb9c,0xb9c},{0xb9e,0xb9f},{0xba3,0xba4},{0xba8,0xbaa},{0xbae,0xbb9},{0xbd0,0xbd0},{0xc05,0xc0c},{0xc0e,0xc10},
    {0xc12,0xc28},{0xc2a,0xc39},{0xc3d,0xc3d},{0xc58,0xc5a},{0xc5d,0xc5d},{0xc60,0xc61},{0xc80,0xc80},{0xc85,0xc8c},
    {0xc8e,0xc90},{0xc92,0xca8},{0xcaa,0xcb3},{0xcb5,0xcb9},{0xcbd,0xcbd},{0xcdd,0xcde},{0xce0,0xce1},{0xcf1,0xcf2},
    {0xd04,0xd0c},{0xd0e,0xd10},{0xd12,0xd3a},{0xd3d,0xd3d},{0xd4e,0xd4e},{0xd54,0xd56},{0xd5f,0xd61},{0xd7a,0xd7f},
    {0xd85,0xd96},{0xd9a,0xdb1},{0xdb3,0xdbb},{0xdbd,0xdbd},{0xdc0,0xdc6},{0xe01,0xe30},{0xe32,0xe33},{0xe40,0xe46},
    {0xe81,0xe82},{0xe84,0xe84},{0xe86,0xe8a},{0xe8c,0xea3},{0xea5,0xea5},{0xea7,0xeb0},{0xeb2,0xeb3},{0xebd,0xebd},
    {0xec0,0xec4},{0xec6,0xec6},{0xedc,0xedf},{0xf00,0xf00},{0xf40,0xf47},{0xf49,0xf6c},{0xf88,0xf8c},{0x1000,0x102a},
    {0x103f,0x103f},{0x1050,0x1055},{0x105a,0x105d},{0x1061,0x1061},{0x1065,0x1066},{0x106e,0x1070},{0x1075,0x1081},{0x108e,0x108e},
    {0x10a0,0x10c5},{0x10c7,0x10c7},{0x10cd,0x10cd},{0x10d0,0x10fa},{0x10fc,0x1248},{0x124a,0x124d},{0x1250,0x1256},{0x1258,0x1258},
    {0x125a,0x125d},{0x1260,0x1288},{0x128a,0x128d},{0x1290,0x12b0},{0x12b2,0x12b5},{0x12b8,0x12be},{0x12c0,0x12c0},{0x12c2,0x12c5},
    {0x12c8,0x12d6},{0x12d8,0x1310},{0x1312,0x1315},{0x1318,0x135a},{0x1380,0x138f},{0x13a0,0x13f5},{0x13f8,0x13fd},{0x1401,0x166c},
    {0x166f,0x167f},{0x1681,0x169a},{0x16a0,0x16ea},{0x16f1,0x16f8},{0x1700,0x1711},{0x171f,0x1731},{0x1740,0x1751},{0x1760,0x176c},
    {0x176e,0x1770},{0x1780,0x17b3},{0x17d7,0x17d7},{0x17dc,0x17dc},{0x1820,0x1878},{0x1880,0x1884},{0x1887,0x18a8},{0x18aa,0x18aa},
    {0x18b0,0x18f5},{0x1900,0x191e},{0x1950,0x196d},{0x1970,0x1974},{0x1980,0x19ab},{0x19b0,0x19c9},{0x1a00,0x1a16},{0x1a20,0x1a54},
    {0x1aa7,0x1aa7},{0x1b05,0x1b33},{0x1b45,0x1b4c},{0x1b83,0x1ba0},{0x1bae,0x1baf},{0x1bba,0x1be5},{0x1c00,0x1c23},{0x1c4d,0x1c4f},
    {0x1c5a,0x1c7d},{0x1c80,0x1c88},{0x1c90,0x1cba},{0x1cbd,0x1cbf},{0x1ce9,0x1cec},{0x1cee,0x1cf3},{0x1cf5,0x1cf6},{0x1cfa,0x1cfa},
    {0x1d00,0x1dbf},{0x1e00,0x1f15},{0x1f18,0x1f1d},{0x1f20,0x1f45},{0x1f48,0x1f4d},{0x1f50,0x1f57},{0x1f59,0x1f59},{0x1f5b,0x1f5b},
    {0x1f5d,0x1f5d},{0x1f5f,0x1f7d},{0x1f80,0x1fb4},{0x1fb6,0x1fbc},{0x1fbe,0x1fbe},{0x1fc2,0x1fc4},{0x1fc6,0x1fcc},{0x1fd0,0x1fd3},
    {0x1fd6,0x1fdb},{0x1fe0,0x1fec},{0x1ff2,0x1ff4},{0x1ff6,0x1ffc},{0x2071,0x2071},{0x207f,0x207f},{0x2090,0x209c},{0x2102,0x2102},
    {0x2107,0x2107},{0x210a,0x2113},{0x2115,0x2115},{0x2119,0x211d},{0x2124,0x2124},{0x2126,0x2126},{0x2128,0x2128},{0x212a,0x212d},
    {0x212f,0x2139},{0x213c,0x213f},{0x2145,0x2149},{0x214e,0x214e},{0x2183,0x2184},{0x2c00,0x2ce4},{0x2ceb,0x2cee},{0x2cf2,0x2cf3},
    {0x2d00,0x2d25},{0x2d27,0x2d27},{0x2d2d,0x2d2d},{0x2d30,0x2d67},{0x2d6f,0x2d6f},{0x2d80,0x2d96},{0x2da0,0x2da6},{0x2da8,0x2dae},
    {0x2db0,0x2db6},{0x2db8,0x2dbe},{0x2dc0,0x2dc6},{0x2dc8,0x2dce},{0x2dd0,0x2dd6},{0x2dd8,0x2dde},{0x2e2f,0x2e2f},{0x3005,0x3006},
    {0x3031,0x3035},{0x303b,0x303c},{0x3041,0x3096},{0x309d,0x309f},{0x30a1,0x30fa},{0x30fc,0x30ff},{0x3105,0x312f},{0x3131,0x318e},
    {0x31a0,0x31bf},{0x31f0,0x31ff},{0x3400,0x4dbf},{0x4e00,0xa48c},{0xa4d0,0xa4fd},{0xa500,0xa60c},{0xa610,0xa61f},{0xa62a,0xa62b},
    {0xa640,0xa66e},{0xa67f,0xa69d},{0xa6a0,0xa6e5},{0xa717,0xa71f},{0xa722,0xa788},{0xa78b,0xa7ca},{0xa7d0,0xa7d1},{0xa7d3,0xa7d3},
    {0xa7d5,0xa7d9},{0xa7f2,0xa801},{0xa803,0xa805},{0xa807,0xa80a},{0xa80c,0xa822},{0xa840,0xa873},{0xa882,0xa8b3},{0xa8f2,0xa8f7},
    {0xa8fb,0xa8fb},{0xa8fd,0xa8fe},{0xa90a,0xa925},{0xa930,0xa946},{0xa960,0xa97c},{0xa984,0xa9b2},{0xa9cf,0xa9cf},{0xa9e0,0xa9e4},
    {0xa9e6,0xa9ef},{0xa9fa,0xa9fe},{0xaa00,0xaa28},{0xaa40,0xaa42},{0xaa44,0xaa4b},{0xaa60,0xaa76},{0xaa7a,0xaa7a},{0xaa7e,0xaaaf},
    {0xaab1,0xaab1},{0xaab5,0xaab6},{0xaab9,0xaabd},{0xaac0,0xaac0},{0xaac2,0xaac2},{0xaadb,0xaadd},{0xaae0,0xaaea},{0xaaf2,0xaaf4},
    {0xab01,0xab06},{0xab09,0xab0e},{0xab11,0xab16},{0xab20,0xab26},{0xab28,0xab2e},{0xab30,0xab5a},{0xab5c,0xab69},{0xab70,0xabe2},
    {0xac00,0xd7a3},{0xd7b0,0xd7c6},{0xd7cb,0xd7fb},{0xf900,0xfa6d},{0xfa70,0xfad9},{0xfb00,0xfb06},{0xfb13,0xfb17},{0xfb1d,0xfb1d},
    {0xfb1f,0xfb28},{0xfb2a,0xfb36},{0xfb38,0xfb3c},{0xfb3e,0xfb3e},{0xfb40,0xfb41},{0xfb43,0xfb44},{0xfb46,0xfbb1},{0xfbd3,0xfd3d},
    {0xfd50,0xfd8f},{0xfd92,0xfdc7},{0xfdf0,0xfdfb},{0xfe70,0xfe74},{0xfe76,0xfefc},{0xff21,0xff3a},{0xff41,0xff5a},{0xff66,0xffbe},
    {0xffc2,0xffc7},{0xffca,0xffcf},{0xffd2,0xffd7},{0xffda,0xffdc},{0x10000,0x1000b},{0x1000d,0x10026},{0x10028,0x1003a},{0x1003c,0x1003d},
    {0x1003f,0x1004d},{0x10050,0x1005d},{0x10080,0x100fa},{0x10280,0x1029c},{0x102a0,0x102d0},{0x10300,0x1031f},{0x1032d,0x10340},{0x10342,0x10349},
    {0x10350,0x10375},{0x10380,0x1039d},{0x103a0,0x103c3},{0x103c8,0x103cf},{0x10400,0x1049d},{0x104b0,0x104d3},{0x104d8,0x104fb},{0x10500,0x10527},
    {0x10530,0x10563},{0x10570,0x1057a},{0x1057c,0x1058a},{0x1058c,0x10592},{0x10594,0x10595},{0x10597,0x105a1},{0x105a3,0x105b1},{0x105b3,0x105b9},
    {0x105bb,0x105bc},{0x10600,0x10736},{0x10740,0x10755},{0x10760,0x10767},{0x10780,0x10785},{0x10787,0x107b0},{0x107b2,0x107ba},{0x10800,0x10805},
    {0x10808,0x10808},{0x1080a,0x10835},{0x10837,0x10838},{0x1083c,0x1083c},{0x1083f,0x10855},{0x10860,0x10876},{0x10880,0x1089e},{0x108e0,0x108f2},
    {0x108f4,0x108f5},{0x10900,0x10915},{0x10920,0x10939},{0x10980,0x109b7},{0x109be,0x109bf},{0x10a00,0x10a00},{0x10a10,0x10a13},{0x10a15,0x10a17},
    {0x10a19,0x10a35},{0x10a60,0x10a7c},{0x10a80,0x10a9c},{0x10ac0,0x10ac7},{0x10ac9,0x10ae4},{0x10b00,0x10b35},{0x10b40,0x10b55},{0x10b60,0x10b72},
    {0x10b80,0x10b91},{0x10c00,0x10c48},{0x10c80,0x10cb2},{0x10cc0,0x10cf2},{0x10d00,0x10d23},{0x10e80,0x10ea9},{0x10eb0,0x10eb1},{0x10f00,0x10f1c},
    {0x10f27,0x10f27},{0x10f30,0x10f45},{0x10f70,0x10f81},{0x10fb0,0x10fc4},{0x10fe0,0x10ff6},{0x11003,0x11037},{0x11071,0x11072},{0x11075,0x11075},
    {0x11083,0x110af},{0x110d0,0x110e8},{0x11103,0x11126},{0x11144,0x11144},{0x11147,0x11147},{0x11150,0x11172},{0x11176,0x11176},{0x11183,0x111b2},
    {0x111c1,0x111c4},{0x111da,0x111da},{0x111dc,0x111dc},{0x11200,0x11211},{0x11213,0x1122b},{0x11280,0x11286},{0x11288,0x11288},{0x1128a,0x1128d},
    {0x1128f,0x1129d},{0x1129f,0x112a8},{0x112b0,0x112de},{0x11305,0x1130c},{0x1130f,0x11310},{0x11313,0x11328},{0x1132a,0x11330},{0x11332,0x11333},
    {0x11335,0x11339},{0x1133d,0x1133d},{0x11350,0x11350},{0x1135d,0x11361},{0x11400,0x11434},{0x11447,0x1144a},{0x1145f,0x11461},{0x11480,0x114af},
    {0x114c4,0x114c5},{0x114c7,0x114c7},{0x11580,0x115ae},{0x115d8,0x115db},{0x11600,0x1162f},{0x11644,0x11644},{0x11680,0x116aa},{0x116b8,0x116b8},
    {0x11700,0x1171a},{0x11740,0x11746},{0x11800,0x1182b},{0x118a0,0x118df},{0x118ff,0x11906},{0x11909,0x11909},{0x1190c,0x11913},{0x11915,0x11916},
    {0x11918,0x1192f},{0x1193f,0x1193f},{0x11941,0x11941},{0x119a0,0x119a7},{0x119aa,0x119d0},{0x119e1,0x119e1},{0x119e3,0x119e3},{0x11a00,0x11a00},
    {0x11a0b,0x11a32},{0x11a3a,0x11a3a},{0x11a50,0x11a50},{0x11a5c,0x11a89},{0x11a9d,0x11a9d},{0x11ab0,0x11af8},{0x11c00,0x11c08},{0x11c0a,0x11c2e},
    {0x11c40,0x11c40},{0x11c72,0x11c8f},{0x11d00,0x11d06},{0x11d08,0x11d09},{0x11d0b,0x11d30},{0x11d46,0x11d46},{0x11d60,0x11d65},{0x11d67,0x11d68},
    {0x11d6a,0x11d89},{0x11d98,0x11d98},{0x11ee0,0x11ef2},{0x11fb0,0x11fb0},{0x12000,0x12399},{0x12480,0x12543},{0x12f90,0x12ff0},{0x13000,0x1342e},
    {0x14400,0x14646},{0x16800,0x16a38},{0x16a40,0x16a5e},{0x16a70,0x16abe},{0x16ad0,0x16aed},{0x16b00,0x16b2f},{0x16b40,0x16b43},{0x16b63,0x16b77},
    {0x16b7d,0x16b8f},{0x16e40,0x16e7f},{0x16f00,0x16f4a},{0x16f50,0x16f50},{0x16f93,0x16f9f},{0x16fe0,0x16fe1},{0x16fe3,0x16fe3},{0x17000,0x187f7},
    {0x18800,0x18cd5},{0x18d00,0x18d08},{0x1aff0,0x1aff3},{0x1aff5,0x1affb},{0x1affd,0x1affe},{0x1b000,0x1b122},{0x1b150,0x1b152},{0x1b164,0x1b167},
    {0x1b170,0x1b2fb},{0x1bc00,0x1bc6a},{0x1bc70,0x1bc7c},{0x1bc80,0x1bc88},{0x1bc90,0x1bc99},{0x1d400,0x1d454},{0x1d456,0x1d49c},{0x1d49e,0x1d49f},
    {0x1d4a2,0x1d4a2},{0x1d4a5,0x1d4a6},{0x1d4a9,0x1d4ac},{0x1d4ae,0x1d4b9},{0x1d4bb,0x1d4bb},{0x1d4bd,0x1d4c3},{0x1d4c5,0x1d505},{0x1d507,0x1d50a},
    {0x1d50d,0x1d514},{0x1d516,0x1d51c},{0x1d51e,0x1d539},{0x1d53b,0x1d53e},{0x1d540,0x1d544},{0x1d546,0x1d546},{0x1d54a,0x1d550},{0x1d552,0x1d6a5},
    {0x1d6a8,0x1d6c0},{0x1d6c2,0x1d6da},{0x1d6dc,0x1d6fa},{0x1d6fc,0x1d714},{0x1d716,0x1d734},{0x1d736,0x1d74e},{0x1d750,0x1d76e},{0x1d770,0x1d788},
    {0x1d78a,0x1d7a8},{0x1d7aa,0x1d7c2},{0x1d7c4,0x1d7cb},{0x1df00,0x1df1e},{0x1e100,0x1e12c},{0x1e137,0x1e13d},{0x1e14e,0x1e14e},{0x1e290,0x1e2ad},
    {0x1e2c0,0x1e2eb},{0x1e7e0,0x1e7e6},{0x1e7e8,0x1e7eb},{0x1e7ed,0x1e7ee},{0x1e7f0,0x1e7fe},{0x1e800,0x1e8c4},{0x1e900,0x1e943},{0x1e94b,0x1e94b},
    {0x1ee00,0x1ee03},{0x1ee05,0x1ee1f},{0x1ee21,0x1ee22},{0x1ee24,0x1ee24},{0x1ee27,0x1ee27},{0x1ee29,0x1ee32},{0x1ee34,0x1ee37},{0x1ee39,0x1ee39},
    {0x1ee3b,0x1ee3b},{0x1ee42,0x1ee42},{0x1ee47,0x1ee47},{0x1ee49,0x1ee49},{0x1ee4b,0x1ee4b},{0x1ee4d,0x1ee4f},{0x1ee51,0x1ee52},{0x1ee54,0x1ee54},
    {0x1ee57,0x1ee57},{0x1ee59,0x1ee59},{0x1ee5b,0x1ee5b},{0x1ee5d,0x1ee5d},{0x1ee5f,0x1ee5f},{0x1ee61,0x1ee62},{0x1ee64,0x1ee64},{0x1ee67,0x1ee6a},
    {0x1ee6c,0x1ee72},{0x1ee74,0x1ee77},{0x1ee79,0x1ee7c},{0x1ee7e,0x1ee7e},{0x1ee80,0x1ee89},{0x1ee8b,0x1ee9b},{0x1eea1,0x1eea3},{0x1eea5,0x1eea9},
    {0x1eeab,0x1eebb},{0x20000,0x2a6df},{0x2a700,0x2b738},{0x2b740,0x2b81d},{0x2b820,0x2cea1},{0x2ceb0,0x2ebe0},{0x2f800,0x2fa1d},{0x30000,0x3134a},
};
static const uint32_t tok_number_ranges[134][2] = { // \p{N}: Nd Nl No
    {0x30,0x39},{0xb2,0xb3},{0xb9,0xb9},{0xbc,0xbe},{0x660,0x669},{0x6f0,0x6f9},{0x7c0,0x7c9},{0x966,0x96f},
    {0x9e6,0x9ef},{0x9f4,0x9f9},{0xa66,0xa6f},{0xae6,0xaef},{0xb66,0xb6f},{0xb72,0xb77},{0xbe6,0xbf2},{0xc66,0xc6f},
    {0xc78,0xc7e},{0xce6,0xcef},{0xd58,0xd5e},{0xd66,0xd78},{0xde6,0xdef},{0xe50,0xe59},{0xed0,0xed9},{0xf20,0xf33},
    {0x1040,0x1049},{0x1090,0x1099},{0x1369,0x137c},{0x16ee,0x16f0},{0x17e0,0x17e9},{0x17f0,0x17f9},{0x1810,0x1819},{0x1946,0x194f},
    {0x19d0,0x19da},{0x1a80,0x1a89},{0x1a90,0x1a99},{0x1b50,0x1b59},{0x1bb0,0x1bb9},{0x1c40,0x1c49},{0x1c50,0x1c59},{0x2070,0x2070},
    {0x2074,0x2079},{0x2080,0x2089},{0x2150,0x2182},{0x2185,0x2189},{0x2460,0x249b},{0x24ea,0x24ff},{0x2776,0x2793},{0x2cfd,0x2cfd},
    {0x3007,0x3007},{0x3021,0x3029},{0x3038,0x303a},{0x3192,0x3195},{0x3220,0x3229},{0x3248,0x324f},{0x3251,0x325f},{0x3280,0x3289},
    {0x32b1,0x32bf},{0xa620,0xa629},{0xa6e6,0xa6ef},{0xa830,0xa835},{0xa8d0,0xa8d9},{0xa900,0xa909},{0xa9d0,0xa9d9},{0xa9f0,0xa9f9},
    {0xaa50,0xaa59},{0xabf0,0xabf9},{0xff10,0xff19},{0x10107,0x10133},{0x10140,0x10178},{0x1018a,0x1018b},{0x102e1,0x102fb},{0x10320,0x10323},
    {0x10341,0x10341},{0x1034a,0x1034a},{0x103d1,0x103d5},{0x104a0,0x104a9},{0x10858,0x1085f},{0x10879,0x1087f},{0x108a7,0x108af},{0x108fb,0x108ff},
    {0x10916,0x1091b},{0x109bc,0x109bd},{0x109c0,0x109cf},{0x109d2,0x109ff},{0x10a40,0x10a48},{0x10a7d,0x10a7e},{0x10a9d,0x10a9f},{0x10aeb,0x10aef},
    {0x10b58,0x10b5f},{0x10b78,0x10b7f},{0x10ba9,0x10baf},{0x10cfa,0x10cff},{0x10d30,0x10d39},{0x10e60,0x10e7e},{0x10f1d,0x10f26},{0x10f51,0x10f54},
    {0x10fc5,0x10fcb},{0x11052,0x1106f},{0x110f0,0x110f9},{0x11136,0x1113f},{0x111d0,0x111d9},{0x111e1,0x111f4},{0x112f0,0x112f9},{0x11450,0x11459},
    {0x114d0,0x114d9},{0x11650,0x11659},{0x116c0,0x116c9},{0x11730,0x1173b},{0x118e0,0x118f2},{0x11950,0x11959},{0x11c50,0x11c6c},{0x11d50,0x11d59},
    {0x11da0,0x11da9},{0x11fc0,0x11fd4},{0x12400,0x1246e},{0x16a60,0x16a69},{0x16ac0,0x16ac9},{0x16b50,0x16b59},{0x16b5b,0x16b61},{0x16e80,0x16e96},
    {0x1d2e0,0x1d2f3},{0x1d360,0x1d378},{0x1d7ce,0x1d7ff},{0x1e140,0x1e149},{0x1e2f0,0x1e2f9},{0x1e8c7,0x1e8cf},{0x1e950,0x1e959},{0x1ec71,0x1ecab},
    {0x1ecad,0x1ecaf},{0x1ecb1,0x1ecb4},{0x1ed01,0x1ed2d},{0x1ed2f,0x1ed3d},{0x1f100,0x1f10c},{0x1fbf0,0x1fbf9},
};
// END UNICODE TABLES

static int tok_in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n) { // binary search
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (cp < r[mid][0]) { hi = mid; } else if (cp > r[mid][1]) { lo = mid + 1; } else { return 1; }
    }
    return 0;
}

static int tok_char_class(uint32_t cp) {
    if (cp < 0x80) { // ASCII first: most text is
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') { return TOK_LETTER; }
        if (cp >= '0' && cp <= '9') { return TOK_NUMBER; }
        return tok_is_white_space(cp) ? TOK_SPACE : TOK_OTHER;
    }
    if (cp == TOK_INVALID) { return TOK_OTHER; }
    if (tok_is_white_space(cp)) { return TOK_SPACE; }
    if (tok_in_ranges(cp, tok_letter_ranges, sizeof(tok_letter_ranges) / sizeof(tok_letter_ranges[0]))) { return TOK_LETTER; }
    if (tok_in_ranges(cp, tok_number_ranges, sizeof(tok_number_ranges) / sizeof(tok_number_ranges[0]))) { return TOK_NUMBER; }
    return TOK_OTHER;
}

#endif // TOKENIZER_H

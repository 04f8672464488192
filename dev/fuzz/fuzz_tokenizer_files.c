// libFuzzer target: the tokenizer's two files (tokenizer.h). The input's first two bytes give the
// length of encoder.json, the rest is vocab.bpe; any pair goes through tokenizer_init_check, and a
// pair it accepts must encode and decode a fixed text and decode every id. Run by dev/fuzz/run.sh.
#include "tokenizer.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 2) { return 0; }
    size_t len = ((size_t)data[0] | (size_t)data[1] << 8) % (size - 1);
    const char* enc = fuzz_file(0, "encoder.json", data + 2, len);
    const char* bpe = fuzz_file(1, "vocab.bpe", data + 2 + len, size - 2 - len);
    Tokenizer t;
    char err[1024];
    if (tokenizer_init_check(&t, enc, bpe, err, sizeof(err)) != 0) { tokenizer_free(&t); return 0; }
    const char* text = "Hello world, \xc3\xbc" "n\xc3\xaf" "c\xc3\xb6" "d\xc3\xa9 123!\n\n  the end\xff";
    int ids[256];
    size_t n = tokenizer_encode(&t, text, strlen(text), ids, 256);
    size_t total = 0;
    for (size_t i = 0; i < n && i < 256; i++) {
        size_t k;
        if (tokenizer_decode_bytes(&t, (uint32_t)ids[i], &k) == NULL) { abort(); }
        total += k;
    }
    if (n <= 256 && total != strlen(text)) { abort(); } // decode(encode(x)) has x's bytes
    for (uint32_t id = 0; id < t.vocab_size + 2; id++) { size_t k; tokenizer_decode_bytes(&t, id, &k); }
    tokenizer_free(&t);
    return 0;
}

// libFuzzer target: arbitrary text through GPT-2's tokenizer (tokenizer.h, the files in data/gpt2,
// so run from the repository root). decode(encode(x)) must be x, byte for byte, for any bytes.
// Run by dev/fuzz/run.sh.
#include "tokenizer.h"
#include "fuzz.h"

static Tokenizer tok;
static int loaded = 0;

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (!loaded) {
        char err[1024];
        if (tokenizer_init_check(&tok, "data/gpt2/encoder.json", "data/gpt2/vocab.bpe", err, sizeof(err)) != 0) { fprintf(stderr, "%s\n", err); abort(); }
        loaded = 1;
    }
    int* ids = (int*)malloc((size + 1) * sizeof(int));
    size_t n = tokenizer_encode(&tok, (const char*)data, size, ids, size + 1);
    if (n > size) { abort(); } // every token holds at least one byte
    char* back = (char*)malloc(size + 1);
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        size_t k;
        const char* piece = tokenizer_decode_bytes(&tok, (uint32_t)ids[i], &k);
        if (piece == NULL || at + k > size) { abort(); }
        memcpy(back + at, piece, k);
        at += k;
    }
    if (at != size || (size > 0 && memcmp(back, data, size) != 0)) { abort(); }
    free(ids);
    free(back);
    return 0;
}

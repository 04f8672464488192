// libFuzzer target: token shards (dataloader.h). Any bytes through shard_check and
// shard_check_tokens; a file they accept must then serve every batch of an epoch (shuffled) and
// give a resume position that dataloader_position_check accepts. Run by dev/fuzz/run.sh.
#include "dataloader.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const char* path = fuzz_file(0, "shard.bin", data, size);
    char err[2048];
    size_t ntok;
    if (shard_check(path, 2 * 4 + 1, &ntok, err, sizeof(err)) != SHARD_OK) { return 0; } // one batch of B=2, T=4
    shard_check_tokens(path, 50257, err, sizeof(err));
    // a vocabulary of 65536 admits every uint16, so no token can make next_batch exit
    DataLoader loader;
    dataloader_init(&loader, path, 2, 4, 0, 1, 1, 7, 65536);
    for (size_t k = 0; k <= loader.num_batches; k++) { dataloader_next_batch(&loader); }
    if (dataloader_position_check(&loader, dataloader_position(&loader), err, sizeof(err)) != 0) { fprintf(stderr, "%s\n", err); abort(); }
    dataloader_free(&loader);
    return 0;
}

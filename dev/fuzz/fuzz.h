/*
dev/fuzz/fuzz.h: shared by the libFuzzer targets of dev/fuzz (each reader of llm.moe, run by
dev/fuzz/run.sh). The readers take paths, so each input is first written to a file of this
process in /dev/shm (or /tmp). The targets call only the readers that report an error and return,
as the trainers' collective checks do: an input that made one exit would be a finding, and
libFuzzer reports an exiting target as one.
*/
#ifndef FUZZ_H
#define FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

// writes data to a file named name for this process; returns its path (static storage per name slot)
static const char* fuzz_file(int slot, const char* name, const uint8_t* data, size_t size) {
    static char paths[4][512];
    const char* dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(paths[slot], sizeof(paths[slot]), "%s/llmoe_fuzz_%d_%s", dir, (int)getpid(), name);
    FILE* f = fopen(paths[slot], "wb");
    if (f == NULL) { perror(paths[slot]); abort(); }
    if (size > 0 && fwrite(data, 1, size, f) != size) { perror(paths[slot]); abort(); }
    fclose(f);
    return paths[slot];
}

#endif // FUZZ_H

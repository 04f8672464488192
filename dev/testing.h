/*
dev/testing.h: what every C test program of llm.moe shares. Each check prints one line, "ok" or
"FAIL", its name, and the measured error with its bound; test_summary prints "N passed, N failed"
and gives the exit code. dev/run_tests.sh counts the lines of all programs.

  check(err < 1e-5, "reference/moe/logits", "max abs err %.2e (bound 1e-5)", err);
  status = run_in_child(fn, arg, msg, sizeof(msg));   // fn may exit: its status and stderr
  check_exits("name", fn, arg, "error: dataloader: ", "file.bin", "bad magic");
  return test_summary();
*/
#ifndef TESTING_H
#define TESTING_H

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int tests_passed = 0, tests_failed = 0;

static inline void check(int cond, const char* name, const char* fmt, ...) {
    printf("%s %s", cond ? "ok  " : "FAIL", name);
    if (fmt != NULL) {
        va_list args;
        va_start(args, fmt);
        printf(" ");
        vprintf(fmt, args);
        va_end(args);
    }
    printf("\n");
    if (cond) { tests_passed++; } else { tests_failed++; }
}

static inline int test_summary(void) {
    printf("%d passed, %d failed\n", tests_passed, tests_failed);
    return tests_failed == 0 ? 0 : 1;
}

// max |a - b| and max |a| over n
static inline double max_abs_diff(const float* a, const float* b, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) { double d = fabs((double)a[i] - (double)b[i]); if (d > m) { m = d; } }
    return m;
}
static inline double max_abs(const float* a, size_t n) {
    double m = 0.0;
    for (size_t i = 0; i < n; i++) { if (fabs((double)a[i]) > m) { m = fabs((double)a[i]); } }
    return m;
}

// Runs fn(arg) in a child process with its stderr captured into msg; returns the child's exit
// status (0 if fn returned, -1 if it did not exit normally). For the paths that exit.
static inline int run_in_child(void (*fn)(const void*), const void* arg, char* msg, size_t msglen) {
    int fds[2];
    msg[0] = '\0';
    if (pipe(fds) != 0) { return -1; }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) { close(fds[0]); close(fds[1]); return -1; }
    if (pid == 0) {
        close(fds[0]);
        dup2(fds[1], 2);
        close(fds[1]);
        fn(arg);
        fflush(stdout);
        _exit(0);
    }
    close(fds[1]);
    size_t len = 0;
    ssize_t r;
    while (len + 1 < msglen && (r = read(fds[0], msg + len, msglen - 1 - len)) > 0) { len += (size_t)r; }
    msg[len] = '\0';
    char sink[256]; // a longer message than msg holds: drain it so the child never blocks
    while (read(fds[0], sink, sizeof(sink)) > 0) {}
    close(fds[0]);
    int status;
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) { return -1; }
    return WEXITSTATUS(status);
}

// fn(arg) must exit with EXIT_FAILURE and one line on stderr that starts with prefix and
// contains want1 and want2
static inline void check_exits(const char* name, void (*fn)(const void*), const void* arg, const char* prefix,
                        const char* want1, const char* want2) {
    char msg[4096];
    int status = run_in_child(fn, arg, msg, sizeof(msg));
    size_t len = strlen(msg);
    int lines = 0;
    for (size_t i = 0; i < len; i++) { lines += msg[i] == '\n'; }
    int one_line = lines == 1 && len > 0 && msg[len - 1] == '\n';
    if (len > 0 && msg[len - 1] == '\n') { msg[len - 1] = '\0'; }
    check(status == EXIT_FAILURE && one_line && strncmp(msg, prefix, strlen(prefix)) == 0 &&
          strstr(msg, want1) != NULL && strstr(msg, want2) != NULL,
          name, "exit %d, %d line(s): %s", status, lines, msg);
}

#endif // TESTING_H

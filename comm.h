/*
comm.h: the communication of expert parallelism between W processes: MPI when built with
-DUSE_MPI (launched with mpirun), else a world of one in which every collective is a local copy,
so one code path serves both. The only place where USE_MPI appears.

API:
  Comm comm = comm_init(&argc, &argv);      // sets process_rank (utils.h); comm_finalize(&comm)
  alltoall_rows(send, send_rows, recv, recv_rows, C, &comm);   // rows of C floats, by rank
  alltoall_rows_bytes(...)                                      // rows of any size
  allgather_ints / allreduce_floats / allreduce_doubles / gather_floats / comm_barrier
  comm_check_all(failed, msg, &comm);       // any rank failed: one line on rank 0, all exit
  comm_any(flag, &comm), comm_min_int(x, &comm), mean_over_ranks(x, &comm)

Example (the dispatch of an MoE layer: each rank sends its rows for rank q's experts to q):
  alltoall_rows(sendbuf, send_rows, recvbuf, recv_rows, C, &comm);
*/
#ifndef COMM_H
#define COMM_H

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef USE_MPI
#include <mpi.h>
#endif
#include "utils.h"

typedef struct {
    int rank;     // this process
    int world;    // W
    int* scratch; // (4*W) counts and displacements for the v-collectives
#ifdef USE_MPI
    MPI_Comm mpi;
#endif
} Comm;

#ifdef USE_MPI
static inline void mpi_check(int status, const char* call, const char* file, int line) {
    if (status != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(status, msg, &len);
        fail_exit("%s failed at %s:%d: %s", call, file, line, msg);
    }
}
#define mpiCheck(call) mpi_check((call), #call, __FILE__, __LINE__)
#endif

static inline Comm comm_make(int rank, int world) {
    Comm c;
    memset(&c, 0, sizeof(c));
    c.rank = rank;
    c.world = world;
    c.scratch = (int*)callocCheck(4 * world, sizeof(int));
    return c;
}

// the world of processes this run was launched with (mpirun), or a world of one
static inline Comm comm_init(int* argc, char*** argv) {
#ifdef USE_MPI
    mpiCheck(MPI_Init(argc, argv));
    int rank, world;
    mpiCheck(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    mpiCheck(MPI_Comm_size(MPI_COMM_WORLD, &world));
    Comm c = comm_make(rank, world);
    c.mpi = MPI_COMM_WORLD;
#else
    (void)argc; (void)argv;
    Comm c = comm_make(0, 1);
#endif
    process_rank = c.rank;
    return c;
}

// a world of one inside an MPI run (tests compare W ranks against it)
static inline Comm comm_self(void) {
    Comm c = comm_make(0, 1);
#ifdef USE_MPI
    c.mpi = MPI_COMM_SELF;
#endif
    return c;
}

static inline void comm_free(Comm* c) { free(c->scratch); c->scratch = NULL; }

static inline void comm_finalize(Comm* c) {
    comm_free(c);
#ifdef USE_MPI
    MPI_Finalize();
#endif
}

// each rank sends send_rows[q] rows of row_bytes bytes to rank q, in rank order, and receives
// recv_rows[q] rows from rank q, stored in rank order (send and recv may be device memory only
// under the CPU emulation of CUDA, where it is host memory)
static inline void alltoall_rows_bytes(const void* send, const int* send_rows, void* recv, const int* recv_rows, // (sum send_rows rows), (W), ..
                                       size_t row_bytes, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) {
        int W = comm->world;
        int* sc = comm->scratch; int* sd = sc + W; int* rc = sc + 2 * W; int* rd = sc + 3 * W;
        long long so = 0, ro = 0;
        for (int q = 0; q < W; q++) {
            long long s_bytes = (long long)send_rows[q] * row_bytes, r_bytes = (long long)recv_rows[q] * row_bytes;
            if (so + s_bytes > INT_MAX || ro + r_bytes > INT_MAX) { fail_exit("alltoall: more than 2^31 bytes in one all-to-all (lower -b or -t)"); }
            sc[q] = (int)s_bytes; sd[q] = (int)so; so += s_bytes;
            rc[q] = (int)r_bytes; rd[q] = (int)ro; ro += r_bytes;
        }
        mpiCheck(MPI_Alltoallv(send, sc, sd, MPI_BYTE, recv, rc, rd, MPI_BYTE, comm->mpi));
        return;
    }
#endif
    (void)recv_rows;
    if (send != recv) { memcpy(recv, send, (size_t)send_rows[0] * row_bytes); }
}

// the same for rows of C floats
static inline void alltoall_rows(const float* send, const int* send_rows, float* recv, const int* recv_rows, // (sum send_rows, C), (W), ..
                                 int C, const Comm* comm) {
    alltoall_rows_bytes(send, send_rows, recv, recv_rows, (size_t)C * sizeof(float), comm);
}

// recv (W*n) = every rank's n ints, in rank order
static inline void allgather_ints(const int* send, int* recv, int n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Allgather(send, n, MPI_INT, recv, n, MPI_INT, comm->mpi)); return; }
#endif
    (void)comm;
    memcpy(recv, send, n * sizeof(int));
}

// in place: buf = sum over ranks of buf
static inline void allreduce_floats(float* buf, size_t n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1 && n > 0) { mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, comm->mpi)); }
#endif
    (void)buf; (void)n; (void)comm;
}

static inline void allreduce_doubles(double* buf, int n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_DOUBLE, MPI_SUM, comm->mpi)); }
#endif
    (void)buf; (void)n; (void)comm;
}

// the smallest x over ranks
static inline int comm_min_int(int x, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_INT, MPI_MIN, comm->mpi)); }
#endif
    (void)comm;
    return x;
}

// whether flag is set on any rank
static inline int comm_any(int flag, const Comm* comm) { return comm_min_int(flag ? 0 : 1, comm) == 0; }

// mean over ranks of one number per rank (the losses: every rank has the same number of tokens)
static inline double mean_over_ranks(double x, const Comm* comm) {
    allreduce_doubles(&x, 1, comm);
    return x / comm->world;
}

// out (W*n) on rank 0 = every rank's n floats in rank order; out is unused elsewhere
static inline void gather_floats(const float* send, float* out, size_t n, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Gather(send, (int)n, MPI_FLOAT, out, (int)n, MPI_FLOAT, 0, comm->mpi)); return; }
#endif
    (void)comm;
    memcpy(out, send, n * sizeof(float));
}

static inline void comm_barrier(const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) { mpiCheck(MPI_Barrier(comm->mpi)); }
#endif
    (void)comm;
}

// A collective check: every rank says whether it failed (with a message). If any did, rank 0
// prints the lowest failing rank's message as one line and every rank exits non-zero, so a
// problem seen by one rank neither hangs the others nor prints W times.
static inline void comm_check_all(int failed, const char* msg, const Comm* comm) {
#ifdef USE_MPI
    if (comm->world > 1) {
        int first = failed ? comm->rank : comm->world;
        mpiCheck(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm->mpi));
        if (first == comm->world) { return; }
        char buf[1024] = {0};
        if (comm->rank == first) { snprintf(buf, sizeof(buf), "%s", msg); }
        mpiCheck(MPI_Bcast(buf, sizeof(buf), MPI_CHAR, first, comm->mpi));
        if (comm->rank == 0) {
            fflush(stdout);
            if (first > 0) { fprintf(stderr, "error: rank %d: %s\n", first, buf); }
            else { fprintf(stderr, "error: %s\n", buf); }
        }
        MPI_Finalize();
        exit(EXIT_FAILURE);
    }
#endif
    (void)comm;
    if (failed) { fail_exit("%s", msg); }
}

#endif // COMM_H

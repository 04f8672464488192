/*
gpu_comm.cuh: the GPU trainer's collectives between its W processes (one per GPU): the
all-to-alls of expert parallelism and the sum of the replicated parameters' gradients. Three
transports sit behind the same two calls:
  NCCL   (nvcc with USE_NCCL, between GPUs): ncclSend/ncclRecv per peer inside ncclGroupStart /
         ncclGroupEnd on the communication stream, ncclAllReduce; the communicator is made from an
         id rank 0 broadcasts over MPI
  MPI    (LLMOE_TRANSPORT=mpi, or a build without NCCL): rows staged through host memory,
         MPI_Alltoallv and MPI_Allreduce; several ranks may then share one GPU, which NCCL refuses
  the CPU emulation of CUDA: "device" memory is host memory, so MPI (comm.h) runs on it directly
and a world of one copies. Counts and other small host arrays always go through comm.h. Every
rank posts the same calls in the same order whatever its row counts (zero included): the send
and receive counts both come from the all-gathered (W, E) count matrix.

API:
  gpu_comm_init(&g, &comm);  ...  gpu_comm_free(&g);
  gpu_alltoall_rows(send, send_rows, recv, recv_rows, C, &g);  // rows of C floatX, by rank
  gpu_allreduce_sum(buf, n, &g);                                 // buf (n floatX) = sum over ranks
A failing NCCL call names itself, aborts the communicator and stops the process (mpirun then stops
the others) rather than leaving them waiting.
*/
#ifndef GPU_COMM_CUH
#define GPU_COMM_CUH

#include "cuda_common.h"
#include "comm.h"
#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
#include <nccl.h>
#endif

typedef struct {
    const Comm* comm;
    int nccl;                  // NCCL carries the rows (else MPI)
#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
    ncclComm_t nccl_comm;
    cudaStream_t stream;       // the communication stream
#endif
    char* host_send;           // MPI on a real GPU: rows staged through the host
    char* host_recv;
    size_t host_bytes;
    float* host_floats;        // (GPU_COMM_CHUNK) an MPI sum goes through fp32 on the host
    floatX* host_floatX;       // (GPU_COMM_CHUNK)
} GpuComm;

#define GPU_COMM_CHUNK (1 << 20)

#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
static GpuComm* nccl_to_abort = NULL;
static inline void nccl_check(ncclResult_t r, const char* call, const char* file, int line) {
    if (r != ncclSuccess) {
        if (nccl_to_abort != NULL) { ncclCommAbort(nccl_to_abort->nccl_comm); }
        errors_on_every_rank = 1;
        fail_exit("%s failed at %s:%d: %s", call, file, line, ncclGetErrorString(r));
    }
}
#define ncclCheck(call) nccl_check((call), #call, __FILE__, __LINE__)
static inline ncclDataType_t nccl_type(void) { return sizeof(floatX) == 2 ? ncclBfloat16 : ncclFloat32; }
#endif

// on a real GPU, the device of this process: the local rank among the processes of its node
static inline void gpu_select_device(const Comm* comm) {
#if defined(USE_MPI) && !defined(CUDA_EMULATION)
    MPI_Comm node;
    int local = 0, devices = 1;
    mpiCheck(MPI_Comm_split_type(comm->mpi, MPI_COMM_TYPE_SHARED, comm->rank, MPI_INFO_NULL, &node));
    mpiCheck(MPI_Comm_rank(node, &local));
    mpiCheck(MPI_Comm_free(&node));
    cudaCheck(cudaGetDeviceCount(&devices));
    cudaCheck(cudaSetDevice(local % devices));
#else
    (void)comm;
#endif
}

static inline void gpu_comm_init(GpuComm* g, const Comm* comm) {
    memset(g, 0, sizeof(*g));
    g->comm = comm;
    g->host_floats = (float*)mallocCheck(GPU_COMM_CHUNK * sizeof(float));
    g->host_floatX = (floatX*)mallocCheck(GPU_COMM_CHUNK * sizeof(floatX));
#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
    const char* transport = getenv("LLMOE_TRANSPORT");
    g->nccl = comm->world > 1 && !(transport != NULL && strcmp(transport, "mpi") == 0);
    if (g->nccl) {
        ncclUniqueId id;
        if (comm->rank == 0) { ncclCheck(ncclGetUniqueId(&id)); }
        mpiCheck(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm->mpi));
        ncclCheck(ncclCommInitRank(&g->nccl_comm, comm->world, id, comm->rank));
        cudaCheck(cudaStreamCreate(&g->stream));
        nccl_to_abort = g;
    }
#endif
}

static inline void gpu_comm_free(GpuComm* g) {
#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
    if (g->nccl) {
        nccl_to_abort = NULL;
        ncclCheck(ncclCommDestroy(g->nccl_comm));
        cudaCheck(cudaStreamDestroy(g->stream));
    }
#endif
    free(g->host_send);
    free(g->host_recv);
    free(g->host_floats);
    free(g->host_floatX);
}

// each rank sends send_rows[q] rows of C floatX to rank q and receives recv_rows[q] from it, both
// in rank order (device memory)
static inline void gpu_alltoall_rows(const floatX* send, const int* send_rows, floatX* recv, const int* recv_rows, int C, GpuComm* g) {
    const Comm* comm = g->comm;
    size_t row = (size_t)C * sizeof(floatX);
    if (comm->world == 1) {
        if (send_rows[0] > 0) { cudaCheck(cudaMemcpy(recv, send, send_rows[0] * row, cudaMemcpyDeviceToDevice)); }
        return;
    }
#ifdef CUDA_EMULATION
    alltoall_rows_bytes(send, send_rows, recv, recv_rows, row, comm); // host memory: MPI directly
#else
#ifdef USE_NCCL
    if (g->nccl) {
        cudaCheck(cudaDeviceSynchronize()); // the rows were written on the default stream
        ncclCheck(ncclGroupStart());
        size_t so = 0, ro = 0;
        for (int q = 0; q < comm->world; q++) {
            ncclCheck(ncclSend(send + so * C, (size_t)send_rows[q] * C, nccl_type(), q, g->nccl_comm, g->stream));
            ncclCheck(ncclRecv(recv + ro * C, (size_t)recv_rows[q] * C, nccl_type(), q, g->nccl_comm, g->stream));
            so += send_rows[q];
            ro += recv_rows[q];
        }
        ncclCheck(ncclGroupEnd());
        cudaCheck(cudaStreamSynchronize(g->stream));
        return;
    }
#endif
    size_t sent = 0, received = 0;
    for (int q = 0; q < comm->world; q++) { sent += send_rows[q]; received += recv_rows[q]; }
    size_t need = (sent > received ? sent : received) * row;
    if (need > g->host_bytes) { // grows to the largest exchange once, then stays
        free(g->host_send); free(g->host_recv);
        g->host_send = (char*)mallocCheck(need);
        g->host_recv = (char*)mallocCheck(need);
        g->host_bytes = need;
    }
    if (sent > 0) { cudaCheck(cudaMemcpy(g->host_send, send, sent * row, cudaMemcpyDeviceToHost)); }
    alltoall_rows_bytes(g->host_send, send_rows, g->host_recv, recv_rows, row, comm);
    if (received > 0) { cudaCheck(cudaMemcpy(recv, g->host_recv, received * row, cudaMemcpyHostToDevice)); }
#endif
}

// buf (n floatX, device) = its sum over ranks. fp32 on the wire where floatX is bf16 and MPI
// carries it (MPI has no bf16 sum); NCCL sums bf16 itself.
static inline void gpu_allreduce_sum(floatX* buf, size_t n, GpuComm* g) {
    if (g->comm->world == 1 || n == 0) { return; }
#if defined(USE_NCCL) && !defined(CUDA_EMULATION)
    if (g->nccl) {
        cudaCheck(cudaDeviceSynchronize());
        ncclCheck(ncclAllReduce(buf, buf, n, nccl_type(), ncclSum, g->nccl_comm, g->stream));
        cudaCheck(cudaStreamSynchronize(g->stream));
        return;
    }
#endif
    floatX* staged = g->host_floatX;
    for (size_t at = 0; at < n; at += GPU_COMM_CHUNK) {
        size_t k = n - at < GPU_COMM_CHUNK ? n - at : GPU_COMM_CHUNK;
        cudaCheck(cudaMemcpy(staged, buf + at, k * sizeof(floatX), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < k; i++) { g->host_floats[i] = (float)staged[i]; }
        allreduce_floats(g->host_floats, k, g->comm);
        for (size_t i = 0; i < k; i++) { staged[i] = (floatX)g->host_floats[i]; }
        cudaCheck(cudaMemcpy(buf + at, staged, k * sizeof(floatX), cudaMemcpyHostToDevice));
    }
}

#endif // GPU_COMM_CUH

/*
matmul.cuh: the one matrix multiply of the GPU trainer, forward and backward. Under nvcc it is
cuBLASLt (floatX inputs and outputs, fp32 accumulation, the bias and GELU epilogues); under the
CPU emulation (CUDA_EMULATION) the same function has a CPU body with the same contract, so the
emulated trainer computes what the GPU computes, to fp32 rounding. The host-side checks (16-byte
aligned pointers, leading dimensions that are multiples of 8 elements) run in both.

API (row-major, as the trainers think; shapes in the comments):
  matmul_init(); ... matmul_free();                    // the cuBLASLt handle and its workspace
  matmul_forward(out, inp, weight, bias, N, C, OC, pre_gelu, stream);
      out (N,OC) = inp (N,C) @ weight (OC,C)^T + bias (OC) [bias may be NULL]; with pre_gelu
      (N,OC) != NULL, pre_gelu keeps that and out = gelu(it) (GPT-2's tanh GELU)
  matmul_backward(dinp, dweight, dbias, dout, inp, weight, bias_scratch, N, C, OC, gelu_input, stream);
      dinp (N,C) = dout (N,OC) @ weight (OC,C) (written); with gelu_input (N,C) != NULL, dinp is
      then multiplied by gelu'(gelu_input): the backward of the GELU that made inp. dweight (OC,C)
      += dout^T @ inp; dbias (OC) += the column sums of dout, by a kernel with a fixed order.

Underneath, matmul_gemm is cuBLAS's column-major D = op(A) op(B) (+ D): a row-major (rows, cols)
array is the column-major (cols, rows) one, so out^T = weight @ inp^T is gemm(out, weight, inp,
m=OC, n=N, k=C, transA). GELU is the tanh approximation (cuBLASLt's, and GPT-2's).
*/
#ifndef MATMUL_CUH
#define MATMUL_CUH

#include "cuda_common.h"
#ifndef CUDA_EMULATION
#include <cublasLt.h>
#endif

// ----------------------------------------------------------------------------
// GELU (tanh approximation), shared by the CPU body and the kernels

#define GELU_SCALE 0.7978845608028654f // sqrt(2 / pi)
__host__ __device__ inline float gelu_f(float x) {
    float cube = 0.044715f * x * x * x;
    return 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + cube)));
}
__host__ __device__ inline float gelu_grad_f(float x) { // d gelu(x) / dx
    float cube = 0.044715f * x * x * x;
    float t = tanhf(GELU_SCALE * (x + cube));
    float sech2 = 1.0f - t * t;
    return 0.5f * (1.0f + t) + x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
}

// ----------------------------------------------------------------------------
// the GEMM: cuBLASLt, or its CPU body

#ifndef CUDA_EMULATION
static cublasLtHandle_t cublaslt_handle;
static void* cublaslt_workspace = NULL;
static const size_t cublaslt_workspace_size = (size_t)32 << 20;

static inline void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) { fail_exit("%s failed at %s:%d: cuBLAS status %d", call, file, line, (int)status); }
}
#define cublasCheck(call) cublas_check((call), #call, __FILE__, __LINE__)
#endif

static inline void matmul_init(void) {
#ifndef CUDA_EMULATION
    cublasCheck(cublasLtCreate(&cublaslt_handle));
    cudaCheck(cudaMalloc(&cublaslt_workspace, cublaslt_workspace_size));
#endif
}

static inline void matmul_free(void) {
#ifndef CUDA_EMULATION
    cudaCheck(cudaFree(cublaslt_workspace));
    cublasCheck(cublasLtDestroy(cublaslt_handle));
#endif
}

// the host-side contract of every GEMM: what cuBLASLt needs for its fast paths, checked everywhere
static inline void matmul_check(const void* d, const void* a, const void* b, const void* bias, const void* aux, int m, int n, int k,
                                int transA, int transB) {
    const void* ptrs[5] = {d, a, b, bias, aux};
    const char* names[5] = {"output", "A", "B", "bias", "GELU input"};
    for (int i = 0; i < 5; i++) {
        if (((uintptr_t)ptrs[i] % 16) != 0) { fail_exit("matmul: the %s pointer %p is not 16-byte aligned (m=%d n=%d k=%d)", names[i], ptrs[i], m, n, k); }
    }
    if (m <= 0 || n <= 0 || k <= 0) { fail_exit("matmul: empty shape m=%d n=%d k=%d", m, n, k); }
    int lda = transA ? k : m, ldb = transB ? n : k; // and m for D
    if (m % 8 != 0 || lda % 8 != 0 || ldb % 8 != 0) {
        fail_exit("matmul: leading dimensions %d (A), %d (B) and %d (D) must be multiples of 8 (m=%d n=%d k=%d)", lda, ldb, m, m, n, k);
    }
}

// Column-major, as cuBLAS: D (m,n) = op(A) (m,k) @ op(B) (k,n) [+ bias (m) per row]; accumulate: D +=.
// gelu_aux != NULL: forward (dgelu = 0) stores the pre-activation in gelu_aux (m,n) and D = gelu;
// backward (dgelu = 1) multiplies the product by gelu'(gelu_aux). A is (k,m) when transA, else (m,k);
// B is (n,k) when transB, else (k,n); every leading dimension is the row count of its stored array.
static inline void matmul_gemm(floatX* d, const floatX* a, const floatX* b, const floatX* bias, int m, int n, int k,
                               int transA, int transB, int accumulate, floatX* gelu_aux, int dgelu, cudaStream_t stream) {
    matmul_check(d, a, b, bias, gelu_aux, m, n, k, transA, transB);
    if (gelu_aux != NULL && ((bias != NULL && dgelu) || accumulate)) { fail_exit("matmul: a GELU epilogue takes no accumulation (and no bias backward)"); }
#ifdef CUDA_EMULATION
    (void)stream;
    // the CPU body: fp32 sums in order of k, then bias, GELU, and the one rounding to floatX
    #pragma omp parallel
    {
    float* col = (float*)mallocCheck((size_t)m * sizeof(float)); // one column of D per OS thread
    #pragma omp for schedule(static)
    for (int j = 0; j < n; j++) {
        if (transA) { // op(A)(i,p) = A[p + i*k]: a dot product of two contiguous vectors per output
            for (int i = 0; i < m; i++) {
                float s = 0.0f;
                for (int p = 0; p < k; p++) { s += (float)a[p + (size_t)i * k] * (float)(transB ? b[j + (size_t)p * n] : b[p + (size_t)j * k]); }
                col[i] = s;
            }
        } else {      // op(A)(i,p) = A[i + p*m]: the column is a sum of A's columns
            for (int i = 0; i < m; i++) { col[i] = 0.0f; }
            for (int p = 0; p < k; p++) {
                float bp = (float)(transB ? b[j + (size_t)p * n] : b[p + (size_t)j * k]);
                const floatX* ap = a + (size_t)p * m;
                for (int i = 0; i < m; i++) { col[i] += (float)ap[i] * bp; }
            }
        }
        for (int i = 0; i < m; i++) {
            size_t at = i + (size_t)j * m;
            float v = col[i];
            if (bias != NULL && !dgelu) { v += (float)bias[i]; }
            if (gelu_aux != NULL && !dgelu) { gelu_aux[at] = (floatX)v; v = gelu_f(v); }
            if (gelu_aux != NULL && dgelu) { v *= gelu_grad_f((float)gelu_aux[at]); }
            if (accumulate) { v += (float)d[at]; }
            d[at] = (floatX)v;
        }
    }
    free(col);
    }
#else
    cublasLtMatmulDesc_t desc;
    cublasCheck(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t opA = transA ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transB ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof(opA)));
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof(opB)));
    cudaDataType_t type = sizeof(floatX) == 2 ? CUDA_R_16BF : CUDA_R_32F;
    cublasLtMatrixLayout_t A, B, D;
    cublasCheck(cublasLtMatrixLayoutCreate(&A, type, transA ? k : m, transA ? m : k, transA ? k : m));
    cublasCheck(cublasLtMatrixLayoutCreate(&B, type, transB ? n : k, transB ? k : n, transB ? n : k));
    cublasCheck(cublasLtMatrixLayoutCreate(&D, type, m, n, m));
    cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    if (gelu_aux != NULL) {
        int64_t ld = m;
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof(ld)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &gelu_aux, sizeof(gelu_aux)));
        epilogue = dgelu ? CUBLASLT_EPILOGUE_DGELU : (bias != NULL ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX);
    } else if (bias != NULL) {
        epilogue = CUBLASLT_EPILOGUE_BIAS;
    }
    cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
    if (bias != NULL) {
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)));
        cublasCheck(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cublaslt_workspace_size, sizeof(cublaslt_workspace_size)));
    cublasLtMatmulHeuristicResult_t heuristic;
    int found = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(cublaslt_handle, desc, A, B, D, D, pref, 1, &heuristic, &found));
    if (found == 0) { fail_exit("matmul: cuBLASLt has no algorithm for m=%d n=%d k=%d transA=%d transB=%d epilogue %d", m, n, k, transA, transB, (int)epilogue); }
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    cublasCheck(cublasLtMatmul(cublaslt_handle, desc, &alpha, a, A, b, B, &beta, d, D, d, D, &heuristic.algo,
                               cublaslt_workspace, cublaslt_workspace_size, stream));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    cublasCheck(cublasLtMatrixLayoutDestroy(A));
    cublasCheck(cublasLtMatrixLayoutDestroy(B));
    cublasCheck(cublasLtMatrixLayoutDestroy(D));
    cublasCheck(cublasLtMatmulDescDestroy(desc));
#endif
}

// ----------------------------------------------------------------------------
// forward and backward in the trainers' row-major terms

static inline void matmul_forward(floatX* out, const floatX* inp, const floatX* weight, const floatX* bias, // (N,OC), (N,C), (OC,C), (OC)
                                  int N, int C, int OC, floatX* pre_gelu, cudaStream_t stream) {           // pre_gelu (N,OC) or NULL
    matmul_gemm(out, weight, inp, bias, OC, N, C, 1, 0, 0, pre_gelu, 0, stream);
}

// dbias (OC) += the column sums of dout (N,OC): block x sums columns [32 x, 32 x + 32) over rows
// in a fixed order (each thread a strided set of rows, then a tree through shared memory), so
// the result does not depend on timing. partial (gridDim.y, OC) floats of scratch.
__global__ void bias_backward_kernel(float* partial, const floatX* dout, int N, int OC) {
    __shared__ float sums[32][33];
    int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.0f;
    for (int r = blockIdx.y * blockDim.y + threadIdx.y; r < N; r += gridDim.y * blockDim.y) {
        if (c < OC) { s += (float)dout[(size_t)r * OC + c]; }
    }
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.y / 2; stride > 0; stride /= 2) {
        if ((int)threadIdx.y < stride) { sums[threadIdx.y][threadIdx.x] += sums[threadIdx.y + stride][threadIdx.x]; }
        __syncthreads();
    }
    if (threadIdx.y == 0 && c < OC) { partial[(size_t)blockIdx.y * OC + c] = sums[0][threadIdx.x]; }
}

__global__ void bias_backward_finish_kernel(floatX* dbias, const float* partial, int parts, int OC) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) { return; }
    float s = 0.0f;
    for (int p = 0; p < parts; p++) { s += partial[(size_t)p * OC + c]; }
    dbias[c] = (floatX)((float)dbias[c] + s);
}

#define BIAS_BACKWARD_PARTS 8 // row groups of the bias gradient: bias_scratch holds (8, OC) floats

static inline void matmul_backward(floatX* dinp, floatX* dweight, floatX* dbias,               // (N,C), (OC,C), (OC) or NULL
                                   const floatX* dout, const floatX* inp, const floatX* weight, // (N,OC), (N,C), (OC,C)
                                   float* bias_scratch, int N, int C, int OC,                  // (BIAS_BACKWARD_PARTS, OC)
                                   const floatX* gelu_input, cudaStream_t stream) {            // (N,C) or NULL
    matmul_gemm(dinp, weight, dout, NULL, C, N, OC, 0, 0, 0, (floatX*)gelu_input, 1, stream);
    matmul_gemm(dweight, inp, dout, NULL, C, OC, N, 0, 1, 1, NULL, 0, stream);
    if (dbias != NULL) {
        launch_kernel(bias_backward_kernel, dim3(CEIL_DIV(OC, 32), BIAS_BACKWARD_PARTS), dim3(32, 32), 0, stream, bias_scratch, dout, N, OC);
        cudaCheck(cudaGetLastError());
        launch_kernel(bias_backward_finish_kernel, dim3(CEIL_DIV(OC, 256)), dim3(256), 0, stream, dbias, bias_scratch, BIAS_BACKWARD_PARTS, OC);
        cudaCheck(cudaGetLastError());
    }
}

#endif // MATMUL_CUH

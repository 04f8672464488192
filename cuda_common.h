/*
cuda_common.h: what every CUDA file of llm.moe includes first. It selects where kernels run:
  nvcc                     real CUDA: launch_kernel is kernel<<<grid, block, smem, stream>>>
  g++ -DCUDA_EMULATION     the CPU, through dev/cuda/cuda_emu.h (one fiber per CUDA thread)
and gives both the same names: launch_kernel, EMU_DYNAMIC_SHARED(type, name) for dynamic shared
memory, cudaCheck (one error line naming the failing call, utils.h's fail_exit), and CUDA's own
types (dim3, float4, __nv_bfloat16, ...).

Example:
  __global__ void scale(float* x, float a, int n) {
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) { x[i] *= a; }
  }
  launch_kernel(scale, dim3(CEIL_DIV(n, 256)), dim3(256), 0, stream, d_x, 2.0f, n);
  cudaCheck(cudaGetLastError());
*/
#ifndef CUDA_COMMON_H
#define CUDA_COMMON_H

#ifdef CUDA_EMULATION
#include "dev/cuda/cuda_emu.h"
#else
#include <cuda_runtime.h>
#include <cuda_bf16.h>
// the one way to launch a kernel; the emulation's twin checks the configuration and runs it on the CPU
template <typename... KernelArgs, typename... Args>
inline void launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args... args) {
    kernel<<<grid, block, smem, stream>>>(args...);
}
#define EMU_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
#include "utils.h"

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

// floatX: the precision of the GPU trainer's parameters, activations and gradients. bf16 by
// default, with fp32 master weights and AdamW moments; PRECISION=FP32 builds with -DENABLE_FP32,
// so tests can compare with the CPU trainer to ~1e-5.
#ifdef ENABLE_FP32
typedef float floatX;
#define PRECISION_NAME "fp32"
#else
typedef __nv_bfloat16 floatX;
#define PRECISION_NAME "bf16"
#endif

// every CUDA runtime call goes through cudaCheck: one line with the call, the error and the place
inline void cuda_check(cudaError_t e, const char* call, const char* file, int line) {
    if (e != cudaSuccess) { fail_exit("%s failed at %s:%d: %s (%s)", call, file, line, cudaGetErrorString(e), cudaGetErrorName(e)); }
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)

#endif // CUDA_COMMON_H

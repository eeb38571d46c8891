// Device helpers shared by every CUDA kernel file: element loads/stores in fp32 for the storage
// dtypes we accept, warp reductions and launch-size arithmetic. Torch-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace sparse_ext {
namespace cuda {

// Storage dtypes a CUDA kernel may be instantiated for; arithmetic is always fp32 (fp64 for double).
enum class CudaDType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_float(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The accumulator type for a storage type: double for double, float otherwise.
template <typename T>
struct Accum { using type = float; };
template <>
struct Accum<double> { using type = double; };

template <typename T>
__device__ __forceinline__ T warp_sum(T v, unsigned mask = 0xffffffffu) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(mask, v, offset);
  return v;
}

// Every launcher returns the launch status so the ATen glue can raise with the op's name.
inline cudaError_t last_launch_error() { return cudaGetLastError(); }

}  // namespace cuda
}  // namespace sparse_ext

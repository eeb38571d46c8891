// Compile-time dispatch helpers shared by the SpMM and sparse-conv CUDA launchers (host side),
// plus the per-dtype vector width and accumulator -> storage conversion (device side).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../common/cuda_utils.cuh"

namespace sparse_ext {
namespace cuda {

// Elements per 16-byte vector run: 4 floats, 8 halves / bfloat16s, 2 doubles.
template <typename T>
struct VecWidth {
  static constexpr int value = static_cast<int>(16 / sizeof(T));
};

// Accumulator (float, or double for double) -> storage type, rounding to nearest.
template <typename T>
__device__ __forceinline__ T from_acc(typename Accum<T>::type v) {
  return from_float<T>(v);
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}

// Calls fn(T{}) for the storage type named by dtype; returns fn's cudaError_t.
template <typename Fn>
cudaError_t dispatch_dtype(CudaDType dtype, Fn&& fn) {
  switch (dtype) {
    case CudaDType::kF32: return fn(float{});
    case CudaDType::kF16: return fn(__half{});
    case CudaDType::kBF16: return fn(__nv_bfloat16{});
    case CudaDType::kF64: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

// Calls fn(std::integral_constant<int, R>{}) for R = block_rows in {1, 2, 4, 8}.
template <typename Fn>
cudaError_t dispatch_block_rows(int64_t block_rows, Fn&& fn) {
  switch (block_rows) {
    case 1: return fn(std::integral_constant<int, 1>{});
    case 2: return fn(std::integral_constant<int, 2>{});
    case 4: return fn(std::integral_constant<int, 4>{});
    case 8: return fn(std::integral_constant<int, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

// Entry -> (segment) lookup used by SDDMM and conv kernels: the segment s with
// offsets[s] <= j < offsets[s + 1] (last such s; clamped to [0, segments - 1]).
__device__ __forceinline__ int64_t spmm_segment_of(const int32_t* offsets, int64_t segments,
                                                   int64_t j) {
  int64_t lo = 0, hi = segments;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(__ldg(offsets + mid)) <= j) lo = mid; else hi = mid;
  }
  return lo;
}

}  // namespace cuda
}  // namespace sparse_ext

// Compile-time dispatch helpers shared by the SpMM and sparse-conv CUDA launchers (host side),
// plus the per-dtype vector width, accumulator -> storage conversion, entry and bias loads,
// segment bounds and the epilogue clamp (device side).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
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

// The R values of stored entry j (values[j*R .. j*R + R - 1]) in the accumulator type. When the
// values buffer is 16-byte aligned (`aligned`, uniform across the grid) the R * sizeof(T) bytes
// are fetched with one or two vector loads (an entry's R values are adjacent and R * sizeof(T) is
// a power of two, so entry j starts at a multiple of min(R * sizeof(T), 16) bytes); otherwise
// with R scalar loads.
template <typename T, int R>
__device__ __forceinline__ void load_entry_values(const T* __restrict__ values, int64_t j,
                                                  bool aligned, typename Accum<T>::type* out) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * R;
  const T* p = values + j * R;
  if constexpr (kBytes == 4 || kBytes == 8 || kBytes % 16 == 0) {
    if (aligned) {
      T tmp[R];
      if constexpr (kBytes == 4) {
        const unsigned int raw = __ldg(reinterpret_cast<const unsigned int*>(p));
        memcpy(tmp, &raw, sizeof(raw));
      } else if constexpr (kBytes == 8) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p));
        memcpy(tmp, &raw, sizeof(raw));
      } else {
#pragma unroll
        for (int q = 0; q < kBytes / 16; ++q) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p) + q);
          memcpy(reinterpret_cast<char*>(tmp) + 16 * q, &raw, sizeof(raw));
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) out[r] = to_float(tmp[r]);
      return;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) out[r] = to_float(p[r]);
}

// bias[m] of an epilogue in the accumulator type Acc (0 without bias): like the CPU op, which
// converts the bias to float (double for float64) before adding it.
template <typename Acc, typename Epilogue>
__device__ __forceinline__ Acc load_bias(const Epilogue& ep, int64_t m) {
  if (ep.bias == nullptr) return Acc(0);
  switch (ep.bias_dtype) {
    case CudaDType::kF32: return static_cast<Acc>(static_cast<const float*>(ep.bias)[m]);
    case CudaDType::kF16: return static_cast<Acc>(__half2float(static_cast<const __half*>(ep.bias)[m]));
    case CudaDType::kBF16:
      return static_cast<Acc>(__bfloat162float(static_cast<const __nv_bfloat16*>(ep.bias)[m]));
    case CudaDType::kF64: return static_cast<Acc>(static_cast<const double*>(ep.bias)[m]);
  }
  return Acc(0);
}

__device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
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

// [begin, end) of segment s of a blocked-CSR structure (offsets[s], offsets[s + 1]), clamped into
// [0, nnz] and to a non-negative length, so kernels stay in bounds on unvalidated offsets.
__device__ __forceinline__ void segment_bounds(const int32_t* offsets, int64_t s, int64_t nnz,
                                               int64_t* begin, int64_t* end) {
  int64_t b = __ldg(offsets + s), e = __ldg(offsets + s + 1);
  b = b < 0 ? 0 : (b > nnz ? nnz : b);
  e = e < b ? b : (e > nnz ? nnz : e);
  *begin = b;
  *end = e;
}

// The fused activation clamp of the SpMM and conv epilogues: comparisons (not fminf/fmaxf) so NaN
// propagates like the CPU kernels.
template <typename Acc>
__device__ __forceinline__ Acc clamp_out(Acc v, Acc lo, Acc hi) {
  if (v < lo) v = lo;
  if (v > hi) v = hi;
  return v;
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

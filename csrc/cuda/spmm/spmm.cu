// CUDA kernels of the SpMM family: structure validation, padded transpose, the decode (gather)
// and Sputnik-style tiled products, and SDDMM. Declarations and buffer shapes: spmm_cuda.cuh.
#include <cstdint>
#include <type_traits>

#include "spmm_cuda.h"
#include "spmm_dispatch.cuh"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps per block for every kernel in this file
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t(1) << 30;

// ---- validation ----------------------------------------------------------------------------
__global__ void validate_kernel(const int32_t* offsets, const uint8_t* indices, int64_t segments,
                                int64_t KB, int64_t K, int64_t nnz, int32_t* error) {
  const int64_t last_width = K - (KB - 1) * kSpmmKBlockCuda;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; s <= segments; s += stride) {
    const int64_t o = offsets[s];
    int32_t code = kSpmmOk;
    if (s == 0 && o != 0) code = kSpmmBadStart;
    if (s < segments && offsets[s + 1] < o && code < kSpmmDecreasing) code = kSpmmDecreasing;
    if (s == segments && o != nnz && code < kSpmmEndMismatch) code = kSpmmEndMismatch;
    // Only the last column block of a row group can be partial, so only its indices can pass K.
    if (s < segments && KB > 0 && last_width < kSpmmKBlockCuda && s % KB == KB - 1 &&
        code == kSpmmOk) {
      int64_t b = 0, e = 0;
      segment_bounds(offsets, s, nnz, &b, &e);
      for (int64_t j = b; j < e; ++j)
        if (indices[j] >= last_width) {
          code = kSpmmIndexOutOfRange;
          break;
        }
    }
    if (code != kSpmmOk) atomicMax(error, code);
  }
}

// ---- padded transpose ----------------------------------------------------------------------
template <typename T>
__global__ void transpose_pad_kernel(const T* __restrict__ in, int64_t N, int64_t K, int64_t ld,
                                     int64_t batch, T* __restrict__ out) {
  __shared__ T tile[32][33];
  const int64_t tiles_k = ceil_div(K, 32), tiles_n = ceil_div(ld, 32);
  const int64_t total = tiles_k * tiles_n * batch;
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 4 threads
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int64_t b = t / (tiles_k * tiles_n), rem = t % (tiles_k * tiles_n);
    const int64_t k0 = (rem % tiles_k) * 32, n0 = (rem / tiles_k) * 32;
    const T* src = in + b * N * K;
    T* dst = out + b * K * ld;
    for (int i = ty; i < 32; i += 4) {
      const int64_t n = n0 + i, k = k0 + tx;
      tile[i][tx] = (n < N && k < K) ? src[n * K + k] : from_acc<T>(0);
    }
    __syncthreads();
    for (int i = ty; i < 32; i += 4) {
      const int64_t k = k0 + i, n = n0 + tx;
      if (k < K && n < ld) dst[k * ld + n] = tile[tx][i];
    }
    __syncthreads();
  }
}

// ---- decode: one warp per row group, gather over few tokens ---------------------------------
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    spmm_gather_kernel(SpmmDeviceWeight w, const int32_t* __restrict__ order,
                       const T* __restrict__ x, int N, SpmmEpilogue ep, T* __restrict__ y) {
  using Acc = typename Accum<T>::type;
  constexpr int kMax = static_cast<int>(kSpmmGatherMaxTokens);
  const int64_t G = w.rows / R, KB = ceil_div(w.cols, kSpmmKBlockCuda), K = w.cols, M = w.rows;
  const int lane = threadIdx.x & 31;
  const int64_t slot = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (slot >= G) return;  // uniform across the warp
  const int64_t g = __ldg(order + slot);
  if (g < 0 || g >= G) return;  // uniform across the warp
  const T* values = static_cast<const T*>(w.values);
  const bool vals_aligned = is_aligned16(values);
  Acc acc[kMax][R];
#pragma unroll
  for (int n = 0; n < kMax; ++n)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[n][r] = Acc(0);
  for (int64_t kb = 0; kb < KB; ++kb) {
    int64_t b = 0, e = 0;
    segment_bounds(w.offsets, g * KB + kb, w.nnz, &b, &e);
    for (int64_t j = b + lane; j < e; j += 32) {
      const int64_t col = kb * kSpmmKBlockCuda + __ldg(w.indices + j);
      if (col >= K) continue;
      Acc v[R];
      load_entry_values<T, R>(values, j, vals_aligned, v);
#pragma unroll
      for (int n = 0; n < kMax; ++n) {
        if (n < N) {
          const Acc xv = to_float(x[n * K + col]);
#pragma unroll
          for (int r = 0; r < R; ++r) acc[n][r] += v[r] * xv;
        }
      }
    }
  }
  const Acc lo = static_cast<Acc>(ep.out_min), hi = static_cast<Acc>(ep.out_max);
#pragma unroll
  for (int n = 0; n < kMax; ++n) {
    if (n >= N) break;  // uniform
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const Acc s = warp_sum(acc[n][r]);
      if (lane == 0) {
        const int64_t m = g * R + r;
        y[n * M + m] = from_acc<T>(clamp_out(s + load_bias<Acc>(ep, m), lo, hi));
      }
    }
  }
}

// ---- many tokens: subwarp per row group, V tokens per lane -----------------------------------
// Loads V consecutive elements starting at p (16-byte aligned when kVec).
template <typename T, int V, bool kVec>
__device__ __forceinline__ void load_run(const T* __restrict__ p, int64_t avail,
                                         typename Accum<T>::type* out) {
  if constexpr (kVec) {
    static_assert(sizeof(T) * V == 16, "vector runs are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    T vals[V];
    static_assert(sizeof(vals) == sizeof(raw), "size");
    memcpy(vals, &raw, sizeof(raw));
#pragma unroll
    for (int v = 0; v < V; ++v) out[v] = to_float(vals[v]);
  } else {
#pragma unroll
    for (int v = 0; v < V; ++v)
      out[v] = v < avail ? to_float(p[v]) : typename Accum<T>::type(0);
  }
}

template <typename T, int R, bool kVec>
__global__ void __launch_bounds__(kThreads)
    spmm_tiled_kernel(SpmmDeviceWeight w, const int32_t* __restrict__ order, SpmmTiledArgs a,
                      SpmmEpilogue ep, int S) {
  using Acc = typename Accum<T>::type;
  constexpr int V = VecWidth<T>::value;
  const int64_t G = w.rows / R, KB = ceil_div(w.cols, kSpmmKBlockCuda), K = w.cols;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane / S, sl = lane % S, per_warp = 32 / S;
  const int64_t slot = (int64_t(blockIdx.x) * (kThreads / 32) + warp) * per_warp + sub;
  if (slot >= G) return;  // no cross-lane communication in this kernel: per-thread exits are fine
  const int64_t g = __ldg(order + slot);
  if (g < 0 || g >= G) return;
  const T* values = static_cast<const T*>(w.values);
  const bool vals_aligned = is_aligned16(values);
  const Acc lo = static_cast<Acc>(ep.out_min), hi = static_cast<Acc>(ep.out_max);
  const int64_t tiles_n = ceil_div(a.N, int64_t(S) * V);
  for (int64_t bz = blockIdx.z; bz < a.batch; bz += gridDim.z) {
    const T* xT = static_cast<const T*>(a.xT) + bz * a.x_batch_stride;
    T* y = static_cast<T*>(a.y) + bz * a.y_batch_stride;
    for (int64_t tn = blockIdx.y; tn < tiles_n; tn += gridDim.y) {
      const int64_t n0 = (tn * S + sl) * V;
      if (n0 >= a.N) continue;
      const int64_t avail = a.N - n0;  // > 0
      Acc acc[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < V; ++v) acc[r][v] = Acc(0);
      for (int64_t kb = 0; kb < KB; ++kb) {
        int64_t b = 0, e = 0;
        segment_bounds(w.offsets, g * KB + kb, w.nnz, &b, &e);
        for (int64_t j = b; j < e; ++j) {
          const int64_t col = kb * kSpmmKBlockCuda + __ldg(w.indices + j);
          if (col >= K) continue;
          Acc xv[V], val[R];
          load_run<T, V, kVec>(xT + col * a.ldx + n0, avail, xv);
          load_entry_values<T, R>(values, j, vals_aligned, val);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int v = 0; v < V; ++v) acc[r][v] += val[r] * xv[v];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t m = g * R + r;
        const Acc bm = load_bias<Acc>(ep, m);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (v >= avail) break;
          const int64_t n = n0 + v;
          const T out = from_acc<T>(clamp_out(acc[r][v] + bm, lo, hi));
          if (a.y_token_major) y[n * a.ldy + m] = out;
          else y[m * a.ldy + n] = out;
        }
      }
    }
  }
}

// ---- SDDMM: subwarp per stored entry ---------------------------------------------------------
template <typename T, int R, bool kVec>
__global__ void __launch_bounds__(kThreads)
    sddmm_kernel(SpmmDeviceWeight w, const T* __restrict__ dyT, const T* __restrict__ xT,
                 int64_t ld, typename Accum<T>::type* __restrict__ dv, int S) {
  using Acc = typename Accum<T>::type;
  constexpr int V = VecWidth<T>::value;
  const int64_t KB = ceil_div(w.cols, kSpmmKBlockCuda), segments = (w.rows / R) * KB;
  const int lane = threadIdx.x & 31;
  const int sl = lane % S;
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / S;
  // Every lane takes part in the shuffles below; inactive subwarps just add zeros.
  const bool active = j < w.nnz && segments > 0;
  Acc acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = Acc(0);
  int64_t g = 0;
  bool valid = false;
  if (active) {
    const int64_t s = spmm_segment_of(w.offsets, segments, j);
    g = s / KB;
    const int64_t col = (s % KB) * kSpmmKBlockCuda + __ldg(w.indices + j);
    valid = col < w.cols;
    if (valid) {
      const T* xrow = xT + col * ld;
      for (int64_t n = int64_t(sl) * V; n < ld; n += int64_t(S) * V) {
        Acc xv[V];
        load_run<T, V, kVec>(xrow + n, ld - n, xv);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          Acc dy[V];
          load_run<T, V, kVec>(dyT + (g * R + r) * ld + n, ld - n, dy);
#pragma unroll
          for (int v = 0; v < V; ++v) acc[r] += dy[v] * xv[v];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    Acc s = acc[r];
    for (int off = S / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (active && sl == 0) dv[j * R + r] = valid ? s : Acc(0);
  }
}

// Lanes per subwarp: the smallest power of two covering `runs` vector runs, at most 32.
int subwarp_for(int64_t runs) {
  int s = 1;
  while (s < 32 && s < runs) s *= 2;
  return s;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t spmm_validate_cuda(const SpmmDeviceWeight& w, int32_t* error, cudaStream_t stream) {
  cudaError_t st = cudaMemsetAsync(error, 0, sizeof(int32_t), stream);
  if (st != cudaSuccess) return st;
  if (w.block_rows <= 0) return cudaErrorInvalidValue;
  const int64_t KB = ceil_div(w.cols, kSpmmKBlockCuda);
  const int64_t segments = (w.rows / w.block_rows) * KB;
  const int64_t blocks = std::min<int64_t>(ceil_div(segments + 1, kThreads), 4096);
  validate_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      w.offsets, w.indices, segments, KB, w.cols, w.nnz, error);
  return cudaGetLastError();
}

cudaError_t transpose_pad_cuda(CudaDType dtype, const void* in, int64_t N, int64_t K, int64_t ld,
                               int64_t batch, void* out, cudaStream_t stream) {
  if (ld < N) return cudaErrorInvalidValue;
  const int64_t total = ceil_div(K, 32) * ceil_div(ld, 32) * batch;
  if (total == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(total, kMaxGridX));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    transpose_pad_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(in), N, K, ld,
                                                             batch, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t spmm_gather_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                             const void* x, int64_t N, const SpmmEpilogue& ep, void* y,
                             cudaStream_t stream) {
  if (N < 0 || N > kSpmmGatherMaxTokens) return cudaErrorInvalidValue;
  const int64_t G = w.block_rows > 0 ? w.rows / w.block_rows : 0;
  if (G == 0 || N == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(G, kThreads / 32);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_block_rows(w.block_rows, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      spmm_gather_kernel<T, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          w, order, static_cast<const T*>(x), static_cast<int>(N), ep, static_cast<T*>(y));
      return cudaGetLastError();
    });
  });
}

cudaError_t spmm_tiled_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                            const SpmmTiledArgs& a, const SpmmEpilogue& ep, cudaStream_t stream) {
  const int64_t G = w.block_rows > 0 ? w.rows / w.block_rows : 0;
  if (G == 0 || a.N <= 0 || a.batch <= 0) return cudaSuccess;
  if (a.ldx < a.N) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = VecWidth<T>::value;
    const int S = subwarp_for(ceil_div(a.N, V));
    const int64_t groups_per_block = (kThreads / 32) * (32 / S);
    const int64_t bx = ceil_div(G, groups_per_block);
    if (bx > kMaxGridX) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(bx),
                    static_cast<unsigned>(std::min(ceil_div(a.N, int64_t(S) * V), kMaxGridY)),
                    static_cast<unsigned>(std::min<int64_t>(a.batch, kMaxGridY)));
    const bool vec = a.ldx % V == 0 && a.x_batch_stride % V == 0 && aligned16(a.xT);
    return dispatch_block_rows(w.block_rows, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      if (vec)
        spmm_tiled_kernel<T, R, true><<<grid, kThreads, 0, stream>>>(w, order, a, ep, S);
      else
        spmm_tiled_kernel<T, R, false><<<grid, kThreads, 0, stream>>>(w, order, a, ep, S);
      return cudaGetLastError();
    });
  });
}

cudaError_t spmm_sddmm_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const void* dyT,
                            const void* xT, int64_t ld, void* dv, cudaStream_t stream) {
  if (w.nnz == 0 || ld <= 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    constexpr int V = VecWidth<T>::value;
    const int S = subwarp_for(ceil_div(ld, V));
    const int64_t blocks = ceil_div(w.nnz * S, kThreads);
    if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
    const bool vec = ld % V == 0 && aligned16(dyT) && aligned16(xT);
    return dispatch_block_rows(w.block_rows, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      if (vec)
        sddmm_kernel<T, R, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            w, static_cast<const T*>(dyT), static_cast<const T*>(xT), ld, static_cast<Acc*>(dv),
            S);
      else
        sddmm_kernel<T, R, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            w, static_cast<const T*>(dyT), static_cast<const T*>(xT), ld, static_cast<Acc*>(dv),
            S);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace sparse_ext

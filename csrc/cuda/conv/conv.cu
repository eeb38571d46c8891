// CUDA kernels of the sparse-conv family: implicit-im2col kxk forward, input gradient through the
// transposed structure, values gradient. Declarations and buffer shapes: conv_cuda.h.
#include <cstdint>

#include "../spmm/spmm_dispatch.cuh"
#include "conv_cuda.h"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kPix = 4;        // pixels per lane: a warp covers 128 pixels
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = int64_t(1) << 30;

// ---- forward, kxk: one warp per (row group, 128-pixel tile, image) ---------------------------
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    conv_kxk_kernel(SpmmDeviceWeight w, const int32_t* __restrict__ order, ConvGeometry s,
                    const T* __restrict__ x, SpmmEpilogue ep, T* __restrict__ y) {
  using Acc = typename Accum<T>::type;
  const int64_t G = w.rows / R, KB = ceil_div(w.cols, kSpmmKBlockCuda), K = w.cols;
  const int lane = threadIdx.x & 31;
  const int64_t slot = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (slot >= G) return;  // no cross-lane communication here: per-thread exits are fine
  const int64_t g = __ldg(order + slot);
  if (g < 0 || g >= G) return;
  const int KK = static_cast<int>(s.kernel_h * s.kernel_w), KW = static_cast<int>(s.kernel_w);
  const int64_t P = s.out_h * s.out_w, Q = s.in_h * s.in_w, M = s.out_channels;
  const int64_t tiles = ceil_div(P, 32 * kPix);
  const T* values = static_cast<const T*>(w.values);
  const bool vals_aligned = is_aligned16(values);
  const Acc lo = static_cast<Acc>(ep.out_min), hi = static_cast<Acc>(ep.out_max);
  for (int64_t bz = blockIdx.z; bz < s.batch; bz += gridDim.z) {
    const T* xb = x + bz * s.in_channels * Q;
    for (int64_t tp = blockIdx.y; tp < tiles; tp += gridDim.y) {
      int64_t pix[kPix], iy0[kPix], ix0[kPix];
      bool ok[kPix];
#pragma unroll
      for (int v = 0; v < kPix; ++v) {
        pix[v] = tp * 32 * kPix + lane + 32 * v;
        ok[v] = pix[v] < P;
        const int64_t oy = ok[v] ? pix[v] / s.out_w : 0, ox = ok[v] ? pix[v] % s.out_w : 0;
        iy0[v] = oy * s.stride_h - s.pad_h;
        ix0[v] = ox * s.stride_w - s.pad_w;
      }
      Acc acc[R][kPix];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < kPix; ++v) acc[r][v] = Acc(0);
      for (int64_t kb = 0; kb < KB; ++kb) {
        int64_t b = 0, e = 0;
        segment_bounds(w.offsets, g * KB + kb, w.nnz, &b, &e);
        for (int64_t j = b; j < e; ++j) {
          const int64_t col = kb * kSpmmKBlockCuda + __ldg(w.indices + j);
          if (col >= K) continue;
          // col < K = C_in * KK < 2^31 (the glue checks), so 32-bit division is exact.
          const int c32 = static_cast<int>(col);
          const int ci = c32 / KK, rem = c32 - ci * KK, kh = rem / KW, kw = rem - kh * KW;
          const T* xc = xb + int64_t(ci) * Q;
          const int64_t dy = int64_t(kh) * s.dil_h, dx = int64_t(kw) * s.dil_w;
          Acc xv[kPix];
#pragma unroll
          for (int v = 0; v < kPix; ++v) {
            const int64_t iy = iy0[v] + dy, ix = ix0[v] + dx;
            const bool in = ok[v] && iy >= 0 && iy < s.in_h && ix >= 0 && ix < s.in_w;
            xv[v] = in ? to_float(xc[iy * s.in_w + ix]) : Acc(0);
          }
          Acc val[R];
          load_entry_values<T, R>(values, j, vals_aligned, val);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int v = 0; v < kPix; ++v) acc[r][v] += val[r] * xv[v];
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t m = g * R + r;
        const Acc bm = load_bias<Acc>(ep, m);
        T* ym = y + (bz * M + m) * P;
#pragma unroll
        for (int v = 0; v < kPix; ++v) {
          if (!ok[v]) continue;
          ym[pix[v]] = from_acc<T>(clamp_out(acc[r][v] + bm, lo, hi));
        }
      }
    }
  }
}

// ---- input gradient: one warp per (input channel, 128-pixel tile, image), gather over W^T -----
template <typename T>
__global__ void __launch_bounds__(kThreads)
    conv_grad_input_kernel(const int32_t* __restrict__ offsets_t,
                           const uint8_t* __restrict__ indices_t, const T* __restrict__ values_t,
                           int64_t nnz_t, ConvGeometry s, const T* __restrict__ dy,
                           T* __restrict__ dx) {
  using Acc = typename Accum<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t ci = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t C = s.in_channels, M = s.out_channels;
  if (ci >= C) return;
  const int64_t MB = ceil_div(M, kSpmmKBlockCuda);
  const int64_t P = s.out_h * s.out_w, Q = s.in_h * s.in_w;
  const int64_t tiles = ceil_div(Q, 32 * kPix);
  for (int64_t bz = blockIdx.z; bz < s.batch; bz += gridDim.z) {
    const T* dyb = dy + bz * M * P;
    for (int64_t tq = blockIdx.y; tq < tiles; tq += gridDim.y) {
      int64_t q[kPix], iy[kPix], ix[kPix];
      bool ok[kPix];
#pragma unroll
      for (int v = 0; v < kPix; ++v) {
        q[v] = tq * 32 * kPix + lane + 32 * v;
        ok[v] = q[v] < Q;
        iy[v] = ok[v] ? q[v] / s.in_w : 0;
        ix[v] = ok[v] ? q[v] % s.in_w : 0;
      }
      Acc acc[kPix];
#pragma unroll
      for (int v = 0; v < kPix; ++v) acc[v] = Acc(0);
      for (int64_t kh = 0; kh < s.kernel_h; ++kh) {
        for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
          // Output pixel that read input (iy, ix) through tap (kh, kw), if any.
          int64_t opix[kPix];
          bool use[kPix];
          bool any = false;
#pragma unroll
          for (int v = 0; v < kPix; ++v) {
            const int64_t ty = iy[v] + s.pad_h - kh * s.dil_h;
            const int64_t tx = ix[v] + s.pad_w - kw * s.dil_w;
            const int64_t oy = ty >= 0 ? ty / s.stride_h : -1, ox = tx >= 0 ? tx / s.stride_w : -1;
            use[v] = ok[v] && ty >= 0 && tx >= 0 && oy * s.stride_h == ty &&
                     ox * s.stride_w == tx && oy < s.out_h && ox < s.out_w;
            opix[v] = use[v] ? oy * s.out_w + ox : 0;
            any = any || use[v];
          }
          if (!any) continue;
          const int64_t c = (ci * s.kernel_h + kh) * s.kernel_w + kw;  // row of W^T
          for (int64_t mb = 0; mb < MB; ++mb) {
            int64_t b = 0, e = 0;
            segment_bounds(offsets_t, c * MB + mb, nnz_t, &b, &e);
            for (int64_t j = b; j < e; ++j) {
              const int64_t m = mb * kSpmmKBlockCuda + __ldg(indices_t + j);
              if (m >= M) continue;
              const Acc val = to_float(values_t[j]);
              const T* dym = dyb + m * P;
#pragma unroll
              for (int v = 0; v < kPix; ++v)
                if (use[v]) acc[v] += val * to_float(dym[opix[v]]);
            }
          }
        }
      }
      T* dxc = dx + (bz * C + ci) * Q;
#pragma unroll
      for (int v = 0; v < kPix; ++v)
        if (ok[v]) dxc[q[v]] = from_acc<T>(acc[v]);
    }
  }
}

// ---- values gradient: one warp per stored entry ----------------------------------------------
template <typename T, int R>
__global__ void __launch_bounds__(kThreads)
    conv_grad_values_kernel(SpmmDeviceWeight w, ConvGeometry s, const T* __restrict__ dy,
                            const T* __restrict__ x, typename Accum<T>::type* __restrict__ dv) {
  using Acc = typename Accum<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t j = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t KB = ceil_div(w.cols, kSpmmKBlockCuda), segments = (w.rows / R) * KB;
  if (j >= w.nnz || segments == 0) return;  // uniform across the warp
  const int64_t seg = spmm_segment_of(w.offsets, segments, j);
  const int64_t g = seg / KB;
  const int64_t col = (seg % KB) * kSpmmKBlockCuda + __ldg(w.indices + j);
  if (col >= w.cols) {  // uniform: an entry outside W (only without validation) gets zero
    if (lane < R) dv[j * R + lane] = Acc(0);
    return;
  }
  const int64_t KK = s.kernel_h * s.kernel_w;
  const int64_t ci = col / KK, kh = (col / s.kernel_w) % s.kernel_h, kw = col % s.kernel_w;
  const int64_t P = s.out_h * s.out_w, Q = s.in_h * s.in_w, M = s.out_channels;
  const int OW = static_cast<int>(s.out_w);
  Acc acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = Acc(0);
  for (int64_t b = 0; b < s.batch; ++b) {
    const T* xc = x + (b * s.in_channels + ci) * Q;
    const T* dyg = dy + (b * M + g * R) * P;
    for (int64_t p = lane; p < P; p += 32) {
      // p < P < 2^31 (the glue checks), so 32-bit division is exact.
      const int p32 = static_cast<int>(p);
      const int oy = p32 / OW, ox = p32 - oy * OW;
      const int64_t iy = int64_t(oy) * s.stride_h - s.pad_h + kh * s.dil_h;
      const int64_t ix = int64_t(ox) * s.stride_w - s.pad_w + kw * s.dil_w;
      if (iy < 0 || iy >= s.in_h || ix < 0 || ix >= s.in_w) continue;
      const Acc xv = to_float(xc[iy * s.in_w + ix]);
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += xv * to_float(dyg[r * P + p]);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const Acc total = warp_sum(acc[r]);
    if (lane == 0) dv[j * R + r] = total;
  }
}

dim3 tile_grid(int64_t bx, int64_t tiles, int64_t batch) {
  return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(std::min(tiles, kMaxGridY)),
              static_cast<unsigned>(std::min(batch, kMaxGridY)));
}

}  // namespace

cudaError_t conv_kxk_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                          const ConvGeometry& s, const void* x, const SpmmEpilogue& ep, void* y,
                          cudaStream_t stream) {
  const int64_t G = w.block_rows > 0 ? w.rows / w.block_rows : 0;
  const int64_t P = s.out_h * s.out_w;
  if (G == 0 || P == 0 || s.batch == 0) return cudaSuccess;
  if (w.rows != s.out_channels || w.cols != s.in_channels * s.kernel_h * s.kernel_w ||
      w.cols >= (int64_t(1) << 31))
    return cudaErrorInvalidValue;
  const int64_t bx = ceil_div(G, kWarps);
  if (bx > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid = tile_grid(bx, ceil_div(P, 32 * kPix), s.batch);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_block_rows(w.block_rows, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      conv_kxk_kernel<T, R><<<grid, kThreads, 0, stream>>>(w, order, s, static_cast<const T*>(x),
                                                           ep, static_cast<T*>(y));
      return cudaGetLastError();
    });
  });
}

cudaError_t conv_grad_input_cuda(CudaDType dtype, const int32_t* offsets_t,
                                 const uint8_t* indices_t, const void* values_t, int64_t nnz_t,
                                 const ConvGeometry& s, const void* dy, void* dx,
                                 cudaStream_t stream) {
  const int64_t Q = s.in_h * s.in_w;
  if (s.in_channels == 0 || Q == 0 || s.batch == 0) return cudaSuccess;
  const int64_t bx = ceil_div(s.in_channels, kWarps);
  if (bx > kMaxGridX) return cudaErrorInvalidConfiguration;
  const dim3 grid = tile_grid(bx, ceil_div(Q, 32 * kPix), s.batch);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    conv_grad_input_kernel<T><<<grid, kThreads, 0, stream>>>(
        offsets_t, indices_t, static_cast<const T*>(values_t), nnz_t, s,
        static_cast<const T*>(dy), static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

cudaError_t conv_grad_values_cuda(CudaDType dtype, const SpmmDeviceWeight& w,
                                  const ConvGeometry& s, const void* dy, const void* x, void* dv,
                                  cudaStream_t stream) {
  if (w.nnz == 0) return cudaSuccess;
  if (s.out_h * s.out_w >= (int64_t(1) << 31) || w.rows != s.out_channels)
    return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(w.nnz, kWarps);
  if (blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Accum<T>::type;
    return dispatch_block_rows(w.block_rows, [&](auto rc) {
      constexpr int R = decltype(rc)::value;
      conv_grad_values_kernel<T, R><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          w, s, static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<Acc*>(dv));
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace sparse_ext

// MoE expert MLP kernels: structure validation, the decode-size grouped GEMV (gate/up with the
// fused activation, then down), the activation (and its backward) for the GEMM path, and the
// deterministic gather backward. See moe_cuda.h for the buffers.
#include "../common/cuda_utils.cuh"
#include "moe_cuda.h"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kGemvWarps = 4;   // output rows per block (one per warp)
constexpr int kGemvTokens = 8;  // tokens per register pass (accumulators per weight row)

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// ---- activation math (fp32 or fp64) -----------------------------------------------------------
__device__ __forceinline__ float d_exp(float v) { return expf(v); }
__device__ __forceinline__ double d_exp(double v) { return exp(v); }
__device__ __forceinline__ float d_erf(float v) { return erff(v); }
__device__ __forceinline__ double d_erf(double v) { return erf(v); }
__device__ __forceinline__ float d_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double d_tanh(double v) { return tanh(v); }

template <typename A>
__device__ __forceinline__ A act_value(int act, A x) {
  switch (act) {
    case 0: return x / (A(1) + d_exp(-x));
    case 1: return A(0.5) * x * (A(1) + d_erf(x * A(0.70710678118654752440)));
    case 2:
      return A(0.5) * x *
             (A(1) + d_tanh(A(0.79788456080286535588) * (x + A(0.044715) * x * x * x)));
    default: return x > A(0) ? x : A(0);
  }
}

template <typename A>
__device__ __forceinline__ A act_grad(int act, A x) {
  switch (act) {
    case 0: {
      const A s = A(1) / (A(1) + d_exp(-x));
      return s * (A(1) + x * (A(1) - s));
    }
    case 1: {
      const A cdf = A(0.5) * (A(1) + d_erf(x * A(0.70710678118654752440)));
      const A pdf = d_exp(A(-0.5) * x * x) * A(0.39894228040143267794);
      return cdf + x * pdf;
    }
    case 2: {
      const A inner = A(0.79788456080286535588) * (x + A(0.044715) * x * x * x);
      const A th = d_tanh(inner);
      const A dinner = A(0.79788456080286535588) * (A(1) + A(3 * 0.044715) * x * x);
      return A(0.5) * (A(1) + th) + A(0.5) * x * (A(1) - th * th) * dinner;
    }
    default: return x > A(0) ? A(1) : A(0);
  }
}

// Storage conversions (to_float in cuda_utils.cuh covers the loads).
template <typename T> __device__ __forceinline__ T store_as(float v);
template <> __device__ __forceinline__ float store_as<float>(float v) { return v; }
template <> __device__ __forceinline__ __half store_as<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_as<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- vector loads ------------------------------------------------------------------------------
// VEC consecutive weights (16 bytes when VEC = 16 / sizeof(TW), else scalar loads).
template <typename TW, int VEC>
__device__ __forceinline__ void load_w(const TW* p, float (&out)[VEC]) {
  if constexpr (VEC * sizeof(TW) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const TW* v = reinterpret_cast<const TW*>(&raw);
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = to_float(v[q]);
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = to_float(p[q]);
  }
}

template <int VEC>
__device__ __forceinline__ void load_x(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC; q += 4) {
      const float4 v = *reinterpret_cast<const float4*>(p + q);
      out[q] = v.x;
      out[q + 1] = v.y;
      out[q + 2] = v.z;
      out[q + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = p[q];
  }
}

// Clamped segment bounds of expert e (the host planner uses the same clamping).
__device__ __forceinline__ void segment(const int64_t* offsets, int64_t e, int64_t P, int64_t& lo,
                                        int64_t& hi) {
  lo = offsets[e];
  hi = offsets[e + 1];
  lo = lo < 0 ? 0 : (lo > P ? P : lo);
  hi = hi < lo ? lo : (hi > P ? P : hi);
}

// One warp, one output row r of expert e: for the segment's tokens (in passes of kGemvTokens),
// acc0 = x . W[r0], acc1 = x . W[r1] (GATED), reduced over the warp, then written by `emit`.
// UP: input rows are x[row_token[p]] (K = H, out h[p, r] = act(acc0) (* acc1));
// else input rows are h[p] (K = F, out y[p, r] = acc0).
template <typename TW, int VEC, bool GATED, bool UP>
__global__ void __launch_bounds__(kGemvWarps * 32)
    small_gemv_kernel(const float* __restrict__ in, const TW* __restrict__ w,
                      const int64_t* __restrict__ offsets, const int64_t* __restrict__ row_token,
                      int64_t T, int64_t E, int64_t K, int64_t R, int64_t w_rows, int64_t P,
                      int64_t max_rows, int act, float* __restrict__ out, int64_t ld_out) {
  const int64_t tiles = ceil_div(R, kGemvWarps);
  const int64_t e = blockIdx.x / tiles;
  const int64_t r = (blockIdx.x % tiles) * kGemvWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (e >= E || r >= R) return;
  int64_t lo, hi;
  segment(offsets, e, P, lo, hi);
  const int64_t n = hi - lo;
  if (n < 1 || n > max_rows) return;  // empty, or a GEMM-path segment
  const TW* w0 = w + (e * w_rows + r) * K;
  const TW* w1 = GATED ? w + (e * w_rows + R + r) * K : w0;
  for (int64_t p0 = lo; p0 < hi; p0 += kGemvTokens) {
    const int nt = static_cast<int>(hi - p0 < kGemvTokens ? hi - p0 : kGemvTokens);
    const float* xr[kGemvTokens];
#pragma unroll
    for (int j = 0; j < kGemvTokens; ++j) {
      xr[j] = nullptr;
      if (j < nt) {
        if (UP) {
          const int64_t tok = row_token[p0 + j];
          if (tok >= 0 && tok < T) xr[j] = in + tok * K;  // else the row reads as zeros
        } else {
          xr[j] = in + (p0 + j) * K;
        }
      }
    }
    float a0[kGemvTokens], a1[kGemvTokens];
#pragma unroll
    for (int j = 0; j < kGemvTokens; ++j) a0[j] = a1[j] = 0.f;
    // Unrolled so several 16-byte weight loads per lane are in flight (memory-level parallelism
    // is what a bandwidth-bound GEMV needs).
#pragma unroll 4
    for (int64_t c = static_cast<int64_t>(lane) * VEC; c < K; c += 32 * VEC) {
      float wv0[VEC], wv1[VEC];
      load_w<TW, VEC>(w0 + c, wv0);
      if (GATED) load_w<TW, VEC>(w1 + c, wv1);
#pragma unroll
      for (int j = 0; j < kGemvTokens; ++j) {
        if (xr[j] == nullptr) continue;
        float xv[VEC];
        load_x<VEC>(xr[j] + c, xv);
#pragma unroll
        for (int q = 0; q < VEC; ++q) {
          a0[j] = fmaf(wv0[q], xv[q], a0[j]);
          if (GATED) a1[j] = fmaf(wv1[q], xv[q], a1[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kGemvTokens; ++j) {
      if (j >= nt) break;  // uniform across the warp
      const float s0 = warp_sum(a0[j]);
      const float s1 = GATED ? warp_sum(a1[j]) : 0.f;
      if (lane == 0) {
        float v = s0;
        if (UP) v = GATED ? act_value<float>(act, s0) * s1 : act_value<float>(act, s0);
        out[(p0 + j) * ld_out + r] = v;
      }
    }
  }
}

template <typename TW, bool GATED, bool UP>
cudaError_t launch_gemv(const float* in, const TW* w, const int64_t* offsets,
                        const int64_t* row_token, int64_t T, int64_t E, int64_t K, int64_t R,
                        int64_t w_rows, int64_t P, int64_t max_rows, int act, float* out,
                        int64_t ld_out, cudaStream_t stream) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(TW));
  const int64_t blocks = E * ceil_div(R, kGemvWarps);
  if (blocks <= 0 || P <= 0 || K <= 0) return cudaSuccess;
  if (blocks > 2147483647LL) return cudaErrorInvalidValue;
  // 16-byte loads need K % kVec == 0 and 16-byte aligned bases (rows then stay aligned).
  const bool vec = K % kVec == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(in) % 16 == 0;
  if (vec) {
    small_gemv_kernel<TW, kVec, GATED, UP><<<static_cast<unsigned>(blocks), kGemvWarps * 32, 0,
                                             stream>>>(in, w, offsets, row_token, T, E, K, R,
                                                       w_rows, P, max_rows, act, out, ld_out);
  } else {
    small_gemv_kernel<TW, 1, GATED, UP><<<static_cast<unsigned>(blocks), kGemvWarps * 32, 0,
                                          stream>>>(in, w, offsets, row_token, T, E, K, R, w_rows,
                                                    P, max_rows, act, out, ld_out);
  }
  return cudaGetLastError();
}

// ---- validation --------------------------------------------------------------------------------
__global__ void expert_validate_kernel(const int64_t* __restrict__ offsets,
                                       const int64_t* __restrict__ row_token, int64_t E, int64_t P,
                                       int64_t T, unsigned long long* error) {
  int64_t kept = offsets[E];
  kept = kept < 0 ? 0 : (kept > P ? P : kept);
  const int64_t n = (E + 1 > kept ? E + 1 : kept);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i <= E) {
      if (i == 0 && offsets[0] != 0) atomicMin(&error[0], 0ULL);
      if (i < E && offsets[i + 1] < offsets[i])
        atomicMin(&error[0], static_cast<unsigned long long>(i + 1));
      if (i == E && offsets[E] > P) atomicMin(&error[0], static_cast<unsigned long long>(E + 1));
    }
    if (i < kept) {
      const int64_t t = row_token[i];
      if (t < 0 || t >= T) atomicMin(&error[1], static_cast<unsigned long long>(i));
    }
  }
}

// ---- activation (GEMM path) --------------------------------------------------------------------
template <typename TA, typename TH>
__global__ void activate_kernel(const TA* __restrict__ a, int64_t n, int64_t F, bool gated, int act,
                                TH* __restrict__ h) {
  using A = typename Accum<TA>::type;
  const int64_t F1 = gated ? 2 * F : F;
  const int64_t total = n * F;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / F, f = idx - i * F;
    const A g = static_cast<A>(to_float(a[i * F1 + f]));
    A v = act_value<A>(act, g);
    if (gated) v *= static_cast<A>(to_float(a[i * F1 + F + f]));
    if constexpr (sizeof(A) == 8) {
      h[idx] = static_cast<TH>(v);
    } else {
      h[idx] = store_as<TH>(v);
    }
  }
}

template <typename S>
__global__ void activate_backward_kernel(const S* __restrict__ a, const S* __restrict__ dh,
                                         int64_t n, int64_t F, bool gated, int act,
                                         S* __restrict__ da) {
  const int64_t F1 = gated ? 2 * F : F;
  const int64_t total = n * F;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / F, f = idx - i * F;
    const S g = a[i * F1 + f];
    const S d = dh[idx];
    if (gated) {
      const S u = a[i * F1 + F + f];
      da[i * F1 + f] = d * u * act_grad<S>(act, g);
      da[i * F1 + F + f] = d * act_value<S>(act, g);
    } else {
      da[i * F1 + f] = d * act_grad<S>(act, g);
    }
  }
}

// ---- gather backward ---------------------------------------------------------------------------
__device__ __forceinline__ int64_t lower_bound(const int64_t* v, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (v[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <typename S>
__global__ void scatter_rows_kernel(const S* __restrict__ src, const int64_t* __restrict__ sorted,
                                    const int64_t* __restrict__ order, int64_t n, int64_t T,
                                    int64_t H, S* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const int64_t b0 = lower_bound(sorted, n, t), b1 = lower_bound(sorted, n, t + 1);
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
      S acc = S(0);
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t p = order[i];
        if (p >= 0 && p < n) acc += src[p * H + c];
      }
      out[t * H + c] = acc;
    }
  }
}

}  // namespace

cudaError_t moe_expert_validate(const int64_t* offsets, const int64_t* row_token, int64_t E,
                                int64_t P, int64_t T, unsigned long long* error,
                                cudaStream_t stream) {
  cudaError_t st = cudaMemsetAsync(error, 0xff, 2 * sizeof(unsigned long long), stream);
  if (st != cudaSuccess) return st;
  expert_validate_kernel<<<grid_for((E + 1 > P ? E + 1 : P), 256), 256, 0, stream>>>(
      offsets, row_token, E, P, T, error);
  return cudaGetLastError();
}

template <typename TW>
cudaError_t moe_small_up(const float* x, const TW* w1, const int64_t* offsets,
                         const int64_t* row_token, int64_t T, int64_t E, int64_t H, int64_t F,
                         int64_t P, int64_t max_rows, int act, bool gated, float* h,
                         cudaStream_t stream) {
  const int64_t w_rows = gated ? 2 * F : F;
  if (gated)
    return launch_gemv<TW, true, true>(x, w1, offsets, row_token, T, E, H, F, w_rows, P, max_rows,
                                       act, h, F, stream);
  return launch_gemv<TW, false, true>(x, w1, offsets, row_token, T, E, H, F, w_rows, P, max_rows,
                                      act, h, F, stream);
}

template <typename TW>
cudaError_t moe_small_down(const float* h, const TW* w2, const int64_t* offsets, int64_t E,
                           int64_t H, int64_t F, int64_t P, int64_t max_rows, float* y,
                           cudaStream_t stream) {
  return launch_gemv<TW, false, false>(h, w2, offsets, nullptr, 0, E, F, H, H, P, max_rows, 0, y, H,
                                       stream);
}

template <typename TA, typename TH>
cudaError_t moe_activate(const TA* a, int64_t n, int64_t F, bool gated, int act, TH* h,
                         cudaStream_t stream) {
  if (n <= 0 || F <= 0) return cudaSuccess;
  activate_kernel<TA, TH><<<grid_for(n * F, 256), 256, 0, stream>>>(a, n, F, gated, act, h);
  return cudaGetLastError();
}

template <typename S>
cudaError_t moe_activate_backward(const S* a, const S* dh, int64_t n, int64_t F, bool gated,
                                  int act, S* da, cudaStream_t stream) {
  if (n <= 0 || F <= 0) return cudaSuccess;
  activate_backward_kernel<S><<<grid_for(n * F, 256), 256, 0, stream>>>(a, dh, n, F, gated, act,
                                                                        da);
  return cudaGetLastError();
}

template <typename S>
cudaError_t moe_scatter_rows(const S* src, const int64_t* sorted_tokens, const int64_t* order,
                             int64_t n, int64_t T, int64_t H, S* out, cudaStream_t stream) {
  if (T <= 0 || H <= 0) return cudaSuccess;
  const int threads = H >= 256 ? 256 : 128;
  const unsigned blocks = static_cast<unsigned>(T < 65535 * 8 ? T : 65535 * 8);
  scatter_rows_kernel<S><<<blocks, threads, 0, stream>>>(src, sorted_tokens, order, n, T, H, out);
  return cudaGetLastError();
}

#define SE_MOE_GEMV(TW)                                                                          \
  template cudaError_t moe_small_up<TW>(const float*, const TW*, const int64_t*, const int64_t*, \
                                        int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,    \
                                        int, bool, float*, cudaStream_t);                        \
  template cudaError_t moe_small_down<TW>(const float*, const TW*, const int64_t*, int64_t,      \
                                          int64_t, int64_t, int64_t, int64_t, float*,            \
                                          cudaStream_t);
SE_MOE_GEMV(float)
SE_MOE_GEMV(__half)
SE_MOE_GEMV(__nv_bfloat16)
#undef SE_MOE_GEMV

template cudaError_t moe_activate<float, float>(const float*, int64_t, int64_t, bool, int, float*,
                                                cudaStream_t);
template cudaError_t moe_activate<float, __half>(const float*, int64_t, int64_t, bool, int,
                                                 __half*, cudaStream_t);
template cudaError_t moe_activate<float, __nv_bfloat16>(const float*, int64_t, int64_t, bool, int,
                                                        __nv_bfloat16*, cudaStream_t);
template cudaError_t moe_activate<double, double>(const double*, int64_t, int64_t, bool, int,
                                                  double*, cudaStream_t);
template cudaError_t moe_activate_backward<float>(const float*, const float*, int64_t, int64_t,
                                                  bool, int, float*, cudaStream_t);
template cudaError_t moe_activate_backward<double>(const double*, const double*, int64_t, int64_t,
                                                   bool, int, double*, cudaStream_t);
template cudaError_t moe_scatter_rows<float>(const float*, const int64_t*, const int64_t*, int64_t,
                                             int64_t, int64_t, float*, cudaStream_t);
template cudaError_t moe_scatter_rows<double>(const double*, const int64_t*, const int64_t*,
                                              int64_t, int64_t, int64_t, double*, cudaStream_t);

}  // namespace cuda
}  // namespace sparse_ext

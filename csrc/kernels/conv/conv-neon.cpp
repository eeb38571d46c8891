// ARM NEON conv ukernels: 1x1 (XNNPACK's f32-spmm-*-neonfma family) and kxk (direct sparse
// convolution over one output row). Compiled only when the compiler targets aarch64 (NEON and FMA
// are baseline there); elsewhere conv_ukernels_neon returns nullptr.
//
// kxk tiles hold 8 accumulators (16 columns x R <= 2, 8 x 4, 4 x 8) of the 32 vector registers:
// with the tile's activation vectors and the broadcast weights that leaves room to spare, and a
// wider tile would only add column tails on the 7x7 .. 56x56 planes of the networks measured.
#include <algorithm>
#include <cmath>

#include "conv.h"

#if defined(__aarch64__)
#include <arm_neon.h>

namespace sparse_ext {
namespace {

// Buffers at entry: x float [C_in, ldx], y float [C_out, ldy], w.values float [nnz * R],
// w.indices uint8 [nnz], w.offsets int32 [G*KB + 1]. Tile: 4*NV pixels at p x R channels of g.
template <int R, int NV>
inline void conv1x1_group_neon(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p,
                               int64_t g, const ConvEpilogue& ep, float* y, int64_t ldy) {
  constexpr int A = R * NV;
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  float32x4_t acc[A];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float32x4_t b = vdupq_n_f32(ep.bias != nullptr ? ep.bias[g * R + r] : 0.f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const float* xb = x + kb * kSpmmKBlock * ldx + p;
    for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
      const float* xr = xb + w.indices[j] * ldx;
      float32x4_t xv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = vld1q_f32(xr + 4 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float32x4_t wv = vld1q_dup_f32(values + j * R + r);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r * NV + v] = vfmaq_f32(acc[r * NV + v], xv[v], wv);
      }
    }
  }
  const float32x4_t vmin = vdupq_n_f32(ep.out_min), vmax = vdupq_n_f32(ep.out_max);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      vst1q_f32(y + (g * R + r) * ldy + p + 4 * v, vminq_f32(vmaxq_f32(acc[r * NV + v], vmin), vmax));
}

// Fewer than 4 pixels: scalar, same arithmetic order per pixel.
template <int R>
inline void conv1x1_group_tail(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p,
                               int64_t n, int64_t g, const ConvEpilogue& ep, float* y, int64_t ldy) {
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) {
      float acc = ep.bias != nullptr ? ep.bias[g * R + r] : 0.f;
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j)
          acc = std::fma(values[j * R + r], x[(kb * kSpmmKBlock + w.indices[j]) * ldx + p + i], acc);
      if (acc < ep.out_min) acc = ep.out_min;
      if (acc > ep.out_max) acc = ep.out_max;
      y[(g * R + r) * ldy + p + i] = acc;
    }
}

template <int R, int NV>
void conv1x1_neon(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0, int64_t p1,
                  int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y, int64_t ldy) {
  int64_t p = p0;
  for (; p + 4 * NV <= p1; p += 4 * NV)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group_neon<R, NV>(w, x, ldx, p, g, ep, y, ldy);
  for (; p + 4 <= p1; p += 4)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group_neon<R, 1>(w, x, ldx, p, g, ep, y, ldy);
  if (p < p1)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group_tail<R>(w, x, ldx, p, p1 - p, g, ep, y, ldy);
}

// ---- kxk: one output row, T = 4 * NV columns x R channels in registers over the group's taps ----
// Buffers at entry: taps ConvTap [nnz]; in.xq float [planes, hq, wq]; y float [C_out, out_h,
// out_w], rows [oy0, oy1) of the channels of groups [g0, g1) written. A tap whose shifted columns
// leave the plane inside the tile takes the edge path: in-plane pixels are copied and the products
// of the others masked to zero (a separate multiply, then add), so a non-finite weight never meets
// a pixel the reference skips (0 * inf would be NaN); inside the plane the FMA runs unmasked.
template <int R, int NV>
inline void kxk_tile(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy,
                     int64_t ox0, int64_t g, const ConvEpilogue& ep, float* y) {
  constexpr int T = 4 * NV;
  const int64_t KB = w.k_blocks(), OW = in.out_w, P = in.out_h * in.out_w;
  const float* values = static_cast<const float*>(w.values);
  float32x4_t acc[R * NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float32x4_t b = vdupq_n_f32(ep.bias != nullptr ? ep.bias[g * R + r] : 0.f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
  for (int32_t j = w.offsets[g * KB]; j < w.offsets[(g + 1) * KB]; ++j) {
    const ConvTap t = taps[j];
    const int64_t iy = oy + t.dy;
    if (iy < 0 || iy >= in.hq) continue;
    const int64_t c0 = ox0 + t.dx;  // plane column of the tile's first lane
    const float* xr = in.xq + t.plane + iy * in.wq;
    float32x4_t xv[NV];
    if (c0 >= 0 && c0 + T <= in.wq) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) xv[v] = vld1q_f32(xr + c0 + 4 * v);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float32x4_t wv = vld1q_dup_f32(values + j * R + r);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r * NV + v] = vfmaq_f32(acc[r * NV + v], xv[v], wv);
      }
      continue;
    }
    alignas(16) float px[T];
    alignas(16) uint32_t in_plane[T];
    for (int i = 0; i < T; ++i) {
      const bool ok = c0 + i >= 0 && c0 + i < in.wq;
      px[i] = ok ? xr[c0 + i] : 0.f;
      in_plane[i] = ok ? 0xffffffffu : 0u;
    }
    uint32x4_t keep[NV];
    for (int v = 0; v < NV; ++v) {
      xv[v] = vld1q_f32(px + 4 * v);
      keep[v] = vld1q_u32(in_plane + 4 * v);
    }
    for (int r = 0; r < R; ++r) {
      const float32x4_t wv = vld1q_dup_f32(values + j * R + r);
      for (int v = 0; v < NV; ++v) {
        const uint32x4_t prod = vandq_u32(vreinterpretq_u32_f32(vmulq_f32(wv, xv[v])), keep[v]);
        acc[r * NV + v] = vaddq_f32(acc[r * NV + v], vreinterpretq_f32_u32(prod));
      }
    }
  }
  const float32x4_t vmin = vdupq_n_f32(ep.out_min), vmax = vdupq_n_f32(ep.out_max);
  const int64_t n = std::min<int64_t>(T, OW - ox0);
  for (int r = 0; r < R; ++r) {
    float* yr = y + (g * R + r) * P + oy * OW + ox0;
    alignas(16) float out[T];
    for (int v = 0; v < NV; ++v) {
      const float32x4_t o = vminq_f32(vmaxq_f32(acc[r * NV + v], vmin), vmax);
      vst1q_f32(n == T ? yr + 4 * v : out + 4 * v, o);
    }
    for (int64_t i = 0; n < T && i < n; ++i) yr[i] = out[i];
  }
}

template <int R, int NV>
void kxk_neon(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
              int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t oy = oy0; oy < oy1; ++oy)
      for (int64_t ox0 = 0; ox0 < in.out_w; ox0 += 4 * NV)
        kxk_tile<R, NV>(w, taps, in, oy, ox0, g, ep, y);
}

#define SE_NEON_CONV(R, NV, MR, KNV, KT)                                           \
  ConvUkernels {                                                                   \
    "f32-conv1x1-" #MR "x" #R "-neon", conv1x1_neon<R, NV>, MR,                    \
        "f32-convkxk-1x" #KT "x" #R "-neon", kxk_neon<R, KNV>                      \
  }

const ConvUkernels kNeon[4] = {SE_NEON_CONV(1, 8, 32, 4, 16), SE_NEON_CONV(2, 4, 16, 4, 16),
                               SE_NEON_CONV(4, 4, 16, 2, 8), SE_NEON_CONV(8, 2, 8, 1, 4)};

}  // namespace

const ConvUkernels* conv_ukernels_neon(int64_t block_rows) {
  switch (block_rows) {
    case 1: return &kNeon[0];
    case 2: return &kNeon[1];
    case 4: return &kNeon[2];
    case 8: return &kNeon[3];
    default: return nullptr;
  }
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const ConvUkernels* conv_ukernels_neon(int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

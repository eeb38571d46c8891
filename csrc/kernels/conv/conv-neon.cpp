// ARM NEON 1x1 conv ukernels (XNNPACK's f32-spmm-*-neonfma family). Compiled only when the compiler
// targets aarch64 (NEON and FMA are baseline there); elsewhere conv_ukernels_neon returns nullptr.
// The kxk path on NEON uses the scalar kernel (kxk = nullptr in the table).
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

#define SE_NEON_CONV(R, NV, MR) \
  ConvUkernels { "f32-conv1x1-" #MR "x" #R "-neon", conv1x1_neon<R, NV>, MR, nullptr, nullptr }

const ConvUkernels kNeon[4] = {SE_NEON_CONV(1, 8, 32), SE_NEON_CONV(2, 4, 16),
                               SE_NEON_CONV(4, 4, 16), SE_NEON_CONV(8, 2, 8)};

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

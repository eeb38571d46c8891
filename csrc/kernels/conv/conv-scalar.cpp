// Portable scalar conv ukernels: the reference every ISA variant is tested against, and the path
// SPARSE_EXT_ISA=scalar runs.
#include <algorithm>
#include <cstring>

#include "conv.h"

namespace sparse_ext {
namespace {

constexpr int64_t kScalarMR = 8;

inline float epilogue(float acc, const ConvEpilogue& ep) {
  // max/min written so that NaN propagates (comparisons with NaN are false).
  if (acc < ep.out_min) acc = ep.out_min;
  if (acc > ep.out_max) acc = ep.out_max;
  return acc;
}

// Buffers: x float [C_in, ldx]; y float [C_out, ldy]; values float [nnz * R].
// For each tile of up to 8 pixels and each group: acc[R][8] over all entries, then bias + clamp.
template <int R>
void conv1x1_scalar(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0, int64_t p1,
                    int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y, int64_t ldy) {
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  for (int64_t p = p0; p < p1; p += kScalarMR) {
    const int64_t n = std::min(kScalarMR, p1 - p);
    for (int64_t g = g0; g < g1; ++g) {
      float acc[R * kScalarMR] = {};
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
          const float* xr = x + (kb * kSpmmKBlock + w.indices[j]) * ldx + p;
          for (int r = 0; r < R; ++r) {
            const float v = values[j * R + r];
            for (int64_t i = 0; i < n; ++i) acc[r * kScalarMR + i] += v * xr[i];
          }
        }
      for (int r = 0; r < R; ++r) {
        const int64_t m = g * R + r;
        const float b = ep.bias != nullptr ? ep.bias[m] : 0.f;
        for (int64_t i = 0; i < n; ++i) y[m * ldy + p + i] = epilogue(acc[r * kScalarMR + i] + b, ep);
      }
    }
  }
}

// Buffers: taps ConvTap [nnz]; in.xq float [planes, hq, wq]; y float [C_out, out_h, out_w].
// One output row at a time: acc[R][out_w] over the group's taps, clipped to the plane.
template <int R>
void kxk_scalar(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
                int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  const int64_t KB = w.k_blocks(), OW = in.out_w, P = in.out_h * in.out_w;
  const float* values = static_cast<const float*>(w.values);
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t oy = oy0; oy < oy1; ++oy) {
      float* yr[R];
      for (int r = 0; r < R; ++r) {
        yr[r] = y + (g * R + r) * P + oy * OW;
        const float b = ep.bias != nullptr ? ep.bias[g * R + r] : 0.f;
        for (int64_t ox = 0; ox < OW; ++ox) yr[r][ox] = b;
      }
      for (int32_t j = w.offsets[g * KB]; j < w.offsets[(g + 1) * KB]; ++j) {
        const ConvTap t = taps[j];
        const int64_t iy = oy + t.dy;
        if (iy < 0 || iy >= in.hq) continue;
        const int64_t lo = std::max<int64_t>(0, -t.dx), hi = std::min<int64_t>(OW, in.wq - t.dx);
        const float* xr = in.xq + t.plane + iy * in.wq + t.dx;
        for (int r = 0; r < R; ++r) {
          const float v = values[j * R + r];
          for (int64_t ox = lo; ox < hi; ++ox) yr[r][ox] += v * xr[ox];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int64_t ox = 0; ox < OW; ++ox) yr[r][ox] = epilogue(yr[r][ox], ep);
    }
}

#define SE_SCALAR_CONV(R) \
  ConvUkernels { "f32-conv1x1-8x" #R "-scalar", conv1x1_scalar<R>, kScalarMR, \
                 "f32-convkxk-1x" #R "-scalar", kxk_scalar<R> }

const ConvUkernels kScalar[4] = {SE_SCALAR_CONV(1), SE_SCALAR_CONV(2), SE_SCALAR_CONV(4),
                                 SE_SCALAR_CONV(8)};

}  // namespace

const ConvUkernels* conv_ukernels_scalar(int64_t block_rows) {
  switch (block_rows) {
    case 1: return &kScalar[0];
    case 2: return &kScalar[1];
    case 4: return &kScalar[2];
    case 8: return &kScalar[3];
    default: return nullptr;
  }
}

}  // namespace sparse_ext

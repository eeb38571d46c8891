// WebAssembly SIMD128 conv ukernels: 1x1 (XNNPACK's f32-spmm-*-wasmsimd family) and kxk (direct
// sparse convolution over one output row). Compiled only when the build targets SIMD128
// (__wasm_simd128__); elsewhere conv_ukernels_wasmsimd returns nullptr.
//
// Tiles hold 8 accumulators (1x1: 32x1, 16x2, 8x4, 4x8; kxk: 16 columns x R <= 2, 8 x 4, 4 x 8):
// engines map v128 onto the host's registers, 16 xmm on x86-64, and the tile's activation vectors
// and broadcast weights need the rest.
#include <algorithm>

#include "conv.h"

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>

#include "../common/wasmsimd-values.h"  // muladd

namespace sparse_ext {
namespace {

// Buffers at entry: x float [C_in, ldx], y float [C_out, ldy], w.values float [nnz * R],
// w.indices uint8 [nnz], w.offsets int32 [G*KB + 1]. Tile: 4*NV pixels at p x R channels of g.
template <int R, int NV>
inline void conv1x1_group(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p, int64_t g,
                          const ConvEpilogue& ep, float* y, int64_t ldy) {
  constexpr int A = R * NV;
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  v128_t acc[A];
  for (int r = 0; r < R; ++r) {
    const v128_t b = wasm_f32x4_splat(ep.bias != nullptr ? ep.bias[g * R + r] : 0.f);
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const float* xb = x + kb * kSpmmKBlock * ldx + p;
    for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
      const float* xr = xb + w.indices[j] * ldx;
      v128_t xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = wasm_v128_load(xr + 4 * v);
      for (int r = 0; r < R; ++r) {
        const v128_t wv = wasm_v128_load32_splat(values + j * R + r);
        for (int v = 0; v < NV; ++v) acc[r * NV + v] = muladd(acc[r * NV + v], xv[v], wv);
      }
    }
  }
  // f32x4.min / max return NaN when either input is NaN, as the reference's comparisons keep it.
  const v128_t vmin = wasm_f32x4_splat(ep.out_min), vmax = wasm_f32x4_splat(ep.out_max);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      wasm_v128_store(y + (g * R + r) * ldy + p + 4 * v,
                      wasm_f32x4_min(wasm_f32x4_max(acc[r * NV + v], vmin), vmax));
}

// Fewer than 4 pixels: scalar, the reference's arithmetic per pixel (no std::fma: wasm has no
// fused instruction and libm's fma is a slow software routine).
template <int R>
inline void conv1x1_group_tail(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p,
                               int64_t n, int64_t g, const ConvEpilogue& ep, float* y,
                               int64_t ldy) {
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  for (int64_t i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r) {
      float acc = ep.bias != nullptr ? ep.bias[g * R + r] : 0.f;
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j)
          acc += values[j * R + r] * x[(kb * kSpmmKBlock + w.indices[j]) * ldx + p + i];
      if (acc < ep.out_min) acc = ep.out_min;
      if (acc > ep.out_max) acc = ep.out_max;
      y[(g * R + r) * ldy + p + i] = acc;
    }
}

template <int R, int NV>
void conv1x1(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0, int64_t p1, int64_t g0,
             int64_t g1, const ConvEpilogue& ep, float* y, int64_t ldy) {
  int64_t p = p0;
  for (; p + 4 * NV <= p1; p += 4 * NV)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group<R, NV>(w, x, ldx, p, g, ep, y, ldy);
  for (; p + 4 <= p1; p += 4)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group<R, 1>(w, x, ldx, p, g, ep, y, ldy);
  if (p < p1)
    for (int64_t g = g0; g < g1; ++g) conv1x1_group_tail<R>(w, x, ldx, p, p1 - p, g, ep, y, ldy);
}


// ---- kxk: one output row, T = 4 * NV columns x R channels in registers over the group's taps ----
// Buffers at entry: taps ConvTap [nnz]; in.xq float [planes, hq, wq]; y float [C_out, out_h,
// out_w], rows [oy0, oy1) of the channels of groups [g0, g1) written. A tap whose shifted columns
// leave the plane inside the tile takes the edge path: in-plane pixels are copied, and the
// products of the others are masked to zero, so a non-finite weight never meets a pixel the
// reference skips (0 * inf would be NaN).
template <int R, int NV>
inline void kxk_tile(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy,
                     int64_t ox0, int64_t g, const ConvEpilogue& ep, float* y) {
  constexpr int T = 4 * NV;
  const int64_t KB = w.k_blocks(), OW = in.out_w, P = in.out_h * in.out_w;
  const float* values = static_cast<const float*>(w.values);
  v128_t acc[R * NV];
  for (int r = 0; r < R; ++r) {
    const v128_t b = wasm_f32x4_splat(ep.bias != nullptr ? ep.bias[g * R + r] : 0.f);
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
  for (int32_t j = w.offsets[g * KB]; j < w.offsets[(g + 1) * KB]; ++j) {
    const ConvTap t = taps[j];
    const int64_t iy = oy + t.dy;
    if (iy < 0 || iy >= in.hq) continue;
    const int64_t c0 = ox0 + t.dx;  // plane column of the tile's first lane
    const float* xr = in.xq + t.plane + iy * in.wq;
    v128_t xv[NV], keep[NV];
    const bool inside = c0 >= 0 && c0 + T <= in.wq;
    if (inside) {
      for (int v = 0; v < NV; ++v) xv[v] = wasm_v128_load(xr + c0 + 4 * v);
    } else {
      alignas(16) float px[T];
      alignas(16) int32_t in_plane[T];
      for (int i = 0; i < T; ++i) {
        const bool ok = c0 + i >= 0 && c0 + i < in.wq;
        px[i] = ok ? xr[c0 + i] : 0.f;
        in_plane[i] = ok ? -1 : 0;
      }
      for (int v = 0; v < NV; ++v) {
        xv[v] = wasm_v128_load(px + 4 * v);
        keep[v] = wasm_v128_load(in_plane + 4 * v);
      }
    }
    for (int r = 0; r < R; ++r) {
      const v128_t wv = wasm_v128_load32_splat(values + j * R + r);
      for (int v = 0; v < NV; ++v) {
        v128_t prod = wasm_f32x4_mul(wv, xv[v]);
        if (!inside) prod = wasm_v128_and(prod, keep[v]);
        acc[r * NV + v] = wasm_f32x4_add(acc[r * NV + v], prod);
      }
    }
  }
  const v128_t vmin = wasm_f32x4_splat(ep.out_min), vmax = wasm_f32x4_splat(ep.out_max);
  const int64_t n = std::min<int64_t>(T, OW - ox0);
  for (int r = 0; r < R; ++r) {
    float* yr = y + (g * R + r) * P + oy * OW + ox0;
    alignas(16) float out[T];
    for (int v = 0; v < NV; ++v) {
      const v128_t o = wasm_f32x4_min(wasm_f32x4_max(acc[r * NV + v], vmin), vmax);
      if (n == T) {
        wasm_v128_store(yr + 4 * v, o);
      } else {
        wasm_v128_store(out + 4 * v, o);
      }
    }
    if (n < T)
      for (int64_t i = 0; i < n; ++i) yr[i] = out[i];
  }
}

template <int R, int NV>
void kxk(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0, int64_t oy1,
         int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t oy = oy0; oy < oy1; ++oy)
      for (int64_t ox0 = 0; ox0 < in.out_w; ox0 += 4 * NV)
        kxk_tile<R, NV>(w, taps, in, oy, ox0, g, ep, y);
}

#define SE_WASM_CONV(R, NV, MR, KNV, KT)                                              \
  ConvUkernels {                                                                      \
    "f32-conv1x1-" #MR "x" #R "-wasmsimd", conv1x1<R, NV>, MR,                        \
        "f32-convkxk-1x" #KT "x" #R "-wasmsimd", kxk<R, KNV>                          \
  }

const ConvUkernels kWasm[4] = {SE_WASM_CONV(1, 8, 32, 4, 16), SE_WASM_CONV(2, 4, 16, 4, 16),
                               SE_WASM_CONV(4, 2, 8, 2, 8), SE_WASM_CONV(8, 1, 4, 1, 4)};

}  // namespace

const ConvUkernels* conv_ukernels_wasmsimd(int64_t block_rows) {
  switch (block_rows) {
    case 1: return &kWasm[0];
    case 2: return &kWasm[1];
    case 4: return &kWasm[2];
    case 8: return &kWasm[3];
    default: return nullptr;
  }
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const ConvUkernels* conv_ukernels_wasmsimd(int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

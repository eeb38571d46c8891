// WebAssembly SIMD128 1x1 conv ukernels (XNNPACK's f32-spmm-*-wasmsimd family). Compiled only when
// the build targets SIMD128 (__wasm_simd128__); elsewhere conv_ukernels_wasmsimd returns nullptr.
// The kxk path on wasm uses the scalar kernel (kxk = nullptr in the table).
//
// Tiles hold 8 accumulators (32x1, 16x2, 8x4, 4x8): engines map v128 onto the host's registers,
// 16 xmm on x86-64, and the tile's activation vectors and broadcast weights need the rest.
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

#define SE_WASM_CONV(R, NV, MR) \
  ConvUkernels { "f32-conv1x1-" #MR "x" #R "-wasmsimd", conv1x1<R, NV>, MR, nullptr, nullptr }

const ConvUkernels kWasm[4] = {SE_WASM_CONV(1, 8, 32), SE_WASM_CONV(2, 4, 16),
                               SE_WASM_CONV(4, 2, 8), SE_WASM_CONV(8, 1, 4)};

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

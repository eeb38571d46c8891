// WebAssembly SIMD128 N:M ukernels. Compiled only when the build targets SIMD128
// (__wasm_simd128__); elsewhere nm_ukernels_wasmsimd returns nullptr. Tested under Node.js by
// scripts/test_wasm.sh against the scalar reference. No FMA in SIMD128: products are mul + add.
// Metadata is decoded with scalar shifts: SIMD128 has no per-lane variable shift (AVX2's vpsrlvd),
// and the decode runs once per row and block, not per token.
#include <cstring>

#include "../common/bf16.h"
#include "nm.h"

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>

#include "../common/wasmsimd-values.h"

namespace sparse_ext {
namespace {

// ---- GEMV: 4 slots per vector; activations built lane by lane (no gather in SIMD128) ----------
// Entry: x float [padded_cols + 8], gcol int32 [kept], y float [rows] (r0 .. r1 - 1 written).
template <ValueType VT, int B>
void gemv_impl(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    v128_t acc0 = wasm_f32x4_splat(0.f), acc1 = wasm_f32x4_splat(0.f);
    int64_t c = 0;
    for (; c + 8 <= kept; c += 8) {
      const v128_t xa = wasm_f32x4_make(x[gcol[c] + nm_read_index(meta, c, B)],
                                        x[gcol[c + 1] + nm_read_index(meta, c + 1, B)],
                                        x[gcol[c + 2] + nm_read_index(meta, c + 2, B)],
                                        x[gcol[c + 3] + nm_read_index(meta, c + 3, B)]);
      const v128_t xc = wasm_f32x4_make(x[gcol[c + 4] + nm_read_index(meta, c + 4, B)],
                                        x[gcol[c + 5] + nm_read_index(meta, c + 5, B)],
                                        x[gcol[c + 6] + nm_read_index(meta, c + 6, B)],
                                        x[gcol[c + 7] + nm_read_index(meta, c + 7, B)]);
      acc0 = muladd(acc0, load4_values<VT>(w.values, vbase + c), xa);
      acc1 = muladd(acc1, load4_values<VT>(w.values, vbase + c + 4), xc);
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, B)];
    y[r] = hsum(wasm_f32x4_add(acc0, acc1)) + tail;
  }
}

template <ValueType VT>
void gemv(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
          float* y) {
  switch (w.bits()) {
    case 2: return gemv_impl<VT, 2>(w, x, gcol, r0, r1, y);
    case 3: return gemv_impl<VT, 3>(w, x, gcol, r0, r1, y);
    default: return gemv_impl<VT, 4>(w, x, gcol, r0, r1, y);
  }
}

// Offsets (in floats) of the block's slots into the panel block: (gcol[c] + index) * NT.
template <int B>
inline void decode_offsets(const uint8_t* row_meta, const int32_t* gcol, int64_t j0, int64_t cnt,
                           int64_t nt, int32_t* offs) {
  for (int64_t c = 0; c < cnt; ++c)
    offs[c] = static_cast<int32_t>((gcol[c] + nm_read_index(row_meta, j0 + c, B)) * nt);
}

// ---- Token tile: NT = 4 * NV tokens of one row in NV registers --------------------------------
// U accumulator sets take slots in turn (NV * U = 8 independent add chains; 8 accumulators leave
// room in the 16 xmm registers an x86-64 host maps v128 onto).
// Entry: xP float [padded_cols, NT], gcol int32 [(g1-g0)*N], ytile float [r1-r0, NT] accumulated.
template <ValueType VT, int NV, int U, int B>
void tile_impl(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
               int64_t r0, int64_t r1, float* ytile) {
  constexpr int NT = 4 * NV, A = NV * U;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n, M = w.m;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  const float* xb = xP + g0 * M * NT;
  int32_t offs[kNmMaxBlockSlots];
  for (int64_t r = r0; r < r1; ++r) {
    decode_offsets<B>(w.meta + r * stride, gcol, j0, cnt, NT, offs);
    const int64_t vbase = r * kept + j0;
    float* yr = ytile + (r - r0) * NT;
    v128_t acc[A];
    for (int v = 0; v < NV; ++v) acc[v] = wasm_v128_load(yr + 4 * v);
    for (int i = NV; i < A; ++i) acc[i] = wasm_f32x4_splat(0.f);
    int64_t c = 0;
    for (; c + U <= cnt; c += U) {
      for (int u = 0; u < U; ++u) {
        const float* xr = xb + offs[c + u];
        const v128_t wv = broadcast_value<VT>(w.values, vbase + c + u);
        for (int v = 0; v < NV; ++v)
          acc[u * NV + v] = muladd(acc[u * NV + v], wasm_v128_load(xr + 4 * v), wv);
      }
    }
    for (; c < cnt; ++c) {
      const float* xr = xb + offs[c];
      const v128_t wv = broadcast_value<VT>(w.values, vbase + c);
      for (int v = 0; v < NV; ++v) acc[v] = muladd(acc[v], wasm_v128_load(xr + 4 * v), wv);
    }
    for (int u = 1; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[v] = wasm_f32x4_add(acc[v], acc[u * NV + v]);
    for (int v = 0; v < NV; ++v) wasm_v128_store(yr + 4 * v, acc[v]);
  }
}

template <ValueType VT, int NV, int U>
void tile(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
          int64_t r0, int64_t r1, float* ytile) {
  switch (w.bits()) {
    case 2: return tile_impl<VT, NV, U, 2>(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 3: return tile_impl<VT, NV, U, 3>(w, xP, gcol, g0, g1, r0, r1, ytile);
    default: return tile_impl<VT, NV, U, 4>(w, xP, gcol, g0, g1, r0, r1, ytile);
  }
}

// ---- Input gradient: scatter each slot's value times the row's grad vector ---------------------
constexpr int kScatterNv = 4;
// Entry: dyP float [rows, NT], gcol int32 [(g1-g0)*N], dxtile float [(g1-g0)*M, NT] accumulated.
template <ValueType VT, int B>
void scatter_impl(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
                  int64_t r0, int64_t r1, float* dxtile) {
  constexpr int NV = kScatterNv, NT = 4 * NV;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  int32_t offs[kNmMaxBlockSlots];
  for (int64_t r = r0; r < r1; ++r) {
    v128_t d[NV];
    for (int v = 0; v < NV; ++v) d[v] = wasm_v128_load(dyP + r * NT + 4 * v);
    decode_offsets<B>(w.meta + r * stride, gcol, j0, cnt, NT, offs);
    const int64_t vbase = r * kept + j0;
    for (int64_t c = 0; c < cnt; ++c) {
      float* xr = dxtile + offs[c];
      const v128_t wv = broadcast_value<VT>(w.values, vbase + c);
      for (int v = 0; v < NV; ++v)
        wasm_v128_store(xr + 4 * v, muladd(wasm_v128_load(xr + 4 * v), d[v], wv));
    }
  }
}

template <ValueType VT>
void scatter(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
             int64_t r0, int64_t r1, float* dxtile) {
  switch (w.bits()) {
    case 2: return scatter_impl<VT, 2>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    case 3: return scatter_impl<VT, 3>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    default: return scatter_impl<VT, 4>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
  }
}

// ---- Values gradient (SDDMM): one dot product over the tokens (ld % 8 == 0) per slot ----------
// Entry: dyT float [rows, ld], xT float [padded_cols, ld], gcol int32 [kept], dv float [rows, kept].
template <ValueType VT>
void sddmm(const NmWeight& w, const float* dyT, const float* xT, int64_t ld, const int32_t* gcol,
           int64_t r0, int64_t r1, float* dv) {
  (void)sizeof(VT);
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const float* dr = dyT + r * ld;
    for (int64_t j = 0; j < kept; ++j) {
      const float* xr = xT + (gcol[j] + nm_read_index(meta, j, bits)) * ld;
      v128_t a0 = wasm_f32x4_splat(0.f), a1 = wasm_f32x4_splat(0.f);
      for (int64_t t = 0; t + 8 <= ld; t += 8) {
        a0 = muladd(a0, wasm_v128_load(dr + t), wasm_v128_load(xr + t));
        a1 = muladd(a1, wasm_v128_load(dr + t + 4), wasm_v128_load(xr + t + 4));
      }
      dv[r * kept + j] = hsum(wasm_f32x4_add(a0, a1));
    }
  }
}

#define SE_NM_WASM_KERNELS(VT, vts)                                                       \
  NmUkernels {                                                                            \
    vts "-nmgemv-1x1-wasmsimd", gemv<VT>,                                                 \
        {{vts "-nmmm-8x1-wasmsimd", tile<VT, 2, 4>, 8},                                   \
         {vts "-nmmm-16x1-wasmsimd", tile<VT, 4, 2>, 16},                                 \
         {vts "-nmmm-32x1-wasmsimd", tile<VT, 8, 1>, 32},                                 \
         {nullptr, nullptr, 0}},                                                          \
        vts "-nmscatter-16x1-wasmsimd", scatter<VT>, 4 * kScatterNv,                      \
        vts "-nmsddmm-1x1-wasmsimd", sddmm<VT>                                            \
  }

const NmUkernels kF32 = SE_NM_WASM_KERNELS(ValueType::kF32, "f32");
const NmUkernels kBF16 = SE_NM_WASM_KERNELS(ValueType::kBF16, "bf16");

}  // namespace

const NmUkernels* nm_ukernels_wasmsimd(ValueType value_type) {
  if (value_type == ValueType::kF32) return &kF32;
  if (value_type == ValueType::kBF16) return &kBF16;
  return nullptr;
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const NmUkernels* nm_ukernels_wasmsimd(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

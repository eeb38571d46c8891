// WebAssembly SIMD128 ukernels, the XNNPACK f32-spmm-*-wasmsimd family. Compiled only when the
// build targets SIMD128 (__wasm_simd128__, scripts/test_wasm.sh); elsewhere spmm_ukernels_wasmsimd
// returns nullptr. SIMD128 has no FMA, so every product is a mul + add (muladd).
//
// Register budget: engines map v128 onto the host's vector registers, 16 xmm on x86-64 (the
// common host of a browser), so tiles keep at most 8 accumulators plus the activation vectors;
// the NEON tiles' 16 accumulators would spill there.
#include <cstring>

#include "../common/bf16.h"
#include "spmm.h"

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>

#include "../common/wasmsimd-values.h"

namespace sparse_ext {
namespace {

// R = 1: no gather, so the 4 activations of a chunk are built lane by lane; values are
// contiguous. Two accumulators alternate; the < 4 entries left in a segment go scalar.
// Buffers: x float [padded_cols], y float [M]; reads values/indices only in [offsets[..]].
template <ValueType VT>
void gemv_r1(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    v128_t acc0 = wasm_f32x4_splat(0.f), acc1 = wasm_f32x4_splat(0.f);
    float tail = 0.f;
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 8 <= j1; j += 8) {
        const v128_t xa = wasm_f32x4_make(xb[indices[j]], xb[indices[j + 1]], xb[indices[j + 2]],
                                          xb[indices[j + 3]]);
        const v128_t xc = wasm_f32x4_make(xb[indices[j + 4]], xb[indices[j + 5]],
                                          xb[indices[j + 6]], xb[indices[j + 7]]);
        acc0 = muladd(acc0, load4_values<VT>(w.values, j), xa);
        acc1 = muladd(acc1, load4_values<VT>(w.values, j + 4), xc);
      }
      if (j + 4 <= j1) {
        const v128_t xa = wasm_f32x4_make(xb[indices[j]], xb[indices[j + 1]], xb[indices[j + 2]],
                                          xb[indices[j + 3]]);
        acc0 = muladd(acc0, load4_values<VT>(w.values, j), xa);
        j += 4;
      }
      for (; j < j1; ++j) tail += load1_value<VT>(w.values, j) * xb[indices[j]];
    }
    y[g] = hsum(wasm_f32x4_add(acc0, acc1)) + tail;
  }
}

// R = 2: two entries per vector, [w(j, 0), w(j, 1), w(j+1, 0), w(j+1, 1)] (contiguous) times
// [x_j, x_j, x_j+1, x_j+1]; the halves are summed at the end. An odd last entry goes scalar.
template <ValueType VT>
void gemv_r2(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    v128_t acc = wasm_f32x4_splat(0.f);
    float tail0 = 0.f, tail1 = 0.f;
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        const float xa = xb[w.indices[j]], xc = xb[w.indices[j + 1]];
        acc = muladd(acc, load4_values<VT>(w.values, 2 * j), wasm_f32x4_make(xa, xa, xc, xc));
      }
      if (j < j1) {
        const float xa = xb[w.indices[j]];
        tail0 += load1_value<VT>(w.values, 2 * j) * xa;
        tail1 += load1_value<VT>(w.values, 2 * j + 1) * xa;
      }
    }
    const v128_t sum = wasm_f32x4_add(acc, wasm_i32x4_shuffle(acc, acc, 2, 3, 0, 1));
    y[2 * g] = wasm_f32x4_extract_lane(sum, 0) + tail0;
    y[2 * g + 1] = wasm_f32x4_extract_lane(sum, 1) + tail1;
  }
}

// R = 4 and 8: one broadcast activation times R / 4 vectors of row values per entry; two entries
// in flight on separate accumulators.
template <ValueType VT, int R>
void gemv_rvec(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  constexpr int V = R / 4;
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    v128_t acc[2 * V];
    for (int i = 0; i < 2 * V; ++i) acc[i] = wasm_f32x4_splat(0.f);
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        const v128_t xa = wasm_v128_load32_splat(xb + w.indices[j]);
        const v128_t xc = wasm_v128_load32_splat(xb + w.indices[j + 1]);
        for (int v = 0; v < V; ++v) {
          acc[v] = muladd(acc[v], load4_values<VT>(w.values, j * R + 4 * v), xa);
          acc[V + v] = muladd(acc[V + v], load4_values<VT>(w.values, (j + 1) * R + 4 * v), xc);
        }
      }
      if (j < j1) {
        const v128_t xa = wasm_v128_load32_splat(xb + w.indices[j]);
        for (int v = 0; v < V; ++v)
          acc[v] = muladd(acc[v], load4_values<VT>(w.values, j * R + 4 * v), xa);
      }
    }
    for (int v = 0; v < V; ++v)
      wasm_v128_store(y + g * R + 4 * v, wasm_f32x4_add(acc[v], acc[V + v]));
  }
}

// Transposed tile: NV vectors of 4 tokens per row, R rows per entry, U entries in flight on
// separate accumulator sets (R * NV * U <= 8 accumulators, see the register budget above).
// Buffers: xT float [padded_cols, NT] packed tile, ytile float [(g1 - g0) * R, NT] overwritten.
template <ValueType VT, int R, int NV>
inline void tile_entry(const SpmmWeight& w, const float* xr, int64_t j, v128_t* acc) {
  v128_t xv[NV];
  for (int v = 0; v < NV; ++v) xv[v] = wasm_v128_load(xr + 4 * v);
  for (int r = 0; r < R; ++r) {
    const v128_t wv = broadcast_value<VT>(w.values, j * R + r);
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = muladd(acc[r * NV + v], xv[v], wv);
  }
}

template <ValueType VT, int R, int NV, int U>
void tile(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
          float* ytile) {
  constexpr int NT = 4 * NV, A = R * NV;
  (void)ldx;
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    v128_t acc[U * A];
    for (int i = 0; i < U * A; ++i) acc[i] = wasm_f32x4_splat(0.f);
    const int32_t* seg = w.offsets + g * KB;
    int64_t j = seg[0];
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = xT + kb * kSpmmKBlock * NT;
      const int64_t j1 = seg[kb + 1];
      for (; j + U <= j1; j += U)
        for (int u = 0; u < U; ++u)
          tile_entry<VT, R, NV>(w, xb + indices[j + u] * NT, j + u, acc + u * A);
      for (; j < j1; ++j) tile_entry<VT, R, NV>(w, xb + indices[j] * NT, j, acc);
    }
    float* yg = ytile + (g - g0) * R * NT;
    for (int i = 0; i < A; ++i) {
      v128_t sum = acc[i];
      for (int u = 1; u < U; ++u) sum = wasm_f32x4_add(sum, acc[u * A + i]);
      wasm_v128_store(yg + 4 * i, sum);
    }
  }
}

// dv[j*R + r] = dot(dyT row, xT row) over ld (a multiple of 8) tokens.
template <ValueType VT>
void sddmm(const SpmmWeight& w, const float* dyT, const float* xT, int64_t ld, int64_t g0,
           int64_t g1, float* dv) {
  (void)sizeof(VT);
  const int64_t R = w.block_rows, KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float* xr = xT + (kb * kSpmmKBlock + w.indices[j]) * ld;
        for (int64_t r = 0; r < R; ++r) {
          const float* dr = dyT + (g * R + r) * ld;
          v128_t a0 = wasm_f32x4_splat(0.f), a1 = wasm_f32x4_splat(0.f);
          for (int64_t n = 0; n + 8 <= ld; n += 8) {
            a0 = muladd(a0, wasm_v128_load(dr + n), wasm_v128_load(xr + n));
            a1 = muladd(a1, wasm_v128_load(dr + n + 4), wasm_v128_load(xr + n + 4));
          }
          dv[j * R + r] = hsum(wasm_f32x4_add(a0, a1));
        }
      }
}

#define SE_WASM_KERNELS(VT, vts, R, GEMV, NT, NV, U)                                            \
  SpmmUkernels {                                                                                \
    vts "-spmm-1x" #R "-wasmsimd", GEMV, vts "-spmm-" #NT "x" #R "-wasmsimd", tile<VT, R, NV, U>, \
        NT, nullptr, nullptr, 0, vts "-sddmm-1x" #R "-wasmsimd", sddmm<VT>                       \
  }
// R = 1: 32 tokens x 1 row (8 accumulators; under node its speedup over dense measured 1.07-1.17x
// that of a 16x1 tile with two entries in flight) and an 8-token tile: for N <= 8 the 32-wide
// tile would compute mostly zeros.
#define SE_WASM_KERNELS_R1(VT, vts)                                                           \
  SpmmUkernels {                                                                              \
    vts "-spmm-1x1-wasmsimd", gemv_r1<VT>, vts "-spmm-32x1-wasmsimd", tile<VT, 1, 8, 1>, 32,  \
        vts "-spmm-8x1-wasmsimd", tile<VT, 1, 2, 4>, 8, vts "-sddmm-1x1-wasmsimd", sddmm<VT>    \
  }

const SpmmUkernels kF32[4] = {
    SE_WASM_KERNELS_R1(ValueType::kF32, "f32"),
    SE_WASM_KERNELS(ValueType::kF32, "f32", 2, gemv_r2<ValueType::kF32>, 16, 4, 1),
    SE_WASM_KERNELS(ValueType::kF32, "f32", 4, (gemv_rvec<ValueType::kF32, 4>), 8, 2, 1),
    SE_WASM_KERNELS(ValueType::kF32, "f32", 8, (gemv_rvec<ValueType::kF32, 8>), 4, 1, 1),
};
const SpmmUkernels kBF16[4] = {
    SE_WASM_KERNELS_R1(ValueType::kBF16, "bf16"),
    SE_WASM_KERNELS(ValueType::kBF16, "bf16", 2, gemv_r2<ValueType::kBF16>, 16, 4, 1),
    SE_WASM_KERNELS(ValueType::kBF16, "bf16", 4, (gemv_rvec<ValueType::kBF16, 4>), 8, 2, 1),
    SE_WASM_KERNELS(ValueType::kBF16, "bf16", 8, (gemv_rvec<ValueType::kBF16, 8>), 4, 1, 1),
};

}  // namespace

const SpmmUkernels* spmm_ukernels_wasmsimd(ValueType value_type, int64_t block_rows) {
  int slot;
  switch (block_rows) {
    case 1: slot = 0; break;
    case 2: slot = 1; break;
    case 4: slot = 2; break;
    case 8: slot = 3; break;
    default: return nullptr;
  }
  if (value_type == ValueType::kF64) return nullptr;
  return value_type == ValueType::kF32 ? &kF32[slot] : &kBF16[slot];
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const SpmmUkernels* spmm_ukernels_wasmsimd(ValueType, int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

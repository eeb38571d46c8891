// ARM NEON (aarch64 ASIMD, fp32 FMA via vfmaq_f32) ukernels, the XNNPACK f32-spmm-*-neon family.
// Compiled only when the compiler targets aarch64 (NEON and FMA are baseline there); elsewhere
// spmm_ukernels_neon returns nullptr. Tested under qemu-aarch64 by scripts/test_aarch64.sh.
#include <cstring>
#include <utility>

#include "../common/bf16.h"
#include "spmm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include "../common/neon-values.h"

namespace sparse_ext {
namespace {

// R = 1: NEON has no gather, so the 4 activations of a chunk are inserted lane by lane; values
// are contiguous. Two accumulators alternate; the < 4 entries left in a segment go scalar.
// Buffers: x float [padded_cols], y float [M]; reads values/indices only in [offsets[..]].
template <ValueType VT>
void gemv_r1(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
    float tail = 0.f;
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 8 <= j1; j += 8) {
        float32x4_t xa = vld1q_dup_f32(xb + indices[j]);
        xa = vld1q_lane_f32(xb + indices[j + 1], xa, 1);
        xa = vld1q_lane_f32(xb + indices[j + 2], xa, 2);
        xa = vld1q_lane_f32(xb + indices[j + 3], xa, 3);
        float32x4_t xc = vld1q_dup_f32(xb + indices[j + 4]);
        xc = vld1q_lane_f32(xb + indices[j + 5], xc, 1);
        xc = vld1q_lane_f32(xb + indices[j + 6], xc, 2);
        xc = vld1q_lane_f32(xb + indices[j + 7], xc, 3);
        acc0 = vfmaq_f32(acc0, load4_values<VT>(w.values, j), xa);
        acc1 = vfmaq_f32(acc1, load4_values<VT>(w.values, j + 4), xc);
      }
      if (j + 4 <= j1) {
        float32x4_t xa = vld1q_dup_f32(xb + indices[j]);
        xa = vld1q_lane_f32(xb + indices[j + 1], xa, 1);
        xa = vld1q_lane_f32(xb + indices[j + 2], xa, 2);
        xa = vld1q_lane_f32(xb + indices[j + 3], xa, 3);
        acc0 = vfmaq_f32(acc0, load4_values<VT>(w.values, j), xa);
        j += 4;
      }
      for (; j < j1; ++j) tail += load1_value<VT>(w.values, j) * xb[indices[j]];
    }
    y[g] = vaddvq_f32(vaddq_f32(acc0, acc1)) + tail;
  }
}

// R = 4 and 8: one broadcast activation times R / 4 vectors of row values per entry; two entries
// in flight on separate accumulators.
template <ValueType VT, int R>
void gemv_rvec(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  constexpr int V = R / 4;
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    float32x4_t acc[2 * V];
#pragma GCC unroll 4
    for (int i = 0; i < 2 * V; ++i) acc[i] = vdupq_n_f32(0.f);
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        const float32x4_t xa = vld1q_dup_f32(xb + w.indices[j]);
        const float32x4_t xc = vld1q_dup_f32(xb + w.indices[j + 1]);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v) {
          acc[v] = vfmaq_f32(acc[v], load4_values<VT>(w.values, j * R + 4 * v), xa);
          acc[V + v] = vfmaq_f32(acc[V + v], load4_values<VT>(w.values, (j + 1) * R + 4 * v), xc);
        }
      }
      if (j < j1) {
        const float32x4_t xa = vld1q_dup_f32(xb + w.indices[j]);
#pragma GCC unroll 2
        for (int v = 0; v < V; ++v)
          acc[v] = vfmaq_f32(acc[v], load4_values<VT>(w.values, j * R + 4 * v), xa);
      }
    }
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) vst1q_f32(y + g * R + 4 * v, vaddq_f32(acc[v], acc[V + v]));
  }
}

// R = 2: a 2-lane vector of row values per entry.
template <ValueType VT>
void gemv_r2(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    float32x2_t acc0 = vdup_n_f32(0.f), acc1 = vdup_n_f32(0.f);
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j < j1; ++j) {
        const float32x2_t v = {load1_value<VT>(w.values, 2 * j), load1_value<VT>(w.values, 2 * j + 1)};
        acc0 = vfma_f32(acc0, v, vld1_dup_f32(xb + w.indices[j]));
        std::swap(acc0, acc1);
      }
    }
    vst1_f32(y + 2 * g, vadd_f32(acc0, acc1));
  }
}

// Transposed tile: NV vectors of 4 tokens per row, R rows per entry, U entries in flight on
// separate accumulators (R * NV * U >= 8 independent FMA chains; 32 NEON registers hold them).
// Buffers: xT float [padded_cols, NT] packed tile, ytile float [(g1 - g0) * R, NT] overwritten.
template <ValueType VT, int R, int NV>
inline void tile_entry(const SpmmWeight& w, const float* xr, int64_t j, float32x4_t* acc) {
  float32x4_t xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) xv[v] = vld1q_f32(xr + 4 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const float32x4_t wv = broadcast_value<VT>(w.values, j * R + r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = vfmaq_f32(acc[r * NV + v], xv[v], wv);
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
    float32x4_t acc[U * A];
#pragma GCC unroll 32
    for (int i = 0; i < U * A; ++i) acc[i] = vdupq_n_f32(0.f);
    const int32_t* seg = w.offsets + g * KB;
    int64_t j = seg[0];
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = xT + kb * kSpmmKBlock * NT;
      const int64_t j1 = seg[kb + 1];
      for (; j + U <= j1; j += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u)
          tile_entry<VT, R, NV>(w, xb + indices[j + u] * NT, j + u, acc + u * A);
      }
      for (; j < j1; ++j) tile_entry<VT, R, NV>(w, xb + indices[j] * NT, j, acc);
    }
    float* yg = ytile + (g - g0) * R * NT;
#pragma GCC unroll 32
    for (int i = 0; i < A; ++i) {
      float32x4_t sum = acc[i];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) sum = vaddq_f32(sum, acc[u * A + i]);
      vst1q_f32(yg + 4 * i, sum);
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
          float32x4_t a0 = vdupq_n_f32(0.f), a1 = vdupq_n_f32(0.f);
          for (int64_t n = 0; n + 8 <= ld; n += 8) {
            a0 = vfmaq_f32(a0, vld1q_f32(dr + n), vld1q_f32(xr + n));
            a1 = vfmaq_f32(a1, vld1q_f32(dr + n + 4), vld1q_f32(xr + n + 4));
          }
          dv[j * R + r] = vaddvq_f32(vaddq_f32(a0, a1));
        }
      }
}

#define SE_NEON_KERNELS(VT, vts, R, GEMV, NT, NV, U)                                           \
  SpmmUkernels {                                                                               \
    vts "-spmm-1x" #R "-neon", GEMV, vts "-spmm-" #NT "x" #R "-neon", tile<VT, R, NV, U>, NT, \
        nullptr, nullptr, 0, vts "-sddmm-1x" #R "-neon", sddmm<VT>                                \
  }
// R = 1 adds an 8-token tile: for N <= 8 the 16-wide tile would compute half zeros.
#define SE_NEON_KERNELS_R1(VT, vts)                                                    \
  SpmmUkernels {                                                                       \
    vts "-spmm-1x1-neon", gemv_r1<VT>, vts "-spmm-16x1-neon", tile<VT, 1, 4, 2>, 16,   \
        vts "-spmm-8x1-neon", tile<VT, 1, 2, 4>, 8, vts "-sddmm-1x1-neon", sddmm<VT>     \
  }

const SpmmUkernels kF32[4] = {
    SE_NEON_KERNELS_R1(ValueType::kF32, "f32"),
    SE_NEON_KERNELS(ValueType::kF32, "f32", 2, gemv_r2<ValueType::kF32>, 16, 4, 1),
    SE_NEON_KERNELS(ValueType::kF32, "f32", 4, (gemv_rvec<ValueType::kF32, 4>), 8, 2, 1),
    SE_NEON_KERNELS(ValueType::kF32, "f32", 8, (gemv_rvec<ValueType::kF32, 8>), 8, 2, 1),
};
const SpmmUkernels kBF16[4] = {
    SE_NEON_KERNELS_R1(ValueType::kBF16, "bf16"),
    SE_NEON_KERNELS(ValueType::kBF16, "bf16", 2, gemv_r2<ValueType::kBF16>, 16, 4, 1),
    SE_NEON_KERNELS(ValueType::kBF16, "bf16", 4, (gemv_rvec<ValueType::kBF16, 4>), 8, 2, 1),
    SE_NEON_KERNELS(ValueType::kBF16, "bf16", 8, (gemv_rvec<ValueType::kBF16, 8>), 8, 2, 1),
};

}  // namespace

const SpmmUkernels* spmm_ukernels_neon(ValueType value_type, int64_t block_rows) {
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
const SpmmUkernels* spmm_ukernels_neon(ValueType, int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

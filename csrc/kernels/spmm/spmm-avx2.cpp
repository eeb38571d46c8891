// AVX2 + FMA ukernels. Compiled for every x86-64 build with a file-level target pragma and only
// called after the runtime check in isa.cpp, so the default build runs on any x86-64 CPU.
#include <cstring>
#include <utility>

#include "../common/bf16.h"
#include "spmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX2 1
#endif

#if SPARSE_EXT_COMPILE_AVX2
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "../common/avx2-values.h"

namespace sparse_ext {
namespace {


// R = 1: gather 8 activations per step, values are contiguous. A segment (one 256-column block
// of a row, ~25 entries at 90% sparsity) ends with one masked chunk instead of a scalar tail:
// the loop exits mispredict, and fewer of them per segment measured 18-23% faster at 90-95%.
// Index and value bytes past a segment are read only when they are inside the buffers.
template <ValueType VT>
void gemv_r1(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t safe_end = w.nnz - 8;  // a chunk starting at or before this stays in bounds
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float tail = 0.f;
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 8 <= j1; j += 8) {
        const __m256i i0 = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(indices + j)));
        acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, j), _mm256_i32gather_ps(xb, i0, 4), acc0);
        std::swap(acc0, acc1);
      }
      if (j == j1) continue;
      if (j <= safe_end) {
        const __m256i mask =
            _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(j1 - j)), lane);
        const __m256i i0 = _mm256_and_si256(
            mask, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(indices + j))));
        const __m256 xv = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), xb, i0,
                                                   _mm256_castsi256_ps(mask), 4);
        const __m256 vv = _mm256_and_ps(load8_values<VT>(w.values, j), _mm256_castsi256_ps(mask));
        acc0 = _mm256_fmadd_ps(vv, xv, acc0);
      } else {
        for (; j < j1; ++j) tail += load1_value<VT>(w.values, j) * xb[indices[j]];
      }
    }
    y[g] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

// R = 8: one broadcast activation times one vector of 8 row values per entry.
template <ValueType VT>
void gemv_r8(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, j * 8),
                               _mm256_set1_ps(xb[w.indices[j]]), acc0);
        acc1 = _mm256_fmadd_ps(load8_values<VT>(w.values, j * 8 + 8),
                               _mm256_set1_ps(xb[w.indices[j + 1]]), acc1);
      }
      if (j < j1)
        acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, j * 8),
                               _mm256_set1_ps(xb[w.indices[j]]), acc0);
    }
    _mm256_storeu_ps(y + g * 8, _mm256_add_ps(acc0, acc1));
  }
}

// R = 2 and 4: scalar row values; the activation gather dominates and is shared by the rows.
template <ValueType VT, int R>
void gemv_rsmall(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    float acc[R] = {};
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      for (int32_t j = seg[kb]; j < seg[kb + 1]; ++j) {
        const float xv = xb[w.indices[j]];
        for (int r = 0; r < R; ++r) acc[r] += load1_value<VT>(w.values, j * R + r) * xv;
      }
    }
    for (int r = 0; r < R; ++r) y[g * R + r] = acc[r];
  }
}

// Transposed tile: NV vectors of 8 tokens per row, R rows per entry. U entries in flight feed
// separate accumulators so that R * NV * U >= 8 independent FMA chains hide the FMA latency.
// Accumulators are flat local arrays (GCC spilled a multi-dimensional one to the stack).
template <ValueType VT, int R, int NV>
inline void tile_entry(const SpmmWeight& w, const float* xr, int64_t j, __m256* acc) {
  __m256 xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(xr + 8 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 wv = broadcast_value<VT>(w.values, j * R + r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm256_fmadd_ps(wv, xv[v], acc[r * NV + v]);
  }
}

// Each row group's accumulators stay in registers across all column blocks (a row's entries are
// contiguous in memory), so nothing is reloaded per 256-column segment; the activation tile
// (padded_cols x NT floats, 512 KB for K = 4096, NT = 32) sits in L2. Measured on Zen 3 this
// beats sweeping column blocks outermost with an L1-resident block: with ~25 entries per
// segment at 90% sparsity, the per-segment accumulator reload and loop exits cost more.
template <ValueType VT, int R, int NV, int U>
void tile(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
                  float* ytile) {
  constexpr int NT = 8 * NV, A = R * NV;
  (void)ldx;
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    __m256 acc[U * A];
#pragma GCC unroll 32
    for (int i = 0; i < U * A; ++i) acc[i] = _mm256_setzero_ps();
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
      __m256 sum = acc[i];
#pragma GCC unroll 4
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u * A + i]);
      _mm256_storeu_ps(yg + 8 * i, sum);
    }
  }
}

template <ValueType VT>
void sddmm(const SpmmWeight& w, const float* dyT, const float* xT, int64_t ld, int64_t g0,
           int64_t g1, float* dv) {
  const int64_t R = w.block_rows, KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float* xr = xT + (kb * kSpmmKBlock + w.indices[j]) * ld;
        for (int64_t r = 0; r < R; ++r) {
          const float* dr = dyT + (g * R + r) * ld;
          __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
          int64_t n = 0;
          for (; n + 16 <= ld; n += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + n), _mm256_loadu_ps(xr + n), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + n + 8), _mm256_loadu_ps(xr + n + 8), a1);
          }
          if (n < ld) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + n), _mm256_loadu_ps(xr + n), a0);
          dv[j * R + r] = hsum(_mm256_add_ps(a0, a1));
        }
      }
}

#define SE_AVX2_KERNELS(VT, vts, R, GEMV, NT, NV, U)                                    \
  SpmmUkernels {                                                                        \
    vts "-spmm-1x" #R "-avx2", GEMV, vts "-spmm-" #NT "x" #R "-avx2", tile<VT, R, NV, U>, NT, \
        nullptr, nullptr, 0, vts "-sddmm-1x" #R "-avx2", sddmm<VT>                            \
  }
// R = 1 adds a 16-token tile: for N <= 16 the 32-wide tile would compute half zeros.
#define SE_AVX2_KERNELS_R1(VT, vts)                                                         \
  SpmmUkernels {                                                                         \
    vts "-spmm-1x1-avx2", gemv_r1<VT>, vts "-spmm-32x1-avx2", tile<VT, 1, 4, 2>, 32,          \
        vts "-spmm-16x1-avx2", tile<VT, 1, 2, 4>, 16, vts "-sddmm-1x1-avx2", sddmm<VT>           \
  }

const SpmmUkernels kF32[4] = {
    SE_AVX2_KERNELS_R1(ValueType::kF32, "f32"),
    SE_AVX2_KERNELS(ValueType::kF32, "f32", 2, (gemv_rsmall<ValueType::kF32, 2>), 16, 2, 2),
    SE_AVX2_KERNELS(ValueType::kF32, "f32", 4, (gemv_rsmall<ValueType::kF32, 4>), 16, 2, 1),
    SE_AVX2_KERNELS(ValueType::kF32, "f32", 8, gemv_r8<ValueType::kF32>, 8, 1, 1),
};
const SpmmUkernels kBF16[4] = {
    SE_AVX2_KERNELS_R1(ValueType::kBF16, "bf16"),
    SE_AVX2_KERNELS(ValueType::kBF16, "bf16", 2, (gemv_rsmall<ValueType::kBF16, 2>), 16, 2, 2),
    SE_AVX2_KERNELS(ValueType::kBF16, "bf16", 4, (gemv_rsmall<ValueType::kBF16, 4>), 16, 2, 1),
    SE_AVX2_KERNELS(ValueType::kBF16, "bf16", 8, gemv_r8<ValueType::kBF16>, 8, 1, 1),
};

}  // namespace

const SpmmUkernels* spmm_ukernels_avx2(ValueType value_type, int64_t block_rows) {
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

#pragma GCC pop_options
#else

namespace sparse_ext {
const SpmmUkernels* spmm_ukernels_avx2(ValueType, int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

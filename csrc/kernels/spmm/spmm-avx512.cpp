// AVX-512 (F + BW + VL + DQ) ukernels. Compiled for every x86-64 build with a file-level target
// pragma and only called after the runtime check in isa.cpp. Against the AVX2 file: zmm tiles of
// 16 tokens per vector (32 registers hold twice the accumulators), and k-masked tails instead of
// scalar loops, so no index or value past a segment is read.
#include <cstring>
#include <utility>

#include "../common/bf16.h"
#include "spmm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX512 1
#endif

#if SPARSE_EXT_COMPILE_AVX512
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 reports its own _mm512_undefined_* inside the cast / convert intrinsics as "(may be) used
// uninitialized": a false positive of its headers, not of this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "../common/avx512-values.h"

namespace sparse_ext {
namespace {

// R = 1: gather 16 activations per step; a segment's last chunk is one masked gather.
template <ValueType VT>
void gemv_r1(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 16 <= j1; j += 16) {
        const __m512i i0 = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(indices + j)));
        acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j), _mm512_i32gather_ps(i0, xb, 4),
                               acc0);
        std::swap(acc0, acc1);
      }
      if (j < j1) {
        const __mmask16 m = first_lanes(j1 - j);
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, indices + j));
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, i0, xb, 4);
        acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j, m), xv, acc0);
      }
    }
    y[g] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
}

// R = 8: two entries per zmm (their 8 row values each are contiguous), each half times its own
// broadcast activation; the halves are added at the end.
template <ValueType VT>
void gemv_r8(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        const __m512 xv = _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm256_set1_ps(xb[w.indices[j]])),
            _mm256_set1_ps(xb[w.indices[j + 1]]), 1);
        acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j * 8), xv, acc0);
        std::swap(acc0, acc1);
      }
      if (j < j1)  // the high half is left alone (0 * inf would be NaN there)
        acc0 = _mm512_mask3_fmadd_ps(load16_values<VT>(w.values, j * 8, 0x00FF),
                                     _mm512_set1_ps(xb[w.indices[j]]), acc0, 0x00FF);
    }
    const __m512 sum = _mm512_add_ps(acc0, acc1);
    _mm256_storeu_ps(y + g * 8, _mm256_add_ps(_mm512_castps512_ps256(sum),
                                              _mm512_extractf32x8_ps(sum, 1)));
  }
}

// R = 2 and 4: scalar row values; the activation load dominates and is shared by the rows.
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

// Transposed tile: NV vectors of 16 tokens per row, R rows per entry, U entries in flight on
// separate accumulators (R * NV * U >= 8 chains hide the FMA latency; at most 16 of the 32 zmm).
template <ValueType VT, int R, int NV>
inline void tile_entry(const SpmmWeight& w, const float* xr, int64_t j, __m512* acc) {
  __m512 xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 wv = broadcast16_value<VT>(w.values, j * R + r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(wv, xv[v], acc[r * NV + v]);
  }
}

// Accumulators stay in registers across a row group's column blocks, as in the AVX2 tile (its
// comment has the measurement); the activation tile is padded_cols x NT floats.
template <ValueType VT, int R, int NV, int U>
void tile(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
          float* ytile) {
  constexpr int NT = 16 * NV, A = R * NV;
  (void)ldx;
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[U * A];
#pragma GCC unroll 32
    for (int i = 0; i < U * A; ++i) acc[i] = _mm512_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    int64_t j = seg[0];
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = xT + kb * kSpmmKBlock * NT;
      const int64_t j1 = seg[kb + 1];
      for (; j + U <= j1; j += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u)
          tile_entry<VT, R, NV>(w, xb + indices[j + u] * NT, j + u, acc + u * A);
      }
      for (; j < j1; ++j) tile_entry<VT, R, NV>(w, xb + indices[j] * NT, j, acc);
    }
    float* yg = ytile + (g - g0) * R * NT;
#pragma GCC unroll 32
    for (int i = 0; i < A; ++i) {
      __m512 sum = acc[i];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u * A + i]);
      _mm512_storeu_ps(yg + 16 * i, sum);
    }
  }
}

// dv[j * R + r] = <dyT row, xT row> over ld tokens (ld a multiple of 8): 32 tokens per step, then
// one masked step for the last 1..31.
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
          __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
          int64_t n = 0;
          for (; n + 32 <= ld; n += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n), _mm512_loadu_ps(xr + n), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n + 16), _mm512_loadu_ps(xr + n + 16), a1);
          }
          if (n + 16 <= ld) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n), _mm512_loadu_ps(xr + n), a0);
            n += 16;
          }
          if (n < ld) {
            const __mmask16 m = first_lanes(ld - n);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dr + n), _mm512_maskz_loadu_ps(m, xr + n),
                                 a1);
          }
          dv[j * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        }
      }
}

#define SE_AVX512_KERNELS(VT, vts, R, GEMV, NT, NV, U)                                        \
  SpmmUkernels {                                                                              \
    vts "-spmm-1x" #R "-avx512", GEMV, vts "-spmm-" #NT "x" #R "-avx512", tile<VT, R, NV, U>, NT, \
        nullptr, nullptr, 0, vts "-sddmm-" #R "-avx512", sddmm<VT>                               \
  }
// R = 1: a 64-token tile, and a 16-token one for N <= 16 (the decode-batch sizes).
#define SE_AVX512_KERNELS_R1(VT, vts)                                                           \
  SpmmUkernels {                                                                             \
    vts "-spmm-1x1-avx512", gemv_r1<VT>, vts "-spmm-64x1-avx512", tile<VT, 1, 4, 2>, 64,          \
        vts "-spmm-16x1-avx512", tile<VT, 1, 1, 8>, 16, vts "-sddmm-1-avx512", sddmm<VT>           \
  }

const SpmmUkernels kF32[4] = {
    SE_AVX512_KERNELS_R1(ValueType::kF32, "f32"),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 2, (gemv_rsmall<ValueType::kF32, 2>), 32, 2, 2),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 4, (gemv_rsmall<ValueType::kF32, 4>), 32, 2, 1),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 8, gemv_r8<ValueType::kF32>, 16, 1, 1),
};
const SpmmUkernels kBF16[4] = {
    SE_AVX512_KERNELS_R1(ValueType::kBF16, "bf16"),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 2, (gemv_rsmall<ValueType::kBF16, 2>), 32, 2, 2),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 4, (gemv_rsmall<ValueType::kBF16, 4>), 32, 2, 1),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 8, gemv_r8<ValueType::kBF16>, 16, 1, 1),
};

}  // namespace

const SpmmUkernels* spmm_ukernels_avx512(ValueType value_type, int64_t block_rows) {
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
const SpmmUkernels* spmm_ukernels_avx512(ValueType, int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

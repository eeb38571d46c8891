// Expert weight loads (fp32 or bf16, keyed by ValueType) for the MoE AVX-512 kernel files,
// moe-avx512.cpp and moe-gemm-avx512.cpp: the shared value loads of common/avx512-values.h under
// the MoE weight type. Same rules as avx512-values.h: include it only inside an AVX-512 file's
// target pragma region, after all standard headers (anonymous namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../common/avx512-values.h"
#include "moe-weights.h"  // kWBytes

namespace sparse_ext {
namespace {

// 16 consecutive weights from index i as fp32; lanes outside `mask` are zero and not read.
template <ValueType WT>
inline __m512 load16_weight(const void* w, int64_t i, __mmask16 mask = 0xFFFF) {
  return load16_values<WT>(w, i, mask);
}

// The first n lanes of 32 (n <= 32), for 16-bit masked loads.
inline __mmask32 first_lanes32(int64_t n) {
  return n >= 32 ? static_cast<__mmask32>(~0u) : static_cast<__mmask32>((1u << n) - 1u);
}

// 32 bf16 weights from index i (masked: lanes outside `mask` are zero and not read) as two fp32
// vectors without shuffles: each dword holds an even-indexed weight in its low half and the next
// odd one in its high half, so a shift gives the even weights and a mask the odd ones. The x
// operand must come in the same split order (even_odd_order).
inline void load32_bf16_split(const uint16_t* w, __mmask32 mask, __m512* even, __m512* odd) {
  const __m512i v = _mm512_maskz_loadu_epi16(mask, w);
  *even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  *odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// dst float [round_up(K, 32)]: x[0, K) per 32-block as [x0, x2, ..., x30, x1, x3, ..., x31] (the
// order load32_bf16_split yields), zero past K.
inline void even_odd_order(const float* x, int64_t K, float* dst) {
  const __m512i even_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                             28, 30);
  const __m512i odd_idx = _mm512_add_epi32(even_idx, _mm512_set1_epi32(1));
  for (int64_t c = 0; c < K; c += 32) {
    const __m512 lo = _mm512_maskz_loadu_ps(first_lanes(std::min<int64_t>(16, K - c)), x + c);
    const __m512 hi = c + 16 < K
                          ? _mm512_maskz_loadu_ps(first_lanes(std::min<int64_t>(16, K - c - 16)),
                                                  x + c + 16)
                          : _mm512_setzero_ps();
    _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(lo, even_idx, hi));
    _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(lo, odd_idx, hi));
  }
}

// [sum(a), sum(b), sum(c), sum(d)]: one transpose-add tree instead of four full reductions.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] and the same for c, d.
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  // Per lane: [a, b, c, d] partial sums.
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

}  // namespace
}  // namespace sparse_ext

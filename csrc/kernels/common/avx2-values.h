// AVX2 helpers shared by the *-avx2.cpp kernel files: loading fp32 / bf16 values and horizontal
// sums. Include it only inside an AVX2 file's `#pragma GCC target("avx2,fma")` region, after all
// standard headers: everything is in an anonymous namespace, so each file gets its own copy
// compiled for AVX2 and no AVX2 code can be picked by the linker for scalar callers. The standard
// and project headers it includes must already have been included before the pragma (they are
// then skipped here); values.h only adds anonymous-namespace code, so it may be first seen here.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "bf16.h"
#include "value_type.h"
#include "values.h"  // load1_value

namespace sparse_ext {
namespace {

// 8 consecutive values from index i, widened to fp32 (bf16: the 16 bits become the high half).
template <ValueType VT>
inline __m256 load8_values(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(values) + i);
  } else {
    const __m128i raw =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
}

template <ValueType VT>
inline __m256 broadcast_value(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return _mm256_broadcast_ss(static_cast<const float*>(values) + i);
  } else {
    const int32_t bits = static_cast<int32_t>(static_cast<const uint16_t*>(values)[i]) << 16;
    return _mm256_castsi256_ps(_mm256_set1_epi32(bits));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace sparse_ext

// AVX-512 helpers shared by the *-avx512.cpp kernel files: loading fp32 / bf16 values (k-masked
// for tails) and broadcasting one. Same rules as avx2-values.h: include it only inside an AVX-512
// file's target pragma region, after the standard and project headers; everything is in an
// anonymous namespace so no AVX-512 code can be picked by the linker for other callers.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "bf16.h"
#include "value_type.h"
#include "values.h"  // load1_value

namespace sparse_ext {
namespace {

// 16 consecutive values from index i widened to fp32; lanes outside `mask` are zero and their
// memory is not read (bf16: the 16 bits become the high half).
template <ValueType VT>
inline __m512 load16_values(const void* values, int64_t i, __mmask16 mask = 0xFFFF) {
  if constexpr (VT == ValueType::kF32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(values) + i);
  } else {
    const __m256i raw = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(values) + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
}

template <ValueType VT>
inline __m512 broadcast16_value(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return _mm512_set1_ps(static_cast<const float*>(values)[i]);
  } else {
    const int32_t bits = static_cast<int32_t>(static_cast<const uint16_t*>(values)[i]) << 16;
    return _mm512_castsi512_ps(_mm512_set1_epi32(bits));
  }
}

// The first n (< 16) lanes.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

}  // namespace
}  // namespace sparse_ext

// NEON helpers shared by the *-neon.cpp kernel files: loading fp32 / bf16 values as floats.
// aarch64 only (NEON and FMA are baseline there, so no target pragma is involved).
#pragma once

#if defined(__aarch64__)
#include <arm_neon.h>

#include <cstdint>

#include "bf16.h"
#include "value_type.h"
#include "values.h"  // load1_value

namespace sparse_ext {
namespace {

// 4 consecutive values as floats (bf16 widens by a 16-bit left shift).
template <ValueType VT>
inline float32x4_t load4_values(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return vld1q_f32(static_cast<const float*>(values) + i);
  } else {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(values) + i), 16));
  }
}

// 8 consecutive values as two float vectors; bf16 is one 128-bit load widened by two shifts
// (exact), half the instructions of two 64-bit loads.
template <ValueType VT>
inline float32x4x2_t load8_values(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    const float* p = static_cast<const float*>(values) + i;
    return {{vld1q_f32(p), vld1q_f32(p + 4)}};
  } else {
    const uint16x8_t v = vld1q_u16(static_cast<const uint16_t*>(values) + i);
    return {{vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16)),
             vreinterpretq_f32_u32(vshll_high_n_u16(v, 16))}};
  }
}

template <ValueType VT>
inline float32x4_t broadcast_value(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return vld1q_dup_f32(static_cast<const float*>(values) + i);
  } else {
    return vreinterpretq_f32_u32(
        vdupq_n_u32(static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16));
  }
}

}  // namespace
}  // namespace sparse_ext
#endif

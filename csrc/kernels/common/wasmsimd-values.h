// WebAssembly SIMD128 helpers shared by the *-wasmsimd.cpp kernel files: fp32 / bf16 values as
// float vectors, a multiply-add and a horizontal sum. Compiled only when the build targets SIMD128
// (-msimd128 defines __wasm_simd128__; no per-function target switch exists on wasm).
#pragma once

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>

#include <cstdint>

#include "bf16.h"
#include "value_type.h"
#include "values.h"  // load1_value

namespace sparse_ext {
namespace {

// SIMD128 has no fused multiply-add (relaxed-simd's is not in the baseline): acc + a * b, rounded
// twice, like the scalar reference's `acc += a * b`.
inline v128_t muladd(v128_t acc, v128_t a, v128_t b) {
  return wasm_f32x4_add(acc, wasm_f32x4_mul(a, b));
}

inline float hsum(v128_t v) {
  const v128_t pairs = wasm_f32x4_add(v, wasm_i32x4_shuffle(v, v, 2, 3, 0, 1));
  const v128_t all = wasm_f32x4_add(pairs, wasm_i32x4_shuffle(pairs, pairs, 1, 0, 3, 2));
  return wasm_f32x4_extract_lane(all, 0);
}

// 4 consecutive values as floats (bf16 widens to the high half of a 32-bit lane).
template <ValueType VT>
inline v128_t load4_values(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return wasm_v128_load(static_cast<const float*>(values) + i);
  } else {
    return wasm_i32x4_shl(wasm_u32x4_load16x4(static_cast<const uint16_t*>(values) + i), 16);
  }
}

template <ValueType VT>
inline v128_t broadcast_value(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return wasm_v128_load32_splat(static_cast<const float*>(values) + i);
  } else {
    return wasm_i32x4_splat(
        static_cast<int32_t>(static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16));
  }
}

}  // namespace
}  // namespace sparse_ext
#endif

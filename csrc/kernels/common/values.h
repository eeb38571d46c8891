// One stored weight value (fp32 or bf16) as a float: the scalar load every family's kernels share.
// In an anonymous namespace so that each file, scalar or vector, gets its own copy (a copy compiled
// under an AVX2 target pragma must never be picked by the linker for scalar code).
#pragma once

#include <cstdint>

#include "bf16.h"
#include "value_type.h"

namespace sparse_ext {
namespace {

template <ValueType VT>
inline float load1_value(const void* values, int64_t i) {
  if constexpr (VT == ValueType::kF32) {
    return static_cast<const float*>(values)[i];
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(values)[i]);
  }
}

}  // namespace
}  // namespace sparse_ext

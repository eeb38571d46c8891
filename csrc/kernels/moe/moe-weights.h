// The size of a stored expert weight: ISA-free, for the per-ISA weight-load headers
// (moe-avx2-weights.h, moe-avx512-weights.h).
#pragma once

#include <cstdint>

#include "../common/value_type.h"
#include "moe.h"

namespace sparse_ext {
namespace {

// Bytes per stored weight.
template <ValueType WT>
constexpr int64_t kWBytes = WT == ValueType::kF32 ? 4 : 2;

}  // namespace
}  // namespace sparse_ext

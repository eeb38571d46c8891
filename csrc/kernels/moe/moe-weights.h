// The MoE weight type as the shared value type of common/*-values.h, and its size: ISA-free, for
// the per-ISA weight-load headers (moe-avx2-weights.h, moe-avx512-weights.h).
#pragma once

#include <cstdint>

#include "../spmm/spmm.h"  // ValueType
#include "moe.h"

namespace sparse_ext {
namespace {

template <MoeWeightType WT>
constexpr ValueType kWeightValueType =
    WT == MoeWeightType::kF32 ? ValueType::kF32 : ValueType::kBF16;

// Bytes per stored weight.
template <MoeWeightType WT>
constexpr int64_t kWBytes = WT == MoeWeightType::kF32 ? 4 : 2;

}  // namespace
}  // namespace sparse_ext

// Expert weight loads (fp32 or bf16, keyed by ValueType) for the MoE AVX2 kernel files,
// moe-avx2.cpp and moe-gemm-avx2.cpp: the shared value loads of common/avx2-values.h under the MoE
// weight type. Same rules as avx2-values.h: include it only inside an AVX2 file's
// `#pragma GCC target("avx2,fma")` region, after all standard headers (anonymous namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "../common/avx2-values.h"
#include "moe-weights.h"  // kWBytes

namespace sparse_ext {
namespace {

// 8 consecutive weights from index i, as fp32.
template <ValueType WT>
inline __m256 load8_weight(const void* w, int64_t i) {
  return load8_values<WT>(w, i);
}

template <ValueType WT>
inline float load1_weight(const void* w, int64_t i) {
  return load1_value<WT>(w, i);
}

}  // namespace
}  // namespace sparse_ext

// How a family's stored weight values are laid out in memory; every family's weight struct, ukernel
// table and registry entry is keyed by it. kF64 exists only for the scalar double-precision paths
// the ATen glue uses for gradient checks.
#pragma once

namespace sparse_ext {

enum class ValueType : int { kF32 = 0, kBF16 = 1, kF64 = 2 };

}  // namespace sparse_ext

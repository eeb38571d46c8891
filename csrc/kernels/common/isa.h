// Runtime instruction-set selection shared by every kernel family.
// The scalar reference path is always compiled; vector paths are compiled with per-file target
// pragmas and picked once from the CPU's features (or forced by SPARSE_EXT_ISA).
#pragma once

#include <cstdint>

namespace sparse_ext {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kNeon = 2 };

const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "neon"; returns false for any other text.
bool isa_from_name(const char* name, Isa* out);

// Whether this build contains kernels for `isa` and the running CPU can execute them.
bool isa_supported(Isa isa);

// The ISA every kernel uses. Initialized from SPARSE_EXT_ISA (if set and supported) or from the
// best supported ISA; changed only through set_active_isa.
Isa active_isa();
// Returns false (and changes nothing) when `isa` is not supported here.
bool set_active_isa(Isa isa);
// Error text from a SPARSE_EXT_ISA value that could not be honoured, or nullptr.
const char* isa_env_error();

}  // namespace sparse_ext

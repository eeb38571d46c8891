// Runtime instruction-set selection shared by every kernel family.
// The scalar reference path is always compiled; vector paths are compiled with per-file target
// pragmas and picked once from the CPU's features (or forced by SPARSE_EXT_ISA). WebAssembly has
// no run-time feature probe: wasmsimd is supported when the whole build targets SIMD128.
#pragma once

#include <cstdint>

namespace sparse_ext {

// avx512 means AVX-512 F + BW + VL + DQ with AVX2 + FMA (every AVX-512 server CPU has all of them);
// the optional extensions are feature bits (cpu_has_feature), not tiers.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kNeon = 2, kAvx512 = 3, kWasmSimd = 4 };

// Every tier, for registries and tests to expand.
constexpr Isa kAllIsas[] = {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kNeon, Isa::kWasmSimd};

const char* isa_name(Isa isa);
// Parses "scalar" | "avx2" | "avx512" | "neon" | "wasmsimd"; returns false for any other text.
bool isa_from_name(const char* name, Isa* out);

// The next tier down: avx512 -> avx2 -> scalar, neon -> scalar, wasmsimd -> scalar (scalar is the
// last).
Isa isa_fallback(Isa isa);

// The first non-null lookup(tier) along `isa`'s fallback chain, so that a family without a
// ukernel for the active tier runs the best tier below it rather than the scalar reference.
template <typename Lookup>
auto lookup_along_chain(Isa isa, Lookup lookup) -> decltype(lookup(isa)) {
  for (;;) {
    if (auto found = lookup(isa)) return found;
    if (isa == Isa::kScalar) return nullptr;
    isa = isa_fallback(isa);
  }
}

// Optional extensions for kernels that need more than their tier: x86 "avx512_bf16",
// "avx512_fp16", "avx_vnni", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"; aarch64 Linux
// "bf16" (FEAT_BF16). False for any other name or architecture.
bool cpu_has_feature(const char* name);

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

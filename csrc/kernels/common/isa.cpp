#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace sparse_ext {
namespace {

bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
#else
  return false;
#endif
}

std::string& env_error_text() {
  static std::string text;
  return text;
}

Isa best_isa() {
  if (isa_supported(Isa::kAvx512)) return Isa::kAvx512;
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  if (isa_supported(Isa::kNeon)) return Isa::kNeon;
  if (isa_supported(Isa::kWasmSimd)) return Isa::kWasmSimd;
  return Isa::kScalar;
}

Isa initial_isa() {
  const char* env = std::getenv("SPARSE_EXT_ISA");
  if (env == nullptr || env[0] == '\0') return best_isa();
  Isa requested;
  if (!isa_from_name(env, &requested)) {
    env_error_text() = std::string("SPARSE_EXT_ISA='") + env +
                       "' is not one of scalar, avx2, avx512, neon, wasmsimd; using the best supported ISA";
    return best_isa();
  }
  if (!isa_supported(requested)) {
    env_error_text() = std::string("SPARSE_EXT_ISA='") + env +
                       "' is not supported by this CPU or build; using the best supported ISA";
    return best_isa();
  }
  return requested;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_isa())};
  return slot;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kNeon: return "neon";
    case Isa::kWasmSimd: return "wasmsimd";
  }
  return "unknown";
}

Isa isa_fallback(Isa isa) {
  return isa == Isa::kAvx512 ? Isa::kAvx2 : Isa::kScalar;
}

bool cpu_has_feature(const char* name) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  // CPUID leaf 7: sub-leaf 0 EDX / ECX and sub-leaf 1 EAX. The OS must also save the state the
  // extension uses: zmm (XCR0 bits 5-7) for AVX-512, tiles (XCR0 bits 17-18) for AMX.
  unsigned a0 = 0, b0 = 0, c0 = 0, d0 = 0, a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  if (!__get_cpuid_count(7, 0, &a0, &b0, &c0, &d0)) return false;
  __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
  const bool zmm = isa_supported(Isa::kAvx512);
  unsigned a = 0, b = 0, c = 0, d = 0, xcr0_lo = 0, xcr0_hi = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) && (c >> 27 & 1))  // OSXSAVE: xgetbv is available
    __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool tiles = (xcr0_lo & (3u << 17)) == (3u << 17);
  const std::string n(name);
  if (n == "avx512_bf16") return zmm && (a1 >> 5 & 1);
  if (n == "avx512_fp16") return zmm && (d0 >> 23 & 1);
  if (n == "avx512_vnni") return zmm && (c0 >> 11 & 1);
  if (n == "avx_vnni") return isa_supported(Isa::kAvx2) && (a1 >> 4 & 1);
  if (n == "amx_tile") return tiles && (d0 >> 24 & 1);
  if (n == "amx_bf16") return tiles && (d0 >> 22 & 1);
  if (n == "amx_int8") return tiles && (d0 >> 25 & 1);
#elif defined(__aarch64__) && defined(__linux__)
  // FEAT_BF16 (BFDOT, BFMMLA, BFCVT): HWCAP2_BF16, bit 14 of AT_HWCAP2 (the kernel's ABI value,
  // spelled out for libcs whose headers predate it).
  if (std::strcmp(name, "bf16") == 0) return (getauxval(AT_HWCAP2) >> 14) & 1;
#else
  (void)name;
#endif
  return false;
}

bool isa_from_name(const char* name, Isa* out) {
  if (std::strcmp(name, "scalar") == 0) { *out = Isa::kScalar; return true; }
  if (std::strcmp(name, "avx2") == 0) { *out = Isa::kAvx2; return true; }
  if (std::strcmp(name, "avx512") == 0) { *out = Isa::kAvx512; return true; }
  if (std::strcmp(name, "neon") == 0) { *out = Isa::kNeon; return true; }
  if (std::strcmp(name, "wasmsimd") == 0) { *out = Isa::kWasmSimd; return true; }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return cpu_has_avx2_fma();
    case Isa::kAvx512: return cpu_has_avx512();
    case Isa::kNeon:
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
      return true;
#else
      return false;
#endif
    case Isa::kWasmSimd:
#if defined(__wasm_simd128__)
      return true;
#else
      return false;
#endif
  }
  return false;
}

Isa active_isa() { return static_cast<Isa>(active_slot().load(std::memory_order_relaxed)); }

bool set_active_isa(Isa isa) {
  if (!isa_supported(isa)) return false;
  active_slot().store(static_cast<int>(isa), std::memory_order_relaxed);
  return true;
}

const char* isa_env_error() {
  active_slot();  // make sure the environment was read
  return env_error_text().empty() ? nullptr : env_error_text().c_str();
}

}  // namespace sparse_ext

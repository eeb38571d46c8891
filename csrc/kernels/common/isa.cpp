#include "isa.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace sparse_ext {
namespace {

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
  if (isa_supported(Isa::kAvx2)) return Isa::kAvx2;
  if (isa_supported(Isa::kNeon)) return Isa::kNeon;
  return Isa::kScalar;
}

Isa initial_isa() {
  const char* env = std::getenv("SPARSE_EXT_ISA");
  if (env == nullptr || env[0] == '\0') return best_isa();
  Isa requested;
  if (!isa_from_name(env, &requested)) {
    env_error_text() = std::string("SPARSE_EXT_ISA='") + env +
                       "' is not one of scalar, avx2, neon; using the best supported ISA";
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
    case Isa::kNeon: return "neon";
  }
  return "unknown";
}

bool isa_from_name(const char* name, Isa* out) {
  if (std::strcmp(name, "scalar") == 0) { *out = Isa::kScalar; return true; }
  if (std::strcmp(name, "avx2") == 0) { *out = Isa::kAvx2; return true; }
  if (std::strcmp(name, "neon") == 0) { *out = Isa::kNeon; return true; }
  return false;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return cpu_has_avx2_fma();
    case Isa::kNeon:
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
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

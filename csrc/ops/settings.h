// Named, typed knobs of the ATen glue (the crossovers no measurement has replaced yet, and the CUDA
// N:M path override). Each is read from its environment variable once, at load; afterwards only
// set_setting changes it (sparse_ext.config on the Python side), so a value never depends on when
// the environment was read.
#pragma once

#include <cstdint>
#include <string>

namespace sparse_ext {

enum class Setting : int {
  kConvStreamMb = 0,  // 1x1 conv outputs of at least this many MiB use non-temporal stores
  kMoeGemvRows = 1,   // MoE segments of at most this many rows use the GEMV ukernels (-1: the
                      // tier's measured crossover)
  kNmCudaPath = 2,    // CUDA N:M forward path: index into its choices (auto, cores, ...)
};
constexpr int kSettingCount = 3;

struct SettingInfo {
  const char* name;         // the Python name
  const char* env;          // the environment variable read at load
  int64_t default_value;
  int64_t min_value, max_value;
  const char* choices;      // comma-separated names for an enumerated setting, else nullptr
};

const SettingInfo& setting_info(Setting s);
int64_t setting(Setting s);
// Returns "" and sets the value when it is in range, else a message naming the setting and the
// accepted values (and changes nothing).
std::string set_setting(Setting s, int64_t value);
// Messages about environment values that were ignored at load ("" when none).
std::string settings_env_errors();

}  // namespace sparse_ext

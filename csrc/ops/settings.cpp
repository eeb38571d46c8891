// The settings table and its environment parsing (see settings.h).
#include "settings.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace sparse_ext {
namespace {

// Measured reasons for the defaults live where each is used (conv_ops.cpp, moe_ops.cpp,
// cuda/nm_cuda.cpp).
const SettingInfo kInfo[kSettingCount] = {
    {"conv_stream_mb", "SPARSE_EXT_CONV_STREAM_MB", 4, 0, int64_t(1) << 20, nullptr},
    {"moe_gemv_rows", "SPARSE_EXT_MOE_GEMV_ROWS", -1, -1, int64_t(1) << 30, nullptr},
    {"nm_cuda_path", "SPARSE_EXT_NM_CUDA_PATH", 0, 0, 3, "auto,cores,cusparselt,dense"},
};

// Index of `text` in a comma-separated list, or -1.
int64_t choice_index(const char* choices, const std::string& text) {
  std::stringstream list(choices);
  std::string item;
  for (int64_t i = 0; std::getline(list, item, ','); ++i)
    if (item == text) return i;
  return -1;
}

struct Store {
  std::atomic<int64_t> values[kSettingCount];
  std::string env_errors;
  Store() {
    for (int i = 0; i < kSettingCount; ++i) {
      const SettingInfo& info = kInfo[i];
      values[i].store(info.default_value);
      const char* env = std::getenv(info.env);
      if (env == nullptr || env[0] == '\0') continue;
      int64_t v = -1;
      if (info.choices != nullptr) {
        v = choice_index(info.choices, env);
      } else {
        char* end = nullptr;
        const long long parsed = std::strtoll(env, &end, 10);
        if (end != env && *end == '\0') v = parsed;
      }
      if (v >= info.min_value && v <= info.max_value) {
        values[i].store(v);
      } else {
        env_errors += std::string(info.env) + "='" + env + "' ignored: expected " +
                      (info.choices != nullptr ? std::string("one of ") + info.choices
                                               : "an integer in [" +
                                                     std::to_string(info.min_value) + ", " +
                                                     std::to_string(info.max_value) + "]") +
                      "; using " + std::to_string(info.default_value) + "\n";
      }
    }
  }
};

Store& store() {
  static Store s;
  return s;
}

}  // namespace

const SettingInfo& setting_info(Setting s) { return kInfo[static_cast<int>(s)]; }

int64_t setting(Setting s) {
  return store().values[static_cast<int>(s)].load(std::memory_order_relaxed);
}

std::string set_setting(Setting s, int64_t value) {
  const SettingInfo& info = setting_info(s);
  if (value < info.min_value || value > info.max_value)
    return std::string(info.name) + " must be in [" + std::to_string(info.min_value) + ", " +
           std::to_string(info.max_value) + "], got " + std::to_string(value);
  store().values[static_cast<int>(s)].store(value, std::memory_order_relaxed);
  return std::string();
}

std::string settings_env_errors() { return store().env_errors; }

}  // namespace sparse_ext

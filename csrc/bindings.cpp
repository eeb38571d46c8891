// Python-side controls that are not tensor ops: ISA selection, the plan cache and the ukernel
// registry.
#include <torch/extension.h>

#include "kernels/common/isa.h"
#include "kernels/common/plan_cache.h"
#include "kernels/spmm/spmm.h"
#include "kernels/conv/conv.h"
#include "kernels/moe/moe.h"
#include "ops/settings.h"

namespace {

sparse_ext::Isa parse_isa(const std::string& name) {
  sparse_ext::Isa isa;
  TORCH_CHECK(sparse_ext::isa_from_name(name.c_str(), &isa), "unknown ISA '", name,
              "': expected one of scalar, avx2, neon");
  return isa;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_isa", [] { return std::string(sparse_ext::isa_name(sparse_ext::active_isa())); });
  m.def("set_isa", [](const std::string& name) {
    const sparse_ext::Isa isa = parse_isa(name);
    TORCH_CHECK(sparse_ext::set_active_isa(isa), "ISA '", name,
                "' is not supported by this CPU or build");
  });
  m.def("supported_isas", [] {
    std::vector<std::string> names;
    for (auto isa : sparse_ext::kAllIsas)
      if (sparse_ext::isa_supported(isa)) names.emplace_back(sparse_ext::isa_name(isa));
    return names;
  });
  m.def("cpu_features", [] {
    std::vector<std::string> names;
    for (const char* f : {"avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile",
                          "amx_bf16", "amx_int8"})
      if (sparse_ext::cpu_has_feature(f)) names.emplace_back(f);
    return names;
  });
  m.def("isa_env_error", [] {
    const char* e = sparse_ext::isa_env_error();
    return e == nullptr ? std::string() : std::string(e);
  });
  // ---- settings: (name, env, default, min, max, choices) rows and get/set by name ----
  m.def("settings", [] {
    std::vector<std::tuple<std::string, std::string, int64_t, int64_t, int64_t, std::string>> rows;
    for (int i = 0; i < sparse_ext::kSettingCount; ++i) {
      const auto& s = sparse_ext::setting_info(static_cast<sparse_ext::Setting>(i));
      rows.emplace_back(s.name, s.env, s.default_value, s.min_value, s.max_value,
                        s.choices != nullptr ? s.choices : "");
    }
    return rows;
  });
  m.def("get_setting", [](int64_t i) {
    TORCH_CHECK(i >= 0 && i < sparse_ext::kSettingCount, "no setting ", i);
    return sparse_ext::setting(static_cast<sparse_ext::Setting>(i));
  });
  m.def("set_setting", [](int64_t i, int64_t value) {
    TORCH_CHECK(i >= 0 && i < sparse_ext::kSettingCount, "no setting ", i);
    const std::string error = sparse_ext::set_setting(static_cast<sparse_ext::Setting>(i), value);
    TORCH_CHECK_VALUE(error.empty(), error);
  });
  m.def("settings_env_errors", &sparse_ext::settings_env_errors);
  m.def("set_plan_tuning", &sparse_ext::set_plan_tuning_enabled);
  m.def("plan_tuning", &sparse_ext::plan_tuning_enabled);
  m.def("set_plan_cache_file", &sparse_ext::set_plan_cache_file);
  m.def("plan_cache_file", &sparse_ext::plan_cache_file);
  m.def("plan_cache_clear", &sparse_ext::plan_cache_clear);
  m.def("plan_lookup", &sparse_ext::plan_lookup);
  m.def("plan_cache_stats", [] {
    const sparse_ext::PlanCacheStats s = sparse_ext::plan_cache_stats();
    return std::make_tuple(s.hits, s.timed, s.defaults, s.entries, s.last_error);
  });
  m.def("spmm_registry", [] {
    std::vector<std::tuple<std::string, std::string, int64_t, std::string, std::string, std::string>> rows;
    for (int i = 0; i < sparse_ext::spmm_registry_size(); ++i) {
      const auto& e = sparse_ext::spmm_registry_entry(i);
      rows.emplace_back(sparse_ext::isa_name(e.isa),
                        e.value_type == sparse_ext::ValueType::kF32 ? "float32" : "bfloat16",
                        e.block_rows, e.kernels->gemv_name, e.kernels->tile_name,
                        e.kernels->narrow_tile_name ? e.kernels->narrow_tile_name : "");
    }
    return rows;
  });
  // ---- sparse conv: (isa, block_rows, 1x1 ukernel, MR, kxk ukernel) ----
  m.def("conv_registry", [] {
    std::vector<std::tuple<std::string, int64_t, std::string, int64_t, std::string>> rows;
    for (int i = 0; i < sparse_ext::conv_registry_size(); ++i) {
      const auto& e = sparse_ext::conv_registry_entry(i);
      rows.emplace_back(sparse_ext::isa_name(e.isa), e.block_rows, e.kernels->conv1x1_name,
                        e.kernels->mr, e.kernels->kxk_name != nullptr ? e.kernels->kxk_name : "");
    }
    return rows;
  });
  // ---- MoE: the expert ukernel registry (isa, weight dtype, gemv, silu and gemm names) ----
  m.def("moe_registry", [] {
    std::vector<std::tuple<std::string, std::string, std::string, std::string, std::string>> rows;
    for (int i = 0; i < sparse_ext::moe_registry_size(); ++i) {
      const auto& e = sparse_ext::moe_registry_entry(i);
      rows.emplace_back(sparse_ext::isa_name(e.isa),
                        e.weight_type == sparse_ext::ValueType::kF32 ? "float32" : "bfloat16",
                        e.kernels->gemv_name, e.kernels->silu_name, e.kernels->gemm_name);
    }
    return rows;
  });
}

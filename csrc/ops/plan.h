// Kernel choice by measurement in the ATen glue: plan keys, tier candidates, and running the
// candidate the plan cache picks (../kernels/common/plan_cache.h).
#pragma once

#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "../kernels/common/isa.h"
#include "../kernels/common/plan_cache.h"

namespace sparse_ext {

template <typename T>
struct PlanCandidate {
  std::string name;
  T value;
};

// "<op>|<field>|...|t<threads>|<active tier>": the fields name dtype, pattern, shape and the token
// bucket; the thread count and the active tier are part of every key because both change which
// candidate wins.
inline std::string plan_key(const char* op, std::initializer_list<std::string> fields) {
  std::string key(op);
  for (const std::string& f : fields) key += "|" + f;
  key += "|t" + std::to_string(at::get_num_threads());
  key += "|" + std::string(isa_name(active_isa()));
  return key;
}

// The tiers at and below the active one whose lookup gives an entry different from the tier
// above's, best first, named by tier. The scalar reference joins only when no vector tier has an
// entry: it never beats a vector tier, and timing it would cost the most.
template <typename T, typename Lookup>
std::vector<PlanCandidate<T>> tier_candidates(Lookup lookup) {
  std::vector<PlanCandidate<T>> out;
  for (Isa isa = active_isa();; isa = isa_fallback(isa)) {
    const T value = lookup(isa);
    const bool is_new = out.empty() || !(value == out.back().value);
    if (value && is_new && (isa != Isa::kScalar || out.empty()))
      out.push_back({isa_name(isa), value});
    if (isa == Isa::kScalar) break;
  }
  return out;
}

// Runs run(candidate) once with the candidate chosen for `key` (timing them first on a miss when
// tuning is on). `candidates` must not be empty.
template <typename T, typename Run>
void run_planned(const std::string& key, const std::vector<PlanCandidate<T>>& candidates,
                 const Run& run) {
  size_t chosen = 0;
  if (candidates.size() > 1) {
    std::vector<std::string> names;
    for (const auto& c : candidates) names.push_back(c.name);
    chosen = plan_choose(key, names, [&](size_t i) { run(candidates[i].value); });
  }
  run(candidates[chosen].value);
}

}  // namespace sparse_ext

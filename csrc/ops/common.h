// Shared helpers for the ATen glue: argument checks that name the argument, ISA lookup, and
// nonzero-balanced work splits over ATen's thread pool.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <string>
#include <vector>

#include "../kernels/common/isa.h"

namespace sparse_ext {

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
}

inline void check_dtype(const at::Tensor& t, const char* name,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  std::string names;
  for (auto s : allowed) {
    ok = ok || t.scalar_type() == s;
    if (!names.empty()) names += " or ";
    names += c10::toString(s);
  }
  TORCH_CHECK(ok, name, " must have dtype ", names, ", got ", t.scalar_type());
}

inline void check_1d(const at::Tensor& t, const char* name, int64_t expected_len) {
  TORCH_CHECK(t.dim() == 1, name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(0) == expected_len, name, " must have length ", expected_len, ", got ",
              t.size(0));
}

// The weight's width along dimension `dim` of an activation, in nn.Linear's terms:
// "x has 1024 features, this weight expects in_features=1000". `unit` is "features" or
// "channels"; `weight_dim` names the weight's side ("in_features", "out_channels", ...).
inline void check_width(const at::Tensor& t, const char* name, int64_t dim, int64_t expected,
                        const char* unit, const char* weight_dim) {
  TORCH_CHECK(t.size(dim) == expected, name, " has ", t.size(dim), " ", unit,
              ", this weight expects ", weight_dim, "=", expected, " (", name, " shape ",
              t.sizes(), ")");
}

// Sizes the weight's dimensions may take: the kernels index rows and columns with 32-bit
// integers, and a bound checked before anything is allocated keeps an absurd size argument from
// turning into a multi-GB allocation.
constexpr int64_t kMaxWeightDim = (int64_t(1) << 31) - 1;

inline void check_weight_dim(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= kMaxWeightDim, name, " must be in [0, 2^31 - 1], got ",
              value);
}

// grad_out [..., out] and x [..., in] of a values-gradient op must hold the same number of tokens.
inline void check_same_tokens(const at::Tensor& grad_out, const at::Tensor& x) {
  const int64_t out = grad_out.size(-1), in = x.size(-1);
  TORCH_CHECK(grad_out.numel() / std::max<int64_t>(out, 1) == x.numel() / std::max<int64_t>(in, 1),
              "grad_out and x must have the same number of tokens, got shapes ", grad_out.sizes(),
              " and ", x.sizes());
}

// Activations [..., width] as [tokens, width]. Unlike reshape({-1, width}) this also serves
// width 0 (nn.Linear(0, n) is a valid layer: its output is the bias).
inline at::Tensor as_rows(const at::Tensor& t) {
  int64_t tokens = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) tokens *= t.size(d);
  return t.reshape({tokens, t.size(-1)});
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Splits [0, items) into at most `parts` contiguous ranges of roughly equal cost, where
// cost_prefix(i) is the (non-decreasing) cost of items [0, i). Returns parts + 1 boundaries.
template <typename CostPrefix>
std::vector<int64_t> balanced_split(int64_t items, int64_t parts, CostPrefix cost_prefix) {
  std::vector<int64_t> bounds{0};
  const double total = static_cast<double>(cost_prefix(items));
  int64_t lo = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const double target = total * static_cast<double>(p) / static_cast<double>(parts);
    int64_t a = lo, b = items;
    while (a < b) {
      const int64_t mid = (a + b) / 2;
      if (static_cast<double>(cost_prefix(mid)) < target) a = mid + 1; else b = mid;
    }
    lo = a;
    bounds.push_back(a);
  }
  bounds.push_back(items);
  return bounds;
}

// Runs fn(begin, end) over the ranges of `bounds` on ATen's pool: one parallel region, one range
// per task.
template <typename Fn>
void parallel_ranges(const std::vector<int64_t>& bounds, const Fn& fn) {
  const int64_t ranges = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, ranges, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      if (bounds[p + 1] > bounds[p]) fn(bounds[p], bounds[p + 1]);
  });
}

inline int64_t work_parts() { return std::max<int64_t>(1, at::get_num_threads()); }

}  // namespace sparse_ext

// The MoE argument checks shared by the CPU and CUDA glue (see moe_args.h).
#include "moe_args.h"

#include <algorithm>
#include <string>

#include "common.h"

namespace sparse_ext {
namespace {

void check_index(const at::Tensor& t, const char* name, MoeCheckDevice check_device) {
  check_device(t, name);
  check_dtype(t, name, {at::kLong});
}

}  // namespace

MoeRouteParams checked_moe_route_args(const at::Tensor& logits, int64_t top_k,
                                      c10::string_view scoring, bool renormalize,
                                      int64_t num_groups, int64_t topk_groups) {
  check_dtype(logits, "router_logits", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(logits.dim() >= 1, "router_logits must be [..., num_experts], got a scalar");
  MoeRouteParams p{};
  p.experts = logits.size(-1);
  p.top_k = top_k;
  TORCH_CHECK(scoring == "softmax" || scoring == "sigmoid",
              "scoring must be 'softmax' or 'sigmoid', got '", std::string(scoring), "'");
  p.scoring = scoring == "softmax" ? MoeScoring::kSoftmax : MoeScoring::kSigmoid;
  p.renormalize = renormalize;
  p.num_groups = num_groups;
  p.topk_groups = topk_groups;
  const std::string error = moe_route_validate(p);
  TORCH_CHECK(error.empty(), "moe_route: ", error);
  return p;
}

std::vector<int64_t> moe_route_out_shape(const at::Tensor& logits, int64_t top_k) {
  std::vector<int64_t> out_shape(logits.sizes().begin(), logits.sizes().end());
  out_shape.back() = top_k;
  return out_shape;
}

std::pair<int64_t, int64_t> checked_moe_permute_args(const at::Tensor& topk_indices,
                                                     int64_t num_experts,
                                                     MoeCheckDevice check_device) {
  check_device(topk_indices, "topk_indices");
  check_dtype(topk_indices, "topk_indices", {at::kLong, at::kInt});
  TORCH_CHECK(topk_indices.dim() == 2, "topk_indices must be 2-D [tokens, top_k], got shape ",
              topk_indices.sizes());
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMoeMaxExperts, "num_experts must be in [1, ",
              kMoeMaxExperts, "], got ", num_experts);
  const int64_t T = topk_indices.size(0), k = topk_indices.size(1);
  TORCH_CHECK(k >= 1 && k <= num_experts, "top_k (topk_indices.size(1)) must be in [1, ",
              num_experts, "], got ", k);
  return {T, k};
}

MoeExpertArgs checked_moe_expert_args(const at::Tensor& x, const at::Tensor& row_token,
                                      const at::Tensor& offsets, const at::Tensor& w1,
                                      const at::Tensor& w2, c10::string_view activation,
                                      bool gated, MoeCheckDevice check_device,
                                      std::initializer_list<at::ScalarType> weight_dtypes) {
  check_device(x, "x");
  check_dtype(x, "x", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(x.dim() == 2, "x must be 2-D [tokens, hidden], got shape ", x.sizes());
  check_index(row_token, "row_token", check_device);
  check_index(offsets, "expert_offsets", check_device);
  check_device(w1, "w1");
  check_device(w2, "w2");
  check_dtype(w1, "w1", weight_dtypes);
  check_dtype(w2, "w2", weight_dtypes);
  TORCH_CHECK(w1.dim() == 3, "w1 must be 3-D [num_experts, (2 if gated else 1) * ffn, hidden], got ",
              w1.sizes());
  TORCH_CHECK(w2.dim() == 3, "w2 must be 3-D [num_experts, hidden, ffn], got shape ", w2.sizes());
  MoeExpertArgs a{};
  a.T = x.size(0);
  a.H = x.size(1);
  a.E = w1.size(0);
  a.F = w2.size(2);
  a.gated = gated;
  a.F1 = gated ? 2 * a.F : a.F;
  TORCH_CHECK(w2.size(0) == a.E, "w2 must have num_experts (", a.E, ") experts like w1, got ",
              w2.size(0));
  TORCH_CHECK(w1.size(1) == a.F1 && w1.size(2) == a.H, "w1 must have shape [", a.E, ", ", a.F1,
              ", ", a.H, "] (", gated ? "gate and up rows" : "up rows", " x hidden), got ",
              w1.sizes());
  TORCH_CHECK(w2.size(1) == a.H, "w2 must have shape [", a.E, ", ", a.H, ", ", a.F, "], got ",
              w2.sizes());
  const bool f64 = x.scalar_type() == at::kDouble;
  TORCH_CHECK(f64 == (w1.scalar_type() == at::kDouble) && f64 == (w2.scalar_type() == at::kDouble),
              "float64 needs x, w1 and w2 all in float64, got x ", x.scalar_type(), ", w1 ",
              w1.scalar_type(), ", w2 ", w2.scalar_type());
  TORCH_CHECK(moe_activation_from_name(std::string(activation).c_str(), &a.act),
              "activation must be one of silu, gelu, gelu_tanh, relu, got '",
              std::string(activation), "'");
  TORCH_CHECK(row_token.dim() == 1, "row_token must be 1-D, got shape ", row_token.sizes());
  check_1d(offsets, "expert_offsets", a.E + 1);
  a.P = row_token.size(0);
  return a;
}

void check_moe_expert_grad_y(const at::Tensor& grad_y, const MoeExpertArgs& a,
                             MoeCheckDevice check_device) {
  check_device(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == a.P && grad_y.size(1) == a.H,
              "grad_y must have shape [", a.P, ", ", a.H, "], got ", grad_y.sizes());
}

void check_moe_expert_offsets(const int64_t* o, int64_t E, int64_t P) {
  TORCH_CHECK(o[0] == 0, "expert_offsets[0] must be 0, got ", o[0]);
  for (int64_t e = 0; e < E; ++e)
    TORCH_CHECK(o[e + 1] >= o[e], "expert_offsets must not decrease, but expert_offsets[", e + 1,
                "] = ", o[e + 1], " < expert_offsets[", e, "] = ", o[e]);
  TORCH_CHECK(o[E] <= P, "expert_offsets[-1] (", o[E], ") must not exceed the number of rows (",
              P, ")");
}

void fail_moe_row_token(int64_t p, int64_t value, int64_t T) {
  TORCH_CHECK(false, "row_token[", p, "] = ", value, " is out of range, expected a token in [0, ",
              T, ")");
}

void checked_moe_combine_args(const at::Tensor& y, const at::Tensor& weights,
                              const at::Tensor& inverse, MoeCheckDevice check_device) {
  check_device(y, "expert_out");
  check_dtype(y, "expert_out", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  TORCH_CHECK(y.dim() == 2, "expert_out must be 2-D [rows, hidden], got shape ", y.sizes());
  check_device(weights, "topk_weights");
  check_dtype(weights, "topk_weights", {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf});
  check_index(inverse, "inverse", check_device);
  TORCH_CHECK(weights.dim() == 2, "topk_weights must be 2-D [tokens, top_k], got shape ",
              weights.sizes());
  TORCH_CHECK(inverse.sizes() == weights.sizes(), "inverse must have the shape of topk_weights ",
              weights.sizes(), ", got ", inverse.sizes());
}

void check_moe_combine_grad_out(const at::Tensor& grad_out, int64_t T, int64_t H,
                                MoeCheckDevice check_device) {
  check_device(grad_out, "grad_out");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == T && grad_out.size(1) == H,
              "grad_out must have shape [", T, ", ", H, "], got ", grad_out.sizes());
}

void fail_moe_inverse_range(int64_t i, int64_t k, int64_t value, int64_t rows) {
  k = std::max<int64_t>(k, 1);
  TORCH_CHECK(false, "inverse[", i / k, ", ", i % k, "] = ", value,
              " is out of range, expected a row of expert_out in [0, ", rows, ")");
}

void fail_moe_inverse_repeat(int64_t i, int64_t k, int64_t value) {
  k = std::max<int64_t>(k, 1);
  TORCH_CHECK(false, "moe_combine_backward: inverse[", i / k, ", ", i % k, "] = ", value,
              " repeats a row of expert_out; inverse must not repeat rows (as moe_permute's "
              "inverse never does)");
}

}  // namespace sparse_ext

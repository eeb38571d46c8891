// The MoE argument checks shared by the CPU glue (moe_ops.cpp) and the CUDA glue
// (cuda/moe_cuda.cpp): dtypes, shapes, activation and scoring names, and the messages of the
// structure checks (offsets, row_token, inverse), the same on every device. Device checks stay
// with each glue; the functions that take `check_device` call it on each tensor in the order the
// CPU op always checked them (the CUDA glue checks every tensor's device first, then passes
// check_cuda).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>
#include <vector>

#include "../kernels/moe/moe.h"

namespace sparse_ext {

using MoeCheckDevice = void (*)(const at::Tensor&, const char*);

// float64 inputs compute in float64, every other dtype in float32.
inline at::ScalarType moe_compute_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// moe_route: router_logits dtype and rank, the scoring name and moe_route_validate. Returns the
// routing parameters (experts = router_logits.size(-1)).
MoeRouteParams checked_moe_route_args(const at::Tensor& logits, int64_t top_k,
                                      c10::string_view scoring, bool renormalize,
                                      int64_t num_groups, int64_t topk_groups);

// moe_route's output shape: router_logits' shape with the last dimension top_k.
std::vector<int64_t> moe_route_out_shape(const at::Tensor& logits, int64_t top_k);

// The most experts an op accepts: num_experts of moe_permute sizes its offsets output before any
// index is read, so it is bounded first (2^20 experts, 8 MiB of offsets; published models use up
// to a few hundred, fine-grained expert layers up to about a million).
constexpr int64_t kMoeMaxExperts = int64_t(1) << 20;

// moe_permute: topk_indices (device, dtype, 2-D), num_experts in [1, kMoeMaxExperts] and top_k.
// Returns {tokens, top_k}.
std::pair<int64_t, int64_t> checked_moe_permute_args(const at::Tensor& topk_indices,
                                                     int64_t num_experts,
                                                     MoeCheckDevice check_device);

// Sizes of an expert MLP call: x [T, H], w1 [E, F1, H] (F1 = 2F gated, F plain), w2 [E, H, F],
// row_token [P], expert_offsets [E + 1].
struct MoeExpertArgs {
  int64_t T, H, F, F1, E, P;
  MoeActivation act;
  bool gated;
};

// moe_expert_mlp(_backward): devices, dtypes (w1 and w2 must be one of `weight_dtypes`), shapes
// and the activation name; not the structure of row_token and expert_offsets (their values).
MoeExpertArgs checked_moe_expert_args(const at::Tensor& x, const at::Tensor& row_token,
                                      const at::Tensor& offsets, const at::Tensor& w1,
                                      const at::Tensor& w2, c10::string_view activation,
                                      bool gated, MoeCheckDevice check_device,
                                      std::initializer_list<at::ScalarType> weight_dtypes);

// moe_expert_mlp_backward: grad_y's device and shape [P, H].
void check_moe_expert_grad_y(const at::Tensor& grad_y, const MoeExpertArgs& a,
                             MoeCheckDevice check_device);

// Raises on the first malformed entry of host expert_offsets o[0..E] (o[0] == 0, non-decreasing,
// o[E] <= P), in that order.
void check_moe_expert_offsets(const int64_t* o, int64_t E, int64_t P);

// Raises: row_token[p] = value is not a token in [0, T).
void fail_moe_row_token(int64_t p, int64_t value, int64_t T);

// moe_combine(_backward): devices, dtypes and shapes of expert_out [rows, H], topk_weights
// [T, k] and inverse [T, k]; not inverse's values.
void checked_moe_combine_args(const at::Tensor& y, const at::Tensor& weights,
                              const at::Tensor& inverse, MoeCheckDevice check_device);

// moe_combine_backward: grad_out's device and shape [T, H] (T tokens, H = expert_out.size(1)).
void check_moe_combine_grad_out(const at::Tensor& grad_out, int64_t T, int64_t H,
                                MoeCheckDevice check_device);

// Raise for flat pair i (of k per token) of inverse holding `value`: out of [0, rows), or a row
// that an earlier pair already points at (moe_combine_backward).
void fail_moe_inverse_range(int64_t i, int64_t k, int64_t value, int64_t rows);
void fail_moe_inverse_repeat(int64_t i, int64_t k, int64_t value);

}  // namespace sparse_ext

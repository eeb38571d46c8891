// ATen glue of the MoE family on CUDA: device checks (the dtype and shape checks are shared with
// the CPU glue in csrc/ops/moe_args.h), device validation of the routing metadata, allocation and
// launches on the current stream.
// Kernels: csrc/cuda/moe/moe_cuda.h. Schemas: csrc/registration.cpp. Design: docs/cuda.md (## MoE).
//
// Expert MLP strategy on CUDA: segments of 1..kSmallRows rows (decode) run the grouped GEMV kernels
// (every touched expert's weights streamed once per 8 tokens, all of them reused per load);
// larger segments (prefill) run cuBLAS GEMMs through at::mm on segment slices with the fused
// activation kernel in between. When the call has at most kDecodePairs pairs every segment runs
// the GEMV kernels and the offsets stay on the device; otherwise they are read to the host once
// per call to plan the GEMMs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>
#include <vector>

#include "../../cuda/moe/moe_cuda.h"
#include "../../kernels/moe/moe.h"
#include "../common.h"
#include "../moe_args.h"
#include "cuda_glue.h"

namespace sparse_ext {
namespace {

namespace kc = ::sparse_ext::cuda;

constexpr int64_t kNoError = -1;  // UINT64_MAX read back as int64

// Reads back a small int64 error tensor written by a validation launcher (one synchronization).
std::vector<int64_t> read_errors(const at::Tensor& err) {
  const at::Tensor host = err.to(at::kCPU);
  const int64_t* p = host.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + host.numel());
}

unsigned long long* u64_ptr(at::Tensor& t) {
  return reinterpret_cast<unsigned long long*>(t.data_ptr<int64_t>());
}

// Typed raw pointers for the 16-bit storage types.
template <typename T>
const T* cptr(const at::Tensor& t);
template <>
const float* cptr<float>(const at::Tensor& t) { return t.data_ptr<float>(); }
template <>
const double* cptr<double>(const at::Tensor& t) { return t.data_ptr<double>(); }
template <>
const __half* cptr<__half>(const at::Tensor& t) {
  return reinterpret_cast<const __half*>(t.data_ptr<at::Half>());
}
template <>
const __nv_bfloat16* cptr<__nv_bfloat16>(const at::Tensor& t) {
  return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

// Validation keys (validate_structure_once). Outputs that are well-formed by construction are
// registered under the key of the op that consumes them, so a route -> permute -> expert MLP ->
// combine chain validates nothing twice and runs without a host synchronization in decode.
std::string permute_key(int64_t E) { return "moe_permute/E=" + std::to_string(E); }
std::string expert_key(int64_t T) { return "moe_expert_mlp/T=" + std::to_string(T); }
std::string combine_key(const char* op, int64_t rows) {
  return std::string(op) + "/rows=" + std::to_string(rows);
}

// ---- Routing -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> moe_route_cuda(const at::Tensor& logits, int64_t top_k,
                                                  c10::string_view scoring, bool renormalize,
                                                  const c10::optional<at::Tensor>& selection_bias,
                                                  int64_t num_groups, int64_t topk_groups) {
  const at::Tensor* bias_in = selection_bias.has_value() ? &*selection_bias : nullptr;
  check_same_cuda_device(logits, "router_logits", {{bias_in, "selection_bias"}});
  const MoeRouteParams p =
      checked_moe_route_args(logits, top_k, scoring, renormalize, num_groups, topk_groups);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::ScalarType S = moe_compute_dtype(logits);
  const at::Tensor rows = logits.reshape({-1, p.experts}).to(S).contiguous();
  at::Tensor bias;
  if (bias_in != nullptr) {
    check_1d(*bias_in, "selection_bias", p.experts);
    bias = bias_in->to(S).contiguous();
  }
  const int64_t T = rows.size(0);
  const std::vector<int64_t> out_shape = moe_route_out_shape(logits, top_k);
  at::Tensor weights = at::empty({T, top_k}, rows.options());
  at::Tensor indices = at::empty({T, top_k}, rows.options().dtype(at::kLong));
  const int64_t scratch_elems =
      kc::moe_route_scratch_elems(T, p.experts, num_groups, S == at::kDouble);
  at::Tensor scratch = scratch_elems > 0 ? at::empty({scratch_elems}, rows.options()) : at::Tensor();
  const int sc = p.scoring == MoeScoring::kSoftmax ? 0 : 1;
  cudaError_t st;
  if (S == at::kDouble) {
    st = kc::moe_route<double>(rows.data_ptr<double>(),
                               bias.defined() ? bias.data_ptr<double>() : nullptr, T, p.experts,
                               top_k, sc, renormalize, num_groups, topk_groups,
                               scratch.defined() ? scratch.data_ptr<double>() : nullptr,
                               weights.data_ptr<double>(), indices.data_ptr<int64_t>(),
                               current_stream());
  } else {
    st = kc::moe_route<float>(rows.data_ptr<float>(),
                              bias.defined() ? bias.data_ptr<float>() : nullptr, T, p.experts,
                              top_k, sc, renormalize, num_groups, topk_groups,
                              scratch.defined() ? scratch.data_ptr<float>() : nullptr,
                              weights.data_ptr<float>(), indices.data_ptr<int64_t>(),
                              current_stream());
  }
  check_launch(st, "moe_route");
  const at::Tensor indices_out = indices.reshape(out_shape);
  // The indices are in [0, E) by construction: moe_permute with this E may skip its validation
  // (and its synchronization) for this exact tensor, until it is modified.
  if (indices_out.dim() == 2) mark_structure_valid(permute_key(p.experts), {indices_out});
  return {weights.reshape(out_shape), indices_out};
}

// ---- Permute -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(const at::Tensor& topk_indices,
                                                                int64_t num_experts,
                                                                int64_t capacity) {
  const std::pair<int64_t, int64_t> shape =
      checked_moe_permute_args(topk_indices, num_experts, &check_cuda);
  const int64_t T = shape.first, k = shape.second;
  const int64_t P = T * k;
  TORCH_CHECK(P < (int64_t{1} << 31), "moe_permute: at most 2^31 - 1 (token, slot) pairs on CUDA, got ",
              P);
  const c10::cuda::CUDAGuard guard(topk_indices.device());
  const at::Tensor idx = topk_indices.to(at::kLong).contiguous();
  const cudaStream_t stream = current_stream();
  const std::string key = permute_key(num_experts);
  validate_structure_once(key.c_str(), {idx}, [&] {
    at::Tensor err = at::empty({1}, idx.options());
    check_launch(kc::moe_permute_validate(idx.data_ptr<int64_t>(), P, num_experts, u64_ptr(err),
                                          stream),
                 "moe_permute");
    const int64_t bad = read_errors(err)[0];
    if (bad != kNoError) {
      const int64_t value = idx.reshape({-1})[bad].item<int64_t>();
      TORCH_CHECK(false, "moe_permute: expert index out of range: topk_indices[", bad / k, ", ",
                  bad % k, "] = ", value, ", expected a value in [0, ", num_experts, ")");
    }
  });
  at::Tensor row_token = at::empty({P}, idx.options());
  at::Tensor offsets = at::empty({num_experts + 1}, idx.options());
  at::Tensor inverse = at::empty({T, k}, idx.options());
  at::Tensor counts = at::empty({kc::moe_permute_count_elems(P, num_experts)},
                                idx.options().dtype(at::kInt));
  at::Tensor rank = at::empty({P}, idx.options().dtype(at::kInt));
  at::Tensor kept = at::empty({capacity >= 0 ? P : 0}, idx.options().dtype(at::kByte));
  check_launch(kc::moe_permute(idx.data_ptr<int64_t>(), T, k, num_experts, capacity,
                               counts.data_ptr<int32_t>(), rank.data_ptr<int32_t>(),
                               kept.data_ptr<uint8_t>(), row_token.data_ptr<int64_t>(),
                               offsets.data_ptr<int64_t>(), inverse.data_ptr<int64_t>(), stream),
               "moe_permute");
  // Well-formed by construction (the indices were validated): register them for the consumers.
  mark_structure_valid(expert_key(T), {row_token, offsets});
  mark_structure_valid(combine_key("moe_combine", P), {inverse});
  mark_structure_valid(combine_key("moe_combine_backward", P), {inverse});
  return {row_token, offsets, inverse};
}

// ---- Expert MLP --------------------------------------------------------------------------------
// The shared checks (after every tensor's device), then the structure on the device.
using ExpertArgs = MoeExpertArgs;

ExpertArgs check_expert_args(const at::Tensor& x, const at::Tensor& row_token,
                             const at::Tensor& offsets, const at::Tensor& w1,
                             const at::Tensor& w2, c10::string_view activation, bool gated,
                             const char* op) {
  check_same_cuda_device(x, "x", {{&row_token, "row_token"}, {&offsets, "expert_offsets"},
                                  {&w1, "w1"}, {&w2, "w2"}});
  const ExpertArgs a =
      checked_moe_expert_args(x, row_token, offsets, w1, w2, activation, gated, &check_cuda,
                              {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  // Structure (offsets monotone from 0 and within the rows, row_token in [0, T)) on the device,
  // once per (row_token, offsets) version.
  // One key for the forward and the backward, so the backward reuses the forward's validation.
  const std::string key = expert_key(a.T);
  validate_structure_once(key.c_str(), {row_token, offsets}, [&] {
    const at::Tensor off = offsets.contiguous(), rt = row_token.contiguous();
    at::Tensor err = at::empty({2}, off.options());
    check_launch(kc::moe_expert_validate(off.data_ptr<int64_t>(), rt.data_ptr<int64_t>(), a.E,
                                         a.P, a.T, u64_ptr(err), current_stream()),
                 op);
    const std::vector<int64_t> e = read_errors(err);
    if (e[0] != kNoError) {
      // The kernel flags the first malformed entry in the order of the host walk, which
      // raises on that same entry.
      const at::Tensor ho = off.to(at::kCPU);
      check_moe_expert_offsets(ho.data_ptr<int64_t>(), a.E, a.P);
    }
    if (e[1] != kNoError) fail_moe_row_token(e[1], rt[e[1]].item<int64_t>(), a.T);
  });
  return a;
}

// The activation as the kernels take it.
int act_id(const ExpertArgs& a) { return static_cast<int>(a.act); }

// Host copy of the offsets, clamped exactly like the kernels clamp them (no-op when validated).
std::vector<int64_t> host_offsets(const at::Tensor& offsets, int64_t P) {
  const at::Tensor h = offsets.to(at::kCPU).contiguous();
  std::vector<int64_t> o(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel());
  for (size_t e = 0; e < o.size(); ++e) {
    const int64_t lo = e == 0 ? 0 : o[e - 1];
    o[e] = std::min(std::max(o[e], lo), P);
  }
  if (!o.empty()) o[0] = std::min(std::max(o[0], int64_t{0}), P);
  return o;
}

template <typename TH>
void launch_activate(const at::Tensor& pre, int64_t n, int64_t F, bool gated, int act,
                     at::Tensor& h, const char* op) {
  cudaError_t st;
  if constexpr (std::is_same_v<TH, double>) {
    st = kc::moe_activate<double, double>(pre.data_ptr<double>(), n, F, gated, act,
                                          h.data_ptr<double>(), current_stream());
  } else {
    st = kc::moe_activate<float, TH>(pre.data_ptr<float>(), n, F, gated, act,
                                     reinterpret_cast<TH*>(h.data_ptr()), current_stream());
  }
  check_launch(st, op);
}

// act(pre) (* up) into a new [n, F] tensor of dtype gd (the down GEMM's input dtype).
at::Tensor activate_rows(const at::Tensor& pre, int64_t F, bool gated, int act, at::ScalarType gd,
                      const char* op) {
  const int64_t n = pre.size(0);
  at::Tensor h = at::empty({n, F}, pre.options().dtype(gd));
  switch (gd) {
    case at::kDouble: launch_activate<double>(pre, n, F, gated, act, h, op); break;
    case at::kBFloat16: launch_activate<__nv_bfloat16>(pre, n, F, gated, act, h, op); break;
    case at::kHalf: launch_activate<__half>(pre, n, F, gated, act, h, op); break;
    default: launch_activate<float>(pre, n, F, gated, act, h, op); break;
  }
  return h;
}

// a @ b^T with an fp32 (fp64) result; 16-bit operands accumulate in fp32 (mm.dtype, cuBLAS).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& bt) {
  if (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf)
    return at::mm(a, bt, at::kFloat);
  return at::mm(a, bt);
}
void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& bt) {
  if (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf)
    at::mm_out(out, a, bt, at::kFloat);
  else
    at::mm_out(out, a, bt);
}

template <typename TW>
void launch_small_up(const at::Tensor& xf, const at::Tensor& w1, const at::Tensor& offsets,
                     const at::Tensor& row_token, const ExpertArgs& a, int64_t max_rows,
                     at::Tensor& h) {
  check_launch(kc::moe_small_up<TW>(xf.data_ptr<float>(), cptr<TW>(w1),
                                    offsets.data_ptr<int64_t>(), row_token.data_ptr<int64_t>(),
                                    a.T, a.E, a.H, a.F, a.P, max_rows, act_id(a), a.gated,
                                    h.data_ptr<float>(), current_stream()),
               "moe_expert_mlp");
}

template <typename TW>
void launch_small_down(const at::Tensor& h, const at::Tensor& w2, const at::Tensor& offsets,
                       const ExpertArgs& a, int64_t max_rows, at::Tensor& y) {
  check_launch(kc::moe_small_down<TW>(h.data_ptr<float>(), cptr<TW>(w2),
                                      offsets.data_ptr<int64_t>(), a.E, a.H, a.F, a.P, max_rows,
                                      y.data_ptr<float>(), current_stream()),
               "moe_expert_mlp");
}

at::Tensor moe_expert_mlp_cuda(const at::Tensor& x, const at::Tensor& row_token_in,
                               const at::Tensor& offsets_in, const at::Tensor& w1_in,
                               const at::Tensor& w2_in, c10::string_view activation, bool gated) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const ExpertArgs a = check_expert_args(x, row_token_in, offsets_in, w1_in, w2_in, activation,
                                         gated, "moe_expert_mlp");
  const at::ScalarType S = moe_compute_dtype(x);
  const at::Tensor row_token = row_token_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  at::Tensor y = at::empty({a.P, a.H}, x.options().dtype(S));
  if (a.P == 0 || a.H == 0) return y;
  if (a.F == 0) return y.zero_();

  // Planning: with at most kDecodePairs pairs every segment runs the GEMV kernels (no host read);
  // otherwise the offsets come to the host once and segments above kSmallRows rows take cuBLAS.
  const bool all_small = S == at::kFloat && a.P <= kc::kDecodePairs;
  const int64_t max_rows = all_small ? a.P : kc::kSmallRows;
  std::vector<int64_t> o;
  int64_t kept = a.P;
  bool any_small = all_small, any_large = false;
  if (all_small) {
    y.zero_();  // rows past offsets[E] (dropped pairs) read zero
  } else {
    o = host_offsets(offsets, a.P);
    kept = o[a.E];
    if (kept < a.P) y.narrow(0, kept, a.P - kept).zero_();
    for (int64_t e = 0; e < a.E; ++e) {
      const int64_t n = o[e + 1] - o[e];
      if (n < 1) continue;
      if (S == at::kFloat && n <= kc::kSmallRows) any_small = true;
      else any_large = true;
    }
  }

  if (any_small) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor h = at::empty({a.P, a.F}, xf.options());
    switch (w1.scalar_type()) {
      case at::kBFloat16:
        launch_small_up<__nv_bfloat16>(xf, w1, offsets, row_token, a, max_rows, h);
        break;
      case at::kHalf: launch_small_up<__half>(xf, w1, offsets, row_token, a, max_rows, h); break;
      default: launch_small_up<float>(xf, w1, offsets, row_token, a, max_rows, h); break;
    }
    switch (w2.scalar_type()) {
      case at::kBFloat16: launch_small_down<__nv_bfloat16>(h, w2, offsets, a, max_rows, y); break;
      case at::kHalf: launch_small_down<__half>(h, w2, offsets, a, max_rows, y); break;
      default: launch_small_down<float>(h, w2, offsets, a, max_rows, y); break;
    }
  }
  if (!any_large) return y;

  // Prefill: cuBLAS GEMMs per expert segment on the gathered rows. 16-bit operands stay 16-bit
  // (tensor cores, fp32 accumulation and fp32 results) when x, w1 and w2 share the dtype; any
  // other mix computes in fp32 (fp64 for fp64), as the CPU op does.
  const at::ScalarType xd = x.scalar_type();
  const bool native16 = (xd == at::kBFloat16 || xd == at::kHalf) && w1.scalar_type() == xd &&
                        w2.scalar_type() == xd;
  const at::ScalarType gd = native16 ? xd : S;
  const at::Tensor xs = x.to(gd).index_select(0, row_token.narrow(0, 0, kept));
  for (int64_t e = 0; e < a.E; ++e) {
    const int64_t n = o[e + 1] - o[e];
    if (n < 1 || (S == at::kFloat && n <= kc::kSmallRows)) continue;
    const at::Tensor seg = xs.narrow(0, o[e], n);
    const at::Tensor W1 = w1[e].to(gd), W2 = w2[e].to(gd);
    const at::Tensor pre = mm_acc(seg, W1.t());  // [n, F1] in S
    const at::Tensor h = activate_rows(pre, a.F, a.gated, act_id(a), gd, "moe_expert_mlp");
    at::Tensor out = y.narrow(0, o[e], n);
    mm_acc_out(out, h, W2.t());
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& row_token_in,
    const at::Tensor& offsets_in, const at::Tensor& w1, const at::Tensor& w2,
    c10::string_view activation, bool gated) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const ExpertArgs a = check_expert_args(x, row_token_in, offsets_in, w1, w2, activation, gated,
                                         "moe_expert_mlp_backward");
  check_same_cuda_device(x, "x", {{&grad_y, "grad_y"}});
  check_moe_expert_grad_y(grad_y, a, &check_cuda);
  const at::ScalarType S = moe_compute_dtype(x);
  const at::Tensor xc = x.to(S).contiguous();
  const at::Tensor gy = grad_y.to(S).contiguous();
  const at::Tensor row_token = row_token_in.contiguous();
  const std::vector<int64_t> o = host_offsets(offsets_in, a.P);
  const int64_t kept = o[a.E];
  at::Tensor grad_rows = at::zeros({kept, a.H}, xc.options());
  at::Tensor gw1 = at::zeros({a.E, a.F1, a.H}, xc.options());
  at::Tensor gw2 = at::zeros({a.E, a.H, a.F}, xc.options());
  const at::Tensor rt = row_token.narrow(0, 0, kept);
  if (kept > 0 && a.H > 0 && a.F > 0) {
    const at::Tensor xs = xc.index_select(0, rt);
    for (int64_t e = 0; e < a.E; ++e) {
      const int64_t n = o[e + 1] - o[e];
      if (n == 0) continue;
      const at::Tensor seg = xs.narrow(0, o[e], n);
      const at::Tensor W1 = w1[e].to(S), W2 = w2[e].to(S);
      const at::Tensor pre = at::mm(seg, W1.t()).contiguous();  // [n, F1]
      const at::Tensor h =
          activate_rows(pre, a.F, a.gated, act_id(a), S, "moe_expert_mlp_backward");
      const at::Tensor dy = gy.narrow(0, o[e], n);
      const at::Tensor dh = at::mm(dy, W2).contiguous();  // [n, F]
      at::Tensor dpre = at::empty({n, a.F1}, xs.options());
      cudaError_t st;
      if (S == at::kDouble)
        st = kc::moe_activate_backward<double>(pre.data_ptr<double>(), dh.data_ptr<double>(), n,
                                               a.F, a.gated, act_id(a), dpre.data_ptr<double>(),
                                               current_stream());
      else
        st = kc::moe_activate_backward<float>(pre.data_ptr<float>(), dh.data_ptr<float>(), n, a.F,
                                              a.gated, act_id(a), dpre.data_ptr<float>(),
                                              current_stream());
      check_launch(st, "moe_expert_mlp_backward");
      at::Tensor g2 = gw2[e], g1 = gw1[e];
      at::mm_out(g2, dy.t(), h);
      at::mm_out(g1, dpre.t(), seg);
      at::Tensor gr = grad_rows.narrow(0, o[e], n);
      at::mm_out(gr, dpre, W1);
    }
  }
  // grad_x[t] = sum of grad_rows of token t in increasing row order: a stable sort of the rows by
  // token, then one fixed-order sum per token (deterministic, no atomics).
  at::Tensor grad_x = at::empty({a.T, a.H}, xc.options());
  const auto sorted = at::sort(rt, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_tokens = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();
  cudaError_t st;
  if (S == at::kDouble)
    st = kc::moe_scatter_rows<double>(grad_rows.data_ptr<double>(),
                                      sorted_tokens.data_ptr<int64_t>(),
                                      order.data_ptr<int64_t>(), kept, a.T, a.H,
                                      grad_x.data_ptr<double>(), current_stream());
  else
    st = kc::moe_scatter_rows<float>(grad_rows.data_ptr<float>(), sorted_tokens.data_ptr<int64_t>(),
                                     order.data_ptr<int64_t>(), kept, a.T, a.H,
                                     grad_x.data_ptr<float>(), current_stream());
  check_launch(st, "moe_expert_mlp_backward");
  return {grad_x.to(x.scalar_type()), gw1.to(w1.scalar_type()), gw2.to(w2.scalar_type())};
}

// ---- Combine -----------------------------------------------------------------------------------
void check_combine_args(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inverse,
                        bool injective, const char* op) {
  check_same_cuda_device(y, "expert_out", {{&weights, "topk_weights"}, {&inverse, "inverse"}});
  checked_moe_combine_args(y, weights, inverse, &check_cuda);
  const int64_t rows = y.size(0), k = inverse.size(1);
  const std::string key = combine_key(op, rows);
  validate_structure_once(key.c_str(), {inverse}, [&] {
    const at::Tensor inv = inverse.contiguous();
    at::Tensor err = at::empty({2}, inv.options());
    at::Tensor first = at::empty({injective ? rows : 0}, inv.options());
    check_launch(kc::moe_combine_validate(inv.data_ptr<int64_t>(), inv.numel(), rows, injective,
                                          injective ? u64_ptr(first) : nullptr, u64_ptr(err),
                                          current_stream()),
                 op);
    const std::vector<int64_t> e = read_errors(err);
    if (e[0] != kNoError)
      fail_moe_inverse_range(e[0], k, inv.reshape({-1})[e[0]].item<int64_t>(), rows);
    if (injective && e[1] != kNoError)
      fail_moe_inverse_repeat(e[1], k, inv.reshape({-1})[e[1]].item<int64_t>());
  });
}

at::Tensor moe_combine_cuda(const at::Tensor& y, const at::Tensor& weights,
                            const at::Tensor& inverse) {
  check_cuda(y, "expert_out");
  const c10::cuda::CUDAGuard guard(y.device());
  check_combine_args(y, weights, inverse, false, "moe_combine");
  const at::ScalarType S = moe_compute_dtype(y);
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = weights.to(S).contiguous();
  const at::Tensor inv = inverse.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1), rows = y.size(0);
  at::Tensor out = at::empty({T, H}, yc.options().dtype(S));
  const cudaStream_t stream = current_stream();
  const int64_t* ip = inv.data_ptr<int64_t>();
  cudaError_t st;
  switch (yc.scalar_type()) {
    case at::kDouble:
      st = kc::moe_combine<double, double>(yc.data_ptr<double>(), wc.data_ptr<double>(), ip, T, k,
                                           H, rows, out.data_ptr<double>(), stream);
      break;
    case at::kBFloat16:
      st = kc::moe_combine<__nv_bfloat16, float>(cptr<__nv_bfloat16>(yc), wc.data_ptr<float>(), ip,
                                                 T, k, H, rows, out.data_ptr<float>(), stream);
      break;
    case at::kHalf:
      st = kc::moe_combine<__half, float>(cptr<__half>(yc), wc.data_ptr<float>(), ip, T, k, H,
                                          rows, out.data_ptr<float>(), stream);
      break;
    default:
      st = kc::moe_combine<float, float>(yc.data_ptr<float>(), wc.data_ptr<float>(), ip, T, k, H,
                                         rows, out.data_ptr<float>(), stream);
      break;
  }
  check_launch(st, "moe_combine");
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cuda(const at::Tensor& grad_out,
                                                             const at::Tensor& y,
                                                             const at::Tensor& weights,
                                                             const at::Tensor& inverse) {
  check_cuda(y, "expert_out");
  const c10::cuda::CUDAGuard guard(y.device());
  check_same_cuda_device(y, "expert_out", {{&grad_out, "grad_out"}});
  check_combine_args(y, weights, inverse, true, "moe_combine_backward");
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1), rows = y.size(0);
  check_moe_combine_grad_out(grad_out, T, H, &check_cuda);
  const at::ScalarType S = moe_compute_dtype(y);
  const at::Tensor yc = y.contiguous();
  const at::Tensor wc = weights.to(S).contiguous();
  const at::Tensor gc = grad_out.to(S).contiguous();
  const at::Tensor inv = inverse.contiguous();
  at::Tensor grad_y = at::zeros({rows, H}, yc.options().dtype(S));
  at::Tensor grad_w = at::empty({T, k}, yc.options().dtype(S));
  const cudaStream_t stream = current_stream();
  const int64_t* ip = inv.data_ptr<int64_t>();
  cudaError_t st;
  switch (yc.scalar_type()) {
    case at::kDouble:
      st = kc::moe_combine_backward<double, double>(
          gc.data_ptr<double>(), yc.data_ptr<double>(), wc.data_ptr<double>(), ip, T, k, H, rows,
          grad_y.data_ptr<double>(), grad_w.data_ptr<double>(), stream);
      break;
    case at::kBFloat16:
      st = kc::moe_combine_backward<__nv_bfloat16, float>(
          gc.data_ptr<float>(), cptr<__nv_bfloat16>(yc), wc.data_ptr<float>(), ip, T, k, H, rows,
          grad_y.data_ptr<float>(), grad_w.data_ptr<float>(), stream);
      break;
    case at::kHalf:
      st = kc::moe_combine_backward<__half, float>(
          gc.data_ptr<float>(), cptr<__half>(yc), wc.data_ptr<float>(), ip, T, k, H, rows,
          grad_y.data_ptr<float>(), grad_w.data_ptr<float>(), stream);
      break;
    default:
      st = kc::moe_combine_backward<float, float>(
          gc.data_ptr<float>(), yc.data_ptr<float>(), wc.data_ptr<float>(), ip, T, k, H, rows,
          grad_y.data_ptr<float>(), grad_w.data_ptr<float>(), stream);
      break;
  }
  check_launch(st, "moe_combine_backward");
  return {grad_y.to(y.scalar_type()), grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CUDA, m) {
  m.impl("moe_route", &moe_route_cuda);
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_expert_mlp", &moe_expert_mlp_cuda);
  m.impl("moe_expert_mlp_backward", &moe_expert_mlp_backward_cuda);
  m.impl("moe_combine", &moe_combine_cuda);
  m.impl("moe_combine_backward", &moe_combine_backward_cuda);
}

}  // namespace sparse_ext

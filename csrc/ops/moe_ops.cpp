// ATen glue for the MoE family: checks (the device-agnostic ones in moe_args.h, shared with the
// CUDA glue), staging, thread split and kernel calls.
// Schemas: csrc/registration.cpp (MoE block). Kernels: csrc/kernels/moe/moe.h.
//
// Expert MLP strategy (fp32 compute): every touched expert runs in one parallel region of
// (expert, output tile) items, the gated activation fused after each gate/up tile. Segments of
// at most gemv_rows() tokens (decode, small prefill) run the GEMV ukernels, so every touched
// expert's weights stream once at memory bandwidth; longer segments run the packed-panel GEMM
// ukernel where the ISA has one (AVX2, AVX-512), else at::mm per expert. fp64 runs at::mm per
// expert.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <thread>
#include <cstring>

#include "../kernels/common/bf16.h"
#include "../kernels/moe/moe.h"
#include "common.h"
#include "moe_args.h"
#include "plan.h"
#include "settings.h"

namespace sparse_ext {
namespace {

// Segments with at most this many rows use k's GEMV ukernel, longer ones its GEMM: the tier's
// measured crossover (MoeUkernels::gemv_max_rows: 48 rows on AVX2, 48 fp32 / 24 bf16 weights on
// AVX-512), unless the moe_gemv_rows setting forces one (>= 0).
int64_t gemv_rows(const MoeUkernels* k) {
  const int64_t forced = setting(Setting::kMoeGemvRows);
  return forced >= 0 ? forced : k->gemv_max_rows;
}

// Output rows per item: a multiple of the GEMV's 3-row tile and the GEMM's 16-row panel.
constexpr int64_t kTileF = 48;  // gate (and up) rows per phase-1 item
constexpr int64_t kTileH = 48;  // down-projection rows per phase-2 item
// Tokens per ukernel call: bounds the per-thread gate/up buffers (kChunk x kTileF floats each).
constexpr int64_t kChunk = 256;

// ---- Routing -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, int64_t top_k,
                                                 c10::string_view scoring, bool renormalize,
                                                 const c10::optional<at::Tensor>& selection_bias,
                                                 int64_t num_groups, int64_t topk_groups) {
  check_cpu(logits, "router_logits");
  const MoeRouteParams p =
      checked_moe_route_args(logits, top_k, scoring, renormalize, num_groups, topk_groups);
  const at::ScalarType S = moe_compute_dtype(logits);
  const at::Tensor rows = logits.reshape({-1, p.experts}).to(S).contiguous();
  at::Tensor bias;
  if (selection_bias.has_value()) {
    check_cpu(*selection_bias, "selection_bias");
    check_1d(*selection_bias, "selection_bias", p.experts);
    bias = selection_bias->to(S).contiguous();
  }
  const int64_t T = rows.size(0);
  const std::vector<int64_t> out_shape = moe_route_out_shape(logits, top_k);
  at::Tensor weights = at::empty({T, top_k}, rows.options());
  at::Tensor indices = at::empty({T, top_k}, rows.options().dtype(at::kLong));
  const int64_t grain = std::max<int64_t>(1, 4096 / p.experts);
  AT_DISPATCH_FLOATING_TYPES(S, "moe_route", [&] {
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
      moe_route_tokens<scalar_t>(rows.data_ptr<scalar_t>(), b, p, t0, t1,
                                 weights.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    });
  });
  return {weights.reshape(out_shape), indices.reshape(out_shape)};
}

// ---- Permute -----------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(const at::Tensor& topk_indices,
                                                               int64_t num_experts,
                                                               int64_t capacity) {
  const std::pair<int64_t, int64_t> shape =
      checked_moe_permute_args(topk_indices, num_experts, &check_cpu);
  const int64_t T = shape.first, k = shape.second;
  const at::Tensor idx = topk_indices.to(at::kLong).contiguous();
  at::Tensor row_token = at::empty({T * k}, idx.options());
  at::Tensor offsets = at::empty({num_experts + 1}, idx.options());
  at::Tensor inverse = at::empty({T, k}, idx.options());
  const std::string error =
      moe_permute(idx.data_ptr<int64_t>(), T, k, num_experts, capacity,
                  row_token.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                  inverse.data_ptr<int64_t>());
  TORCH_CHECK(error.empty(), "moe_permute: ", error);
  return {row_token, offsets, inverse};
}

// ---- Expert MLP --------------------------------------------------------------------------------
// The shared checks plus the structure walk, which yields the number of kept rows.
struct ExpertArgs : MoeExpertArgs {
  int64_t kept;
};

ExpertArgs check_expert_args(const at::Tensor& x, const at::Tensor& row_token,
                             const at::Tensor& offsets, const at::Tensor& w1,
                             const at::Tensor& w2, c10::string_view activation, bool gated) {
  ExpertArgs a{checked_moe_expert_args(x, row_token, offsets, w1, w2, activation, gated,
                                       &check_cpu, {at::kFloat, at::kBFloat16, at::kDouble}),
               0};
  const at::Tensor off = offsets.contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  check_moe_expert_offsets(o, a.E, a.P);
  a.kept = o[a.E];
  const at::Tensor rt = row_token.contiguous();
  const int64_t* r = rt.data_ptr<int64_t>();
  for (int64_t p = 0; p < a.kept; ++p)
    if (r[p] < 0 || r[p] >= a.T) fail_moe_row_token(p, r[p], a.T);
  return a;
}

at::Tensor gather_rows(const at::Tensor& xs_src, const at::Tensor& row_token, int64_t count) {
  // xs_src [T, H] contiguous, compute dtype; returns [count, H] with row p = xs_src[row_token[p]].
  const int64_t H = xs_src.size(1);
  at::Tensor out = at::empty({count, H}, xs_src.options());
  const int64_t* r = row_token.data_ptr<int64_t>();
  const int64_t row_bytes = H * static_cast<int64_t>(xs_src.element_size());
  const char* src = static_cast<const char*>(xs_src.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  // Serial below ~256 KB so decode-size calls keep a single parallel region (the experts).
  at::parallel_for(0, count, std::max<int64_t>(1, 262144 / std::max<int64_t>(row_bytes, 1)),
                   [&](int64_t p0, int64_t p1) {
                     for (int64_t p = p0; p < p1; ++p)
                       std::memcpy(dst + p * row_bytes, src + r[p] * row_bytes, row_bytes);
                   });
  return out;
}

template <typename S>
void activate_rows(MoeActivation act, bool gated, const at::Tensor& a, int64_t F, at::Tensor& h) {
  // a [n, F1] (gate | up), h [n, F].
  const int64_t n = a.size(0), F1 = a.size(1);
  const S* src = a.data_ptr<S>();
  S* dst = h.data_ptr<S>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)),
                   [&](int64_t i0, int64_t i1) {
                     for (int64_t i = i0; i < i1; ++i)
                       moe_activate<S>(act, src + i * F1, gated ? src + i * F1 + F : nullptr, F,
                                       dst + i * F);
                   });
}

// Vectorized ATen activation for the BLAS path: act(a[:, :F]) (* a[:, F:] when gated).
at::Tensor aten_activation(MoeActivation act, bool gated, const at::Tensor& a, int64_t F) {
  const at::Tensor g = gated ? a.narrow(1, 0, F) : a;
  at::Tensor h;
  switch (act) {
    case MoeActivation::kSilu: h = at::silu(g); break;
    case MoeActivation::kGelu: h = at::gelu(g); break;
    case MoeActivation::kGeluTanh: h = at::gelu(g, "tanh"); break;
    case MoeActivation::kRelu: h = at::relu(g); break;
  }
  if (gated) h.mul_(a.narrow(1, F, F));
  return h;
}

at::Tensor moe_expert_mlp_cpu(const at::Tensor& x, const at::Tensor& row_token_in,
                              const at::Tensor& offsets_in, const at::Tensor& w1_in,
                              const at::Tensor& w2_in, c10::string_view activation, bool gated) {
  const ExpertArgs a =
      check_expert_args(x, row_token_in, offsets_in, w1_in, w2_in, activation, gated);
  const at::ScalarType S = moe_compute_dtype(x);
  const at::Tensor xc = x.to(S).contiguous();
  const at::Tensor row_token = row_token_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  at::Tensor y = at::empty({a.P, a.H}, xc.options());
  if (a.P > a.kept) y.narrow(0, a.kept, a.P - a.kept).zero_();
  if (a.kept == 0 || a.H == 0) return y;
  if (a.F == 0) {
    y.narrow(0, 0, a.kept).zero_();
    return y;
  }
  const int64_t* o = offsets.data_ptr<int64_t>();
  const at::Tensor xs = gather_rows(xc, row_token, a.kept);  // expert-major segment buffer

  // BLAS per expert on the gathered segment: fp64 (the ukernels compute in fp32), and long
  // segments where the ISA has no GEMM ukernel of its own (the scalar one is a reference loop).
  auto blas_expert = [&](int64_t e) {
    const int64_t n = o[e + 1] - o[e];
    const at::Tensor seg = xs.narrow(0, o[e], n);
    const at::Tensor act_in = at::mm(seg, w1[e].to(S).t());
    const at::Tensor h = aten_activation(a.act, a.gated, act_in, a.F);
    at::Tensor out = y.narrow(0, o[e], n);
    at::mm_out(out, h, w2[e].to(S).t());
  };
  if (S != at::kFloat) {
    for (int64_t e = 0; e < a.E; ++e)
      if (o[e + 1] > o[e]) blas_expert(e);
    return y;
  }

  const ValueType wt1 = w1.scalar_type() == at::kBFloat16 ? ValueType::kBF16
                                                              : ValueType::kF32;
  const ValueType wt2 = w2.scalar_type() == at::kBFloat16 ? ValueType::kBF16
                                                              : ValueType::kF32;
  // Segments past the GEMV rows are "long". Two policies for them, timed by the plan cache where
  // the active tier has its own GEMM ("kernels", the default with tuning off, and "blas": at::mm
  // per expert). Long segments run our GEMM ukernel only where it was written for the active tier; a tier
  // that falls back to a lower one gives them to at::mm, whose BLAS runs the active tier's code
  // (MKL's AVX-512 GEMM is about 1.6x faster than the AVX2 ukernel on an AVX-512 Xeon). The GEMV
  // for short segments, bandwidth-bound, takes the fallback ukernel. Segments past the tier's
  // gemm_max_rows go to at::mm too: measured on the AVX-512 Xeon (expert op, H 1024, F 2816, one
  // thread, thread CPU time), its 8x48 GEMM is 1.16x faster than at::mm at 64 rows per expert,
  // even at 128 and 1.2x slower at 512 (fp32; crossover ~160 rows, bf16 ~384: moe-avx512.cpp).
  const bool own_gemm = active_isa() != Isa::kScalar &&
                        moe_ukernels(active_isa(), wt1) != nullptr &&
                        moe_ukernels(active_isa(), wt2) != nullptr;
  const MoeUkernels* k1 =
      lookup_along_chain(active_isa(), [&](Isa isa) { return moe_ukernels(isa, wt1); });
  const MoeUkernels* k2 =
      lookup_along_chain(active_isa(), [&](Isa isa) { return moe_ukernels(isa, wt2); });
  const int64_t rows1 = gemv_rows(k1), rows2 = gemv_rows(k2);
  const int64_t long_rows = std::min(rows1, rows2);
  // The ukernel for a segment of n rows: GEMV for decode-size segments, GEMM beyond.
  auto pick = [](const MoeUkernels* k, int64_t rows, int64_t n) {
    return n <= rows ? k->gemv : k->gemm;
  };
  auto past_gemm = [](const MoeUkernels* k, int64_t n) {
    return k->gemm_max_rows > 0 && n > k->gemm_max_rows;
  };
  // Every row of y belongs to one segment and is overwritten by whichever path runs it, so the
  // plan cache can time both policies for long segments on the real inputs.
  auto run = [&](bool long_to_blas) {
    std::vector<int64_t> touched;  // experts for the ukernels below
    for (int64_t e = 0; e < a.E; ++e) {
      const int64_t n = o[e + 1] - o[e];
      if (n == 0) continue;
      if (n > long_rows && (long_to_blas || past_gemm(k1, n) || past_gemm(k2, n))) blas_expert(e);
      else touched.push_back(e);
    }
    if (touched.empty()) return;
    const int64_t H = a.H, F = a.F, F1 = a.F1;
    const char* w1p = static_cast<const char*>(w1.data_ptr());
    const char* w2p = static_cast<const char*>(w2.data_ptr());
    const int64_t w1_expert_bytes = F1 * H * static_cast<int64_t>(w1.element_size());
    const int64_t w2_expert_bytes = H * F * static_cast<int64_t>(w2.element_size());
    const float* xsp = xs.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::Tensor hbuf = at::empty({a.kept, F}, xs.options());
    float* hp = hbuf.data_ptr<float>();
    // A segment runs in ceil(n / kChunk) equal token chunks (257 rows: 129 + 128, not 256 + 1).
    auto chunk_rows = [](int64_t n) {
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      return (n + chunks - 1) / chunks;
    };
    int64_t chunk = 0;
    for (int64_t e : touched) chunk = std::max(chunk, chunk_rows(o[e + 1] - o[e]));

    // One parallel region; threads take items from a shared counter (robust to a descheduled or
    // slower thread). Items [0, items1): phase 1, h[rows of e, f0:f1] = act(x Wg[f0:f1]^T) *
    // (x Wu[f0:f1]^T). Items [items1, items1 + items2): phase 2, y[rows of e, h0:h1] =
    // h W_down[h0:h1]^T, which starts once every phase-1 tile of expert e is done.
    const int64_t tiles_f = (F + kTileF - 1) / kTileF;
    const int64_t tiles_h = (H + kTileH - 1) / kTileH;
    const int64_t num_touched = static_cast<int64_t>(touched.size());
    const int64_t items1 = num_touched * tiles_f, items2 = num_touched * tiles_h;
    std::atomic<int64_t> next{0};
    std::vector<std::atomic<int64_t>> done1(static_cast<size_t>(num_touched));
    for (auto& d : done1) d.store(0);
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), items1 + items2);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<float> g(static_cast<size_t>(chunk * kTileF)), u(g.size());
      for (;;) {
        const int64_t item = next.fetch_add(1);
        if (item >= items1 + items2) break;
        if (item < items1) {
          const int64_t s = item / tiles_f, e = touched[s];
          const int64_t f0 = (item % tiles_f) * kTileF, f1 = std::min(F, f0 + kTileF);
          const int64_t n = o[e + 1] - o[e], tf = f1 - f0;
          const MoeGemvUkernel mm = pick(k1, rows1, n);
          const void* we = w1p + e * w1_expert_bytes;
          const int64_t step = chunk_rows(n);
          for (int64_t r0 = 0; r0 < n; r0 += step) {
            const int64_t nc = std::min(step, n - r0);
            const float* xe = xsp + (o[e] + r0) * H;
            mm(we, H, f0, f1, xe, H, nc, g.data(), tf);
            if (a.gated) mm(we, H, F + f0, F + f1, xe, H, nc, u.data(), tf);
            for (int64_t r = 0; r < nc; ++r) {
              const float* gr = g.data() + r * tf;
              const float* ur = a.gated ? u.data() + r * tf : nullptr;
              float* hr = hp + (o[e] + r0 + r) * F + f0;
              if (a.act == MoeActivation::kSilu) k1->silu(gr, ur, tf, hr);
              else moe_activate<float>(a.act, gr, ur, tf, hr);
            }
          }
          done1[s].fetch_add(1, std::memory_order_release);
        } else {
          const int64_t i2 = item - items1, s = i2 / tiles_h, e = touched[s];
          while (done1[s].load(std::memory_order_acquire) < tiles_f) std::this_thread::yield();
          const int64_t h0 = (i2 % tiles_h) * kTileH, h1 = std::min(H, h0 + kTileH);
          const int64_t n = o[e + 1] - o[e];
          const MoeGemvUkernel mm = pick(k2, rows2, n);
          const int64_t step = chunk_rows(n);
          for (int64_t r0 = 0; r0 < n; r0 += step) {
            const int64_t nc = std::min(step, n - r0);
            mm(w2p + e * w2_expert_bytes, F, h0, h1, hp + (o[e] + r0) * F, F, nc,
               yp + (o[e] + r0) * H + h0, H);
          }
        }
      }
    });
  };
  bool has_long = false;
  for (int64_t e = 0; e < a.E; ++e) has_long |= o[e + 1] - o[e] > long_rows;
  std::vector<PlanCandidate<bool>> policies{{"kernels", false}};
  if (!own_gemm) policies = {{"blas", true}};
  else if (has_long) policies.push_back({"blas", true});
  int64_t longest = 0;
  for (int64_t e = 0; e < a.E; ++e) longest = std::max(longest, o[e + 1] - o[e]);
  const std::string key = plan_key(
      "moe_experts", {wt1 == ValueType::kBF16 ? "bf16" : "f32", "H" + std::to_string(a.H),
                      "F" + std::to_string(a.F), "E" + std::to_string(a.E),
                      "rows" + std::to_string(plan_bucket(a.kept)),
                      "longest" + std::to_string(plan_bucket(longest))});
  run_planned(key, policies, [&](bool long_to_blas) { run(long_to_blas); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_expert_mlp_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& row_token_in,
    const at::Tensor& offsets_in, const at::Tensor& w1, const at::Tensor& w2,
    c10::string_view activation, bool gated) {
  const ExpertArgs a = check_expert_args(x, row_token_in, offsets_in, w1, w2, activation, gated);
  check_moe_expert_grad_y(grad_y, a, &check_cpu);
  const at::ScalarType S = moe_compute_dtype(x);
  const at::Tensor xc = x.to(S).contiguous();
  const at::Tensor gy = grad_y.to(S).contiguous();
  const at::Tensor row_token = row_token_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  const int64_t* o = offsets.data_ptr<int64_t>();
  at::Tensor grad_rows = at::zeros({a.kept, a.H}, xc.options());
  at::Tensor gw1 = at::zeros({a.E, a.F1, a.H}, xc.options());
  at::Tensor gw2 = at::zeros({a.E, a.H, a.F}, xc.options());
  if (a.kept > 0 && a.H > 0 && a.F > 0) {
    const at::Tensor xs = gather_rows(xc, row_token, a.kept);
    for (int64_t e = 0; e < a.E; ++e) {
      const int64_t n = o[e + 1] - o[e];
      if (n == 0) continue;
      const at::Tensor seg = xs.narrow(0, o[e], n);
      const at::Tensor W1 = w1[e].to(S), W2 = w2[e].to(S);
      const at::Tensor pre = at::mm(seg, W1.t()).contiguous();  // [n, F1]
      at::Tensor h = at::empty({n, a.F}, xs.options());
      at::Tensor dpre = at::empty({n, a.F1}, xs.options());
      const at::Tensor dy = gy.narrow(0, o[e], n);
      AT_DISPATCH_FLOATING_TYPES(S, "moe_expert_bwd", [&] {
        activate_rows<scalar_t>(a.act, a.gated, pre, a.F, h);
        const at::Tensor dh = at::mm(dy, W2).contiguous();  // [n, F]
        const scalar_t* pp = pre.data_ptr<scalar_t>();
        const scalar_t* dhp = dh.data_ptr<scalar_t>();
        scalar_t* dp = dpre.data_ptr<scalar_t>();
        const int64_t F = a.F, F1 = a.F1;
        at::parallel_for(0, n, std::max<int64_t>(1, 16384 / F), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i)
            moe_activate_backward<scalar_t>(a.act, pp + i * F1, a.gated ? pp + i * F1 + F : nullptr,
                                            dhp + i * F, F, dp + i * F1,
                                            a.gated ? dp + i * F1 + F : nullptr);
        });
      });
      gw2[e].copy_(at::mm(dy.t(), h));
      gw1[e].copy_(at::mm(dpre.t(), seg));
      at::Tensor gr = grad_rows.narrow(0, o[e], n);
      at::mm_out(gr, dpre, W1);
    }
  }
  // grad_x[t] = sum of grad_rows of token t, in row order (deterministic).
  at::Tensor grad_x = at::empty({a.T, a.H}, xc.options());
  at::Tensor token_offsets = at::empty({a.T + 1}, row_token.options());
  at::Tensor token_rows = at::empty({a.kept}, row_token.options());
  const std::string error =
      moe_rows_by_token(row_token.data_ptr<int64_t>(), a.kept, a.T,
                        token_offsets.data_ptr<int64_t>(), token_rows.data_ptr<int64_t>());
  TORCH_CHECK(error.empty(), "moe_expert_mlp_backward: ", error);
  AT_DISPATCH_FLOATING_TYPES(S, "moe_scatter_rows", [&] {
    at::parallel_for(0, a.T, std::max<int64_t>(1, 16384 / std::max<int64_t>(a.H, 1)),
                     [&](int64_t t0, int64_t t1) {
                       moe_scatter_rows_tokens<scalar_t>(
                           grad_rows.data_ptr<scalar_t>(), token_offsets.data_ptr<int64_t>(),
                           token_rows.data_ptr<int64_t>(), a.H, t0, t1,
                           grad_x.data_ptr<scalar_t>());
                     });
  });
  return {grad_x.to(x.scalar_type()), gw1.to(w1.scalar_type()), gw2.to(w2.scalar_type())};
}

// ---- Combine -----------------------------------------------------------------------------------
void check_combine_args(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& inverse) {
  checked_moe_combine_args(y, weights, inverse, &check_cpu);
  const at::Tensor inv = inverse.contiguous();
  const int64_t* ip = inv.data_ptr<int64_t>();
  const int64_t rows = y.size(0);
  for (int64_t i = 0; i < inv.numel(); ++i)
    if (ip[i] < 0 || ip[i] >= rows) fail_moe_inverse_range(i, inv.size(1), ip[i], rows);
}

at::Tensor moe_combine_cpu(const at::Tensor& y, const at::Tensor& weights,
                           const at::Tensor& inverse) {
  check_combine_args(y, weights, inverse);
  const at::ScalarType S = moe_compute_dtype(y);
  const at::Tensor yc = y.to(S).contiguous();
  const at::Tensor wc = weights.to(S).contiguous();
  const at::Tensor inv = inverse.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1);
  at::Tensor out = at::empty({T, H}, yc.options());
  AT_DISPATCH_FLOATING_TYPES(S, "moe_combine", [&] {
    at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(H * k, 1)),
                     [&](int64_t t0, int64_t t1) {
                       moe_combine_tokens<scalar_t>(yc.data_ptr<scalar_t>(),
                                                    wc.data_ptr<scalar_t>(),
                                                    inv.data_ptr<int64_t>(), k, H, t0, t1,
                                                    out.data_ptr<scalar_t>());
                     });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moe_combine_backward_cpu(const at::Tensor& grad_out,
                                                            const at::Tensor& y,
                                                            const at::Tensor& weights,
                                                            const at::Tensor& inverse) {
  check_combine_args(y, weights, inverse);
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1);
  check_moe_combine_grad_out(grad_out, T, H, &check_cpu);
  const at::ScalarType S = moe_compute_dtype(y);
  const at::Tensor yc = y.to(S).contiguous();
  const at::Tensor wc = weights.to(S).contiguous();
  const at::Tensor gc = grad_out.to(S).contiguous();
  const at::Tensor inv = inverse.contiguous();
  // Each pair writes its own row of grad_y (no accumulation, parallel over tokens), so a row
  // shared by two pairs would be overwritten (and raced on): reject a non-injective inverse.
  {
    const int64_t* ip = inv.data_ptr<int64_t>();
    std::vector<bool> seen(static_cast<size_t>(y.size(0)), false);
    for (int64_t i = 0; i < inv.numel(); ++i) {
      if (seen[ip[i]]) fail_moe_inverse_repeat(i, k, ip[i]);
      seen[ip[i]] = true;
    }
  }
  // Rows no pair points at (only possible with a non-permutation inverse) get zero gradient.
  at::Tensor grad_y = at::zeros({y.size(0), H}, yc.options());
  at::Tensor grad_w = at::empty({T, k}, yc.options());
  AT_DISPATCH_FLOATING_TYPES(S, "moe_combine_backward", [&] {
    at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(H * k, 1)),
                     [&](int64_t t0, int64_t t1) {
                       moe_combine_backward_tokens<scalar_t>(
                           gc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                           wc.data_ptr<scalar_t>(), inv.data_ptr<int64_t>(), k, H, t0, t1,
                           grad_y.data_ptr<scalar_t>(), grad_w.data_ptr<scalar_t>());
                     });
  });
  return {grad_y.to(y.scalar_type()), grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_expert_mlp", &moe_expert_mlp_cpu);
  m.impl("moe_expert_mlp_backward", &moe_expert_mlp_backward_cpu);
  m.impl("moe_combine", &moe_combine_cpu);
  m.impl("moe_combine_backward", &moe_combine_backward_cpu);
}

}  // namespace sparse_ext

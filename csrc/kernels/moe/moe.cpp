// Routing, permute, combine, scatter, activations and the ukernel registry (portable C++; the
// loops here are bandwidth-bound or tiny, the expert GEMV ukernels are per ISA).
#include "moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/registry.h"

namespace sparse_ext {

// ---- Routing -----------------------------------------------------------------------------------
std::string moe_route_validate(const MoeRouteParams& p) {
  if (p.experts < 1) return "num_experts must be >= 1, got " + std::to_string(p.experts);
  if (p.top_k < 1 || p.top_k > p.experts)
    return "top_k must be in [1, num_experts=" + std::to_string(p.experts) + "], got " +
           std::to_string(p.top_k);
  if (p.num_groups < 1) return "num_groups must be >= 1, got " + std::to_string(p.num_groups);
  if (p.experts % p.num_groups != 0)
    return "num_experts (" + std::to_string(p.experts) + ") must be a multiple of num_groups (" +
           std::to_string(p.num_groups) + ")";
  if (p.num_groups > 1) {
    if (p.topk_groups < 1 || p.topk_groups > p.num_groups)
      return "topk_groups must be in [1, num_groups=" + std::to_string(p.num_groups) + "], got " +
             std::to_string(p.topk_groups);
    if (p.top_k > p.topk_groups * (p.experts / p.num_groups))
      return "top_k (" + std::to_string(p.top_k) + ") exceeds the experts in topk_groups groups (" +
             std::to_string(p.topk_groups * (p.experts / p.num_groups)) + ")";
  }
  return std::string();
}

namespace {

// Inserts (value, id) into the descending list [vals, ids) of length `len` (capacity cap).
// Equal values keep the earlier-inserted (lower) id first: torch.topk's tie order.
template <typename S>
inline void topk_insert(S value, int64_t id, S* vals, int64_t* ids, int64_t& len, int64_t cap) {
  if (len == cap && !(value > vals[len - 1])) return;
  int64_t pos = len < cap ? len : cap - 1;
  while (pos > 0 && value > vals[pos - 1]) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = value;
  ids[pos] = id;
  if (len < cap) ++len;
}

}  // namespace

template <typename S>
void moe_route_tokens(const S* logits, const S* selection_bias, const MoeRouteParams& p,
                      int64_t t0, int64_t t1, S* weights, int64_t* indices) {
  const int64_t E = p.experts, k = p.top_k;
  std::vector<S> score(static_cast<size_t>(E)), sel(static_cast<size_t>(E));
  std::vector<S> top_vals(static_cast<size_t>(E));
  std::vector<int64_t> top_ids(static_cast<size_t>(E));
  std::vector<char> allowed(static_cast<size_t>(E), 1);
  const int64_t G = p.num_groups, gsize = E / G;
  std::vector<S> gval(static_cast<size_t>(G));
  std::vector<int64_t> gid(static_cast<size_t>(G));
  for (int64_t t = t0; t < t1; ++t) {
    const S* l = logits + t * E;
    if (p.scoring == MoeScoring::kSoftmax) {
      S mx = l[0];
      for (int64_t e = 1; e < E; ++e) mx = std::max(mx, l[e]);
      S sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        score[e] = std::exp(l[e] - mx);
        sum += score[e];
      }
      for (int64_t e = 0; e < E; ++e) score[e] /= sum;
    } else {
      for (int64_t e = 0; e < E; ++e) score[e] = S(1) / (S(1) + std::exp(-l[e]));
    }
    for (int64_t e = 0; e < E; ++e)
      sel[e] = selection_bias != nullptr ? score[e] + selection_bias[e] : score[e];
    if (G > 1) {
      int64_t glen = 0;
      for (int64_t g = 0; g < G; ++g) {
        S b0 = sel[g * gsize], b1 = 0;
        bool has1 = false;
        for (int64_t e = 1; e < gsize; ++e) {
          const S v = sel[g * gsize + e];
          if (v > b0) {
            b1 = b0;
            b0 = v;
            has1 = true;
          } else if (!has1 || v > b1) {
            b1 = v;
            has1 = true;
          }
        }
        topk_insert<S>(has1 ? b0 + b1 : b0, g, gval.data(), gid.data(), glen, p.topk_groups);
      }
      std::fill(allowed.begin(), allowed.end(), 0);
      for (int64_t i = 0; i < glen; ++i)
        std::fill(allowed.begin() + gid[i] * gsize, allowed.begin() + (gid[i] + 1) * gsize, 1);
    }
    int64_t len = 0;
    for (int64_t e = 0; e < E; ++e)
      if (allowed[e]) topk_insert<S>(sel[e], e, top_vals.data(), top_ids.data(), len, k);
    // NaN scores never compare greater: fill any missing slot with the lowest unused experts.
    for (int64_t e = 0; len < k && e < E; ++e) {
      bool used = false;
      for (int64_t i = 0; i < len; ++i) used = used || top_ids[i] == e;
      if (!used) {
        top_vals[len] = sel[e];
        top_ids[len++] = e;
      }
    }
    S total = 0;
    for (int64_t i = 0; i < k; ++i) total += score[top_ids[i]];
    const S scale = p.renormalize ? S(1) / total : S(1);
    for (int64_t i = 0; i < k; ++i) {
      weights[t * k + i] = score[top_ids[i]] * scale;
      indices[t * k + i] = top_ids[i];
    }
  }
}

template void moe_route_tokens<float>(const float*, const float*, const MoeRouteParams&, int64_t,
                                      int64_t, float*, int64_t*);
template void moe_route_tokens<double>(const double*, const double*, const MoeRouteParams&,
                                       int64_t, int64_t, double*, int64_t*);

// ---- Permute -----------------------------------------------------------------------------------
std::string moe_permute(const int64_t* indices, int64_t T, int64_t k, int64_t E, int64_t capacity,
                        int64_t* row_token, int64_t* offsets, int64_t* inverse) {
  const int64_t P = T * k;
  for (int64_t i = 0; i < P; ++i)
    if (indices[i] < 0 || indices[i] >= E)
      return "expert index out of range: topk_indices[" + std::to_string(i / k) + ", " +
             std::to_string(i % k) + "] = " + std::to_string(indices[i]) +
             ", expected a value in [0, " + std::to_string(E) + ")";
  // kept[i]: whether pair i survives the capacity limit (slot-major priority).
  std::vector<char> kept(static_cast<size_t>(P), 1);
  std::vector<int64_t> count(static_cast<size_t>(E) + 1, 0);
  if (capacity >= 0) {
    std::vector<int64_t> taken(static_cast<size_t>(E), 0);
    for (int64_t j = 0; j < k; ++j)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = t * k + j, e = indices[i];
        kept[i] = taken[e] < capacity;
        taken[e] += kept[i];
      }
  }
  for (int64_t i = 0; i < P; ++i)
    if (kept[i]) count[indices[i] + 1]++;
  for (int64_t e = 0; e < E; ++e) count[e + 1] += count[e];
  for (int64_t e = 0; e <= E; ++e) offsets[e] = count[e];
  int64_t dropped_pos = count[E];
  for (int64_t i = 0; i < P; ++i) {
    const int64_t row = kept[i] ? count[indices[i]]++ : dropped_pos++;
    row_token[row] = i / k;
    inverse[i] = row;
  }
  return std::string();
}

std::string moe_rows_by_token(const int64_t* row_token, int64_t P, int64_t T,
                              int64_t* token_offsets, int64_t* token_rows) {
  for (int64_t t = 0; t <= T; ++t) token_offsets[t] = 0;
  for (int64_t p = 0; p < P; ++p) {
    if (row_token[p] < 0 || row_token[p] >= T)
      return "row_token[" + std::to_string(p) + "] = " + std::to_string(row_token[p]) +
             " is out of range, expected a token in [0, " + std::to_string(T) + ")";
    token_offsets[row_token[p] + 1]++;
  }
  for (int64_t t = 0; t < T; ++t) token_offsets[t + 1] += token_offsets[t];
  std::vector<int64_t> fill(token_offsets, token_offsets + T);
  for (int64_t p = 0; p < P; ++p) token_rows[fill[row_token[p]]++] = p;
  return std::string();
}

// ---- Combine and scatter -----------------------------------------------------------------------
template <typename S>
void moe_combine_tokens(const S* y, const S* weights, const int64_t* inverse, int64_t k, int64_t H,
                        int64_t t0, int64_t t1, S* out) {
  for (int64_t t = t0; t < t1; ++t) {
    S* o = out + t * H;
    const S w0 = weights[t * k];
    const S* y0 = y + inverse[t * k] * H;
    for (int64_t h = 0; h < H; ++h) o[h] = w0 * y0[h];
    for (int64_t j = 1; j < k; ++j) {
      const S w = weights[t * k + j];
      const S* yj = y + inverse[t * k + j] * H;
      for (int64_t h = 0; h < H; ++h) o[h] += w * yj[h];
    }
  }
}

template <typename S>
void moe_combine_backward_tokens(const S* grad_out, const S* y, const S* weights,
                                 const int64_t* inverse, int64_t k, int64_t H, int64_t t0,
                                 int64_t t1, S* grad_y, S* grad_w) {
  for (int64_t t = t0; t < t1; ++t) {
    const S* g = grad_out + t * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = inverse[t * k + j];
      const S w = weights[t * k + j];
      const S* yr = y + row * H;
      S* gy = grad_y + row * H;
      S dot = 0;
      for (int64_t h = 0; h < H; ++h) {
        gy[h] = w * g[h];
        dot += g[h] * yr[h];
      }
      grad_w[t * k + j] = dot;
    }
  }
}

template <typename S>
void moe_scatter_rows_tokens(const S* src, const int64_t* token_offsets, const int64_t* token_rows,
                             int64_t H, int64_t t0, int64_t t1, S* out) {
  for (int64_t t = t0; t < t1; ++t) {
    S* o = out + t * H;
    std::fill(o, o + H, S(0));
    for (int64_t i = token_offsets[t]; i < token_offsets[t + 1]; ++i) {
      const S* s = src + token_rows[i] * H;
      for (int64_t h = 0; h < H; ++h) o[h] += s[h];
    }
  }
}

#define SE_MOE_INSTANTIATE(S)                                                                   \
  template void moe_combine_tokens<S>(const S*, const S*, const int64_t*, int64_t, int64_t,     \
                                      int64_t, int64_t, S*);                                    \
  template void moe_combine_backward_tokens<S>(const S*, const S*, const S*, const int64_t*,    \
                                               int64_t, int64_t, int64_t, int64_t, S*, S*);     \
  template void moe_scatter_rows_tokens<S>(const S*, const int64_t*, const int64_t*, int64_t,   \
                                           int64_t, int64_t, S*);
SE_MOE_INSTANTIATE(float)
SE_MOE_INSTANTIATE(double)
#undef SE_MOE_INSTANTIATE

// ---- Activation --------------------------------------------------------------------------------
bool moe_activation_from_name(const char* name, MoeActivation* out) {
  if (std::strcmp(name, "silu") == 0) *out = MoeActivation::kSilu;
  else if (std::strcmp(name, "gelu") == 0) *out = MoeActivation::kGelu;
  else if (std::strcmp(name, "gelu_tanh") == 0) *out = MoeActivation::kGeluTanh;
  else if (std::strcmp(name, "relu") == 0) *out = MoeActivation::kRelu;
  else return false;
  return true;
}

namespace {

constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kInvSqrt2 = 0.70710678118654752440;

template <typename S>
inline S act_value(MoeActivation act, S x) {
  switch (act) {
    case MoeActivation::kSilu: return x / (S(1) + std::exp(-x));
    case MoeActivation::kGelu: return S(0.5) * x * (S(1) + std::erf(x * S(kInvSqrt2)));
    case MoeActivation::kGeluTanh:
      return S(0.5) * x * (S(1) + std::tanh(S(kSqrt2OverPi) * (x + S(0.044715) * x * x * x)));
    case MoeActivation::kRelu: return x > S(0) ? x : S(0);
  }
  return x;
}

template <typename S>
inline S act_grad(MoeActivation act, S x) {
  switch (act) {
    case MoeActivation::kSilu: {
      const S s = S(1) / (S(1) + std::exp(-x));
      return s * (S(1) + x * (S(1) - s));
    }
    case MoeActivation::kGelu: {
      const S cdf = S(0.5) * (S(1) + std::erf(x * S(kInvSqrt2)));
      const S pdf = std::exp(S(-0.5) * x * x) * S(0.39894228040143267794);
      return cdf + x * pdf;
    }
    case MoeActivation::kGeluTanh: {
      const S inner = S(kSqrt2OverPi) * (x + S(0.044715) * x * x * x);
      const S th = std::tanh(inner);
      const S dinner = S(kSqrt2OverPi) * (S(1) + S(3 * 0.044715) * x * x);
      return S(0.5) * (S(1) + th) + S(0.5) * x * (S(1) - th * th) * dinner;
    }
    case MoeActivation::kRelu: return x > S(0) ? S(1) : S(0);
  }
  return S(1);
}

}  // namespace

template <typename S>
void moe_activate(MoeActivation act, const S* g, const S* u, int64_t n, S* h) {
  if (u != nullptr) {
    for (int64_t i = 0; i < n; ++i) h[i] = act_value(act, g[i]) * u[i];
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = act_value(act, g[i]);
  }
}

template <typename S>
void moe_activate_backward(MoeActivation act, const S* g, const S* u, const S* dh, int64_t n,
                           S* dg, S* du) {
  if (u != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const S a = act_value(act, g[i]);
      const S d = act_grad(act, g[i]);
      const S dhi = dh[i];
      dg[i] = dhi * u[i] * d;
      du[i] = dhi * a;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dg[i] = dh[i] * act_grad(act, g[i]);
  }
}

template void moe_activate<float>(MoeActivation, const float*, const float*, int64_t, float*);
template void moe_activate<double>(MoeActivation, const double*, const double*, int64_t, double*);
template void moe_activate_backward<float>(MoeActivation, const float*, const float*, const float*,
                                           int64_t, float*, float*);
template void moe_activate_backward<double>(MoeActivation, const double*, const double*,
                                            const double*, int64_t, double*, double*);

// ---- Registry ----------------------------------------------------------------------------------
namespace {

// A tier's baseline table (no optional CPU feature).
const MoeUkernels* tier_ukernels(Isa isa, ValueType wt) {
  // Expert weights are stored as f32 or bf16 only; the per-ISA tables know no other type.
  if (wt != ValueType::kF32 && wt != ValueType::kBF16) return nullptr;
  switch (isa) {
    case Isa::kScalar: return moe_ukernels_scalar(wt);
    case Isa::kAvx2: return moe_ukernels_avx2(wt);
    case Isa::kAvx512: return moe_ukernels_avx512(wt);
    case Isa::kWasmSimd: return moe_ukernels_wasmsimd(wt);
    case Isa::kNeon: return moe_ukernels_neon(wt);
    default: return nullptr;
  }
}

}  // namespace

const MoeUkernels* moe_ukernels(Isa isa, ValueType wt) {
  if (isa == Isa::kNeon && cpu_has_feature("bf16"))
    if (const MoeUkernels* k = moe_ukernels_neon_bf16(wt)) return k;
  return tier_ukernels(isa, wt);
}

namespace {

const UkernelRegistry<MoeRegistryEntry>& registry() {
  static const UkernelRegistry<MoeRegistryEntry> entries([](auto add) {
    for (Isa isa : kAllIsas)
      for (ValueType wt : {ValueType::kF32, ValueType::kBF16}) {
        add({isa, wt, tier_ukernels(isa, wt), nullptr});
        if (isa == Isa::kNeon) add({isa, wt, moe_ukernels_neon_bf16(wt), "bf16"});
      }
  });
  return entries;
}

}  // namespace

int moe_registry_size() { return registry().size(); }
const MoeRegistryEntry& moe_registry_entry(int i) { return registry().entry(i); }

}  // namespace sparse_ext

// Mixture-of-experts dispatch: routing (scores + top-k), permute (counting sort of (token, slot)
// pairs into per-expert segments), expert GEMV ukernels for decode-size segments, the fused
// activation and the deterministic weighted combine. Torch-free: raw pointers and sizes in.
//
// Notation used by every entry point below:
//   T  tokens, E  experts, k  experts per token (top_k), H  hidden size, F  expert ffn size,
//   P = T * k  (token, slot) pairs; pair (t, j) has flat id t * k + j.
// Segments: after the permute, rows [offsets[e], offsets[e + 1]) of the expert-major row buffer
// belong to expert e; row p holds token row_token[p]. Rows at or past offsets[E] are dropped pairs
// (capacity mode) and contribute zero.
#pragma once

#include <cstdint>
#include <string>

#include "../common/isa.h"
#include "../common/value_type.h"

namespace sparse_ext {

// ---- Routing -----------------------------------------------------------------------------------
enum class MoeScoring : int { kSoftmax = 0, kSigmoid = 1 };

struct MoeRouteParams {
  int64_t experts;       // E
  int64_t top_k;         // k, 1 <= k <= E
  MoeScoring scoring;
  bool renormalize;      // divide the k selected scores by their sum
  int64_t num_groups;    // 1 = plain top-k; G > 1: grouped top-k (E % G == 0)
  int64_t topk_groups;   // groups kept when num_groups > 1
};

// Returns an empty string when the parameters are consistent, else a message naming the problem.
std::string moe_route_validate(const MoeRouteParams& p);

// Tokens [t0, t1):
//   logits          S [T, E]      router logits, row-major.
//   selection_bias  S [E] or null added to the scores for selection only (DeepSeek-V3 style).
//   weights         S [T, k]      the selected scores (softmax probability or sigmoid), in
//                                 descending selection order, renormalized when asked.
//   indices         int64 [T, k]  expert ids; ties broken by the lower expert index, as
//                                 torch.topk(sorted=True) does.
// Grouped top-k: the group score is the sum of the two largest selection scores in the group (the
// largest when a group has one expert); the topk_groups best groups are kept and the top-k runs
// over their experts only.
template <typename S>
void moe_route_tokens(const S* logits, const S* selection_bias, const MoeRouteParams& p,
                      int64_t t0, int64_t t1, S* weights, int64_t* indices);

// ---- Permute -----------------------------------------------------------------------------------
// Stable counting sort of the P = T * k pairs by expert.
//   indices    int64 [T * k]  expert of each pair (flat id t * k + j).
//   capacity   < 0: dropless. >= 0: each expert keeps at most `capacity` pairs, chosen in
//              slot-major priority (all slot-0 pairs in token order, then slot 1, ...: GShard /
//              Switch semantics); the other pairs are dropped.
//   row_token  int64 [T * k]  token of each row; kept rows are expert-major and, within an expert,
//              in increasing flat pair id; dropped rows follow at [offsets[E], P) in flat id order.
//   offsets    int64 [E + 1]  segment bounds; offsets[E] = number of kept pairs.
//   inverse    int64 [T * k]  row of each pair: row_token[inverse[i]] == i / k.
// Returns an empty string, or a message naming the first expert index out of [0, E).
std::string moe_permute(const int64_t* indices, int64_t T, int64_t k, int64_t E, int64_t capacity,
                        int64_t* row_token, int64_t* offsets, int64_t* inverse);

// ---- Combine -----------------------------------------------------------------------------------
// Tokens [t0, t1): out[t, :] = sum_{j < k} weights[t, j] * y[inverse[t * k + j], :], summed in j
// order (deterministic, no atomics).
//   y  S [P, H]   weights S [T, k]   inverse int64 [T * k]   out S [T, H]
template <typename S>
void moe_combine_tokens(const S* y, const S* weights, const int64_t* inverse, int64_t k, int64_t H,
                        int64_t t0, int64_t t1, S* out);

// Backward of the combine for tokens [t0, t1):
//   grad_y[inverse[t*k + j], :] = weights[t, j] * grad_out[t, :]
//   grad_w[t, j] = <grad_out[t, :], y[inverse[t*k + j], :]>
//   grad_out S [T, H], y S [P, H], grad_y S [P, H], grad_w S [T, k].
template <typename S>
void moe_combine_backward_tokens(const S* grad_out, const S* y, const S* weights,
                                 const int64_t* inverse, int64_t k, int64_t H, int64_t t0,
                                 int64_t t1, S* grad_y, S* grad_w);

// Deterministic scatter-add of rows by token (the gather's backward) for tokens [t0, t1):
//   out[t, :] = sum over rows p of token t, in increasing p, of src[p, :]
//   src S [P, H]; token_offsets int64 [T + 1] and token_rows int64 [P] list each token's rows
//   (build them with moe_rows_by_token); out S [T, H].
template <typename S>
void moe_scatter_rows_tokens(const S* src, const int64_t* token_offsets, const int64_t* token_rows,
                             int64_t H, int64_t t0, int64_t t1, S* out);

// CSR of rows by token: token_offsets int64 [T + 1], token_rows int64 [P], rows of each token in
// increasing order. Returns an empty string, or a message naming a row_token out of [0, T).
std::string moe_rows_by_token(const int64_t* row_token, int64_t P, int64_t T,
                              int64_t* token_offsets, int64_t* token_rows);

// ---- Activation --------------------------------------------------------------------------------
enum class MoeActivation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };
// Parses "silu" | "gelu" | "gelu_tanh" | "relu"; false for any other name.
bool moe_activation_from_name(const char* name, MoeActivation* out);

// h[i] = act(g[i]) * u[i] (gated, u != null) or act(g[i]) (u == null), i < n. h may alias g.
template <typename S>
void moe_activate(MoeActivation act, const S* g, const S* u, int64_t n, S* h);
// Derivatives for the backward: given g (and u), dh -> dg (and du).
//   gated: dg = dh * u * act'(g), du = dh * act(g);  plain: dg = dh * act'(g).
template <typename S>
void moe_activate_backward(MoeActivation act, const S* g, const S* u, const S* dh, int64_t n,
                           S* dg, S* du);

// ---- Expert GEMV ukernels (decode-size segments) ------------------------------------------------
// Rows [r0, r1) of a row-major weight W [rows, K] against a few tokens:
//   y[n * ldy + (r - r0)] = sum_{c < K} W[r, c] * x[n * ldx + c]   for n < tokens
//   w  f32 | bf16 [rows, K] (row stride K)   x  float [tokens, ldx]   y  float [tokens, ldy]
// Each weight row is read from memory once per call, whatever `tokens` is.
using MoeGemvUkernel = void (*)(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                                int64_t ldx, int64_t tokens, float* y, int64_t ldy);

// Fused SiLU(-GLU): h[i] = silu(g[i]) * u[i] (u != null) or silu(g[i]), i < n; h may alias g.
//   g, u, h  float [n]
using MoeSiluUkernel = void (*)(const float* g, const float* u, int64_t n, float* h);

struct MoeUkernels {
  const char* gemv_name;  // <dtype>-moegemv-<rows>x<tokens>-<isa>
  MoeGemvUkernel gemv;
  int64_t mr;  // weight rows per register tile
  int64_t nr;  // tokens per register tile
  const char* silu_name;  // f32-swiglu-<width>x1-<isa>
  MoeSiluUkernel silu;
  // Same contract as gemv, for long segments (prefill): packs W's rows into panels once per call
  // and runs a broadcast register tile. <dtype>-moegemm-<tokens>x<rows>-<isa>.
  const char* gemm_name;
  MoeGemvUkernel gemm;
  // Segments of at most this many tokens run faster with `gemv` than with `gemm` (the measured
  // crossover of the two on this tier; the ATen glue switches there).
  int64_t gemv_max_rows;
  // Segments longer than this run at::mm (the BLAS GEMM) instead of `gemm`, whose register tile
  // and per-call packing lose to BLAS's cache blocking there (measured crossover); 0: never.
  int64_t gemm_max_rows;
};

// The ukernels for an ISA and weight type (kF32 or kBF16), or nullptr when the ISA is not compiled
// in or the type is kF64. Where a tier has a variant for an optional CPU feature (neon: "bf16")
// and the running CPU has it, that variant.
const MoeUkernels* moe_ukernels(Isa isa, ValueType wt);
const MoeUkernels* moe_ukernels_scalar(ValueType wt);
const MoeUkernels* moe_ukernels_avx2(ValueType wt);
const MoeUkernels* moe_ukernels_avx512(ValueType wt);
const MoeUkernels* moe_ukernels_wasmsimd(ValueType wt);  // nullptr stub without SIMD128
// Plain ASIMD (every aarch64 CPU); nullptr off aarch64.
const MoeUkernels* moe_ukernels_neon(ValueType wt);
// FEAT_BF16 (BFMMLA) variant of the neon tier, kBF16 weights only (nullptr for kF32 and off
// aarch64); call it only where cpu_has_feature("bf16").
const MoeUkernels* moe_ukernels_neon_bf16(ValueType wt);
// The AVX2 GEMM entries (moe-gemm-avx2.cpp, x86-64 builds only), MoeGemvUkernel contract.
void moe_gemm_f32_6x16_avx2(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy);
void moe_gemm_bf16_6x16_avx2(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                             int64_t ldx, int64_t tokens, float* y, int64_t ldy);
// The AVX-512 GEMM entries (moe-gemm-avx512.cpp, x86-64 builds only), MoeGemvUkernel contract.
void moe_gemm_f32_8x48_avx512(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                              int64_t ldx, int64_t tokens, float* y, int64_t ldy);
void moe_gemm_bf16_8x48_avx512(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                               int64_t ldx, int64_t tokens, float* y, int64_t ldy);

// The NEON entries (moe-neon.cpp, moe-gemm-neon.cpp; aarch64 builds only), MoeGemvUkernel and
// MoeSiluUkernel contracts; the FEAT_BF16 variant (moe-neon-bf16.cpp) reuses the first two.
void moe_gemv_bf16_4x4_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy);
void moe_swiglu_neon(const float* g, const float* u, int64_t n, float* h);
void moe_gemm_f32_8x12_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy);
void moe_gemm_bf16_8x12_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                             int64_t ldx, int64_t tokens, float* y, int64_t ldy);

struct MoeRegistryEntry {
  Isa isa;
  ValueType weight_type;
  const MoeUkernels* kernels;
  // Optional CPU feature the kernels need beyond the tier (cpu_has_feature name, e.g. "bf16"), or
  // nullptr. Tests skip, and say so, an entry whose feature the CPU lacks.
  const char* cpu_feature;
};
int moe_registry_size();
const MoeRegistryEntry& moe_registry_entry(int i);

}  // namespace sparse_ext

// CUDA kernels of the MoE family (torch-free launchers; ATen glue in csrc/ops/cuda/moe_cuda.cpp).
// Semantics are those of the CPU kernels (csrc/kernels/moe/moe.h); docs/cuda.md (## MoE) explains
// the kernel design.
//
// Notation (as in moe.h):
//   T tokens, E experts, k experts per token (top_k), H hidden size, F expert ffn size,
//   F1 = 2F (gated: gate rows then up rows) or F, P = T * k (token, slot) pairs, pair (t, j) has
//   flat id t * k + j. After the permute, rows [offsets[e], offsets[e+1]) belong to expert e and
//   row p holds token row_token[p]; rows at or past offsets[E] are dropped pairs.
//
// Every launcher enqueues work on `stream`, never synchronizes, and returns the launch status
// (cudaSuccess or the first launch error). Sizes are int64_t; buffers are dense row-major.
// Every kernel is bounds-safe on malformed metadata (an index out of range is skipped or treated
// as a dropped pair, never dereferenced); the glue raises on such metadata through the separate
// validation launchers below.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sparse_ext {
namespace cuda {

// ---- Routing -----------------------------------------------------------------------------------
// Fused scores + top-k (+ renormalize, + grouped top-k with a selection bias), one warp per token.
//   logits          S [T, E]      (S = float or double)
//   selection_bias  S [E] or null added to the scores for selection only
//   weights         S [T, k]      selected scores in selection order (renormalized if asked)
//   indices         int64 [T, k]  expert ids; ties go to the lower expert index (torch.topk order)
//   scratch         S [moe_route_scratch_elems(T, E, G)] or null when that returns 0: per-token
//                   scores when they do not fit in shared memory.
// scoring: 0 softmax, 1 sigmoid. num_groups G >= 1 divides E; topk_groups in [1, G]; the caller
// has checked the parameters (moe_route_validate).
int64_t moe_route_scratch_elems(int64_t T, int64_t E, int64_t G, bool f64);
template <typename S>
cudaError_t moe_route(const S* logits, const S* selection_bias, int64_t T, int64_t E, int64_t k,
                      int scoring, bool renormalize, int64_t num_groups, int64_t topk_groups,
                      S* scratch, S* weights, int64_t* indices, cudaStream_t stream);

// ---- Permute -----------------------------------------------------------------------------------
// Validation: *first_bad = the lowest flat pair id whose expert is outside [0, E), else
// UINT64_MAX (the launcher presets it).
//   indices int64 [P]   first_bad uint64 [1]
cudaError_t moe_permute_validate(const int64_t* indices, int64_t P, int64_t E,
                                 unsigned long long* first_bad, cudaStream_t stream);

// Deterministic, stable counting sort of the pairs by expert (the CPU op's exact output):
// chunks of kPermuteChunk pairs rank their pairs in-chunk (stable), write a histogram per
// (bucket, chunk), one exclusive scan over the bucket-major (bucket, chunk) table gives every
// chunk's first row per bucket. Bucket E collects dropped pairs (and, never reached after a
// successful validation, pairs with an out-of-range expert), so they land after offsets[E] in
// flat id order. Capacity mode (capacity >= 0) first runs the same sort over the slot-major pair
// order (j * T + t) to rank each pair within its expert; pairs ranked >= capacity are dropped.
//   indices    int64 [P]      expert of each pair, P = T * k < 2^31
//   row_token  int64 [P]      out
//   offsets    int64 [E + 1]  out
//   inverse    int64 [P]      out
//   Workspace (uninitialized is fine):
//   counts     int32 [moe_permute_count_elems(P, E)]
//   rank       int32 [P]
//   kept       uint8 [P]
constexpr int kPermuteChunk = 256;
int64_t moe_permute_count_elems(int64_t P, int64_t E);
cudaError_t moe_permute(const int64_t* indices, int64_t T, int64_t k, int64_t E, int64_t capacity,
                        int32_t* counts, int32_t* rank, uint8_t* kept, int64_t* row_token,
                        int64_t* offsets, int64_t* inverse, cudaStream_t stream);

// ---- Expert MLP ----------------------------------------------------------------------------------
// Validation of the segment structure (what the CPU op checks on the host):
//   offsets int64 [E + 1], row_token int64 [P]; error uint64 [2], UINT64_MAX = no error (the
//   launcher presets it):
//   error[0] = lowest e + 1 with offsets[e + 1] < offsets[e], or 0 when offsets[0] != 0, or
//              E + 1 when offsets[E] > P (lowest code wins);
//   error[1] = lowest row p < min(offsets[E], P) with row_token[p] outside [0, T).
cudaError_t moe_expert_validate(const int64_t* offsets, const int64_t* row_token, int64_t E,
                                int64_t P, int64_t T, unsigned long long* error,
                                cudaStream_t stream);

// Decode-size segments, phase 1 (gate/up GEMV with the fused activation), for every expert e
// whose segment has 1..max_rows rows; other experts are skipped on device (no host sync). The glue
// passes max_rows = kSmallRows next to the GEMM path, or max_rows = P when the whole call has at
// most kDecodePairs pairs (every segment then runs here, the offsets never leave the device):
//   h[p, f] = act(x[row_token[p]] . W1[e, f]) * (x[row_token[p]] . W1[e, F + f])   (gated)
//   h[p, f] = act(x[row_token[p]] . W1[e, f])                                        (plain)
//   x float [T, H]   w1 TW [E, F1, H]   offsets int64 [E + 1]   row_token int64 [P]
//   h float [P, F]   (rows of other experts untouched)
// One warp per output row f: each weight row is streamed once per 8 tokens (16-byte vector loads
// when H allows) and applied to all of them. Rows with row_token outside [0, T) read zeros.
// act: 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 relu.
constexpr int kSmallRows = 16;
constexpr int kDecodePairs = 64;
template <typename TW>
cudaError_t moe_small_up(const float* x, const TW* w1, const int64_t* offsets,
                         const int64_t* row_token, int64_t T, int64_t E, int64_t H, int64_t F,
                         int64_t P, int64_t max_rows, int act, bool gated, float* h,
                         cudaStream_t stream);
// Phase 2 (down GEMV) for the same experts: y[p, c] = h[p] . W2[e, c]
//   h float [P, F]   w2 TW [E, H, F]   y float [P, H]   (rows of other experts untouched)
template <typename TW>
cudaError_t moe_small_down(const float* h, const TW* w2, const int64_t* offsets, int64_t E,
                           int64_t H, int64_t F, int64_t P, int64_t max_rows, float* y,
                           cudaStream_t stream);

// Activation for the large-segment (GEMM) path over n rows:
//   a TA [n, F1] (gate | up), h TH [n, F]: h = act(gate) * up (gated) or act(a) (plain).
template <typename TA, typename TH>
cudaError_t moe_activate(const TA* a, int64_t n, int64_t F, bool gated, int act, TH* h,
                         cudaStream_t stream);
// Its backward: given a S [n, F1] and dh S [n, F], da S [n, F1]
//   gated: da[:, :F] = dh * up * act'(gate), da[:, F:] = dh * act(gate); plain: da = dh * act'(a).
template <typename S>
cudaError_t moe_activate_backward(const S* a, const S* dh, int64_t n, int64_t F, bool gated,
                                  int act, S* da, cudaStream_t stream);

// Deterministic gather backward: out[t, :] = sum over the rows p of token t, in increasing p, of
// src[p, :]. sorted_tokens int64 [n] is row_token[:n] stably sorted, order int64 [n] the rows in
// that order (so equal tokens list their rows in increasing p). Tokens outside [0, T) are ignored.
//   src S [n, H]   out S [T, H] (fully written)
template <typename S>
cudaError_t moe_scatter_rows(const S* src, const int64_t* sorted_tokens, const int64_t* order,
                             int64_t n, int64_t T, int64_t H, S* out, cudaStream_t stream);

// ---- Combine -------------------------------------------------------------------------------------
// Validation: error uint64 [2], UINT64_MAX = no error (the launcher presets it and first_pair);
// error[0] = lowest flat pair id with inverse outside [0, rows). With check_repeats,
// first_pair uint64 [rows] (workspace) and error[1] =
// lowest pair id whose row an earlier pair already uses (moe_combine_backward needs an injective
// inverse).
cudaError_t moe_combine_validate(const int64_t* inverse, int64_t pairs, int64_t rows,
                                 bool check_repeats, unsigned long long* first_pair,
                                 unsigned long long* error, cudaStream_t stream);

// out[t, :] = sum_{j < k} weights[t, j] * y[inverse[t, j], :], summed in j order (no atomics).
//   y TY [rows, H]   weights S [T, k]   inverse int64 [T, k]   out S [T, H]
// An inverse entry outside [0, rows) contributes zero.
template <typename TY, typename S>
cudaError_t moe_combine(const TY* y, const S* weights, const int64_t* inverse, int64_t T,
                        int64_t k, int64_t H, int64_t rows, S* out, cudaStream_t stream);

// grad_y[inverse[t, j], :] = weights[t, j] * grad_out[t, :];
// grad_w[t, j] = <grad_out[t, :], y[inverse[t, j], :]> (fixed-order block reduction).
//   grad_out S [T, H]   y TY [rows, H]   weights S [T, k]   inverse int64 [T, k]
//   grad_y S [rows, H] (caller zeroes it; rows no pair points at stay zero)   grad_w S [T, k]
template <typename TY, typename S>
cudaError_t moe_combine_backward(const S* grad_out, const TY* y, const S* weights,
                                 const int64_t* inverse, int64_t T, int64_t k, int64_t H,
                                 int64_t rows, S* grad_y, S* grad_w, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ext

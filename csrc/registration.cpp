// The one place where every sparse_ext schema is defined. Implementations live in csrc/ops/
// (CPU) and csrc/cuda/ (CUDA); fake kernels and autograd in sparse_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(sparse_ext, m) {
  // ---- SpMM: blocked-CSR weight [out_features, in_features] (csrc/kernels/spmm/spmm.h) ----
  // y = x @ W^T + bias for x [..., in_features] -> [..., out_features].
  m.def(
      "spmm(Tensor x, Tensor offsets, Tensor indices, Tensor values, Tensor? bias, "
      "int out_features, int block_rows) -> Tensor");
  // W^T's structure in the same format (block_rows = 1) and the permutation of values into it.
  m.def(
      "spmm_transpose_structure(Tensor offsets, Tensor indices, int out_features, "
      "int in_features, int block_rows) -> (Tensor, Tensor, Tensor)");
  // Sampled dense-dense product: grad_out^T @ x at the stored positions, float32 [nnz * block_rows].
  m.def(
      "spmm_sddmm(Tensor grad_out, Tensor x, Tensor offsets, Tensor indices, int block_rows) "
      "-> Tensor");
  // ---- MoE: top-k routing and expert dispatch (csrc/kernels/moe/moe.h, docs/moe.md) ----
  // Scores (softmax or sigmoid) + top-k (+ renormalization) over router logits [..., E]:
  // (topk_weights [..., k] float32|float64, topk_indices [..., k] int64), ties to the lower index.
  m.def(
      "moe_route(Tensor router_logits, int top_k, str scoring, bool renormalize, "
      "Tensor? selection_bias, int num_groups, int topk_groups) -> (Tensor, Tensor)");
  // Stable counting sort of (token, slot) pairs by expert: (row_token [T*k], expert_offsets [E+1],
  // inverse [T, k]); capacity < 0 is dropless, else dropped pairs sit past expert_offsets[E].
  m.def(
      "moe_permute(Tensor topk_indices, int num_experts, int capacity) -> (Tensor, Tensor, Tensor)");
  // Expert MLP over the segments: y[p] = act(x[row_token[p]] W1_e^T) W2_e^T (gated: act(gate)*up),
  // x [T, H], w1 [E, (2 if gated else 1) * F, H], w2 [E, H, F] -> y [T*k, H] (zero past offsets[E]).
  m.def(
      "moe_expert_mlp(Tensor x, Tensor row_token, Tensor expert_offsets, Tensor w1, Tensor w2, "
      "str activation, bool gated) -> Tensor");
  // (grad_x [T, H], grad_w1, grad_w2) of moe_expert_mlp.
  m.def(
      "moe_expert_mlp_backward(Tensor grad_y, Tensor x, Tensor row_token, Tensor expert_offsets, "
      "Tensor w1, Tensor w2, str activation, bool gated) -> (Tensor, Tensor, Tensor)");
  // out[t] = sum_j topk_weights[t, j] * expert_out[inverse[t, j]], in j order.
  m.def("moe_combine(Tensor expert_out, Tensor topk_weights, Tensor inverse) -> Tensor");
  // (grad_expert_out, grad_topk_weights) of moe_combine.
  m.def(
      "moe_combine_backward(Tensor grad_out, Tensor expert_out, Tensor topk_weights, "
      "Tensor inverse) -> (Tensor, Tensor)");
  // ---- end MoE ----
}

// The one place where every sparse_ext schema is defined. Implementations live in csrc/ops/
// (CPU) and csrc/cuda/ (CUDA); fake kernels and autograd in sparse_ext/ops/<family>.py.
#include <torch/library.h>

TORCH_LIBRARY(sparse_ext, m) {
  // ---- SpMM: blocked-CSR weight [out_features, in_features] (csrc/kernels/spmm/spmm.h) ----
  // y = x @ W^T + bias for x [..., in_features] -> [..., out_features]; x's width must equal
  // in_features (the weight's, which the structure alone cannot tell within a 256-column block).
  m.def(
      "spmm(Tensor x, Tensor offsets, Tensor indices, Tensor values, Tensor? bias, "
      "int out_features, int in_features, int block_rows) -> Tensor");
  // W^T's structure in the same format (block_rows = 1) and the permutation of values into it.
  m.def(
      "spmm_transpose_structure(Tensor offsets, Tensor indices, int out_features, "
      "int in_features, int block_rows) -> (Tensor, Tensor, Tensor)");
  // Sampled dense-dense product: grad_out^T @ x at the stored positions, float32 [nnz * block_rows],
  // for grad_out [..., out_features] and x [..., in_features].
  m.def(
      "spmm_sddmm(Tensor grad_out, Tensor x, Tensor offsets, Tensor indices, int out_features, "
      "int in_features, int block_rows) -> Tensor");
  // ---- sparse conv: NCHW, blocked-CSR weight [out_channels, in_channels*kh*kw]
  // (csrc/kernels/conv/conv.h). groups = 1, zero padding; output clamped to [out_min, out_max]
  // (fused bias + activation: none = (-inf, inf), relu = (0, inf), relu6 = (0, 6)).
  // x [batch, in_channels, H, W] -> [batch, out_channels, OH, OW].
  m.def(
      "sparse_conv2d(Tensor x, Tensor offsets, Tensor indices, Tensor values, Tensor? bias, "
      "int out_channels, int in_channels, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int block_rows, float out_min, float out_max) -> Tensor");
  // Input gradient [batch, in_channels, input_size] of the unclamped convolution, for grad_out
  // [batch, out_channels, OH, OW].
  m.def(
      "sparse_conv2d_grad_input(Tensor grad_out, Tensor offsets, Tensor indices, Tensor values, "
      "int out_channels, int in_channels, int[2] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int block_rows) -> Tensor");
  // Gradient of the stored values, float32 (float64 for float64 inputs) [nnz * block_rows].
  m.def(
      "sparse_conv2d_grad_values(Tensor grad_out, Tensor x, Tensor offsets, Tensor indices, "
      "int out_channels, int in_channels, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int block_rows) -> Tensor");


  // ---- N:M semi-structured: weight [out_features, in_features] (csrc/kernels/nm/nm.h) ----
  // values [out_features, ceil(in_features / m) * n] (f32 | bf16 | f64), metadata uint8
  // [out_features, ceil(ceil(in_features / m) * n * log2(m) / 8)]: packed log2(m)-bit indices.
  // y = x @ W^T + bias for x [..., in_features] -> [..., out_features].
  m.def(
      "nm_linear(Tensor x, Tensor values, Tensor metadata, Tensor? bias, int in_features, int n, "
      "int m) -> Tensor");
  // grad_out @ W: [..., out_features] -> [..., in_features], in grad_out's dtype.
  m.def(
      "nm_linear_grad_input(Tensor grad_out, Tensor values, Tensor metadata, int in_features, "
      "int n, int m) -> Tensor");
  // grad_out^T @ x at the stored slots: float32 (float64 for float64 inputs) shaped like values.
  m.def(
      "nm_linear_grad_values(Tensor grad_out, Tensor x, Tensor metadata, int in_features, int n, "
      "int m) -> Tensor");
  // Full canonical check (indices strictly increasing within each group); raises naming the first
  // bad row and group, else returns a true bool scalar.
  m.def("nm_validate(Tensor values, Tensor metadata, int in_features, int n, int m) -> Tensor");

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
}

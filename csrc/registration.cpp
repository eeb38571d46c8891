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
}

// The blocked-CSR weight checks shared by the ops that take that format (SpMM, sparse conv).
#pragma once

#include <ATen/ATen.h>

#include "../kernels/spmm/spmm.h"

namespace sparse_ext {

// Checks dtypes, devices, lengths and the structure (spmm_validate) of W [rows, cols] and wraps
// the tensors for the kernels. `values` may be null (structure only: value_type stays kF32);
// otherwise value_type follows its dtype. `rows_name` names W's rows in error messages.
SpmmWeight checked_spmm_weight(const at::Tensor& offsets, const at::Tensor& indices,
                               const at::Tensor* values, int64_t rows, int64_t cols,
                               int64_t block_rows, const char* rows_name);

}  // namespace sparse_ext

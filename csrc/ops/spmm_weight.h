// The blocked-CSR weight checks shared by the ops that take that format (SpMM, sparse conv), on
// every device.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "../kernels/spmm/spmm.h"

namespace sparse_ext {

// Checks dtypes, devices, lengths and the structure (spmm_validate) of W [rows, cols] and wraps
// the tensors for the kernels. `values` may be null (structure only: value_type stays kF32);
// otherwise value_type follows its dtype. `rows_name` names W's rows in error messages. CPU only.
SpmmWeight checked_spmm_weight(const at::Tensor& offsets, const at::Tensor& indices,
                               const at::Tensor* values, int64_t rows, int64_t cols,
                               int64_t block_rows, const char* rows_name);

// The device-agnostic part of checked_spmm_weight (everything but the structure walk, which
// reads the offsets): block_rows, rows, devices (through `check_device`), dtypes (values must be
// one of `value_dtypes`), lengths and contiguity, with the same messages on every device. The
// returned pointers live on the tensors' device. value_type is kF32/kF64 for float/double values
// and kBF16 otherwise (the CUDA glue dispatches on the tensor dtype instead).
SpmmWeight checked_spmm_weight_args(const at::Tensor& offsets, const at::Tensor& indices,
                                    const at::Tensor* values, int64_t rows, int64_t cols,
                                    int64_t block_rows, const char* rows_name,
                                    void (*check_device)(const at::Tensor&, const char*),
                                    std::initializer_list<at::ScalarType> value_dtypes);

}  // namespace sparse_ext

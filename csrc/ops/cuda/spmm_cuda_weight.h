// Blocked-CSR weight handling shared by the SpMM and sparse-conv CUDA glue (defined in
// spmm_cuda.cpp): argument checks with the CPU messages, once-per-version device validation of
// the structure, the row-group order for load balance, dtype mapping.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "../../cuda/spmm/spmm_cuda.h"

namespace sparse_ext {

// The CPU op's checks (checked_spmm_weight_args: block_rows, rows, dtypes, lengths, contiguity)
// with "must be a CUDA tensor" device checks, values in float32/bfloat16/float16/float64, at most
// 2^31 - 1 entries, then the structure validated on the device (once per tensor version and
// geometry; raises "malformed sparse weight: ..." like the CPU op). `values` may be null.
cuda::SpmmDeviceWeight checked_spmm_weight_cuda(const at::Tensor& offsets,
                                                const at::Tensor& indices,
                                                const at::Tensor* values, int64_t rows,
                                                int64_t cols, int64_t block_rows,
                                                const char* rows_name);

// Row groups by decreasing nonzero count (stable: ties keep group order), int32 [G] on the
// offsets' device; cached per offsets tensor version. Needs a validated structure.
at::Tensor spmm_row_order_cuda(const at::Tensor& offsets, int64_t groups, int64_t k_blocks);

// The kernels' storage dtype for a tensor dtype (float, half, bfloat16, double).
cuda::CudaDType cuda_dtype_of(at::ScalarType t);

// Transposed structure of W (W^T [cols, rows] with R = 1), identical to the CPU op's result:
// offsets_t int32 [cols * ceil(rows/256) + 1], indices_t uint8 [nnz * R], perm int64 [nnz * R].
// The structure must be validated already. Built from ATen ops on the device (sort, searchsorted).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_transpose_structure_device(
    const at::Tensor& offsets, const at::Tensor& indices, int64_t rows, int64_t cols,
    int64_t block_rows);

}  // namespace sparse_ext

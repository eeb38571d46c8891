// CUDA launchers for the N:M semi-structured family (torch-free; ATen glue in
// csrc/ops/cuda/nm_cuda.cpp). Format as on the CPU (csrc/kernels/nm/nm.h):
//
//   W [rows, cols] (out_features x in_features); columns split into G = ceil(cols / m) groups of m;
//   every group stores exactly n slots (1 <= n < m, m in {4, 8, 16}); kept = G * n.
//     values    [rows, kept]         (value dtype), slot j of row r holds W[r, (j / n) * m + idx(r, j)]
//     metadata  uint8 [rows, meta_stride], meta_stride = ceil(kept * B / 8), B = log2(m):
//               slot j's index is bits j*B .. j*B + B - 1 of the row's little-endian bit stream.
//   A slot whose column is >= cols (padding of the last group) never contributes.
//
// Every buffer is a dense row-major device array; every launcher only enqueues work on `stream`
// and returns the launch status (cudaErrorInvalidValue for an unsupported dtype combination or
// bad sizes). Accumulation is fp32 (fp64 when everything is fp64). No kernel uses float atomics:
// every output element is summed by one thread in a fixed order, so results are deterministic.
// Whatever the metadata bits say, an index is < m, so no kernel reads outside these buffers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace sparse_ext {
namespace cuda {

struct NmCudaShape {
  int64_t rows;  // out_features
  int64_t cols;  // in_features
  int64_t n;     // kept slots per group
  int64_t m;     // group width: 4, 8 or 16

  __host__ __device__ int64_t groups() const { return (cols + m - 1) / m; }
  __host__ __device__ int64_t kept() const { return groups() * n; }
  __host__ __device__ int bits() const { return m == 4 ? 2 : m == 8 ? 3 : 4; }
  __host__ __device__ int64_t meta_stride() const { return (kept() * bits() + 7) / 8; }
};

// true when (value dtype, activation dtype) is a combination the kernels are instantiated for:
// both the same (f32, f16, bf16, f64), or activations f32 with f16 / bf16 values. The glue
// converts any other pair to f32 activations first.
bool nm_cuda_supported(CudaDType value_dtype, CudaDType act_dtype);

// Forward on CUDA cores or, for fp16 / bf16 values with activations of the same dtype from 16
// tokens, on tensor cores (kernels and thresholds documented in nm_cuda.cu and docs/cuda.md):
//   y[t, r] = sum_j values[r, j] * x[t, (j / n) * m + idx(r, j)]  (+ bias[r])
//   values     value_dtype [rows, kept]      metadata uint8 [rows, meta_stride]
//   x          act_dtype [tokens, cols]      y act_dtype [tokens, rows]
//   bias       float [rows] (double [rows] when act_dtype is f64) or nullptr
//   workspace  float [workspace_floats] for split-K partial sums, or nullptr; size it with
//              nm_cuda_forward_workspace (a smaller one only means fewer splits: still correct).
int64_t nm_cuda_forward_workspace(const NmCudaShape& s, CudaDType value_dtype,
                                  CudaDType act_dtype, int64_t tokens);
cudaError_t nm_cuda_forward(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                            const uint8_t* metadata, CudaDType act_dtype, const void* x,
                            int64_t tokens, const void* bias, void* y, float* workspace,
                            int64_t workspace_floats, cudaStream_t stream);

// Input gradient (one thread per input column and tile of tokens, rows summed in order):
//   dx[t, c] = sum_r dy[t, r] * W[r, c]
//   values value_dtype [rows, kept], metadata uint8 [rows, meta_stride]
//   dy act_dtype [tokens, rows], dx act_dtype [tokens, cols]
cudaError_t nm_cuda_grad_input(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                               const uint8_t* metadata, CudaDType act_dtype, const void* dy,
                               int64_t tokens, void* dx, cudaStream_t stream);

// Gradient of the values (SDDMM; one thread per slot, tokens summed in order):
//   dv[r, j] = sum_t dy[t, r] * x[t, (j / n) * m + idx(r, j)]   (0 for a padding column)
//   metadata uint8 [rows, meta_stride], dy act_dtype [tokens, rows], x act_dtype [tokens, cols]
//   dv float [rows, kept] (double when act_dtype is f64). act_dtype is the dtype of both dy and x.
cudaError_t nm_cuda_grad_values(const NmCudaShape& s, const uint8_t* metadata, CudaDType act_dtype,
                                const void* dy, const void* x, int64_t tokens, void* dv,
                                cudaStream_t stream);

// Canonical-form check on device: indices strictly increasing within every group.
//   metadata uint8 [rows, meta_stride]
//   error    int64 [1]: set to -1 (well-formed) or to the smallest r * G + g of a bad group.
cudaError_t nm_cuda_validate(const NmCudaShape& s, const uint8_t* metadata, int64_t* error,
                             cudaStream_t stream);

// Expands to a dense matrix (the sparse-tensor-core path and the GEMM-based backward):
//   dense value_dtype [rows, cols], must be zero-filled by the caller; slot j of row r is added to
//   column (j / n) * m + idx(r, j) when that is < cols (slots naming the same column, possible only
//   with non-canonical metadata, are summed in slot order by one thread: deterministic).
cudaError_t nm_cuda_expand(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                           const uint8_t* metadata, void* dense, cudaStream_t stream);

// Gathers every slot's entry of a dense [rows, cols] matrix (the GEMM-based values gradient):
//   dv[r, j] = dense[r, (j / n) * m + idx(r, j)], or 0 when that column is >= cols
//   metadata uint8 [rows, meta_stride], dense dense_dtype [rows, cols],
//   dv float [rows, kept] (double when dense_dtype is f64)
cudaError_t nm_cuda_gather_slots(const NmCudaShape& s, const uint8_t* metadata,
                                 CudaDType dense_dtype, const void* dense, void* dv,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ext

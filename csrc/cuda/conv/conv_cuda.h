// CUDA kernels of the sparse-conv family (NCHW, groups = 1, zero padding), torch-free.
//
// Weight: the SpMM family's blocked CSR (../spmm/spmm_cuda.h) for W [C_out, C_in * KH * KW];
// column c stands for (ci, kh, kw) = (c / (KH*KW), (c / KW) % KH, c % KW), i.e. nn.Conv2d's
// weight.reshape(C_out, -1). Output channels come in groups of R = block_rows sharing a pattern.
//
// 1x1 (stride 1, no padding) is not here: it is exactly the SpMM tiled kernel over the spatial
// dimension (x[b] is [C_in, H*W], already the "transposed activations" layout; the output
// [C_out, H*W] is written row-major), see spmm_tiled_cuda with y_token_major = false.
//
// kxk, implicit im2col: the forward kernel never materializes the im2col matrix. A warp owns one
// row group (R output channels) and 32 * 4 output pixels of one image; each lane keeps 4 pixels
// (p = p0 + lane + 32 v, so a warp's loads for one nonzero touch consecutive output columns) and
// for every stored entry (ci, kh, kw) reads x[b, ci, oy*sh - ph + kh*dh, ox*sw - pw + kw*dw]
// (zero outside the image), accumulating R * 4 fp32 values; bias and clamp are fused.
//
// Backward:
//   grad_input  dx[b, ci, iy, ix] = sum over stored (m, ci, kh, kw) of W * dy[b, m, oy, ox] with
//               iy = oy*sh - ph + kh*dh (same for x): a gather over W^T's rows (the transposed
//               structure, R = 1, values already permuted), one warp per input channel, lanes over
//               input pixels: deterministic, no atomics.
//   grad_values dv[j*R + r] = sum_{b, oy, ox} dy[b, g*R + r, oy, ox] * x[b, ci, iy, ix]: one warp
//               per stored entry (segment by binary search), lanes over (b, pixel), warp_sum.
//
// Every kernel is bounds-safe on its own (offsets clamped to [0, nnz], columns >= K and rows >= M
// skipped, pixels outside the image never read).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../spmm/spmm_cuda.h"

namespace sparse_ext {
namespace cuda {

struct ConvGeometry {
  int64_t batch;
  int64_t in_channels, in_h, in_w;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// y = clamp(conv(x, W) + bias, out_min, out_max).
//   x T [batch, in_channels, in_h, in_w], y T [batch, out_channels, out_h, out_w] (contiguous),
//   w.values T [nnz * R], w.cols == in_channels * kernel_h * kernel_w, order int32 [G],
//   ep.bias Acc [out_channels] or nullptr.
cudaError_t conv_kxk_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                          const ConvGeometry& s, const void* x, const SpmmEpilogue& ep, void* y,
                          cudaStream_t stream);

// Input gradient of the unclamped convolution through W^T [K, C_out] (K = C_in*KH*KW):
//   offsets_t int32 [K * ceil(C_out/256) + 1], indices_t uint8 [nnz_t], values_t T [nnz_t]
//   (values permuted into W^T order), dy T [batch, out_channels, out_h, out_w],
//   dx T [batch, in_channels, in_h, in_w] (every element written).
cudaError_t conv_grad_input_cuda(CudaDType dtype, const int32_t* offsets_t,
                                 const uint8_t* indices_t, const void* values_t, int64_t nnz_t,
                                 const ConvGeometry& s, const void* dy, void* dx,
                                 cudaStream_t stream);

// Values gradient: dv Acc [nnz * R] (every element written), dy T [batch, C_out, out_h, out_w],
// x T [batch, C_in, in_h, in_w]; w.values unused.
cudaError_t conv_grad_values_cuda(CudaDType dtype, const SpmmDeviceWeight& w,
                                  const ConvGeometry& s, const void* dy, const void* x, void* dv,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ext

// ATen glue for the sparse-conv family on CUDA: the CPU op's checks (../conv_args.h, with CUDA
// devices instead of CPU), once-per-version structure validation, then the 1x1 path through the
// SpMM tiled kernel or the implicit-im2col kxk kernel; backward through the transposed structure
// (input) and a per-entry reduction (values). Kernels: csrc/cuda/conv/conv_cuda.h,
// csrc/cuda/spmm/spmm_cuda.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "../../cuda/conv/conv_cuda.h"
#include "../../kernels/conv/conv.h"
#include "../common.h"
#include "../conv_args.h"
#include "cuda_glue.h"
#include "spmm_cuda_weight.h"

namespace sparse_ext {
namespace {

// ---- geometry (the CPU op's checks, conv_args.h, plus the CUDA kernels' 32-bit limits) -------
ConvShape make_shape(const ConvArgs& a, int64_t in_channels, int64_t in_h, int64_t in_w,
                     int64_t out_channels) {
  const ConvShape s = make_conv_shape(a, in_channels, in_h, in_w, out_channels);
  // The kernels use 32-bit arithmetic for a column (C_in * KH * KW) and an image plane.
  TORCH_CHECK(in_channels * s.kernel_h * s.kernel_w < (int64_t(1) << 31) &&
                  s.out_h * s.out_w < (int64_t(1) << 31) && in_h * in_w < (int64_t(1) << 31),
              "convolution too large for the CUDA kernels (C_in*KH*KW and each image plane must "
              "stay below 2^31 elements)");
  return s;
}

cuda::ConvGeometry device_geometry(const ConvShape& s, int64_t batch) {
  return cuda::ConvGeometry{batch,      s.in_channels, s.in_h,     s.in_w,     s.out_channels,
                            s.out_h,    s.out_w,       s.kernel_h, s.kernel_w, s.stride_h,
                            s.stride_w, s.pad_h,       s.pad_w,    s.dil_h,    s.dil_w};
}

void check_images(const at::Tensor& x, const char* name) {
  check_conv_images(x, name, &check_cuda, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- ops ------------------------------------------------------------------------------------
at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& offsets,
                              const at::Tensor& indices, const at::Tensor& values,
                              const c10::optional<at::Tensor>& bias, int64_t out_channels,
                              int64_t in_channels,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t block_rows, double out_min, double out_max) {
  check_images(x, "x");
  check_weight_dim(out_channels, "out_channels");
  check_conv_channels(x, "x", in_channels, "in_channels");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  check_conv_clamp(out_min, out_max);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor* bias_p = bias.has_value() ? &*bias : nullptr;
  check_same_cuda_device(x, "x", {{&offsets, "offsets"}, {&indices, "indices"},
                                  {&values, "values"}, {bias_p, "bias"}});
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t K = C * args.kernel[0] * args.kernel[1];
  cuda::SpmmDeviceWeight w = checked_spmm_weight_cuda(offsets, indices, &values, out_channels, K,
                                                      block_rows, "out_channels");
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), out_channels);
  if (bias_p != nullptr)
    check_conv_bias(*bias_p, out_channels, &check_cuda,
                    {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_conv_f64(x, values);
  // Same dtype: computed in it (fp32 accumulation); mixed reduced precision: in float32.
  const at::ScalarType ct = x.scalar_type() == values.scalar_type() ? x.scalar_type() : at::kFloat;
  const at::Tensor xc = x.to(ct).contiguous();  // NCHW (channels_last is converted here)
  const at::Tensor vc = values.to(ct).contiguous();
  w.values = vc.data_ptr();
  const int64_t P = s.out_h * s.out_w;
  at::Tensor y = at::empty({B, out_channels, s.out_h, s.out_w}, xc.options());
  if (B == 0 || out_channels == 0 || P == 0) return y.to(x.scalar_type());
  // The bias is read in its own dtype by the kernels (no conversion launch per call).
  at::Tensor bias_c;
  if (bias_p != nullptr) bias_c = bias_p->contiguous();
  const cuda::SpmmEpilogue ep{
      bias_c.defined() ? bias_c.data_ptr() : nullptr,
      bias_c.defined() ? cuda_dtype_of(bias_c.scalar_type()) : cuda::CudaDType::kF32, out_min,
      out_max};
  const int64_t KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  const at::Tensor order = spmm_row_order_cuda(offsets, out_channels / block_rows, KB);
  const cuda::CudaDType dt = cuda_dtype_of(ct);
  const cudaStream_t stream = current_stream();
  if (conv_is_pointwise(s)) {
    // y[b] = W x[b]: x[b] is [C_in, H*W] with contiguous pixel rows, exactly the transposed
    // activations the SpMM tiled kernel wants; y[b] [C_out, H*W] is written row-major.
    const cuda::SpmmTiledArgs a{xc.data_ptr(), P,     C * P, P, B, y.data_ptr(), P,
                                out_channels * P, false};
    check_launch(cuda::spmm_tiled_cuda(dt, w, order.data_ptr<int32_t>(), a, ep, stream),
                 "sparse_conv2d");
  } else {
    check_launch(cuda::conv_kxk_cuda(dt, w, order.data_ptr<int32_t>(), device_geometry(s, B),
                                     xc.data_ptr(), ep, y.data_ptr(), stream),
                 "sparse_conv2d");
  }
  return y.to(x.scalar_type());
}

at::Tensor sparse_conv2d_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& offsets,
                                         const at::Tensor& indices, const at::Tensor& values,
                                         int64_t out_channels, int64_t in_channels, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t block_rows) {
  check_images(grad_out, "grad_out");
  check_conv_channels(grad_out, "grad_out", out_channels, "out_channels");
  check_weight_dim(in_channels, "in_channels");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const auto hw = conv_input_size(input_size, in_channels);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_same_cuda_device(grad_out, "grad_out", {{&offsets, "offsets"}, {&indices, "indices"},
                                                {&values, "values"}});
  const int64_t B = grad_out.size(0), M = grad_out.size(1);
  const int64_t K = in_channels * args.kernel[0] * args.kernel[1];
  checked_spmm_weight_cuda(offsets, indices, &values, M, K, block_rows, "out_channels");
  const ConvShape s = make_shape(args, in_channels, hw[0], hw[1], M);
  check_conv_grad_out_size(grad_out, s, "input_size", input_size);
  // Like the CPU op: float64 when grad_out is float64; otherwise the common reduced dtype, or
  // float32 when grad_out and values differ.
  const at::ScalarType gt = grad_out.scalar_type();
  const at::ScalarType ct =
      gt == at::kDouble ? at::kDouble : (gt == values.scalar_type() ? gt : at::kFloat);
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor v = values.to(ct).contiguous();
  at::Tensor dx = at::zeros({B, in_channels, s.in_h, s.in_w}, dy.options());
  if (B == 0 || in_channels == 0) return dx.to(gt);
  // W^T [K, C_out] (R = 1) with its values gathered into W^T order.
  const auto [offsets_t, indices_t, perm] =
      spmm_transpose_structure_device(offsets, indices, M, K, block_rows);
  const at::Tensor values_t = v.index_select(0, perm).contiguous();
  check_launch(cuda::conv_grad_input_cuda(cuda_dtype_of(ct), offsets_t.data_ptr<int32_t>(),
                                          indices_t.data_ptr<uint8_t>(), values_t.data_ptr(),
                                          indices_t.size(0), device_geometry(s, B), dy.data_ptr(),
                                          dx.data_ptr(), current_stream()),
               "sparse_conv2d_grad_input");
  return dx.to(gt);
}

at::Tensor sparse_conv2d_grad_values_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& offsets, const at::Tensor& indices,
                                          int64_t out_channels, int64_t in_channels,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t block_rows) {
  check_images(grad_out, "grad_out");
  check_images(x, "x");
  check_conv_channels(grad_out, "grad_out", out_channels, "out_channels");
  check_conv_channels(x, "x", in_channels, "in_channels");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  check_same_cuda_device(x, "x", {{&grad_out, "grad_out"}, {&offsets, "offsets"},
                                  {&indices, "indices"}});
  const int64_t B = x.size(0), C = x.size(1), M = grad_out.size(1);
  check_conv_same_batch(grad_out, x);
  cuda::SpmmDeviceWeight w = checked_spmm_weight_cuda(
      offsets, indices, nullptr, M, C * args.kernel[0] * args.kernel[1], block_rows,
      "out_channels");
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), M);
  check_conv_grad_out_size(grad_out, s, "x of shape", x.sizes());
  check_conv_grad_values_f64(grad_out, x);
  const at::ScalarType ct =
      x.scalar_type() == grad_out.scalar_type() ? x.scalar_type() : at::kFloat;
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor xc = x.to(ct).contiguous();
  at::Tensor dv = at::zeros({w.nnz * block_rows}, xc.options().dtype(acc_dtype(ct)));
  if (B == 0 || w.nnz == 0) return dv;
  check_launch(cuda::conv_grad_values_cuda(cuda_dtype_of(ct), w, device_geometry(s, B),
                                           dy.data_ptr(), xc.data_ptr(), dv.data_ptr(),
                                           current_stream()),
               "sparse_conv2d_grad_values");
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input_cuda);
  m.impl("sparse_conv2d_grad_values", &sparse_conv2d_grad_values_cuda);
}

}  // namespace sparse_ext

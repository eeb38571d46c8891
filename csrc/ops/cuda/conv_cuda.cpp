// ATen glue for the sparse-conv family on CUDA: the CPU op's checks (CUDA devices instead of CPU),
// once-per-version structure validation, then the 1x1 path through the SpMM tiled kernel or the
// implicit-im2col kxk kernel; backward through the transposed structure (input) and a per-entry
// reduction (values). Kernels: csrc/cuda/conv/conv_cuda.h, csrc/cuda/spmm/spmm_cuda.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>

#include "../../cuda/conv/conv_cuda.h"
#include "../../kernels/conv/conv.h"
#include "../common.h"
#include "cuda_glue.h"
#include "spmm_cuda_weight.h"

namespace sparse_ext {
namespace {

// ---- geometry (the same checks and messages as csrc/ops/conv_ops.cpp) -------------------------
std::array<int64_t, 2> pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements (height, width), got ", v.size());
  return {v[0], v[1]};
}

struct ConvArgs {
  std::array<int64_t, 2> kernel, stride, padding, dilation;
};

ConvArgs conv_args(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  ConvArgs a{pair_arg(kernel_size, "kernel_size"), pair_arg(stride, "stride"),
             pair_arg(padding, "padding"), pair_arg(dilation, "dilation")};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(a.kernel[i] >= 1, "kernel_size must be positive, got ", kernel_size);
    TORCH_CHECK(a.stride[i] >= 1, "stride must be positive, got ", stride);
    TORCH_CHECK(a.padding[i] >= 0, "padding must be non-negative, got ", padding);
    TORCH_CHECK(a.dilation[i] >= 1, "dilation must be positive, got ", dilation);
  }
  return a;
}

ConvShape make_shape(const ConvArgs& a, int64_t in_channels, int64_t in_h, int64_t in_w,
                     int64_t out_channels) {
  ConvShape s{};
  s.in_channels = in_channels;
  s.in_h = in_h;
  s.in_w = in_w;
  s.out_channels = out_channels;
  s.kernel_h = a.kernel[0];
  s.kernel_w = a.kernel[1];
  s.stride_h = a.stride[0];
  s.stride_w = a.stride[1];
  s.pad_h = a.padding[0];
  s.pad_w = a.padding[1];
  s.dil_h = a.dilation[0];
  s.dil_w = a.dilation[1];
  const int64_t eh = in_h + 2 * s.pad_h - s.dil_h * (s.kernel_h - 1) - 1;
  const int64_t ew = in_w + 2 * s.pad_w - s.dil_w * (s.kernel_w - 1) - 1;
  TORCH_CHECK(eh >= 0 && ew >= 0, "input of spatial size ", in_h, "x", in_w, " padded by ",
              s.pad_h, ",", s.pad_w, " is smaller than the dilated kernel ",
              s.dil_h * (s.kernel_h - 1) + 1, "x", s.dil_w * (s.kernel_w - 1) + 1);
  s.out_h = eh / s.stride_h + 1;
  s.out_w = ew / s.stride_w + 1;
  const std::string error = conv_check_shape(s);
  TORCH_CHECK(error.empty(), "invalid convolution geometry: ", error);
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

bool is_pointwise(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

void check_images(const at::Tensor& x, const char* name) {
  check_cuda(x, name);
  check_dtype(x, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ",
              x.sizes());
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// ---- ops ------------------------------------------------------------------------------------
at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& offsets,
                              const at::Tensor& indices, const at::Tensor& values,
                              const c10::optional<at::Tensor>& bias, int64_t out_channels,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t block_rows, double out_min, double out_max) {
  check_images(x, "x");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  TORCH_CHECK(!(out_min > out_max) && !std::isnan(out_min) && !std::isnan(out_max),
              "activation clamp needs out_min <= out_max, got (", out_min, ", ", out_max, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor* bias_p = bias.has_value() ? &*bias : nullptr;
  check_same_cuda_device(x, "x", {{&offsets, "offsets"}, {&indices, "indices"},
                                  {&values, "values"}, {bias_p, "bias"}});
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t K = C * args.kernel[0] * args.kernel[1];
  cuda::SpmmDeviceWeight w = checked_spmm_weight_cuda(offsets, indices, &values, out_channels, K,
                                                      block_rows, "out_channels");
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), out_channels);
  if (bias_p != nullptr) {
    check_cuda(*bias_p, "bias");
    check_dtype(*bias_p, "bias", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
    check_1d(*bias_p, "bias", out_channels);
  }
  const bool f64 = values.scalar_type() == at::kDouble;
  TORCH_CHECK((x.scalar_type() == at::kDouble) == f64,
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
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
  if (is_pointwise(s)) {
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
                                         int64_t in_channels, at::IntArrayRef input_size,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t block_rows) {
  check_images(grad_out, "grad_out");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const auto hw = pair_arg(input_size, "input_size");
  TORCH_CHECK(in_channels >= 0, "in_channels must be non-negative, got ", in_channels);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  check_same_cuda_device(grad_out, "grad_out", {{&offsets, "offsets"}, {&indices, "indices"},
                                                {&values, "values"}});
  const int64_t B = grad_out.size(0), M = grad_out.size(1);
  const int64_t K = in_channels * args.kernel[0] * args.kernel[1];
  checked_spmm_weight_cuda(offsets, indices, &values, M, K, block_rows, "out_channels");
  const ConvShape s = make_shape(args, in_channels, hw[0], hw[1], M);
  TORCH_CHECK(grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w, "grad_out must be ",
              s.out_h, "x", s.out_w, " for input_size ", input_size, ", got shape ",
              grad_out.sizes());
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
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                          int64_t block_rows) {
  check_images(grad_out, "grad_out");
  check_images(x, "x");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(x.device());
  check_same_cuda_device(x, "x", {{&grad_out, "grad_out"}, {&offsets, "offsets"},
                                  {&indices, "indices"}});
  const int64_t B = x.size(0), C = x.size(1), M = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == B, "grad_out and x must have the same batch size, got ",
              grad_out.sizes(), " and ", x.sizes());
  cuda::SpmmDeviceWeight w = checked_spmm_weight_cuda(
      offsets, indices, nullptr, M, C * args.kernel[0] * args.kernel[1], block_rows,
      "out_channels");
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), M);
  TORCH_CHECK(grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w, "grad_out must be ",
              s.out_h, "x", s.out_w, " for x of shape ", x.sizes(), ", got shape ",
              grad_out.sizes());
  const bool f64 = x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble;
  if (f64)
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
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

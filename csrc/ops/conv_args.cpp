// Argument checks and geometry shared by the CPU and CUDA sparse-conv glue: see conv_args.h.
#include "conv_args.h"

#include <cmath>
#include <string>

#include "common.h"

namespace sparse_ext {

std::array<int64_t, 2> conv_pair_arg(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements (height, width), got ", v.size());
  return {v[0], v[1]};
}

ConvArgs conv_args(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  ConvArgs a{conv_pair_arg(kernel_size, "kernel_size"), conv_pair_arg(stride, "stride"),
             conv_pair_arg(padding, "padding"), conv_pair_arg(dilation, "dilation")};
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(a.kernel[i] >= 1, "kernel_size must be positive, got ", kernel_size);
    TORCH_CHECK(a.stride[i] >= 1, "stride must be positive, got ", stride);
    TORCH_CHECK(a.padding[i] >= 0, "padding must be non-negative, got ", padding);
    TORCH_CHECK(a.dilation[i] >= 1, "dilation must be positive, got ", dilation);
  }
  return a;
}

ConvShape make_conv_shape(const ConvArgs& a, int64_t in_channels, int64_t in_h, int64_t in_w,
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
  return s;
}

void check_conv_images(const at::Tensor& x, const char* name, ConvDeviceCheck check_device,
                       std::initializer_list<at::ScalarType> dtypes) {
  check_device(x, name);
  check_dtype(x, name, dtypes);
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ",
              x.sizes());
}

void check_conv_channels(const at::Tensor& t, const char* name, int64_t expected,
                         const char* weight_dim) {
  check_weight_dim(expected, weight_dim);
  check_width(t, name, 1, expected, "channels", weight_dim);
}

void check_conv_bias(const at::Tensor& bias, int64_t out_channels, ConvDeviceCheck check_device,
                     std::initializer_list<at::ScalarType> dtypes) {
  check_device(bias, "bias");
  check_dtype(bias, "bias", dtypes);
  check_1d(bias, "bias", out_channels);
}

void check_conv_clamp(double out_min, double out_max) {
  TORCH_CHECK(!(out_min > out_max) && !std::isnan(out_min) && !std::isnan(out_max),
              "activation clamp needs out_min <= out_max, got (", out_min, ", ", out_max, ")");
}

bool check_conv_f64(const at::Tensor& x, const at::Tensor& values) {
  const bool f64 = values.scalar_type() == at::kDouble;
  TORCH_CHECK((x.scalar_type() == at::kDouble) == f64,
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
  return f64;
}

std::array<int64_t, 2> conv_input_size(at::IntArrayRef input_size, int64_t in_channels) {
  const auto hw = conv_pair_arg(input_size, "input_size");
  TORCH_CHECK(in_channels >= 0, "in_channels must be non-negative, got ", in_channels);
  return hw;
}

void check_conv_grad_out_size(const at::Tensor& grad_out, const ConvShape& s,
                              const char* for_what, at::IntArrayRef sizes) {
  TORCH_CHECK(grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w, "grad_out must be ",
              s.out_h, "x", s.out_w, " for ", for_what, " ", sizes, ", got shape ",
              grad_out.sizes());
}

void check_conv_same_batch(const at::Tensor& grad_out, const at::Tensor& x) {
  TORCH_CHECK(grad_out.size(0) == x.size(0), "grad_out and x must have the same batch size, got ",
              grad_out.sizes(), " and ", x.sizes());
}

bool check_conv_grad_values_f64(const at::Tensor& grad_out, const at::Tensor& x) {
  const bool f64 = x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble;
  if (f64)
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
  return f64;
}

}  // namespace sparse_ext

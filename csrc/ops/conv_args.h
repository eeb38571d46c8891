// The device-agnostic argument checks and geometry of the sparse-conv ops, shared by the CPU glue
// (conv_ops.cpp) and the CUDA glue (cuda/conv_cuda.cpp) so that both raise the same messages.
// Device checks stay in each glue: the helpers that look at a tensor's device take the glue's
// check (check_cpu, check_cuda) and its accepted dtypes.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <initializer_list>

#include "../kernels/conv/conv.h"

namespace sparse_ext {

using ConvDeviceCheck = void (*)(const at::Tensor&, const char*);

// v as (height, width); raises "<name> must have 2 elements (height, width), got N" otherwise.
std::array<int64_t, 2> conv_pair_arg(at::IntArrayRef v, const char* name);

struct ConvArgs {
  std::array<int64_t, 2> kernel, stride, padding, dilation;
};

// kernel_size, stride, padding, dilation as pairs: kernel, stride, dilation >= 1, padding >= 0.
ConvArgs conv_args(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation);

// The geometry of a convolution of [*, in_channels, in_h, in_w] images into out_channels: output
// size from the conv formula; raises when the padded input is smaller than the dilated kernel or
// conv_check_shape rejects it.
ConvShape make_conv_shape(const ConvArgs& a, int64_t in_channels, int64_t in_h, int64_t in_w,
                          int64_t out_channels);

// 1x1 kernel, stride 1, no padding: a plain product per image.
inline bool conv_is_pointwise(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

// x 4-D [batch, channels, height, width], on the glue's device, in one of `dtypes`.
void check_conv_images(const at::Tensor& x, const char* name, ConvDeviceCheck check_device,
                       std::initializer_list<at::ScalarType> dtypes);

// Images t [batch, channels, ...] whose channels must match the weight's `weight_dim`
// (in_channels for x, out_channels for grad_out), itself within the weight-size bound.
void check_conv_channels(const at::Tensor& t, const char* name, int64_t expected,
                         const char* weight_dim);

// bias [out_channels], on the glue's device, in one of `dtypes`.
void check_conv_bias(const at::Tensor& bias, int64_t out_channels, ConvDeviceCheck check_device,
                     std::initializer_list<at::ScalarType> dtypes);

// The fused activation clamp: out_min <= out_max, neither NaN.
void check_conv_clamp(double out_min, double out_max);

// Forward: x is float64 exactly when values are; returns whether they are.
bool check_conv_f64(const at::Tensor& x, const at::Tensor& values);

// Input gradient: input_size as (height, width) and in_channels >= 0.
std::array<int64_t, 2> conv_input_size(at::IntArrayRef input_size, int64_t in_channels);

// grad_out [*, *, s.out_h, s.out_w]; `for_what` and `sizes` name what fixed the input size
// ("input_size" and input_size, "x of shape" and x.sizes()).
void check_conv_grad_out_size(const at::Tensor& grad_out, const ConvShape& s,
                              const char* for_what, at::IntArrayRef sizes);

// Values gradient: grad_out and x hold the same batch.
void check_conv_same_batch(const at::Tensor& grad_out, const at::Tensor& x);

// Values gradient: float64 needs both grad_out and x in float64; returns whether either is.
bool check_conv_grad_values_f64(const at::Tensor& grad_out, const at::Tensor& x);

}  // namespace sparse_ext

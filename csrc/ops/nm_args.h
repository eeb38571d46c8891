// The argument checks of the N:M ops (nm_linear, nm_linear_grad_input, nm_linear_grad_values,
// nm_validate) shared by the CPU glue (nm_ops.cpp) and the CUDA glue (cuda/nm_cuda.cpp): the same
// conditions, messages and order on every device. Each glue passes its device checks and whether
// it takes float16 (see NmDeviceChecks).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../kernels/nm/nm.h"

namespace sparse_ext {

// A glue's device checks. activation(t, name) checks an activation (x, grad_out): check_cpu or
// check_cuda. operand(first, first_name, t, name) checks any other tensor of an op whose first
// tensor is `first` (x, grad_out, or values for nm_validate): check_cpu(t) on the CPU; on CUDA,
// check_same_cuda_device(first, first_name, {t}) (first a CUDA tensor, t on its device).
// Activations, values and bias take float32, bfloat16 and float64, and float16 when `float16`
// (CUDA).
struct NmDeviceChecks {
  void (*activation)(const at::Tensor& t, const char* name);
  void (*operand)(const at::Tensor& first, const char* first_name, const at::Tensor& t,
                  const char* name);
  bool float16;
};

// n, m, in_features, metadata uint8 [out_features, meta_stride] contiguous and, when `values` is
// not null, values [out_features, kept] contiguous in a floating dtype; wraps them for the
// kernels. The pointers live on the tensors' device; value_type is kF32 / kF64 for float / double
// values and kBF16 otherwise (the CUDA glue dispatches on the tensor dtype instead).
NmWeight checked_nm_weight_args(const at::Tensor& first, const char* first_name,
                                const at::Tensor* values, const at::Tensor& metadata,
                                int64_t out_features, int64_t in_features, int64_t n, int64_t m,
                                const NmDeviceChecks& dev);

// The checked weight of an op and the shape of its result ([..., out_features] for nm_linear,
// [..., in_features] for nm_linear_grad_input).
struct NmOpArgs {
  NmWeight w;
  std::vector<int64_t> out_shape;
};

// nm_linear(x [..., in_features], values [out_features, kept], metadata, bias [out_features] or
// none): x's width, the weight, bias, and float64 on both x and values or on neither.
NmOpArgs checked_nm_linear_args(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& metadata, const c10::optional<at::Tensor>& bias,
                                int64_t in_features, int64_t n, int64_t m,
                                const NmDeviceChecks& dev);

// nm_linear_grad_input(grad_out [..., out_features], values, metadata, in_features): grad_out's
// width (values' rows), the weight, and float64 on both grad_out and values or on neither.
NmOpArgs checked_nm_grad_input_args(const at::Tensor& grad_out, const at::Tensor& values,
                                    const at::Tensor& metadata, int64_t in_features, int64_t n,
                                    int64_t m, const NmDeviceChecks& dev);

// nm_linear_grad_values(grad_out [..., out_features], x [..., in_features], metadata): both
// widths (out_features = metadata's rows), the same number of tokens, the structure (w.values
// null), and float64 on both or on neither.
NmWeight checked_nm_grad_values_args(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& metadata, int64_t in_features, int64_t n,
                                     int64_t m, const NmDeviceChecks& dev);

// nm_validate(values [out_features, kept], metadata, in_features): the weight (not the canonical
// form, which each glue checks on its device).
NmWeight checked_nm_validate_args(const at::Tensor& values, const at::Tensor& metadata,
                                  int64_t in_features, int64_t n, int64_t m,
                                  const NmDeviceChecks& dev);

}  // namespace sparse_ext

// The N:M ops' argument checks, shared by the CPU and CUDA glue (see nm_args.h).
#include "nm_args.h"

#include "common.h"

namespace sparse_ext {
namespace {

void check_pattern(int64_t n, int64_t m) {
  TORCH_CHECK(m == 4 || m == 8 || m == 16, "m must be 4, 8 or 16, got ", m);
  TORCH_CHECK(n >= 1 && n < m, "n must satisfy 1 <= n < m (", m, "), got n = ", n);
}

// Stored values: float32, bfloat16 (float16 where the glue's kernels take it: CUDA) or float64.
void check_floating(const at::Tensor& t, const char* name, const NmDeviceChecks& dev) {
  if (dev.float16)
    check_dtype(t, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  else
    check_dtype(t, name, {at::kFloat, at::kBFloat16, at::kDouble});
}

// Activations and bias: any of the four on every device (the CPU computes float16 in float32,
// like bfloat16; docs/reliability.md, dtypes).
void check_activation_dtype(const at::Tensor& t, const char* name) {
  check_dtype(t, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

void check_values_2d(const at::Tensor& values) {
  TORCH_CHECK(values.dim() == 2, "values must be 2-D [out_features, ceil(in_features / m) * n], "
              "got shape ", values.sizes());
}

void check_activations(const at::Tensor& x, const char* name, const NmDeviceChecks& dev) {
  dev.activation(x, name);
  check_activation_dtype(x, name);
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension, got a scalar");
}

std::vector<int64_t> with_last(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

}  // namespace

NmWeight checked_nm_weight_args(const at::Tensor& first, const char* first_name,
                                const at::Tensor* values, const at::Tensor& metadata,
                                int64_t out_features, int64_t in_features, int64_t n, int64_t m,
                                const NmDeviceChecks& dev) {
  check_pattern(n, m);
  TORCH_CHECK(in_features >= 0, "in_features must be non-negative, got ", in_features);
  NmWeight w{};
  w.rows = out_features;
  w.cols = in_features;
  w.n = n;
  w.m = m;
  dev.operand(first, first_name, metadata, "metadata");
  check_dtype(metadata, "metadata", {at::kByte});
  TORCH_CHECK(metadata.dim() == 2, "metadata must be 2-D [out_features, ceil(kept * ",
              w.bits(), " / 8)], got shape ", metadata.sizes());
  TORCH_CHECK(metadata.size(0) == out_features && metadata.size(1) == w.meta_stride(),
              "metadata must have shape [", out_features, ", ", w.meta_stride(), "] for ",
              out_features, " rows, in_features ", in_features, " and ", n, ":", m, " (",
              w.kept(), " slots of ", w.bits(), " bits per row), got ", metadata.sizes());
  TORCH_CHECK(metadata.is_contiguous(), "metadata must be contiguous");
  w.meta = metadata.data_ptr<uint8_t>();
  if (values != nullptr) {
    dev.operand(first, first_name, *values, "values");
    check_floating(*values, "values", dev);
    check_values_2d(*values);
    TORCH_CHECK(values->size(0) == out_features && values->size(1) == w.kept(),
                "values must have shape [", out_features, ", ", w.kept(), "] (", w.groups(),
                " groups of ", n, " for in_features ", in_features, " and ", n, ":", m, "), got ",
                values->sizes());
    TORCH_CHECK(values->is_contiguous(), "values must be contiguous");
    w.values = values->data_ptr();
    w.value_type = values->scalar_type() == at::kFloat    ? ValueType::kF32
                   : values->scalar_type() == at::kDouble ? ValueType::kF64
                                                          : ValueType::kBF16;
  }
  return w;
}

NmOpArgs checked_nm_linear_args(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& metadata, const c10::optional<at::Tensor>& bias,
                                int64_t in_features, int64_t n, int64_t m,
                                const NmDeviceChecks& dev) {
  check_activations(x, "x", dev);
  check_weight_dim(in_features, "in_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const int64_t K = in_features;
  check_values_2d(values);
  const int64_t out_features = values.size(0);
  const NmWeight w =
      checked_nm_weight_args(x, "x", &values, metadata, out_features, K, n, m, dev);
  if (bias.has_value()) {
    dev.operand(x, "x", *bias, "bias");
    check_activation_dtype(*bias, "bias");
    check_1d(*bias, "bias", out_features);
  }
  TORCH_CHECK((x.scalar_type() == at::kDouble) == (values.scalar_type() == at::kDouble),
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
  return {w, with_last(x, out_features)};
}

NmOpArgs checked_nm_grad_input_args(const at::Tensor& grad_out, const at::Tensor& values,
                                    const at::Tensor& metadata, int64_t in_features, int64_t n,
                                    int64_t m, const NmDeviceChecks& dev) {
  check_activations(grad_out, "grad_out", dev);
  check_weight_dim(in_features, "in_features");
  check_values_2d(values);
  check_width(grad_out, "grad_out", -1, values.size(0), "features", "out_features");
  const int64_t M_out = grad_out.size(-1);
  const NmWeight w = checked_nm_weight_args(grad_out, "grad_out", &values, metadata, M_out,
                                            in_features, n, m, dev);
  TORCH_CHECK((grad_out.scalar_type() == at::kDouble) == (values.scalar_type() == at::kDouble),
              "float64 needs both grad_out and values in float64, got grad_out ",
              grad_out.scalar_type(), " and values ", values.scalar_type());
  return {w, with_last(grad_out, in_features)};
}

NmWeight checked_nm_grad_values_args(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& metadata, int64_t in_features, int64_t n,
                                     int64_t m, const NmDeviceChecks& dev) {
  check_activations(grad_out, "grad_out", dev);
  check_activations(x, "x", dev);
  dev.operand(grad_out, "grad_out", x, "x");
  check_weight_dim(in_features, "in_features");
  TORCH_CHECK(metadata.dim() == 2, "metadata must be 2-D [out_features, bytes per row], got shape ",
              metadata.sizes());
  check_width(grad_out, "grad_out", -1, metadata.size(0), "features", "out_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const int64_t K = in_features, M_out = grad_out.size(-1);
  check_same_tokens(grad_out, x);
  const NmWeight w = checked_nm_weight_args(grad_out, "grad_out", nullptr, metadata, M_out, K, n,
                                            m, dev);
  if (x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble)
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
  return w;
}

NmWeight checked_nm_validate_args(const at::Tensor& values, const at::Tensor& metadata,
                                  int64_t in_features, int64_t n, int64_t m,
                                  const NmDeviceChecks& dev) {
  check_values_2d(values);
  check_weight_dim(in_features, "in_features");
  return checked_nm_weight_args(values, "values", &values, metadata, values.size(0), in_features,
                                n, m, dev);
}

}  // namespace sparse_ext

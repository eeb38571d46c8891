// ATen glue for the sparse conv family: checks, layout preparation (NCHW, phase planes), thread
// split balanced by nonzeros, kernel calls. Kernels: csrc/kernels/conv/conv.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <limits>

#include "../kernels/conv/conv.h"
#include "../kernels/spmm/spmm.h"
#include "common.h"
#include "spmm_weight.h"

namespace sparse_ext {
namespace {

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
  return s;
}

bool is_pointwise(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

// Structure checks (the SpMM family's) for W [out_channels, in_cols]. The conv kernels read f32
// values (the op converts bf16), so only float64 keeps its own value type.
SpmmWeight make_weight(const at::Tensor& offsets, const at::Tensor& indices,
                       const at::Tensor* values, int64_t out_channels, int64_t in_cols,
                       int64_t block_rows) {
  SpmmWeight w = checked_spmm_weight(offsets, indices, values, out_channels, in_cols, block_rows,
                                     "out_channels");
  if (w.value_type != ValueType::kF64) w.value_type = ValueType::kF32;
  return w;
}

void check_images(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  check_dtype(x, name, {at::kFloat, at::kBFloat16, at::kDouble});
  TORCH_CHECK(x.dim() == 4, name, " must be 4-D [batch, channels, height, width], got shape ",
              x.sizes());
}

const ConvUkernels& ukernels_for(int64_t block_rows) {
  const ConvUkernels* k = conv_ukernels(active_isa(), block_rows);
  if (k == nullptr) k = conv_ukernels(Isa::kScalar, block_rows);
  TORCH_CHECK(k != nullptr, "no conv kernel for block_rows ", block_rows);
  return *k;
}

// Group ranges balanced by nonzeros plus a per-group constant (bias, clamp, stores).
std::vector<int64_t> split_groups(const SpmmWeight& w, int64_t per_group_cost) {
  const int64_t KB = w.k_blocks();
  return balanced_split(w.groups(), work_parts(), [&](int64_t g) {
    return static_cast<int64_t>(w.offsets[g * KB]) + g * per_group_cost;
  });
}

std::vector<int64_t> split_even(int64_t items, int64_t parts, int64_t align) {
  std::vector<int64_t> bounds{0};
  for (int64_t p = 1; p < parts; ++p)
    bounds.push_back(std::min(items, round_up(items * p / parts, align)));
  bounds.push_back(items);
  return bounds;
}

// Output size from which 1x1 outputs bypass the caches (SPARSE_EXT_CONV_STREAM_MB overrides).
int64_t stream_bytes() {
  const char* e = std::getenv("SPARSE_EXT_CONV_STREAM_MB");
  return (e != nullptr ? std::atoll(e) : 4) * (int64_t(1) << 20);
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& offsets,
                             const at::Tensor& indices, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, int64_t out_channels,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t block_rows,
                             double out_min, double out_max) {
  check_images(x, "x");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  TORCH_CHECK(!(out_min > out_max) && !std::isnan(out_min) && !std::isnan(out_max),
              "activation clamp needs out_min <= out_max, got (", out_min, ", ", out_max, ")");
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t K = C * args.kernel[0] * args.kernel[1];
  SpmmWeight w = make_weight(offsets, indices, &values, out_channels, K, block_rows);
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), out_channels);
  at::Tensor bias_t;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    check_dtype(*bias, "bias", {at::kFloat, at::kBFloat16, at::kDouble});
    check_1d(*bias, "bias", out_channels);
  }
  const bool f64 = values.scalar_type() == at::kDouble;
  TORCH_CHECK((x.scalar_type() == at::kDouble) == f64,
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
  const int64_t P = s.out_h * s.out_w, in_plane = s.in_h * s.in_w;
  if (f64) {
    const at::Tensor xd = x.contiguous();
    if (bias.has_value()) bias_t = bias->to(at::kDouble).contiguous();
    at::Tensor y = at::empty({B, out_channels, s.out_h, s.out_w}, x.options());
    w.values = values.data_ptr<double>();
    if (B == 0 || out_channels == 0) return y;
    parallel_ranges(split_groups(w, 4 * block_rows), [&](int64_t g0, int64_t g1) {
      for (int64_t b = 0; b < B; ++b)
        conv_direct_ref<double>(w, s, xd.data_ptr<double>() + b * C * in_plane,
                                bias_t.defined() ? bias_t.data_ptr<double>() : nullptr, out_min,
                                out_max, g0, g1, y.data_ptr<double>() + b * out_channels * P);
    });
    return y;
  }
  // float32 compute: NCHW contiguous input (channels_last and bf16 are converted here).
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor vf = values.to(at::kFloat).contiguous();
  if (bias.has_value()) bias_t = bias->to(at::kFloat).contiguous();
  w.values = vf.data_ptr<float>();
  at::Tensor y = at::empty({B, out_channels, s.out_h, s.out_w}, xf.options());
  if (B == 0 || out_channels == 0 || P == 0) return y.to(x.scalar_type());
  ConvEpilogue ep{bias_t.defined() ? bias_t.data_ptr<float>() : nullptr,
                  static_cast<float>(out_min), static_cast<float>(out_max)};
  // Outputs much larger than the caches are written with streaming stores (see ConvEpilogue).
  ep.stream = B * out_channels * P * int64_t(sizeof(float)) >= stream_bytes();
  const ConvUkernels& k = ukernels_for(block_rows);
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t parts = work_parts();
  const bool split_by_groups = w.groups() >= 2 * parts;
  if (is_pointwise(s)) {
    // y[b] = W x[b]: each image is a [C_in, H*W] matrix with contiguous pixel rows. Large planes
    // are split by pixels (each thread streams only its part of x and y; the weights are small and
    // shared), small ones (7x7, 14x14) by output-channel groups balanced by nonzeros.
    if (P < 128 * parts && split_by_groups) {
      parallel_ranges(split_groups(w, 8 * block_rows), [&](int64_t g0, int64_t g1) {
        for (int64_t b = 0; b < B; ++b)
          k.conv1x1(w, xp + b * C * P, P, 0, P, g0, g1, ep, yp + b * out_channels * P, P);
      });
    } else {
      parallel_ranges(split_even(P, parts, 64), [&](int64_t p0, int64_t p1) {
        for (int64_t b = 0; b < B; ++b)
          k.conv1x1(w, xp + b * C * P, P, p0, p1, 0, w.groups(), ep, yp + b * out_channels * P, P);
      });
    }
    return y.to(x.scalar_type());
  }
  // kxk: phase planes (the input itself for stride 1), taps, then direct sparse convolution.
  const int64_t hq = conv_phase_h(s), wq = conv_phase_w(s);
  at::Tensor xq = xf;
  if (s.stride_h > 1 || s.stride_w > 1) {
    xq = at::constant_pad_nd(xf, {0, wq * s.stride_w - s.in_w, 0, hq * s.stride_h - s.in_h}, 0)
             .view({B, C, hq, s.stride_h, wq, s.stride_w})
             .permute({0, 1, 3, 5, 2, 4})
             .contiguous();
  }
  const int64_t image_q = C * s.stride_h * s.stride_w * hq * wq;
  TORCH_CHECK(image_q < (int64_t(1) << 31) && s.kernel_h * s.dil_h < 32768 &&
                  s.kernel_w * s.dil_w < 32768,
              "input image too large for the sparse kxk path (at most 2^31 - 1 elements per "
              "image after the stride split, dilated kernel below 32768)");

  at::Tensor taps_buf = at::empty({std::max<int64_t>(1, w.nnz) * int64_t(sizeof(ConvTap))},
                                  xf.options().dtype(at::kByte));
  ConvTap* taps = reinterpret_cast<ConvTap*>(taps_buf.data_ptr<uint8_t>());
  conv_build_taps(w, s, taps);
  ConvKxKUkernel kxk = k.kxk != nullptr ? k.kxk : conv_ukernels(Isa::kScalar, block_rows)->kxk;
  const float* xqp = xq.data_ptr<float>();
  if (split_by_groups) {
    parallel_ranges(split_groups(w, 8 * block_rows), [&](int64_t g0, int64_t g1) {
      for (int64_t b = 0; b < B; ++b) {
        const ConvPlanes in{xqp + b * image_q, hq, wq, s.out_h, s.out_w};
        kxk(w, taps, in, 0, s.out_h, g0, g1, ep, yp + b * out_channels * P);
      }
    });
  } else {
    parallel_ranges(split_even(s.out_h, parts, 1), [&](int64_t r0, int64_t r1) {
      for (int64_t b = 0; b < B; ++b) {
        const ConvPlanes in{xqp + b * image_q, hq, wq, s.out_h, s.out_w};
        kxk(w, taps, in, r0, r1, 0, w.groups(), ep, yp + b * out_channels * P);
      }
    });
  }
  return y.to(x.scalar_type());
}

at::Tensor sparse_conv2d_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& offsets,
                                        const at::Tensor& indices, const at::Tensor& values,
                                        int64_t in_channels, at::IntArrayRef input_size,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t block_rows) {
  check_images(grad_out, "grad_out");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const auto hw = pair_arg(input_size, "input_size");
  TORCH_CHECK(in_channels >= 0, "in_channels must be non-negative, got ", in_channels);
  const int64_t B = grad_out.size(0), M = grad_out.size(1);
  SpmmWeight w = make_weight(offsets, indices, &values, M,
                             in_channels * args.kernel[0] * args.kernel[1], block_rows);
  const ConvShape s = make_shape(args, in_channels, hw[0], hw[1], M);
  TORCH_CHECK(grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w, "grad_out must be ",
              s.out_h, "x", s.out_w, " for input_size ", input_size, ", got shape ",
              grad_out.sizes());
  const bool f64 = grad_out.scalar_type() == at::kDouble;
  const at::ScalarType ct = f64 ? at::kDouble : at::kFloat;
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor v = values.to(ct).contiguous();
  w.values = v.data_ptr();
  at::Tensor dx = at::zeros({B, in_channels, s.in_h, s.in_w}, dy.options());
  const int64_t P = s.out_h * s.out_w, Q = s.in_h * s.in_w;
  if (B == 0 || in_channels == 0) return dx.to(grad_out.scalar_type());
  parallel_ranges(split_even(in_channels, work_parts(), 1), [&](int64_t c0, int64_t c1) {
    for (int64_t b = 0; b < B; ++b) {
      if (f64)
        conv_grad_input_ref<double>(w, s, dy.data_ptr<double>() + b * M * P, c0, c1,
                                    dx.data_ptr<double>() + b * in_channels * Q);
      else
        conv_grad_input_ref<float>(w, s, dy.data_ptr<float>() + b * M * P, c0, c1,
                                   dx.data_ptr<float>() + b * in_channels * Q);
    }
  });
  return dx.to(grad_out.scalar_type());
}

at::Tensor sparse_conv2d_grad_values_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                         const at::Tensor& offsets, const at::Tensor& indices,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t block_rows) {
  check_images(grad_out, "grad_out");
  check_images(x, "x");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const int64_t B = x.size(0), C = x.size(1), M = grad_out.size(1);
  TORCH_CHECK(grad_out.size(0) == B, "grad_out and x must have the same batch size, got ",
              grad_out.sizes(), " and ", x.sizes());
  SpmmWeight w = make_weight(offsets, indices, nullptr, M, C * args.kernel[0] * args.kernel[1],
                             block_rows);
  const ConvShape s = make_shape(args, C, x.size(2), x.size(3), M);
  TORCH_CHECK(grad_out.size(2) == s.out_h && grad_out.size(3) == s.out_w, "grad_out must be ",
              s.out_h, "x", s.out_w, " for x of shape ", x.sizes(), ", got shape ",
              grad_out.sizes());
  const bool f64 = x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble;
  if (f64)
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
  const at::ScalarType ct = f64 ? at::kDouble : at::kFloat;
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor xc = x.to(ct).contiguous();
  at::Tensor dv = at::zeros({w.nnz * block_rows}, xc.options());
  const int64_t P = s.out_h * s.out_w, Q = s.in_h * s.in_w;
  if (B == 0 || w.nnz == 0) return dv;
  parallel_ranges(split_groups(w, 1), [&](int64_t g0, int64_t g1) {
    for (int64_t b = 0; b < B; ++b) {
      if (f64)
        conv_grad_values_ref<double>(w, s, dy.data_ptr<double>() + b * M * P,
                                     xc.data_ptr<double>() + b * C * Q, g0, g1,
                                     dv.data_ptr<double>());
      else
        conv_grad_values_ref<float>(w, s, dy.data_ptr<float>() + b * M * P,
                                    xc.data_ptr<float>() + b * C * Q, g0, g1, dv.data_ptr<float>());
    }
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input_cpu);
  m.impl("sparse_conv2d_grad_values", &sparse_conv2d_grad_values_cpu);
}

}  // namespace sparse_ext

// ATen glue for the sparse conv family: checks, layout preparation (NCHW, phase planes), thread
// split balanced by nonzeros, kernel calls. Kernels: csrc/kernels/conv/conv.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "../kernels/conv/conv.h"
#include "../kernels/spmm/spmm.h"
#include "common.h"
#include "plan.h"
#include "settings.h"
#include "conv_args.h"
#include "spmm_weight.h"

namespace sparse_ext {
namespace {

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
  // float16 images are computed in float32 like bfloat16 ones (docs/reliability.md, dtypes).
  check_conv_images(x, name, &check_cpu, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
}

// The 1x1 candidates for planes of `pixels` pixels: every tier at and below the active one whose
// 1x1 kernel serves that plane size (plane_multiple), best first.
std::vector<PlanCandidate<const ConvUkernels*>> pointwise_candidates(int64_t block_rows,
                                                                   int64_t pixels) {
  auto out = tier_candidates<const ConvUkernels*>([&](Isa isa) -> const ConvUkernels* {
    const ConvUkernels* t = conv_ukernels(isa, block_rows);
    const bool serves = t != nullptr && (t->plane_multiple <= 1 || pixels % t->plane_multiple == 0);
    return serves ? t : nullptr;
  });
  TORCH_CHECK(!out.empty(), "no conv kernel for block_rows ", block_rows);
  return out;
}

// What decides between the tiers: the weight (shape, pattern, density), the geometry and the batch.
std::string conv_plan_key(const char* op, const SpmmWeight& w, const ConvShape& s, int64_t batch) {
  const double density = w.rows * w.cols == 0 ? 0.0
                             : static_cast<double>(w.nnz * w.block_rows) / (w.rows * w.cols);
  auto str = [](int64_t v) { return std::to_string(v); };
  return plan_key(op, {"R" + str(w.block_rows), str(w.rows) + "x" + str(w.cols),
                       "d" + str(static_cast<int64_t>(density * 100 + 0.5)),
                       str(s.kernel_h) + "x" + str(s.kernel_w) + "s" + str(s.stride_h) + "x" +
                           str(s.stride_w),
                       str(s.out_h) + "x" + str(s.out_w), "B" + str(plan_bucket(batch))});
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

// Output size from which 1x1 outputs bypass the caches (the conv_stream_mb setting).
int64_t stream_bytes() { return setting(Setting::kConvStreamMb) * (int64_t(1) << 20); }

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& offsets,
                             const at::Tensor& indices, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, int64_t out_channels,
                             int64_t in_channels,
                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t block_rows,
                             double out_min, double out_max) {
  check_images(x, "x");
  check_weight_dim(out_channels, "out_channels");
  check_conv_channels(x, "x", in_channels, "in_channels");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  check_conv_clamp(out_min, out_max);
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t K = C * args.kernel[0] * args.kernel[1];
  SpmmWeight w = make_weight(offsets, indices, &values, out_channels, K, block_rows);
  const ConvShape s = make_conv_shape(args, C, x.size(2), x.size(3), out_channels);
  at::Tensor bias_t;
  if (bias.has_value())
    check_conv_bias(*bias, out_channels, &check_cpu,
                    {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  const bool f64 = check_conv_f64(x, values);
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
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t parts = work_parts();
  const bool split_by_groups = w.groups() >= 2 * parts;
  if (conv_is_pointwise(s)) {
    // y[b] = W x[b]: each image is a [C_in, H*W] matrix with contiguous pixel rows. Large planes
    // are split by pixels (each thread streams only its part of x and y; the weights are small and
    // shared), small ones (7x7, 14x14) by output-channel groups balanced by nonzeros.
    const std::vector<int64_t> bounds = P < 128 * parts && split_by_groups
                                            ? split_groups(w, 8 * block_rows)
                                            : split_even(P, parts, 64);
    const bool by_groups = P < 128 * parts && split_by_groups;
    run_planned(conv_plan_key("conv1x1", w, s, B), pointwise_candidates(block_rows, P),
                [&](const ConvUkernels* k) {
      parallel_ranges(bounds, [&](int64_t i0, int64_t i1) {
        for (int64_t b = 0; b < B; ++b) {
          const float* xb = xp + b * C * P;
          float* yb = yp + b * out_channels * P;
          if (by_groups) k->conv1x1(w, xb, P, 0, P, i0, i1, ep, yb, P);
          else k->conv1x1(w, xb, P, i0, i1, 0, w.groups(), ep, yb, P);
        }
      });
    });
    return y.to(x.scalar_type());
  }
  // A stride that does not divide the input leaves zero fill at the end of the phase planes, which
  // the kxk kernels cannot tell from pixels: a non-finite weight would meet it (inf * 0 = NaN)
  // where the convolution has no input. Such weights take the reference loop, which clips every
  // tap to the image (padding never enters a product, as on every other path).
  const bool ragged = s.in_h % s.stride_h != 0 || s.in_w % s.stride_w != 0;
  if (ragged && !at::isfinite(vf).all().item<bool>()) {
    parallel_ranges(split_groups(w, 8 * block_rows), [&](int64_t g0, int64_t g1) {
      for (int64_t b = 0; b < B; ++b)
        conv_direct_ref<float>(w, s, xp + b * C * in_plane, ep.bias, ep.out_min, ep.out_max, g0,
                               g1, yp + b * out_channels * P);
    });
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
  // A tier may have 1x1 kernels but no kxk one (NEON): the kxk kernel has its own chain.
  const auto kxk_candidates = tier_candidates<ConvKxKUkernel>([&](Isa isa) -> ConvKxKUkernel {
    const ConvUkernels* t = conv_ukernels(isa, block_rows);
    return t != nullptr ? t->kxk : nullptr;
  });
  TORCH_CHECK(!kxk_candidates.empty(), "no kxk conv kernel for block_rows ", block_rows);
  const float* xqp = xq.data_ptr<float>();
  const std::vector<int64_t> bounds =
      split_by_groups ? split_groups(w, 8 * block_rows) : split_even(s.out_h, parts, 1);
  run_planned(conv_plan_key("conv_kxk", w, s, B), kxk_candidates, [&](ConvKxKUkernel kxk) {
    parallel_ranges(bounds, [&](int64_t i0, int64_t i1) {
      for (int64_t b = 0; b < B; ++b) {
        const ConvPlanes in{xqp + b * image_q, hq, wq, s.out_h, s.out_w};
        if (split_by_groups) kxk(w, taps, in, 0, s.out_h, i0, i1, ep, yp + b * out_channels * P);
        else kxk(w, taps, in, i0, i1, 0, w.groups(), ep, yp + b * out_channels * P);
      }
    });
  });
  return y.to(x.scalar_type());
}

// dx of a stride-1 conv as the forward conv of dy with the flipped, transposed weight
// (conv_flip_transpose), so the tier's vector kxk ukernels and threading serve the backward;
// undefined when the geometry does not allow it (a padding beyond the dilated kernel's reach).
// dy float [B, C_out, out_h, out_w] contiguous, v float [nnz * R].
at::Tensor grad_input_as_forward_conv(const SpmmWeight& w, const ConvShape& s,
                                      const at::Tensor& offsets, const at::Tensor& indices,
                                      const at::Tensor& dy, const at::Tensor& v) {
  const int64_t pad_h = s.dil_h * (s.kernel_h - 1) - s.pad_h;
  const int64_t pad_w = s.dil_w * (s.kernel_w - 1) - s.pad_w;
  if (s.stride_h != 1 || s.stride_w != 1 || pad_h < 0 || pad_w < 0) return at::Tensor();
  const int64_t kb_t = (w.rows * s.kernel_h * s.kernel_w + kSpmmKBlock - 1) / kSpmmKBlock;
  at::Tensor offsets_t = at::empty({s.in_channels * kb_t + 1}, offsets.options());
  at::Tensor indices_t = at::empty({w.nnz * w.block_rows}, indices.options());
  at::Tensor perm = at::empty({w.nnz * w.block_rows}, offsets.options().dtype(at::kLong));
  conv_flip_transpose(w, s, offsets_t.data_ptr<int32_t>(), indices_t.data_ptr<uint8_t>(),
                      perm.data_ptr<int64_t>());
  const double inf = std::numeric_limits<double>::infinity();
  return sparse_conv2d_cpu(dy, offsets_t, indices_t, v.reshape(-1).index_select(0, perm),
                           c10::nullopt, s.in_channels, w.rows, {s.kernel_h, s.kernel_w}, {1, 1},
                           {pad_h, pad_w}, {s.dil_h, s.dil_w}, 1, -inf, inf);
}

at::Tensor sparse_conv2d_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& offsets,
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
  const int64_t B = grad_out.size(0), M = grad_out.size(1);
  SpmmWeight w = make_weight(offsets, indices, &values, M,
                             in_channels * args.kernel[0] * args.kernel[1], block_rows);
  const ConvShape s = make_conv_shape(args, in_channels, hw[0], hw[1], M);
  check_conv_grad_out_size(grad_out, s, "input_size", input_size);
  const bool f64 = grad_out.scalar_type() == at::kDouble;
  const at::ScalarType ct = f64 ? at::kDouble : at::kFloat;
  const at::Tensor dy = grad_out.to(ct).contiguous();
  const at::Tensor v = values.to(ct).contiguous();
  w.values = v.data_ptr();
  if (!f64 && B > 0 && in_channels > 0) {
    const at::Tensor dx = grad_input_as_forward_conv(w, s, offsets, indices, dy, v);
    if (dx.defined()) return dx.to(grad_out.scalar_type());
  }
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
                                         int64_t out_channels, int64_t in_channels,
                                         at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                         int64_t block_rows) {
  check_images(grad_out, "grad_out");
  check_images(x, "x");
  check_conv_channels(grad_out, "grad_out", out_channels, "out_channels");
  check_conv_channels(x, "x", in_channels, "in_channels");
  const ConvArgs args = conv_args(kernel_size, stride, padding, dilation);
  const int64_t B = x.size(0), C = x.size(1), M = grad_out.size(1);
  check_conv_same_batch(grad_out, x);
  SpmmWeight w = make_weight(offsets, indices, nullptr, M, C * args.kernel[0] * args.kernel[1],
                             block_rows);
  const ConvShape s = make_conv_shape(args, C, x.size(2), x.size(3), M);
  check_conv_grad_out_size(grad_out, s, "x of shape", x.sizes());
  const bool f64 = check_conv_grad_values_f64(grad_out, x);
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

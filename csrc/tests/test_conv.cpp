// Conv ukernels: every registry entry (1x1 and kxk) against a dense direct convolution computed
// here, the scalar references, and the geometry checks.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/conv/conv.h"
#include "test_util.h"

using namespace sparse_ext;
using sparse_ext_test::Rng;

namespace {

struct Built {
  std::vector<int32_t> offsets;
  std::vector<uint8_t> indices;
  std::vector<float> values;
  std::vector<double> values_d;
  std::vector<float> dense;  // [M, K]
  SpmmWeight w;
};

Built build(int64_t M, int64_t K, int64_t R, double density, Rng& rng) {
  Built b;
  const int64_t G = M / R, KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  b.dense.assign(static_cast<size_t>(M * K), 0.f);
  b.offsets.push_back(0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t kb = 0; kb < KB; ++kb) {
      for (int64_t c = 0; c < kSpmmKBlock && kb * kSpmmKBlock + c < K; ++c) {
        if (!rng.bernoulli(density)) continue;
        b.indices.push_back(static_cast<uint8_t>(c));
        for (int64_t r = 0; r < R; ++r) {
          const float v = rng.uniform();
          b.values.push_back(v);
          b.values_d.push_back(v);
          b.dense[(g * R + r) * K + kb * kSpmmKBlock + c] = v;
        }
      }
      b.offsets.push_back(static_cast<int32_t>(b.indices.size()));
    }
  b.w = SpmmWeight{};
  b.w.rows = M;
  b.w.cols = K;
  b.w.block_rows = R;
  b.w.nnz = static_cast<int64_t>(b.indices.size());
  b.w.offsets = b.offsets.data();
  b.w.indices = b.indices.data();
  b.w.values = b.values.data();
  b.w.value_type = ValueType::kF32;
  return b;
}

ConvShape make_shape(int64_t ci, int64_t co, int64_t h, int64_t wd, int64_t k, int64_t s,
                     int64_t p, int64_t d) {
  ConvShape sh{};
  sh.in_channels = ci;
  sh.out_channels = co;
  sh.in_h = h;
  sh.in_w = wd;
  sh.kernel_h = sh.kernel_w = k;
  sh.stride_h = sh.stride_w = s;
  sh.pad_h = sh.pad_w = p;
  sh.dil_h = sh.dil_w = d;
  sh.out_h = (h + 2 * p - d * (k - 1) - 1) / s + 1;
  sh.out_w = (wd + 2 * p - d * (k - 1) - 1) / s + 1;
  return sh;
}

// Dense direct convolution in double with bias and clamp.
std::vector<float> dense_conv(const Built& b, const ConvShape& s, const std::vector<float>& x,
                              const std::vector<float>& bias, float lo, float hi) {
  const int64_t KK = s.kernel_h * s.kernel_w, K = s.in_channels * KK;
  std::vector<float> y(static_cast<size_t>(s.out_channels * s.out_h * s.out_w));
  for (int64_t co = 0; co < s.out_channels; ++co)
    for (int64_t oy = 0; oy < s.out_h; ++oy)
      for (int64_t ox = 0; ox < s.out_w; ++ox) {
        double acc = bias[co];
        for (int64_t ci = 0; ci < s.in_channels; ++ci)
          for (int64_t kh = 0; kh < s.kernel_h; ++kh)
            for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
              const int64_t iy = oy * s.stride_h - s.pad_h + kh * s.dil_h;
              const int64_t ix = ox * s.stride_w - s.pad_w + kw * s.dil_w;
              if (iy < 0 || iy >= s.in_h || ix < 0 || ix >= s.in_w) continue;
              acc += static_cast<double>(b.dense[co * K + ci * KK + kh * s.kernel_w + kw]) *
                     x[(ci * s.in_h + iy) * s.in_w + ix];
            }
        acc = std::min<double>(std::max<double>(acc, lo), hi);
        y[(co * s.out_h + oy) * s.out_w + ox] = static_cast<float>(acc);
      }
  return y;
}

void check_case(const ConvRegistryEntry& e, const ConvShape& s, double density, float lo, float hi,
                Rng& rng) {
  const int64_t R = e.block_rows;
  if (s.out_channels % R) return;
  const int64_t KK = s.kernel_h * s.kernel_w;
  Built b = build(s.out_channels, s.in_channels * KK, R, density, rng);
  SE_EXPECT(spmm_validate(b.w).empty(), "valid weight rejected");
  SE_EXPECT(conv_check_shape(s).empty(), "valid shape rejected: %s", conv_check_shape(s).c_str());
  std::vector<float> x(static_cast<size_t>(s.in_channels * s.in_h * s.in_w));
  for (auto& v : x) v = rng.uniform();
  std::vector<float> bias(static_cast<size_t>(s.out_channels));
  for (auto& v : bias) v = rng.uniform();
  const std::vector<float> ref = dense_conv(b, s, x, bias, lo, hi);
  const ConvEpilogue ep{bias.data(), lo, hi};
  const int64_t G = s.out_channels / R, P = s.out_h * s.out_w;
  std::vector<float> y(ref.size(), -7.f);
  const bool is1x1 = s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
                     s.pad_h == 0 && s.pad_w == 0;
  const char* name = "";
  if (is1x1) {
    name = e.kernels->conv1x1_name;
    // Two group ranges and two pixel ranges, as threads would split them.
    const int64_t pm = P / 2 / 8 * 8;
    for (auto [g0, g1] : {std::pair<int64_t, int64_t>{0, G / 2}, {G / 2, G}}) {
      e.kernels->conv1x1(b.w, x.data(), P, 0, pm, g0, g1, ep, y.data(), P);
      e.kernels->conv1x1(b.w, x.data(), P, pm, P, g0, g1, ep, y.data(), P);
    }
  } else {
    if (e.kernels->kxk == nullptr) return;
    name = e.kernels->kxk_name;
    std::vector<ConvTap> taps(static_cast<size_t>(b.w.nnz));
    conv_build_taps(b.w, s, taps.data());
    const int64_t hq = conv_phase_h(s), wq = conv_phase_w(s);
    std::vector<float> xq(static_cast<size_t>(s.in_channels * s.stride_h * s.stride_w * hq * wq));
    conv_phase_split(x.data(), s, xq.data());
    const ConvPlanes in{xq.data(), hq, wq, s.out_h, s.out_w};
    const int64_t om = s.out_h / 2;
    e.kernels->kxk(b.w, taps.data(), in, 0, om, 0, G / 2, ep, y.data());
    e.kernels->kxk(b.w, taps.data(), in, om, s.out_h, 0, G / 2, ep, y.data());
    e.kernels->kxk(b.w, taps.data(), in, 0, s.out_h, G / 2, G, ep, y.data());
  }
  const double err = sparse_ext_test::max_rel_error(y.data(), ref.data(), y.size());
  SE_EXPECT(err < 1e-4 * std::max(1.0, std::sqrt(static_cast<double>(s.in_channels * KK))),
            "%s/%s ci=%ld co=%ld %ldx%ld k=%ld s=%ld p=%ld d=%ld density=%.2f: error %g",
            isa_name(e.isa), name, (long)s.in_channels, (long)s.out_channels, (long)s.in_h,
            (long)s.in_w, (long)s.kernel_h, (long)s.stride_h, (long)s.pad_h, (long)s.dil_h,
            density, err);

  // The float64 reference on the original geometry agrees too (once per shape, on scalar).
  if (e.isa == Isa::kScalar) {
    SpmmWeight wd = b.w;
    wd.values = b.values_d.data();
    wd.value_type = ValueType::kF64;
    std::vector<double> xd(x.begin(), x.end()), bd(bias.begin(), bias.end()), yd(ref.size());
    conv_direct_ref<double>(wd, s, xd.data(), bd.data(), lo, hi, 0, G, yd.data());
    std::vector<float> yf(yd.begin(), yd.end());
    const double derr = sparse_ext_test::max_rel_error(yf.data(), ref.data(), yf.size());
    SE_EXPECT(derr < 1e-5, "conv_direct_ref<double>: error %g", derr);
  }
}

void check_geometry() {
  ConvShape s = make_shape(3, 4, 5, 5, 3, 1, 1, 1);
  SE_EXPECT(conv_check_shape(s).empty(), "valid");
  s.out_h += 1;
  SE_EXPECT(!conv_check_shape(s).empty(), "wrong out_h accepted");
  s = make_shape(3, 4, 2, 2, 5, 1, 0, 1);
  SE_EXPECT(!conv_check_shape(s).empty(), "kernel larger than input accepted");
  s = make_shape(3, 4, 5, 5, 3, 1, 1, 1);
  s.stride_h = 0;
  SE_EXPECT(!conv_check_shape(s).empty(), "stride 0 accepted");
}

}  // namespace

int main() {
  Rng rng(7);
  const float inf = std::numeric_limits<float>::infinity();
  for (int i = 0; i < conv_registry_size(); ++i) {
    const ConvRegistryEntry& e = conv_registry_entry(i);
    if (!isa_supported(e.isa)) continue;
    sparse_ext_test::note_covered(isa_name(e.isa), e.kernels->conv1x1_name);
    sparse_ext_test::note_covered(isa_name(e.isa), e.kernels->kxk != nullptr ? e.kernels->kxk_name : nullptr);
    // 1x1: pixel counts exercising every tile size and the masked remainder.
    for (int64_t hw : {1, 7, 9, 35, 49, 57, 100}) {
      for (double density : {0.0, 0.1, 0.6, 1.0})
        check_case(e, make_shape(40, 16, 1, hw, 1, 1, 0, 1), density, -inf, inf, rng);
    }
    check_case(e, make_shape(300, 8, 7, 5, 1, 1, 0, 1), 0.3, 0.f, 6.f, rng);  // two K blocks, relu6
    // kxk: strides, padding, dilation, odd sizes, rows narrower and wider than a tile.
    const int64_t cases[][7] = {{3, 8, 7, 5, 3, 1, 1},   {4, 8, 9, 9, 3, 2, 1},  {5, 8, 13, 40, 3, 1, 1},
                                {4, 16, 11, 37, 5, 2, 2}, {3, 8, 15, 15, 7, 2, 3}, {2, 8, 6, 6, 3, 3, 0},
                                {4, 8, 1, 1, 3, 1, 1},   {30, 8, 12, 12, 3, 1, 0}, {4, 8, 8, 8, 1, 2, 0}};
    for (const auto& c : cases)
      for (double density : {0.1, 0.5, 1.0}) {
        check_case(e, make_shape(c[0], c[1], c[2], c[3], c[4], c[5], c[6], 1), density, -inf, inf, rng);
        check_case(e, make_shape(c[0], c[1], c[2] + 4, c[3] + 4, c[4], c[5], c[6], 2), density, 0.f,
                   inf, rng);
      }
  }
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
  sparse_ext_test::expect_covered("neon");
#endif
  check_geometry();
  return sparse_ext_test::finish("test_conv");
}

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

bool is_pointwise(const ConvShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 &&
         s.pad_w == 0;
}

// Runs the entry's 1x1 or kxk ukernel on one image as the op would (kxk through the phase split),
// over split group, pixel and row ranges as threads would cut them. Returns the ukernel's name, or
// nullptr when the entry has no kernel for the shape (y untouched).
const char* run_ukernel(const ConvRegistryEntry& e, const SpmmWeight& w, const ConvShape& s,
                        const std::vector<float>& x, const ConvEpilogue& ep,
                        std::vector<float>& y) {
  const int64_t G = s.out_channels / e.block_rows, P = s.out_h * s.out_w;
  if (is_pointwise(s)) {
    // Two group ranges and two pixel ranges.
    const int64_t pm = P / 2 / 8 * 8;
    for (auto [g0, g1] : {std::pair<int64_t, int64_t>{0, G / 2}, {G / 2, G}}) {
      e.kernels->conv1x1(w, x.data(), P, 0, pm, g0, g1, ep, y.data(), P);
      e.kernels->conv1x1(w, x.data(), P, pm, P, g0, g1, ep, y.data(), P);
    }
    return e.kernels->conv1x1_name;
  }
  if (e.kernels->kxk == nullptr) return nullptr;
  std::vector<ConvTap> taps(static_cast<size_t>(w.nnz));
  conv_build_taps(w, s, taps.data());
  const int64_t hq = conv_phase_h(s), wq = conv_phase_w(s);
  std::vector<float> xq(static_cast<size_t>(s.in_channels * s.stride_h * s.stride_w * hq * wq));
  conv_phase_split(x.data(), s, xq.data());
  const ConvPlanes in{xq.data(), hq, wq, s.out_h, s.out_w};
  const int64_t om = s.out_h / 2;
  e.kernels->kxk(w, taps.data(), in, 0, om, 0, G / 2, ep, y.data());
  e.kernels->kxk(w, taps.data(), in, om, s.out_h, 0, G / 2, ep, y.data());
  e.kernels->kxk(w, taps.data(), in, 0, s.out_h, G / 2, G, ep, y.data());
  return e.kernels->kxk_name;
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
  const int64_t G = s.out_channels / R;
  std::vector<float> y(ref.size(), -7.f);
  const char* name = run_ukernel(e, b.w, s, x, ep, y);
  if (name == nullptr) return;
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

// 0 NaN, 1 +inf, 2 -inf, 3 finite.
int fp_class(float v) { return std::isnan(v) ? 0 : std::isinf(v) ? (v > 0 ? 1 : 2) : 3; }

// Non-finite values follow the sparse product: padding is not an input, so it never takes part in
// a product (an inf weight next to the padding must not make inf * 0 = NaN), and a NaN/inf weight
// or pixel reaches exactly the outputs whose receptive field holds that in-bounds pixel through a
// stored entry. Each case pokes one weight or one (border) pixel and requires NaN / +inf / -inf at
// the same outputs as conv_direct_ref<float> (which skips padded positions) and the finite outputs
// to agree with it. No clamp, so the non-finite values reach the output as they are.
void check_nonfinite(const ConvRegistryEntry& e, const ConvShape& s, Rng& rng) {
  const int64_t R = e.block_rows;
  if (s.out_channels % R) return;
  if (!is_pointwise(s) && e.kernels->kxk == nullptr) return;
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t KK = s.kernel_h * s.kernel_w, K = s.in_channels * KK;
  const int64_t KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  const int64_t G = s.out_channels / R, H = s.in_h, W = s.in_w, C = s.in_channels;
  Built b = build(s.out_channels, K, R, 0.6, rng);
  std::vector<float> x(static_cast<size_t>(C * H * W)), bias(static_cast<size_t>(s.out_channels));
  for (auto& v : x) v = rng.uniform();
  for (auto& v : bias) v = rng.uniform();
  const ConvEpilogue ep{bias.data(), -inf, inf};

  struct Poke {
    bool weight;    // values[index] (else x[index])
    int64_t index;
    float value;
    std::string what;
  };
  std::vector<Poke> pokes;
  // +inf in the first stored entry of each kernel column (the left and right ones meet the
  // padding) and of the top and bottom kernel rows' middle column, in a channel r that varies.
  std::vector<int64_t> cols(static_cast<size_t>(b.w.nnz));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = b.offsets[g * KB + kb]; j < b.offsets[g * KB + kb + 1]; ++j)
        cols[j] = kb * kSpmmKBlock + b.indices[j];
  auto poke_weight = [&](const char* what, auto pred) {
    for (int64_t j = 0; j < b.w.nnz; ++j)
      if (pred(cols[j] / s.kernel_w % s.kernel_h, cols[j] % s.kernel_w)) {
        pokes.push_back({true, j * R + j % R, inf, std::string("+inf weight ") + what});
        return;
      }
  };
  for (int64_t kw = 0; kw < s.kernel_w; ++kw)
    poke_weight(("kw=" + std::to_string(kw)).c_str(), [&](int64_t, int64_t c) { return c == kw; });
  const int64_t mid = s.kernel_w / 2;
  poke_weight("kh=0", [&](int64_t r, int64_t c) { return r == 0 && c == mid; });
  poke_weight("kh=last", [&](int64_t r, int64_t c) { return r == s.kernel_h - 1 && c == mid; });
  // The last stored value: a kernel's scan for non-finite weights ends with its scalar tail there.
  if (b.w.nnz > 0) pokes.push_back({true, b.w.nnz * R - 1, inf, "+inf in the last stored value"});
  // One NaN / inf pixel on the border (corners, edge middles) and one inside.
  auto pixel = [&](int64_t c, int64_t iy, int64_t ix) { return (c * H + iy) * W + ix; };
  pokes.push_back({false, pixel(0, 0, 0), nan, "NaN pixel top-left"});
  pokes.push_back({false, pixel(C - 1, H - 1, W - 1), nan, "NaN pixel bottom-right"});
  pokes.push_back({false, pixel(0, H / 2, 0), nan, "NaN pixel left edge"});
  pokes.push_back({false, pixel(C - 1, H / 2, W - 1), nan, "NaN pixel right edge"});
  pokes.push_back({false, pixel(0, 0, W / 2), inf, "+inf pixel top edge"});
  pokes.push_back({false, pixel(C / 2, H - 1, W / 2), -inf, "-inf pixel bottom edge"});
  pokes.push_back({false, pixel(C / 2, H / 2, W / 2), inf, "+inf pixel inside"});

  for (const Poke& pk : pokes) {
    float& slot = (pk.weight ? b.values : x)[static_cast<size_t>(pk.index)];
    const float saved = slot;
    slot = pk.value;
    std::vector<float> ref(static_cast<size_t>(s.out_channels * s.out_h * s.out_w));
    conv_direct_ref<float>(b.w, s, x.data(), bias.data(), -inf, inf, 0, G, ref.data());
    std::vector<float> y(ref.size(), -7.f);
    const char* name = run_ukernel(e, b.w, s, x, ep, y);
    slot = saved;
    int64_t wrong = 0, first = -1, nonfinite = 0;
    double err = 0.0;
    for (size_t i = 0; i < y.size(); ++i) {
      nonfinite += fp_class(ref[i]) != 3;
      if (fp_class(y[i]) != fp_class(ref[i])) {
        if (wrong++ == 0) first = static_cast<int64_t>(i);
      } else if (fp_class(y[i]) == 3) {
        err = std::max(err, sparse_ext_test::max_rel_error(&y[i], &ref[i], 1));
      }
    }
    const int64_t P = s.out_h * s.out_w;
    SE_EXPECT(wrong == 0, "%s/%s %ldx%ld k=%ld s=%ld p=%ld d=%ld, %s: %ld outputs differ in "
              "NaN/inf/finite (ref %ld non-finite); first at co=%ld oy=%ld ox=%ld: %g, ref %g",
              isa_name(e.isa), name, (long)H, (long)W, (long)s.kernel_h, (long)s.stride_h,
              (long)s.pad_h, (long)s.dil_h, pk.what.c_str(), (long)wrong, (long)nonfinite,
              (long)(first / P), (long)(first % P / s.out_w), (long)(first % s.out_w),
              first >= 0 ? y[first] : 0.f, first >= 0 ? ref[first] : 0.f);
    SE_EXPECT(err < 1e-4 * std::max(1.0, std::sqrt(static_cast<double>(K))),
              "%s/%s %ldx%ld k=%ld, %s: finite outputs off by %g", isa_name(e.isa), name, (long)H,
              (long)W, (long)s.kernel_h, pk.what.c_str(), err);
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
    // Wide and tall planes: several column passes of unequal vector counts (70 -> 3 + 2 vectors of
    // 16, 130 -> 3 x 3), rows cut into blocks of every register-tile height, exact multiples of
    // 16, two K blocks with padding (partial sums between k-blocks), stride 2 with a 1-lane tail.
    const int64_t wide[][7] = {{6, 8, 18, 70, 3, 1, 1},  {3, 8, 7, 130, 3, 1, 1}, {40, 8, 9, 33, 3, 1, 1},
                               {4, 8, 37, 16, 3, 1, 1},  {4, 8, 20, 32, 3, 1, 1}, {6, 8, 34, 34, 3, 2, 1},
                               {60, 8, 23, 64, 3, 1, 1}};
    for (const auto& c : wide)
      check_case(e, make_shape(c[0], c[1], c[2], c[3], c[4], c[5], c[6], 1), 0.3, -inf, inf, rng);
    // Every last-vector width (k-mask tail of 1..16 lanes), for one and two vectors per row.
    for (int64_t wd = 1; wd <= 32; ++wd)
      check_case(e, make_shape(2, 8, 3, wd, 3, 1, 1, 1), 0.5, -inf, inf, rng);
    // Non-finite weights and pixels next to the padding: {C_in, C_out, H, W, k, stride, pad,
    // dilation}. Widths cover one partial tile, several tiles and a partial last tile. The strided
    // sizes are multiples of the stride: otherwise the phase split's zero fill past the image lies
    // inside the planes, where no kxk ukernel (scalar included) can tell it from input.
    const int64_t nf_cases[][8] = {{3, 8, 7, 5, 3, 1, 1, 1},   {3, 16, 9, 40, 3, 1, 1, 1},
                                   {2, 8, 6, 17, 3, 1, 1, 1},  {3, 8, 9, 12, 5, 1, 1, 1},
                                   {2, 8, 8, 37, 5, 1, 2, 1},  {3, 8, 10, 36, 3, 2, 1, 1},
                                   {3, 8, 9, 21, 3, 1, 1, 2},  {4, 8, 1, 1, 3, 1, 1, 1},
                                   {8, 16, 1, 57, 1, 1, 0, 1},  {3, 8, 9, 70, 3, 1, 1, 1},
                                   {40, 8, 6, 20, 3, 1, 1, 1}};
    for (const auto& c : nf_cases)
      check_nonfinite(e, make_shape(c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]), rng);
  }
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
  sparse_ext_test::expect_covered("neon");
#endif
#if defined(__wasm_simd128__)
  sparse_ext_test::expect_covered("wasmsimd");
#endif
  if (isa_supported(Isa::kAvx512)) sparse_ext_test::expect_covered("avx512");
  check_geometry();
  return sparse_ext_test::finish("test_conv");
}

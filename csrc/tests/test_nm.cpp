// N:M ukernels: every registry entry (every tile width) against a dense reference computed here,
// the input-gradient scatter and the values-gradient SDDMM, the float64 paths, and validation.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/nm/nm.h"
#include "test_util.h"

using namespace sparse_ext;
using sparse_ext_test::Rng;

namespace {

struct Built {
  int64_t rows, cols, n, m;
  std::vector<uint8_t> meta;
  std::vector<float> values_f32;
  std::vector<uint16_t> values_bf16;
  std::vector<double> values_f64;
  std::vector<float> dense;  // [rows, cols] what the stored values mean (bf16-exact numbers)
  NmWeight weight(ValueType vt) const {
    NmWeight w{};
    w.rows = rows;
    w.cols = cols;
    w.n = n;
    w.m = m;
    w.meta = meta.data();
    w.value_type = vt;
    w.values = vt == ValueType::kF32    ? static_cast<const void*>(values_f32.data())
               : vt == ValueType::kBF16 ? static_cast<const void*>(values_bf16.data())
                                        : static_cast<const void*>(values_f64.data());
    return w;
  }
};

void write_index(std::vector<uint8_t>& meta, int64_t row_off, int64_t j, int bits, uint32_t idx) {
  for (int b = 0; b < bits; ++b) {
    const int64_t bit = j * bits + b;
    if ((idx >> b) & 1u) meta[row_off + (bit >> 3)] |= static_cast<uint8_t>(1u << (bit & 7));
  }
}

// Random canonical N:M weight; slots past `cols` get zero values (the padding rule).
Built build(int64_t rows, int64_t cols, int64_t n, int64_t m, Rng& rng) {
  Built b{rows, cols, n, m, {}, {}, {}, {}, {}};
  NmWeight w = b.weight(ValueType::kF32);
  const int64_t G = w.groups(), kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  b.meta.assign(static_cast<size_t>(rows * stride), 0);
  b.dense.assign(static_cast<size_t>(rows * cols), 0.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < G; ++g) {
      // choose n distinct sorted indices out of m
      std::vector<int> pos(static_cast<size_t>(m));
      for (int i = 0; i < m; ++i) pos[i] = i;
      for (int i = 0; i < n; ++i) std::swap(pos[i], pos[i + rng.next() % (m - i)]);
      std::sort(pos.begin(), pos.begin() + n);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = g * n + i, c = g * m + pos[i];
        write_index(b.meta, r * stride, j, bits, static_cast<uint32_t>(pos[i]));
        const uint16_t h = c < cols ? float_to_bf16(rng.uniform()) : 0;
        b.values_bf16.push_back(h);
        b.values_f32.push_back(bf16_to_float(h));
        b.values_f64.push_back(bf16_to_float(h));
        if (c < cols) b.dense[r * cols + c] = bf16_to_float(h);
      }
    }
  SE_EXPECT(static_cast<int64_t>(b.values_f32.size()) == rows * kept, "build size");
  return b;
}

void check_entry(const NmRegistryEntry& e, int64_t rows, int64_t cols, int64_t T, int64_t n,
                 int64_t m, Rng& rng) {
  // The entry's own ukernels, with the slots it leaves to a lower tier filled from there.
  const NmUkernels k = nm_ukernels_for(e.isa, e.value_type);
  Built b = build(rows, cols, n, m, rng);
  NmWeight w = b.weight(e.value_type);
  SE_EXPECT(nm_validate(w).empty(), "valid weight rejected: %s", nm_validate(w).c_str());
  const int64_t Kp = w.padded_cols(), kept = w.kept();
  std::vector<int32_t> gcol(static_cast<size_t>(std::max<int64_t>(kept, 1)));
  nm_fill_gcol(n, m, kept, gcol.data());
  std::vector<float> x(static_cast<size_t>(T * cols)), bias(static_cast<size_t>(rows));
  for (auto& v : x) v = rng.uniform();
  for (auto& v : bias) v = rng.uniform();
  std::vector<float> ref(static_cast<size_t>(T * rows));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double acc = bias[r];
      for (int64_t c = 0; c < cols; ++c) acc += static_cast<double>(b.dense[r * cols + c]) * x[t * cols + c];
      ref[t * rows + r] = static_cast<float>(acc);
    }
  const double tol = 1e-4 * std::max<double>(1.0, std::sqrt(static_cast<double>(cols)));

  // Forward, with every tile width for T > 1.
  std::vector<int64_t> widths;
  if (T == 1) {
    widths.push_back(1);
  } else {
    for (const auto& t : k.tiles)
      if (t.fn != nullptr) widths.push_back(t.nt);
  }
  for (int64_t nt : widths) {
    NmActivations a{};
    a.tokens = T;
    a.bias = bias.data();
    a.gcol = gcol.data();
    std::vector<float> y(static_cast<size_t>(T * rows), -7.f);
    a.y = y.data();
    a.ldy = rows;
    std::vector<float> xpad, panels;
    if (T == 1) {
      xpad.assign(static_cast<size_t>(Kp + 8), 0.f);
      std::copy(x.begin(), x.end(), xpad.begin());
      a.x = xpad.data();
    } else {
      a.nt = nt;
      const int64_t P = (T + nt - 1) / nt;
      panels.assign(static_cast<size_t>(P * Kp * nt), 0.f);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t c = 0; c < cols; ++c) panels[(t / nt) * Kp * nt + c * nt + t % nt] = x[t * cols + c];
      a.panels = panels.data();
    }
    nm_run_rows(w, a, k, 0, rows / 2);  // two ranges, as two threads would
    nm_run_rows(w, a, k, rows / 2, rows);
    const double err = sparse_ext_test::max_rel_error(y.data(), ref.data(), y.size());
    SE_EXPECT(err < tol, "%s %s %ld:%ld rows=%ld cols=%ld T=%ld nt=%ld: error %g",
              isa_name(e.isa), T == 1 ? k.gemv_name : "tile", (long)n, (long)m,
              (long)rows, (long)cols, (long)T, (long)nt, err);
  }

  // Input gradient: dx = dy W, over two column-group ranges.
  std::vector<float> dy(static_cast<size_t>(T * rows));
  for (auto& v : dy) v = rng.uniform();
  {
    const int64_t nt = k.scatter_nt, P = (T + nt - 1) / nt;
    std::vector<float> dyP(static_cast<size_t>(P * rows * nt), 0.f);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < rows; ++r) dyP[(t / nt) * rows * nt + r * nt + t % nt] = dy[t * rows + r];
    std::vector<float> dx(static_cast<size_t>(T * cols), -7.f), dx_ref(dx.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < cols; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < rows; ++r) acc += static_cast<double>(dy[t * rows + r]) * b.dense[r * cols + c];
        dx_ref[t * cols + c] = static_cast<float>(acc);
      }
    // split at a K-block boundary (a multiple of 8 slots)
    const int64_t G = w.groups(), kbg = nm_k_block(n, m, k.scatter_nt) / m;
    const int64_t mid = std::min(G, kbg);
    nm_grad_input_groups(w, dyP.data(), T, k, gcol.data(), 0, mid, dx.data(), cols);
    nm_grad_input_groups(w, dyP.data(), T, k, gcol.data(), mid, G, dx.data(), cols);
    const double err = sparse_ext_test::max_rel_error(dx.data(), dx_ref.data(), dx.size());
    SE_EXPECT(err < 1e-4 * std::max<double>(1.0, std::sqrt(static_cast<double>(rows))),
              "%s %s %ld:%ld rows=%ld cols=%ld T=%ld: error %g", isa_name(e.isa),
              k.scatter_name, (long)n, (long)m, (long)rows, (long)cols, (long)T, err);
  }

  // Values gradient.
  {
    const int64_t ld = (T + 7) / 8 * 8;
    std::vector<float> dyT(static_cast<size_t>(rows * ld), 0.f), xT(static_cast<size_t>(Kp * ld), 0.f);
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t r = 0; r < rows; ++r) dyT[r * ld + t] = dy[t * rows + r];
      for (int64_t c = 0; c < cols; ++c) xT[c * ld + t] = x[t * cols + c];
    }
    std::vector<float> dv(static_cast<size_t>(rows * kept), -7.f), dv_ref(dv.size(), 0.f);
    k.sddmm(w, dyT.data(), xT.data(), ld, gcol.data(), 0, rows, dv.data());
    const int bits = w.bits();
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < kept; ++j) {
        const int64_t c = gcol[j] + nm_read_index(b.meta.data() + r * w.meta_stride(), j, bits);
        double acc = 0;
        if (c < cols)
          for (int64_t t = 0; t < T; ++t) acc += static_cast<double>(dy[t * rows + r]) * x[t * cols + c];
        dv_ref[r * kept + j] = static_cast<float>(acc);
      }
    const double err = sparse_ext_test::max_rel_error(dv.data(), dv_ref.data(), dv.size());
    SE_EXPECT(err < 1e-4 * std::max<double>(1.0, std::sqrt(static_cast<double>(T))),
              "%s %s %ld:%ld rows=%ld cols=%ld T=%ld: error %g", isa_name(e.isa),
              k.sddmm_name, (long)n, (long)m, (long)rows, (long)cols, (long)T, err);
  }
}

void check_f64(int64_t rows, int64_t cols, int64_t T, int64_t n, int64_t m, Rng& rng) {
  Built b = build(rows, cols, n, m, rng);
  NmWeight w = b.weight(ValueType::kF64);
  std::vector<double> x(static_cast<size_t>(T * cols)), y(static_cast<size_t>(T * rows));
  for (auto& v : x) v = rng.uniform();
  nm_f64_forward_rows(w, x.data(), T, nullptr, y.data(), 0, rows);
  double worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += b.dense[r * cols + c] * x[t * cols + c];
      worst = std::max(worst, std::fabs(acc - y[t * rows + r]));
    }
  SE_EXPECT(worst < 1e-12 * cols, "f64 forward %ld:%ld error %g", (long)n, (long)m, worst);
  std::vector<double> dx(static_cast<size_t>(T * cols));
  nm_f64_grad_input_groups(w, y.data(), T, dx.data(), 0, w.groups());
  worst = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < cols; ++c) {
      double acc = 0;
      for (int64_t r = 0; r < rows; ++r) acc += b.dense[r * cols + c] * y[t * rows + r];
      worst = std::max(worst, std::fabs(acc - dx[t * cols + c]));
    }
  SE_EXPECT(worst < 1e-10 * rows * cols, "f64 grad input %ld:%ld error %g", (long)n, (long)m, worst);
}

void check_validation() {
  Rng rng(5);
  Built b = build(4, 37, 2, 4, rng);
  NmWeight w = b.weight(ValueType::kF32);
  SE_EXPECT(nm_validate(w).empty(), "valid");
  // Swap the first two indices of row 1, group 3: no longer strictly increasing.
  std::vector<uint8_t> bad = b.meta;
  const int64_t stride = w.meta_stride();
  const uint32_t a0 = nm_read_index(bad.data() + stride, 6, 2), a1 = nm_read_index(bad.data() + stride, 7, 2);
  for (int j = 6; j < 8; ++j)
    for (int bit = 0; bit < 2; ++bit) bad[stride + (j * 2 + bit) / 8] &= ~(1u << ((j * 2 + bit) % 8));
  write_index(bad, stride, 6, 2, a1);
  write_index(bad, stride, 7, 2, a0);
  w.meta = bad.data();
  SE_EXPECT(nm_validate(w).find("strictly increasing") != std::string::npos, "unsorted accepted");
  // Duplicate index: slot 7 repeats slot 6.
  for (int bit = 0; bit < 2; ++bit) bad[stride + (7 * 2 + bit) / 8] &= ~(1u << ((7 * 2 + bit) % 8));
  write_index(bad, stride, 7, 2, a1);
  SE_EXPECT(nm_validate(w).find("strictly increasing") != std::string::npos, "duplicate accepted");
  w.meta = b.meta.data();
  w.m = 6;
  SE_EXPECT(!nm_check_shape(w).empty(), "m = 6 accepted");
  w.m = 4;
  w.n = 4;
  SE_EXPECT(!nm_check_shape(w).empty(), "n = m accepted");
  w.n = 0;
  SE_EXPECT(!nm_check_shape(w).empty(), "n = 0 accepted");
}

}  // namespace

int main() {
  Rng rng(42);
  // Every N:M family the NEON table-lookup GEMV serves (N:4, even N:8, 4|N:16) and some it leaves
  // to the lane-insert GEMV (odd N:8, other N:16).
  const int64_t patterns[][2] = {{2, 4}, {1, 4}, {3, 4}, {2, 8}, {4, 8}, {6, 8}, {1, 8}, {5, 8},
                                 {4, 16}, {8, 16}, {12, 16}, {1, 16}, {15, 16}};
  // rows x cols x tokens: rows not a multiple of the kernels' row tiles (4) or of the driver's
  // 16-row one-panel chunks (37); cols not a multiple of M or 32; rows with fewer than 16 slots
  // (cols 3 and 33); several K-blocks with a partial last one (700).
  const int64_t shapes[][3] = {{8, 33, 1}, {5, 64, 1}, {16, 300, 1}, {42, 72, 1}, {7, 33, 7},
                               {16, 129, 40}, {9, 700, 65}, {4, 3, 9}, {8, 256, 32},
                               {37, 200, 5}};
  for (int i = 0; i < nm_registry_size(); ++i) {
    const NmRegistryEntry& e = nm_registry_entry(i);
    if (!isa_supported(e.isa)) continue;
    for (const auto& p : patterns)
      for (const auto& s : shapes) {
        if (sparse_ext_test::small_sizes() && s[0] * s[1] * s[2] > 100000) continue;
        check_entry(e, s[0], s[1], s[2], p[0], p[1], rng);
      }
    const char* isa = isa_name(e.isa);
    sparse_ext_test::note_covered(isa, e.kernels->gemv_name);
    for (const auto& t : e.kernels->tiles) sparse_ext_test::note_covered(isa, t.name);
    sparse_ext_test::note_covered(isa, e.kernels->scatter_name);
    sparse_ext_test::note_covered(isa, e.kernels->sddmm_name);
  }
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
  sparse_ext_test::expect_covered("neon");
#endif
#if defined(__wasm_simd128__)
  sparse_ext_test::expect_covered("wasmsimd");
#endif
  if (isa_supported(Isa::kAvx512)) sparse_ext_test::expect_covered("avx512");
  for (const auto& p : patterns) check_f64(6, 45, 3, p[0], p[1], rng);
  check_validation();
  return sparse_ext_test::finish("test_nm");
}

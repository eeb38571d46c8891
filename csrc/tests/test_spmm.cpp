// SpMM ukernels: every registry entry against a dense reference computed here, plus validation
// of malformed structures.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/spmm/spmm.h"
#include "test_util.h"

using namespace sparse_ext;
using sparse_ext_test::Rng;

namespace {

struct Built {
  std::vector<int32_t> offsets;
  std::vector<uint8_t> indices;
  std::vector<float> values_f32;
  std::vector<uint16_t> values_bf16;
  std::vector<float> dense;  // [M, K] exactly what the stored (possibly rounded) values mean
  SpmmWeight weight(ValueType vt) const {
    SpmmWeight w{};
    w.offsets = offsets.data();
    w.indices = indices.data();
    w.value_type = vt;
    w.values = vt == ValueType::kF32 ? static_cast<const void*>(values_f32.data())
                                     : static_cast<const void*>(values_bf16.data());
    return w;
  }
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
          const uint16_t h = float_to_bf16(rng.uniform());
          b.values_bf16.push_back(h);
          b.values_f32.push_back(bf16_to_float(h));  // same numbers in both dtypes
          b.dense[(g * R + r) * K + kb * kSpmmKBlock + c] = bf16_to_float(h);
        }
      }
      b.offsets.push_back(static_cast<int32_t>(b.indices.size()));
    }
  return b;
}

// Segment (g, kb) gets counts[(g * KB + kb) % counts.size()] entries (clipped to the block's
// width unless repeat_columns, where the columns cycle so that a segment may be longer than its
// block is wide).
Built build_counts(int64_t M, int64_t K, int64_t R, const std::vector<int>& counts,
                   bool repeat_columns, Rng& rng) {
  Built b;
  const int64_t G = M / R, KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  b.dense.assign(static_cast<size_t>(M * K), 0.f);
  b.offsets.push_back(0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t kb = 0; kb < KB; ++kb) {
      const int64_t width = std::min<int64_t>(kSpmmKBlock, K - kb * kSpmmKBlock);
      int64_t n = counts[static_cast<size_t>(g * KB + kb) % counts.size()];
      if (!repeat_columns) n = std::min(n, width);
      const int64_t first = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(width));
      for (int64_t e = 0; e < n; ++e) {
        // sorted and distinct unless repeat_columns
        const int64_t c = repeat_columns ? (first + e) % width : e * width / n;
        b.indices.push_back(static_cast<uint8_t>(c));
        for (int64_t r = 0; r < R; ++r) {
          const uint16_t h = float_to_bf16(rng.uniform());
          b.values_bf16.push_back(h);
          b.values_f32.push_back(bf16_to_float(h));
          b.dense[(g * R + r) * K + kb * kSpmmKBlock + c] += bf16_to_float(h);
        }
      }
      b.offsets.push_back(static_cast<int32_t>(b.indices.size()));
    }
  return b;
}

void check_weight(const SpmmRegistryEntry& e, const Built& b, int64_t M, int64_t K, int64_t N,
                  const char* what, Rng& rng) {
  const int64_t R = e.block_rows;
  SpmmWeight w = b.weight(e.value_type);
  w.rows = M;
  w.cols = K;
  w.block_rows = R;
  w.nnz = static_cast<int64_t>(b.indices.size());
  SE_EXPECT(spmm_validate(w).empty(), "valid weight rejected: %s", spmm_validate(w).c_str());
  const int64_t Kp = w.padded_cols();
  std::vector<float> x(static_cast<size_t>(N * K));
  for (auto& v : x) v = rng.uniform();
  std::vector<float> bias(static_cast<size_t>(M));
  for (auto& v : bias) v = rng.uniform();
  std::vector<float> ref(static_cast<size_t>(N * M));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      double acc = bias[m];
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(b.dense[m * K + k]) * x[n * K + k];
      ref[n * M + m] = static_cast<float>(acc);
    }
  SpmmActivations a{};
  a.tokens = N;
  a.bias = bias.data();
  std::vector<float> y(static_cast<size_t>(N * M), -7.f);
  a.y = y.data();
  a.ldy = M;
  std::vector<float> xpad, xT;
  if (N == 1) {
    xpad.assign(static_cast<size_t>(Kp), 0.f);
    std::copy(x.begin(), x.end(), xpad.begin());
    a.x = xpad.data();
  } else {
    const int64_t nt = spmm_tile_cols_for(*e.kernels, N);
    const int64_t tiles = (N + nt - 1) / nt;
    xT.assign(static_cast<size_t>(tiles * Kp * nt), 0.f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) xT[(n / nt) * Kp * nt + k * nt + n % nt] = x[n * K + k];
    a.xT = xT.data();
  }
  // Two ranges, as two threads would run them.
  const int64_t G = M / R;
  spmm_run_groups(w, a, *e.kernels, 0, G / 2);
  spmm_run_groups(w, a, *e.kernels, G / 2, G);
  const double err = sparse_ext_test::max_rel_error(y.data(), ref.data(), y.size());
  SE_EXPECT(err < 1e-4 * std::max<double>(1.0, std::sqrt(static_cast<double>(K))),
            "%s/%s M=%ld K=%ld N=%ld R=%ld %s: error %g", isa_name(e.isa),
            N == 1 ? e.kernels->gemv_name : e.kernels->tile_name, (long)M, (long)K, (long)N,
            (long)R, what, err);

  // SDDMM against the dense product dy^T x at stored positions.
  if (N > 1) {
    const int64_t ld = (N + 7) / 8 * 8;
    std::vector<float> dyT(static_cast<size_t>(M * ld), 0.f), xT8(static_cast<size_t>(Kp * ld), 0.f);
    std::vector<float> dy(static_cast<size_t>(N * M));
    for (auto& v : dy) v = rng.uniform();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t m = 0; m < M; ++m) dyT[m * ld + n] = dy[n * M + m];
      for (int64_t k = 0; k < K; ++k) xT8[k * ld + n] = x[n * K + k];
    }
    std::vector<float> dv(static_cast<size_t>(w.nnz * R), 0.f), dv_ref(dv.size(), 0.f);
    e.kernels->sddmm(w, dyT.data(), xT8.data(), ld, 0, G, dv.data());
    const int64_t KB = w.k_blocks();
    for (int64_t g = 0; g < G; ++g)
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int32_t j = b.offsets[g * KB + kb]; j < b.offsets[g * KB + kb + 1]; ++j)
          for (int64_t r = 0; r < R; ++r) {
            double acc = 0;
            for (int64_t n = 0; n < N; ++n)
              acc += static_cast<double>(dy[n * M + g * R + r]) * x[n * K + kb * kSpmmKBlock + b.indices[j]];
            dv_ref[j * R + r] = static_cast<float>(acc);
          }
    const double derr = sparse_ext_test::max_rel_error(dv.data(), dv_ref.data(), dv.size());
    SE_EXPECT(derr < 1e-4 * std::max<double>(1.0, std::sqrt(static_cast<double>(N))),
              "%s sddmm M=%ld K=%ld N=%ld R=%ld: error %g", isa_name(e.isa), (long)M, (long)K,
              (long)N, (long)R, derr);
  }
}

void check_entry(const SpmmRegistryEntry& e, int64_t M, int64_t K, int64_t N, double density,
                 Rng& rng) {
  if (M % e.block_rows) return;
  const Built b = build(M, K, e.block_rows, density, rng);
  char what[32];
  std::snprintf(what, sizeof what, "density=%.2f", density);
  check_weight(e, b, M, K, N, what, rng);
}

// Chunk boundaries of the vector ukernels: segment lengths around 16 (and 0) make 16-entry
// chunks span 2 and 3 column blocks, follow empty blocks, and end rows of fewer than 16 entries;
// K = 2000 leaves a partial last block (208 columns); the long segments of repeated columns
// exceed a run of the row-run tile.
void check_segment_lengths(const SpmmRegistryEntry& e, Rng& rng) {
  const std::vector<std::vector<int>> patterns = {
      {15, 1, 0, 17, 3, 0, 0, 2, 31, 16, 5, 9, 33, 0, 7},  // 2- and 3-block chunks, empty blocks
      {1, 0, 0, 2, 0, 3, 0, 0},                           // rows of fewer than 16 entries
      {0, 0, 0, 0, 0, 0, 0, 0, 16},                       // one full chunk in one block
      {256, 256, 200, 13},                                // dense blocks and a short tail
  };
  for (const auto& counts : patterns)
    for (int64_t N : {1, 7, 16, 40, 65}) {
      const int64_t M = 24;
      if (sparse_ext_test::small_sizes() && N > 16) continue;
      check_weight(e, build_counts(M, 2000, e.block_rows, counts, false, rng), M, 2000, N,
                   "segment lengths", rng);
    }
  const std::vector<int> long_segments = {1100, 0, 3, 1500};
  for (int64_t N : {1, 9, 16, 33})
    check_weight(e, build_counts(16, 600, e.block_rows, long_segments, true, rng), 16, 600, N,
                 "repeated columns", rng);
  // 32 blocks: rows of several runs (40 entries per block), and one long segment in an otherwise
  // sparse row (1100 repeated columns, then 31 empty blocks).
  std::vector<int> one_long(32, 0);
  one_long[0] = 1100;
  for (int64_t N : {1, 16, 20}) {
    check_weight(e, build_counts(8, 8000, e.block_rows, {40}, false, rng), 8, 8000, N,
                 "several runs", rng);
    check_weight(e, build_counts(8, 8000, e.block_rows, one_long, true, rng), 8, 8000, N,
                 "one long segment", rng);
  }
}

void check_validation() {
  Rng rng(3);
  Built b = build(8, 300, 1, 0.5, rng);
  SpmmWeight w = b.weight(ValueType::kF32);
  w.rows = 8;
  w.cols = 300;
  w.block_rows = 1;
  w.nnz = static_cast<int64_t>(b.indices.size());
  SE_EXPECT(spmm_validate(w).empty(), "valid");
  std::vector<int32_t> bad_offsets = b.offsets;
  std::swap(bad_offsets[3], bad_offsets[4]);
  if (bad_offsets[3] != bad_offsets[4]) {
    w.offsets = bad_offsets.data();
    SE_EXPECT(!spmm_validate(w).empty(), "decreasing offsets accepted");
  }
  w.offsets = b.offsets.data();
  std::vector<uint8_t> bad_indices = b.indices;
  // The last segment belongs to the partial block (columns 256..299): 60 is past K.
  const int32_t last = b.offsets[b.offsets.size() - 2];
  if (last < static_cast<int32_t>(bad_indices.size())) {
    bad_indices[last] = 60;
    w.indices = bad_indices.data();
    SE_EXPECT(spmm_validate(w).find("out of range") != std::string::npos, "index past K accepted");
  }
  w.indices = b.indices.data();
  w.nnz += 1;
  SE_EXPECT(!spmm_validate(w).empty(), "length mismatch accepted");
  w.nnz -= 1;
  w.block_rows = 3;
  SE_EXPECT(!spmm_validate(w).empty(), "block_rows 3 accepted");
}

}  // namespace

// The tiers fall back one step at a time, and a lookup along the chain finds the best tier that
// has a ukernel: never the scalar reference while a vector tier below the active one has one.
void check_fallback_chain() {
  SE_EXPECT(isa_fallback(Isa::kAvx512) == Isa::kAvx2, "avx512 must fall back to avx2");
  SE_EXPECT(isa_fallback(Isa::kAvx2) == Isa::kScalar, "avx2 must fall back to scalar");
  SE_EXPECT(isa_fallback(Isa::kNeon) == Isa::kScalar, "neon must fall back to scalar");
  SE_EXPECT(isa_fallback(Isa::kWasmSimd) == Isa::kScalar, "wasmsimd must fall back to scalar");
  for (ValueType vt : {ValueType::kF32, ValueType::kBF16})
    for (int64_t R : {1, 2, 4, 8}) {
      const SpmmUkernels* avx2 = spmm_ukernels(Isa::kAvx2, vt, R);
      // a tier with nothing of its own (here: any ISA with only the AVX2 kernels removed)
      const SpmmUkernels* found = lookup_along_chain(Isa::kAvx512, [&](Isa isa) {
        return isa == Isa::kAvx512 ? nullptr : spmm_ukernels(isa, vt, R);
      });
      SE_EXPECT(found == (avx2 != nullptr ? avx2 : spmm_ukernels(Isa::kScalar, vt, R)),
                "avx512 without kernels must run avx2's (R=%ld)", (long)R);
    }
}

int main() {
  Rng rng(42);
  for (int i = 0; i < spmm_registry_size(); ++i) {
    const SpmmRegistryEntry& e = spmm_registry_entry(i);
    if (!isa_supported(e.isa)) continue;
    const int64_t shapes[][3] = {{8, 33, 1}, {16, 256, 1}, {8, 700, 1},  {16, 33, 7},
                                 {24, 513, 40}, {64, 300, 65}, {8, 1, 9}, {8, 256, 32}};
    for (const auto& s : shapes) {
      if (sparse_ext_test::small_sizes() && s[0] * s[1] * s[2] > 100000) continue;
      for (double density : {0.0, 0.05, 0.5, 1.0}) check_entry(e, s[0], s[1], s[2], density, rng);
    }
    check_segment_lengths(e, rng);
    const char* isa = isa_name(e.isa);
    sparse_ext_test::note_covered(isa, e.kernels->gemv_name);
    sparse_ext_test::note_covered(isa, e.kernels->tile_name);
    sparse_ext_test::note_covered(isa, e.kernels->narrow_tile_name);
    sparse_ext_test::note_covered(isa, e.kernels->sddmm_name);
  }
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
  sparse_ext_test::expect_covered("neon");
#endif
#if defined(__wasm_simd128__)
  sparse_ext_test::expect_covered("wasmsimd");
#endif
  if (isa_supported(Isa::kAvx512)) sparse_ext_test::expect_covered("avx512");
  check_fallback_chain();
  check_validation();
  return sparse_ext_test::finish("test_spmm");
}

// Structure validation, the per-range driver, the transposed structure and the ukernel registry.
#include "spmm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/registry.h"

namespace sparse_ext {

std::string spmm_validate(const SpmmWeight& w) {
  const int64_t R = w.block_rows;
  if (R != 1 && R != 2 && R != 4 && R != 8)
    return "block_rows must be 1, 2, 4 or 8, got " + std::to_string(R);
  if (w.rows < 0 || w.cols < 0 || w.nnz < 0) return "sizes must be non-negative";
  if (w.rows % R != 0)
    return "out_features (" + std::to_string(w.rows) + ") must be a multiple of block_rows (" +
           std::to_string(R) + ")";
  if (w.nnz > INT32_MAX) return "more than 2^31 - 1 stored entries";
  const int64_t segments = w.groups() * w.k_blocks();
  if (w.offsets[0] != 0) return "offsets[0] must be 0, got " + std::to_string(w.offsets[0]);
  for (int64_t s = 0; s < segments; ++s) {
    if (w.offsets[s + 1] < w.offsets[s])
      return "offsets must not decrease, but offsets[" + std::to_string(s + 1) + "] = " +
             std::to_string(w.offsets[s + 1]) + " < offsets[" + std::to_string(s) +
             "] = " + std::to_string(w.offsets[s]);
  }
  if (w.offsets[segments] != w.nnz)
    return "offsets[-1] must equal the number of indices (" + std::to_string(w.nnz) + "), got " +
           std::to_string(w.offsets[segments]);
  // Only the last column block can be partial, so only its indices can point past K.
  const int64_t KB = w.k_blocks();
  const int64_t last_width = w.cols - (KB - 1) * kSpmmKBlock;
  if (KB > 0 && last_width < kSpmmKBlock) {
    for (int64_t g = 0; g < w.groups(); ++g) {
      for (int32_t j = w.offsets[g * KB + KB - 1]; j < w.offsets[g * KB + KB]; ++j) {
        if (w.indices[j] >= last_width)
          return "column index out of range: entry " + std::to_string(j) + " of row group " +
                 std::to_string(g) + " points at column " +
                 std::to_string((KB - 1) * kSpmmKBlock + w.indices[j]) + " >= in_features (" +
                 std::to_string(w.cols) + ")";
      }
    }
  }
  return std::string();
}

void spmm_run_groups(const SpmmWeight& w, const SpmmActivations& a, const SpmmUkernels& k,
                     int64_t g0, int64_t g1) {
  const int64_t R = w.block_rows;
  if (a.tokens == 1) {  // y is one row of M: the ukernel writes the range's rows in place
    k.gemv(w, a.x, g0, g1, a.y);
    if (a.bias != nullptr)
      for (int64_t m = g0 * R; m < g1 * R; ++m) a.y[m] += a.bias[m];
    return;
  }
  const int64_t NT = spmm_tile_cols_for(k, a.tokens);
  const SpmmTileUkernel tile = NT == k.tile_cols ? k.tile : k.narrow_tile;
  // Row groups per call: the output tile (chunk * R * NT floats, 8 KB) stays in L1 until it is
  // transposed into y.
  const int64_t chunk = std::max<int64_t>(1, 2048 / (R * NT));
  std::vector<float> ytile(static_cast<size_t>(chunk * R * NT));
  for (int64_t n0 = 0; n0 < a.tokens; n0 += NT) {
    const int64_t nt = std::min(NT, a.tokens - n0);
    for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
      const int64_t c1 = std::min(g1, c0 + chunk);
      tile(w, a.xT + n0 * w.padded_cols(), NT, c0, c1, ytile.data());
      const int64_t m0 = c0 * R, rows = (c1 - c0) * R;
      for (int64_t n = 0; n < nt; ++n) {
        float* yrow = a.y + (n0 + n) * a.ldy + m0;
        const float* src = ytile.data() + n;
        if (a.bias != nullptr) {
          for (int64_t r = 0; r < rows; ++r) yrow[r] = src[r * NT] + a.bias[m0 + r];
        } else {
          for (int64_t r = 0; r < rows; ++r) yrow[r] = src[r * NT];
        }
      }
    }
  }
}

void spmm_transpose_structure(const SpmmWeight& w, int32_t* offsets_t, uint8_t* indices_t,
                              int64_t* perm) {
  const int64_t R = w.block_rows, KB = w.k_blocks(), M = w.rows, K = w.cols;
  const int64_t MB = (M + kSpmmKBlock - 1) / kSpmmKBlock;
  const int64_t segments = K * MB;
  std::vector<int64_t> count(static_cast<size_t>(segments + 1), 0);
  for (int64_t g = 0; g < w.groups(); ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const int64_t k = kb * kSpmmKBlock + w.indices[j];
        for (int64_t r = 0; r < R; ++r) count[k * MB + (g * R + r) / kSpmmKBlock + 1]++;
      }
  for (int64_t s = 0; s < segments; ++s) count[s + 1] += count[s];
  for (int64_t s = 0; s <= segments; ++s) offsets_t[s] = static_cast<int32_t>(count[s]);
  // Fill in increasing row order so each transposed segment comes out sorted by column.
  for (int64_t g = 0; g < w.groups(); ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const int64_t k = kb * kSpmmKBlock + w.indices[j];
        for (int64_t r = 0; r < R; ++r) {
          const int64_t m = g * R + r;
          const int64_t pos = count[k * MB + m / kSpmmKBlock]++;
          indices_t[pos] = static_cast<uint8_t>(m % kSpmmKBlock);
          perm[pos] = j * R + r;
        }
      }
}

namespace {

const UkernelRegistry<SpmmRegistryEntry>& registry() {
  static const UkernelRegistry<SpmmRegistryEntry> entries([](auto add) {
    for (Isa isa : kAllIsas)
      for (ValueType vt : {ValueType::kF32, ValueType::kBF16})
        for (int64_t R : {1, 2, 4, 8}) add({isa, vt, R, spmm_ukernels(isa, vt, R)});
  });
  return entries;
}

}  // namespace

const SpmmUkernels* spmm_ukernels(Isa isa, ValueType value_type, int64_t block_rows) {
  switch (isa) {
    case Isa::kScalar: return spmm_ukernels_scalar(value_type, block_rows);
    case Isa::kAvx2: return spmm_ukernels_avx2(value_type, block_rows);
    case Isa::kAvx512: return spmm_ukernels_avx512(value_type, block_rows);
    case Isa::kNeon: return spmm_ukernels_neon(value_type, block_rows);
    case Isa::kWasmSimd: return spmm_ukernels_wasmsimd(value_type, block_rows);
    default: return nullptr;
  }
}

int spmm_registry_size() { return registry().size(); }
const SpmmRegistryEntry& spmm_registry_entry(int i) { return registry().entry(i); }

}  // namespace sparse_ext

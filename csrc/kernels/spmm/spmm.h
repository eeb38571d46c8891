// Unstructured and row-block sparse weight x dense activations: y = x W^T (+ bias).
//
// Weight format ("blocked CSR", see docs/architecture.md):
//   W is [M, K] (out_features x in_features). Rows are taken in groups of R (R in {1, 2, 4, 8},
//   M % R == 0) that share one column pattern; R = 1 is plain unstructured sparsity. Columns are
//   split into KB = ceil(K / 256) blocks of 256 so a column index fits in one byte and a block of
//   activations stays in cache while many rows use it.
//     offsets  int32  [G * KB + 1], G = M / R. Segment (g, kb) holds entries
//                     offsets[g*KB + kb] .. offsets[g*KB + kb + 1] (row-group major).
//     indices  uint8  [nnz]      column - 256 * kb of each entry.
//     values   f32|bf16 [nnz * R] entry j holds rows g*R .. g*R + R - 1 at values[j*R + r].
//   offsets[g*KB] is the prefix sum of nonzeros, which is how threads balance work.
#pragma once

#include <cstdint>
#include <string>

#include "../common/isa.h"
#include "../common/value_type.h"

namespace sparse_ext {

constexpr int kSpmmKBlock = 256;

struct SpmmWeight {
  int64_t rows;         // M
  int64_t cols;         // K
  int64_t block_rows;   // R
  int64_t nnz;          // entries (each carries R values)
  const int32_t* offsets;
  const uint8_t* indices;
  const void* values;
  ValueType value_type;

  int64_t groups() const { return rows / block_rows; }
  int64_t k_blocks() const { return (cols + kSpmmKBlock - 1) / kSpmmKBlock; }
  int64_t padded_cols() const { return k_blocks() * kSpmmKBlock; }
};

// Checks sizes, offsets (start at 0, never decrease, end at nnz) and that every index stays below K.
// Returns an empty string when the structure is valid, else a message naming what is wrong.
// After it passes, every kernel below reads only inside the documented buffers.
std::string spmm_validate(const SpmmWeight& w);

// One token: y[g*R + r] = sum_k W[g*R + r, k] * x[k] for groups g in [g0, g1).
//   x  float [w.padded_cols()], zero beyond K.   y  float [M] (only the group's rows are written).
using SpmmGemvUkernel = void (*)(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1,
                                 float* y);

// A tile of tokens in transposed layout: ytile[(g - g0)*R + r, n] = sum_k W[g*R + r, k] * xT[k, n]
// for n < tile_cols, overwriting ytile.
//   xT     float [w.padded_cols(), ldx], zero beyond K; the tile starts at column 0 of the pointer.
//          The driver always passes packed tiles (ldx == tile_cols), which vector ukernels assume.
//   ytile  float [(g1 - g0) * R, tile_cols].
using SpmmTileUkernel = void (*)(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0,
                                 int64_t g1, float* ytile);

// Gradient of the values: dv[j*R + r] = sum_n dyT[g*R + r, n] * xT[256*kb + indices[j], n] for the
// entries of groups [g0, g1).
//   dyT float [M, ld], xT float [w.padded_cols(), ld], both zero in columns n >= N; ld % 8 == 0.
//   dv  float [nnz * R].
using SpmmSddmmUkernel = void (*)(const SpmmWeight& w, const float* dyT, const float* xT,
                                  int64_t ld, int64_t g0, int64_t g1, float* dv);

struct SpmmUkernels {
  const char* gemv_name;
  SpmmGemvUkernel gemv;
  const char* tile_name;
  SpmmTileUkernel tile;
  int64_t tile_cols;  // tokens per tile (NT)
  // Optional narrower tile for few tokens (N <= narrow_tile_cols), or nullptr.
  const char* narrow_tile_name;
  SpmmTileUkernel narrow_tile;
  int64_t narrow_tile_cols;
  const char* sddmm_name;
  SpmmSddmmUkernel sddmm;
};

// The ukernels for an ISA, value type and R, or nullptr when the ISA is not compiled in.
const SpmmUkernels* spmm_ukernels(Isa isa, ValueType value_type, int64_t block_rows);

// Tokens per tile the driver uses for N tokens: the narrow tile when it exists and N fits in it.
inline int64_t spmm_tile_cols_for(const SpmmUkernels& k, int64_t tokens) {
  return (k.narrow_tile != nullptr && tokens <= k.narrow_tile_cols) ? k.narrow_tile_cols
                                                                     : k.tile_cols;
}

// Every compiled (isa, value type, R) combination, for tests and benchmarks to expand.
struct SpmmRegistryEntry {
  Isa isa;
  ValueType value_type;
  int64_t block_rows;
  const SpmmUkernels* kernels;
};
int spmm_registry_size();
const SpmmRegistryEntry& spmm_registry_entry(int i);

// Per-ISA tables (defined in spmm-scalar.cpp, spmm-avx2.cpp, spmm-neon.cpp, spmm-wasmsimd.cpp; a
// non-matching architecture's table is a nullptr stub).
const SpmmUkernels* spmm_ukernels_scalar(ValueType value_type, int64_t block_rows);
const SpmmUkernels* spmm_ukernels_avx2(ValueType value_type, int64_t block_rows);
const SpmmUkernels* spmm_ukernels_avx512(ValueType value_type, int64_t block_rows);
const SpmmUkernels* spmm_ukernels_neon(ValueType value_type, int64_t block_rows);
const SpmmUkernels* spmm_ukernels_wasmsimd(ValueType value_type, int64_t block_rows);

// Driver for a range of row groups: y[n, m] = sum_k W[m, k] x[n, k] + bias[m] for all N tokens and
// rows m of groups [g0, g1). Picks GEMV for N == 1 and the tile kernel otherwise.
//   x     float [N, w.padded_cols()] when N == 1 or xT == nullptr is unused; see below.
//   xT    float [ceil(N / NT), w.padded_cols(), NT] transposed activations packed per tile of
//         NT = spmm_tile_cols_for(k, N) tokens, zero-padded; required when N > 1. Packing keeps a tile's rows
//         contiguous: a power-of-two row stride (ldx = N) would map every row to a few L1 sets.
//   bias  float [M] or nullptr.   y  float [N, ldy].
struct SpmmActivations {
  int64_t tokens;       // N
  const float* x;       // N == 1: padded row of K floats
  const float* xT;      // N > 1: transposed, packed per tile, padded
  const float* bias;
  float* y;
  int64_t ldy;
};
void spmm_run_groups(const SpmmWeight& w, const SpmmActivations& a, const SpmmUkernels& k,
                     int64_t g0, int64_t g1);

// float64 path (gradcheck and references; scalar only): values, x, bias and y are double.
//   x [N, K] row-major, bias [M] or nullptr, y [N, M]; rows of groups [g0, g1) are written.
void spmm_f64_groups(const SpmmWeight& w, const double* x, int64_t N, const double* bias, double* y,
                     int64_t g0, int64_t g1);
//   dy [N, M], x [N, K], dv [nnz * R]: entries of groups [g0, g1) are written.
void sddmm_f64_groups(const SpmmWeight& w, const double* dy, const double* x, int64_t N,
                      int64_t g0, int64_t g1, double* dv);

// Transposed structure for the input gradient: W^T [K, M] in the same format with R = 1.
//   offsets_t int32 [K * ceil(M/256) + 1], indices_t uint8 [nnz * R],
//   perm int64 [nnz * R]: entry e of W^T takes its value from values[perm[e]].
void spmm_transpose_structure(const SpmmWeight& w, int32_t* offsets_t, uint8_t* indices_t,
                              int64_t* perm);

}  // namespace sparse_ext

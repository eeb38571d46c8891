// N:M semi-structured sparse weight x dense activations: y = x W^T (+ bias).
//
// Weight format (see docs/nm.md):
//   W is [rows, cols] (out_features x in_features). Columns are split into G = ceil(cols / M)
//   groups of M consecutive columns; every group stores exactly N slots (1 <= N < M, M in 4/8/16).
//   When cols % M != 0 the last group is padded with virtual zero columns cols .. G*M - 1; a slot
//   may point at them (its value is then multiplied by a zero activation and never contributes).
//     values    f32|bf16|f64 [rows, G*N]   slot j of row r holds W[r, (j / N) * M + index(r, j)].
//     metadata  uint8 [rows, meta_stride]  meta_stride = ceil(G*N*B / 8), B = log2(M) bits per slot:
//               slot j's index occupies bits j*B .. j*B + B - 1 of its row's little-endian bit
//               stream (bit p is (meta[p >> 3] >> (p & 7)) & 1).
//   Canonical form (what from_dense writes and validate() checks): the N indices of a group are
//   strictly increasing; unused slots hold zero values. Any B-bit index is < M, so no metadata
//   byte can make a kernel read outside its documented buffers.
//   Fixed N slots per group => every row costs the same (threads split rows evenly) and the
//   indices are B bits wide.
#pragma once

#include <cstdint>
#include <string>

#include "../common/isa.h"
#include "../common/value_type.h"
#include "../spmm/spmm.h"

namespace sparse_ext {

inline int nm_index_bits(int64_t m) { return m == 4 ? 2 : m == 8 ? 3 : m == 16 ? 4 : 0; }

struct NmWeight {
  int64_t rows;         // out_features
  int64_t cols;         // in_features
  int64_t n;            // kept slots per group
  int64_t m;            // group width
  const void* values;   // [rows, kept()]
  ValueType value_type;
  const uint8_t* meta;  // [rows, meta_stride()]

  int64_t groups() const { return (cols + m - 1) / m; }
  int64_t kept() const { return groups() * n; }
  int64_t padded_cols() const { return groups() * m; }
  int bits() const { return nm_index_bits(m); }
  int64_t meta_stride() const { return (kept() * bits() + 7) / 8; }
};

// Index (0 .. M-1) of slot j of a row whose metadata starts at `row_meta`.
inline uint32_t nm_read_index(const uint8_t* row_meta, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = static_cast<uint32_t>(row_meta[byte]) >> shift;
  if (shift + bits > 8) v |= static_cast<uint32_t>(row_meta[byte + 1]) << (8 - shift);
  return v & ((1u << bits) - 1u);
}

// Checks n, m and sizes. Returns "" when usable, else a message naming what is wrong.
std::string nm_check_shape(const NmWeight& w);
// Full canonical check (strictly increasing indices within every group); O(rows * kept).
// Returns "" or a message naming the first bad row and group.
std::string nm_validate(const NmWeight& w);

// Per-slot column offset of its group inside a K-block: gcol[j] = (j / N) * M, j < count.
// Every ukernel takes this table so that one code path serves every N.

// One token: y[r] = sum_j W[r, col(r, j)] * x[col(r, j)] for rows [r0, r1).
//   x     float [w.padded_cols() + 8], zero beyond cols.
//   gcol  int32 [w.kept()] (the table above for the whole row).
//   y     float [rows] (entries r0 .. r1 - 1 are written).
using NmGemvUkernel = void (*)(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0,
                               int64_t r1, float* y);

// A tile of NT tokens in panel layout, groups [g0, g1) of rows [r0, r1), accumulating:
//   ytile[(r - r0) * NT + t] += sum_{g0*N <= j < g1*N} W[r, col(r, j)] * xP[col(r, j) * NT + t].
//   xP     float [w.padded_cols(), NT] token-tile panel, zero in padded columns and tokens.
//   gcol   int32 [(g1 - g0) * N] (the table above, starting at the block).
//   ytile  float [(r1 - r0), NT].
//   g0 * N must be a multiple of 8 (vector metadata decode); (g1 - g0) * N <= kNmMaxBlockSlots.
using NmTileUkernel = void (*)(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0,
                               int64_t g1, int64_t r0, int64_t r1, float* ytile);

// Input gradient, transposed and tiled (the scatter form of the tile kernel):
//   dxtile[(c - g0*M) * NT + t] += sum_{r0 <= r < r1} sum_{slots j of groups [g0, g1)}
//                                   [col(r, j) == c] W[r, j] * dyP[r * NT + t]
//   dyP     float [rows, NT] grad_out panel.   dxtile float [(g1 - g0) * M, NT].
//   gcol    int32 [(g1 - g0) * N].   g0 * N a multiple of 8; (g1 - g0) * N <= kNmMaxBlockSlots.
using NmScatterUkernel = void (*)(const NmWeight& w, const float* dyP, const int32_t* gcol,
                                  int64_t g0, int64_t g1, int64_t r0, int64_t r1, float* dxtile);

// Gradient of the values: dv[r * kept + j] = sum_{t < ld} dyT[r * ld + t] * xT[col(r, j) * ld + t]
// for rows [r0, r1).
//   dyT float [rows, ld], xT float [w.padded_cols(), ld], zero in padded tokens/columns; ld % 8 == 0.
//   gcol int32 [w.kept()].   dv float [rows, w.kept()].
using NmSddmmUkernel = void (*)(const NmWeight& w, const float* dyT, const float* xT, int64_t ld,
                                const int32_t* gcol, int64_t r0, int64_t r1, float* dv);

constexpr int kNmTileVariants = 4;
// Most slots per row one tile / scatter call may cover (nm_k_block keeps blocks at or below it).
constexpr int64_t kNmMaxBlockSlots = 256;

struct NmUkernels {
  const char* gemv_name;
  NmGemvUkernel gemv;
  // Tile kernels by width, narrowest first; unused slots have fn == nullptr.
  struct Tile {
    const char* name;
    NmTileUkernel fn;
    int64_t nt;  // tokens per tile
  } tiles[kNmTileVariants];
  const char* scatter_name;
  NmScatterUkernel scatter;
  int64_t scatter_nt;
  const char* sddmm_name;
  NmSddmmUkernel sddmm;
  // Rows per driver chunk when every token fits one panel, for the tile kernels above (0: the
  // default, kNmRowChunk). With one panel each block of values is used once, so short chunks keep
  // each row's values closer to one sequential stream (rows are `kept` values apart).
  int64_t one_panel_rows;
};

// Rows per driver chunk: the chunk's slice of W is reused by every token panel.
constexpr int64_t kNmRowChunk = 64;

// The ukernels for an ISA and value type (f32 or bf16), or nullptr when not compiled in. A tier's
// entry may leave slots empty (name and function nullptr, no tiles) where the tier below serves.
const NmUkernels* nm_ukernels(Isa isa, ValueType value_type);

// The full set the kernels run on `isa`: its entry with every empty slot filled from the tiers
// below it (isa_fallback chain down to the scalar reference, which fills every slot).
NmUkernels nm_ukernels_for(Isa isa, ValueType value_type);
const NmUkernels* nm_ukernels_scalar(ValueType value_type);
const NmUkernels* nm_ukernels_avx2(ValueType value_type);
const NmUkernels* nm_ukernels_avx512(ValueType value_type);  // the GEMV only
const NmUkernels* nm_ukernels_neon(ValueType value_type);  // nullptr stub off aarch64
const NmUkernels* nm_ukernels_wasmsimd(ValueType value_type);  // nullptr stub without SIMD128

struct NmRegistryEntry {
  Isa isa;
  ValueType value_type;
  const NmUkernels* kernels;
};
int nm_registry_size();
const NmRegistryEntry& nm_registry_entry(int i);

// Fills gcol[j] = (j / n) * m for j < count.
void nm_fill_gcol(int64_t n, int64_t m, int64_t count, int32_t* gcol);

// Columns per K-block of the tile driver and the scatter for panels of nt tokens: a multiple of
// 8 * M (so full blocks hold a multiple of 8 slots per row, at most kNmMaxBlockSlots) sized so
// that the [KC, nt] activation block stays in L1.
int64_t nm_k_block(int64_t n, int64_t m, int64_t nt);

// Driver for rows [r0, r1) over every token:
//   y[t * ldy + r] = sum_j W[r, col(r, j)] x[t, col(r, j)] + bias[r].
struct NmActivations {
  int64_t tokens;
  const float* x;        // tokens == 1: float [padded_cols + 8], zero beyond cols
  const float* panels;   // tokens > 1: ceil(tokens / nt) panels, each [padded_cols, nt]
  int64_t nt;            // panel width: one of the tile kernels' nt
  const int32_t* gcol;   // int32 [kept]
  const float* bias;     // float [rows] or nullptr
  float* y;              // float [tokens, ldy]
  int64_t ldy;
};
// The tile kernel of `k` with width nt (nullptr if none).
NmTileUkernel nm_tile_for(const NmUkernels& k, int64_t nt);
// Panel width the driver uses for `tokens` tokens with kernels `k`.
int64_t nm_pick_nt(const NmUkernels& k, int64_t tokens);
void nm_run_rows(const NmWeight& w, const NmActivations& a, const NmUkernels& k, int64_t r0,
                 int64_t r1);

// Input gradient for column groups [g0, g1) (a thread owns whole groups, so writes never overlap):
//   dx[t * ldx + c] = sum_r dy[t, r] W[r, c] for columns c in [g0*M, min(g1*M, cols)).
//   dyP: ceil(tokens / nt) panels, each [rows, nt] (nt = k.scatter_nt).   dx float [tokens, ldx].
void nm_grad_input_groups(const NmWeight& w, const float* dyP, int64_t tokens, const NmUkernels& k,
                          const int32_t* gcol, int64_t g0, int64_t g1, float* dx, int64_t ldx);

// float64 references (gradcheck; scalar only), unpadded row-major buffers:
//   x [T, cols], bias [rows] or nullptr, y [T, rows]: rows [r0, r1) written.
void nm_f64_forward_rows(const NmWeight& w, const double* x, int64_t T, const double* bias,
                         double* y, int64_t r0, int64_t r1);
//   dy [T, rows], dx [T, cols]: columns of groups [g0, g1) written.
void nm_f64_grad_input_groups(const NmWeight& w, const double* dy, int64_t T, double* dx,
                              int64_t g0, int64_t g1);
//   dy [T, rows], x [T, cols], dv [rows, kept]: rows [r0, r1) written.
void nm_f64_grad_values_rows(const NmWeight& w, const double* dy, const double* x, int64_t T,
                             double* dv, int64_t r0, int64_t r1);

}  // namespace sparse_ext

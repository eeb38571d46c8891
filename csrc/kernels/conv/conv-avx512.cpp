// AVX-512 (F + BW + VL + DQ) conv ukernels. 1x1: the AVX2 MRxNR tiles with 16-pixel zmm vectors and
// a k-mask on the last vector, for planes of a multiple of 16 pixels (see plane_multiple below).
// kxk: direct sparse convolution over register tiles of rows x 16-column vectors x R channels,
// every tap's loads k-masked to the plane (any plane size).
#include <algorithm>
#include <cstring>

#include "conv.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_CONV_AVX512 1
#endif

#if SPARSE_EXT_COMPILE_CONV_AVX512
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 reports its own _mm512_undefined_* inside the cast / convert intrinsics as "(may be) used
// uninitialized": a false positive of its headers, not of this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "../common/avx512-values.h"  // first_lanes

namespace sparse_ext {
namespace {

// bias + clamp, NaN-propagating: max(vmin, a) returns a when a is NaN, and so does min(vmax, .).
inline __m512 clamp(__m512 a, __m512 vmin, __m512 vmax) {
  return _mm512_min_ps(vmax, _mm512_max_ps(vmin, a));
}

// One stored entry of a tile: NV vectors of 16 pixels (lanes outside `last` of the last one are
// zero and not read) times the entry's R values.
template <int R, int NV>
inline void tile_entry(const float* values, int64_t j, const float* xr, __mmask16 last,
                       __m512* acc) {
  __m512 xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    xv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, xr + 16 * v) : _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 wv = _mm512_set1_ps(values[j * R + r]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(wv, xv[v], acc[r * NV + v]);
  }
}

// Buffers at entry: as conv-avx2.cpp's 1x1 (x float [C_in, ldx], y float [C_out, ldy], the blocked
// CSR weight). Tile: 16*NV pixels from p (the last vector's lanes in `last`), R output channels of
// group g; with fewer than 8 accumulators the even and odd entries feed two sets.
template <int R, int NV>
inline void conv1x1_group(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p, int64_t g,
                          __mmask16 last, const ConvEpilogue& ep, float* y, int64_t ldy) {
  constexpr int A = R * NV;
  constexpr bool U2 = A < 8;
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  const uint8_t* indices = w.indices;
  __m512 acc[A], acc2[A];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 b = ep.bias != nullptr ? _mm512_set1_ps(ep.bias[g * R + r]) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
#pragma GCC unroll 16
  for (int i = 0; i < A; ++i) acc2[i] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const float* xb = x + kb * kSpmmKBlock * ldx + p;
    int64_t j = w.offsets[g * KB + kb];
    const int64_t j1 = w.offsets[g * KB + kb + 1];
    if constexpr (U2) {
      for (; j + 2 <= j1; j += 2) {
        tile_entry<R, NV>(values, j, xb + indices[j] * ldx, last, acc);
        tile_entry<R, NV>(values, j + 1, xb + indices[j + 1] * ldx, last, acc2);
      }
    }
    for (; j < j1; ++j) tile_entry<R, NV>(values, j, xb + indices[j] * ldx, last, acc);
  }
  const __m512 vmin = _mm512_set1_ps(ep.out_min), vmax = _mm512_set1_ps(ep.out_max);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* yr = y + (g * R + r) * ldy + p;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m512 o = clamp(U2 ? _mm512_add_ps(acc[r * NV + v], acc2[r * NV + v]) : acc[r * NV + v],
                             vmin, vmax);
      if (v == NV - 1 && last != 0xFFFF) _mm512_mask_storeu_ps(yr + 16 * v, last, o);
      else if (ep.stream) _mm512_stream_ps(yr + 16 * v, o);
      else _mm512_storeu_ps(yr + 16 * v, o);
    }
  }
}

// MR = 16 * NV pixels x NR = R channels; pixel tiles outer, groups inner, a pixel range cut into the
// fewest balanced passes of at most NV vectors (the reasons are in conv-avx2.cpp).
template <int R, int NV>
void conv1x1_pass(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p, int64_t width,
                  int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y, int64_t ldy) {
  if constexpr (NV > 1) {
    if (width <= 16 * (NV - 1))
      return conv1x1_pass<R, NV - 1>(w, x, ldx, p, width, g0, g1, ep, y, ldy);
  }
  const int64_t rest = width - 16 * (NV - 1);  // 1..16 lanes in the last vector
  const __mmask16 last = static_cast<__mmask16>(rest >= 16 ? 0xFFFF : (1u << rest) - 1u);
  for (int64_t g = g0; g < g1; ++g) conv1x1_group<R, NV>(w, x, ldx, p, g, last, ep, y, ldy);
}

template <int R, int NV>
void conv1x1_avx512(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0, int64_t p1,
                    int64_t g0, int64_t g1, const ConvEpilogue& ep_in, float* y, int64_t ldy) {
  ConvEpilogue ep = ep_in;
  ep.stream = ep.stream && reinterpret_cast<uintptr_t>(y) % 64 == 0 && ldy % 16 == 0 && p0 % 16 == 0;
  const int64_t vectors = (p1 - p0 + 15) / 16;
  int64_t passes = (vectors + NV - 1) / NV, done = 0;
  for (int64_t p = p0; p < p1; --passes) {
    const int64_t nv = (vectors - done + passes - 1) / passes;
    const int64_t width = std::min<int64_t>(16 * nv, p1 - p);
    conv1x1_pass<R, NV>(w, x, ldx, p, width, g0, g1, ep, y, ldy);
    p += width;
    done += nv;
  }
  if (ep.stream) _mm_sfence();
}

// ---- kxk direct convolution ------------------------------------------------------------------
// Padding is not an input: it must never take part in a product (w * 0 is NaN for w = inf or NaN).
// Every load of a tap is k-masked to the lanes whose input lies inside the plane row (and inside
// the tile), so the edges need no scalar loops and whole rows outside the plane are skipped. The
// masked-off lanes load zero: w * 0 adds nothing for a finite w, so a call whose weights are all
// finite (the normal case) runs plain FMAs, and one with a non-finite weight runs the same code
// with SAFE = true, where the FMAs are masked too and masked-off lanes keep the accumulator.
// Masking every FMA costs: GCC moves each mask through a general register to another k register
// (kmov runs on the FMA ports); 90% 3x3 128x128 56x56, one thread: 2.0x of dense masked vs 2.65x.

// Whether all n floats at v are finite.
inline bool all_finite(const float* v, int64_t n) {
  constexpr int kNanOrInf = 0x01 | 0x08 | 0x10 | 0x80;  // vfpclassps: QNaN, +inf, -inf, SNaN
  __mmask16 special = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = n - i >= 16 ? 0xFFFF : first_lanes(n - i);
    special |= _mm512_mask_fpclass_ps_mask(lanes, _mm512_maskz_loadu_ps(lanes, v + i), kNanOrInf);
  }
  return special == 0;
}

// Lanes [lo, hi) of a tile of up to 64 columns (0 <= lo < hi <= 64).
inline uint64_t lane_span(int64_t lo, int64_t hi) {
  return (hi >= 64 ? ~uint64_t(0) : (uint64_t(1) << hi) - 1) & (~uint64_t(0) << lo);
}

// One input row of a tap: NV vectors at xr (lanes in m[v]) times R weights into the row's R * NV
// accumulators (with SAFE, masked-off lanes keep the accumulator).
template <int R, int NV, bool SAFE>
__attribute__((always_inline)) inline void kxk_row(uintptr_t xr, const __mmask16* m,
                                                   const __m512* wv, __m512* acc) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __m512 xv = _mm512_maskz_loadu_ps(m[v], reinterpret_cast<const float*>(xr + 64 * v));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      acc[r * NV + v] = SAFE ? _mm512_mask3_fmadd_ps(wv[r], xv, acc[r * NV + v], m[v])
                             : _mm512_fmadd_ps(wv[r], xv, acc[r * NV + v]);
  }
}

// One tap into a tile of exactly ROWS output rows from oy x columns [ox0, ox0 + width)
// (width <= 16 * NV) x R channels. Accumulators: acc[(row * R + r) * NV + v]. Rows outside the
// plane occur only for taps near the top and bottom of the image: the other taps run the rows
// without a check. Addresses are formed in integers: a window may start before its plane row
// (masked lanes only).
template <int R, int NV, int ROWS, bool SAFE>
__attribute__((always_inline)) inline void kxk_tap(const float* values, int64_t j,
                                                   const ConvTap& t, const ConvPlanes& in,
                                                   int64_t oy, int64_t ox0, int64_t width,
                                                   __m512* acc) {
  const int64_t xs = ox0 + t.dx;
  const int64_t lo = std::max<int64_t>(0, -xs), hi = std::min<int64_t>(width, in.wq - xs);
  if (hi <= lo) return;
  const uint64_t span = lane_span(lo, hi);
  __mmask16 m[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) m[v] = static_cast<__mmask16>(span >> (16 * v));
  const int64_t iy0 = oy + t.dy;
  __m512 wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wv[r] = _mm512_set1_ps(values[j * R + r]);
  const uintptr_t base = reinterpret_cast<uintptr_t>(in.xq) +
                         static_cast<uintptr_t>(t.plane + iy0 * in.wq + xs) * sizeof(float);
  const uintptr_t row_bytes = static_cast<uintptr_t>(in.wq) * sizeof(float);
  if (iy0 >= 0 && iy0 + ROWS <= in.hq) {
#pragma GCC unroll 16
    for (int row = 0; row < ROWS; ++row)
      kxk_row<R, NV, SAFE>(base + row * row_bytes, m, wv, acc + row * R * NV);
  } else {
    const int64_t rlo = -iy0, rhi = in.hq - iy0;
#pragma GCC unroll 16
    for (int row = 0; row < ROWS; ++row)
      if (row >= rlo && row < rhi) kxk_row<R, NV, SAFE>(base + row * row_bytes, m, wv, acc + row * R * NV);
  }
}

// One register tile of ROWS rows over the taps [j0, j1): starts from the bias (first) or from the
// partial sums in y, ends with bias-clamp stores (last) or raw partial sums. y float [C_out,
// out_h, out_w]; only rows [oy, oy + ROWS) and columns [ox0, ox0 + width) of the R channels of g.
template <int R, int NV, int ROWS, bool SAFE>
void kxk_tile(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t j0,
              int64_t j1, int64_t oy, int64_t ox0, int64_t width, int64_t g, bool first,
              bool last, const ConvEpilogue& ep, float* y) {
  constexpr int A = R * NV * ROWS;
  const float* values = static_cast<const float*>(w.values);
  const int64_t OW = in.out_w, P = in.out_h * in.out_w;
  const uint64_t span = lane_span(0, width);
  __m512 acc[A];
#pragma GCC unroll 16
  for (int row = 0; row < ROWS; ++row)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* yr = y + (g * R + r) * P + (oy + row) * OW + ox0;
      const __m512 b = ep.bias != nullptr ? _mm512_set1_ps(ep.bias[g * R + r]) : _mm512_setzero_ps();
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[(row * R + r) * NV + v] =
            first ? b : _mm512_maskz_loadu_ps(static_cast<__mmask16>(span >> (16 * v)), yr + 16 * v);
    }
  for (int64_t j = j0; j < j1; ++j) kxk_tap<R, NV, ROWS, SAFE>(values, j, taps[j], in, oy, ox0, width, acc);
  const __m512 vmin = _mm512_set1_ps(ep.out_min), vmax = _mm512_set1_ps(ep.out_max);
#pragma GCC unroll 16
  for (int row = 0; row < ROWS; ++row)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* yr = y + (g * R + r) * P + (oy + row) * OW + ox0;
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const __m512 a = acc[(row * R + r) * NV + v];
        _mm512_mask_storeu_ps(yr + 16 * v, static_cast<__mmask16>(span >> (16 * v)),
                              last ? clamp(a, vmin, vmax) : a);
      }
    }
}

// The tile for exactly `rows` (1..ROWS) rows and `nv` (1..NV) vectors: every tile is compiled for
// its size, so no row needs a bound check and no accumulator is idle.
template <int R, int NV, int ROWS, bool SAFE>
void kxk_tile_sized(int64_t rows, int64_t nv, const SpmmWeight& w, const ConvTap* taps,
                    const ConvPlanes& in, int64_t j0, int64_t j1, int64_t oy, int64_t ox0,
                    int64_t width, int64_t g, bool first, bool last, const ConvEpilogue& ep,
                    float* y) {
  if constexpr (NV > 1) {
    if (nv < NV)
      return kxk_tile_sized<R, NV - 1, ROWS, SAFE>(rows, nv, w, taps, in, j0, j1, oy, ox0, width,
                                                   g, first, last, ep, y);
  }
  if constexpr (ROWS > 1) {
    if (rows < ROWS)
      return kxk_tile_sized<R, NV, ROWS - 1, SAFE>(rows, nv, w, taps, in, j0, j1, oy, ox0, width,
                                                   g, first, last, ep, y);
  }
  kxk_tile<R, NV, ROWS, SAFE>(w, taps, in, j0, j1, oy, ox0, width, g, first, last, ep, y);
}

// Register tile rows for R channels x NV vectors: about 24 accumulators (of 32 zmm), leaving room
// for the NV input vectors and R weights; at most 16 rows.
constexpr int kxk_rows(int R, int NV) {
  return 24 / (R * NV) < 1 ? 1 : 24 / (R * NV) > 16 ? 16 : 24 / (R * NV);
}

// Buffers at entry: taps ConvTap [nnz]; in.xq float [planes, hq, wq]; y float [C_out, out_h*out_w];
// w.values float [nnz * R]; the entries of group g, k-block kb are offsets[g*KB + kb] ..
// offsets[g*KB + kb + 1].
// Output rows are cut into balanced blocks of at most ROWS, a row into balanced column passes of
// at most NV vectors. Order: row block, then k-block (about 256 / (KH*KW) input channels, whose
// rows near the block stay in cache while every group of the range streams its taps over them),
// then group, then column pass; partial sums of a tile go through y between k-blocks. Measured on
// 90% 3x3 128x128 56x56, one thread: 2.2-2.7x of dense in this order vs 1.8x with each tile taking
// all of its group's taps at once; k-blocks cut further (128 or 64 columns) were slower (more
// partial sums), and so were 16-accumulator tiles (4 rows of 64 columns).
template <int R, int NV, bool SAFE>
void kxk_run(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
             int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  constexpr int ROWS = kxk_rows(R, NV);
  const int64_t KB = w.k_blocks(), chunks = std::max<int64_t>(KB, 1), OW = in.out_w;
  const int64_t vectors = (OW + 15) / 16, passes = (vectors + NV - 1) / NV;
  const int64_t blocks = (oy1 - oy0 + ROWS - 1) / ROWS;
  for (int64_t b = 0, oy = oy0; b < blocks; ++b) {
    const int64_t nrows = (oy1 - oy + (blocks - b) - 1) / (blocks - b);
    for (int64_t kb = 0; kb < chunks; ++kb) {  // one empty chunk for a weight without columns
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t j0 = KB > 0 ? w.offsets[g * KB + kb] : 0;
        const int64_t j1 = KB > 0 ? w.offsets[g * KB + kb + 1] : 0;
        const bool first = kb == 0, last = kb == chunks - 1;
        if (j0 == j1 && !first && !last) continue;
        for (int64_t p = 0, ox0 = 0, done = 0; p < passes; ++p) {
          const int64_t nv = (vectors - done + (passes - p) - 1) / (passes - p);
          const int64_t width = std::min<int64_t>(16 * nv, OW - ox0);
          kxk_tile_sized<R, NV, ROWS, SAFE>(nrows, nv, w, taps, in, j0, j1, oy, ox0, width, g,
                                            first, last, ep, y);
          ox0 += width;
          done += nv;
        }
      }
    }
    oy += nrows;
  }
}

template <int R, int NV>
void kxk_avx512(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
                int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  if constexpr (NV > 1) {  // narrow planes: the fewest vectors that cover a row, more rows
    if (in.out_w <= 16 * (NV - 1)) return kxk_avx512<R, NV - 1>(w, taps, in, oy0, oy1, g0, g1, ep, y);
  }
  if (oy1 <= oy0 || g1 <= g0) return;
  // One pass over the range's values (a small fraction of the FMAs even for 7x7 planes).
  const int64_t KB = w.k_blocks(), j0 = w.offsets[g0 * KB], j1 = w.offsets[g1 * KB];
  if (all_finite(static_cast<const float*>(w.values) + j0 * R, (j1 - j0) * R))
    kxk_run<R, NV, false>(w, taps, in, oy0, oy1, g0, g1, ep, y);
  else
    kxk_run<R, NV, true>(w, taps, in, oy0, oy1, g0, g1, ep, y);
}

// Planes whose pixel count is not a multiple of 16 leave the zmm rows misaligned: every 64-byte
// load of x splits two cache lines, and on the AVX-512 Xeon the AVX2 tiles were faster there
// (7x7 and 14x14 planes at 70%: 1.00x and 1.02x of dense vs 0.86x and 0.95x), while 56x56 planes
// gained (90%: 2.30x -> 3.70x, 70%: 1.32x -> 1.89x). So the 1x1 kernels serve multiples of 16 only
// (plane_multiple); the kxk kernels serve any plane. kxk names: <rows>x<columns> pixels of the
// widest register tile x NR channels.
#define SE_AVX512_CONV(R, NV, MR, KNV, KROWS, KMR)                                     \
  ConvUkernels {                                                                       \
    "f32-conv1x1-" #MR "x" #R "-avx512", conv1x1_avx512<R, NV>, MR,               \
        "f32-convkxk-" #KROWS "x" #KMR "x" #R "-avx512", kxk_avx512<R, KNV>, 16     \
  }

static_assert(kxk_rows(1, 4) == 6 && kxk_rows(2, 4) == 3 && kxk_rows(4, 2) == 3 &&
                  kxk_rows(8, 3) == 1,
              "kxk names below");
const ConvUkernels kAvx512[4] = {SE_AVX512_CONV(1, 8, 128, 4, 6, 64), SE_AVX512_CONV(2, 4, 64, 4, 3, 64),
                                 SE_AVX512_CONV(4, 2, 32, 2, 3, 32), SE_AVX512_CONV(8, 1, 16, 3, 1, 48)};

}  // namespace

const ConvUkernels* conv_ukernels_avx512(int64_t block_rows) {
  switch (block_rows) {
    case 1: return &kAvx512[0];
    case 2: return &kAvx512[1];
    case 4: return &kAvx512[2];
    case 8: return &kAvx512[3];
    default: return nullptr;
  }
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const ConvUkernels* conv_ukernels_avx512(int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

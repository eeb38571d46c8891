// AVX2 + FMA conv ukernels (XNNPACK-style MRxNR sparse tiles). Compiled for every x86-64 build with
// a file-level target pragma and only called after the runtime check in isa.cpp.
#include <algorithm>
#include <cstring>

#include "conv.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_CONV_AVX2 1
#endif

#if SPARSE_EXT_COMPILE_CONV_AVX2
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace sparse_ext {
namespace {

// Lanes l of vector v with lo <= 8v + l < hi, as a maskload/maskstore mask.
inline __m256i lane_mask(int64_t v, int64_t lo, int64_t hi) {
  const __m256i idx = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                       _mm256_set1_epi32(static_cast<int32_t>(8 * v)));
  const __m256i ge_lo = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int32_t>(lo - 1)));
  const __m256i lt_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(hi)), idx);
  return _mm256_and_si256(ge_lo, lt_hi);
}

// bias + clamp, NaN-propagating: max(vmin, a) returns a when a is NaN, and so does min(vmax, .).
inline __m256 clamp(__m256 a, __m256 vmin, __m256 vmax) {
  return _mm256_min_ps(vmax, _mm256_max_ps(vmin, a));
}

// One stored entry of a tile: NV vectors of 8 pixels (the last one masked when MASK) times the
// entry's R values. Accumulators are flat local arrays so GCC keeps them in ymm registers.
template <int R, int NV, bool MASK>
inline void tile_entry(const float* values, int64_t j, const float* xr, __m256i mask,
                       __m256* acc) {
  __m256 xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    xv[v] = (MASK && v == NV - 1) ? _mm256_maskload_ps(xr + 8 * v, mask) : _mm256_loadu_ps(xr + 8 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 wv = _mm256_broadcast_ss(values + j * R + r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm256_fmadd_ps(wv, xv[v], acc[r * NV + v]);
  }
}

template <int R, int NV>
inline void store_tile(__m256* acc, const ConvEpilogue& ep, int64_t m0, float* y, int64_t ldy,
                       bool masked, __m256i mask, bool stream = false) {
  const __m256 vmin = _mm256_set1_ps(ep.out_min), vmax = _mm256_set1_ps(ep.out_max);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* yr = y + (m0 + r) * ldy;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __m256 o = clamp(acc[r * NV + v], vmin, vmax);
      if (masked && v == NV - 1) _mm256_maskstore_ps(yr + 8 * v, mask, o);
      else if (stream) _mm256_stream_ps(yr + 8 * v, o);
      else _mm256_storeu_ps(yr + 8 * v, o);
    }
  }
}

template <int R, int NV>
inline void init_tile(__m256* acc, const ConvEpilogue& ep, int64_t m0) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m256 b = ep.bias != nullptr ? _mm256_broadcast_ss(ep.bias + m0 + r) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = b;
  }
}

// ---- 1x1 ------------------------------------------------------------------------------------
// Buffers at entry: x float [C_in, ldx] (pixels of channel ci at x + ci*ldx), y float [C_out, ldy],
// w.values float [nnz * R], w.indices uint8 [nnz] (column within the 256-wide block kb),
// w.offsets int32 [G*KB + 1]. Tile: 8*NV pixels starting at p, R output channels of group g.
// With fewer than 8 accumulators the even and odd entries feed two sets (latency hiding).
template <int R, int NV, bool MASK>
inline void conv1x1_group(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p, int64_t g,
                          __m256i mask, const ConvEpilogue& ep, float* y, int64_t ldy) {
  constexpr int A = R * NV;
  constexpr bool U2 = A < 8;
  const int64_t KB = w.k_blocks();
  const float* values = static_cast<const float*>(w.values);
  const uint8_t* indices = w.indices;
  __m256 acc[A], acc2[A];
  init_tile<R, NV>(acc, ep, g * R);
#pragma GCC unroll 16
  for (int i = 0; i < A; ++i) acc2[i] = _mm256_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const float* xb = x + kb * kSpmmKBlock * ldx + p;
    int64_t j = w.offsets[g * KB + kb];
    const int64_t j1 = w.offsets[g * KB + kb + 1];
    if constexpr (U2) {
      for (; j + 2 <= j1; j += 2) {
        tile_entry<R, NV, MASK>(values, j, xb + indices[j] * ldx, mask, acc);
        tile_entry<R, NV, MASK>(values, j + 1, xb + indices[j + 1] * ldx, mask, acc2);
      }
    }
    for (; j < j1; ++j) tile_entry<R, NV, MASK>(values, j, xb + indices[j] * ldx, mask, acc);
  }
  if constexpr (U2) {
#pragma GCC unroll 16
    for (int i = 0; i < A; ++i) acc[i] = _mm256_add_ps(acc[i], acc2[i]);
  }
  store_tile<R, NV>(acc, ep, g * R, y + p, ldy, MASK, mask, ep.stream);
}

// MR = 8 * NV pixels x NR = R channels; pixel tiles outer (the input tile stays in cache while
// every group of the range uses it), groups inner. A pixel range is cut into the fewest passes of at
// most NV vectors, balanced (e.g. 14x14 = 196 pixels = 25 vectors -> 13 + 12 with NV = 13, 7x7 = 49
// pixels -> one pass of 7 vectors), the last vector of the last pass masked. Every pass re-reads all
// of the group's nonzeros, so fewer passes = fewer index loads, broadcasts and loop trips.
template <int R, int NV>
void conv1x1_pass(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p, int64_t width,
                  int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y, int64_t ldy) {
  if constexpr (NV > 1) {
    if (width <= 8 * (NV - 1)) return conv1x1_pass<R, NV - 1>(w, x, ldx, p, width, g0, g1, ep, y, ldy);
  }
  if (width == 8 * NV) {
    for (int64_t g = g0; g < g1; ++g)
      conv1x1_group<R, NV, false>(w, x, ldx, p, g, _mm256_setzero_si256(), ep, y, ldy);
  } else {
    const __m256i mask = lane_mask(0, 0, width - 8 * (NV - 1));
    for (int64_t g = g0; g < g1; ++g) conv1x1_group<R, NV, true>(w, x, ldx, p, g, mask, ep, y, ldy);
  }
}

template <int R, int NV>
void conv1x1_avx2(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0, int64_t p1,
                  int64_t g0, int64_t g1, const ConvEpilogue& ep_in, float* y, int64_t ldy) {
  ConvEpilogue ep = ep_in;
  ep.stream = ep.stream && reinterpret_cast<uintptr_t>(y) % 32 == 0 && ldy % 8 == 0 && p0 % 8 == 0;
  const int64_t vectors = (p1 - p0 + 7) / 8;
  int64_t passes = (vectors + NV - 1) / NV, done = 0;
  for (int64_t p = p0; p < p1; --passes) {
    const int64_t nv = (vectors - done + passes - 1) / passes;
    const int64_t width = std::min<int64_t>(8 * nv, p1 - p);
    conv1x1_pass<R, NV>(w, x, ldx, p, width, g0, g1, ep, y, ldy);
    p += width;
    done += nv;
  }
  if (ep.stream) _mm_sfence();
}

// ---- kxk direct convolution ------------------------------------------------------------------
// Padding is not an input (sparse-product semantics, as in the scalar kernel's clipping): it must
// never take part in a product. Masked loads read zero there, and w * 0 adds nothing for a finite w
// but is NaN for w = inf or NaN. So a call whose weights are all finite (the normal case) runs the
// plain FMA loop, and one with a non-finite weight runs the same loop with SAFE = true, where the
// masked taps blend the FMA into the accumulator only in the lanes inside the plane row. The
// choice is made once per call, outside the tap loop: three tap variants in one loop body make GCC
// spill accumulators.

// Whether all n floats at v are finite (exponent bits not all ones).
inline bool all_finite(const float* v, int64_t n) {
  const __m256i exp = _mm256_set1_epi32(0x7f800000);
  __m256i special = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + i));
    special = _mm256_or_si256(special, _mm256_cmpeq_epi32(_mm256_and_si256(e, exp), exp));
  }
  bool ok = _mm256_testz_si256(special, special);
  for (; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof(bits));
    ok = ok && (bits & 0x7f800000u) != 0x7f800000u;
  }
  return ok;
}

// One tap into a tile of ROWS output rows [oy, oy + nrows) x up to 8*NV columns [ox0, ox0 + width):
// the column clipping (lo, hi) depends only on the tap's dx, so it is computed once and shared by
// the rows; full vector loads when the shifted window lies inside the plane row, masked loads
// (lanes clipped to the plane and to the tile) at the edges; rows outside the plane are skipped.
// Masked-off lanes load zero: with SAFE the accumulator keeps its value there (see above); without
// it they get w * 0 = 0 (finite w), and lanes past the width are dropped at the store either way.
// Accumulators: acc[(row * R + r) * NV + v].
template <int R, int NV, int ROWS, bool SAFE>
inline void kxk_tap(const float* values, int64_t j, const ConvTap& t, const ConvPlanes& in,
                    int64_t oy, int64_t nrows, int64_t ox0, int64_t width, __m256* acc) {
  const int64_t xs = ox0 + t.dx;
  const int64_t lo = std::max<int64_t>(0, -xs), hi = std::min<int64_t>(width, in.wq - xs);
  if (hi <= lo) return;
  const bool full = lo == 0 && hi == 8 * NV;
  __m256i masks[NV];
  if (!full) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) masks[v] = lane_mask(v, lo, hi);
  }
  __m256 wv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) wv[r] = _mm256_broadcast_ss(values + j * R + r);
#pragma GCC unroll 4
  for (int row = 0; row < ROWS; ++row) {
    const int64_t iy = oy + row + t.dy;
    if (row >= nrows || static_cast<uint64_t>(iy) >= static_cast<uint64_t>(in.hq)) continue;
    // Address arithmetic in integers: the window may start before the row (masked lanes only).
    const uintptr_t xr = reinterpret_cast<uintptr_t>(in.xq + t.plane + iy * in.wq) +
                         static_cast<uintptr_t>(xs * 4);
    __m256 xv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const float* a = reinterpret_cast<const float*>(xr + 32 * v);
      xv[v] = full ? _mm256_loadu_ps(a) : _mm256_maskload_ps(a, masks[v]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        __m256& a = acc[(row * R + r) * NV + v];
        const __m256 f = _mm256_fmadd_ps(wv[r], xv[v], a);
        a = SAFE && !full ? _mm256_blendv_ps(a, f, _mm256_castsi256_ps(masks[v])) : f;
      }
  }
}

// Buffers at entry: taps ConvTap [nnz]; in.xq float [planes, hq, wq]; y float [C_out, out_h*out_w];
// w.values float [nnz * R]; a group's entries are offsets[g*KB] .. offsets[(g+1)*KB].
// Tile: ROWS output rows x 8*NV columns x R channels in registers over all of the group's taps;
// row blocks outer so the input rows of all planes near oy stay in cache across the groups.
template <int R, int NV, int ROWS, bool SAFE>
void kxk_tiles(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
               int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  constexpr int A = R * NV * ROWS, MR = 8 * NV;
  constexpr bool U2 = A < 8;
  const int64_t KB = w.k_blocks(), OW = in.out_w, P = in.out_h * in.out_w;
  const float* values = static_cast<const float*>(w.values);
  for (int64_t oy = oy0; oy < oy1; oy += ROWS) {
    const int64_t nrows = std::min<int64_t>(ROWS, oy1 - oy);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t j0 = w.offsets[g * KB], j1 = w.offsets[(g + 1) * KB];
      for (int64_t ox0 = 0; ox0 < OW; ox0 += MR) {
        const int64_t width = std::min<int64_t>(MR, OW - ox0);
        __m256 acc[A], acc2[A];
#pragma GCC unroll 4
        for (int row = 0; row < ROWS; ++row) init_tile<R, NV>(acc + row * R * NV, ep, g * R);
#pragma GCC unroll 16
        for (int i = 0; i < A; ++i) acc2[i] = _mm256_setzero_ps();
        int64_t j = j0;
        if constexpr (U2) {
          for (; j + 2 <= j1; j += 2) {
            kxk_tap<R, NV, ROWS, SAFE>(values, j, taps[j], in, oy, nrows, ox0, width, acc);
            kxk_tap<R, NV, ROWS, SAFE>(values, j + 1, taps[j + 1], in, oy, nrows, ox0, width, acc2);
          }
        }
        for (; j < j1; ++j) kxk_tap<R, NV, ROWS, SAFE>(values, j, taps[j], in, oy, nrows, ox0, width, acc);
        if constexpr (U2) {
#pragma GCC unroll 16
          for (int i = 0; i < A; ++i) acc[i] = _mm256_add_ps(acc[i], acc2[i]);
        }
        for (int64_t row = 0; row < nrows; ++row) {
          __m256* ra = acc + row * R * NV;
          if (width == MR) {
            store_tile<R, NV>(ra, ep, g * R, y + (oy + row) * OW + ox0, P, false, _mm256_setzero_si256());
          } else {
            // Partial tile: lanes past the width (zero input; NaN for a non-finite w without SAFE)
            // are dropped.
            alignas(32) float tmp[R * MR];
            store_tile<R, NV>(ra, ep, 0, tmp, MR, false, _mm256_setzero_si256());
            for (int r = 0; r < R; ++r)
              std::memcpy(y + (g * R + r) * P + (oy + row) * OW + ox0, tmp + r * MR,
                          sizeof(float) * width);
          }
        }
      }
    }
  }
}

template <int R, int NV, int ROWS>
void kxk_avx2(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in, int64_t oy0,
              int64_t oy1, int64_t g0, int64_t g1, const ConvEpilogue& ep, float* y) {
  if constexpr (NV > 1) {  // narrow planes: the smallest tile that covers a row, more rows
    if (in.out_w <= 8 * (NV - 1)) {
      constexpr int kRows = (8 / (R * (NV - 1))) > 4 ? 4 : (8 / (R * (NV - 1))) < 1 ? 1 : 8 / (R * (NV - 1));
      return kxk_avx2<R, NV - 1, kRows>(w, taps, in, oy0, oy1, g0, g1, ep, y);
    }
  }
  // One pass over the range's values (a small fraction of the FMAs even for 7x7 planes).
  const int64_t KB = w.k_blocks(), j0 = w.offsets[g0 * KB], j1 = w.offsets[g1 * KB];
  if (all_finite(static_cast<const float*>(w.values) + j0 * R, (j1 - j0) * R))
    kxk_tiles<R, NV, ROWS, false>(w, taps, in, oy0, oy1, g0, g1, ep, y);
  else
    kxk_tiles<R, NV, ROWS, true>(w, taps, in, oy0, oy1, g0, g1, ep, y);
}

// kxk names: <rows>x<columns> pixels per register tile x NR channels.
#define SE_AVX2_CONV(R, NV, MR, KNV, KROWS, KMR) \
  ConvUkernels { "f32-conv1x1-" #MR "x" #R "-avx2", conv1x1_avx2<R, NV>, MR, \
                 "f32-convkxk-" #KROWS "x" #KMR "x" #R "-avx2", kxk_avx2<R, KNV, KROWS> }

const ConvUkernels kAvx2[4] = {SE_AVX2_CONV(1, 8, 64, 4, 2, 32), SE_AVX2_CONV(2, 4, 32, 2, 2, 16),
                               SE_AVX2_CONV(4, 2, 16, 1, 2, 8), SE_AVX2_CONV(8, 1, 8, 1, 1, 8)};

}  // namespace

const ConvUkernels* conv_ukernels_avx2(int64_t block_rows) {
  switch (block_rows) {
    case 1: return &kAvx2[0];
    case 2: return &kAvx2[1];
    case 4: return &kAvx2[2];
    case 8: return &kAvx2[3];
    default: return nullptr;
  }
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const ConvUkernels* conv_ukernels_avx2(int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

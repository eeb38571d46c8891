// AVX-512 (F + BW + VL + DQ) 1x1 conv ukernels: the AVX2 MRxNR tiles with 16-pixel zmm vectors and
// a k-mask on the last vector, for planes of a multiple of 16 pixels (see plane_multiple below).
// The tier has no kxk kernel: the op takes the AVX2 one (lookup_along_chain on the kxk slot).
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

// Planes whose pixel count is not a multiple of 16 leave the zmm rows misaligned: every 64-byte
// load of x splits two cache lines, and on the AVX-512 Xeon the AVX2 tiles were faster there
// (7x7 and 14x14 planes at 70%: 1.00x and 1.02x of dense vs 0.86x and 0.95x), while 56x56 planes
// gained (90%: 2.30x -> 3.70x, 70%: 1.32x -> 1.89x). So the kernels serve multiples of 16 only.
#define SE_AVX512_CONV(R, NV, MR)                                                              \
  ConvUkernels {                                                                               \
    "f32-spmm-conv1x1-" #MR "x" #R "-avx512", conv1x1_avx512<R, NV>, MR, nullptr, nullptr, 16 \
  }

const ConvUkernels kAvx512[4] = {SE_AVX512_CONV(1, 8, 128), SE_AVX512_CONV(2, 4, 64),
                                 SE_AVX512_CONV(4, 2, 32), SE_AVX512_CONV(8, 1, 16)};

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

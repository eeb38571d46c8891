// AVX2 + FMA ukernels for N:M. Compiled for every x86-64 build with a file-level target pragma and
// only called after the runtime check in isa.cpp, so the default build runs on any x86-64 CPU.
//
// Metadata is decoded 8 slots at a time: 8 slots of B bits are exactly B bytes, broadcast into a
// vector, shifted per lane (vpsrlvd) and masked; adding the group-column table gcol gives each
// slot's column inside the block. Any B-bit index is < M, so every read stays in the block.
#include <cstdint>
#include <cstring>

#include "../common/bf16.h"
#include "nm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX2 1
#endif

#if SPARSE_EXT_COMPILE_AVX2
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "../common/avx2-values.h"

namespace sparse_ext {
namespace {


// The B bytes holding 8 consecutive B-bit indices (B = 2, 3, 4), as one little-endian word.
template <int B>
inline uint32_t load_meta_word(const uint8_t* p) {
  if constexpr (B == 2) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  } else if constexpr (B == 3) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return static_cast<uint32_t>(v) | (static_cast<uint32_t>(p[2]) << 16);
  } else {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
  }
}

// Indices of slots 8c .. 8c + 7 of a row (row_meta points at the row's first byte).
template <int B>
inline __m256i decode8(const uint8_t* row_meta, int64_t c8) {
  const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
  const __m256i word = _mm256_set1_epi32(static_cast<int32_t>(load_meta_word<B>(row_meta + c8 * B)));
  return _mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32((1 << B) - 1));
}

// Element offsets (column * NT) of slots j0 .. j0 + cnt - 1 of a row, into offs.
template <int B, int LOG_NT>
inline void decode_offsets(const uint8_t* row_meta, const int32_t* gcol, int64_t j0, int64_t cnt,
                           int32_t* offs) {
  const int64_t full = cnt & ~int64_t{7};
  int64_t c = 0;
  for (; c < full; c += 8) {
    const __m256i col = _mm256_add_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gcol + c)), decode8<B>(row_meta, (j0 + c) >> 3));
    _mm256_store_si256(reinterpret_cast<__m256i*>(offs + c), _mm256_slli_epi32(col, LOG_NT));
  }
  for (; c < cnt; ++c)
    offs[c] = static_cast<int32_t>((gcol[c] + nm_read_index(row_meta, j0 + c, B)) << LOG_NT);
}

// ---- GEMV (one token): gather the kept activations 8 slots at a time ---------------------------
// Entry: x float [padded_cols + 8], gcol int32 [kept], values [rows, kept], meta [rows, stride],
//        y float [rows] (r0 .. r1 - 1 written).
template <ValueType VT, int B>
void gemv_impl(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
      const __m256i o0 = _mm256_add_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gcol + c)), decode8<B>(meta, c >> 3));
      const __m256i o1 = _mm256_add_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gcol + c + 8)),
          decode8<B>(meta, (c >> 3) + 1));
      acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, vbase + c), _mm256_i32gather_ps(x, o0, 4),
                             acc0);
      acc1 = _mm256_fmadd_ps(load8_values<VT>(w.values, vbase + c + 8),
                             _mm256_i32gather_ps(x, o1, 4), acc1);
    }
    if (c + 8 <= kept) {
      const __m256i o0 = _mm256_add_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(gcol + c)), decode8<B>(meta, c >> 3));
      acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, vbase + c), _mm256_i32gather_ps(x, o0, 4),
                             acc0);
      c += 8;
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, B)];
    y[r] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

// 2:4 GEMV without gathers: 8 slots cover 16 consecutive columns = two vectors of x; vpermps
// picks each slot's activation (it uses the low 3 bits of the column) and a blend takes lanes
// 0-3 from the first vector, 4-7 from the second.
template <ValueType VT>
void gemv_2of4(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
      const float* xc = x + 2 * c;  // slot c is in group c / 2, column 4 * (c / 2)
      const __m256i o0 = _mm256_add_epi32(base, decode8<2>(meta, c >> 3));
      const __m256i o1 = _mm256_add_epi32(base, decode8<2>(meta, (c >> 3) + 1));
      const __m256 g0 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), o0),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), o0),
                                        0xF0);
      const __m256 g1 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), o1),
                                        _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), o1),
                                        0xF0);
      acc0 = _mm256_fmadd_ps(load8_values<VT>(w.values, vbase + c), g0, acc0);
      acc1 = _mm256_fmadd_ps(load8_values<VT>(w.values, vbase + c + 8), g1, acc1);
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, 2)];
    y[r] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

// 1:4 and 2:8 GEMV without gathers: 8 slots cover 32 consecutive columns = four vectors of x,
// and slots 2k, 2k+1 always fall in vector k (group k for 2:8, groups 2k and 2k+1 for 1:4). Four
// vpermps pick the activations (low 3 bits of each column) and three blends merge the lanes.
template <ValueType VT, int B>
void gemv_span32(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
                 float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const __m256i base = B == 2 ? _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)
                              : _mm256_setr_epi32(0, 0, 8, 8, 16, 16, 24, 24);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const float* xc = x + 4 * (c + 8 * h);
        const __m256i o = _mm256_add_epi32(base, decode8<B>(meta, (c >> 3) + h));
        const __m256 p0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), o);
        const __m256 p1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), o);
        const __m256 p2 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), o);
        const __m256 p3 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), o);
        const __m256 g = _mm256_blend_ps(_mm256_blend_ps(p0, p1, 0x0C),
                                         _mm256_blend_ps(p2, p3, 0xC0), 0xF0);
        const __m256 v = load8_values<VT>(w.values, vbase + c + 8 * h);
        if (h == 0) acc0 = _mm256_fmadd_ps(v, g, acc0);
        else acc1 = _mm256_fmadd_ps(v, g, acc1);
      }
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, B)];
    y[r] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

// 1:8 GEMV without gathers: slot l of 8 is group l, i.e. vector l of the 64 columns they span;
// eight vpermps (each by the slot's own index) and a blend tree keep lane l of permute l.
template <ValueType VT>
void gemv_1of8(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const float* xc = x + 8 * (c + 8 * h);
        const __m256i o = decode8<3>(meta, (c >> 3) + h);
        const __m256 b01 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc), o),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 8), o), 0x02);
        const __m256 b23 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 16), o),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 24), o), 0x08);
        const __m256 b45 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 32), o),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 40), o), 0x20);
        const __m256 b67 = _mm256_blend_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 48), o),
                                           _mm256_permutevar8x32_ps(_mm256_loadu_ps(xc + 56), o), 0x80);
        const __m256 g = _mm256_blend_ps(_mm256_blend_ps(b01, b23, 0x0C),
                                         _mm256_blend_ps(b45, b67, 0xC0), 0xF0);
        const __m256 v = load8_values<VT>(w.values, vbase + c + 8 * h);
        if (h == 0) acc0 = _mm256_fmadd_ps(v, g, acc0);
        else acc1 = _mm256_fmadd_ps(v, g, acc1);
      }
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, 3)];
    y[r] = hsum(_mm256_add_ps(acc0, acc1)) + tail;
  }
}

template <ValueType VT>
void gemv(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
          float* y) {
  switch (w.bits()) {
    case 2:
      if (w.n == 2) return gemv_2of4<VT>(w, x, gcol, r0, r1, y);
      if (w.n == 1) return gemv_span32<VT, 2>(w, x, gcol, r0, r1, y);  // 1:4
      return gemv_impl<VT, 2>(w, x, gcol, r0, r1, y);
    case 3:
      if (w.n == 2) return gemv_span32<VT, 3>(w, x, gcol, r0, r1, y);  // 2:8
      if (w.n == 1) return gemv_1of8<VT>(w, x, gcol, r0, r1, y);  // 1:8
      return gemv_impl<VT, 3>(w, x, gcol, r0, r1, y);
    default: return gemv_impl<VT, 4>(w, x, gcol, r0, r1, y);
  }
}

constexpr int64_t kPrefetchRows = 4;

// ---- Token tile: NT = 8 * NV tokens of one row in NV registers ---------------------------------
// U accumulator sets take slots in turn so that NV * U = 8 independent FMA chains hide latency.
// Accumulators are one flat local array, fully unrolled, so GCC keeps them in registers.
// Entry: xP float [padded_cols, NT], gcol int32 [(g1-g0)*N], ytile float [r1-r0, NT] accumulated.
template <ValueType VT, int NV, int U, int B>
void tile_impl(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
               int64_t r0, int64_t r1, float* ytile) {
  constexpr int NT = 8 * NV;
  constexpr int LOG_NT = NV == 1 ? 3 : NV == 2 ? 4 : NV == 4 ? 5 : 6;
  constexpr int A = NV * U;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n, M = w.m;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  const float* xb = xP + g0 * M * NT;
  alignas(32) int32_t offs[kNmMaxBlockSlots];
  constexpr int64_t kValueBytes = VT == ValueType::kF32 ? 4 : 2;
  const int64_t block_bytes = cnt * kValueBytes;
  for (int64_t r = r0; r < r1; ++r) {
    // Rows are `kept` values apart, so the hardware prefetcher cannot follow this walk over one
    // column block of many rows: fetch the block of row r + kPrefetchRows ahead of use.
    {
      const int64_t rp = r + kPrefetchRows < r1 ? r + kPrefetchRows : r1 - 1;
      const char* pv = static_cast<const char*>(w.values) + (rp * kept + j0) * kValueBytes;
      for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(pv + off, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w.meta + rp * stride + ((j0 * B) >> 3)), _MM_HINT_T0);
    }
    decode_offsets<B, LOG_NT>(w.meta + r * stride, gcol, j0, cnt, offs);
    const int64_t vbase = r * kept + j0;
    float* yr = ytile + (r - r0) * NT;
    __m256 acc[A];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_loadu_ps(yr + 8 * v);
#pragma GCC unroll 8
    for (int i = NV; i < A; ++i) acc[i] = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + U <= cnt; c += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const float* xr = xb + offs[c + u];
        const __m256 wv = broadcast_value<VT>(w.values, vbase + c + u);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
          acc[u * NV + v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[u * NV + v]);
      }
    }
    for (; c < cnt; ++c) {
      const float* xr = xb + offs[c];
      const __m256 wv = broadcast_value<VT>(w.values, vbase + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[v]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_add_ps(acc[v], acc[u * NV + v]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(yr + 8 * v, acc[v]);
  }
}

// Same contract as tile_impl, for N dividing 8 (N = 1, 2, 4, 8): the 8 slots of one B-byte
// metadata word span 8 / N whole groups, so each slot's column is a compile-time group offset plus
// its B-bit index, decoded in registers (no offset table, no extra load per slot).
template <ValueType VT, int NV, int U, int B, int N>
void tile_fixed_impl(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0,
                     int64_t g1, int64_t r0, int64_t r1, float* ytile) {
  constexpr int NT = 8 * NV;
  constexpr int M = 1 << B;
  constexpr int A = NV * U;
  constexpr uint32_t kMask = (1u << B) - 1u;
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N, full = cnt & ~int64_t{7};
  const float* xb = xP + g0 * M * NT;
  constexpr int64_t kValueBytes = VT == ValueType::kF32 ? 4 : 2;
  const int64_t block_bytes = cnt * kValueBytes;
  for (int64_t r = r0; r < r1; ++r) {
    {
      const int64_t rp = r + kPrefetchRows < r1 ? r + kPrefetchRows : r1 - 1;
      const char* pv = static_cast<const char*>(w.values) + (rp * kept + j0) * kValueBytes;
      for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch(pv + off, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w.meta + rp * stride + ((j0 * B) >> 3)), _MM_HINT_T0);
    }
    const uint8_t* row_meta = w.meta + r * stride;
    const uint8_t* meta = row_meta + ((j0 * B) >> 3);
    const int64_t vbase = r * kept + j0;
    float* yr = ytile + (r - r0) * NT;
    __m256 acc[A];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = _mm256_loadu_ps(yr + 8 * v);
#pragma GCC unroll 8
    for (int i = NV; i < A; ++i) acc[i] = _mm256_setzero_ps();
    const float* xg = xb;
    for (int64_t c = 0; c < full; c += 8) {
      const uint32_t word = load_meta_word<B>(meta + (c >> 3) * B);
      // One vector load of 8 values; each slot's broadcast is an in-lane shuffle of the duplicated
      // low or high half (shuffle port) instead of one more load per slot (load ports are the
      // bottleneck: every FMA already loads its activation vector).
      const __m256 v8 = load8_values<VT>(w.values, vbase + c);
      const __m256 lo = _mm256_permute2f128_ps(v8, v8, 0x00);
      const __m256 hi = _mm256_permute2f128_ps(v8, v8, 0x11);
#pragma GCC unroll 8
      for (int sl = 0; sl < 8; ++sl) {
        const uint32_t idx = (word >> (sl * B)) & kMask;
        const float* xr = xg + ((sl / N) * M + static_cast<int64_t>(idx)) * NT;
        const __m256 half = sl < 4 ? lo : hi;
        // vpermilps with a register control: an immediate would need the loop unrolled, which
        // -O0 / -O1 builds (sanitizers, debug) do not do.
        const __m256 wv = _mm256_permutevar_ps(half, _mm256_set1_epi32(sl & 3));
        const int set = sl % U;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
          acc[set * NV + v] =
              _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[set * NV + v]);
      }
      xg += (8 / N) * M * NT;
    }
    for (int64_t c = full; c < cnt; ++c) {
      const float* xr = xb + (gcol[c] + nm_read_index(row_meta, j0 + c, B)) * NT;
      const __m256 wv = broadcast_value<VT>(w.values, vbase + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[v]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = _mm256_add_ps(acc[v], acc[u * NV + v]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(yr + 8 * v, acc[v]);
  }
}

template <ValueType VT, int NV, int U, int B>
void tile_bits(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
               int64_t r0, int64_t r1, float* ytile) {
  switch (w.n) {
    case 1: return tile_fixed_impl<VT, NV, U, B, 1>(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 2: return tile_fixed_impl<VT, NV, U, B, 2>(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 4: return tile_fixed_impl<VT, NV, U, B, 4>(w, xP, gcol, g0, g1, r0, r1, ytile);
    default:
      if constexpr (B == 4) {
        if (w.n == 8) return tile_fixed_impl<VT, NV, U, B, 8>(w, xP, gcol, g0, g1, r0, r1, ytile);
      }
      return tile_impl<VT, NV, U, B>(w, xP, gcol, g0, g1, r0, r1, ytile);
  }
}

template <ValueType VT, int NV, int U>
void tile(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
          int64_t r0, int64_t r1, float* ytile) {
  switch (w.bits()) {
    case 2: return tile_bits<VT, NV, U, 2>(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 3: return tile_bits<VT, NV, U, 3>(w, xP, gcol, g0, g1, r0, r1, ytile);
    default: return tile_bits<VT, NV, U, 4>(w, xP, gcol, g0, g1, r0, r1, ytile);
  }
}

// ---- Input gradient: scatter each slot's value times the row's grad vector ---------------------
constexpr int kScatterNv = 4;
// Entry: dyP float [rows, NT], gcol int32 [(g1-g0)*N], dxtile float [(g1-g0)*M, NT] accumulated.
template <ValueType VT, int B>
void scatter_impl(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
                  int64_t r0, int64_t r1, float* dxtile) {
  constexpr int NV = kScatterNv, NT = 8 * NV, LOG_NT = 5;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  alignas(32) int32_t offs[kNmMaxBlockSlots];
  for (int64_t r = r0; r < r1; ++r) {
    __m256 d[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) d[v] = _mm256_loadu_ps(dyP + r * NT + 8 * v);
    decode_offsets<B, LOG_NT>(w.meta + r * stride, gcol, j0, cnt, offs);
    const int64_t vbase = r * kept + j0;
    for (int64_t c = 0; c < cnt; ++c) {
      float* xr = dxtile + offs[c];
      const __m256 wv = broadcast_value<VT>(w.values, vbase + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        _mm256_storeu_ps(xr + 8 * v, _mm256_fmadd_ps(wv, d[v], _mm256_loadu_ps(xr + 8 * v)));
    }
  }
}

template <ValueType VT>
void scatter(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
             int64_t r0, int64_t r1, float* dxtile) {
  switch (w.bits()) {
    case 2: return scatter_impl<VT, 2>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    case 3: return scatter_impl<VT, 3>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    default: return scatter_impl<VT, 4>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
  }
}

// ---- Values gradient (SDDMM): one dot product over the tokens per slot -------------------------
// Entry: dyT float [rows, ld], xT float [padded_cols, ld], gcol int32 [kept], dv float [rows, kept].
template <ValueType VT>
void sddmm(const NmWeight& w, const float* dyT, const float* xT, int64_t ld, const int32_t* gcol,
           int64_t r0, int64_t r1, float* dv) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const float* dr = dyT + r * ld;
    for (int64_t j = 0; j < kept; ++j) {
      const float* xr = xT + (gcol[j] + nm_read_index(meta, j, bits)) * ld;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t t = 0;
      for (; t + 16 <= ld; t += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + t), _mm256_loadu_ps(xr + t), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + t + 8), _mm256_loadu_ps(xr + t + 8), a1);
      }
      if (t < ld) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(dr + t), _mm256_loadu_ps(xr + t), a0);
      dv[r * kept + j] = hsum(_mm256_add_ps(a0, a1));
    }
  }
}

#define SE_NM_AVX2_KERNELS(VT, vts)                                                   \
  NmUkernels {                                                                        \
    vts "-nmgemv-1x1-avx2", gemv<VT>,                                                 \
        {{vts "-nmmm-8x1-avx2", tile<VT, 1, 8>, 8},                                   \
         {vts "-nmmm-16x1-avx2", tile<VT, 2, 4>, 16},                                 \
         {vts "-nmmm-32x1-avx2", tile<VT, 4, 2>, 32},                                 \
         {vts "-nmmm-64x1-avx2", tile<VT, 8, 1>, 64}},                                \
        vts "-nmscatter-32x1-avx2", scatter<VT>, 8 * kScatterNv, vts "-nmsddmm-1x1-avx2", \
        sddmm<VT>                                                                     \
  }

const NmUkernels kF32 = SE_NM_AVX2_KERNELS(ValueType::kF32, "f32");
const NmUkernels kBF16 = SE_NM_AVX2_KERNELS(ValueType::kBF16, "bf16");

}  // namespace

const NmUkernels* nm_ukernels_avx2(ValueType value_type) {
  if (value_type == ValueType::kF32) return &kF32;
  if (value_type == ValueType::kBF16) return &kBF16;
  return nullptr;
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const NmUkernels* nm_ukernels_avx2(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

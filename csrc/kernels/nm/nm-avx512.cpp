// AVX-512 (F + BW + VL + DQ) ukernels for N:M: the one-token GEMV and the token-tile kernels.
// The scatter (input gradient) and SDDMM (values gradient) slots are empty and come from the AVX2
// tier (nm_ukernels_for merges a tier's entry with the tiers below it).
//
// GEMV: 16 slots per step. When N divides 16 they cover 16 / N whole groups, a span of 16 * M / N
// columns that starts at a group boundary; vpermt2ps picks each slot's activation from 32 columns
// (two zmm) with one index vector, so the span takes 1 (2:4, 4:8, 8:16), 2 (1:4, 2:8, 4:16),
// 4 (1:8, 2:16) or 8 (1:16) permutes, merged by blends with compile-time masks; no gathers.
// Several rows share each load of the activations.
//
// Tiles: 16, 32 or 64 tokens of a panel row are 1, 2 or 4 zmm; every slot is one broadcast of
// its value (a load, no shuffle: port 5 also runs FMAs here) times those vectors. Several rows
// are interleaved so that the accumulators form 8 independent FMA chains.
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "../common/bf16.h"
#include "nm.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX512 1
#endif

#if SPARSE_EXT_COMPILE_AVX512
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
// GCC 12 reports its own _mm512_undefined_* inside the cast / convert intrinsics as "(may be) used
// uninitialized": a false positive of its headers, not of this file.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "../common/avx512-values.h"

namespace sparse_ext {
namespace {

// The B bytes holding 8 consecutive B-bit indices (B = 2, 3, 4), as one little-endian word, read
// with loads of exactly B bytes: a 3-byte memcpy into a 4-byte word stalls store forwarding and
// made 2:8 four times slower than 1:4 (measured on the AVX-512 Xeon).
template <int B>
inline uint32_t load_meta8(const uint8_t* p) {
  if constexpr (B == 3) {
    uint16_t lo;
    std::memcpy(&lo, p, 2);
    return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(p[2]) << 16);
  } else {
    std::conditional_t<B == 2, uint16_t, uint32_t> v;
    std::memcpy(&v, p, B);
    return v;
  }
}

// The B-bit indices of 16 slots whose bits start at byte p, one per 32-bit lane. `bytes` masks
// the bytes that may be read: 2 * B of them for a full step, fewer at the end of a row (the row's
// last metadata byte may be the last byte of the buffer). Lanes 0-7 come from the first B bytes,
// lanes 8-15 from the next B, each shifted by its position.
template <int B>
inline __m512i decode16(const uint8_t* p, __mmask16 bytes) {
  const __m128i raw = _mm_maskz_loadu_epi8(bytes, p);
  __m512i words;
  __m512i shifts;
  if constexpr (B == 2) {
    words = _mm512_broadcastd_epi32(raw);  // 16 slots of 2 bits are one 32-bit word
    shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  } else {
    __m128i two_words = raw;
    if constexpr (B == 3)  // bytes 0-2 and 3-5 into 32-bit lanes 0 and 1
      two_words = _mm_shuffle_epi8(raw, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1,
                                                      -1, -1, -1, -1));
    words = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castsi128_si512(two_words));
    shifts = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B, 0, B, 2 * B, 3 * B,
                               4 * B, 5 * B, 6 * B, 7 * B);
  }
  return _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32((1 << B) - 1));
}

// Full step: B = 2 broadcasts its 4 bytes straight from memory (a load, no shuffle).
template <int B>
inline __m512i decode16_full(const uint8_t* p) {
  if constexpr (B == 2) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    const __m512i shifts =
        _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int32_t>(word)), shifts),
                            _mm512_set1_epi32(3));
  } else {
    return decode16<B>(p, static_cast<__mmask16>((1u << (2 * B)) - 1u));
  }
}

// ---- GEMV (one token) --------------------------------------------------------------------------

// Lanes of a 16-slot step whose group starts in 32-column chunk k: (l / N) * M / 32 == k.
template <int N, int M>
constexpr __mmask16 chunk_lanes(int k) {
  unsigned mask = 0;
  for (int l = 0; l < 16; ++l)
    if ((l / N) * M / 32 == k) mask |= 1u << l;
  return static_cast<__mmask16>(mask);
}

// RG rows [r, r + RG), N dividing 16. Entry: x float [padded_cols + 8] zero beyond cols,
// y float [rows]. Full steps read x[(c / N) * M .. + SPAN) (inside padded_cols, as the step's
// groups are whole); the tail step reads only its own groups' columns, values and metadata
// bytes (k-masked loads), so rows with fewer than 16 slots read nothing past their buffers.
// 4 rows per x load: measured 1.25x (256 rows, in L2) to 1.4-1.7x (4096x4096) over 1 row for 2:4
// and 1.5x for 1:8 (one thread, AVX-512 Xeon); 8 rows measured the same as 4.
template <ValueType VT, int B, int N, int RG>
inline void gemv_rows(const NmWeight& w, const float* x, int64_t r, float* y) {
  constexpr int M = 1 << B;
  constexpr int SPAN = 16 / N * M;  // columns covered by 16 slots
  constexpr int CH = SPAN / 32;     // 32-column chunks, one vpermt2ps each
  const int64_t kept = w.kept(), stride = w.meta_stride();
  // Slot l's column inside its chunk, before adding its index: ((l / N) * M) mod 32.
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i group_col = _mm512_and_si512(
      _mm512_slli_epi32(_mm512_srli_epi32(lane, __builtin_ctz(N)), B), _mm512_set1_epi32(31));
  const uint8_t* meta = w.meta + r * stride;
  const int64_t vbase = r * kept;
  __m512 acc[RG];
#pragma GCC unroll 4
  for (int i = 0; i < RG; ++i) acc[i] = _mm512_setzero_ps();

  // One step: xt holds the span's 2 * CH vectors of x; `slots` masks the lanes that count.
  auto step = [&](const __m512* xt, int64_t c, __mmask16 slots, __mmask16 meta_bytes) {
#pragma GCC unroll 4
    for (int i = 0; i < RG; ++i) {
      const uint8_t* mp = meta + i * stride + c * B / 8;
      const __m512i idx = slots == 0xFFFF ? decode16_full<B>(mp) : decode16<B>(mp, meta_bytes);
      const __m512i col = _mm512_or_si512(group_col, idx);
      __m512 xv = _mm512_permutex2var_ps(xt[0], col, xt[1]);
#pragma GCC unroll 8
      for (int k = 1; k < CH; ++k)
        xv = _mm512_mask_blend_ps(chunk_lanes<N, M>(k), xv,
                                  _mm512_permutex2var_ps(xt[2 * k], col, xt[2 * k + 1]));
      const __m512 v = load16_values<VT>(w.values, vbase + i * kept + c, slots);
      acc[i] = _mm512_mask3_fmadd_ps(v, xv, acc[i], slots);
    }
  };

  int64_t c = 0;
  for (; c + 16 <= kept; c += 16) {
    const float* xc = x + c / N * M;
    __m512 xt[2 * CH];
#pragma GCC unroll 16
    for (int h = 0; h < 2 * CH; ++h) xt[h] = _mm512_loadu_ps(xc + 16 * h);
    step(xt, c, 0xFFFF, 0);
  }
  if (c < kept) {
    // kept and c are multiples of N: the tail is whole groups.
    const int64_t rest = kept - c, cols = rest / N * M;
    const float* xc = x + c / N * M;
    __m512 xt[2 * CH];
#pragma GCC unroll 16
    for (int h = 0; h < 2 * CH; ++h) {
      const int64_t live = cols - 16 * h;
      xt[h] = _mm512_maskz_loadu_ps(live <= 0 ? 0 : live >= 16 ? 0xFFFF : first_lanes(live),
                                    xc + 16 * h);
    }
    step(xt, c, first_lanes(rest), first_lanes((rest * B + 7) / 8));
  }
#pragma GCC unroll 4
  for (int i = 0; i < RG; ++i) y[r + i] = _mm512_reduce_add_ps(acc[i]);
}

template <ValueType VT, int B, int N>
void gemv_span(const NmWeight& w, const float* x, const int32_t*, int64_t r0, int64_t r1,
               float* y) {
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_rows<VT, B, N, 4>(w, x, r, y);
  for (; r < r1; ++r) gemv_rows<VT, B, N, 1>(w, x, r, y);
}

// Slots past the last full step of 16: scalar (their metadata bytes may be the last of the
// buffer).
template <ValueType VT>
inline float tail_sum(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r,
                      int64_t c, int bits) {
  const uint8_t* meta = w.meta + r * w.meta_stride();
  float tail = 0.f;
  for (; c < w.kept(); ++c)
    tail += load1_value<VT>(w.values, r * w.kept() + c) * x[gcol[c] + nm_read_index(meta, c, bits)];
  return tail;
}

// Any other N (3:4, 3:8, 5:16, ...): steps of 16 slots straddle groups, so gather.
// Entry: gcol int32 [kept] (the whole row's table).
template <ValueType VT, int B>
void gemv_gather(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
                 float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
      const __m512i col =
          _mm512_add_epi32(_mm512_loadu_si512(gcol + c), decode16_full<B>(meta + c * B / 8));
      acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, vbase + c), _mm512_i32gather_ps(col, x, 4),
                             acc0);
      std::swap(acc0, acc1);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail_sum<VT>(w, x, gcol, r, c, B);
  }
}

template <ValueType VT, int B>
NmGemvUkernel gemv_for_bits(int64_t n) {
  switch (n) {
    case 1: return gemv_span<VT, B, 1>;
    case 2: return gemv_span<VT, B, 2>;
    case 4:
      if constexpr (B >= 3) return gemv_span<VT, B, 4>;
      break;
    case 8:
      if constexpr (B == 4) return gemv_span<VT, B, 8>;
      break;
    default: break;
  }
  return gemv_gather<VT, B>;
}

template <ValueType VT>
void gemv(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
          float* y) {
  switch (w.bits()) {
    case 2: return gemv_for_bits<VT, 2>(w.n)(w, x, gcol, r0, r1, y);
    case 3: return gemv_for_bits<VT, 3>(w.n)(w, x, gcol, r0, r1, y);
    default: return gemv_for_bits<VT, 4>(w.n)(w, x, gcol, r0, r1, y);
  }
}

// ---- Token tiles ---------------------------------------------------------------------------------

// One K-block of the weight, with the sizes every row group needs computed once per tile call
// (kept() divides, and a tile call runs many row groups over a short block).
struct Block {
  const void* values;
  const uint8_t* meta;
  int64_t kept, stride;  // values and metadata bytes per row
  int64_t j0, cnt;       // first slot of the block (a multiple of 8) and slots per row in it
};

// Rows of one values block the tile kernels prefetch ahead: rows are `kept` values apart, so the
// hardware prefetcher cannot follow a walk over one column block of many rows.
template <ValueType VT, int B>
inline void prefetch_row_block(const Block& b, int64_t r) {
  constexpr int64_t kValueBytes = VT == ValueType::kF32 ? 4 : 2;
  const char* pv = static_cast<const char*>(b.values) + (r * b.kept + b.j0) * kValueBytes;
  for (int64_t off = 0; off < b.cnt * kValueBytes; off += 64) _mm_prefetch(pv + off, _MM_HINT_T0);
  const char* pm = reinterpret_cast<const char*>(b.meta + r * b.stride + b.j0 * B / 8);
  for (int64_t off = 0; off < (b.cnt * B + 7) / 8; off += 64) _mm_prefetch(pm + off, _MM_HINT_T0);
}

// bf16 only: 8 values from index i widened into `out`, for broadcasting with plain loads (fp32
// values are broadcast straight from the weight).
inline void widen8_bf16(const void* values, int64_t i, float* out) {
  const __m128i raw = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(values) + i));
  _mm256_store_ps(out, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
}

// Accumulators of RT rows x NV vectors, U sets (slots take the sets in turn).
template <int U, int RT, int NV>
struct TileAcc {
  __m512 v[U][RT][NV];
  inline void load(const float* yr) {
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) {
        v[0][i][q] = _mm512_loadu_ps(yr + i * 16 * NV + 16 * q);
#pragma GCC unroll 8
        for (int u = 1; u < U; ++u) v[u][i][q] = _mm512_setzero_ps();
      }
  }
  inline void store(float* yr) {
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i)
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) {
#pragma GCC unroll 8
        for (int u = 1; u < U; ++u) v[0][i][q] = _mm512_add_ps(v[0][i][q], v[u][i][q]);
        _mm512_storeu_ps(yr + i * 16 * NV + 16 * q, v[0][i][q]);
      }
  }
  // Slot value wv times the panel row at xr, into set u of row i.
  inline void fma(int u, int i, __m512 wv, const float* xr) {
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) v[u][i][q] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + 16 * q), v[u][i][q]);
  }
};

// RT rows [r, r + RT) of the block, N dividing 8 (N = 1, 2, 4, 8): the 8 slots of one B-byte
// metadata word span 8 / N whole groups, so each slot's panel row is a compile-time group offset
// plus its B-bit index, decoded in scalar registers (shift and mask, the scaling to bytes folded
// into them). xb: the block's panel rows [M * (cnt / N), NT]; yr: the rows' ytile rows.
template <ValueType VT, int NV, int RT, int U, int B, int N>
inline void tile_fixed_rows(const Block& b, const float* xb, const int32_t* gcol, int64_t r,
                            float* yr) {
  constexpr int NT = 16 * NV, M = 1 << B;
  constexpr int ROW_SHIFT = NV == 1 ? 6 : NV == 2 ? 7 : 8;  // log2 of a panel row's bytes
  constexpr uint64_t kIndexBytes = static_cast<uint64_t>((1u << B) - 1u) << ROW_SHIFT;
  const int64_t kept = b.kept, stride = b.stride, full = b.cnt & ~int64_t{7};
  const uint8_t* meta = b.meta + r * stride + b.j0 * B / 8;
  const int64_t vbase = r * kept + b.j0;
  TileAcc<U, RT, NV> acc;
  acc.load(yr);
  alignas(32) float widened[RT][8];
  const char* xg = reinterpret_cast<const char*>(xb);
  for (int64_t c = 0; c < full; c += 8) {
    uint64_t word[RT];
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      word[i] = load_meta8<B>(meta + i * stride + (c >> 3) * B);
      if constexpr (VT == ValueType::kBF16) widen8_bf16(b.values, vbase + i * kept + c, widened[i]);
    }
#pragma GCC unroll 8
    for (int sl = 0; sl < 8; ++sl)
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i) {
        const int shift = sl * B - ROW_SHIFT;
        const uint64_t off = (shift >= 0 ? word[i] >> shift : word[i] << -shift) & kIndexBytes;
        const float* xr = reinterpret_cast<const float*>(
            xg + (static_cast<int64_t>(sl / N * M) << ROW_SHIFT) + off);
        const __m512 wv =
            VT == ValueType::kF32
                ? _mm512_set1_ps(static_cast<const float*>(b.values)[vbase + i * kept + c + sl])
                : _mm512_set1_ps(widened[i][sl]);
        acc.fma(sl % U, i, wv, xr);
      }
    xg += static_cast<int64_t>(8 / N * M) << ROW_SHIFT;
  }
  // The block's last cnt mod 8 slots (the row's last block only).
  for (int64_t c = full; c < b.cnt; ++c)
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i) {
      const uint8_t* row_meta = b.meta + (r + i) * stride;
      const float* xr = xb + (gcol[c] + nm_read_index(row_meta, b.j0 + c, B)) * NT;
      acc.fma(0, i, broadcast16_value<VT>(b.values, vbase + i * kept + c), xr);
    }
  acc.store(yr);
}

// Any other N (3:4, 3:8, 5:8, ..., 15:16): each row's panel offsets are decoded 16 slots at a
// time into a table (k-masked at the block's end), then one load per slot finds its panel row.
template <ValueType VT, int NV, int RT, int U, int B>
inline void tile_table_rows(const Block& b, const float* xb, const int32_t* gcol, int64_t r,
                            float* yr) {
  constexpr int LOG_NT = NV == 1 ? 4 : NV == 2 ? 5 : 6;
  const int64_t kept = b.kept, cnt = b.cnt;
  const int64_t vbase = r * kept + b.j0;
  alignas(64) int32_t offs[RT][kNmMaxBlockSlots];
#pragma GCC unroll 8
  for (int i = 0; i < RT; ++i) {
    const uint8_t* meta = b.meta + (r + i) * b.stride + b.j0 * B / 8;
    for (int64_t c = 0; c < cnt; c += 16) {
      const int64_t live = cnt - c < 16 ? cnt - c : 16;
      const __mmask16 slots = live == 16 ? __mmask16(0xFFFF) : first_lanes(live);
      const __m512i col =
          _mm512_add_epi32(_mm512_maskz_loadu_epi32(slots, gcol + c),
                           decode16<B>(meta + c * B / 8, first_lanes((live * B + 7) / 8)));
      _mm512_mask_storeu_epi32(offs[i] + c, slots, _mm512_slli_epi32(col, LOG_NT));
    }
  }
  TileAcc<U, RT, NV> acc;
  acc.load(yr);
  int64_t c = 0;
  for (; c + U <= cnt; c += U)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int i = 0; i < RT; ++i)
        acc.fma(u, i, broadcast16_value<VT>(b.values, vbase + i * kept + c + u), xb + offs[i][c + u]);
  for (; c < cnt; ++c)
#pragma GCC unroll 8
    for (int i = 0; i < RT; ++i)
      acc.fma(0, i, broadcast16_value<VT>(b.values, vbase + i * kept + c), xb + offs[i][c]);
  acc.store(yr);
}

// NmTileUkernel entry (nm.h): xP float [padded_cols, NT], gcol int32 [(g1 - g0) * N], ytile
// float [r1 - r0, NT] accumulated; g0 * N a multiple of 8, (g1 - g0) * N <= kNmMaxBlockSlots.
// Rows go RT at a time (the next RT rows' block prefetched), the last (r1 - r0) mod RT one at a
// time with more accumulator sets. N = 0: the offset-table kernel, any n.
// RT * NV * U = 8 accumulator chains (4 cycles of FMA latency, 2 FMA ports).
template <ValueType VT, int NV, int RT, int B, int N>
void tile_rows(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
               int64_t r0, int64_t r1, float* ytile) {
  constexpr int NT = 16 * NV, M = 1 << B;
  constexpr int kChains = 8;
  constexpr int U = kChains / (RT * NV) > 0 ? kChains / (RT * NV) : 1;
  constexpr int U1 = kChains / NV > 0 ? kChains / NV : 1;
  const int64_t n = N == 0 ? w.n : N;
  const Block b{w.values, w.meta, w.kept(), w.meta_stride(), g0 * n, (g1 - g0) * n};
  const float* xb = xP + g0 * M * NT;
  int64_t r = r0;
  for (; r + RT <= r1; r += RT) {
    // One row group ahead: 1 to 4 groups measured the same.
    for (int64_t p = r + RT; p < r + 2 * RT && p < r1; ++p) prefetch_row_block<VT, B>(b, p);
    if constexpr (N == 0)
      tile_table_rows<VT, NV, RT, U, B>(b, xb, gcol, r, ytile + (r - r0) * NT);
    else
      tile_fixed_rows<VT, NV, RT, U, B, N>(b, xb, gcol, r, ytile + (r - r0) * NT);
  }
  for (; r < r1; ++r) {
    if constexpr (N == 0)
      tile_table_rows<VT, NV, 1, U1, B>(b, xb, gcol, r, ytile + (r - r0) * NT);
    else
      tile_fixed_rows<VT, NV, 1, U1, B, N>(b, xb, gcol, r, ytile + (r - r0) * NT);
  }
}

template <ValueType VT, int NV, int RT, int B>
NmTileUkernel tile_for_bits(int64_t n) {
  switch (n) {
    case 1: return tile_rows<VT, NV, RT, B, 1>;
    case 2: return tile_rows<VT, NV, RT, B, 2>;
    case 4:
      if constexpr (B >= 3) return tile_rows<VT, NV, RT, B, 4>;
      break;
    case 8:
      if constexpr (B == 4) return tile_rows<VT, NV, RT, B, 8>;
      break;
    default: break;
  }
  return tile_rows<VT, NV, RT, B, 0>;
}

template <ValueType VT, int NV, int RT>
void tile(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
          int64_t r0, int64_t r1, float* ytile) {
  switch (w.bits()) {
    case 2: return tile_for_bits<VT, NV, RT, 2>(w.n)(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 3: return tile_for_bits<VT, NV, RT, 3>(w.n)(w, xP, gcol, g0, g1, r0, r1, ytile);
    default: return tile_for_bits<VT, NV, RT, 4>(w.n)(w, xP, gcol, g0, g1, r0, r1, ytile);
  }
}

// 16-row driver chunks when the tokens fit one panel: measured 1.34x (2:4) and 1.19x (1:8) at
// 16 tokens, 4096x4096, one thread, over 64-row chunks; the AVX2 tile gained nothing from it.
// With several panels 64 rows stay better (each panel re-reads the chunk's values from L2).
constexpr int64_t kOnePanelRows = 16;

#define SE_NM_AVX512_KERNELS(VT, vts)                                                       \
  NmUkernels {                                                                              \
    vts "-nmgemv-4x16-avx512", gemv<VT>,                                                    \
        {{vts "-nmmm-16x4-avx512", tile<VT, 1, 4>, 16},                                     \
         {vts "-nmmm-32x4-avx512", tile<VT, 2, 4>, 32},                                     \
         {vts "-nmmm-64x2-avx512", tile<VT, 4, 2>, 64},                                     \
         {nullptr, nullptr, 0}},                                                            \
        nullptr, nullptr, 0, nullptr, nullptr, kOnePanelRows                                \
  }

// The scatter and SDDMM slots are empty: they come from the AVX2 tier.
const NmUkernels kF32 = SE_NM_AVX512_KERNELS(ValueType::kF32, "f32");
const NmUkernels kBF16 = SE_NM_AVX512_KERNELS(ValueType::kBF16, "bf16");

}  // namespace

const NmUkernels* nm_ukernels_avx512(ValueType value_type) {
  if (value_type == ValueType::kF32) return &kF32;
  if (value_type == ValueType::kBF16) return &kBF16;
  return nullptr;
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const NmUkernels* nm_ukernels_avx512(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

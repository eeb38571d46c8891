// AVX-512 (F + BW + VL + DQ) ukernels for N:M: the one-token GEMV, where the AVX2 kernels spend
// most of their instructions picking activations. The other ukernels come from the AVX2 tier
// (nm_ukernels_for merges a tier's entry with the tiers below it).
//
// 16 slots per step. When N divides 16 they cover 16 / N whole groups, a span of 16 * M / N
// columns that starts at a group boundary; vpermt2ps picks each slot's activation from 32 columns
// (two zmm) with one index vector, so the span takes 1 (2:4, 4:8, 8:16), 2 (1:4, 2:8, 4:16),
// 4 (1:8, 2:16) or 8 (1:16) permutes and k-masked merges, and no gathers.
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

// The B-bit indices of slots 16c .. 16c + 15, one per 32-bit lane: each half of the vector holds
// one 8-slot word, shifted per lane.
template <int B>
inline __m512i decode16(const uint8_t* row_meta, int64_t c16) {
  const uint8_t* p = row_meta + c16 * 2 * B;
  const __m512i words = _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_set1_epi32(static_cast<int32_t>(load_meta8<B>(p)))),
      _mm256_set1_epi32(static_cast<int32_t>(load_meta8<B>(p + B))), 1);
  const __m512i shifts = _mm512_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B, 0, B,
                                           2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
  return _mm512_and_si512(_mm512_srlv_epi32(words, shifts), _mm512_set1_epi32((1 << B) - 1));
}

// Slots past the last full step of 16: scalar, as in the AVX2 kernels (their metadata bytes may
// be the last of the buffer).
template <ValueType VT>
inline float tail_sum(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r,
                      int64_t c, int bits) {
  const uint8_t* meta = w.meta + r * w.meta_stride();
  float tail = 0.f;
  for (; c < w.kept(); ++c)
    tail += load1_value<VT>(w.values, r * w.kept() + c) * x[gcol[c] + nm_read_index(meta, c, bits)];
  return tail;
}

// N dividing 16: CHUNKS = M / (2N) permutes of 32 columns per step of 16 slots. Lanes are
// selected, never multiplied by a zero, so a NaN activation reaches only the slots that name it.
template <ValueType VT, int B, int CHUNKS>
void gemv_span(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  // Slot s of a step: its group's first column relative to the step's first column, (s / N) * M
  // (both powers of two here); computed, as the gcol table may be shorter than 16 entries.
  const __m128i log2_n = _mm_cvtsi32_si128(__builtin_ctzll(static_cast<uint64_t>(w.n)));
  const __m128i log2_m = _mm_cvtsi32_si128(__builtin_ctzll(static_cast<uint64_t>(w.m)));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i group_col = _mm512_sll_epi32(_mm512_srl_epi32(lane, log2_n), log2_m);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= kept; c += 16) {
      const float* xc = x + gcol[c];
      const __m512i col = _mm512_add_epi32(group_col, decode16<B>(meta, c >> 4));
      // vpermt2ps reads the low 5 bits of each index: the column inside its 32-column chunk.
      __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xc), col, _mm512_loadu_ps(xc + 16));
#pragma GCC unroll 8
      for (int k = 1; k < CHUNKS; ++k) {
        const __m512 pk =
            _mm512_permutex2var_ps(_mm512_loadu_ps(xc + 32 * k), col, _mm512_loadu_ps(xc + 32 * k + 16));
        const __mmask16 in_chunk =
            _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(col, 5), _mm512_set1_epi32(k));
        xv = _mm512_mask_mov_ps(xv, in_chunk, pk);
      }
      acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, vbase + c), xv, acc0);
      std::swap(acc0, acc1);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail_sum<VT>(w, x, gcol, r, c, B);
  }
}

// Any other N (3:4, 3:8, 5:16, ...): steps of 16 slots straddle groups, so gather.
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
      const __m512i col = _mm512_add_epi32(_mm512_loadu_si512(gcol + c), decode16<B>(meta, c >> 4));
      acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, vbase + c), _mm512_i32gather_ps(col, x, 4),
                             acc0);
      std::swap(acc0, acc1);
    }
    y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail_sum<VT>(w, x, gcol, r, c, B);
  }
}

template <ValueType VT, int B>
NmGemvUkernel gemv_for_bits(int64_t n, int64_t m) {
  if (16 % n != 0) return gemv_gather<VT, B>;
  switch (m / (2 * n)) {
    case 1: return gemv_span<VT, B, 1>;
    case 2: return gemv_span<VT, B, 2>;
    case 4: return gemv_span<VT, B, 4>;
    default: return gemv_span<VT, B, 8>;
  }
}

template <ValueType VT>
void gemv(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
          float* y) {
  switch (w.bits()) {
    case 2: return gemv_for_bits<VT, 2>(w.n, w.m)(w, x, gcol, r0, r1, y);
    case 3: return gemv_for_bits<VT, 3>(w.n, w.m)(w, x, gcol, r0, r1, y);
    default: return gemv_for_bits<VT, 4>(w.n, w.m)(w, x, gcol, r0, r1, y);
  }
}

// Only the GEMV: the tile, scatter and SDDMM slots are empty and taken from the AVX2 tier.
const NmUkernels kF32{"f32-nmgemv-1x16-avx512", gemv<ValueType::kF32>, {}, nullptr, nullptr, 0,
                      nullptr, nullptr};
const NmUkernels kBF16{"bf16-nmgemv-1x16-avx512", gemv<ValueType::kBF16>, {}, nullptr, nullptr, 0,
                       nullptr, nullptr};

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

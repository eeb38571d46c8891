// FEAT_BF16 variant of the NEON expert GEMV for bf16 weights: BFMMLA (vbfmmlaq_f32) multiplies a
// 2-row x 4-k block of weights by a 2-token x 4-k block of activations into a 2x2 fp32 tile, 16
// multiply-adds per instruction against 4 for an fp32 FMA, and takes the bf16 weights as stored
// (no widening). Compiled with a file-level target pragma on aarch64 GCC and selected at run time
// only where cpu_has_feature("bf16") (moe_ukernels); the plain NEON table serves other cores.
//
// Numerics. The contract's activations are fp32; rounding x to bf16 would keep 8 of its 24
// significand bits (error ~2^-9 per product). Instead each x is split exactly into three bf16
// terms, x = h + m + l (h = x's top 16 bits, m = the top 16 bits of x - h, l = the rest, which
// fits bf16 exactly), so w.x = w.h + w.m + w.l with every product exact in fp32 (8 x 8 significand
// bits). What remains is BFMMLA's own accumulation: Armv8.6 sums the products and the accumulator
// in fp32 with round-to-odd and flushes denormal inputs and results to zero (FEAT_EBF16 cores may
// round to nearest instead): the same order of error as the fp32 FMA path, in a different
// summation order, plus flushing of products below 2^-126. Non-finite x keeps h = x, m = l = 0.
//
// Cost model (reasoned, not measured: qemu timings mean nothing): three BFMMLA per 2 rows x
// 2 tokens x 4 k (48 multiply-adds at 5.3 per instruction) against 4 FMAs + 1 widening shift per
// row for the fp32 path (4 per instruction), plus one pass per call over x to split it. One token
// (decode) is bandwidth-bound and would fill half of each token pair with zeros, so it runs the
// plain NEON GEMV.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "../common/value_type.h"
#include "moe.h"

#if defined(__aarch64__) && defined(__GNUC__) && !defined(__clang__)
#define SPARSE_EXT_COMPILE_NEON_BF16 1
#endif

#if SPARSE_EXT_COMPILE_NEON_BF16
#include <arm_neon.h>
#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+bf16")

namespace sparse_ext {
namespace {

// x = h + m + l, three bf16 bit patterns (see the file comment).
inline void split3(float v, uint16_t* h, uint16_t* m, uint16_t* l) {
  if (!std::isfinite(v)) {
    *h = float_to_bf16(v);
    *m = *l = 0;
    return;
  }
  auto top = [](float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof(bits));
    return static_cast<uint16_t>(bits >> 16);
  };
  *h = top(v);
  const float r1 = v - bf16_to_float(*h);
  *m = top(r1);
  *l = top(r1 - bf16_to_float(*m));
}

constexpr int kParts = 3;

// Rows r, r + 1 of W (bf16) at columns [c, c + 8) as two BFMMLA operands [r c..c+3 | r+1 c..c+3]
// and [r c+4..c+7 | r+1 c+4..c+7].
inline void load_row_pair8(const uint16_t* w0, const uint16_t* w1, int64_t c, bfloat16x8_t* lo,
                           bfloat16x8_t* hi) {
  const uint64x2_t a = vreinterpretq_u64_u16(vld1q_u16(w0 + c));
  const uint64x2_t b = vreinterpretq_u64_u16(vld1q_u16(w1 + c));
  *lo = vreinterpretq_bf16_u64(vzip1q_u64(a, b));
  *hi = vreinterpretq_bf16_u64(vzip2q_u64(a, b));
}

// RP row pairs (rows r .. r + 2 RP - 1, where row_b[i] is the second row of pair i: r + 2i + 1,
// or r + 2i itself for a lone last row) x NP token pairs starting at pair p0.
//   xs   bf16 [kParts][pairs][K4 / 4][2][4]: the split activations of every token pair.
//   y    float [tokens, ldy]; rows r - r0 .. written for tokens < `tokens`.
template <int RP, int NP>
inline void tile(const uint16_t* w, int64_t K, int64_t K4, int64_t r, const int64_t* row_b,
                 int64_t rows_here, const uint16_t* xs, int64_t pairs, int64_t p0, const float* x,
                 int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  float32x4_t acc[RP][NP];
  for (int i = 0; i < RP; ++i)
    for (int p = 0; p < NP; ++p) acc[i][p] = vdupq_n_f32(0.f);
  const int64_t steps = K4 / 4;
  const int64_t part_stride = pairs * steps * 8;
  auto xblock = [&](int part, int p, int64_t s) {
    return vld1q_bf16(reinterpret_cast<const bfloat16_t*>(xs + part * part_stride +
                                                          ((p0 + p) * steps + s) * 8));
  };
  int64_t s = 0;
  for (; 2 * s + 2 <= steps; s += 2) {  // 8 columns per step (one 128-bit load per row)
    bfloat16x8_t lo[RP], hi[RP];
    for (int i = 0; i < RP; ++i)
      load_row_pair8(w + (r + 2 * i) * K, w + row_b[i] * K, 4 * s, &lo[i], &hi[i]);
    for (int part = 0; part < kParts; ++part)
      for (int p = 0; p < NP; ++p) {
        const bfloat16x8_t xa = xblock(part, p, s), xb = xblock(part, p, s + 1);
        for (int i = 0; i < RP; ++i) {
          acc[i][p] = vbfmmlaq_f32(acc[i][p], lo[i], xa);
          acc[i][p] = vbfmmlaq_f32(acc[i][p], hi[i], xb);
        }
      }
  }
  for (; s < steps; ++s) {  // 4 columns
    bfloat16x8_t a[RP];
    for (int i = 0; i < RP; ++i)
      a[i] = vreinterpretq_bf16_u16(
          vcombine_u16(vld1_u16(w + (r + 2 * i) * K + 4 * s), vld1_u16(w + row_b[i] * K + 4 * s)));
    for (int part = 0; part < kParts; ++part)
      for (int p = 0; p < NP; ++p) {
        const bfloat16x8_t xa = xblock(part, p, s);
        for (int i = 0; i < RP; ++i) acc[i][p] = vbfmmlaq_f32(acc[i][p], a[i], xa);
      }
  }
  for (int i = 0; i < RP; ++i)
    for (int p = 0; p < NP; ++p) {
      float out[4];
      vst1q_f32(out, acc[i][p]);  // [row a tok 0, row a tok 1, row b tok 0, row b tok 1]
      for (int q = 0; q < 4; ++q) {
        const int64_t row = q < 2 ? r + 2 * i : row_b[i];
        const int64_t tok = 2 * (p0 + p) + (q & 1);
        if (tok >= tokens || row - r >= rows_here || (q >= 2 && row_b[i] == r + 2 * i)) continue;
        float v = out[q];
        for (int64_t c = K4; c < K; ++c) v += bf16_to_float(w[row * K + c]) * x[tok * ldx + c];
        y[tok * ldy + (row - r)] = v;
      }
    }
}

// Token pairs [0, pairs) in groups of 2 for RP row pairs at row r.
template <int RP>
inline void rows_all_pairs(const uint16_t* w, int64_t K, int64_t K4, int64_t r, const int64_t* row_b,
                           int64_t rows_here, const uint16_t* xs, int64_t pairs, const float* x,
                           int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2)
    tile<RP, 2>(w, K, K4, r, row_b, rows_here, xs, pairs, p, x, ldx, tokens, y, ldy);
  if (p < pairs) tile<RP, 1>(w, K, K4, r, row_b, rows_here, xs, pairs, p, x, ldx, tokens, y, ldy);
}

// Entry: MoeGemvUkernel contract (moe.h) for bf16 W [rows, K].
void gemv_bf16mmla(const void* wv, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
                   int64_t tokens, float* y, int64_t ldy) {
  if (tokens == 1 || K < 4) {
    moe_gemv_bf16_4x4_neon(wv, K, r0, r1, x, ldx, tokens, y, ldy);
    return;
  }
  if (r1 <= r0 || tokens <= 0) return;
  const uint16_t* w = static_cast<const uint16_t*>(wv);
  const int64_t K4 = K / 4 * 4, steps = K4 / 4, pairs = (tokens + 1) / 2;
  // Per-thread scratch, reused across calls: the split activations, zero for the missing token of
  // an odd count.
  thread_local std::vector<uint16_t> xs;
  const int64_t part_stride = pairs * steps * 8;
  xs.assign(static_cast<size_t>(kParts * part_stride), 0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t c = 0; c < K4; ++c) {
      const int64_t at = ((t / 2) * steps + c / 4) * 8 + (t % 2) * 4 + c % 4;
      split3(x[t * ldx + c], &xs[at], &xs[part_stride + at], &xs[2 * part_stride + at]);
    }
  float* yr = y;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const int64_t row_b[2] = {r + 1, r + 3};
    rows_all_pairs<2>(w, K, K4, r, row_b, 4, xs.data(), pairs, x, ldx, tokens, yr + (r - r0), ldy);
  }
  if (r < r1) {
    // 1 to 3 rows left: one or two pairs, a lone last row paired with itself (its copy dropped).
    const int64_t left = r1 - r;
    const int64_t row_b[2] = {left >= 2 ? r + 1 : r, left == 3 ? r + 2 : r + 3};
    if (left <= 2)
      rows_all_pairs<1>(w, K, K4, r, row_b, left, xs.data(), pairs, x, ldx, tokens, yr + (r - r0),
                        ldy);
    else
      rows_all_pairs<2>(w, K, K4, r, row_b, left, xs.data(), pairs, x, ldx, tokens, yr + (r - r0),
                        ldy);
  }
}

const MoeUkernels kBF16 = {"bf16-moegemv-4x4-neonbf16",
                           gemv_bf16mmla, 4, 4,
                           "f32-swiglu-4x1-neon", moe_swiglu_neon,
                           "bf16-moegemm-8x12-neon",
                           moe_gemm_bf16_8x12_neon, 48, 0};

}  // namespace

const MoeUkernels* moe_ukernels_neon_bf16(ValueType wt) {
  return wt == ValueType::kBF16 ? &kBF16 : nullptr;
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const MoeUkernels* moe_ukernels_neon_bf16(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

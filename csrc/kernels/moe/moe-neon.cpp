// ARM NEON (aarch64 ASIMD, fp32 FMA via vfmaq_f32) expert GEMV ukernels and the fused SwiGLU.
// Compiled only when the compiler targets aarch64 (NEON is baseline there: no target pragma);
// elsewhere moe_ukernels_neon returns nullptr. Tested under qemu-aarch64 by
// scripts/test_aarch64.sh against the scalar reference; nothing here is timed on ARM hardware.
//
// Register tile: MR = 4 weight rows x NR = 4 tokens of 4-wide accumulators (16 of the 32 vector
// registers, plus 8 for the token rows and 2 for one 8-weight step). Each weight vector loaded
// from memory (fp32, or bf16 widened to fp32 by shifts, which is exact) feeds NR FMAs; the token
// rows stay in L1. With tokens <= NR every weight row is read from memory once per call; more
// tokens take several passes over the same 4 rows, re-read from L1.
#include <cstdint>

#include "../common/bf16.h"
#include "../common/value_type.h"
#include "moe-exp.h"
#include "moe.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include <cmath>

#include "../common/neon-values.h"  // load8_values, load4_values, load1_value

namespace sparse_ext {
namespace {

// y[n * ldy + m] = W[r + m, :] . x[n * ldx, :] for m < MR, n < NR. K in steps of 8 (one 128-bit
// load of bf16), then 4, then a scalar tail.
template <ValueType WT, int MR, int NR>
inline void tile(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx, float* y,
                 int64_t ldy) {
  float32x4_t acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = vdupq_n_f32(0.f);
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    float32x4_t x0[NR], x1[NR];
    for (int n = 0; n < NR; ++n) {
      x0[n] = vld1q_f32(x + n * ldx + c);
      x1[n] = vld1q_f32(x + n * ldx + c + 4);
    }
    for (int m = 0; m < MR; ++m) {
      const float32x4x2_t wv = load8_values<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n)
        acc[m][n] = vfmaq_f32(vfmaq_f32(acc[m][n], wv.val[0], x0[n]), wv.val[1], x1[n]);
    }
  }
  for (; c + 4 <= K; c += 4)
    for (int m = 0; m < MR; ++m) {
      const float32x4_t wv = load4_values<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) acc[m][n] = vfmaq_f32(acc[m][n], wv, vld1q_f32(x + n * ldx + c));
    }
  float tail[MR][NR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) {
      const float wv = load1_value<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) tail[m][n] += wv * x[n * ldx + c];
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[n * ldy + m] = vaddvq_f32(acc[m][n]) + tail[m][n];
}

// One token (decode, bandwidth-bound): two accumulator sets per row so 2 * MR independent FMA
// chains cover the FMA latency while the MR weight rows stream.
template <ValueType WT, int MR>
inline void tile_1tok(const void* w, int64_t K, int64_t r, const float* x, float* y) {
  float32x4_t acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = vdupq_n_f32(0.f);
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    const float32x4_t x0 = vld1q_f32(x + c), x1 = vld1q_f32(x + c + 4);
    for (int m = 0; m < MR; ++m) {
      const float32x4x2_t wv = load8_values<WT>(w, (r + m) * K + c);
      acc0[m] = vfmaq_f32(acc0[m], wv.val[0], x0);
      acc1[m] = vfmaq_f32(acc1[m], wv.val[1], x1);
    }
  }
  for (; c + 4 <= K; c += 4) {
    const float32x4_t x0 = vld1q_f32(x + c);
    for (int m = 0; m < MR; ++m) acc0[m] = vfmaq_f32(acc0[m], load4_values<WT>(w, (r + m) * K + c), x0);
  }
  float tail[MR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) tail[m] += load1_value<WT>(w, (r + m) * K + c) * x[c];
  for (int m = 0; m < MR; ++m) y[m] = vaddvq_f32(vaddq_f32(acc0[m], acc1[m])) + tail[m];
}

// Rows [r, r + MR) against tokens >= 2, in ceil(tokens / 4) passes of as equal a size as possible
// (9 tokens: 3 + 3 + 3, not 4 + 4 + 1: a 1-token pass has only MR FMA chains).
constexpr int kPassTokens = 4;
template <ValueType WT, int MR>
inline void rows_all_tokens(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx,
                            int64_t tokens, float* y, int64_t ldy) {
  const int64_t passes = (tokens + kPassTokens - 1) / kPassTokens;
  const int64_t base = passes > 0 ? tokens / passes : 0, longer = tokens - base * passes;
  int64_t n = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t size = base + (pass < longer ? 1 : 0);
    const float* xp = x + n * ldx;
    float* yp = y + n * ldy;
    switch (size) {
      case 4: tile<WT, MR, 4>(w, K, r, xp, ldx, yp, ldy); break;
      case 3: tile<WT, MR, 3>(w, K, r, xp, ldx, yp, ldy); break;
      case 2: tile<WT, MR, 2>(w, K, r, xp, ldx, yp, ldy); break;
      default: tile<WT, MR, 1>(w, K, r, xp, ldx, yp, ldy); break;
    }
    n += size;
  }
}

// Entry: rows [r0, r1) of W [rows, K] (f32 | bf16, row stride K) against x float [tokens, ldx];
// writes y float [tokens, ldy] at columns r - r0.
template <ValueType WT>
void gemv_4x4(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
              int64_t tokens, float* y, int64_t ldy) {
  int64_t r = r0;
  if (tokens == 1) {
    for (; r + 4 <= r1; r += 4) tile_1tok<WT, 4>(w, K, r, x, y + (r - r0));
    for (; r < r1; ++r) tile_1tok<WT, 1>(w, K, r, x, y + (r - r0));
    return;
  }
  for (; r + 4 <= r1; r += 4) rows_all_tokens<WT, 4>(w, K, r, x, ldx, tokens, y + (r - r0), ldy);
  switch (r1 - r) {
    case 3: rows_all_tokens<WT, 3>(w, K, r, x, ldx, tokens, y + (r - r0), ldy); break;
    case 2: rows_all_tokens<WT, 2>(w, K, r, x, ldx, tokens, y + (r - r0), ldy); break;
    case 1: rows_all_tokens<WT, 1>(w, K, r, x, ldx, tokens, y + (r - r0), ldy); break;
    default: break;
  }
}

// exp(x) for 4 lanes with the overflow behaviour of the scalar reference's std::exp: +inf exactly
// where x > kExpfMaxArg, NaN for NaN (FMAX/FMIN propagate it). Cephes range reduction
// x = n ln2 + r and the degree-5 polynomial of the x86 tiers (~1 ulp). n reaches 128 at the top of
// the range, one past the exponent field, so 2^n is applied as 2^(n >> 1) * 2^(n - (n >> 1)).
// Below -88.376 the result is clamped (a denormal, where expf goes on to 0): 1 + e rounds to 1
// either way, so SiLU cannot tell.
inline float32x4_t exp4(float32x4_t x) {
  const uint32x4_t overflow = vcgtq_f32(x, vdupq_n_f32(kExpfMaxArg));
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-88.3762626647949f)), vdupq_n_f32(kExpfMaxArg));
  const float32x4_t fx =
      vrndmq_f32(vfmaq_f32(vdupq_n_f32(0.5f), x, vdupq_n_f32(1.44269504088896341f)));
  x = vfmsq_f32(x, fx, vdupq_n_f32(0.693359375f));
  x = vfmsq_f32(x, fx, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t y = vdupq_n_f32(1.9875691500e-4f);
  y = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), y, x);
  y = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), y, x);
  y = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), y, x);
  y = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), y, x);
  y = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), y, x);
  y = vfmaq_f32(vaddq_f32(x, vdupq_n_f32(1.f)), y, vmulq_f32(x, x));
  const int32x4_t n = vcvtq_s32_f32(fx);
  const int32x4_t half = vshrq_n_s32(n, 1);
  const int32x4_t bias = vdupq_n_s32(127);
  const float32x4_t p0 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(half, bias), 23));
  const float32x4_t p1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vsubq_s32(n, half), bias), 23));
  y = vmulq_f32(vmulq_f32(y, p0), p1);
  return vbslq_f32(overflow, vdupq_n_f32(INFINITY), y);
}

// silu(g) = g / (1 + exp(-g)) with the reference's operations, so its non-finite cases follow
// without special lanes: g = -inf gives -inf / inf = NaN, g <= -88.73 gives -0 (1 + inf), g = inf
// gives inf, NaN stays NaN.
inline float32x4_t silu4(float32x4_t g) {
  return vdivq_f32(g, vaddq_f32(vdupq_n_f32(1.f), exp4(vnegq_f32(g))));
}

// h[i] = silu(g[i]) * u[i] (or silu(g[i]) when u == null).  g, u, h float [n]; h may alias g.
// The last n % 4 lanes run the same vector code through a zero-padded copy, so every position
// gives the same result for the same input.
void swiglu_neon(const float* g, const float* u, int64_t n, float* h) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    float32x4_t s = silu4(vld1q_f32(g + i));
    if (u != nullptr) s = vmulq_f32(s, vld1q_f32(u + i));
    vst1q_f32(h + i, s);
  }
  if (i < n) {
    float gt[4] = {}, ut[4] = {}, ht[4];
    const int64_t rest = n - i;
    for (int64_t j = 0; j < rest; ++j) {
      gt[j] = g[i + j];
      if (u != nullptr) ut[j] = u[i + j];
    }
    float32x4_t s = silu4(vld1q_f32(gt));
    if (u != nullptr) s = vmulq_f32(s, vld1q_f32(ut));
    vst1q_f32(ht, s);
    for (int64_t j = 0; j < rest; ++j) h[i + j] = ht[j];
  }
}

// Crossovers: not measured on ARM hardware (qemu timings mean nothing). They take the AVX2 tier's
// reasoning, whose shapes match this one (4-wide FMA tiles of a few rows x 4 tokens, a broadcast
// GEMM with packed panels): the GEMV re-reads every token row per 4-row block and wins while the
// tokens fit a couple of passes, measured up to ~48 rows per expert on x86, so 48 here. No cut to
// at::mm (0): with plan tuning on, the glue times the at::mm policy against these kernels on the
// real shapes, which is the right place to find where ARM's BLAS wins.
const MoeUkernels kF32 = {"f32-moegemv-4x4-neon",
                          gemv_4x4<ValueType::kF32>, 4, 4,
                          "f32-swiglu-4x1-neon", swiglu_neon,
                          "f32-moegemm-8x12-neon",
                          moe_gemm_f32_8x12_neon, 48, 0};
const MoeUkernels kBF16 = {"bf16-moegemv-4x4-neon",
                           gemv_4x4<ValueType::kBF16>, 4, 4,
                           "f32-swiglu-4x1-neon", swiglu_neon,
                           "bf16-moegemm-8x12-neon",
                           moe_gemm_bf16_8x12_neon, 48, 0};

}  // namespace

const MoeUkernels* moe_ukernels_neon(ValueType wt) {
  return wt == ValueType::kF32 ? &kF32 : &kBF16;
}

void moe_gemv_bf16_4x4_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemv_4x4<ValueType::kBF16>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

void moe_swiglu_neon(const float* g, const float* u, int64_t n, float* h) {
  swiglu_neon(g, u, n, h);
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const MoeUkernels* moe_ukernels_neon(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

// AVX2 + FMA expert GEMV ukernels. Compiled for every x86-64 build with a file-level target pragma
// and only called after the runtime check in isa.cpp.
//
// Register tile: MR weight rows x NR tokens of 8-wide accumulators. Each weight vector loaded from
// memory (f32, or bf16 widened to f32 in registers) feeds NR FMAs; the token rows (a few KB) stay
// in L1. Weight rows are streamed once per token group; with tokens <= NR that is exactly once
// from memory, further groups re-read the MR rows from L1/L2.
// Several tokens: 3 rows x 4 tokens. Measured on Zen 4 (H 1024, F 2816, 8 experts x 8 tokens, two
// threads) it beats 4x3, 2x4, 2x6, 6x2 and 1x8 by 1.1-1.5x: two passes instead of three for 8
// tokens, and the 3-row block plus 4 token rows stay in L1 between passes.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "../common/value_type.h"  // for common/avx2-values.h (included under the pragma)
#include "moe-exp.h"
#include "moe.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX2 1
#endif

#if SPARSE_EXT_COMPILE_AVX2
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "moe-avx2-weights.h"  // load8_weight, load1_weight, kWBytes; common/avx2-values.h

namespace sparse_ext {
namespace {

// y[n * ldy + m] = W[r + m, :] . x[n * ldx, :] for m < MR, n < NR.
// pf: the next row block; this pass prefetches its rows m with m % pf_mod == pf_rem into L2
// (T1: measured 1.1-1.2x faster than into L1 here, which leaves the L1 miss buffers to the
// passes' own loads).
template <ValueType WT, int MR, int NR>
inline void tile(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx, float* y,
                 int64_t ldy, const char* pf, int pf_mod = 1, int pf_rem = 0) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_setzero_ps();
  bool pf_row[MR];
  for (int m = 0; m < MR; ++m) pf_row[m] = m % pf_mod == pf_rem;
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    if (pf != nullptr && (c & (64 / kWBytes<WT> - 1)) == 0)
      for (int m = 0; m < MR; ++m)
        if (pf_row[m]) _mm_prefetch(pf + ((m * K + c) * kWBytes<WT>), _MM_HINT_T1);
    __m256 xv[NR];
    for (int n = 0; n < NR; ++n) xv[n] = _mm256_loadu_ps(x + n * ldx + c);
    for (int m = 0; m < MR; ++m) {
      const __m256 wv = load8_weight<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm256_fmadd_ps(wv, xv[n], acc[m][n]);
    }
  }
  float tail[MR][NR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) {
      const float wv = load1_weight<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) tail[m][n] += wv * x[n * ldx + c];
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[n * ldy + m] = hsum(acc[m][n]) + tail[m][n];
}

// One token (decode): two accumulator sets per row (K unrolled by 16) so 2*MR independent FMA
// chains hide the FMA latency while the weight rows stream. The next row block (pf) is prefetched
// into L2: measured 1.1x (fp32) and 1.2x (bf16) more bandwidth than the hardware prefetchers or
// prefetches into L1 reach alone.
template <ValueType WT, int MR>
inline void tile_1tok(const void* w, int64_t K, int64_t r, const float* x, float* y,
                      const char* pf) {
  __m256 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= K; c += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
    if (pf != nullptr && (WT == ValueType::kF32 || (c & 16) == 0))
      for (int m = 0; m < MR; ++m) _mm_prefetch(pf + ((m * K + c) * kWBytes<WT>), _MM_HINT_T1);
    for (int m = 0; m < MR; ++m) {
      acc0[m] = _mm256_fmadd_ps(load8_weight<WT>(w, (r + m) * K + c), x0, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(load8_weight<WT>(w, (r + m) * K + c + 8), x1, acc1[m]);
    }
  }
  for (; c + 8 <= K; c += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + c);
    for (int m = 0; m < MR; ++m)
      acc0[m] = _mm256_fmadd_ps(load8_weight<WT>(w, (r + m) * K + c), x0, acc0[m]);
  }
  float tail[MR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) tail[m] += load1_weight<WT>(w, (r + m) * K + c) * x[c];
  for (int m = 0; m < MR; ++m) y[m] = hsum(_mm256_add_ps(acc0[m], acc1[m])) + tail[m];
}

// One token, bf16 weights: a 256-bit load of 16 bf16 values widens to fp32 with two unpacks
// against zero (no cross-lane shuffles); the unpacks leave the values in the order
// [0..3, 8..11] and [4..7, 12..15], so x comes pre-permuted the same way (xp, see gemv_3x4).
// kSplit: two accumulator sets per row (low and high halves) so short row blocks still have
// 2*MR independent FMA chains; taller blocks (MR = 8) use one set.
template <int MR, bool kSplit>
inline void tile_1tok_bf16_unpack(const uint16_t* w, int64_t K, int64_t r, const float* xp,
                                  const float* x, float* y, const char* pf) {
  __m256 acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  const __m256i zero = _mm256_setzero_si256();
  const int64_t K16 = K / 16 * 16;
  for (int64_t c = 0; c < K16; c += 16) {
    const __m256 x0 = _mm256_loadu_ps(xp + c), x1 = _mm256_loadu_ps(xp + c + 8);
    if (pf != nullptr && (c & 16) == 0)
      for (int m = 0; m < MR; ++m) _mm_prefetch(pf + (m * K + c) * 2, _MM_HINT_T1);
    for (int m = 0; m < MR; ++m) {
      const __m256i v =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (r + m) * K + c));
      acc0[m] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, v)), x0, acc0[m]);
      __m256& hi = kSplit ? acc1[m] : acc0[m];
      hi = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, v)), x1, hi);
    }
  }
  float tail[MR] = {};
  for (int64_t c = K16; c < K; ++c)
    for (int m = 0; m < MR; ++m) tail[m] += bf16_to_float(w[(r + m) * K + c]) * x[c];
  for (int m = 0; m < MR; ++m)
    y[m] = hsum(kSplit ? _mm256_add_ps(acc0[m], acc1[m]) : acc0[m]) + tail[m];
}

// Rows [r, r + MR) against tokens >= 2, in ceil(tokens / 4) passes of as equal a size as
// possible (9 tokens: 3 + 3 + 3, not 4 + 4 + 1: a 1-token pass has only MR FMA chains and runs
// latency-bound). `pf` points at the next row block or is null at the end of the range; its rows
// are prefetched spread over the passes (pass i takes rows m % passes == i) so memory keeps
// streaming while later passes compute from L1.
constexpr int kPassTokens = 4;
template <ValueType WT, int MR>
inline void rows_all_tokens(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx,
                            int64_t tokens, float* y, int64_t ldy, const char* pf) {
  const int64_t passes = (tokens + kPassTokens - 1) / kPassTokens;
  const int64_t base = passes > 0 ? tokens / passes : 0, longer = tokens - base * passes;
  int64_t n = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t size = base + (pass < longer ? 1 : 0);
    const float* xp = x + n * ldx;
    float* yp = y + n * ldy;
    const int mod = static_cast<int>(passes), rem = static_cast<int>(pass);
    switch (size) {
      case 4: tile<WT, MR, 4>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 3: tile<WT, MR, 3>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 2: tile<WT, MR, 2>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      default: tile<WT, MR, 1>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
    }
    n += size;
  }
}

// Entry: rows [r0, r1) of W [rows, K] (f32 | bf16, row stride K) against x float [tokens, ldx];
// writes y float [tokens, ldy] at columns r - r0.
template <ValueType WT>
void gemv_3x4(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
              int64_t tokens, float* y, int64_t ldy) {
  const char* base = static_cast<const char*>(w);
  int64_t r = r0;
  if constexpr (WT == ValueType::kBF16) {
    if (tokens == 1 && K >= 16) {
      // xp: x permuted per 16-block to the unpack order [0..3, 8..11, 4..7, 12..15].
      std::vector<float> xp(static_cast<size_t>(K / 16 * 16));
      for (int64_t c = 0; c + 16 <= K; c += 16)
        for (int q = 0; q < 4; ++q) {
          xp[c + q] = x[c + q];
          xp[c + 4 + q] = x[c + 8 + q];
          xp[c + 8 + q] = x[c + 4 + q];
          xp[c + 12 + q] = x[c + 12 + q];
        }
      const uint16_t* wb = static_cast<const uint16_t*>(w);
      for (; r + 8 <= r1; r += 8) {
        const char* pf = r + 16 <= r1 ? base + (r + 8) * K * 2 : nullptr;
        tile_1tok_bf16_unpack<8, false>(wb, K, r, xp.data(), x, y + (r - r0), pf);
      }
      for (; r + 4 <= r1; r += 4) {
        const char* pf = r + 8 <= r1 ? base + (r + 4) * K * 2 : nullptr;
        tile_1tok_bf16_unpack<4, true>(wb, K, r, xp.data(), x, y + (r - r0), pf);
      }
      for (; r < r1; ++r)
        tile_1tok_bf16_unpack<1, true>(wb, K, r, xp.data(), x, y + (r - r0), nullptr);
      return;
    }
  }
  if (tokens == 1) {
    for (; r + 4 <= r1; r += 4) {
      const char* pf = r + 8 <= r1 ? base + (r + 4) * K * kWBytes<WT> : nullptr;
      tile_1tok<WT, 4>(w, K, r, x, y + (r - r0), pf);
    }
    for (; r < r1; ++r) tile_1tok<WT, 1>(w, K, r, x, y + (r - r0), nullptr);
    return;
  }
  constexpr int MR = 3;
  for (; r + MR <= r1; r += MR) {
    const char* pf = r + 2 * MR <= r1 ? base + (r + MR) * K * kWBytes<WT> : nullptr;
    rows_all_tokens<WT, MR>(w, K, r, x, ldx, tokens, y + (r - r0), ldy, pf);
  }
  if (r1 - r == 2) rows_all_tokens<WT, 2>(w, K, r, x, ldx, tokens, y + (r - r0), ldy, nullptr);
  if (r1 - r == 1) rows_all_tokens<WT, 1>(w, K, r, x, ldx, tokens, y + (r - r0), ldy, nullptr);
}

// exp(x) for 8 lanes: Cephes range reduction x = n ln2 + r, degree-5 polynomial in r (~1 ulp),
// 2^n through the exponent bits; inputs clamped to +-88.376 (no inf/NaN from the polynomial), then
// +inf where the reference's expf overflows (x > kExpfMaxArg).
inline __m256 exp8(__m256 x) {
  const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(kExpfMaxArg), _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)),
                    _mm256_set1_ps(88.3762626647949f));
  const __m256 fx = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2)), _mm256_set1_ps(INFINITY),
                          overflow);
}

// h[i] = silu(g[i]) * u[i] (or silu(g[i]) when u == null).  g, u, h float [n].
void swiglu_avx2(const float* g, const float* u, int64_t n, float* h) {
  const __m256 one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gv = _mm256_loadu_ps(g + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    // exp8 overflows where the reference's does, so silu(-inf) is -inf / inf = NaN and gates
    // below -88.73 give -0, as in the reference and in torch.
    __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    if (u != nullptr) s = _mm256_mul_ps(s, _mm256_loadu_ps(u + i));
    _mm256_storeu_ps(h + i, s);
  }
  if (i < n) moe_activate<float>(MoeActivation::kSilu, g + i, u != nullptr ? u + i : nullptr,
                                 n - i, h + i);
}

// Crossover 48 rows: measured on the AVX2 reference machine (H 1024, F 2816, 8 experts, two
// threads, weights from memory) the GEMV is 1.2-1.5x faster than the GEMM up to 24 rows per
// expert, 1.2x at 32, even at 48-64. No crossover to at::mm: there the GEMM ukernel beats MKL's
// per-expert GEMMs at every length (~195 against 130-165 GFLOP/s on two cores).
const MoeUkernels kF32 = {"f32-moegemv-3x4-avx2",
                          gemv_3x4<ValueType::kF32>, 3, 4,
                          "f32-swiglu-8x1-avx2", swiglu_avx2,
                          "f32-moegemm-6x16-avx2",
                          moe_gemm_f32_6x16_avx2, 48, 0};
const MoeUkernels kBF16 = {"bf16-moegemv-3x4-avx2",
                           gemv_3x4<ValueType::kBF16>, 3, 4,
                           "f32-swiglu-8x1-avx2", swiglu_avx2,
                           "bf16-moegemm-6x16-avx2",
                           moe_gemm_bf16_6x16_avx2, 48, 0};

}  // namespace

const MoeUkernels* moe_ukernels_avx2(ValueType wt) {
  return wt == ValueType::kF32 ? &kF32 : &kBF16;
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const MoeUkernels* moe_ukernels_avx2(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

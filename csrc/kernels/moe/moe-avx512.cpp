// AVX-512 (F + BW + VL + DQ) expert GEMV ukernels and the fused SwiGLU. Compiled for every x86-64
// build with a file-level target pragma and only called after the runtime check in isa.cpp.
//
// Against the AVX2 file: 16-wide accumulators and 32 registers, so an fp32 pass holds 3 rows x up
// to 8 tokens (the AVX2 tile: 4 tokens) and the 8 tokens per expert of a 32-token batch take one
// pass over each weight row instead of two. K tails are k-masked loads (no scalar tail loop).
// bf16 weights are widened without shuffles (a shift for the even-indexed weights, a mask for the
// odd ones) against x pre-permuted to that order once per call.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/bf16.h"
#include "../common/value_type.h"  // for common/avx512-values.h (included under the pragma)
#include "moe-exp.h"
#include "moe.h"

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

#include "moe-avx512-weights.h"

namespace sparse_ext {
namespace {

// Loops over a register tile's rows and tokens unroll completely: an accumulator array indexed in
// a loop GCC has not unrolled early stays in memory, and GCC 12 then stores every accumulator on
// every k step (seen in the generated code of the 3x8 and 4x4 tiles).
#define SE_UNROLL _Pragma("GCC unroll 16")

// y[m] = sum(acc[m]) for m < MR (MR <= 4): one reduction tree and one masked store (the padding
// past MR is never written). The accumulators come by value (SE_ROW_SUMS): a call that takes the
// accumulator array's address makes GCC keep it in memory and store it on every k step.
template <int MR>
inline void store_row_sums(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* y) {
  static_assert(MR >= 1 && MR <= 4, "one reduction tree sums up to 4 rows");
  const __m512 z = _mm512_setzero_ps();
  const __m128 s = reduce4(a0, MR > 1 ? a1 : z, MR > 2 ? a2 : z, MR > 3 ? a3 : z);
  _mm_mask_storeu_ps(y, static_cast<__mmask8>((1u << MR) - 1u), s);
}
#define SE_ROW_SUMS(MR, acc, y)                                                        \
  store_row_sums<MR>((acc)[0], (acc)[MR > 1 ? 1 : 0], (acc)[MR > 2 ? 2 : 0],           \
                     (acc)[MR > 3 ? 3 : 0], (y))

// ---- One token (decode) ----------------------------------------------------------------------
// fp32: rows [r, r + MR) of w against x; two accumulators per row (K unrolled by 32) so 2 * MR
// FMA chains hide the latency while the rows stream. pf: the next row block, prefetched into L2
// (as the AVX2 tile: the L1 miss buffers stay with the stream's own loads).
template <int MR>
inline void rows_1tok_f32(const float* w, int64_t K, int64_t r, const float* x, float* y,
                          const char* pf) {
  __m512 acc0[MR], acc1[MR];
  SE_UNROLL for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= K; c += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
    if (pf != nullptr)
      SE_UNROLL for (int m = 0; m < MR; ++m) {
        _mm_prefetch(pf + (m * K + c) * 4, _MM_HINT_T1);
        _mm_prefetch(pf + (m * K + c + 16) * 4, _MM_HINT_T1);
      }
    SE_UNROLL for (int m = 0; m < MR; ++m) {
      acc0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (r + m) * K + c), x0, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(w + (r + m) * K + c + 16), x1, acc1[m]);
    }
  }
  for (; c < K; c += 16) {
    const __mmask16 mask = first_lanes(std::min<int64_t>(16, K - c));
    const __m512 x0 = _mm512_maskz_loadu_ps(mask, x + c);
    SE_UNROLL for (int m = 0; m < MR; ++m)
      acc0[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, w + (r + m) * K + c), x0, acc0[m]);
  }
  SE_UNROLL for (int m = 0; m < MR; ++m) acc0[m] = _mm512_add_ps(acc0[m], acc1[m]);
  SE_ROW_SUMS(MR, acc0, y);
}

// bf16: 32 weights per row and step split into even / odd halves (two FMA chains per row);
// xs = x in even_odd_order.
template <int MR>
inline void rows_1tok_bf16(const uint16_t* w, int64_t K, int64_t r, const float* xs, float* y,
                           const char* pf) {
  __m512 acc0[MR], acc1[MR];
  SE_UNROLL for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < K; c += 32) {
    const __mmask32 mask = first_lanes32(K - c);
    const __m512 xe = _mm512_loadu_ps(xs + c), xo = _mm512_loadu_ps(xs + c + 16);
    if (pf != nullptr)
      SE_UNROLL for (int m = 0; m < MR; ++m) _mm_prefetch(pf + (m * K + c) * 2, _MM_HINT_T1);
    SE_UNROLL for (int m = 0; m < MR; ++m) {
      __m512 we, wo;
      load32_bf16_split(w + (r + m) * K + c, mask, &we, &wo);
      acc0[m] = _mm512_fmadd_ps(we, xe, acc0[m]);
      acc1[m] = _mm512_fmadd_ps(wo, xo, acc1[m]);
    }
  }
  SE_UNROLL for (int m = 0; m < MR; ++m) acc0[m] = _mm512_add_ps(acc0[m], acc1[m]);
  SE_ROW_SUMS(MR, acc0, y);
}

// ---- Several tokens ----------------------------------------------------------------------------
// y[n * ldy + m] = W[r + m, :] . x[n, :] for m < MR, n < NR: each weight vector (loaded once)
// feeds NR FMAs. fp32 steps 16 weights; bf16 steps 32 (even / odd split, xs rows of ldxs floats
// in even_odd_order). pf as in rows_1tok_*, rows m % pf_mod == pf_rem only (the caller spreads
// the prefetches of the next block over its passes).
template <int MR, int NR>
inline void tile_f32(const float* w, int64_t K, int64_t r, const float* x, int64_t ldx, float* y,
                     int64_t ldy, const char* pf, int pf_mod, int pf_rem) {
  __m512 acc[NR][MR];
  SE_UNROLL for (int n = 0; n < NR; ++n)
    SE_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
  bool pf_row[MR];
  SE_UNROLL for (int m = 0; m < MR; ++m) pf_row[m] = m % pf_mod == pf_rem;
  for (int64_t c = 0; c < K; c += 16) {
    const __mmask16 mask = first_lanes(std::min<int64_t>(16, K - c));
    if (pf != nullptr)
      SE_UNROLL for (int m = 0; m < MR; ++m)
        if (pf_row[m]) _mm_prefetch(pf + (m * K + c) * 4, _MM_HINT_T1);
    __m512 wv[MR];
    SE_UNROLL for (int m = 0; m < MR; ++m) wv[m] = _mm512_maskz_loadu_ps(mask, w + (r + m) * K + c);
    SE_UNROLL for (int n = 0; n < NR; ++n) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + n * ldx + c);
      SE_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_fmadd_ps(wv[m], xv, acc[n][m]);
    }
  }
  SE_UNROLL for (int n = 0; n < NR; ++n) SE_ROW_SUMS(MR, acc[n], y + n * ldy);
}

template <int MR, int NR>
inline void tile_bf16(const uint16_t* w, int64_t K, int64_t r, const float* xs, int64_t ldxs,
                      float* y, int64_t ldy, const char* pf, int pf_mod, int pf_rem) {
  __m512 acc[NR][MR];
  SE_UNROLL for (int n = 0; n < NR; ++n)
    SE_UNROLL for (int m = 0; m < MR; ++m) acc[n][m] = _mm512_setzero_ps();
  bool pf_row[MR];
  SE_UNROLL for (int m = 0; m < MR; ++m) pf_row[m] = m % pf_mod == pf_rem;
  for (int64_t c = 0; c < K; c += 32) {
    const __mmask32 mask = first_lanes32(K - c);
    if (pf != nullptr)
      SE_UNROLL for (int m = 0; m < MR; ++m)
        if (pf_row[m]) _mm_prefetch(pf + (m * K + c) * 2, _MM_HINT_T1);
    __m512 we[MR], wo[MR];
    SE_UNROLL for (int m = 0; m < MR; ++m)
      load32_bf16_split(w + (r + m) * K + c, mask, &we[m], &wo[m]);
    SE_UNROLL for (int n = 0; n < NR; ++n) {
      const __m512 xe = _mm512_loadu_ps(xs + n * ldxs + c);
      const __m512 xo = _mm512_loadu_ps(xs + n * ldxs + c + 16);
      SE_UNROLL for (int m = 0; m < MR; ++m)
        acc[n][m] = _mm512_fmadd_ps(wo[m], xo, _mm512_fmadd_ps(we[m], xe, acc[n][m]));
    }
  }
  SE_UNROLL for (int n = 0; n < NR; ++n) SE_ROW_SUMS(MR, acc[n], y + n * ldy);
}

// Register tiles (rows x tokens per pass), measured with one thread on the AVX-512 Xeon (weights
// in L2, 8 tokens, K 1024): fp32 3 x 8 (87 GFLOP/s) beats 4 x 6, 4 x 5, 4 x 8 and 2 x 8 (78-84);
// bf16 4 x 4 (two passes for 8 tokens, 81-85) beats 2 x 8 and 3 x 6 (56-59), whose two widened
// vectors per row leave fewer registers for accumulators.
template <ValueType WT>
constexpr int kTileRows = WT == ValueType::kF32 ? 3 : 4;
// Token pass sizes: at most kPassTokens per pass, passes as equal as possible (fp32, 9 tokens:
// 5 + 4, not 8 + 1: a 1-token pass has only MR FMA chains and runs latency-bound).
template <ValueType WT>
constexpr int kPassTokens = WT == ValueType::kF32 ? 8 : 4;

template <ValueType WT, int MR, int NR>
inline void tile(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx, float* y,
                 int64_t ldy, const char* pf, int pf_mod, int pf_rem) {
  if constexpr (WT == ValueType::kF32)
    tile_f32<MR, NR>(static_cast<const float*>(w), K, r, x, ldx, y, ldy, pf, pf_mod, pf_rem);
  else
    tile_bf16<MR, NR>(static_cast<const uint16_t*>(w), K, r, x, ldx, y, ldy, pf, pf_mod, pf_rem);
}

// Rows [r, r + MR) against all tokens, in ceil(tokens / kPassTokens) passes; `pf` (the next row
// block, or null) is prefetched spread over the passes so memory keeps streaming while later passes
// compute from L1. x: fp32 rows (f32 weights) or even_odd_order rows (bf16 weights), stride ldx.
template <ValueType WT, int MR>
inline void rows_all_tokens(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx,
                            int64_t tokens, float* y, int64_t ldy, const char* pf) {
  const int64_t passes = (tokens + kPassTokens<WT> - 1) / kPassTokens<WT>;
  const int64_t base = tokens / passes, longer = tokens - base * passes;
  const int mod = static_cast<int>(passes);
  int64_t n = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t size = base + (pass < longer ? 1 : 0);
    const float* xp = x + n * ldx;
    float* yp = y + n * ldy;
    const int rem = static_cast<int>(pass);
    switch (size) {
      case 8: tile<WT, MR, 8>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 7: tile<WT, MR, 7>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 6: tile<WT, MR, 6>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 5: tile<WT, MR, 5>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 4: tile<WT, MR, 4>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 3: tile<WT, MR, 3>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      case 2: tile<WT, MR, 2>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
      default: tile<WT, MR, 1>(w, K, r, xp, ldx, yp, ldy, pf, mod, rem); break;
    }
    n += size;
  }
}

// Entry (MoeGemvUkernel): rows [r0, r1) of W [rows, K] (f32 | bf16, row stride K) against
// x float [tokens, ldx]; writes y float [tokens, ldy] at columns r - r0.
template <ValueType WT>
void gemv(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
          int64_t tokens, float* y, int64_t ldy) {
  if (r1 <= r0 || tokens <= 0) return;
  const char* base = static_cast<const char*>(w);
  const int64_t row_bytes = K * kWBytes<WT>;
  // bf16: x rows in even_odd_order, per-thread scratch kept for the thread's lifetime.
  const float* xk = x;
  int64_t ldk = ldx;
  if constexpr (WT == ValueType::kBF16) {
    thread_local std::vector<float> scratch;
    ldk = (K + 31) / 32 * 32;
    if (scratch.size() < static_cast<size_t>(tokens * ldk))
      scratch.resize(static_cast<size_t>(tokens * ldk));
    for (int64_t n = 0; n < tokens; ++n) even_odd_order(x + n * ldx, K, scratch.data() + n * ldk);
    xk = scratch.data();
  }
  int64_t r = r0;
  if (tokens == 1) {
    constexpr int MR = 4;
    for (; r < r1; r += MR) {
      const char* pf = r + 2 * MR <= r1 ? base + (r + MR) * row_bytes : nullptr;
      float* yr = y + (r - r0);
      if constexpr (WT == ValueType::kF32) {
        const float* wf = static_cast<const float*>(w);
        switch (std::min<int64_t>(MR, r1 - r)) {
          case 4: rows_1tok_f32<4>(wf, K, r, x, yr, pf); break;
          case 3: rows_1tok_f32<3>(wf, K, r, x, yr, pf); break;
          case 2: rows_1tok_f32<2>(wf, K, r, x, yr, pf); break;
          default: rows_1tok_f32<1>(wf, K, r, x, yr, pf); break;
        }
      } else {
        const uint16_t* wb = static_cast<const uint16_t*>(w);
        switch (std::min<int64_t>(MR, r1 - r)) {
          case 4: rows_1tok_bf16<4>(wb, K, r, xk, yr, pf); break;
          case 3: rows_1tok_bf16<3>(wb, K, r, xk, yr, pf); break;
          case 2: rows_1tok_bf16<2>(wb, K, r, xk, yr, pf); break;
          default: rows_1tok_bf16<1>(wb, K, r, xk, yr, pf); break;
        }
      }
    }
    return;
  }
  constexpr int MR = kTileRows<WT>;
  for (; r + MR <= r1; r += MR) {
    const char* pf = r + 2 * MR <= r1 ? base + (r + MR) * row_bytes : nullptr;
    rows_all_tokens<WT, MR>(w, K, r, xk, ldk, tokens, y + (r - r0), ldy, pf);
  }
  if (r1 - r == 3) rows_all_tokens<WT, 3>(w, K, r, xk, ldk, tokens, y + (r - r0), ldy, nullptr);
  if (r1 - r == 2) rows_all_tokens<WT, 2>(w, K, r, xk, ldk, tokens, y + (r - r0), ldy, nullptr);
  if (r1 - r == 1) rows_all_tokens<WT, 1>(w, K, r, xk, ldk, tokens, y + (r - r0), ldy, nullptr);
}

// exp(x) for 16 lanes: the AVX2 file's Cephes reduction and polynomial (~1 ulp), with 2^n applied
// by vscalefps; inputs clamped to +-88.376 as there, then +inf where the reference's expf
// overflows (x > kExpfMaxArg).
inline __m512 exp16(__m512 x) {
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpfMaxArg), _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.3762626647949f)),
                    _mm512_set1_ps(88.3762626647949f));
  const __m512 fx = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_mask_mov_ps(_mm512_scalef_ps(y, fx), overflow, _mm512_set1_ps(INFINITY));
}

// h[i] = silu(g[i]) * u[i] (or silu(g[i]) when u == null).  g, u, h float [n]; the last block is
// k-masked.
void swiglu_avx512(const float* g, const float* u, int64_t n, float* h) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = first_lanes(std::min<int64_t>(16, n - i));
    const __m512 gv = _mm512_maskz_loadu_ps(mask, g + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
    // exp16 overflows where the reference's does, so silu(-inf) is -inf / inf = NaN and gates
    // below -88.73 give -0, as in the reference and in torch.
    __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
    if (u != nullptr) s = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, u + i));
    _mm512_mask_storeu_ps(h + i, mask, s);
  }
}

// Crossovers, measured on the AVX-512 Xeon (H 1024, F 2816, 8 experts, one thread, thread CPU
// time of the expert op): fp32 GEMV 1.1-1.4x faster than the GEMM up to 24 rows per expert, even
// at 32-48, the GEMM 1.1x faster at 64; bf16 GEMV 1.5x faster at 8 rows, even at 24, the GEMM
// 1.06x faster at 32 and 1.15x at 64 (the bf16 GEMV is compute-bound from ~8 tokens). The GEMM
// against at::mm per expert (same setup; bf16 weights converted to fp32 for it): fp32 1.16x
// faster at 64 rows, even at 128, 1.07x slower at 192 and 1.2-1.27x slower at 512, so segments
// past 160 rows go to at::mm; bf16 1.28x faster at 128 rows, 1.14x at 256, 1.08x slower at 512:
// past 384 rows.
const MoeUkernels kF32 = {"f32-moegemv-3x8-avx512",
                          gemv<ValueType::kF32>, 3, 8,
                          "f32-swiglu-16x1-avx512", swiglu_avx512,
                          "f32-moegemm-8x48-avx512",
                          moe_gemm_f32_8x48_avx512, 48, 160};
const MoeUkernels kBF16 = {"bf16-moegemv-4x4-avx512",
                           gemv<ValueType::kBF16>, 4, 4,
                           "f32-swiglu-16x1-avx512", swiglu_avx512,
                           "bf16-moegemm-8x48-avx512",
                           moe_gemm_bf16_8x48_avx512, 24, 384};

}  // namespace

#undef SE_ROW_SUMS
#undef SE_UNROLL

const MoeUkernels* moe_ukernels_avx512(ValueType wt) {
  return wt == ValueType::kF32 ? &kF32 : &kBF16;
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const MoeUkernels* moe_ukernels_avx512(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

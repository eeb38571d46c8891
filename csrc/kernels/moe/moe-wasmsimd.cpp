// WebAssembly SIMD128 expert GEMV / GEMM and SwiGLU ukernels. Compiled only when the build targets
// SIMD128 (__wasm_simd128__); elsewhere moe_ukernels_wasmsimd returns nullptr. No FMA in SIMD128:
// products are mul + add (muladd).
//
// Register tiles keep 8 accumulators: engines map v128 onto the host's vector registers, 16 xmm
// on x86-64, and the tile's operand vectors need the rest.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../common/bf16.h"
#include "moe-exp.h"
#include "moe.h"

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>

#include "../common/wasmsimd-values.h"

namespace sparse_ext {
namespace {

// ---- GEMV: rows of W (contiguous along K) against a few token rows ------------------------------
// y[n * ldy + m] = W[r + m, :] . x[n * ldx, :] for m < MR, n < NR: each 4-wide weight vector feeds
// NR products, so W streams from memory once per pass of NR tokens.
template <ValueType WT, int MR, int NR>
inline void gemv_tile(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx, float* y,
                      int64_t ldy) {
  v128_t acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = wasm_f32x4_splat(0.f);
  int64_t c = 0;
  for (; c + 4 <= K; c += 4) {
    v128_t xv[NR];
    for (int n = 0; n < NR; ++n) xv[n] = wasm_v128_load(x + n * ldx + c);
    for (int m = 0; m < MR; ++m) {
      const v128_t wv = load4_values<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) acc[m][n] = muladd(acc[m][n], wv, xv[n]);
    }
  }
  float tail[MR][NR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) {
      const float wv = load1_value<WT>(w, (r + m) * K + c);
      for (int n = 0; n < NR; ++n) tail[m][n] += wv * x[n * ldx + c];
    }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) y[n * ldy + m] = hsum(acc[m][n]) + tail[m][n];
}

// One token (decode): two accumulator sets per row (K unrolled by 8), 2 * MR independent chains.
template <ValueType WT, int MR>
inline void gemv_1tok(const void* w, int64_t K, int64_t r, const float* x, float* y) {
  v128_t acc0[MR], acc1[MR];
  for (int m = 0; m < MR; ++m) acc0[m] = acc1[m] = wasm_f32x4_splat(0.f);
  int64_t c = 0;
  for (; c + 8 <= K; c += 8) {
    const v128_t x0 = wasm_v128_load(x + c), x1 = wasm_v128_load(x + c + 4);
    for (int m = 0; m < MR; ++m) {
      acc0[m] = muladd(acc0[m], load4_values<WT>(w, (r + m) * K + c), x0);
      acc1[m] = muladd(acc1[m], load4_values<WT>(w, (r + m) * K + c + 4), x1);
    }
  }
  for (; c + 4 <= K; c += 4) {
    const v128_t x0 = wasm_v128_load(x + c);
    for (int m = 0; m < MR; ++m)
      acc0[m] = muladd(acc0[m], load4_values<WT>(w, (r + m) * K + c), x0);
  }
  float tail[MR] = {};
  for (; c < K; ++c)
    for (int m = 0; m < MR; ++m) tail[m] += load1_value<WT>(w, (r + m) * K + c) * x[c];
  for (int m = 0; m < MR; ++m) y[m] = hsum(wasm_f32x4_add(acc0[m], acc1[m])) + tail[m];
}

// Rows [r, r + MR) against every token, in passes of up to 4 tokens of as equal a size as
// possible (a 1-token pass after 4 + 4 would have only MR chains).
template <ValueType WT, int MR>
inline void gemv_rows(const void* w, int64_t K, int64_t r, const float* x, int64_t ldx,
                      int64_t tokens, float* y, int64_t ldy) {
  const int64_t passes = (tokens + 3) / 4;
  const int64_t base = passes > 0 ? tokens / passes : 0, longer = tokens - base * passes;
  int64_t n = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t size = base + (pass < longer ? 1 : 0);
    const float* xp = x + n * ldx;
    float* yp = y + n * ldy;
    switch (size) {
      case 4: gemv_tile<WT, MR, 4>(w, K, r, xp, ldx, yp, ldy); break;
      case 3: gemv_tile<WT, MR, 3>(w, K, r, xp, ldx, yp, ldy); break;
      case 2: gemv_tile<WT, MR, 2>(w, K, r, xp, ldx, yp, ldy); break;
      default: gemv_tile<WT, MR, 1>(w, K, r, xp, ldx, yp, ldy); break;
    }
    n += size;
  }
}

// Entry: rows [r0, r1) of W [rows, K] (f32 | bf16, row stride K) against x float [tokens, ldx];
// writes y float [tokens, ldy] at columns r - r0.
template <ValueType WT>
void gemv_2x4(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
              int64_t tokens, float* y, int64_t ldy) {
  if (tokens == 0) return;  // nothing to write; y may be empty (null), no pointer math on it
  int64_t r = r0;
  if (tokens == 1) {
    for (; r + 4 <= r1; r += 4) gemv_1tok<WT, 4>(w, K, r, x, y + (r - r0));
    for (; r < r1; ++r) gemv_1tok<WT, 1>(w, K, r, x, y + (r - r0));
    return;
  }
  for (; r + 2 <= r1; r += 2) gemv_rows<WT, 2>(w, K, r, x, ldx, tokens, y + (r - r0), ldy);
  if (r < r1) gemv_rows<WT, 1>(w, K, r, x, ldx, tokens, y + (r - r0), ldy);
}

// ---- GEMM (long segments): 8 weight rows packed column-major, broadcast tokens ------------------
// A panel holds rows [r, r + 8) of a K block as panel[c * 8 + m] (zero rows past r1), so one
// column is two vectors of row lanes; each token's x[n, c] is broadcast against them. Tile: 4
// tokens x 8 rows = 8 accumulators; y rows (8 consecutive outputs of a token) store as vectors.
constexpr int kGemmRows = 8, kGemmTokens = 4;
constexpr int64_t kGemmKBlock = 256;  // panel 8 KB: stays in L1 while every token pass reuses it

template <int NT>
inline void gemm_tile(const float* panel, int64_t kc, const float* x, int64_t ldx, int rows,
                      float* y, int64_t ldy, bool accumulate) {
  v128_t acc[NT][2];
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = wasm_f32x4_splat(0.f);
  for (int64_t c = 0; c < kc; ++c) {
    const v128_t w0 = wasm_v128_load(panel + c * kGemmRows);
    const v128_t w1 = wasm_v128_load(panel + c * kGemmRows + 4);
    for (int n = 0; n < NT; ++n) {
      const v128_t xb = wasm_v128_load32_splat(x + n * ldx + c);
      acc[n][0] = muladd(acc[n][0], w0, xb);
      acc[n][1] = muladd(acc[n][1], w1, xb);
    }
  }
  for (int n = 0; n < NT; ++n) {
    float* yr = y + n * ldy;
    if (rows == kGemmRows) {
      if (accumulate) {
        acc[n][0] = wasm_f32x4_add(acc[n][0], wasm_v128_load(yr));
        acc[n][1] = wasm_f32x4_add(acc[n][1], wasm_v128_load(yr + 4));
      }
      wasm_v128_store(yr, acc[n][0]);
      wasm_v128_store(yr + 4, acc[n][1]);
    } else {  // the last row block: only `rows` outputs exist in y
      float out[kGemmRows];
      wasm_v128_store(out, acc[n][0]);
      wasm_v128_store(out + 4, acc[n][1]);
      for (int m = 0; m < rows; ++m) yr[m] = accumulate ? yr[m] + out[m] : out[m];
    }
  }
}

// Entry: the MoeGemvUkernel contract (see moe.h).
template <ValueType WT>
void gemm_4x8(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
              int64_t tokens, float* y, int64_t ldy) {
  if (tokens == 0) return;  // nothing to write; y may be empty (null), no pointer math on it
  if (K == 0) {
    for (int64_t n = 0; n < tokens; ++n)
      for (int64_t r = r0; r < r1; ++r) y[n * ldy + (r - r0)] = 0.f;
    return;
  }
  std::vector<float> panel(static_cast<size_t>(kGemmKBlock * kGemmRows));
  for (int64_t r = r0; r < r1; r += kGemmRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kGemmRows, r1 - r));
    for (int64_t k0 = 0; k0 < K; k0 += kGemmKBlock) {
      const int64_t kc = std::min(kGemmKBlock, K - k0);
      for (int64_t c = 0; c < kc; ++c)
        for (int m = 0; m < kGemmRows; ++m)
          panel[c * kGemmRows + m] = m < rows ? load1_value<WT>(w, (r + m) * K + k0 + c) : 0.f;
      const bool accumulate = k0 > 0;
      int64_t n = 0;
      float* yb = y + (r - r0);
      for (; n + kGemmTokens <= tokens; n += kGemmTokens)
        gemm_tile<4>(panel.data(), kc, x + n * ldx + k0, ldx, rows, yb + n * ldy, ldy, accumulate);
      const float* xn = x + n * ldx + k0;
      float* yn = yb + n * ldy;
      switch (tokens - n) {
        case 3: gemm_tile<3>(panel.data(), kc, xn, ldx, rows, yn, ldy, accumulate); break;
        case 2: gemm_tile<2>(panel.data(), kc, xn, ldx, rows, yn, ldy, accumulate); break;
        case 1: gemm_tile<1>(panel.data(), kc, xn, ldx, rows, yn, ldy, accumulate); break;
        default: break;
      }
    }
  }
}

// ---- SwiGLU -------------------------------------------------------------------------------------
// exp(x) for 4 lanes: Cephes range reduction x = n ln2 + r (ln2 split in two so n * hi is exact
// without FMA), degree-5 polynomial in r (~1 ulp), 2^n through the exponent bits; inputs clamped
// to +-88.376 (no inf from the polynomial; NaN stays NaN through f32x4.min / max), then +inf where
// the reference's expf overflows (x > kExpfMaxArg).
inline v128_t exp4(v128_t x) {
  const v128_t overflow = wasm_f32x4_gt(x, wasm_f32x4_splat(kExpfMaxArg));
  x = wasm_f32x4_min(wasm_f32x4_max(x, wasm_f32x4_splat(-88.3762626647949f)),
                     wasm_f32x4_splat(88.3762626647949f));
  const v128_t fx = wasm_f32x4_floor(
      muladd(wasm_f32x4_splat(0.5f), x, wasm_f32x4_splat(1.44269504088896341f)));
  x = wasm_f32x4_sub(x, wasm_f32x4_mul(fx, wasm_f32x4_splat(0.693359375f)));
  x = wasm_f32x4_sub(x, wasm_f32x4_mul(fx, wasm_f32x4_splat(-2.12194440e-4f)));
  v128_t p = wasm_f32x4_splat(1.9875691500e-4f);
  p = muladd(wasm_f32x4_splat(1.3981999507e-3f), p, x);
  p = muladd(wasm_f32x4_splat(8.3334519073e-3f), p, x);
  p = muladd(wasm_f32x4_splat(4.1665795894e-2f), p, x);
  p = muladd(wasm_f32x4_splat(1.6666665459e-1f), p, x);
  p = muladd(wasm_f32x4_splat(5.0000001201e-1f), p, x);
  p = muladd(wasm_f32x4_add(x, wasm_f32x4_splat(1.f)), p, wasm_f32x4_mul(x, x));
  const v128_t pow2 =
      wasm_i32x4_shl(wasm_i32x4_add(wasm_i32x4_trunc_sat_f32x4(fx), wasm_i32x4_splat(127)), 23);
  return wasm_v128_bitselect(wasm_f32x4_splat(INFINITY), wasm_f32x4_mul(p, pow2), overflow);
}

// h[i] = silu(g[i]) * u[i] (or silu(g[i]) when u == null).  g, u, h float [n].
void swiglu(const float* g, const float* u, int64_t n, float* h) {
  const v128_t one = wasm_f32x4_splat(1.f);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const v128_t gv = wasm_v128_load(g + i);
    // exp4 overflows where the reference's does, so silu(-inf) is -inf / inf = NaN and gates
    // below -88.73 give -0, as in the reference and in torch.
    v128_t s = wasm_f32x4_div(gv, wasm_f32x4_add(one, exp4(wasm_f32x4_neg(gv))));
    if (u != nullptr) s = wasm_f32x4_mul(s, wasm_v128_load(u + i));
    wasm_v128_store(h + i, s);
  }
  if (i < n)
    moe_activate<float>(MoeActivation::kSilu, g + i, u != nullptr ? u + i : nullptr, n - i, h + i);
}

// The GEMV serves segments up to 16 tokens, the GEMM longer ones; nothing is handed to a BLAS
// (gemm_max_rows 0): the torch-free wasm build has none. Nominal: the ATen glue that reads these
// never runs on wasm.
const MoeUkernels kF32 = {"f32-moegemv-2x4-wasmsimd",
                          gemv_2x4<ValueType::kF32>, 2, 4,
                          "f32-swiglu-4x1-wasmsimd", swiglu,
                          "f32-moegemm-4x8-wasmsimd",
                          gemm_4x8<ValueType::kF32>, 16, 0};
const MoeUkernels kBF16 = {"bf16-moegemv-2x4-wasmsimd",
                           gemv_2x4<ValueType::kBF16>, 2, 4,
                           "f32-swiglu-4x1-wasmsimd", swiglu,
                           "bf16-moegemm-4x8-wasmsimd",
                           gemm_4x8<ValueType::kBF16>, 16, 0};

}  // namespace

const MoeUkernels* moe_ukernels_wasmsimd(ValueType wt) {
  return wt == ValueType::kF32 ? &kF32 : &kBF16;
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const MoeUkernels* moe_ukernels_wasmsimd(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

// AVX-512 expert GEMM ukernel for long segments (prefill), same contract as the GEMV ukernels
// (moe.h, MoeGemvUkernel):
//   y[n * ldy + (r - r0)] = W[r, :] . x[n * ldx, :]   for r in [r0, r1), n < tokens
//   w  f32 | bf16 [rows, K]   x  float [tokens, ldx]   y  float [tokens, ldy]
//
// W's rows are packed 48 at a time into fp32 panels [k][48] (bf16 widened once, while packing;
// 16x16 in-register transposes), one K block at a time: a [kBlockK][48] block (24 KB) is packed
// into L1 and then used by every token tile before the next block is packed, so the panel never
// streams from L2. The register tile is 8 tokens x 48 rows: per k, 3 panel vectors and 8
// broadcasts of x feed 24 FMAs into 24 zmm accumulators, no horizontal sums. The glue's work items
// are 48 rows wide (moe_ops.cpp), so an item is one panel. Measured on the AVX-512 Xeon, one
// thread, 48 rows x 64-256 tokens: 150-158 GFLOP/s at K 1024, 130-135 at K 2816 (MKL's sgemm on
// the expert's whole matrix: 120-157 and 126-161). Tried and not faster: prefetching the next K
// block's weight rows into L2 (1.2x slower below 64 tokens, the hardware prefetchers already
// stream them), prefetching the next token tile's x block, K blocks of 64, 192 or 256.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common/bf16.h"
#include "../common/value_type.h"  // for moe-avx512-weights.h (included under the pragma)
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

constexpr int kPanelVecs = 3;                 // zmm vectors per panel row
constexpr int kPanelRows = 16 * kPanelVecs;   // W rows per panel
constexpr int kTileTokens = 8;                // 8 x 3 accumulators + 3 panel vectors + 1 = 28 zmm
constexpr int64_t kBlockK = 128;              // k per packed block: 128 x 48 floats = 24 KB (L1)

// In-register transpose: v[i] lane j becomes v[j] lane i.
inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  // v[4i + q], 128-bit lane L: rows 4i..4i+3 at column 4L + q.
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512 u0 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0x88);
    const __m512 u1 = _mm512_shuffle_f32x4(v[q], v[4 + q], 0xDD);
    const __m512 u2 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0x88);
    const __m512 u3 = _mm512_shuffle_f32x4(v[8 + q], v[12 + q], 0xDD);
    t[q] = _mm512_shuffle_f32x4(u0, u2, 0x88);
    t[8 + q] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
    t[4 + q] = _mm512_shuffle_f32x4(u1, u3, 0x88);
    t[12 + q] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = t[i];
}

// block float [kc][48]: block[k * 48 + j] = W[r + j, k0 + k] for j < rows (<= 48), k < kc;
// columns j >= rows of vectors that hold a row are zero, vectors past ceil(rows / 16) unwritten.
// Loads are k-masked: nothing past row r + rows - 1 or column k0 + kc - 1 is read.
template <ValueType WT>
void pack_block(const void* w, int64_t K, int64_t r, int64_t rows, int64_t k0, int64_t kc,
                float* block) {
  for (int64_t j0 = 0; j0 < rows; j0 += 16) {
    const int64_t jn = std::min<int64_t>(16, rows - j0);
    for (int64_t c = 0; c < kc; c += 16) {
      const int64_t cn = std::min<int64_t>(16, kc - c);
      const __mmask16 mask = first_lanes(cn);
      __m512 v[16];
      for (int64_t j = 0; j < 16; ++j)
        v[j] = j < jn ? load16_weight<WT>(w, (r + j0 + j) * K + k0 + c, mask)
                      : _mm512_setzero_ps();
      transpose16(v);
      for (int64_t q = 0; q < cn; ++q) _mm512_storeu_ps(block + (c + q) * kPanelRows + j0, v[q]);
    }
  }
}

// y[i * ldy + j] (+)= sum_{k < kc} x[i * ldx + k] * block[k * 48 + j] for i < MR, j < cols
// (16 * (NV - 1) < cols <= 16 * NV); the last vector's store is masked to cols.
template <int NV, int MR>
inline void block_tile(const float* block, int64_t kc, const float* x, int64_t ldx, float* y,
                       int64_t ldy, int64_t cols, bool accumulate) {
  const __mmask16 last = first_lanes(cols - 16 * (NV - 1));
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = accumulate
                      ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF),
                                              y + i * ldy + 16 * v)
                      : _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m512 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_ps(block + k * kPanelRows + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * ldx + k]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      _mm512_mask_storeu_ps(y + i * ldy + 16 * v, v == NV - 1 ? last : __mmask16(0xFFFF),
                            acc[i][v]);
}

template <int NV>
inline void block_tokens(const float* block, int64_t kc, const float* x, int64_t ldx,
                         int64_t tokens, float* y, int64_t ldy, int64_t cols, bool accumulate) {
  for (int64_t n = 0; n < tokens; n += kTileTokens) {
    const float* xn = x + n * ldx;
    float* yn = y + n * ldy;
    switch (std::min<int64_t>(kTileTokens, tokens - n)) {
      case 8: block_tile<NV, 8>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 7: block_tile<NV, 7>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 6: block_tile<NV, 6>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 5: block_tile<NV, 5>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 4: block_tile<NV, 4>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 3: block_tile<NV, 3>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      case 2: block_tile<NV, 2>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
      default: block_tile<NV, 1>(block, kc, xn, ldx, yn, ldy, cols, accumulate); break;
    }
  }
}

template <ValueType WT>
void gemm_8x48(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
               int64_t tokens, float* y, int64_t ldy) {
  if (r1 <= r0 || tokens <= 0) return;
  alignas(64) float block[kBlockK * kPanelRows];
  for (int64_t r = r0; r < r1; r += kPanelRows) {
    const int64_t cols = std::min<int64_t>(kPanelRows, r1 - r);
    float* yr = y + (r - r0);
    if (K == 0) {
      for (int64_t n = 0; n < tokens; ++n) std::memset(yr + n * ldy, 0, cols * sizeof(float));
      continue;
    }
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      const int64_t kc = std::min<int64_t>(kBlockK, K - k0);
      pack_block<WT>(w, K, r, cols, k0, kc, block);
      const bool acc = k0 > 0;
      switch ((cols + 15) / 16) {
        case 3: block_tokens<3>(block, kc, x + k0, ldx, tokens, yr, ldy, cols, acc); break;
        case 2: block_tokens<2>(block, kc, x + k0, ldx, tokens, yr, ldy, cols, acc); break;
        default: block_tokens<1>(block, kc, x + k0, ldx, tokens, yr, ldy, cols, acc); break;
      }
    }
  }
}

}  // namespace

void moe_gemm_f32_8x48_avx512(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                              int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_8x48<ValueType::kF32>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

void moe_gemm_bf16_8x48_avx512(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                               int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_8x48<ValueType::kBF16>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

}  // namespace sparse_ext

#pragma GCC pop_options
#endif

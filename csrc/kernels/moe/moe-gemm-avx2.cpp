// AVX2 + FMA expert GEMM ukernel for long segments (prefill), same contract as the GEMV ukernels
// (moe.h, MoeGemvUkernel):
//   y[n * ldy + (r - r0)] = W[r, :] . x[n * ldx, :]   for r in [r0, r1), n < tokens
//   w  f32 | bf16 [rows, K]   x  float [tokens, ldx]   y  float [tokens, ldy]
//
// Why a second kernel: the GEMV tiles are dot products (one horizontal sum per row x token) that
// re-read every token row for every 3-row block, which is right for a few tokens and loses to this
// kernel past ~48 (moe_ops.cpp, gemv_rows). Here W's rows are packed 16 at a time into fp32
// panels [K][16] (bf16 widened once, while packing), and a 6-token x 16-row register tile
// broadcasts one x value per token and k against two panel vectors: 12 FMAs per 2 loads + 6
// broadcasts, no horizontal sums. A panel (16 x K floats, 64 KB at K 1024) streams from L2, the 6
// token rows (6 x K floats) stay in L1.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "../common/value_type.h"  // for moe-avx2-weights.h (included under the pragma)
#include "moe.h"

#if defined(__x86_64__) || defined(_M_X64)
#define SPARSE_EXT_COMPILE_AVX2 1
#endif

#if SPARSE_EXT_COMPILE_AVX2
#include <immintrin.h>
#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "moe-avx2-weights.h"

namespace sparse_ext {
namespace {

constexpr int kPanelRows = 16;  // W rows per packed panel (two 8-wide vectors)
constexpr int kTileTokens = 6;  // tokens per register tile: 6 x 2 accumulators + 2 + 1 = 15 ymm

// In-register transpose of 8 vectors (rows) into 8 vectors (columns).
inline void transpose8(__m256 v[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
  const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
  const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
  const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  v[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  v[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  v[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  v[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  v[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  v[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  v[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  v[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// panel float [K][16]: panel[k * 16 + j] = W[r + j, k] for j < rows (<= 16), 0 for j >= rows.
template <ValueType WT>
void pack_panel(const void* w, int64_t K, int64_t r, int64_t rows, float* panel) {
  for (int half = 0; half < 2; ++half) {
    const int64_t j0 = half * 8;
    const int64_t hr = std::min<int64_t>(8, std::max<int64_t>(0, rows - j0));
    int64_t c = 0;
    if (hr == 8) {
      for (; c + 8 <= K; c += 8) {
        __m256 v[8];
        for (int j = 0; j < 8; ++j) v[j] = load8_weight<WT>(w, (r + j0 + j) * K + c);
        transpose8(v);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(panel + (c + q) * kPanelRows + j0, v[q]);
      }
    }
    for (; c < K; ++c)
      for (int64_t j = 0; j < 8; ++j)
        panel[c * kPanelRows + j0 + j] = j < hr ? load1_weight<WT>(w, (r + j0 + j) * K + c) : 0.f;
  }
}

// y[i * ldy + j] = sum_k x[i * ldx + k] * panel[k * 16 + j] for i < MR, j < cols (<= 16).
template <int MR>
inline void panel_tile(const float* panel, int64_t K, const float* x, int64_t ldx, float* y,
                       int64_t ldy, int64_t cols) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanelRows);
    const __m256 b1 = _mm256_loadu_ps(panel + k * kPanelRows + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  if (cols == kPanelRows) {
    for (int i = 0; i < MR; ++i) {
      _mm256_storeu_ps(y + i * ldy, c0[i]);
      _mm256_storeu_ps(y + i * ldy + 8, c1[i]);
    }
  } else {
    // Masked stores, not a copy through memory: a loop that takes the accumulators' address
    // makes GCC keep them in memory and store them on every k step.
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols)), lane);
    const __m256i mask1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cols) - 8), lane);
    for (int i = 0; i < MR; ++i) {
      _mm256_maskstore_ps(y + i * ldy, mask0, c0[i]);
      _mm256_maskstore_ps(y + i * ldy + 8, mask1, c1[i]);
    }
  }
}

template <ValueType WT>
void gemm_6x16(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
               int64_t tokens, float* y, int64_t ldy) {
  if (r1 <= r0 || tokens <= 0) return;
  const int64_t rows = r1 - r0;
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  // Per-thread scratch, reused across calls and kept for the thread's lifetime: panels x [K][16]
  // floats (540 KB for the glue's 48-row items at K 2816).
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(panels * K * kPanelRows);
  if (scratch.size() < need) scratch.resize(need);
  float* packed = scratch.data();
  for (int64_t p = 0; p < panels; ++p)
    pack_panel<WT>(w, K, r0 + p * kPanelRows, std::min<int64_t>(kPanelRows, rows - p * kPanelRows),
                   packed + p * K * kPanelRows);
  // Token tiles outer: a tile's 6 x rows stay in L1 across all panels (from L2).
  for (int64_t n = 0; n < tokens; n += kTileTokens) {
    const float* xn = x + n * ldx;
    for (int64_t p = 0; p < panels; ++p) {
      const float* panel = packed + p * K * kPanelRows;
      const int64_t cols = std::min<int64_t>(kPanelRows, rows - p * kPanelRows);
      float* yp = y + n * ldy + p * kPanelRows;
      switch (std::min<int64_t>(kTileTokens, tokens - n)) {
        case 6: panel_tile<6>(panel, K, xn, ldx, yp, ldy, cols); break;
        case 5: panel_tile<5>(panel, K, xn, ldx, yp, ldy, cols); break;
        case 4: panel_tile<4>(panel, K, xn, ldx, yp, ldy, cols); break;
        case 3: panel_tile<3>(panel, K, xn, ldx, yp, ldy, cols); break;
        case 2: panel_tile<2>(panel, K, xn, ldx, yp, ldy, cols); break;
        default: panel_tile<1>(panel, K, xn, ldx, yp, ldy, cols); break;
      }
    }
  }
}

}  // namespace

void moe_gemm_f32_6x16_avx2(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_6x16<ValueType::kF32>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

void moe_gemm_bf16_6x16_avx2(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                             int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_6x16<ValueType::kBF16>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

}  // namespace sparse_ext

#pragma GCC pop_options
#endif

// ARM NEON expert GEMM ukernel for long segments (prefill), same contract as the GEMV ukernels
// (moe.h, MoeGemvUkernel):
//   y[n * ldy + (r - r0)] = W[r, :] . x[n * ldx, :]   for r in [r0, r1), n < tokens
//   w  f32 | bf16 [rows, K]   x  float [tokens, ldx]   y  float [tokens, ldy]
//
// Why a second kernel: the GEMV tiles are dot products (one horizontal sum per row x token) that
// re-read every token row for every 4-row block. Here W's rows are packed 12 at a time into fp32
// panels [K][12] (bf16 widened once, while packing) and 8 tokens are packed per 256-wide K block
// into [256][8]; an 8-token x 12-row register tile (24 accumulators) takes per k three panel
// vectors and two token vectors and multiplies by lane (FMLA by element): 24 FMAs per 5 loads, no
// broadcasts, no horizontal sums. A K block of the token tile (8 KB) stays in L1 while the 12 KB
// panel blocks of every panel stream past it; 20 KB fits the 64 KB L1 of current Arm server cores.
// Sizes are reasoned, not measured: qemu timings mean nothing.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/bf16.h"
#include "../common/value_type.h"
#include "moe.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include "../common/neon-values.h"  // load4_values, load1_value

namespace sparse_ext {
namespace {

constexpr int kPanelRows = 12;   // W rows per packed panel (three 4-wide vectors)
constexpr int kTileTokens = 8;   // tokens per register tile (two 4-wide vectors)
constexpr int64_t kKBlock = 256;  // K columns per packed token block

// Columns of 4 rows: in-register 4x4 transpose.
inline void transpose4(float32x4_t v[4]) {
  const float32x4_t t0 = vtrn1q_f32(v[0], v[1]), t1 = vtrn2q_f32(v[0], v[1]);
  const float32x4_t t2 = vtrn1q_f32(v[2], v[3]), t3 = vtrn2q_f32(v[2], v[3]);
  v[0] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  v[1] = vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
  v[2] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t0), vreinterpretq_f64_f32(t2)));
  v[3] = vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(t1), vreinterpretq_f64_f32(t3)));
}

// panel float [K][12]: panel[k * 12 + j] = W[r + j, k] for j < rows (<= 12), 0 for j >= rows.
template <ValueType WT>
void pack_panel(const void* w, int64_t K, int64_t r, int64_t rows, float* panel) {
  for (int64_t j0 = 0; j0 < kPanelRows; j0 += 4) {
    const int64_t hr = std::min<int64_t>(4, std::max<int64_t>(0, rows - j0));
    int64_t c = 0;
    if (hr == 4) {
      for (; c + 4 <= K; c += 4) {
        float32x4_t v[4];
        for (int j = 0; j < 4; ++j) v[j] = load4_values<WT>(w, (r + j0 + j) * K + c);
        transpose4(v);
        for (int q = 0; q < 4; ++q) vst1q_f32(panel + (c + q) * kPanelRows + j0, v[q]);
      }
    }
    for (; c < K; ++c)
      for (int64_t j = 0; j < 4; ++j)
        panel[c * kPanelRows + j0 + j] = j < hr ? load1_value<WT>(w, (r + j0 + j) * K + c) : 0.f;
  }
}

// xp float [kc][8]: xp[k * 8 + i] = x[i * ldx + k0 + k] for i < tokens (<= 8), 0 beyond.
void pack_tokens(const float* x, int64_t ldx, int64_t tokens, int64_t k0, int64_t kc, float* xp) {
  for (int64_t i0 = 0; i0 < kTileTokens; i0 += 4) {
    int64_t k = 0;
    if (i0 + 4 <= tokens) {
      for (; k + 4 <= kc; k += 4) {
        float32x4_t v[4];
        for (int i = 0; i < 4; ++i) v[i] = vld1q_f32(x + (i0 + i) * ldx + k0 + k);
        transpose4(v);
        for (int q = 0; q < 4; ++q) vst1q_f32(xp + (k + q) * kTileTokens + i0, v[q]);
      }
    }
    for (; k < kc; ++k)
      for (int64_t i = i0; i < i0 + 4; ++i)
        xp[k * kTileTokens + i] = i < tokens ? x[i * ldx + k0 + k] : 0.f;
  }
}

// acc[i][:] += xp[k][i] * panel[k][:] for k < kc, i < MT (4 or 8), loaded from and stored to
// ytile float [8][12]. FMLA by element needs the lane as a constant: hence the macro.
template <int MT>
inline void panel_tile(const float* panel, const float* xp, int64_t kc, float* ytile) {
  float32x4_t acc[MT][3];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 3; ++j) acc[i][j] = vld1q_f32(ytile + i * kPanelRows + 4 * j);
  for (int64_t k = 0; k < kc; ++k) {
    const float32x4_t w0 = vld1q_f32(panel + k * kPanelRows);
    const float32x4_t w1 = vld1q_f32(panel + k * kPanelRows + 4);
    const float32x4_t w2 = vld1q_f32(panel + k * kPanelRows + 8);
    const float32x4_t xa = vld1q_f32(xp + k * kTileTokens);
#define SE_TOKEN(i, xv, lane)                                 \
  acc[i][0] = vfmaq_laneq_f32(acc[i][0], w0, xv, lane);       \
  acc[i][1] = vfmaq_laneq_f32(acc[i][1], w1, xv, lane);       \
  acc[i][2] = vfmaq_laneq_f32(acc[i][2], w2, xv, lane);
    SE_TOKEN(0, xa, 0)
    SE_TOKEN(1, xa, 1)
    SE_TOKEN(2, xa, 2)
    SE_TOKEN(3, xa, 3)
    if constexpr (MT == 8) {
      const float32x4_t xb = vld1q_f32(xp + k * kTileTokens + 4);
      SE_TOKEN(4, xb, 0)
      SE_TOKEN(5, xb, 1)
      SE_TOKEN(6, xb, 2)
      SE_TOKEN(7, xb, 3)
    }
#undef SE_TOKEN
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 3; ++j) vst1q_f32(ytile + i * kPanelRows + 4 * j, acc[i][j]);
}

template <ValueType WT>
void gemm_8x12(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
               int64_t tokens, float* y, int64_t ldy) {
  if (r1 <= r0 || tokens <= 0) return;
  const int64_t rows = r1 - r0;
  const int64_t panels = (rows + kPanelRows - 1) / kPanelRows;
  const int64_t tile_floats = kTileTokens * kPanelRows;
  // Per-thread scratch, reused across calls: the packed panels (panels x [K][12]), one K block of
  // the token tile ([256][8]) and the output tiles of every panel (panels x [8][12]).
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(panels * K * kPanelRows + kKBlock * kTileTokens +
                                          panels * tile_floats);
  if (scratch.size() < need) scratch.resize(need);
  float* packed = scratch.data();
  float* xp = packed + panels * K * kPanelRows;
  float* ytiles = xp + kKBlock * kTileTokens;
  for (int64_t p = 0; p < panels; ++p)
    pack_panel<WT>(w, K, r0 + p * kPanelRows, std::min<int64_t>(kPanelRows, rows - p * kPanelRows),
                   packed + p * K * kPanelRows);
  for (int64_t n = 0; n < tokens; n += kTileTokens) {
    const int64_t mt = std::min<int64_t>(kTileTokens, tokens - n);
    std::memset(ytiles, 0, sizeof(float) * static_cast<size_t>(panels * tile_floats));
    for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
      const int64_t kc = std::min(kKBlock, K - k0);
      pack_tokens(x + n * ldx, ldx, mt, k0, kc, xp);
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = packed + (p * K + k0) * kPanelRows;
        if (mt > 4) panel_tile<8>(panel, xp, kc, ytiles + p * tile_floats);
        else panel_tile<4>(panel, xp, kc, ytiles + p * tile_floats);
      }
    }
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t cols = std::min<int64_t>(kPanelRows, rows - p * kPanelRows);
      for (int64_t i = 0; i < mt; ++i)
        std::memcpy(y + (n + i) * ldy + p * kPanelRows, ytiles + p * tile_floats + i * kPanelRows,
                    sizeof(float) * static_cast<size_t>(cols));
    }
  }
}

}  // namespace

void moe_gemm_f32_8x12_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                            int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_8x12<ValueType::kF32>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

void moe_gemm_bf16_8x12_neon(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x,
                             int64_t ldx, int64_t tokens, float* y, int64_t ldy) {
  gemm_8x12<ValueType::kBF16>(w, K, r0, r1, x, ldx, tokens, y, ldy);
}

}  // namespace sparse_ext

#endif

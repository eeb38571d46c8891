// ARM NEON (aarch64 ASIMD, fp32 FMA via vfmaq_f32) N:M ukernels. Compiled only when the compiler
// targets aarch64; elsewhere nm_ukernels_neon returns nullptr. Tested under qemu-aarch64 by
// scripts/test_aarch64.sh against the scalar reference.
#include <cstring>

#include "../common/bf16.h"
#include "nm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include "../common/neon-values.h"

namespace sparse_ext {
namespace {

// ---- GEMV: 4 slots per vector; activations inserted lane by lane (no gather on NEON) ----------
// Entry: x float [padded_cols + 8], gcol int32 [kept], y float [rows] (r0 .. r1 - 1 written).
template <ValueType VT, int B>
void gemv_impl(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
               float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const int64_t vbase = r * kept;
    float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
    int64_t c = 0;
    for (; c + 8 <= kept; c += 8) {
      float32x4_t xa = vld1q_dup_f32(x + gcol[c] + nm_read_index(meta, c, B));
      xa = vld1q_lane_f32(x + gcol[c + 1] + nm_read_index(meta, c + 1, B), xa, 1);
      xa = vld1q_lane_f32(x + gcol[c + 2] + nm_read_index(meta, c + 2, B), xa, 2);
      xa = vld1q_lane_f32(x + gcol[c + 3] + nm_read_index(meta, c + 3, B), xa, 3);
      float32x4_t xc = vld1q_dup_f32(x + gcol[c + 4] + nm_read_index(meta, c + 4, B));
      xc = vld1q_lane_f32(x + gcol[c + 5] + nm_read_index(meta, c + 5, B), xc, 1);
      xc = vld1q_lane_f32(x + gcol[c + 6] + nm_read_index(meta, c + 6, B), xc, 2);
      xc = vld1q_lane_f32(x + gcol[c + 7] + nm_read_index(meta, c + 7, B), xc, 3);
      acc0 = vfmaq_f32(acc0, load4_values<VT>(w.values, vbase + c), xa);
      acc1 = vfmaq_f32(acc1, load4_values<VT>(w.values, vbase + c + 4), xc);
    }
    float tail = 0.f;
    for (; c < kept; ++c)
      tail += load1_value<VT>(w.values, vbase + c) * x[gcol[c] + nm_read_index(meta, c, B)];
    y[r] = vaddvq_f32(vaddq_f32(acc0, acc1)) + tail;
  }
}

template <ValueType VT>
void gemv(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
          float* y) {
  switch (w.bits()) {
    case 2: return gemv_impl<VT, 2>(w, x, gcol, r0, r1, y);
    case 3: return gemv_impl<VT, 3>(w, x, gcol, r0, r1, y);
    default: return gemv_impl<VT, 4>(w, x, gcol, r0, r1, y);
  }
}

// Offsets (in floats) of the block's slots into the panel block: (gcol[c] + index) * NT.
template <int B>
inline void decode_offsets(const uint8_t* row_meta, const int32_t* gcol, int64_t j0, int64_t cnt,
                           int64_t nt, int32_t* offs) {
  for (int64_t c = 0; c < cnt; ++c)
    offs[c] = static_cast<int32_t>((gcol[c] + nm_read_index(row_meta, j0 + c, B)) * nt);
}

// ---- Token tile: NT = 4 * NV tokens of one row in NV registers --------------------------------
// U accumulator sets take slots in turn (NV * U = 8 independent FMA chains).
// Entry: xP float [padded_cols, NT], gcol int32 [(g1-g0)*N], ytile float [r1-r0, NT] accumulated.
template <ValueType VT, int NV, int U, int B>
void tile_impl(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
               int64_t r0, int64_t r1, float* ytile) {
  constexpr int NT = 4 * NV, A = NV * U;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n, M = w.m;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  const float* xb = xP + g0 * M * NT;
  int32_t offs[kNmMaxBlockSlots];
  for (int64_t r = r0; r < r1; ++r) {
    decode_offsets<B>(w.meta + r * stride, gcol, j0, cnt, NT, offs);
    const int64_t vbase = r * kept + j0;
    float* yr = ytile + (r - r0) * NT;
    float32x4_t acc[A];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[v] = vld1q_f32(yr + 4 * v);
#pragma GCC unroll 8
    for (int i = NV; i < A; ++i) acc[i] = vdupq_n_f32(0.f);
    int64_t c = 0;
    for (; c + U <= cnt; c += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const float* xr = xb + offs[c + u];
        const float32x4_t wv = broadcast_value<VT>(w.values, vbase + c + u);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v)
          acc[u * NV + v] = vfmaq_f32(acc[u * NV + v], vld1q_f32(xr + 4 * v), wv);
      }
    }
    for (; c < cnt; ++c) {
      const float* xr = xb + offs[c];
      const float32x4_t wv = broadcast_value<VT>(w.values, vbase + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = vfmaq_f32(acc[v], vld1q_f32(xr + 4 * v), wv);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[v] = vaddq_f32(acc[v], acc[u * NV + v]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vst1q_f32(yr + 4 * v, acc[v]);
  }
}

template <ValueType VT, int NV, int U>
void tile(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
          int64_t r0, int64_t r1, float* ytile) {
  switch (w.bits()) {
    case 2: return tile_impl<VT, NV, U, 2>(w, xP, gcol, g0, g1, r0, r1, ytile);
    case 3: return tile_impl<VT, NV, U, 3>(w, xP, gcol, g0, g1, r0, r1, ytile);
    default: return tile_impl<VT, NV, U, 4>(w, xP, gcol, g0, g1, r0, r1, ytile);
  }
}

// ---- Input gradient: scatter each slot's value times the row's grad vector ---------------------
constexpr int kScatterNv = 4;
// Entry: dyP float [rows, NT], gcol int32 [(g1-g0)*N], dxtile float [(g1-g0)*M, NT] accumulated.
template <ValueType VT, int B>
void scatter_impl(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
                  int64_t r0, int64_t r1, float* dxtile) {
  constexpr int NV = kScatterNv, NT = 4 * NV;
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n;
  const int64_t j0 = g0 * N, cnt = (g1 - g0) * N;
  int32_t offs[kNmMaxBlockSlots];
  for (int64_t r = r0; r < r1; ++r) {
    float32x4_t d[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) d[v] = vld1q_f32(dyP + r * NT + 4 * v);
    decode_offsets<B>(w.meta + r * stride, gcol, j0, cnt, NT, offs);
    const int64_t vbase = r * kept + j0;
    for (int64_t c = 0; c < cnt; ++c) {
      float* xr = dxtile + offs[c];
      const float32x4_t wv = broadcast_value<VT>(w.values, vbase + c);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) vst1q_f32(xr + 4 * v, vfmaq_f32(vld1q_f32(xr + 4 * v), d[v], wv));
    }
  }
}

template <ValueType VT>
void scatter(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0, int64_t g1,
             int64_t r0, int64_t r1, float* dxtile) {
  switch (w.bits()) {
    case 2: return scatter_impl<VT, 2>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    case 3: return scatter_impl<VT, 3>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
    default: return scatter_impl<VT, 4>(w, dyP, gcol, g0, g1, r0, r1, dxtile);
  }
}

// ---- Values gradient (SDDMM): one dot product over the tokens (ld % 8 == 0) per slot ----------
// Entry: dyT float [rows, ld], xT float [padded_cols, ld], gcol int32 [kept], dv float [rows, kept].
template <ValueType VT>
void sddmm(const NmWeight& w, const float* dyT, const float* xT, int64_t ld, const int32_t* gcol,
           int64_t r0, int64_t r1, float* dv) {
  (void)sizeof(VT);
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const float* dr = dyT + r * ld;
    for (int64_t j = 0; j < kept; ++j) {
      const float* xr = xT + (gcol[j] + nm_read_index(meta, j, bits)) * ld;
      float32x4_t a0 = vdupq_n_f32(0.f), a1 = vdupq_n_f32(0.f);
      for (int64_t t = 0; t + 8 <= ld; t += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(dr + t), vld1q_f32(xr + t));
        a1 = vfmaq_f32(a1, vld1q_f32(dr + t + 4), vld1q_f32(xr + t + 4));
      }
      dv[r * kept + j] = vaddvq_f32(vaddq_f32(a0, a1));
    }
  }
}

#define SE_NM_NEON_KERNELS(VT, vts)                                                   \
  NmUkernels {                                                                        \
    vts "-nmgemv-1x1-neon", gemv<VT>,                                                 \
        {{vts "-nmmm-8x1-neon", tile<VT, 2, 4>, 8},                                   \
         {vts "-nmmm-16x1-neon", tile<VT, 4, 2>, 16},                                 \
         {vts "-nmmm-32x1-neon", tile<VT, 8, 1>, 32},                                 \
         {nullptr, nullptr, 0}},                                                      \
        vts "-nmscatter-16x1-neon", scatter<VT>, 4 * kScatterNv, vts "-nmsddmm-1x1-neon", \
        sddmm<VT>                                                                     \
  }

const NmUkernels kF32 = SE_NM_NEON_KERNELS(ValueType::kF32, "f32");
const NmUkernels kBF16 = SE_NM_NEON_KERNELS(ValueType::kBF16, "bf16");

}  // namespace

const NmUkernels* nm_ukernels_neon(ValueType value_type) {
  if (value_type == ValueType::kF32) return &kF32;
  if (value_type == ValueType::kBF16) return &kBF16;
  return nullptr;
}

}  // namespace sparse_ext

#else

namespace sparse_ext {
const NmUkernels* nm_ukernels_neon(ValueType) { return nullptr; }
}  // namespace sparse_ext

#endif

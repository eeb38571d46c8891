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

// ---- GEMV for any N:M: 4 slots per vector; activations inserted lane by lane ------------------
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

// ---- GEMV with table lookups: 4 slots per vector, activations picked by TBL ------------------
// A window is WG whole groups, WG * M <= 16 consecutive activations (2 or 4 q registers, loaded
// once per window), holding WG * N slots = V vectors of 4 slots. TBL picks each vector's 4
// activations from the window by byte indices built from one metadata word with vector ops:
// dup, per-lane shift by lane * B, mask, then times 4 (bytes per float) plus the lane's group
// offset in the window and its byte number 0..3, in one multiply-add. WG = 4 / gcd(N, 4) makes
// WG * N a multiple of 4; the window fits 16 floats for every N with M = 4, even N with M = 8 and
// N a multiple of 4 with M = 16. Other patterns (1:8, 3:8, 1:16, 6:16, ...) keep gemv above.
// Several rows share each window load.
constexpr int gcd4(int n) { return n % 4 == 0 ? 4 : n % 2 == 0 ? 2 : 1; }

template <int N, int M>
struct TblWindow {
  static constexpr int kGroups = 4 / gcd4(N);      // WG
  static constexpr int kFloats = kGroups * M;      // activations per window
  static constexpr int kVectors = kGroups * N / 4;  // V
  static constexpr bool kFits = kFloats <= 16;
};

// The B-bit indices of slots s .. s + 3 (s a multiple of 4) in the low 4B bits. Their bits start
// at s * B, a whole byte for B = 2, 4 and a byte or a nibble for B = 3: one byte (B = 2) or two
// (B = 3, 4) from the row's own metadata bytes.
template <int B>
inline uint32_t slot_word(const uint8_t* row_meta, int64_t s) {
  if constexpr (B == 2) {
    return row_meta[s >> 2];
  } else {
    const int64_t bit = s * B;
    uint16_t v;
    std::memcpy(&v, row_meta + (bit >> 3), sizeof(v));
    return static_cast<uint32_t>(v) >> (bit & 7);
  }
}

// Byte-index vector for TBL from a slot word: lane i gets bytes base[i] + 4 * index_i.
template <int B>
inline uint8x16_t tbl_indices(uint32_t word, uint32x4_t base) {
  const int32x4_t shifts = {0, -B, -2 * B, -3 * B};
  const uint32x4_t idx =
      vandq_u32(vshlq_u32(vdupq_n_u32(word), shifts), vdupq_n_u32((1u << B) - 1u));
  return vreinterpretq_u8_u32(vmlaq_u32(base, idx, vdupq_n_u32(0x04040404u)));
}

template <int REGS>
struct Table;
template <>
struct Table<2> {
  uint8x16x2_t t;
  void load(const float* x) {
    t.val[0] = vreinterpretq_u8_f32(vld1q_f32(x));
    t.val[1] = vreinterpretq_u8_f32(vld1q_f32(x + 4));
  }
  float32x4_t pick(uint8x16_t i) const { return vreinterpretq_f32_u8(vqtbl2q_u8(t, i)); }
};
template <>
struct Table<4> {
  uint8x16x4_t t;
  void load(const float* x) {
    for (int q = 0; q < 4; ++q) t.val[q] = vreinterpretq_u8_f32(vld1q_f32(x + 4 * q));
  }
  float32x4_t pick(uint8x16_t i) const { return vreinterpretq_f32_u8(vqtbl4q_u8(t, i)); }
};

// RG rows [r, r + RG). Entry: x float [padded_cols + 8] zero beyond cols (windows read whole
// groups, inside padded_cols), gcol int32 [kept] (tail slots), y float [rows].
template <ValueType VT, int N, int M, int RG>
inline void gemv_tbl_rows(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r,
                          float* y) {
  using Win = TblWindow<N, M>;
  constexpr int B = M == 4 ? 2 : M == 8 ? 3 : 4;
  constexpr int V = Win::kVectors, SW = 4 * V;
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int64_t windows = w.groups() / Win::kGroups;
  // base[v] lane i: byte offset of slot 4v + i's group in the window, plus bytes 0, 1, 2, 3.
  uint32x4_t base[V];
  for (int v = 0; v < V; ++v) {
    uint32_t lanes[4];
    for (int i = 0; i < 4; ++i)
      lanes[i] = static_cast<uint32_t>((4 * v + i) / N * M * 4) * 0x01010101u + 0x03020100u;
    base[v] = vld1q_u32(lanes);
  }
  const uint8_t* meta[RG];
  float32x4_t acc[RG];
  for (int i = 0; i < RG; ++i) {
    meta[i] = w.meta + (r + i) * stride;
    acc[i] = vdupq_n_f32(0.f);
  }
  Table<Win::kFloats / 4> table;
  for (int64_t win = 0; win < windows; ++win) {
    table.load(x + win * Win::kFloats);
    for (int v = 0; v < V; ++v) {
      const int64_t s = win * SW + 4 * v;
      for (int i = 0; i < RG; ++i) {
        const float32x4_t xv = table.pick(tbl_indices<B>(slot_word<B>(meta[i], s), base[v]));
        acc[i] = vfmaq_f32(acc[i], load4_values<VT>(w.values, (r + i) * kept + s), xv);
      }
    }
  }
  for (int i = 0; i < RG; ++i) {
    float tail = 0.f;
    for (int64_t j = windows * SW; j < kept; ++j)
      tail += load1_value<VT>(w.values, (r + i) * kept + j) * x[gcol[j] + nm_read_index(meta[i], j, B)];
    y[r + i] = vaddvq_f32(acc[i]) + tail;
  }
}

template <ValueType VT, int N, int M>
void gemv_tbl(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
              float* y) {
  static_assert(TblWindow<N, M>::kFits, "window wider than a 4-register table");
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) gemv_tbl_rows<VT, N, M, 4>(w, x, gcol, r, y);
  for (; r < r1; ++r) gemv_tbl_rows<VT, N, M, 1>(w, x, gcol, r, y);
}

// Entry: NmGemvUkernel contract (nm.h). The TBL kernel where its window fits, else gemv.
template <ValueType VT>
void gemv_lookup(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
                 float* y) {
  switch (w.m * 100 + w.n) {
    case 401: return gemv_tbl<VT, 1, 4>(w, x, gcol, r0, r1, y);
    case 402: return gemv_tbl<VT, 2, 4>(w, x, gcol, r0, r1, y);
    case 403: return gemv_tbl<VT, 3, 4>(w, x, gcol, r0, r1, y);
    case 802: return gemv_tbl<VT, 2, 8>(w, x, gcol, r0, r1, y);
    case 804: return gemv_tbl<VT, 4, 8>(w, x, gcol, r0, r1, y);
    case 806: return gemv_tbl<VT, 6, 8>(w, x, gcol, r0, r1, y);
    case 1604: return gemv_tbl<VT, 4, 16>(w, x, gcol, r0, r1, y);
    case 1608: return gemv_tbl<VT, 8, 16>(w, x, gcol, r0, r1, y);
    case 1612: return gemv_tbl<VT, 12, 16>(w, x, gcol, r0, r1, y);
    default: return gemv<VT>(w, x, gcol, r0, r1, y);
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
    vts "-nmgemv-4x4-neon", gemv_lookup<VT>,                                          \
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

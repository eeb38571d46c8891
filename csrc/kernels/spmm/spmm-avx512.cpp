// AVX-512 (F + BW + VL + DQ) ukernels. Compiled for every x86-64 build with a file-level target
// pragma and only called after the runtime check in isa.cpp. Against the AVX2 file: zmm tiles of
// 16 tokens per vector (32 registers hold twice the accumulators), and k-masked tails instead of
// scalar loops, so no index or value past a segment is read.
#include <cstring>
#include <utility>

#include "../common/bf16.h"
#include "spmm.h"

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

#include "../common/avx512-values.h"

namespace sparse_ext {
namespace {

// GEMV chunks run across column blocks: a row group's entries are contiguous over kb, so a chunk
// of 16 entries takes each lane's block from the offsets (+256 for lanes at or past each block
// boundary inside the chunk) and only the row's last chunk is masked. Per-block chunks cost a full
// and a mostly empty masked gather per block at 90% (~26 entries per block). Measured at 1 thread,
// 4096x4096, weight in cache: 90% 0.56 -> 0.55 ms, 95% 0.38 -> 0.29 ms, 99% 0.26 -> 0.14 ms.
// A branch-free variant (two boundaries per chunk always, advanced with cmov) measured 20% slower:
// its chain of offset loads limits it.
struct ChunkColumns {
  const int32_t* seg;  // the row group's KB + 1 offsets
  int64_t k_blocks;
  int64_t next = 1;    // first boundary seg[next] not yet passed
  int32_t base = 0;    // 256 * (block of the chunk's first entry)

  // Column (block base + index) of each lane of the chunk of entries [j, j + 16). Chunks must be
  // visited in order, so every boundary not yet passed is at j or later; one at j + 16 already
  // counts for the next chunk.
  __m512i operator()(int64_t j, __m512i idx) {
    __m512i col = _mm512_add_epi32(idx, _mm512_set1_epi32(base));
    for (; next < k_blocks && seg[next] <= j + 16; ++next) {
      const __mmask16 past = static_cast<__mmask16>(0xFFFFu << (seg[next] - j));
      col = _mm512_mask_add_epi32(col, past, col, _mm512_set1_epi32(kSpmmKBlock));
      base += kSpmmKBlock;
    }
    return col;
  }
};

// Values this many entries ahead are prefetched: the gathers keep the hardware prefetcher behind.
// Measured at 1 thread, 4096x4096: 50% 4.6 -> 3.9 ms; 90% with the weight evicted between calls
// (as when a dense layer runs in between) 1.27 -> 1.07 ms, unchanged when it stays in cache. A
// distance of 256 or 4096 entries or prefetching into L2 only measured the same or worse.
constexpr int64_t kGemvPrefetch = 1024;

template <ValueType VT, int R>
inline void prefetch_entries(const SpmmWeight& w, int64_t j) {
  if (j + kGemvPrefetch >= w.nnz) return;
  constexpr int64_t bytes = VT == ValueType::kF32 ? 4 : 2;
  _mm_prefetch(static_cast<const char*>(w.values) + (j + kGemvPrefetch) * R * bytes, _MM_HINT_T0);
  if ((j & 63) < 16)  // one line of indices per 64 entries
    _mm_prefetch(reinterpret_cast<const char*>(w.indices + j + kGemvPrefetch), _MM_HINT_T0);
}

// R = 1: gather 16 activations per chunk.
template <ValueType VT>
void gemv_r1(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    ChunkColumns columns{w.offsets + g * KB, KB};
    const int64_t jend = columns.seg[KB];
    int64_t j = columns.seg[0];
    for (; j + 16 <= jend; j += 16) {
      prefetch_entries<VT, 1>(w, j);
      const __m512i idx =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.indices + j)));
      const __m512i col = columns(j, idx);
      acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j), _mm512_i32gather_ps(col, x, 4), acc0);
      std::swap(acc0, acc1);
    }
    if (j < jend) {
      const __mmask16 m = first_lanes(jend - j);
      const __m512i col = columns(j, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.indices + j)));
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, x, 4);
      acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j, m), xv, acc0);
    }
    y[g] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
}

// R = 2 and 4: one gather of 16 activations per chunk, as for R = 1; vpermps repeats each one R
// times to meet its entry's R contiguous row values, so lane l accumulates row l % R. Against the
// scalar loop it replaces, at 90%, 1 thread, 4096x4096: R=2 0.85 -> 0.38 ms, R=4 0.43 -> 0.26 ms
// (weight in cache); 1.36 -> 0.88 and 1.05 -> 0.80 ms with it evicted between calls.
template <ValueType VT, int R>
void gemv_rsmall(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  static_assert(R == 2 || R == 4, "R = 2 or 4");
  const int64_t KB = w.k_blocks();
  __m512i repeat[R];  // repeat[q][l] = q * 16 / R + l / R
  for (int q = 0; q < R; ++q) {
    alignas(64) int32_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = q * 16 / R + l / R;
    repeat[q] = _mm512_load_si512(lanes);
  }
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[R];
    for (int q = 0; q < R; ++q) acc[q] = _mm512_setzero_ps();
    ChunkColumns columns{w.offsets + g * KB, KB};
    const int64_t jend = columns.seg[KB];
    for (int64_t j = columns.seg[0]; j < jend; j += 16) {
      prefetch_entries<VT, R>(w, j);
      const int64_t left = jend - j;
      const __mmask16 m = left >= 16 ? 0xFFFF : first_lanes(left);
      const __m512i col = columns(j, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.indices + j)));
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, col, x, 4);
      const int64_t values_left = left * R;
#pragma GCC unroll 4
      for (int q = 0; q < R; ++q) {
        const int64_t n = values_left - 16 * q;
        const __mmask16 vm = n >= 16 ? 0xFFFF : (n <= 0 ? 0 : first_lanes(n));
        acc[q] = _mm512_fmadd_ps(load16_values<VT>(w.values, j * R + 16 * q, vm),
                                 _mm512_permutexvar_ps(repeat[q], xv), acc[q]);
      }
    }
    __m512 sum = acc[0];
    for (int q = 1; q < R; ++q) sum = _mm512_add_ps(sum, acc[q]);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, sum);
    for (int r = 0; r < R; ++r) {
      float row = 0.f;
      for (int l = r; l < 16; l += R) row += lanes[l];
      y[g * R + r] = row;
    }
  }
}

// R = 8: two entries per zmm (their 8 row values each are contiguous), each half times its own
// broadcast activation; the halves are added at the end.
template <ValueType VT>
void gemv_r8(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      int64_t j = seg[kb];
      const int64_t j1 = seg[kb + 1];
      for (; j + 2 <= j1; j += 2) {
        const __m512 xv = _mm512_insertf32x8(
            _mm512_castps256_ps512(_mm256_set1_ps(xb[w.indices[j]])),
            _mm256_set1_ps(xb[w.indices[j + 1]]), 1);
        acc0 = _mm512_fmadd_ps(load16_values<VT>(w.values, j * 8), xv, acc0);
        std::swap(acc0, acc1);
      }
      if (j < j1)  // the high half is left alone (0 * inf would be NaN there)
        acc0 = _mm512_mask3_fmadd_ps(load16_values<VT>(w.values, j * 8, 0x00FF),
                                     _mm512_set1_ps(xb[w.indices[j]]), acc0, 0x00FF);
    }
    const __m512 sum = _mm512_add_ps(acc0, acc1);
    _mm256_storeu_ps(y + g * 8, _mm256_add_ps(_mm512_castps512_ps256(sum),
                                              _mm512_extractf32x8_ps(sum, 1)));
  }
}

// Transposed tile: NV vectors of 16 tokens per row, R rows per entry, U entries in flight on
// separate accumulators (R * NV * U >= 8 chains hide the FMA latency; at most 16 of the 32 zmm).
template <ValueType VT, int R, int NV>
inline void tile_entry(const SpmmWeight& w, const float* xr, int64_t j, __m512* acc) {
  __m512 xv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const __m512 wv = broadcast16_value<VT>(w.values, j * R + r);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(wv, xv[v], acc[r * NV + v]);
  }
}

template <int A, int U>
inline void store_sum(const __m512* acc, float* out) {
#pragma GCC unroll 32
  for (int i = 0; i < A; ++i) {
    __m512 sum = acc[i];
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u * A + i]);
    _mm512_storeu_ps(out + 16 * i, sum);
  }
}

// Column blocks outside, the call's row groups inside: one block's activations (256 x NT floats,
// 64 KiB at NT = 64) are reused by every row group of the call while they are in L1/L2, and the
// partial sums live in ytile (the driver keeps it at 8 KiB). Row groups outside with accumulators
// in registers re-read the whole activation tile (1 MiB at NT = 64) from L2 for every row group.
// The next segments are not a sequential stream in this order, so they are prefetched two row
// groups ahead (without it: 3.8 instead of 3.3 ms below). Measured at 1 thread, 4096x4096, 90%,
// N = 64: R=1 NT=64 4.07 -> 3.26 ms (N = 256 with the weight evicted between calls: 16.2 ->
// 13.2 ms), R=4 NT=32 2.62 -> 2.21 ms, R=8 NT=16 2.37 -> 2.11 ms. NT=32 tiles in this order (the
// slice fits L1) measured 4.6 ms at N = 64: twice the index and value loads. U = 1 or 4 and 16 to
// 64 row groups per call measured within noise of U = 2 and 32.
template <ValueType VT, int R, int NV, int U>
void tile(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
          float* ytile) {
  constexpr int NT = 16 * NV, A = R * NV;
  constexpr int64_t value_bytes = VT == ValueType::kF32 ? 4 : 2;
  (void)ldx;
  const int64_t KB = w.k_blocks();
  const uint8_t* indices = w.indices;
  for (int64_t kb = 0; kb < KB; ++kb) {
    const float* xb = xT + kb * kSpmmKBlock * NT;
    for (int64_t g = g0; g < g1; ++g) {
      if (g + 2 < g1) {
        const int64_t ahead = w.offsets[(g + 2) * KB + kb];
        const char* values = static_cast<const char*>(w.values) + ahead * R * value_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(indices + ahead), _MM_HINT_T0);
        _mm_prefetch(values, _MM_HINT_T0);
        _mm_prefetch(values + 64, _MM_HINT_T0);
      }
      float* yg = ytile + (g - g0) * R * NT;
      __m512 acc[U * A];
#pragma GCC unroll 32
      for (int i = 0; i < U * A; ++i) acc[i] = kb == 0 || i >= A ? _mm512_setzero_ps()
                                                                   : _mm512_loadu_ps(yg + 16 * i);
      int64_t j = w.offsets[g * KB + kb];
      const int64_t j1 = w.offsets[g * KB + kb + 1];
      for (; j + U <= j1; j += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u)
          tile_entry<VT, R, NV>(w, xb + indices[j + u] * NT, j + u, acc + u * A);
      }
      for (; j < j1; ++j) tile_entry<VT, R, NV>(w, xb + indices[j] * NT, j, acc);
      store_sum<A, U>(acc, yg);
    }
  }
}

// R = 1, narrow tiles (16 tokens): rows outside, and one FMA loop per run of whole segments over
// their entries' columns (block base + index, expanded 16 at a time into a small buffer), so the
// loop exits once per run instead of twice per segment: a 16-token entry is one FMA and those
// exits dominated. The 256 KiB activation tile stays in L2. Measured at 1 thread, 4096x4096,
// N = 16: 90% 1.75 -> 1.51 ms, 95% 1.03 -> 0.81 ms; the K-block-outer order measured 1.8 ms
// at 90%.
template <ValueType VT, int NV, int U>
void tile_row_runs(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
                   float* ytile) {
  constexpr int NT = 16 * NV;
  constexpr int64_t kRun = 1024;  // entries per run, more than a segment of distinct columns
  // Rows averaging this many entries per block (about 80% sparse) take their segments one by one:
  // at 50% and 70% expanding the columns cost more than the exits (8.0 -> 8.9 ms, 5.2 -> 5.5 ms).
  constexpr int64_t kLongSegment = 48;
  (void)ldx;
  alignas(64) int32_t cols[kRun + 16];  // + 16: a segment's last store writes a whole vector
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[U * NV];
#pragma GCC unroll 32
    for (int i = 0; i < U * NV; ++i) acc[i] = _mm512_setzero_ps();
    const int32_t* seg = w.offsets + g * KB;
    // Rows of long segments (and the rare segment longer than a run, which only repeated columns
    // make) go segment by segment, straight from the indices.
    const bool long_segments = seg[KB] - seg[0] >= kLongSegment * KB;
    for (int64_t kb = 0; kb < KB;) {
      const int64_t run_start = seg[kb];
      if (long_segments || seg[kb + 1] - run_start > kRun) {
        const float* xb = xT + kb * kSpmmKBlock * NT;
        int64_t j = run_start;
        for (; j + U <= seg[kb + 1]; j += U) {
#pragma GCC unroll 8
          for (int u = 0; u < U; ++u)
            tile_entry<VT, 1, NV>(w, xb + w.indices[j + u] * NT, j + u, acc + u * NV);
        }
        for (; j < seg[kb + 1]; ++j) tile_entry<VT, 1, NV>(w, xb + w.indices[j] * NT, j, acc);
        ++kb;
        continue;
      }
      for (; kb < KB && seg[kb + 1] - run_start <= kRun; ++kb) {
        const __m512i base = _mm512_set1_epi32(static_cast<int32_t>(kb * kSpmmKBlock));
        for (int64_t j = seg[kb]; j < seg[kb + 1]; j += 16) {
          const int64_t left = seg[kb + 1] - j;
          const __mmask16 m = left >= 16 ? 0xFFFF : first_lanes(left);
          _mm512_storeu_si512(cols + (j - run_start),
                             _mm512_add_epi32(base, _mm512_cvtepu8_epi32(
                                                        _mm_maskz_loadu_epi8(m, w.indices + j))));
        }
      }
      const int64_t n = seg[kb] - run_start;
      int64_t i = 0;
      for (; i + U <= n; i += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u)
          tile_entry<VT, 1, NV>(w, xT + static_cast<int64_t>(cols[i + u]) * NT, run_start + i + u,
                                acc + u * NV);
      }
      for (; i < n; ++i)
        tile_entry<VT, 1, NV>(w, xT + static_cast<int64_t>(cols[i]) * NT, run_start + i, acc);
    }
    store_sum<NV, U>(acc, ytile + (g - g0) * NT);
  }
}

// dv[j * R + r] = <dyT row, xT row> over ld tokens (ld a multiple of 8): 32 tokens per step, then
// one masked step for the last 1..31.
template <ValueType VT>
void sddmm(const SpmmWeight& w, const float* dyT, const float* xT, int64_t ld, int64_t g0,
           int64_t g1, float* dv) {
  const int64_t R = w.block_rows, KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float* xr = xT + (kb * kSpmmKBlock + w.indices[j]) * ld;
        for (int64_t r = 0; r < R; ++r) {
          const float* dr = dyT + (g * R + r) * ld;
          __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
          int64_t n = 0;
          for (; n + 32 <= ld; n += 32) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n), _mm512_loadu_ps(xr + n), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n + 16), _mm512_loadu_ps(xr + n + 16), a1);
          }
          if (n + 16 <= ld) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(dr + n), _mm512_loadu_ps(xr + n), a0);
            n += 16;
          }
          if (n < ld) {
            const __mmask16 m = first_lanes(ld - n);
            a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, dr + n), _mm512_maskz_loadu_ps(m, xr + n),
                                 a1);
          }
          dv[j * R + r] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        }
      }
}

#define SE_AVX512_KERNELS(VT, vts, R, GEMV, NT, NV, U)                                        \
  SpmmUkernels {                                                                              \
    vts "-spmm-1x" #R "-avx512", GEMV, vts "-spmm-" #NT "x" #R "-avx512", tile<VT, R, NV, U>, NT, \
        nullptr, nullptr, 0, vts "-sddmm-1x" #R "-avx512", sddmm<VT>                               \
  }
// R = 1: a 64-token tile, and a 16-token one for N <= 16 (the decode-batch sizes).
#define SE_AVX512_KERNELS_R1(VT, vts)                                                           \
  SpmmUkernels {                                                                             \
    vts "-spmm-1x1-avx512", gemv_r1<VT>, vts "-spmm-64x1-avx512", tile<VT, 1, 4, 2>, 64,          \
        vts "-spmm-16x1-avx512", tile_row_runs<VT, 1, 8>, 16, vts "-sddmm-1x1-avx512", sddmm<VT>     \
  }

const SpmmUkernels kF32[4] = {
    SE_AVX512_KERNELS_R1(ValueType::kF32, "f32"),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 2, (gemv_rsmall<ValueType::kF32, 2>), 32, 2, 2),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 4, (gemv_rsmall<ValueType::kF32, 4>), 32, 2, 1),
    SE_AVX512_KERNELS(ValueType::kF32, "f32", 8, gemv_r8<ValueType::kF32>, 16, 1, 1),
};
const SpmmUkernels kBF16[4] = {
    SE_AVX512_KERNELS_R1(ValueType::kBF16, "bf16"),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 2, (gemv_rsmall<ValueType::kBF16, 2>), 32, 2, 2),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 4, (gemv_rsmall<ValueType::kBF16, 4>), 32, 2, 1),
    SE_AVX512_KERNELS(ValueType::kBF16, "bf16", 8, gemv_r8<ValueType::kBF16>, 16, 1, 1),
};

}  // namespace

const SpmmUkernels* spmm_ukernels_avx512(ValueType value_type, int64_t block_rows) {
  int slot;
  switch (block_rows) {
    case 1: slot = 0; break;
    case 2: slot = 1; break;
    case 4: slot = 2; break;
    case 8: slot = 3; break;
    default: return nullptr;
  }
  if (value_type == ValueType::kF64) return nullptr;
  return value_type == ValueType::kF32 ? &kF32[slot] : &kBF16[slot];
}

}  // namespace sparse_ext

#pragma GCC pop_options
#else

namespace sparse_ext {
const SpmmUkernels* spmm_ukernels_avx512(ValueType, int64_t) { return nullptr; }
}  // namespace sparse_ext

#endif

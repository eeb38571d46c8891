// N:M semi-structured kernels on CUDA cores (format and launcher contracts: nm_cuda.cuh).
//
// Forward at few tokens: one warp per output row. A lane owns chunks of VEC consecutive slots
// (VEC chosen per pattern so that a chunk spans at most 16 columns: the warp's activation reads
// then fall in a few cache lines): it loads their values with one vector load (when aligned) and
// their indices as whole metadata bytes when VEC * B is a multiple of 8 (else slot by slot),
// decodes the indices in registers, and multiplies each value into up to 8 tokens' activations.
// The per-token partial sums are reduced across the warp. Every weight byte is read once per
// tile of 8 tokens, which is what matters at decode sizes (memory bound).
//
// Bounds safety does not depend on the metadata: an index has B bits, so a column is
// < G * m; columns >= cols are skipped, and slot / byte offsets are derived from the shape only.
#include <mma.h>

#include <cstring>
#include <type_traits>

#include "nm_cuda.cuh"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kForwardWarps = 4;       // rows (warps) per forward block
constexpr int kMaxChunkCols = 16;      // columns a lane's chunk of slots may span (warp kernel)
constexpr int kFlatThreads = 256;      // threads per block of the per-slot kernels
constexpr int64_t kMaxGridY = 65535;   // token tiles beyond this are looped over in-kernel
constexpr int64_t kMaxFlatBlocks = int64_t{1} << 20;

__device__ __forceinline__ uint32_t read_index(const uint8_t* row_meta, int64_t j, int bits) {
  const int64_t bit = j * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = static_cast<uint32_t>(row_meta[byte]) >> shift;
  if (shift + bits > 8) v |= static_cast<uint32_t>(row_meta[byte + 1]) << (8 - shift);
  return v & ((1u << bits) - 1u);
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

// VEC consecutive values as the accumulator type; vector loads (4, 8 or 16 bytes) when the
// address allows, else element by element.
template <typename TV, typename A, int VEC>
__device__ __forceinline__ void load_vec(const TV* p, A out[VEC]) {
  constexpr int bytes = VEC * static_cast<int>(sizeof(TV));
  constexpr int step = bytes >= 16 ? 16 : bytes;  // bytes per load
  constexpr int per = step / static_cast<int>(sizeof(TV));
  if constexpr (step >= 4) {
    if ((reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(step - 1)) == 0) {
#pragma unroll
      for (int v = 0; v < VEC / per; ++v) {
        TV tmp[per];
        if constexpr (step == 16) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + v * per));
          memcpy(tmp, &raw, sizeof(raw));
        } else if constexpr (step == 8) {
          const uint2 raw = __ldg(reinterpret_cast<const uint2*>(p + v * per));
          memcpy(tmp, &raw, sizeof(raw));
        } else {
          const unsigned raw = __ldg(reinterpret_cast<const unsigned*>(p + v * per));
          memcpy(tmp, &raw, sizeof(raw));
        }
#pragma unroll
        for (int i = 0; i < per; ++i) out[v * per + i] = static_cast<A>(to_float(tmp[i]));
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = static_cast<A>(to_float(p[i]));
}

// ---- forward ----------------------------------------------------------------------------------
template <typename TV, typename TX, int TT, int VEC>
__global__ void __launch_bounds__(kForwardWarps * kWarp)
    nm_forward_kernel(NmCudaShape s, const TV* __restrict__ values,
                      const uint8_t* __restrict__ meta, const TX* __restrict__ x, int64_t tokens,
                      const typename Accum<TV>::type* __restrict__ bias, TX* __restrict__ y) {
  using A = typename Accum<TV>::type;
  const int lane = static_cast<int>(threadIdx.x) & (kWarp - 1);
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kForwardWarps + (threadIdx.x / kWarp);
  if (r >= s.rows) return;  // the whole warp leaves together
  const int64_t kept = s.kept(), K = s.cols, R = s.rows;
  const int64_t n = s.n, m = s.m;
  const int bits = s.bits();
  const uint32_t mask = (1u << bits) - 1u;
  const TV* vrow = values + r * kept;
  const uint8_t* mrow = meta + r * s.meta_stride();
  const A b = bias != nullptr ? bias[r] : A(0);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * TT; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.y) * TT) {
    const int nt = static_cast<int>(tokens - t0 < TT ? tokens - t0 : TT);
    const TX* xt = x + t0 * K;
    A acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = A(0);
    // Group and slot-in-group of the chunk's first slot, advanced incrementally (no division in
    // the loop): the lane's chunks are kWarp * VEC slots apart.
    constexpr int64_t kStride = int64_t{kWarp} * VEC;
    const int64_t step_g = kStride / n, step_q = kStride - step_g * n;
    int64_t g_first = lane * VEC / n;
    int64_t q_first = lane * VEC - g_first * n;
    // A chunk's VEC * B index bits are whole bytes (starting at byte c * VEC * B / 8) when
    // VEC * B is a multiple of 8; otherwise indices are read slot by slot.
    const bool whole_bytes = (VEC * bits) % 8 == 0;
    const int chunk_bytes = VEC * bits / 8;
    for (int64_t c = lane; c * VEC < kept; c += kWarp) {
      const int64_t j0 = c * VEC;
      A v[VEC];
      uint32_t idx[VEC];
      int count = VEC;
      if (j0 + VEC <= kept) {
        load_vec<TV, A, VEC>(vrow + j0, v);
        if (whole_bytes) {
          const uint8_t* mb = mrow + c * chunk_bytes;
          uint32_t word = 0;  // at most 8 slots x 4 bits
          for (int q = 0; q < chunk_bytes; ++q)
            word |= static_cast<uint32_t>(__ldg(mb + q)) << (8 * q);
#pragma unroll
          for (int i = 0; i < VEC; ++i) idx[i] = (word >> (i * bits)) & mask;
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) idx[i] = read_index(mrow, j0 + i, bits);
        }
      } else {
        count = static_cast<int>(kept - j0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          v[i] = i < count ? static_cast<A>(to_float(vrow[j0 + i])) : A(0);
          idx[i] = i < count ? read_index(mrow, j0 + i, bits) : 0u;
        }
      }
      int64_t g = g_first;
      int64_t q = q_first;
      g_first += step_g;
      q_first += step_q;
      if (q_first >= n) {
        q_first -= n;
        ++g_first;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const int64_t col = g * m + idx[i];
        if (i < count && col < K) {
#pragma unroll
          for (int t = 0; t < TT; ++t)
            if (t < nt) acc[t] += v[i] * static_cast<A>(to_float(xt[t * K + col]));
        }
        if (++q == n) {
          q = 0;
          ++g;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = warp_sum(acc[t]);
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < TT; ++t)
        if (t < nt) store(y + (t0 + t) * R + r, acc[t] + b);
    }
  }
}

template <typename TV, typename TX, int TT, int VEC>
cudaError_t launch_forward_tt_vec(const NmCudaShape& s, const void* values, const uint8_t* meta,
                                  const void* x, int64_t tokens, const void* bias, void* y,
                                  cudaStream_t stream) {
  using A = typename Accum<TV>::type;
  const dim3 grid(static_cast<unsigned>(ceil_div(s.rows, kForwardWarps)),
                  static_cast<unsigned>(ceil_div(tokens, TT) < kMaxGridY ? ceil_div(tokens, TT)
                                                                          : kMaxGridY));
  nm_forward_kernel<TV, TX, TT, VEC><<<grid, kForwardWarps * kWarp, 0, stream>>>(
      s, static_cast<const TV*>(values), meta, static_cast<const TX*>(x), tokens,
      static_cast<const A*>(bias), static_cast<TX*>(y));
  return last_launch_error();
}

// Slots per lane chunk: the largest of 8, 4, 2, 1 whose chunk spans at most kMaxChunkCols
// columns on average (VEC * m / n): 8 for 2:4, 3:4, 15:16; 4 for 1:4, 2:8, 3:8, 4:16; 2 for
// 1:8, 2:16; 1 for 1:16.
int chunk_slots(int64_t n, int64_t m) {
  for (int vec = 8; vec > 1; vec /= 2)
    if (vec * m <= kMaxChunkCols * n) return vec;
  return 1;
}

template <typename TV, typename TX, int TT>
cudaError_t launch_forward_tt(const NmCudaShape& s, const void* values, const uint8_t* meta,
                              const void* x, int64_t tokens, const void* bias, void* y,
                              cudaStream_t stream) {
  switch (chunk_slots(s.n, s.m)) {
    case 8: return launch_forward_tt_vec<TV, TX, TT, 8>(s, values, meta, x, tokens, bias, y, stream);
    case 4: return launch_forward_tt_vec<TV, TX, TT, 4>(s, values, meta, x, tokens, bias, y, stream);
    case 2: return launch_forward_tt_vec<TV, TX, TT, 2>(s, values, meta, x, tokens, bias, y, stream);
    default: return launch_forward_tt_vec<TV, TX, TT, 1>(s, values, meta, x, tokens, bias, y, stream);
  }
}

template <typename TV, typename TX>
cudaError_t launch_forward_tiled(const NmCudaShape& s, const void* values, const uint8_t* meta,
                                 const void* x, int64_t tokens, const void* bias, void* y,
                                 cudaStream_t stream);

template <typename T>
cudaError_t launch_forward_mma(const NmCudaShape& s, const void* values, const uint8_t* meta,
                               const void* x, int64_t tokens, const void* bias, void* y,
                               float* workspace, int64_t workspace_floats, cudaStream_t stream);
int64_t mma_splits(const NmCudaShape& s, int64_t tokens);

// Tokens from which the token-tiled kernel replaces the warp-per-row kernel (a guess, to be tuned
// on a GPU: the warp kernel re-reads the weights once per 8 tokens, the tiled one once per 128).
constexpr int64_t kTiledMinTokens = 48;
// Tokens from which 16-bit weights with activations of the same dtype use the tensor-core kernel
// (a guess, to be tuned on a GPU).
constexpr int64_t kMmaMinTokens = 16;

template <typename TV, typename TX>
constexpr bool kMmaPair =
    std::is_same_v<TV, TX> && (std::is_same_v<TV, __half> || std::is_same_v<TV, __nv_bfloat16>);

template <typename TV, typename TX>
cudaError_t launch_forward(const NmCudaShape& s, const void* values, const uint8_t* meta,
                           const void* x, int64_t tokens, const void* bias, void* y,
                           float* workspace, int64_t workspace_floats, cudaStream_t stream) {
  if constexpr (kMmaPair<TV, TX>) {
    if (tokens >= kMmaMinTokens)
      return launch_forward_mma<TV>(s, values, meta, x, tokens, bias, y, workspace,
                                    workspace_floats, stream);
  }
  if constexpr (!std::is_same_v<TV, double>) {
    if (tokens >= kTiledMinTokens)
      return launch_forward_tiled<TV, TX>(s, values, meta, x, tokens, bias, y, stream);
  }
  if (tokens <= 1) return launch_forward_tt<TV, TX, 1>(s, values, meta, x, tokens, bias, y, stream);
  if (tokens == 2) return launch_forward_tt<TV, TX, 2>(s, values, meta, x, tokens, bias, y, stream);
  if (tokens <= 4) return launch_forward_tt<TV, TX, 4>(s, values, meta, x, tokens, bias, y, stream);
  return launch_forward_tt<TV, TX, 8>(s, values, meta, x, tokens, bias, y, stream);
}

// ---- forward, token-tiled (many tokens) ------------------------------------------------------
// A block computes a [kTileRows, kTileTokens] tile of y^T: it walks the (padded) columns in chunks
// of kTileCols; per chunk it stages the activations [kTileCols, kTileTokens] (fp32, transposed) and
// the chunk's slots of its rows (value, shared-memory offset of the slot's column) in shared
// memory, then every thread multiplies its 4 rows' slots into its 8 tokens (two float4 reads per
// slot and row: only the kept n/m of the products are computed). Weights are read once per
// kTileTokens tokens instead of once per 8. fp32 / fp16 / bf16 only (fp64 uses the warp kernel).
constexpr int kTileRows = 64;
constexpr int kTileTokens = 128;
constexpr int kTileCols = 32;                      // a multiple of every m
constexpr int kTileThreads = 256;                  // 16 token lanes x 16 row lanes
// Slots per row and chunk: (kTileCols / m) * n <= kTileCols - kTileCols / m <= 30 (n <= m - 1).
constexpr int kTileMaxSlots = kTileCols - kTileCols / 16;
constexpr int kTileXStride = kTileTokens + 4;      // floats per staged column (16-byte aligned)

template <typename TV, typename TX>
__global__ void __launch_bounds__(kTileThreads)
    nm_forward_tiled_kernel(NmCudaShape s, const TV* __restrict__ values,
                            const uint8_t* __restrict__ meta, const TX* __restrict__ x,
                            int64_t tokens, const float* __restrict__ bias, TX* __restrict__ y) {
  __shared__ __align__(16) float xs[kTileCols * kTileXStride];
  __shared__ float2 ws[kTileRows * kTileMaxSlots];  // (value, xs offset of its column as int bits)
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols, R = s.rows, G = s.groups();
  const int n = static_cast<int>(s.n), m = static_cast<int>(s.m), bits = s.bits();
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int groups_per_chunk = kTileCols / m;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.y) * kTileTokens) {
    float acc[4][8];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int t = 0; t < 8; ++t) acc[i][t] = 0.f;
    for (int64_t g0 = 0; g0 < G; g0 += groups_per_chunk) {
      const int64_t k0 = g0 * m;
      const int chunk_groups = static_cast<int>(G - g0 < groups_per_chunk ? G - g0 : groups_per_chunk);
      const int slots = chunk_groups * n;  // <= kTileMaxSlots
      __syncthreads();  // the previous chunk's readers are done
      for (int e = tid; e < kTileCols * kTileTokens; e += kTileThreads) {
        const int t = e / kTileCols, c = e % kTileCols;
        const int64_t token = t0 + t, col = k0 + c;
        xs[c * kTileXStride + t] =
            token < tokens && col < K ? static_cast<float>(to_float(x[token * K + col])) : 0.f;
      }
      for (int e = tid; e < kTileRows * slots; e += kTileThreads) {
        const int row = e / slots, q = e % slots;
        const int64_t r = r0 + row, j = g0 * n + q;
        float v = 0.f;
        int col = 0;
        if (r < R) {
          v = static_cast<float>(to_float(values[r * kept + j]));
          col = (q / n) * m + static_cast<int>(read_index(meta + r * stride, j, bits));
        }
        ws[row * kTileMaxSlots + q] = make_float2(v, __int_as_float(col * kTileXStride));
      }
      __syncthreads();
      for (int q = 0; q < slots; ++q) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 w = ws[(ty * 4 + i) * kTileMaxSlots + q];
          const float* xc = xs + __float_as_int(w.y);
          const float4 a = *reinterpret_cast<const float4*>(xc + tx * 4);
          const float4 b = *reinterpret_cast<const float4*>(xc + 64 + tx * 4);
          acc[i][0] += w.x * a.x;
          acc[i][1] += w.x * a.y;
          acc[i][2] += w.x * a.z;
          acc[i][3] += w.x * a.w;
          acc[i][4] += w.x * b.x;
          acc[i][5] += w.x * b.y;
          acc[i][6] += w.x * b.z;
          acc[i][7] += w.x * b.w;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t r = r0 + ty * 4 + i;
      if (r >= R) continue;
      const float b = bias != nullptr ? bias[r] : 0.f;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const int64_t token = t0 + (t < 4 ? tx * 4 + t : 64 + tx * 4 + (t - 4));
        if (token < tokens) store(y + token * R + r, acc[i][t] + b);
      }
    }
  }
}

template <typename TV, typename TX>
cudaError_t launch_forward_tiled(const NmCudaShape& s, const void* values, const uint8_t* meta,
                                 const void* x, int64_t tokens, const void* bias, void* y,
                                 cudaStream_t stream) {
  const int64_t tiles = ceil_div(tokens, kTileTokens);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.rows, kTileRows)),
                  static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY));
  nm_forward_tiled_kernel<TV, TX><<<grid, kTileThreads, 0, stream>>>(
      s, static_cast<const TV*>(values), meta, static_cast<const TX*>(x), tokens,
      static_cast<const float*>(bias), static_cast<TX*>(y));
  return last_launch_error();
}

// ---- forward on tensor cores (16-bit, mid to large token counts) -------------------------------
// Sparse in memory, dense in shared memory: a block computes a [kMmaTokens, kMmaRows] tile of y.
// Per chunk of kMmaCols columns it stages the activations (as stored, 16-bit) and expands its
// rows' slots of the chunk into a zeroed dense [kMmaRows, kMmaCols] tile (one thread per (row,
// group), so slots naming one column are summed in order: deterministic), then 4 warps run
// 16x16x16 WMMA products (fp32 accumulation), each warp a 32 x 32 sub-tile. Only the n/m kept
// weights cross the memory bus; the tensor cores do the dense-tile math.
constexpr int kMmaTokens = 64;
constexpr int kMmaRows = 64;
constexpr int kMmaCols = 32;                  // a multiple of every m and of the WMMA k (16)
constexpr int kMmaThreads = 128;              // 4 warps in a 2 x 2 arrangement of 32 x 32
constexpr int kMmaLd = kMmaCols + 8;          // 16-bit elements per staged row (multiple of 8)
constexpr int kMmaOutLd = kMmaRows + 4;       // floats per staged output row (multiple of 4)

template <typename T>  // __half or __nv_bfloat16, both the values and the activations
__global__ void __launch_bounds__(kMmaThreads)
    nm_forward_mma_kernel(NmCudaShape s, const T* __restrict__ values,
                          const uint8_t* __restrict__ meta, const T* __restrict__ x,
                          int64_t tokens, const float* __restrict__ bias, T* __restrict__ y,
                          int64_t chunks_per_split, float* __restrict__ partial) {
  using namespace nvcuda;
  __shared__ __align__(32) T xs[kMmaTokens * kMmaLd];     // [token][column of the chunk]
  __shared__ __align__(32) T ws[kMmaRows * kMmaLd];       // [row][column of the chunk]
  __shared__ __align__(32) float cs[kMmaTokens * kMmaOutLd];  // [token][row] accumulators
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kWarp;
  const int wt = warp / 2, wr = warp % 2;  // the warp's sub-tile: tokens wt*32.., rows wr*32..
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols, R = s.rows, G = s.groups();
  const int n = static_cast<int>(s.n), m = static_cast<int>(s.m), bits = s.bits();
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  const int groups_per_chunk = kMmaCols / m;
  // This block's slice of the groups (split-K over blockIdx.z; one slice when partial is null).
  const int64_t g_begin = static_cast<int64_t>(blockIdx.z) * chunks_per_split * groups_per_chunk;
  const int64_t g_end =
      g_begin + chunks_per_split * groups_per_chunk < G ? g_begin + chunks_per_split * groups_per_chunk
                                                        : G;
  const T zero = from_float<T>(0.f);
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kMmaTokens; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.y) * kMmaTokens) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int64_t g0 = g_begin; g0 < g_end; g0 += groups_per_chunk) {
      const int64_t k0 = g0 * m;
      const int chunk_groups =
          static_cast<int>(g_end - g0 < groups_per_chunk ? g_end - g0 : groups_per_chunk);
      __syncthreads();  // the previous chunk's fragment loads are done
      // Activations: 8 consecutive columns per step, one 16-byte load when in bounds and aligned.
      for (int e = tid; e < kMmaTokens * (kMmaCols / 8); e += kMmaThreads) {
        const int t = e / (kMmaCols / 8), c8 = (e % (kMmaCols / 8)) * 8;
        const int64_t token = t0 + t, col = k0 + c8;
        T* dst = xs + t * kMmaLd + c8;
        const T* src = x + token * K + col;
        if (token < tokens && col + 8 <= K && (reinterpret_cast<uintptr_t>(src) & 15u) == 0) {
          *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
#pragma unroll
          for (int i = 0; i < 8; ++i) dst[i] = token < tokens && col + i < K ? src[i] : zero;
        }
      }
      for (int e = tid; e < kMmaRows * kMmaLd / 8; e += kMmaThreads)
        reinterpret_cast<uint4*>(ws)[e] = make_uint4(0u, 0u, 0u, 0u);
      __syncthreads();
      // Weights: one thread per (row, group) adds the group's slots into its own columns.
      for (int e = tid; e < kMmaRows * chunk_groups; e += kMmaThreads) {
        const int row = e / chunk_groups, gl = e % chunk_groups;
        const int64_t r = r0 + row;
        if (r >= R) continue;
        const int64_t g = g0 + gl;
        const uint8_t* mrow = meta + r * stride;
        for (int q = 0; q < n; ++q) {
          const int64_t j = g * n + q;
          const int c = gl * m + static_cast<int>(read_index(mrow, j, bits));  // < kMmaCols
          if (k0 + c >= K) continue;
          T* p = ws + row * kMmaLd + c;
          *p = from_float<T>(to_float(*p) + to_float(values[r * kept + j]));
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kMmaCols; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(a[i], xs + (wt * 32 + i * 16) * kMmaLd + kk, kMmaLd);
        // B = W^T restricted to the chunk: element (k, row) at ws[row * kMmaLd + k], column-major.
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(b[j], ws + (wr * 32 + j * 16) * kMmaLd + kk, kMmaLd);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(cs + (wt * 32 + i * 16) * kMmaOutLd + wr * 32 + j * 16, acc[i][j],
                                kMmaOutLd, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < kMmaTokens * kMmaRows; e += kMmaThreads) {
      const int t = e / kMmaRows, row = e % kMmaRows;
      const int64_t token = t0 + t, r = r0 + row;
      if (token >= tokens || r >= R) continue;
      if (partial == nullptr)
        store(y + token * R + r, cs[t * kMmaOutLd + row] + (bias != nullptr ? bias[r] : 0.f));
      else
        partial[(static_cast<int64_t>(blockIdx.z) * tokens + token) * R + r] =
            cs[t * kMmaOutLd + row];
    }
    __syncthreads();  // cs and the staging buffers are reused by the next token tile
  }
}

// Split-K partial sums of the tensor-core kernel, added in split order (deterministic):
//   y[t, r] = sum_z partial[z, t, r] + bias[r].   partial float [splits, tokens, rows].
template <typename T>
__global__ void __launch_bounds__(kFlatThreads)
    nm_split_reduce_kernel(int64_t splits, int64_t tokens, int64_t rows,
                           const float* __restrict__ partial, const float* __restrict__ bias,
                           T* __restrict__ y) {
  const int64_t total = tokens * rows;
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.f;
    for (int64_t z = 0; z < splits; ++z) sum += partial[z * total + flat];
    store(y + flat, sum + (bias != nullptr ? bias[flat % rows] : 0.f));
  }
}

// K splits of the tensor-core kernel: enough blocks to fill the GPU when rows x tokens alone give
// few (a block walks its K range serially, so few blocks would leave the kernel latency bound),
// at least kMmaMinChunksPerSplit chunks each. Guesses, to be tuned on a GPU.
constexpr int64_t kMmaTargetBlocks = 512;
constexpr int64_t kMmaMinChunksPerSplit = 4;
constexpr int64_t kMmaMaxSplits = 64;

int64_t mma_chunks(const NmCudaShape& s) { return ceil_div(s.groups(), kMmaCols / s.m); }

int64_t mma_splits(const NmCudaShape& s, int64_t tokens) {
  const int64_t tiles = ceil_div(tokens, kMmaTokens);
  const int64_t blocks = ceil_div(s.rows, kMmaRows) * (tiles < kMaxGridY ? tiles : kMaxGridY);
  int64_t splits = ceil_div(kMmaTargetBlocks, blocks > 0 ? blocks : 1);
  const int64_t by_chunks = mma_chunks(s) / kMmaMinChunksPerSplit;
  if (splits > by_chunks) splits = by_chunks;
  if (splits > kMmaMaxSplits) splits = kMmaMaxSplits;
  return splits > 1 ? splits : 1;
}

template <typename T>
cudaError_t launch_forward_mma(const NmCudaShape& s, const void* values, const uint8_t* meta,
                               const void* x, int64_t tokens, const void* bias, void* y,
                               float* workspace, int64_t workspace_floats, cudaStream_t stream) {
  int64_t splits = mma_splits(s, tokens);
  if (workspace == nullptr || workspace_floats < splits * tokens * s.rows) splits = 1;
  const int64_t chunks = mma_chunks(s);
  const int64_t chunks_per_split = ceil_div(chunks > 0 ? chunks : 1, splits);
  const int64_t tiles = ceil_div(tokens, kMmaTokens);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.rows, kMmaRows)),
                  static_cast<unsigned>(tiles < kMaxGridY ? tiles : kMaxGridY),
                  static_cast<unsigned>(splits));
  float* partial = splits > 1 ? workspace : nullptr;
  nm_forward_mma_kernel<T><<<grid, kMmaThreads, 0, stream>>>(
      s, static_cast<const T*>(values), meta, static_cast<const T*>(x), tokens,
      static_cast<const float*>(bias), static_cast<T*>(y), chunks_per_split, partial);
  cudaError_t status = last_launch_error();
  if (status != cudaSuccess || partial == nullptr) return status;
  const int64_t blocks = ceil_div(tokens * s.rows, kFlatThreads);
  nm_split_reduce_kernel<T>
      <<<static_cast<unsigned>(blocks < kMaxFlatBlocks ? blocks : kMaxFlatBlocks), kFlatThreads, 0,
         stream>>>(splits, tokens, s.rows, partial, static_cast<const float*>(bias),
                   static_cast<T*>(y));
  return last_launch_error();
}

// ---- input gradient ---------------------------------------------------------------------------
// A block owns 32 consecutive input columns (one per lane) and a tile of TT tokens; its
// kGradRowSplits warps each sum a contiguous range of rows, reading the n slots of the lane's
// group in every row (the lanes of a warp read neighbouring slots, so loads coalesce). The warps'
// partial sums are then added in warp order by warp 0: no atomics, deterministic.
constexpr int kGradRowSplits = 8;

template <typename TV, typename TD, int TT>
__global__ void __launch_bounds__(kGradRowSplits * kWarp)
    nm_grad_input_kernel(NmCudaShape s, const TV* __restrict__ values,
                         const uint8_t* __restrict__ meta, const TD* __restrict__ dy,
                         int64_t tokens, TD* __restrict__ dx) {
  using A = typename Accum<TV>::type;
  __shared__ A partial[kGradRowSplits][TT][kWarp];
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + lane;
  const bool valid = c < s.cols;
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols, R = s.rows;
  const int64_t n = s.n, m = s.m;
  const int bits = s.bits();
  const int64_t g = c / m;
  const uint32_t want = static_cast<uint32_t>(c - g * m);
  const int64_t rows_per_warp = ceil_div(R, kGradRowSplits);
  const int64_t r_begin = warp * rows_per_warp;
  const int64_t r_end = r_begin + rows_per_warp < R ? r_begin + rows_per_warp : R;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * TT; t0 < tokens;
       t0 += static_cast<int64_t>(gridDim.y) * TT) {
    const int nt = static_cast<int>(tokens - t0 < TT ? tokens - t0 : TT);
    A acc[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) acc[t] = A(0);
    if (valid) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const TV* vg = values + r * kept + g * n;
        const uint8_t* mrow = meta + r * stride;
        for (int64_t q = 0; q < n; ++q) {
          if (read_index(mrow, g * n + q, bits) != want) continue;
          const A v = static_cast<A>(to_float(vg[q]));
#pragma unroll
          for (int t = 0; t < TT; ++t)
            if (t < nt) acc[t] += v * static_cast<A>(to_float(dy[(t0 + t) * R + r]));
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) partial[warp][t][lane] = acc[t];
    __syncthreads();
    if (warp == 0 && valid) {
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t >= nt) continue;
        A sum = A(0);
        for (int w = 0; w < kGradRowSplits; ++w) sum += partial[w][t][lane];
        store(dx + (t0 + t) * K + c, sum);
      }
    }
    __syncthreads();  // partial is rewritten by the next token tile
  }
}

template <typename TV, typename TD>
cudaError_t launch_grad_input(const NmCudaShape& s, const void* values, const uint8_t* meta,
                              const void* dy, int64_t tokens, void* dx, cudaStream_t stream) {
  constexpr int TT = 4;
  const dim3 grid(static_cast<unsigned>(ceil_div(s.cols, kWarp)),
                  static_cast<unsigned>(ceil_div(tokens, TT) < kMaxGridY ? ceil_div(tokens, TT)
                                                                          : kMaxGridY));
  nm_grad_input_kernel<TV, TD, TT><<<grid, kGradRowSplits * kWarp, 0, stream>>>(
      s, static_cast<const TV*>(values), meta, static_cast<const TD*>(dy), tokens,
      static_cast<TD*>(dx));
  return last_launch_error();
}

// ---- values gradient (SDDMM) ------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kFlatThreads)
    nm_grad_values_kernel(NmCudaShape s, const uint8_t* __restrict__ meta,
                          const T* __restrict__ dy, const T* __restrict__ x, int64_t tokens,
                          typename Accum<T>::type* __restrict__ dv) {
  using A = typename Accum<T>::type;
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols, R = s.rows;
  const int64_t total = R * kept;
  const int bits = s.bits();
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = flat / kept, j = flat - r * kept;
    const int64_t col = (j / s.n) * s.m + read_index(meta + r * stride, j, bits);
    A acc = A(0);
    if (col < K)
      for (int64_t t = 0; t < tokens; ++t)
        acc += static_cast<A>(to_float(dy[t * R + r])) * static_cast<A>(to_float(x[t * K + col]));
    dv[flat] = acc;
  }
}

template <typename T>
cudaError_t launch_grad_values(const NmCudaShape& s, const uint8_t* meta, const void* dy,
                               const void* x, int64_t tokens, void* dv, cudaStream_t stream) {
  using A = typename Accum<T>::type;
  const int64_t blocks = ceil_div(s.rows * s.kept(), kFlatThreads);
  nm_grad_values_kernel<T><<<static_cast<unsigned>(blocks < kMaxFlatBlocks ? blocks : kMaxFlatBlocks),
                             kFlatThreads, 0, stream>>>(s, meta, static_cast<const T*>(dy),
                                                        static_cast<const T*>(x), tokens,
                                                        static_cast<A*>(dv));
  return last_launch_error();
}

// ---- validation and expansion -----------------------------------------------------------------
__global__ void __launch_bounds__(kFlatThreads)
    nm_validate_kernel(NmCudaShape s, const uint8_t* __restrict__ meta,
                       unsigned long long* __restrict__ error) {
  const int64_t G = s.groups(), n = s.n, stride = s.meta_stride();
  const int64_t total = s.rows * G;
  const int bits = s.bits();
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = flat / G, g = flat - r * G;
    const uint8_t* mrow = meta + r * stride;
    uint32_t previous = read_index(mrow, g * n, bits);
    for (int64_t q = 1; q < n; ++q) {
      const uint32_t idx = read_index(mrow, g * n + q, bits);
      if (idx <= previous) {
        atomicMin(error, static_cast<unsigned long long>(flat));
        break;
      }
      previous = idx;
    }
  }
}

// One thread per (row, group): it owns the group's m dense columns, so slots naming the same
// column (non-canonical metadata) are summed in slot order, as the CPU kernels do, with no race.
template <typename TV>
__global__ void __launch_bounds__(kFlatThreads)
    nm_expand_kernel(NmCudaShape s, const TV* __restrict__ values,
                     const uint8_t* __restrict__ meta, TV* __restrict__ dense) {
  using A = typename Accum<TV>::type;
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols, G = s.groups();
  const int64_t total = s.rows * G;
  const int bits = s.bits();
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = flat / G, g = flat - r * G;
    for (int64_t q = 0; q < s.n; ++q) {
      const int64_t j = g * s.n + q;
      const int64_t col = g * s.m + read_index(meta + r * stride, j, bits);
      if (col >= K) continue;
      TV* p = dense + r * K + col;
      store(p, static_cast<A>(to_float(*p)) + static_cast<A>(to_float(values[r * kept + j])));
    }
  }
}

template <typename TV>
cudaError_t launch_expand(const NmCudaShape& s, const void* values, const uint8_t* meta,
                          void* dense, cudaStream_t stream) {
  const int64_t blocks = ceil_div(s.rows * s.groups(), kFlatThreads);
  nm_expand_kernel<TV><<<static_cast<unsigned>(blocks < kMaxFlatBlocks ? blocks : kMaxFlatBlocks),
                         kFlatThreads, 0, stream>>>(s, static_cast<const TV*>(values), meta,
                                                    static_cast<TV*>(dense));
  return last_launch_error();
}

// One thread per slot: dv[r, j] = dense[r, col(r, j)] (0 for a padding column), as Accum<T>.
template <typename T>
__global__ void __launch_bounds__(kFlatThreads)
    nm_gather_kernel(NmCudaShape s, const uint8_t* __restrict__ meta, const T* __restrict__ dense,
                     typename Accum<T>::type* __restrict__ dv) {
  using A = typename Accum<T>::type;
  const int64_t kept = s.kept(), stride = s.meta_stride(), K = s.cols;
  const int64_t total = s.rows * kept;
  const int bits = s.bits();
  for (int64_t flat = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; flat < total;
       flat += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = flat / kept, j = flat - r * kept;
    const int64_t col = (j / s.n) * s.m + read_index(meta + r * stride, j, bits);
    dv[flat] = col < K ? static_cast<A>(to_float(dense[r * K + col])) : A(0);
  }
}

template <typename T>
cudaError_t launch_gather(const NmCudaShape& s, const uint8_t* meta, const void* dense, void* dv,
                          cudaStream_t stream) {
  using A = typename Accum<T>::type;
  const int64_t blocks = ceil_div(s.rows * s.kept(), kFlatThreads);
  nm_gather_kernel<T><<<static_cast<unsigned>(blocks < kMaxFlatBlocks ? blocks : kMaxFlatBlocks),
                        kFlatThreads, 0, stream>>>(s, meta, static_cast<const T*>(dense),
                                                   static_cast<A*>(dv));
  return last_launch_error();
}

bool shape_ok(const NmCudaShape& s) {
  return (s.m == 4 || s.m == 8 || s.m == 16) && s.n >= 1 && s.n < s.m && s.rows >= 0 && s.cols >= 0;
}

// Calls fn.template operator()<TV, TX>() for a supported (value, activation) pair.
template <typename Fn>
cudaError_t dispatch_pair(CudaDType vd, CudaDType xd, const Fn& fn) {
  if (vd == CudaDType::kF32 && xd == CudaDType::kF32) return fn(float{}, float{});
  if (vd == CudaDType::kF16 && xd == CudaDType::kF16) return fn(__half{}, __half{});
  if (vd == CudaDType::kBF16 && xd == CudaDType::kBF16) return fn(__nv_bfloat16{}, __nv_bfloat16{});
  if (vd == CudaDType::kF64 && xd == CudaDType::kF64) return fn(double{}, double{});
  if (vd == CudaDType::kF16 && xd == CudaDType::kF32) return fn(__half{}, float{});
  if (vd == CudaDType::kBF16 && xd == CudaDType::kF32) return fn(__nv_bfloat16{}, float{});
  return cudaErrorInvalidValue;
}

}  // namespace

bool nm_cuda_supported(CudaDType value_dtype, CudaDType act_dtype) {
  if (value_dtype == act_dtype) return true;
  return act_dtype == CudaDType::kF32 &&
         (value_dtype == CudaDType::kF16 || value_dtype == CudaDType::kBF16);
}

int64_t nm_cuda_forward_workspace(const NmCudaShape& s, CudaDType value_dtype,
                                  CudaDType act_dtype, int64_t tokens) {
  if (!shape_ok(s) || tokens < kMmaMinTokens || s.rows == 0 || value_dtype != act_dtype ||
      (value_dtype != CudaDType::kF16 && value_dtype != CudaDType::kBF16))
    return 0;
  const int64_t splits = mma_splits(s, tokens);
  return splits > 1 ? splits * tokens * s.rows : 0;
}

cudaError_t nm_cuda_forward(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                            const uint8_t* metadata, CudaDType act_dtype, const void* x,
                            int64_t tokens, const void* bias, void* y, float* workspace,
                            int64_t workspace_floats, cudaStream_t stream) {
  if (!shape_ok(s) || tokens < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || s.rows == 0) return cudaSuccess;
  return dispatch_pair(value_dtype, act_dtype, [&](auto v, auto a) {
    using TV = decltype(v);
    using TX = decltype(a);
    return launch_forward<TV, TX>(s, values, metadata, x, tokens, bias, y, workspace,
                                  workspace_floats, stream);
  });
}

cudaError_t nm_cuda_grad_input(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                               const uint8_t* metadata, CudaDType act_dtype, const void* dy,
                               int64_t tokens, void* dx, cudaStream_t stream) {
  if (!shape_ok(s) || tokens < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || s.cols == 0) return cudaSuccess;
  return dispatch_pair(value_dtype, act_dtype, [&](auto v, auto a) {
    using TV = decltype(v);
    using TD = decltype(a);
    return launch_grad_input<TV, TD>(s, values, metadata, dy, tokens, dx, stream);
  });
}

cudaError_t nm_cuda_grad_values(const NmCudaShape& s, const uint8_t* metadata, CudaDType act_dtype,
                                const void* dy, const void* x, int64_t tokens, void* dv,
                                cudaStream_t stream) {
  if (!shape_ok(s) || tokens < 0) return cudaErrorInvalidValue;
  if (s.rows == 0 || s.kept() == 0) return cudaSuccess;
  switch (act_dtype) {
    case CudaDType::kF32: return launch_grad_values<float>(s, metadata, dy, x, tokens, dv, stream);
    case CudaDType::kF16: return launch_grad_values<__half>(s, metadata, dy, x, tokens, dv, stream);
    case CudaDType::kBF16:
      return launch_grad_values<__nv_bfloat16>(s, metadata, dy, x, tokens, dv, stream);
    case CudaDType::kF64: return launch_grad_values<double>(s, metadata, dy, x, tokens, dv, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nm_cuda_validate(const NmCudaShape& s, const uint8_t* metadata, int64_t* error,
                             cudaStream_t stream) {
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  // All bits set: -1 as int64 (well-formed), the largest value for atomicMin.
  cudaError_t status = cudaMemsetAsync(error, 0xff, sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  const int64_t total = s.rows * s.groups();
  if (total == 0 || s.n == 1) return cudaSuccess;
  const int64_t blocks = ceil_div(total, kFlatThreads);
  nm_validate_kernel<<<static_cast<unsigned>(blocks < kMaxFlatBlocks ? blocks : kMaxFlatBlocks),
                       kFlatThreads, 0, stream>>>(s, metadata,
                                                  reinterpret_cast<unsigned long long*>(error));
  return last_launch_error();
}

cudaError_t nm_cuda_expand(const NmCudaShape& s, CudaDType value_dtype, const void* values,
                           const uint8_t* metadata, void* dense, cudaStream_t stream) {
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  if (s.rows == 0 || s.kept() == 0) return cudaSuccess;
  switch (value_dtype) {
    case CudaDType::kF32: return launch_expand<float>(s, values, metadata, dense, stream);
    case CudaDType::kF16: return launch_expand<__half>(s, values, metadata, dense, stream);
    case CudaDType::kBF16: return launch_expand<__nv_bfloat16>(s, values, metadata, dense, stream);
    case CudaDType::kF64: return launch_expand<double>(s, values, metadata, dense, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t nm_cuda_gather_slots(const NmCudaShape& s, const uint8_t* metadata,
                                 CudaDType dense_dtype, const void* dense, void* dv,
                                 cudaStream_t stream) {
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  if (s.rows == 0 || s.kept() == 0) return cudaSuccess;
  switch (dense_dtype) {
    case CudaDType::kF32: return launch_gather<float>(s, metadata, dense, dv, stream);
    case CudaDType::kF16: return launch_gather<__half>(s, metadata, dense, dv, stream);
    case CudaDType::kBF16: return launch_gather<__nv_bfloat16>(s, metadata, dense, dv, stream);
    case CudaDType::kF64: return launch_gather<double>(s, metadata, dense, dv, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparse_ext

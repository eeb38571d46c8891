// CUDA kernels of the SpMM family (blocked-CSR sparse weight x dense activations), torch-free.
//
// Weight format: exactly the CPU one (csrc/kernels/spmm/spmm.h), on the device:
//   W [M, K] in row groups of R in {1, 2, 4, 8} rows sharing one column pattern; G = M / R groups;
//   KB = ceil(K / 256) column blocks.
//     offsets int32 [G * KB + 1]   segment (g, kb) = entries offsets[g*KB + kb] .. offsets[g*KB+kb+1]
//     indices uint8 [nnz]          column - 256 * kb of each entry
//     values  T     [nnz * R]      entry j holds rows g*R + r at values[j*R + r]
//
// Every launcher below takes raw device pointers, sizes and a stream and returns the launch status
// (cudaSuccess or the error of the first failing launch). Every compute kernel is bounds-safe on
// its own: offsets are clamped to [0, nnz], entries whose column is >= K are skipped and row-group
// ids from `order` outside [0, G) are skipped, so even a structure that bypassed validation never
// makes a kernel read or write outside the documented buffers.
//
// Storage dtype T of the activations, values and output is one of float, __half, __nv_bfloat16,
// double (CudaDType); accumulation is fp32 (fp64 for double). Bias may have any of these dtypes
// (SpmmEpilogue::bias_dtype); it is converted to the accumulator type when added.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_utils.cuh"

namespace sparse_ext {
namespace cuda {

constexpr int kSpmmKBlockCuda = 256;

// Device view of a blocked-CSR weight (pointers are device pointers).
struct SpmmDeviceWeight {
  int64_t rows;        // M
  int64_t cols;        // K
  int64_t block_rows;  // R
  int64_t nnz;         // entries (each carries R values)
  const int32_t* offsets;  // [G * KB + 1]
  const uint8_t* indices;  // [nnz]
  const void* values;      // T [nnz * R], may be null for structure-only launchers
};

// Structure validation codes written by spmm_validate_cuda (0 = well-formed). When several
// problems exist the code of the first check the CPU validator would report wins.
enum SpmmStructureError : int32_t {
  kSpmmOk = 0,
  kSpmmIndexOutOfRange = 1,  // an in-block index + block start >= K
  kSpmmEndMismatch = 2,      // offsets[G*KB] != nnz
  kSpmmDecreasing = 3,       // offsets[s + 1] < offsets[s] for some s
  kSpmmBadStart = 4,         // offsets[0] != 0
};

// Validates the structure on the device and writes the worst SpmmStructureError to *error.
//   error  int32 [1] device memory; the launcher zeroes it first (async, on `stream`).
cudaError_t spmm_validate_cuda(const SpmmDeviceWeight& w, int32_t* error, cudaStream_t stream);

// Row groups ordered by decreasing nonzero count (ties by group id) are passed in as `order`
// (int32 [G], a permutation of 0..G-1); the glue builds it with a stable device sort. Longest
// groups are scheduled first, so the tail of the grid is made of short rows (load balance).

// Transposes with zero padding: out[k, n] = n < N ? in[n, k] : 0 for k < K, n < ld.
//   in T [batch][N, K] (row stride K, batch stride N*K), out T [batch][K, ld] (ld >= N).
cudaError_t transpose_pad_cuda(CudaDType dtype, const void* in, int64_t N, int64_t K, int64_t ld,
                               int64_t batch, void* out, cudaStream_t stream);

// The SpMM product in two layouts, with bias and clamp fused:
//   out = clamp(W * X + bias, out_min, out_max) where X [K, N] is column n = token/pixel n.
struct SpmmEpilogue {
  const void* bias;     // bias_dtype [M] or nullptr; converted to the accumulator type on load
  CudaDType bias_dtype;  // any storage dtype (no conversion pass for an fp16/bf16 bias)
  double out_min;       // -inf for none
  double out_max;       // +inf for none
};

// Few tokens (decode, N <= kSpmmGatherMaxTokens): x is token-major x [N, K] as given by the user;
// one warp per row group gathers x[n, col] for its entries (lanes stride over the entries, R*N
// fp32 accumulators per lane) and reduces with warp_sum. Coalescing over tokens does not matter
// here: a handful of tokens means the weight stream dominates, and it is read coalesced.
//   x T [N, K]; y T [N, M] (token-major, row stride M); order int32 [G].
constexpr int64_t kSpmmGatherMaxTokens = 8;
cudaError_t spmm_gather_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                             const void* x, int64_t N, const SpmmEpilogue& ep, void* y,
                             cudaStream_t stream);

// Many tokens (Sputnik-style): the activations are given transposed, xT [K, ldx] per batch item,
// so each nonzero reads a contiguous run of tokens; a subwarp of S lanes owns one row group and
// S * V consecutive tokens (V = 16 bytes / sizeof(T) per lane, one 128-bit load per nonzero when
// ldx % V == 0 and the pointer is 16-byte aligned; scalar guarded loads otherwise).
//   xT   T [batch][K, ldx], columns n < N are used (batch stride x_batch_stride elements).
//   Output, selected by `y_token_major`:
//     true : y[b][n * ldy + m]   (SpMM: y [N, M] token-major, ldy = M)
//     false: y[b][m * ldy + n]   (conv 1x1: y [M, P] per image, ldy = P)
//   y batch stride y_batch_stride elements; order int32 [G].
struct SpmmTiledArgs {
  const void* xT;
  int64_t ldx;
  int64_t x_batch_stride;
  int64_t N;
  int64_t batch;
  void* y;
  int64_t ldy;
  int64_t y_batch_stride;
  bool y_token_major;
};
cudaError_t spmm_tiled_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const int32_t* order,
                            const SpmmTiledArgs& a, const SpmmEpilogue& ep, cudaStream_t stream);

// SDDMM for the values gradient: dv[j*R + r] = sum_{n < ld} dyT[g*R + r, n] * xT[col(j), n]
// for every stored entry j of row group g (columns n >= N of both operands are zero padding).
// One subwarp per entry (its segment found by binary search over offsets, so work is balanced
// by entries), lanes stride over tokens with vector loads, warp_sum reduction: deterministic.
//   dyT T [M, ld], xT T [K, ld], dv Acc [nnz * R] (Acc = float, or double for kF64).
cudaError_t spmm_sddmm_cuda(CudaDType dtype, const SpmmDeviceWeight& w, const void* dyT,
                            const void* xT, int64_t ld, void* dv, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparse_ext

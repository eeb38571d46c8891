// MoE permute: deterministic, stable counting sort of (token, slot) pairs by expert, with the
// CPU op's capacity semantics. See moe_cuda.h for the algorithm summary and the buffers.
//
// Pass (one per sequence order): the sequence position s of pair i is s = i (flat order) or
// s = j * T + t (slot-major order, pair i = t * k + j). Block c ranks positions
// [c * kPermuteChunk, (c + 1) * kPermuteChunk) within the chunk (rank[s] = earlier positions of
// the chunk in the same bucket) and writes counts[b * C + c] = pairs of bucket b in chunk c. An
// exclusive scan of counts (bucket-major) turns it into the first output position of
// (bucket b, chunk c), so pair s goes to counts[b * C + c] + rank[s]: stable, no atomics.
#include "../common/cuda_utils.cuh"
#include "moe_cuda.h"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kScanThreads = 1024;
constexpr int kScanItems = 8;

__global__ void permute_validate_kernel(const int64_t* __restrict__ indices, int64_t P, int64_t E,
                                        unsigned long long* first_bad) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = indices[i];
    if (e < 0 || e >= E) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
}

__device__ __forceinline__ int64_t pair_of(int64_t s, int64_t T, int64_t k, bool slot_major) {
  return slot_major ? (s % T) * k + s / T : s;
}

// Bucket of pair i: its expert when valid (and kept, in the placement pass), else E.
__device__ __forceinline__ int32_t bucket_of(const int64_t* indices, const uint8_t* kept,
                                             int64_t i, int64_t E) {
  const int64_t e = indices[i];
  const bool valid = e >= 0 && e < E && (kept == nullptr || kept[i] != 0);
  return static_cast<int32_t>(valid ? e : E);
}

__global__ void permute_rank_kernel(const int64_t* __restrict__ indices,
                                    const uint8_t* __restrict__ kept, int64_t T, int64_t k,
                                    int64_t E, int64_t P, int64_t C, bool slot_major,
                                    int32_t* __restrict__ counts, int32_t* __restrict__ rank) {
  __shared__ int32_t bucket_s[kPermuteChunk];
  const int64_t c = blockIdx.x;
  const int64_t s = c * kPermuteChunk + threadIdx.x;
  int32_t b = -1;
  if (s < P) b = bucket_of(indices, kept, pair_of(s, T, k, slot_major), E);
  bucket_s[threadIdx.x] = b;
  __syncthreads();
  if (s >= P) return;
  int32_t r = 0;
  for (int u = 0; u < static_cast<int>(threadIdx.x); ++u) r += bucket_s[u] == b ? 1 : 0;
  bool last = true;
  for (int u = threadIdx.x + 1; u < kPermuteChunk && last; ++u) last = bucket_s[u] != b;
  rank[s] = r;
  if (last) counts[static_cast<int64_t>(b) * C + c] = r + 1;
}

// In-place exclusive scan of n int32 values by one block (tiles of kScanThreads * kScanItems).
__global__ void __launch_bounds__(kScanThreads) exclusive_scan_kernel(int32_t* data, int64_t n) {
  __shared__ int32_t warp_incl[kScanThreads / 32];
  __shared__ int32_t carry_s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kScanThreads / 32;
  if (threadIdx.x == 0) carry_s = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += static_cast<int64_t>(kScanThreads) * kScanItems) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int32_t v[kScanItems];
    int32_t local = 0;
#pragma unroll
    for (int q = 0; q < kScanItems; ++q) {
      v[q] = first + q < n ? data[first + q] : 0;
      local += v[q];
    }
    int32_t incl = local;  // inclusive warp scan of the thread totals
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    if (lane == 31) warp_incl[warp] = incl;
    __syncthreads();
    if (warp == 0) {
      int32_t w = lane < kWarps ? warp_incl[lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int32_t y = __shfl_up_sync(0xffffffffu, w, o);
        if (lane >= o) w += y;
      }
      if (lane < kWarps) warp_incl[lane] = w;
    }
    __syncthreads();
    int32_t run = carry_s + (warp > 0 ? warp_incl[warp - 1] : 0) + incl - local;
#pragma unroll
    for (int q = 0; q < kScanItems; ++q) {
      if (first + q < n) data[first + q] = run;
      run += v[q];
    }
    __syncthreads();
    if (threadIdx.x == 0) carry_s += warp_incl[kWarps - 1];
    __syncthreads();
  }
}

// Capacity pass: kept[i] = valid expert and rank within the expert (slot-major) < capacity.
__global__ void permute_keep_kernel(const int64_t* __restrict__ indices, int64_t T, int64_t k,
                                    int64_t E, int64_t P, int64_t C, int64_t capacity,
                                    const int32_t* __restrict__ starts,
                                    const int32_t* __restrict__ rank, uint8_t* __restrict__ kept) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < P;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = pair_of(s, T, k, true);
    const int32_t b = bucket_of(indices, nullptr, i, E);
    const int64_t c = s / kPermuteChunk;
    // Rank within the expert: the scan counts every smaller bucket too, so subtract the
    // bucket's first position (its chunk-0 start).
    const int32_t* sb = starts + static_cast<int64_t>(b) * C;
    const int64_t pos = static_cast<int64_t>(sb[c]) - sb[0] + rank[s];
    kept[i] = (b < E && pos < capacity) ? 1 : 0;
  }
}

// Placement pass (flat order): row of pair i, row_token and inverse.
__global__ void permute_place_kernel(const int64_t* __restrict__ indices,
                                     const uint8_t* __restrict__ kept, int64_t k, int64_t E,
                                     int64_t P, int64_t C, const int32_t* __restrict__ starts,
                                     const int32_t* __restrict__ rank,
                                     int64_t* __restrict__ row_token,
                                     int64_t* __restrict__ inverse) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < P;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t b = bucket_of(indices, kept, i, E);
    const int64_t c = i / kPermuteChunk;
    const int64_t row = static_cast<int64_t>(starts[static_cast<int64_t>(b) * C + c]) + rank[i];
    inverse[i] = row;
    if (row >= 0 && row < P) row_token[row] = i / k;  // always true: the sort is a bijection
  }
}

__global__ void permute_offsets_kernel(const int32_t* __restrict__ starts, int64_t E, int64_t C,
                                       int64_t* __restrict__ offsets) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e <= E;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    offsets[e] = C > 0 ? static_cast<int64_t>(starts[e * C]) : 0;
}

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// One counting-sort pass: rank, zeroed counts, scan. Leaves the bucket-major starts in counts.
cudaError_t sort_pass(const int64_t* indices, const uint8_t* kept, int64_t T, int64_t k, int64_t E,
                      int64_t P, int64_t C, bool slot_major, int32_t* counts, int32_t* rank,
                      cudaStream_t stream) {
  const int64_t n = (E + 1) * C;
  cudaError_t st = cudaMemsetAsync(counts, 0, static_cast<size_t>(n) * sizeof(int32_t), stream);
  if (st != cudaSuccess) return st;
  permute_rank_kernel<<<static_cast<unsigned>(C), kPermuteChunk, 0, stream>>>(
      indices, kept, T, k, E, P, C, slot_major, counts, rank);
  st = cudaGetLastError();
  if (st != cudaSuccess) return st;
  exclusive_scan_kernel<<<1, kScanThreads, 0, stream>>>(counts, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t moe_permute_validate(const int64_t* indices, int64_t P, int64_t E,
                                 unsigned long long* first_bad, cudaStream_t stream) {
  cudaError_t st = cudaMemsetAsync(first_bad, 0xff, sizeof(unsigned long long), stream);
  if (st != cudaSuccess || P <= 0) return st;
  permute_validate_kernel<<<grid_for(P, 256), 256, 0, stream>>>(indices, P, E, first_bad);
  return cudaGetLastError();
}

int64_t moe_permute_count_elems(int64_t P, int64_t E) {
  return (E + 1) * ceil_div(P, kPermuteChunk);
}

cudaError_t moe_permute(const int64_t* indices, int64_t T, int64_t k, int64_t E, int64_t capacity,
                        int32_t* counts, int32_t* rank, uint8_t* kept, int64_t* row_token,
                        int64_t* offsets, int64_t* inverse, cudaStream_t stream) {
  const int64_t P = T * k;
  const int64_t C = ceil_div(P, kPermuteChunk);
  if (C > 2147483647LL) return cudaErrorInvalidValue;
  cudaError_t st;
  if (P > 0) {
    if (capacity >= 0) {
      st = sort_pass(indices, nullptr, T, k, E, P, C, /*slot_major=*/true, counts, rank, stream);
      if (st != cudaSuccess) return st;
      permute_keep_kernel<<<grid_for(P, 256), 256, 0, stream>>>(indices, T, k, E, P, C, capacity,
                                                                counts, rank, kept);
      st = cudaGetLastError();
      if (st != cudaSuccess) return st;
    }
    const uint8_t* keep = capacity >= 0 ? kept : nullptr;
    st = sort_pass(indices, keep, T, k, E, P, C, /*slot_major=*/false, counts, rank, stream);
    if (st != cudaSuccess) return st;
    permute_place_kernel<<<grid_for(P, 256), 256, 0, stream>>>(indices, keep, k, E, P, C, counts,
                                                               rank, row_token, inverse);
    st = cudaGetLastError();
    if (st != cudaSuccess) return st;
  }
  permute_offsets_kernel<<<grid_for(E + 1, 256), 256, 0, stream>>>(counts, E, C, offsets);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace sparse_ext

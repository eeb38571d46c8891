// Fused MoE routing: scores (softmax | sigmoid) + optional grouped top-k with a selection bias +
// top-k + renormalization, one warp per token. See moe_cuda.h for the buffers.
//
// Selection without a "chosen" set: experts are totally ordered by (selection value descending,
// expert index ascending), NaN after every number. Round r picks the best expert ranked after the
// round r-1 pick, so k rounds of a warp arg-max yield exactly torch.topk's order (ties to the lower
// index) in O(k * E / 32) per lane and no per-token state beyond the scores.
#include "../common/cuda_utils.cuh"
#include "moe_cuda.h"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxSmemBytes = 48 * 1024;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float dev_exp(float v) { return expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return exp(v); }

// Strict total order: a ranks before b.
template <typename S>
__device__ __forceinline__ bool ranks_before(S va, int64_t ia, S vb, int64_t ib) {
  const bool na = va != va, nb = vb != vb;
  if (na || nb) return nb && (!na || ia < ib);
  return va > vb || (va == vb && ia < ib);
}

// Per-token scratch: score[E], sel[E], group value[G], group kept flag[G] (as S 0/1).
__host__ __device__ inline int64_t per_token_elems(int64_t E, int64_t G) { return 2 * E + 2 * G; }

// Warp arg-max over ids [0, n) of vals[id] restricted to allowed ids ranked after (pv, pid) when
// has_prev. Every lane returns the same (found, value, id).
template <typename S, typename Allowed>
__device__ bool warp_next_best(const S* vals, int64_t n, bool has_prev, S pv, int64_t pid,
                               Allowed allowed, S& best_v, int64_t& best_id) {
  const int lane = threadIdx.x & 31;
  bool found = false;
  S bv = S(0);
  int64_t bid = 0;
  for (int64_t id = lane; id < n; id += 32) {
    if (!allowed(id)) continue;
    const S v = vals[id];
    if (has_prev && !ranks_before(pv, pid, v, id)) continue;
    if (!found || ranks_before(v, id, bv, bid)) {
      found = true;
      bv = v;
      bid = id;
    }
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const int of = __shfl_xor_sync(kFull, static_cast<int>(found), offset);
    const S ov = __shfl_xor_sync(kFull, bv, offset);
    const long long oid = __shfl_xor_sync(kFull, static_cast<long long>(bid), offset);
    if (of && (!found || ranks_before(ov, static_cast<int64_t>(oid), bv, bid))) {
      found = true;
      bv = ov;
      bid = oid;
    }
  }
  best_v = bv;
  best_id = bid;
  return found;
}

template <typename S>
__global__ void route_kernel(const S* __restrict__ logits, const S* __restrict__ bias, int64_t T,
                             int64_t E, int64_t k, int scoring, bool renormalize, int64_t G,
                             int64_t TG, S* global_scratch, S* __restrict__ weights,
                             int64_t* __restrict__ indices) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + warp;
  if (t >= T) return;  // uniform per warp; no block-level barriers below
  const int64_t per = per_token_elems(E, G);
  S* scratch = global_scratch != nullptr ? global_scratch + t * per
                                         : reinterpret_cast<S*>(smem_raw) + warp * per;
  S* score = scratch;
  S* sel = scratch + E;
  S* gval = scratch + 2 * E;
  S* gkeep = scratch + 2 * E + G;
  const S* l = logits + t * E;

  if (scoring == 0) {
    S mx = l[0];
    for (int64_t e = lane; e < E; e += 32) mx = fmax(mx, l[e]);
    for (int offset = 16; offset > 0; offset >>= 1) mx = fmax(mx, __shfl_xor_sync(kFull, mx, offset));
    mx = __shfl_sync(kFull, mx, 0);
    S sum = S(0);
    for (int64_t e = lane; e < E; e += 32) {
      const S v = dev_exp(l[e] - mx);
      score[e] = v;
      sum += v;
    }
    sum = warp_sum(sum);
    sum = __shfl_sync(kFull, sum, 0);  // one value for every lane (xor sums may differ by lane)
    for (int64_t e = lane; e < E; e += 32) score[e] /= sum;
  } else {
    for (int64_t e = lane; e < E; e += 32) score[e] = S(1) / (S(1) + dev_exp(-l[e]));
  }
  for (int64_t e = lane; e < E; e += 32) sel[e] = bias != nullptr ? score[e] + bias[e] : score[e];
  __syncwarp();

  const int64_t gsize = E / G;
  if (G > 1) {
    // Group score: sum of the two largest selection values (the CPU op's exact recurrence).
    for (int64_t g = lane; g < G; g += 32) {
      const S* s = sel + g * gsize;
      S b0 = s[0], b1 = S(0);
      bool has1 = false;
      for (int64_t e = 1; e < gsize; ++e) {
        const S v = s[e];
        if (v > b0) {
          b1 = b0;
          b0 = v;
          has1 = true;
        } else if (!has1 || v > b1) {
          b1 = v;
          has1 = true;
        }
      }
      gval[g] = has1 ? b0 + b1 : b0;
      gkeep[g] = S(0);
    }
    __syncwarp();
    bool has_prev = false;
    S pv = S(0);
    int64_t pid = 0;
    for (int64_t r = 0; r < TG; ++r) {
      S bv;
      int64_t bid;
      if (!warp_next_best(gval, G, has_prev, pv, pid, [](int64_t) { return true; }, bv, bid)) break;
      if (lane == 0) gkeep[bid] = S(1);
      has_prev = true;
      pv = bv;
      pid = bid;
    }
    __syncwarp();
  }

  bool has_prev = false;
  S pv = S(0);
  int64_t pid = 0;
  S total = S(0);
  for (int64_t r = 0; r < k; ++r) {
    S bv;
    int64_t bid;
    const bool found = warp_next_best(
        sel, E, has_prev, pv, pid,
        [&](int64_t e) { return G == 1 || gkeep[e / gsize] != S(0); }, bv, bid);
    // Validation guarantees at least k allowed experts; the fallback only keeps writes defined.
    if (!found) bid = r < E ? r : 0;
    if (lane == 0) {
      indices[t * k + r] = bid;
      weights[t * k + r] = score[bid];
      total += score[bid];
    }
    has_prev = true;
    pv = sel[bid];
    pid = bid;
  }
  if (renormalize && lane == 0) {
    const S scale = S(1) / total;
    for (int64_t r = 0; r < k; ++r) weights[t * k + r] = score[indices[t * k + r]] * scale;
  }
}

}  // namespace

int64_t moe_route_scratch_elems(int64_t T, int64_t E, int64_t G, bool f64) {
  const int64_t bytes = per_token_elems(E, G) * (f64 ? 8 : 4);
  return bytes <= kMaxSmemBytes ? 0 : T * per_token_elems(E, G);
}

template <typename S>
cudaError_t moe_route(const S* logits, const S* selection_bias, int64_t T, int64_t E, int64_t k,
                      int scoring, bool renormalize, int64_t num_groups, int64_t topk_groups,
                      S* scratch, S* weights, int64_t* indices, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  const int64_t per_bytes = per_token_elems(E, num_groups) * static_cast<int64_t>(sizeof(S));
  int warps = kWarpsPerBlock;
  size_t smem = 0;
  if (scratch == nullptr) {
    if (per_bytes * kWarpsPerBlock > kMaxSmemBytes) warps = 1;
    if (per_bytes * warps > kMaxSmemBytes) return cudaErrorInvalidValue;  // caller must pass scratch
    smem = static_cast<size_t>(per_bytes * warps);
  }
  const int64_t blocks = ceil_div(T, warps);
  route_kernel<S><<<static_cast<unsigned>(blocks), warps * 32, smem, stream>>>(
      logits, selection_bias, T, E, k, scoring, renormalize, num_groups, topk_groups, scratch,
      weights, indices);
  return cudaGetLastError();
}

template cudaError_t moe_route<float>(const float*, const float*, int64_t, int64_t, int64_t, int,
                                      bool, int64_t, int64_t, float*, float*, int64_t*,
                                      cudaStream_t);
template cudaError_t moe_route<double>(const double*, const double*, int64_t, int64_t, int64_t,
                                       int, bool, int64_t, int64_t, double*, double*, int64_t*,
                                       cudaStream_t);

}  // namespace cuda
}  // namespace sparse_ext

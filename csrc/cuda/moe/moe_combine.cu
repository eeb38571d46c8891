// MoE combine and its backward: one block per token, the k expert rows summed in j order and the
// weight gradients reduced in a fixed tree (deterministic, no float atomics). See moe_cuda.h.
#include "../common/cuda_utils.cuh"
#include "moe_cuda.h"

namespace sparse_ext {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n, int threads) {
  const int64_t blocks = ceil_div(n, threads);
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

__global__ void combine_validate_kernel(const int64_t* __restrict__ inverse, int64_t pairs,
                                        int64_t rows, unsigned long long* first_pair,
                                        unsigned long long* error) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = inverse[i];
    if (r < 0 || r >= rows) atomicMin(&error[0], static_cast<unsigned long long>(i));
    else if (first_pair != nullptr) atomicMin(&first_pair[r], static_cast<unsigned long long>(i));
  }
}

__global__ void combine_repeat_kernel(const int64_t* __restrict__ inverse, int64_t pairs,
                                      int64_t rows, const unsigned long long* first_pair,
                                      unsigned long long* error) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = inverse[i];
    if (r >= 0 && r < rows && first_pair[r] != static_cast<unsigned long long>(i))
      atomicMin(&error[1], static_cast<unsigned long long>(i));
  }
}

template <typename TY, typename S>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const TY* __restrict__ y, const S* __restrict__ weights,
                   const int64_t* __restrict__ inverse, int64_t T, int64_t k, int64_t H,
                   int64_t rows, S* __restrict__ out) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
      S acc = S(0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t r = inverse[t * k + j];
        if (r < 0 || r >= rows) continue;  // rejected by validation; never read out of bounds
        const S v = static_cast<S>(to_float(y[r * H + c]));
        acc = j == 0 ? weights[t * k + j] * v : acc + weights[t * k + j] * v;
      }
      out[t * H + c] = acc;
    }
  }
}

template <typename TY, typename S>
__global__ void __launch_bounds__(kThreads)
    combine_backward_kernel(const S* __restrict__ grad_out, const TY* __restrict__ y,
                            const S* __restrict__ weights, const int64_t* __restrict__ inverse,
                            int64_t T, int64_t k, int64_t H, int64_t rows, S* __restrict__ grad_y,
                            S* __restrict__ grad_w) {
  __shared__ S partial[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const S* g = grad_out + t * H;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = inverse[t * k + j];
      const bool valid = r >= 0 && r < rows;
      const S w = weights[t * k + j];
      S dot = S(0);
      if (valid) {
        for (int64_t c = threadIdx.x; c < H; c += blockDim.x) {
          const S gv = g[c];
          grad_y[r * H + c] = w * gv;
          dot += gv * static_cast<S>(to_float(y[r * H + c]));
        }
      }
      dot = warp_sum(dot);
      if (lane == 0) partial[warp] = dot;
      __syncthreads();
      if (threadIdx.x == 0) {
        S total = S(0);
        for (int q = 0; q < kThreads / 32; ++q) total += partial[q];
        grad_w[t * k + j] = valid ? total : S(0);
      }
      __syncthreads();
    }
  }
}

}  // namespace

cudaError_t moe_combine_validate(const int64_t* inverse, int64_t pairs, int64_t rows,
                                 bool check_repeats, unsigned long long* first_pair,
                                 unsigned long long* error, cudaStream_t stream) {
  cudaError_t st = cudaMemsetAsync(error, 0xff, 2 * sizeof(unsigned long long), stream);
  if (st != cudaSuccess) return st;
  if (check_repeats && rows > 0) {
    st = cudaMemsetAsync(first_pair, 0xff, static_cast<size_t>(rows) * sizeof(unsigned long long),
                         stream);
    if (st != cudaSuccess) return st;
  }
  if (pairs <= 0) return cudaSuccess;
  unsigned long long* fp = check_repeats ? first_pair : nullptr;
  combine_validate_kernel<<<grid_for(pairs, 256), 256, 0, stream>>>(inverse, pairs, rows, fp,
                                                                     error);
  st = cudaGetLastError();
  if (st != cudaSuccess || !check_repeats) return st;
  combine_repeat_kernel<<<grid_for(pairs, 256), 256, 0, stream>>>(inverse, pairs, rows, fp, error);
  return cudaGetLastError();
}

template <typename TY, typename S>
cudaError_t moe_combine(const TY* y, const S* weights, const int64_t* inverse, int64_t T,
                        int64_t k, int64_t H, int64_t rows, S* out, cudaStream_t stream) {
  if (T <= 0 || H <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(T < 65535 * 16 ? T : 65535 * 16);
  combine_kernel<TY, S><<<blocks, kThreads, 0, stream>>>(y, weights, inverse, T, k, H, rows, out);
  return cudaGetLastError();
}

template <typename TY, typename S>
cudaError_t moe_combine_backward(const S* grad_out, const TY* y, const S* weights,
                                 const int64_t* inverse, int64_t T, int64_t k, int64_t H,
                                 int64_t rows, S* grad_y, S* grad_w, cudaStream_t stream) {
  if (T <= 0 || k <= 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(T < 65535 * 16 ? T : 65535 * 16);
  combine_backward_kernel<TY, S><<<blocks, kThreads, 0, stream>>>(grad_out, y, weights, inverse, T,
                                                                  k, H, rows, grad_y, grad_w);
  return cudaGetLastError();
}

#define SE_MOE_COMBINE(TY, S)                                                                    \
  template cudaError_t moe_combine<TY, S>(const TY*, const S*, const int64_t*, int64_t, int64_t, \
                                          int64_t, int64_t, S*, cudaStream_t);                   \
  template cudaError_t moe_combine_backward<TY, S>(const S*, const TY*, const S*,               \
                                                   const int64_t*, int64_t, int64_t, int64_t,    \
                                                   int64_t, S*, S*, cudaStream_t);
SE_MOE_COMBINE(float, float)
SE_MOE_COMBINE(__half, float)
SE_MOE_COMBINE(__nv_bfloat16, float)
SE_MOE_COMBINE(double, double)
#undef SE_MOE_COMBINE

}  // namespace cuda
}  // namespace sparse_ext

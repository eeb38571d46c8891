// ATen glue for the SpMM family on CUDA: checks (the CPU messages, CUDA devices), once-per-version
// structure validation, row-group order, layout preparation and kernel launches.
// Kernels: csrc/cuda/spmm/spmm_cuda.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "../common.h"
#include "../spmm_weight.h"
#include "cuda_glue.h"
#include "spmm_cuda_weight.h"

namespace sparse_ext {

cuda::CudaDType cuda_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::CudaDType::kF32;
    case at::kHalf: return cuda::CudaDType::kF16;
    case at::kBFloat16: return cuda::CudaDType::kBF16;
    case at::kDouble: return cuda::CudaDType::kF64;
    default: TORCH_CHECK(false, "no CUDA kernel for dtype ", t);
  }
}

namespace {

const char* structure_error_text(int32_t code) {
  switch (code) {
    case cuda::kSpmmBadStart: return "offsets[0] must be 0";
    case cuda::kSpmmDecreasing: return "offsets must not decrease";
    case cuda::kSpmmEndMismatch: return "offsets[-1] must equal the number of indices";
    case cuda::kSpmmIndexOutOfRange: return "column index out of range (an entry points at a column >= in_features)";
    default: return "unknown structure error";
  }
}

std::string structure_key(int64_t rows, int64_t cols, int64_t block_rows) {
  return "spmm_structure:" + std::to_string(rows) + ":" + std::to_string(cols) + ":" +
         std::to_string(block_rows);
}

void validate_on_device(const at::Tensor& offsets, const at::Tensor& indices,
                        const cuda::SpmmDeviceWeight& w) {
  const std::string key = structure_key(w.rows, w.cols, w.block_rows);
  validate_structure_once(key.c_str(), {offsets, indices}, [&] {
    at::Tensor code = at::empty({1}, offsets.options().dtype(at::kInt));
    check_launch(cuda::spmm_validate_cuda(w, code.data_ptr<int32_t>(), current_stream()),
                 "spmm structure validation");
    const int32_t c = read_error_code(code);
    TORCH_CHECK(c == cuda::kSpmmOk, "malformed sparse weight: ", structure_error_text(c));
  });
}

// Row-order cache: offsets impl, data pointer, version and geometry -> order tensor.
struct OrderEntry {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> impl;
  const void* data;
  int64_t version;
  int64_t groups, k_blocks;
  at::Tensor order;
};
std::mutex order_mutex;
std::deque<OrderEntry> order_cache;
constexpr size_t kOrderCacheEntries = 128;

at::Tensor compute_row_order(const at::Tensor& offsets, int64_t G, int64_t KB) {
  const auto long_opts = offsets.options().dtype(at::kLong);
  if (KB == 0 || G <= 1) return at::arange(G, long_opts).to(at::kInt);
  // offsets[g * KB] for g = 0..G: the start of each row group.
  const at::Tensor starts = offsets.slice(0, 0, G * KB + 1, KB).to(at::kLong);
  const at::Tensor lengths = starts.slice(0, 1, G + 1) - starts.slice(0, 0, G);
  const auto sorted = at::sort(lengths, /*stable=*/true, /*dim=*/0, /*descending=*/true);
  return std::get<1>(sorted).to(at::kInt);
}

void check_activations(const at::Tensor& x, const char* name) {
  check_cuda(x, name);
  check_dtype(x, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension, got a scalar");
}

// The compute dtype when activations have dtype `a` and weights/grad dtype `b`: their common
// dtype when equal, float32 otherwise (mixed reduced precision computes like the CPU op: fp32).
at::ScalarType compute_dtype(at::ScalarType a, at::ScalarType b) {
  return a == b ? a : at::kFloat;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

cuda::SpmmDeviceWeight checked_spmm_weight_cuda(const at::Tensor& offsets,
                                                const at::Tensor& indices,
                                                const at::Tensor* values, int64_t rows,
                                                int64_t cols, int64_t block_rows,
                                                const char* rows_name) {
  const SpmmWeight hw = checked_spmm_weight_args(
      offsets, indices, values, rows, cols, block_rows, rows_name, &check_cuda,
      {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_same_cuda_device(offsets, "offsets",
                         {{&indices, "indices"}, {values, "values"}});
  TORCH_CHECK(hw.nnz <= std::numeric_limits<int32_t>::max(),
              "malformed sparse weight: more than 2^31 - 1 stored entries");
  cuda::SpmmDeviceWeight w{};
  w.rows = hw.rows;
  w.cols = hw.cols;
  w.block_rows = hw.block_rows;
  w.nnz = hw.nnz;
  w.offsets = hw.offsets;
  w.indices = hw.indices;
  w.values = hw.values;
  validate_on_device(offsets, indices, w);
  return w;
}

at::Tensor spmm_row_order_cuda(const at::Tensor& offsets, int64_t G, int64_t KB) {
  if (offsets.is_inference()) return compute_row_order(offsets, G, KB);
  {
    std::lock_guard<std::mutex> lock(order_mutex);
    for (const OrderEntry& e : order_cache) {
      auto alive = e.impl.lock();
      if (alive.get() == offsets.unsafeGetTensorImpl() && e.data == offsets.data_ptr() &&
          e.version == offsets._version() && e.groups == G && e.k_blocks == KB)
        return e.order;
    }
  }
  at::Tensor order = compute_row_order(offsets, G, KB);
  std::lock_guard<std::mutex> lock(order_mutex);
  // Entries of freed offsets (e.g. each backward's W^T) can never match again: drop them first so
  // they do not evict the long-lived weights' entries (a re-sort per call once layers > 128).
  order_cache.erase(std::remove_if(order_cache.begin(), order_cache.end(),
                                   [](const OrderEntry& e) { return e.impl.expired(); }),
                    order_cache.end());
  order_cache.push_front(OrderEntry{
      c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>(
          offsets.getIntrusivePtr()),
      offsets.data_ptr(), offsets._version(), G, KB, order});
  if (order_cache.size() > kOrderCacheEntries) order_cache.pop_back();
  return order;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_transpose_structure_device(
    const at::Tensor& offsets, const at::Tensor& indices, int64_t M, int64_t K, int64_t R) {
  const int64_t MB = (M + kSpmmKBlock - 1) / kSpmmKBlock, KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  const int64_t nnz = indices.size(0), entries = nnz * R;
  const auto long_opts = offsets.options().dtype(at::kLong);
  if (entries == 0) {
    return {at::zeros({K * MB + 1}, offsets.options()), at::empty({0}, indices.options()),
            at::empty({0}, long_opts)};
  }
  // Segment of every entry j (offsets[s] <= j < offsets[s + 1]), its row group and column.
  const at::Tensor j = at::arange(nnz, long_opts);
  const at::Tensor seg =
      at::searchsorted(offsets.to(at::kLong), j, /*out_int32=*/false, /*right=*/true) - 1;
  const at::Tensor g = at::floor_divide(seg, KB);
  const at::Tensor col = at::remainder(seg, KB) * kSpmmKBlock + indices.to(at::kLong);
  // Entry e = j * R + r of the values holds W[g*R + r, col].
  const at::Tensor m = (g * R).unsqueeze(1) + at::arange(R, long_opts).unsqueeze(0);
  const at::Tensor m_e = m.reshape({entries});
  const at::Tensor col_e = col.unsqueeze(1).expand({nnz, R}).reshape({entries});
  // W^T entries in (column, row) order: the CPU fill order (segments by column, rows increasing).
  const at::Tensor perm = std::get<1>(at::sort(col_e * M + m_e, /*stable=*/true, 0, false));
  const at::Tensor m_sorted = m_e.index_select(0, perm);
  const at::Tensor indices_t = at::remainder(m_sorted, kSpmmKBlock).to(at::kByte);
  const at::Tensor seg_sorted =
      col_e.index_select(0, perm) * MB + at::floor_divide(m_sorted, kSpmmKBlock);
  const at::Tensor offsets_t = at::searchsorted(seg_sorted, at::arange(K * MB + 1, long_opts),
                                                /*out_int32=*/true, /*right=*/false);
  return {offsets_t, indices_t, perm};
}

namespace {

at::Tensor spmm_cuda(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& indices,
                     const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                     int64_t out_features, int64_t in_features, int64_t block_rows) {
  check_activations(x, "x");
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = in_features;
  const at::Tensor* bias_p = bias.has_value() ? &*bias : nullptr;
  check_same_cuda_device(x, "x", {{&offsets, "offsets"}, {&indices, "indices"},
                                  {&values, "values"}, {bias_p, "bias"}});
  cuda::SpmmDeviceWeight w = checked_spmm_weight_cuda(offsets, indices, &values, out_features, K,
                                                      block_rows, "out_features");
  if (bias_p != nullptr) {
    check_cuda(*bias_p, "bias");
    check_dtype(*bias_p, "bias", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
    check_1d(*bias_p, "bias", out_features);
  }
  TORCH_CHECK((x.scalar_type() == at::kDouble) == (values.scalar_type() == at::kDouble),
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;

  const at::ScalarType ct = compute_dtype(x.scalar_type(), values.scalar_type());
  const at::Tensor rows = as_rows(x).to(ct).contiguous();
  const at::Tensor vals = values.to(ct).contiguous();
  w.values = vals.data_ptr();
  const int64_t N = rows.size(0), M = out_features;
  at::Tensor y = at::empty({N, M}, rows.options());
  if (N > 0 && M > 0) {
    const int64_t G = M / block_rows, KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
    const at::Tensor order = spmm_row_order_cuda(offsets, G, KB);
    // The bias is read in its own dtype by the kernels (no conversion launch per call).
    at::Tensor bias_c;
    if (bias_p != nullptr) bias_c = bias_p->contiguous();
    cuda::SpmmEpilogue ep{bias_c.defined() ? bias_c.data_ptr() : nullptr,
                          bias_c.defined() ? cuda_dtype_of(bias_c.scalar_type())
                                           : cuda::CudaDType::kF32,
                          -std::numeric_limits<double>::infinity(),
                          std::numeric_limits<double>::infinity()};
    const cuda::CudaDType dt = cuda_dtype_of(ct);
    const cudaStream_t stream = current_stream();
    if (N <= cuda::kSpmmGatherMaxTokens) {
      // Decode: gather straight from token-major x (no transpose pass for a handful of tokens).
      check_launch(cuda::spmm_gather_cuda(dt, w, order.data_ptr<int32_t>(), rows.data_ptr(), N,
                                          ep, y.data_ptr(), stream),
                   "spmm");
    } else {
      // Many tokens: xT [K, ld] so each nonzero reads a contiguous run of tokens; ld padded to a
      // multiple of 8 so every row starts 16-byte aligned for the vector loads.
      const int64_t ld = round_up(N, 8);
      at::Tensor xT = at::empty({K, ld}, rows.options());
      check_launch(cuda::transpose_pad_cuda(dt, rows.data_ptr(), N, K, ld, 1, xT.data_ptr(),
                                            stream),
                   "spmm (transpose)");
      cuda::SpmmTiledArgs a{xT.data_ptr(), ld, K * ld, N, 1, y.data_ptr(), M, N * M, true};
      check_launch(cuda::spmm_tiled_cuda(dt, w, order.data_ptr<int32_t>(), a, ep, stream), "spmm");
    }
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_transpose_structure_cuda(
    const at::Tensor& offsets, const at::Tensor& indices, int64_t out_features,
    int64_t in_features, int64_t block_rows) {
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  check_cuda(offsets, "offsets");
  const c10::cuda::CUDAGuard guard(offsets.device());
  checked_spmm_weight_cuda(offsets, indices, nullptr, out_features, in_features, block_rows,
                           "out_features");
  auto result =
      spmm_transpose_structure_device(offsets, indices, out_features, in_features, block_rows);
  // W^T is well-formed by construction: register it under the key of its consumer (spmm or the
  // 1x1 sparse_conv2d with W^T [in_features, out_features], R = 1), so the backward does not
  // validate it again (a host synchronization per step, which also breaks graph capture).
  const at::Tensor& indices_t = std::get<1>(result);
  if (indices_t.size(0) <= std::numeric_limits<int32_t>::max())
    mark_structure_valid(structure_key(in_features, out_features, 1),
                         {std::get<0>(result), indices_t});
  return result;
}

at::Tensor spmm_sddmm_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                           const at::Tensor& offsets, const at::Tensor& indices,
                           int64_t out_features, int64_t in_features, int64_t block_rows) {
  check_activations(grad_out, "grad_out");
  check_activations(x, "x");
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  check_width(grad_out, "grad_out", -1, out_features, "features", "out_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const c10::cuda::CUDAGuard guard(x.device());
  check_same_cuda_device(x, "x", {{&grad_out, "grad_out"}, {&offsets, "offsets"},
                                  {&indices, "indices"}});
  const int64_t K = x.size(-1), M = grad_out.size(-1);
  check_same_tokens(grad_out, x);
  cuda::SpmmDeviceWeight w =
      checked_spmm_weight_cuda(offsets, indices, nullptr, M, K, block_rows, "out_features");
  if (x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble)
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
  const at::ScalarType ct = compute_dtype(x.scalar_type(), grad_out.scalar_type());
  at::Tensor dv = at::zeros({w.nnz * block_rows}, x.options().dtype(acc_dtype(ct)));
  const at::Tensor dy_rows = as_rows(grad_out).to(ct).contiguous();
  const at::Tensor x_rows = as_rows(x).to(ct).contiguous();
  const int64_t N = x_rows.size(0);
  if (N == 0 || w.nnz == 0) return dv;
  // Both operands transposed (rows of tokens), zero-padded to a multiple of 8 tokens.
  const int64_t ld = round_up(N, 8);
  const cuda::CudaDType dt = cuda_dtype_of(ct);
  const cudaStream_t stream = current_stream();
  at::Tensor dyT = at::empty({M, ld}, dy_rows.options());
  at::Tensor xT = at::empty({K, ld}, x_rows.options());
  check_launch(cuda::transpose_pad_cuda(dt, dy_rows.data_ptr(), N, M, ld, 1, dyT.data_ptr(), stream),
               "spmm_sddmm (transpose)");
  check_launch(cuda::transpose_pad_cuda(dt, x_rows.data_ptr(), N, K, ld, 1, xT.data_ptr(), stream),
               "spmm_sddmm (transpose)");
  check_launch(cuda::spmm_sddmm_cuda(dt, w, dyT.data_ptr(), xT.data_ptr(), ld, dv.data_ptr(),
                                     stream),
               "spmm_sddmm");
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_transpose_structure", &spmm_transpose_structure_cuda);
  m.impl("spmm_sddmm", &spmm_sddmm_cuda);
}

}  // namespace sparse_ext

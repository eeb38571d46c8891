// ATen glue for the N:M family on CUDA: argument checks (shared with the CPU glue through
// csrc/ops/nm_args.h, with CUDA device checks), dtype handling, path choice (CUDA-core kernels in
// csrc/cuda/nm, or 2:4 sparse tensor cores through cuSPARSELt via ATen's _cslt_* ops), allocation
// and launch on the current stream.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>

#include "../../cuda/nm/nm_cuda.cuh"
#include "../common.h"
#include "../settings.h"
#include "../nm_args.h"
#include "cuda_glue.h"

namespace sparse_ext {
namespace {

using cuda::CudaDType;
using cuda::NmCudaShape;

CudaDType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CudaDType::kF32;
    case at::kHalf: return CudaDType::kF16;
    case at::kBFloat16: return CudaDType::kBF16;
    case at::kDouble: return CudaDType::kF64;
    default: TORCH_CHECK(false, "N:M CUDA kernels: unsupported dtype ", t);
  }
  return CudaDType::kF32;
}

// The CUDA glue's device checks for the shared argument checks (nm_args.h): activations are CUDA
// tensors, every other tensor is on the op's first tensor's device.
void check_cuda_operand(const at::Tensor& first, const char* first_name, const at::Tensor& t,
                        const char* name) {
  check_same_cuda_device(first, first_name, {{&t, name}});
}
constexpr NmDeviceChecks kCuda{&check_cuda, &check_cuda_operand, /*float16=*/true};

NmCudaShape shape_of(const NmWeight& w) { return NmCudaShape{w.rows, w.cols, w.n, w.m}; }

// Activations for the kernels: [tokens, K] contiguous, in a dtype the kernels pair with `values`
// (the same dtype, or float32 with half / bfloat16 values; other mixes compute in float32).
at::Tensor kernel_rows(const at::Tensor& x, int64_t K, at::ScalarType value_type) {
  at::Tensor rows = as_rows(x);
  if (!cuda::nm_cuda_supported(cuda_dtype(value_type), cuda_dtype(rows.scalar_type())))
    rows = rows.to(at::kFloat);
  return rows.contiguous();
}

// ---- 2:4 sparse tensor cores through cuSPARSELt -------------------------------------------------
// Path choice per call. The nm_cuda_path setting (SPARSE_EXT_NM_CUDA_PATH at load) =
// cores|cusparselt|dense|auto (default auto) forces one (cusparselt and dense fall back to the cores where they cannot apply). Thresholds in
// auto mode are guesses to be tuned with bench/ on a GPU: below them the CUDA-core kernels, which
// read only the n/m kept values, win (decode sizes are memory bound); above them tensor cores win.
enum class PathMode { kAuto, kCores, kCusparselt, kDense };

// In the setting's choice order (settings.cpp).
PathMode path_mode() { return static_cast<PathMode>(setting(Setting::kNmCudaPath)); }

// Tokens from which the sparse-tensor-core path is used in auto mode (guesses, see above). 1:4,
// 2:8, 1:8 (any n <= 2) are 2:4 patterns once expanded, but the 2:4 layout moves more weight bytes
// than their own format, so they switch later.
int64_t cusparselt_min_tokens(int64_t n, int64_t m) {
  if (n == 2 && m == 4) return 32;
  if (n * 4 >= m) return 64;   // 1:4, 2:8
  return 256;                  // 1:8, 1:16, 2:16
}

// Shapes the sparse-tensor-core path takes: stricter than cuSPARSELt's documented minimum for
// 16-bit types (multiples of 16), so that no torch version rejects them (every LLM shape passes).
constexpr int64_t kCsltRowMultiple = 32;
constexpr int64_t kCsltColMultiple = 64;
constexpr int64_t kCsltTokenMultiple = 16;

std::atomic<bool> cusparselt_broken{false};  // set once when cuSPARSELt fails at run time

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

// One converted weight: keyed on the exact values / metadata tensors and versions.
struct Compressed {
  WeakImpl values, metadata;
  const void* values_data;
  const void* metadata_data;
  int64_t values_version, metadata_version;
  int64_t n, m;
  at::Tensor packed;
};

constexpr size_t kCompressedEntries = 64;
std::mutex compressed_mutex;
// Never destroyed: device tensors must not be freed by static destructors after CUDA shut down.
std::deque<Compressed>& compressed_cache = *new std::deque<Compressed>();

bool same_key(const Compressed& c, const at::Tensor& values, const at::Tensor& metadata,
              int64_t n, int64_t m) {
  auto v = c.values.lock();
  auto md = c.metadata.lock();
  return v.get() == values.unsafeGetTensorImpl() && md.get() == metadata.unsafeGetTensorImpl() &&
         c.values_data == values.data_ptr() && c.metadata_data == metadata.data_ptr() &&
         c.values_version == values._version() && c.metadata_version == metadata._version() &&
         c.n == n && c.m == m;
}

// W as a dense [rows, cols] matrix in values' dtype (duplicate slots, possible only with
// non-canonical metadata, summed as on the CPU).
at::Tensor expand_dense(const NmCudaShape& s, const at::Tensor& values, const at::Tensor& metadata,
                        const char* op) {
  at::Tensor dense = at::zeros({s.rows, s.cols}, values.options());
  check_launch(cuda::nm_cuda_expand(s, cuda_dtype(values.scalar_type()), values.data_ptr(),
                                    metadata.data_ptr<uint8_t>(), dense.data_ptr(),
                                    current_stream()),
               op);
  return dense;
}

// Validates the metadata on device; returns the smallest bad r * G + g or -1.
int64_t first_bad_group(const NmCudaShape& s, const at::Tensor& metadata) {
  at::Tensor error = at::empty({1}, metadata.options().dtype(at::kLong));
  check_launch(cuda::nm_cuda_validate(s, metadata.data_ptr<uint8_t>(), error.data_ptr<int64_t>(),
                                      current_stream()),
               "nm_validate");
  return error.item<int64_t>();
}

// The cuSPARSELt-compressed 2:4 form of the weight, converted once per (values, metadata,
// versions) and cached. With n <= 2 every aligned group of 4 expanded columns holds at most 2
// nonzeros whatever the metadata bits say (slots naming one column are summed), so any metadata
// gives a valid 2:4 matrix and no validation (no synchronization) is needed.
at::Tensor compressed_weight(const NmCudaShape& s, const at::Tensor& values,
                             const at::Tensor& metadata) {
  {
    std::lock_guard<std::mutex> lock(compressed_mutex);
    // Evict entries whose weight died (or was edited): they can never match again.
    for (auto it = compressed_cache.begin(); it != compressed_cache.end();) {
      if (it->values.expired() || it->metadata.expired()) it = compressed_cache.erase(it);
      else ++it;
    }
    for (const Compressed& c : compressed_cache)
      if (same_key(c, values, metadata, s.n, s.m)) return c.packed;
  }
  const at::Tensor packed = at::_cslt_compress(expand_dense(s, values, metadata, "nm_linear"));
  Compressed entry{WeakImpl(values.getIntrusivePtr()), WeakImpl(metadata.getIntrusivePtr()),
                   values.data_ptr(),
                   metadata.data_ptr(), values._version(), metadata._version(), s.n, s.m, packed};
  std::lock_guard<std::mutex> lock(compressed_mutex);
  // Drop a stale entry of the same tensors (an older version) before adding the new one.
  for (auto it = compressed_cache.begin(); it != compressed_cache.end();) {
    auto v = it->values.lock();
    if (v.get() == values.unsafeGetTensorImpl()) it = compressed_cache.erase(it);
    else ++it;
  }
  compressed_cache.push_front(std::move(entry));
  if (compressed_cache.size() > kCompressedEntries) compressed_cache.pop_back();
  return packed;
}

// y [T, rows] in x's dtype through cuSPARSELt, or an undefined tensor when the path does not apply
// (the caller then runs the CUDA-core kernel).
at::Tensor try_cusparselt(const at::Tensor& rows, const at::Tensor& values,
                          const at::Tensor& metadata, const at::Tensor& bias,
                          const NmCudaShape& s) {
  const PathMode mode = path_mode();
  if (mode == PathMode::kCores || mode == PathMode::kDense || cusparselt_broken.load())
    return at::Tensor();
  const at::ScalarType dt = values.scalar_type();
  const int64_t T = rows.size(0);
  const bool applies = (dt == at::kHalf || dt == at::kBFloat16) && rows.scalar_type() == dt &&
                       s.n <= 2 && s.rows > 0 && s.rows % kCsltRowMultiple == 0 && s.cols > 0 &&
                       s.cols % kCsltColMultiple == 0 && T > 0 && !values.is_inference() &&
                       !metadata.is_inference() &&
                       // cuSPARSELt's descriptors promise 16-byte aligned operands (a view at an
                       // odd storage offset would fail and switch the path off for good).
                       reinterpret_cast<uintptr_t>(rows.data_ptr()) % 16 == 0;
  if (!applies) return at::Tensor();
  if (mode == PathMode::kAuto && T < cusparselt_min_tokens(s.n, s.m)) return at::Tensor();
  try {
    const at::Tensor packed = compressed_weight(s, values, metadata);
    // cuSPARSELt wants the dense operand's rows (tokens) a multiple of 8 (16 to be safe).
    const int64_t pad = (kCsltTokenMultiple - T % kCsltTokenMultiple) % kCsltTokenMultiple;
    const at::Tensor dense = pad == 0 ? rows : at::constant_pad_nd(rows, {0, 0, 0, pad});
    c10::optional<at::Tensor> b;
    if (bias.defined()) b = bias.to(dt).contiguous();
    // W [rows, cols] (compressed) @ x^T [cols, T] with the result transposed: y [T, rows].
    at::Tensor y = at::_cslt_sparse_mm(packed, dense.t(), b, c10::nullopt, c10::nullopt,
                                       /*transpose_result=*/true);
    return pad == 0 ? y : y.narrow(0, 0, T).contiguous();
  } catch (const c10::OutOfMemoryError&) {
    throw;  // not a reason to give up on the path
  } catch (const c10::Error& e) {
    // cuSPARSELt missing from this torch build or unusable on this GPU: remember, use the cores.
    TORCH_WARN_ONCE("sparse_ext nm_linear: cuSPARSELt unavailable (", e.what_without_backtrace(),
                    "); using the CUDA-core N:M kernel");
    cusparselt_broken.store(true);
    return at::Tensor();
  }
}

// Tokens from which the backward ops expand W to dense and use cuBLAS (at::mm): the kernels sum
// over rows (grad_input) or tokens (grad_values) in one thread, which is fine at decode-like
// sizes but far too serial at training sizes. A guess, to be tuned on a GPU. The GEMMs are
// deterministic (cuBLAS without split-K atomics for these calls). nm_cuda_path "cores"
// keeps the kernels.
constexpr int64_t kGemmBackwardMinTokens = 64;

bool gemm_backward(int64_t tokens) {
  return tokens >= kGemmBackwardMinTokens && path_mode() != PathMode::kCores;
}

// The dense forward (W expanded on device per call, then cuBLAS) runs only when forced with
// nm_cuda_path "dense": it is the benchmark's yardstick for the sparse paths, never
// chosen by auto mode, so an N:M layer never silently computes densely. Patterns the 2:4 path
// cannot take (3:4, 3:8, 4:16, unaligned shapes) use the own tensor-core kernel instead.
// y [T, rows] in x's dtype through expand + at::linear, or undefined when not forced.
at::Tensor try_dense(const at::Tensor& rows, const at::Tensor& values, const at::Tensor& metadata,
                     const at::Tensor& bias, const NmCudaShape& s) {
  if (path_mode() != PathMode::kDense || rows.scalar_type() != values.scalar_type())
    return at::Tensor();
  const at::ScalarType dt = values.scalar_type();
  const at::Tensor dense = expand_dense(s, values, metadata, "nm_linear");
  return bias.defined() ? at::linear(rows, dense, bias.to(dt)) : at::linear(rows, dense);
}

// ---- ops --------------------------------------------------------------------------------------
at::Tensor nm_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                          const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t n,
                          int64_t m) {
  const NmOpArgs args = checked_nm_linear_args(x, values, metadata, bias, in_features, n, m, kCuda);
  const NmCudaShape s = shape_of(args.w);
  const std::vector<int64_t>& out_shape = args.out_shape;
  const int64_t K = s.cols, out_features = s.rows;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = kernel_rows(x, K, values.scalar_type());
  const int64_t T = rows.size(0);
  if (T == 0 || out_features == 0) return at::zeros(out_shape, x.options());
  if (rows.scalar_type() == x.scalar_type()) {
    const at::Tensor fast = try_cusparselt(rows, values, metadata,
                                           bias.has_value() ? *bias : at::Tensor(), s);
    if (fast.defined()) return fast.reshape(out_shape);
    const at::Tensor dense_path = try_dense(rows, values, metadata,
                                            bias.has_value() ? *bias : at::Tensor(), s);
    if (dense_path.defined()) return dense_path.reshape(out_shape);
  }
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  at::Tensor y = at::empty({T, out_features}, rows.options());
  const int64_t ws_floats = cuda::nm_cuda_forward_workspace(
      s, cuda_dtype(values.scalar_type()), cuda_dtype(rows.scalar_type()), T);
  const at::Tensor workspace =
      ws_floats > 0 ? at::empty({ws_floats}, rows.options().dtype(at::kFloat)) : at::Tensor();
  check_launch(cuda::nm_cuda_forward(s, cuda_dtype(values.scalar_type()), values.data_ptr(),
                                     metadata.data_ptr<uint8_t>(),
                                     cuda_dtype(rows.scalar_type()), rows.data_ptr(), T,
                                     bias_acc.defined() ? bias_acc.data_ptr() : nullptr,
                                     y.data_ptr(),
                                     workspace.defined() ? workspace.data_ptr<float>() : nullptr,
                                     ws_floats, current_stream()),
               "nm_linear");
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor nm_linear_grad_input_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                     const at::Tensor& metadata, int64_t in_features, int64_t n,
                                     int64_t m) {
  const NmOpArgs args =
      checked_nm_grad_input_args(grad_out, values, metadata, in_features, n, m, kCuda);
  const NmCudaShape s = shape_of(args.w);
  const std::vector<int64_t>& out_shape = args.out_shape;
  const int64_t M_out = s.rows;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor dy = kernel_rows(grad_out, M_out, values.scalar_type());
  const int64_t T = dy.size(0);
  if (T == 0 || in_features == 0 || M_out == 0) return at::zeros(out_shape, grad_out.options());
  if (gemm_backward(T)) {
    // dx = dy @ W, in dy's dtype (float32 when it differs from the values' dtype).
    const at::Tensor dense = expand_dense(s, values, metadata, "nm_linear_grad_input");
    return at::mm(dy, dense.to(dy.scalar_type())).to(grad_out.scalar_type()).reshape(out_shape);
  }
  at::Tensor dx = at::empty({T, in_features}, dy.options());
  check_launch(cuda::nm_cuda_grad_input(s, cuda_dtype(values.scalar_type()), values.data_ptr(),
                                        metadata.data_ptr<uint8_t>(),
                                        cuda_dtype(dy.scalar_type()), dy.data_ptr(), T,
                                        dx.data_ptr(), current_stream()),
               "nm_linear_grad_input");
  return dx.to(grad_out.scalar_type()).reshape(out_shape);
}

at::Tensor nm_linear_grad_values_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                      const at::Tensor& metadata, int64_t in_features, int64_t n,
                                      int64_t m) {
  const NmCudaShape s =
      shape_of(checked_nm_grad_values_args(grad_out, x, metadata, in_features, n, m, kCuda));
  const int64_t M_out = s.rows;
  const bool f64 = x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble;
  const c10::cuda::CUDAGuard guard(grad_out.device());
  // Both operands in one dtype: theirs when they agree, float32 otherwise.
  const at::ScalarType common =
      x.scalar_type() == grad_out.scalar_type() ? x.scalar_type() : at::kFloat;
  const at::Tensor dy = as_rows(grad_out).to(common).contiguous();
  const at::Tensor xr = as_rows(x).to(common).contiguous();
  at::Tensor dv = at::zeros({M_out, s.kept()}, x.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (M_out == 0 || s.kept() == 0) return dv;
  if (gemm_backward(xr.size(0))) {
    // dv = gather(dy^T @ x) at the slots' columns: a dense GEMM then one read per slot. The
    // product is kept in dv's dtype (fp32 out of fp16 / bf16 operands: mm.dtype), as the kernel
    // and the CPU op compute it; a 16-bit product would round every gradient and overflow fp16.
    const bool half_in = common == at::kHalf || common == at::kBFloat16;
    const at::Tensor full = half_in ? at::mm(dy.t(), xr, at::kFloat) : at::mm(dy.t(), xr);
    check_launch(cuda::nm_cuda_gather_slots(s, metadata.data_ptr<uint8_t>(),
                                            cuda_dtype(full.scalar_type()), full.data_ptr(),
                                            dv.data_ptr(), current_stream()),
                 "nm_linear_grad_values");
    return dv;
  }
  check_launch(cuda::nm_cuda_grad_values(s, metadata.data_ptr<uint8_t>(), cuda_dtype(common),
                                         dy.data_ptr(), xr.data_ptr(), xr.size(0), dv.data_ptr(),
                                         current_stream()),
               "nm_linear_grad_values");
  return dv;
}

at::Tensor nm_validate_cuda(const at::Tensor& values, const at::Tensor& metadata,
                            int64_t in_features, int64_t n, int64_t m) {
  const NmCudaShape s =
      shape_of(checked_nm_validate_args(values, metadata, in_features, n, m, kCuda));
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t bad = first_bad_group(s, metadata);
  if (bad >= 0) {
    const int64_t G = s.groups();
    TORCH_CHECK(false, "malformed N:M metadata: row ", bad / G, ", group ", bad % G,
                ": indices must be strictly increasing within a group");
  }
  return at::ones({}, metadata.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CUDA, m) {
  m.impl("nm_linear", &nm_linear_cuda);
  m.impl("nm_linear_grad_input", &nm_linear_grad_input_cuda);
  m.impl("nm_linear_grad_values", &nm_linear_grad_values_cuda);
  m.impl("nm_validate", &nm_validate_cuda);
}

}  // namespace sparse_ext

// Shared helpers for the CUDA glue (csrc/ops/cuda/*.cpp): device checks that name the argument,
// launch-error checks that name the op, and the once-per-tensor-version structure validation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <functional>
#include <initializer_list>
#include <string>

namespace sparse_ext {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

// Every tensor argument of a CUDA op on x's device (naming the first one that is not).
inline void check_same_cuda_device(const at::Tensor& x, const char* x_name,
                                   std::initializer_list<std::pair<const at::Tensor*, const char*>> others) {
  check_cuda(x, x_name);
  for (const auto& [t, name] : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK(t->device() == x.device(), name, " must be on ", x_name, "'s device ",
                x.device(), ", got ", t->device());
  }
}

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

// Runs `validate` (which raises on a malformed structure) unless these exact tensors were
// validated before at their current versions. A device-side check costs a synchronization; doing
// it once per weight keeps steady-state calls asynchronous (and CUDA-graph capturable) while an
// in-place edit of the structure (which bumps the version) is still caught.
void validate_structure_once(const char* op, std::initializer_list<at::Tensor> structure,
                             const std::function<void()>& validate);

// Records tensors that are well-formed by construction (an op's own output) as validated under
// the key their consumer looks up, so the consumer skips the device check and its sync.
inline void mark_structure_valid(const std::string& op,
                                 std::initializer_list<at::Tensor> structure) {
  validate_structure_once(op.c_str(), structure, [] {});
}

// Reads back a device int32 error code written by a validation kernel (0 = well-formed).
int32_t read_error_code(const at::Tensor& code);

}  // namespace sparse_ext

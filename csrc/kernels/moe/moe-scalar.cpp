// Portable scalar reference expert GEMV: the ground truth every ISA variant is tested against.
#include "../common/bf16.h"
#include "moe.h"

namespace sparse_ext {
namespace {

template <ValueType WT>
inline float load_weight(const void* w, int64_t i) {
  if constexpr (WT == ValueType::kF32) {
    return static_cast<const float*>(w)[i];
  } else {
    return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
  }
}

// w [rows, K] (f32 | bf16), x float [tokens, ldx], y float [tokens, ldy]; rows [r0, r1).
template <ValueType WT>
void gemv_1x1_scalar(const void* w, int64_t K, int64_t r0, int64_t r1, const float* x, int64_t ldx,
                     int64_t tokens, float* y, int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t n = 0; n < tokens; ++n) {
      float acc = 0.f;
      for (int64_t c = 0; c < K; ++c) acc += load_weight<WT>(w, r * K + c) * x[n * ldx + c];
      y[n * ldy + (r - r0)] = acc;
    }
}

void swiglu_scalar(const float* g, const float* u, int64_t n, float* h) {
  moe_activate<float>(MoeActivation::kSilu, g, u, n, h);
}

// The reference loop serves as both the GEMV and the GEMM entry (the glue never runs the scalar
// tier's GEMM: long segments go to at::mm there), so the crossover is nominal.
const MoeUkernels kF32 = {"f32-moegemv-1x1-scalar",
                          gemv_1x1_scalar<ValueType::kF32>, 1, 1,
                          "f32-swiglu-1x1-scalar", swiglu_scalar,
                          "f32-moegemm-1x1-scalar",
                          gemv_1x1_scalar<ValueType::kF32>, 48, 0};
const MoeUkernels kBF16 = {"bf16-moegemv-1x1-scalar",
                           gemv_1x1_scalar<ValueType::kBF16>, 1, 1,
                           "f32-swiglu-1x1-scalar", swiglu_scalar,
                           "bf16-moegemm-1x1-scalar",
                           gemv_1x1_scalar<ValueType::kBF16>, 48, 0};

}  // namespace

const MoeUkernels* moe_ukernels_scalar(ValueType wt) {
  return wt == ValueType::kF32 ? &kF32 : &kBF16;
}

}  // namespace sparse_ext

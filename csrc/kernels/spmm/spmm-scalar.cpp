// Portable scalar reference ukernels: the ground truth every ISA variant is tested against.
#include <cstring>

#include "../common/bf16.h"
#include "../common/values.h"
#include "spmm.h"

namespace sparse_ext {
namespace {

template <ValueType VT>
void gemv_scalar(const SpmmWeight& w, const float* x, int64_t g0, int64_t g1, float* y) {
  const int64_t R = w.block_rows, KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = x + kb * kSpmmKBlock;
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float xv = xb[w.indices[j]];
        for (int64_t r = 0; r < R; ++r) acc[r] += load1_value<VT>(w.values, j * R + r) * xv;
      }
    }
    for (int64_t r = 0; r < R; ++r) y[g * R + r] = acc[r];
  }
}

constexpr int64_t kScalarTileCols = 8;

template <ValueType VT>
void tile_scalar(const SpmmWeight& w, const float* xT, int64_t ldx, int64_t g0, int64_t g1,
                 float* ytile) {
  const int64_t R = w.block_rows, KB = w.k_blocks(), NT = kScalarTileCols;
  std::memset(ytile, 0, sizeof(float) * (g1 - g0) * R * NT);
  for (int64_t g = g0; g < g1; ++g) {
    float* yg = ytile + (g - g0) * R * NT;
    for (int64_t kb = 0; kb < KB; ++kb) {
      const float* xb = xT + kb * kSpmmKBlock * ldx;
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float* xrow = xb + w.indices[j] * ldx;
        for (int64_t r = 0; r < R; ++r) {
          const float v = load1_value<VT>(w.values, j * R + r);
          for (int64_t n = 0; n < NT; ++n) yg[r * NT + n] += v * xrow[n];
        }
      }
    }
  }
}

template <ValueType VT>
void sddmm_scalar(const SpmmWeight& w, const float* dyT, const float* xT, int64_t ld, int64_t g0,
                  int64_t g1, float* dv) {
  (void)sizeof(VT);
  const int64_t R = w.block_rows, KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t kb = 0; kb < KB; ++kb) {
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const float* xrow = xT + (kb * kSpmmKBlock + w.indices[j]) * ld;
        for (int64_t r = 0; r < R; ++r) {
          const float* dyrow = dyT + (g * R + r) * ld;
          float acc = 0.f;
          for (int64_t n = 0; n < ld; ++n) acc += dyrow[n] * xrow[n];
          dv[j * R + r] = acc;
        }
      }
    }
  }
}

template <ValueType VT>
constexpr SpmmUkernels kScalarKernels = {
    VT == ValueType::kF32 ? "f32-spmm-1x1-scalar" : "bf16-spmm-1x1-scalar", gemv_scalar<VT>,
    VT == ValueType::kF32 ? "f32-spmm-8x1-scalar" : "bf16-spmm-8x1-scalar", tile_scalar<VT>,
    kScalarTileCols, nullptr, nullptr, 0,
    VT == ValueType::kF32 ? "f32-sddmm-1x1-scalar" : "bf16-sddmm-1x1-scalar", sddmm_scalar<VT>};

}  // namespace

void spmm_f64_groups(const SpmmWeight& w, const double* x, int64_t N, const double* bias, double* y,
                     int64_t g0, int64_t g1) {
  const int64_t R = w.block_rows, KB = w.k_blocks(), M = w.rows, K = w.cols;
  const double* values = static_cast<const double*>(w.values);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = g0; g < g1; ++g) {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t kb = 0; kb < KB; ++kb)
        for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
          const double xv = x[n * K + kb * kSpmmKBlock + w.indices[j]];
          for (int64_t r = 0; r < R; ++r) acc[r] += values[j * R + r] * xv;
        }
      for (int64_t r = 0; r < R; ++r)
        y[n * M + g * R + r] = acc[r] + (bias != nullptr ? bias[g * R + r] : 0.0);
    }
}

void sddmm_f64_groups(const SpmmWeight& w, const double* dy, const double* x, int64_t N,
                      int64_t g0, int64_t g1, double* dv) {
  const int64_t R = w.block_rows, KB = w.k_blocks(), M = w.rows, K = w.cols;
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j) {
        const int64_t k = kb * kSpmmKBlock + w.indices[j];
        for (int64_t r = 0; r < R; ++r) {
          double acc = 0.0;
          for (int64_t n = 0; n < N; ++n) acc += dy[n * M + g * R + r] * x[n * K + k];
          dv[j * R + r] = acc;
        }
      }
}

const SpmmUkernels* spmm_ukernels_scalar(ValueType value_type, int64_t block_rows) {
  if (block_rows != 1 && block_rows != 2 && block_rows != 4 && block_rows != 8) return nullptr;
  if (value_type == ValueType::kF64) return nullptr;
  return value_type == ValueType::kF32 ? &kScalarKernels<ValueType::kF32>
                                       : &kScalarKernels<ValueType::kBF16>;
}

}  // namespace sparse_ext

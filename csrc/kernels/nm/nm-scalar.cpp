// Portable scalar reference ukernels for N:M: the ground truth every ISA variant is tested against,
// and the float64 paths (gradcheck).
#include <cstring>

#include "../common/bf16.h"
#include "../common/values.h"
#include "nm.h"

namespace sparse_ext {
namespace {

// Entry: x float [padded_cols + 8], gcol int32 [kept], y float [rows] (r0 .. r1 - 1 written).
template <ValueType VT>
void gemv_scalar(const NmWeight& w, const float* x, const int32_t* gcol, int64_t r0, int64_t r1,
                 float* y) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    float acc = 0.f;
    for (int64_t j = 0; j < kept; ++j)
      acc += load1_value<VT>(w.values, r * kept + j) * x[gcol[j] + nm_read_index(meta, j, bits)];
    y[r] = acc;
  }
}

constexpr int64_t kScalarNt = 8;

// Entry: xP float [padded_cols, 8], gcol int32 [(g1-g0)*N], ytile float [r1-r0, 8] accumulated.
template <ValueType VT>
void tile_scalar(const NmWeight& w, const float* xP, const int32_t* gcol, int64_t g0, int64_t g1,
                 int64_t r0, int64_t r1, float* ytile) {
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n, M = w.m;
  const int bits = w.bits();
  const float* xb = xP + g0 * M * kScalarNt;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    float* yr = ytile + (r - r0) * kScalarNt;
    for (int64_t j = g0 * N; j < g1 * N; ++j) {
      const float v = load1_value<VT>(w.values, r * kept + j);
      const float* xr = xb + (gcol[j - g0 * N] + nm_read_index(meta, j, bits)) * kScalarNt;
      for (int64_t t = 0; t < kScalarNt; ++t) yr[t] += v * xr[t];
    }
  }
}

// Entry: dyP float [rows, 8], gcol int32 [(g1-g0)*N], dxtile float [(g1-g0)*M, 8] accumulated.
template <ValueType VT>
void scatter_scalar(const NmWeight& w, const float* dyP, const int32_t* gcol, int64_t g0,
                    int64_t g1, int64_t r0, int64_t r1, float* dxtile) {
  const int64_t kept = w.kept(), stride = w.meta_stride(), N = w.n;
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const float* dr = dyP + r * kScalarNt;
    for (int64_t j = g0 * N; j < g1 * N; ++j) {
      const float v = load1_value<VT>(w.values, r * kept + j);
      float* xr = dxtile + (gcol[j - g0 * N] + nm_read_index(meta, j, bits)) * kScalarNt;
      for (int64_t t = 0; t < kScalarNt; ++t) xr[t] += v * dr[t];
    }
  }
}

// Entry: dyT float [rows, ld], xT float [padded_cols, ld], gcol int32 [kept], dv float [rows, kept].
template <ValueType VT>
void sddmm_scalar(const NmWeight& w, const float* dyT, const float* xT, int64_t ld,
                  const int32_t* gcol, int64_t r0, int64_t r1, float* dv) {
  const int64_t kept = w.kept(), stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    const float* dr = dyT + r * ld;
    for (int64_t j = 0; j < kept; ++j) {
      const float* xr = xT + (gcol[j] + nm_read_index(meta, j, bits)) * ld;
      float acc = 0.f;
      for (int64_t t = 0; t < ld; ++t) acc += dr[t] * xr[t];
      dv[r * kept + j] = acc;
    }
  }
}

template <ValueType VT>
constexpr NmUkernels kScalarKernels = {
    VT == ValueType::kF32 ? "f32-nmgemv-1x1-scalar" : "bf16-nmgemv-1x1-scalar",
    gemv_scalar<VT>,
    {{VT == ValueType::kF32 ? "f32-nmmm-8x1-scalar" : "bf16-nmmm-8x1-scalar", tile_scalar<VT>,
      kScalarNt},
     {nullptr, nullptr, 0},
     {nullptr, nullptr, 0},
     {nullptr, nullptr, 0}},
    VT == ValueType::kF32 ? "f32-nmscatter-8x1-scalar" : "bf16-nmscatter-8x1-scalar",
    scatter_scalar<VT>,
    kScalarNt,
    VT == ValueType::kF32 ? "f32-nmsddmm-1x1-scalar" : "bf16-nmsddmm-1x1-scalar",
    sddmm_scalar<VT>};

}  // namespace

const NmUkernels* nm_ukernels_scalar(ValueType value_type) {
  if (value_type == ValueType::kF32) return &kScalarKernels<ValueType::kF32>;
  if (value_type == ValueType::kBF16) return &kScalarKernels<ValueType::kBF16>;
  return nullptr;
}

void nm_f64_forward_rows(const NmWeight& w, const double* x, int64_t T, const double* bias,
                         double* y, int64_t r0, int64_t r1) {
  const int64_t kept = w.kept(), stride = w.meta_stride(), K = w.cols, M = w.m, N = w.n;
  const int bits = w.bits();
  const double* values = static_cast<const double*>(w.values);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* meta = w.meta + r * stride;
      double acc = bias != nullptr ? bias[r] : 0.0;
      for (int64_t j = 0; j < kept; ++j) {
        const int64_t c = (j / N) * M + nm_read_index(meta, j, bits);
        if (c < K) acc += values[r * kept + j] * x[t * K + c];
      }
      y[t * w.rows + r] = acc;
    }
}

void nm_f64_grad_input_groups(const NmWeight& w, const double* dy, int64_t T, double* dx,
                              int64_t g0, int64_t g1) {
  const int64_t kept = w.kept(), stride = w.meta_stride(), K = w.cols, M = w.m, N = w.n;
  const int bits = w.bits();
  const double* values = static_cast<const double*>(w.values);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t c = g0 * M; c < g1 * M && c < K; ++c) dx[t * K + c] = 0.0;
    for (int64_t r = 0; r < w.rows; ++r) {
      const uint8_t* meta = w.meta + r * stride;
      const double d = dy[t * w.rows + r];
      for (int64_t j = g0 * N; j < g1 * N; ++j) {
        const int64_t c = (j / N) * M + nm_read_index(meta, j, bits);
        if (c < K) dx[t * K + c] += values[r * kept + j] * d;
      }
    }
  }
}

void nm_f64_grad_values_rows(const NmWeight& w, const double* dy, const double* x, int64_t T,
                             double* dv, int64_t r0, int64_t r1) {
  const int64_t kept = w.kept(), stride = w.meta_stride(), K = w.cols, M = w.m, N = w.n;
  const int bits = w.bits();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t c = (j / N) * M + nm_read_index(meta, j, bits);
      double acc = 0.0;
      if (c < K)
        for (int64_t t = 0; t < T; ++t) acc += dy[t * w.rows + r] * x[t * K + c];
      dv[r * kept + j] = acc;
    }
  }
}

}  // namespace sparse_ext

// Sparse-weight convolution in NCHW (Fast Sparse ConvNets / XNNPACK style), torch-free.
//
// Weight format: the SpMM family's blocked CSR (../spmm/spmm.h), reused unchanged:
//   W is [C_out, C_in * KH * KW]; column c stands for (ci, kh, kw) = (c / (KH*KW), (c / KW) % KH,
//   c % KW), i.e. nn.Conv2d's weight.reshape(C_out, -1). Output channels come in groups of
//   R = block_rows in {1, 2, 4, 8} sharing a pattern (XNNPACK's NR, SparseByteNN's group sparsity).
//   The conv kernels take f32 values (the op converts bf16); float64 runs the scalar templates.
//
// 1x1, stride 1, no padding: y[co, p] = sum_ci W[co, ci] x[ci, p]: sparse W [C_out, C_in] times
//   the dense image [C_in, H*W] whose pixels are contiguous. Ukernels loop over MR-pixel tiles
//   (outer) and output-channel groups (inner), keep an MR x NR tile in registers across all
//   nonzeros of the group, and store it straight into the NCHW output with bias and clamp fused.
//
// kxk (any kernel, stride, padding, dilation; groups = 1): direct sparse convolution. Each stored
//   entry w[co, ci, kh, kw] adds w times a shifted window of input plane ci to output plane co.
//   Stride s is turned into stride 1 by splitting the input into s_h * s_w phase planes (the op
//   does that copy; for s = 1 the planes ARE the input): input pixel (oy*s + off) lives in phase
//   off mod s at row oy + floor(off / s). Each entry becomes a "tap" (plane, dy, dx) and output
//   row oy, column ox reads plane[oy + dy][ox + dx]. Padding is handled by clipping: taps whose
//   row falls outside the plane are skipped and edge columns are masked; no padded copy.
#pragma once

#include <cstdint>
#include <string>

#include "../common/isa.h"
#include "../common/value_type.h"
#include "../spmm/spmm.h"

namespace sparse_ext {

// Fused epilogue: y = min(max(acc + bias[co], out_min), out_max). No activation = (-inf, +inf);
// ReLU = (0, +inf); ReLU6 = (0, 6). NaN propagates.
struct ConvEpilogue {
  const float* bias;  // float [C_out] or nullptr
  float out_min;
  float out_max;
  // 1x1 only: write full output vectors with non-temporal stores when they are 32-byte aligned
  // (the op sets it for outputs far larger than the caches: saves the read-for-ownership).
  bool stream = false;
};

// 1x1 ukernel for one image: output channels of groups [g0, g1), pixels [p0, p1).
//   x  float [C_in, ldx]   input image, channel ci's pixels at x + ci * ldx (ldx >= p1)
//   y  float [C_out, ldy]  output image, written only at rows of groups [g0, g1), columns [p0, p1)
using Conv1x1Ukernel = void (*)(const SpmmWeight& w, const float* x, int64_t ldx, int64_t p0,
                                int64_t p1, int64_t g0, int64_t g1, const ConvEpilogue& ep,
                                float* y, int64_t ldy);

// One stored entry of a kxk weight, in phase-plane coordinates (see top of file).
struct ConvTap {
  int32_t plane;  // element offset of the phase plane in xq (the op checks it fits)
  int16_t dy;     // row shift: output row oy reads plane row oy + dy
  int16_t dx;     // column shift: output column ox reads plane column ox + dx
};

struct ConvPlanes {
  const float* xq;  // float [planes, hq, wq], contiguous; planes = C_in * s_h * s_w
  int64_t hq, wq;
  int64_t out_h, out_w;
};

// kxk ukernel for one image: output rows [oy0, oy1) of the channels of groups [g0, g1).
//   taps  ConvTap [w.nnz], entry j of the CSR (its R values share the tap)
//   y     float [C_out, out_h, out_w]; only rows [oy0, oy1) of the range's channels are written
//         (a ukernel may keep partial sums there before it stores the finished values)
using ConvKxKUkernel = void (*)(const SpmmWeight& w, const ConvTap* taps, const ConvPlanes& in,
                                int64_t oy0, int64_t oy1, int64_t g0, int64_t g1,
                                const ConvEpilogue& ep, float* y);

struct ConvUkernels {
  const char* conv1x1_name;
  Conv1x1Ukernel conv1x1;
  int64_t mr;  // pixels per 1x1 register tile
  const char* kxk_name;
  ConvKxKUkernel kxk;  // nullptr where the tier has none: the op takes the next tier's
  // The 1x1 ukernel serves planes whose pixel count (the row stride of x and y) is a multiple of
  // this (0: any); for other planes the op takes the next tier's 1x1 ukernel.
  int64_t plane_multiple;
};

// Ukernels for an ISA and R (block_rows), or nullptr when not compiled in.
const ConvUkernels* conv_ukernels(Isa isa, int64_t block_rows);
const ConvUkernels* conv_ukernels_scalar(int64_t block_rows);
const ConvUkernels* conv_ukernels_avx512(int64_t block_rows);
const ConvUkernels* conv_ukernels_avx2(int64_t block_rows);
const ConvUkernels* conv_ukernels_neon(int64_t block_rows);
const ConvUkernels* conv_ukernels_wasmsimd(int64_t block_rows);

struct ConvRegistryEntry {
  Isa isa;
  int64_t block_rows;
  const ConvUkernels* kernels;
};
int conv_registry_size();
const ConvRegistryEntry& conv_registry_entry(int i);

struct ConvShape {
  int64_t in_channels, in_h, in_w;
  int64_t out_channels, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// Empty when the geometry is usable (positive sizes, out_h/out_w match the conv formula), else a
// message naming what is wrong.
std::string conv_check_shape(const ConvShape& s);

// Phase-plane sizes for the shape: hq = ceil(in_h / s_h), wq = ceil(in_w / s_w).
inline int64_t conv_phase_h(const ConvShape& s) { return (s.in_h + s.stride_h - 1) / s.stride_h; }
inline int64_t conv_phase_w(const ConvShape& s) { return (s.in_w + s.stride_w - 1) / s.stride_w; }

// Fills taps [w.nnz] for a validated weight whose cols == in_channels * kernel_h * kernel_w.
void conv_build_taps(const SpmmWeight& w, const ConvShape& s, ConvTap* taps);

// Splits x [C, in_h, in_w] into phase planes xq [C, s_h, s_w, hq, wq] (zero where the phase row or
// column lies past the image).
void conv_phase_split(const float* x, const ConvShape& s, float* xq);

// The input gradient of a stride-1 conv is itself a forward conv of dy (C_out channels) with the
// weight W' [C_in, C_out * KH * KW], W'[ci, (co, kh, kw)] = W[co, ci, KH-1-kh, KW-1-kw], block rows
// 1, the same dilation and padding d * (K - 1) - p; this builds W''s structure so the vector kxk
// ukernels serve the backward too.
//   offsets_t int32 [C_in * KB' + 1], KB' = ceil(C_out * KH * KW / 256)
//   indices_t uint8 [w.nnz * R]   perm int64 [w.nnz * R]: W''s value e is w.values[perm[e]]
// Columns ascend within every row.
void conv_flip_transpose(const SpmmWeight& w, const ConvShape& s, int32_t* offsets_t,
                         uint8_t* indices_t, int64_t* perm);

// ---- Scalar references over the ORIGINAL geometry (no phases), any value type T in {float,
// double}; used for float64 (gradcheck), the backward ops and as the tests' ground truth. ----
//   x  T [C_in, in_h, in_w], y T [C_out, out_h, out_w]; groups [g0, g1).
template <typename T>
void conv_direct_ref(const SpmmWeight& w, const ConvShape& s, const T* x, const T* bias,
                     double out_min, double out_max, int64_t g0, int64_t g1, T* y);

// Input gradient for input channels [c0, c1): dx[ci] = sum over entries with that ci of
//   w * (dy scattered back through the tap). dx T [C_in, in_h, in_w] (rows c0..c1 overwritten).
template <typename T>
void conv_grad_input_ref(const SpmmWeight& w, const ConvShape& s, const T* dy, int64_t c0,
                         int64_t c1, T* dx);

// Values gradient for groups [g0, g1), accumulated (+=) into dv T [nnz * R].
template <typename T>
void conv_grad_values_ref(const SpmmWeight& w, const ConvShape& s, const T* dy, const T* x,
                          int64_t g0, int64_t g1, T* dv);

}  // namespace sparse_ext

// Geometry checks, taps, phase split, scalar references for forward and backward, and the registry.
#include "conv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../common/registry.h"

namespace sparse_ext {

namespace {

inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// Iterates the entries of groups [g0, g1): fn(g, j, col).
template <typename Fn>
inline void for_entries(const SpmmWeight& w, int64_t g0, int64_t g1, Fn fn) {
  const int64_t KB = w.k_blocks();
  for (int64_t g = g0; g < g1; ++g)
    for (int64_t kb = 0; kb < KB; ++kb)
      for (int32_t j = w.offsets[g * KB + kb]; j < w.offsets[g * KB + kb + 1]; ++j)
        fn(g, static_cast<int64_t>(j), kb * kSpmmKBlock + w.indices[j]);
}

}  // namespace

std::string conv_check_shape(const ConvShape& s) {
  if (s.in_channels < 0 || s.out_channels < 0) return "channel counts must be non-negative";
  if (s.kernel_h < 1 || s.kernel_w < 1) return "kernel_size must be positive";
  if (s.stride_h < 1 || s.stride_w < 1) return "stride must be positive";
  if (s.dil_h < 1 || s.dil_w < 1) return "dilation must be positive";
  if (s.pad_h < 0 || s.pad_w < 0) return "padding must be non-negative";
  if (s.in_h < 1 || s.in_w < 1) return "input height and width must be positive";
  const int64_t oh = (s.in_h + 2 * s.pad_h - s.dil_h * (s.kernel_h - 1) - 1);
  const int64_t ow = (s.in_w + 2 * s.pad_w - s.dil_w * (s.kernel_w - 1) - 1);
  if (oh < 0 || ow < 0)
    return "kernel (with dilation) is larger than the padded input (" + std::to_string(s.in_h) +
           "x" + std::to_string(s.in_w) + " padded by " + std::to_string(s.pad_h) + "," +
           std::to_string(s.pad_w) + ")";
  if (s.out_h != oh / s.stride_h + 1 || s.out_w != ow / s.stride_w + 1)
    return "output size does not match the convolution geometry";
  return std::string();
}

void conv_build_taps(const SpmmWeight& w, const ConvShape& s, ConvTap* taps) {
  // One tap per weight column (C_in * KH * KW of them), then one table lookup per entry: the
  // divisions per entry took a third of a 90% 3x3 stride-2 256x256 28x28 conv's time.
  const int64_t KK = s.kernel_h * s.kernel_w;
  const int64_t hq = conv_phase_h(s), wq = conv_phase_w(s);
  std::vector<ConvTap> by_col(static_cast<size_t>(s.in_channels * KK));
  for (int64_t kh = 0; kh < s.kernel_h; ++kh)
    for (int64_t kw = 0; kw < s.kernel_w; ++kw) {
      const int64_t offy = kh * s.dil_h - s.pad_h, offx = kw * s.dil_w - s.pad_w;
      const int64_t dy = floor_div(offy, s.stride_h), dx = floor_div(offx, s.stride_w);
      const int64_t ry = offy - dy * s.stride_h, rx = offx - dx * s.stride_w;
      for (int64_t ci = 0; ci < s.in_channels; ++ci) {
        const int64_t plane = (ci * s.stride_h + ry) * s.stride_w + rx;
        ConvTap& t = by_col[static_cast<size_t>(ci * KK + kh * s.kernel_w + kw)];
        t.plane = static_cast<int32_t>(plane * hq * wq);
        t.dy = static_cast<int16_t>(dy);
        t.dx = static_cast<int16_t>(dx);
      }
    }
  for_entries(w, 0, w.groups(), [&](int64_t, int64_t j, int64_t col) {
    taps[j] = by_col[static_cast<size_t>(col)];
  });
}

void conv_phase_split(const float* x, const ConvShape& s, float* xq) {
  const int64_t hq = conv_phase_h(s), wq = conv_phase_w(s), sh = s.stride_h, sw = s.stride_w;
  for (int64_t c = 0; c < s.in_channels; ++c)
    for (int64_t ry = 0; ry < sh; ++ry)
      for (int64_t rx = 0; rx < sw; ++rx) {
        float* plane = xq + ((c * sh + ry) * sw + rx) * hq * wq;
        for (int64_t a = 0; a < hq; ++a) {
          const int64_t iy = a * sh + ry;
          float* row = plane + a * wq;
          if (iy >= s.in_h) {
            std::memset(row, 0, sizeof(float) * wq);
            continue;
          }
          const float* src = x + (c * s.in_h + iy) * s.in_w;
          for (int64_t b = 0; b < wq; ++b) {
            const int64_t ix = b * sw + rx;
            row[b] = ix < s.in_w ? src[ix] : 0.f;
          }
        }
      }
}

// ---- scalar references over the original geometry -------------------------------------------

template <typename T>
void conv_direct_ref(const SpmmWeight& w, const ConvShape& s, const T* x, const T* bias,
                     double out_min, double out_max, int64_t g0, int64_t g1, T* y) {
  const int64_t R = w.block_rows, KK = s.kernel_h * s.kernel_w, P = s.out_h * s.out_w;
  const T* values = static_cast<const T*>(w.values);
  for (int64_t m = g0 * R; m < g1 * R; ++m)
    for (int64_t p = 0; p < P; ++p) y[m * P + p] = bias != nullptr ? bias[m] : T(0);
  for_entries(w, g0, g1, [&](int64_t g, int64_t j, int64_t col) {
    const int64_t ci = col / KK, kh = (col / s.kernel_w) % s.kernel_h, kw = col % s.kernel_w;
    const T* xc = x + ci * s.in_h * s.in_w;
    for (int64_t oy = 0; oy < s.out_h; ++oy) {
      const int64_t iy = oy * s.stride_h - s.pad_h + kh * s.dil_h;
      if (iy < 0 || iy >= s.in_h) continue;
      for (int64_t ox = 0; ox < s.out_w; ++ox) {
        const int64_t ix = ox * s.stride_w - s.pad_w + kw * s.dil_w;
        if (ix < 0 || ix >= s.in_w) continue;
        const T xv = xc[iy * s.in_w + ix];
        for (int64_t r = 0; r < R; ++r) y[(g * R + r) * P + oy * s.out_w + ox] += values[j * R + r] * xv;
      }
    }
  });
  if (std::isinf(out_min) && std::isinf(out_max)) return;
  for (int64_t m = g0 * R; m < g1 * R; ++m)
    for (int64_t p = 0; p < P; ++p) {
      T v = y[m * P + p];
      if (v < T(out_min)) v = T(out_min);
      if (v > T(out_max)) v = T(out_max);
      y[m * P + p] = v;
    }
}

template <typename T>
void conv_grad_input_ref(const SpmmWeight& w, const ConvShape& s, const T* dy, int64_t c0,
                         int64_t c1, T* dx) {
  const int64_t R = w.block_rows, KK = s.kernel_h * s.kernel_w, P = s.out_h * s.out_w;
  const T* values = static_cast<const T*>(w.values);
  std::fill(dx + c0 * s.in_h * s.in_w, dx + c1 * s.in_h * s.in_w, T(0));
  for_entries(w, 0, w.groups(), [&](int64_t g, int64_t j, int64_t col) {
    const int64_t ci = col / KK;
    if (ci < c0 || ci >= c1) return;
    const int64_t kh = (col / s.kernel_w) % s.kernel_h, kw = col % s.kernel_w;
    T* dxc = dx + ci * s.in_h * s.in_w;
    for (int64_t r = 0; r < R; ++r) {
      const T v = values[j * R + r];
      const T* dyc = dy + (g * R + r) * P;
      for (int64_t oy = 0; oy < s.out_h; ++oy) {
        const int64_t iy = oy * s.stride_h - s.pad_h + kh * s.dil_h;
        if (iy < 0 || iy >= s.in_h) continue;
        for (int64_t ox = 0; ox < s.out_w; ++ox) {
          const int64_t ix = ox * s.stride_w - s.pad_w + kw * s.dil_w;
          if (ix < 0 || ix >= s.in_w) continue;
          dxc[iy * s.in_w + ix] += v * dyc[oy * s.out_w + ox];
        }
      }
    }
  });
}

void conv_flip_transpose(const SpmmWeight& w, const ConvShape& s, int32_t* offsets_t,
                         uint8_t* indices_t, int64_t* perm) {
  const int64_t R = w.block_rows, KK = s.kernel_h * s.kernel_w;
  const int64_t cols_t = w.rows * KK, KB_t = (cols_t + kSpmmKBlock - 1) / kSpmmKBlock;
  struct Entry {
    int64_t row, col, source;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<size_t>(w.nnz * R));
  for_entries(w, 0, w.groups(), [&](int64_t g, int64_t j, int64_t col) {
    const int64_t ci = col / KK, flipped = KK - 1 - col % KK;  // (KH-1-kh) * KW + (KW-1-kw)
    for (int64_t r = 0; r < R; ++r)
      entries.push_back({ci, (g * R + r) * KK + flipped, j * R + r});
  });
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return a.row != b.row ? a.row < b.row : a.col < b.col;
  });
  std::fill(offsets_t, offsets_t + s.in_channels * KB_t + 1, 0);
  for (const Entry& e : entries) ++offsets_t[e.row * KB_t + e.col / kSpmmKBlock + 1];
  for (int64_t i = 0; i < s.in_channels * KB_t; ++i) offsets_t[i + 1] += offsets_t[i];
  for (size_t e = 0; e < entries.size(); ++e) {
    indices_t[e] = static_cast<uint8_t>(entries[e].col % kSpmmKBlock);
    perm[e] = entries[e].source;
  }
}

template <typename T>
void conv_grad_values_ref(const SpmmWeight& w, const ConvShape& s, const T* dy, const T* x,
                          int64_t g0, int64_t g1, T* dv) {
  const int64_t R = w.block_rows, KK = s.kernel_h * s.kernel_w, P = s.out_h * s.out_w;
  for_entries(w, g0, g1, [&](int64_t g, int64_t j, int64_t col) {
    const int64_t ci = col / KK, kh = (col / s.kernel_w) % s.kernel_h, kw = col % s.kernel_w;
    const T* xc = x + ci * s.in_h * s.in_w;
    for (int64_t r = 0; r < R; ++r) {
      const T* dyc = dy + (g * R + r) * P;
      T acc = T(0);
      for (int64_t oy = 0; oy < s.out_h; ++oy) {
        const int64_t iy = oy * s.stride_h - s.pad_h + kh * s.dil_h;
        if (iy < 0 || iy >= s.in_h) continue;
        for (int64_t ox = 0; ox < s.out_w; ++ox) {
          const int64_t ix = ox * s.stride_w - s.pad_w + kw * s.dil_w;
          if (ix < 0 || ix >= s.in_w) continue;
          acc += dyc[oy * s.out_w + ox] * xc[iy * s.in_w + ix];
        }
      }
      dv[j * R + r] += acc;
    }
  });
}

template void conv_direct_ref<float>(const SpmmWeight&, const ConvShape&, const float*,
                                     const float*, double, double, int64_t, int64_t, float*);
template void conv_direct_ref<double>(const SpmmWeight&, const ConvShape&, const double*,
                                      const double*, double, double, int64_t, int64_t, double*);
template void conv_grad_input_ref<float>(const SpmmWeight&, const ConvShape&, const float*,
                                         int64_t, int64_t, float*);
template void conv_grad_input_ref<double>(const SpmmWeight&, const ConvShape&, const double*,
                                          int64_t, int64_t, double*);
template void conv_grad_values_ref<float>(const SpmmWeight&, const ConvShape&, const float*,
                                          const float*, int64_t, int64_t, float*);
template void conv_grad_values_ref<double>(const SpmmWeight&, const ConvShape&, const double*,
                                           const double*, int64_t, int64_t, double*);

// ---- registry -----------------------------------------------------------------------------------

namespace {

const UkernelRegistry<ConvRegistryEntry>& registry() {
  static const UkernelRegistry<ConvRegistryEntry> entries([](auto add) {
    for (Isa isa : kAllIsas)
      for (int64_t R : {1, 2, 4, 8}) add({isa, R, conv_ukernels(isa, R)});
  });
  return entries;
}

}  // namespace

const ConvUkernels* conv_ukernels(Isa isa, int64_t block_rows) {
  switch (isa) {
    case Isa::kScalar: return conv_ukernels_scalar(block_rows);
    case Isa::kAvx2: return conv_ukernels_avx2(block_rows);
    case Isa::kAvx512: return conv_ukernels_avx512(block_rows);
    case Isa::kNeon: return conv_ukernels_neon(block_rows);
    case Isa::kWasmSimd: return conv_ukernels_wasmsimd(block_rows);
    default: return nullptr;
  }
}

int conv_registry_size() { return registry().size(); }
const ConvRegistryEntry& conv_registry_entry(int i) { return registry().entry(i); }

}  // namespace sparse_ext

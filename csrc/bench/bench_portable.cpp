// Sparse 1x1 convolution and SpMM against a dense GEMM at MobileNet v1 1x1 layer shapes, on one
// thread, with the torch-free kernel library only: runs natively and as WebAssembly under Node.js
// (scripts/bench_wasm.sh). Optional CMake target `bench_portable`, not a test.
//
//   bench_portable [--block-rows R] [--min-seconds S] [--quick]
//
// Per shape (C_in x C_out x pixels) and sparsity it times, as the median of interleaved repeats:
//   dense   Y[C_out, P] = W X, W packed once (not timed) into MR-row panels, X packed per call
//           into 8-pixel strips (timed); register tile MR channels x 8 pixels, broadcast weights.
//           WebAssembly: MR = 4 with SIMD128 intrinsics. Native: MR = 8 with C++ vector extensions
//           (on x86-64 compiled for AVX2 + FMA when the CPU has them).
//   conv    the active tier's 1x1 conv ukernel (conv.h) on the NCHW image, output NCHW.
//   spmm    the active tier's SpMM driver (spmm_run_groups: tile ukernel + its output copy) on
//           activations already packed per token tile (packing not timed), output [P, C_out].
// Both sparse outputs are checked against the dense one before anything is timed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common/isa.h"
#include "kernels/conv/conv.h"
#include "kernels/spmm/spmm.h"

#if defined(__wasm_simd128__)
#include <wasm_simd128.h>
#endif

using namespace sparse_ext;

namespace {

// xorshift64*: the same weights and inputs natively and under node.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 2654435761u + 1) {}
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ull;
  }
  float uniform() {
    return static_cast<float>(next() >> 40) / static_cast<float>(1 << 24) * 2.f - 1.f;
  }
};

// ---- dense baseline -----------------------------------------------------------------------------
// SIMD128: 4 x 8 = 8 accumulators (engines map v128 onto x86-64's 16 xmm registers). Native:
// 8 x 8, so that AVX2's 8-wide vectors still give 8 independent FMA chains.
#if defined(__wasm_simd128__)
constexpr int kMR = 4, kNR = 8;
#else
constexpr int kMR = 8, kNR = 8;
#endif

// Wp [M/MR][K][MR]: rows m0..m0+MR-1 of W interleaved per column (M % MR == 0).
std::vector<float> pack_weights(const std::vector<float>& W, int64_t M, int64_t K) {
  std::vector<float> wp(static_cast<size_t>(M * K));
  for (int64_t mb = 0; mb < M / kMR; ++mb)
    for (int64_t k = 0; k < K; ++k)
      for (int i = 0; i < kMR; ++i) wp[(mb * K + k) * kMR + i] = W[(mb * kMR + i) * K + k];
  return wp;
}

#if defined(__wasm_simd128__)
const char* const kDenseLabel = "dense 4x8 SIMD128 GEMM (broadcast weights, packed panels)";
// acc[i] += splat(w[i]) * xs per packed column k (XNNPACK's loadsplat form); 8 accumulators and 2
// activation vectors.
inline void dense_tile(const float* wp, const float* xs, int64_t K, float* y, int64_t ldy) {
  v128_t acc[kMR][2];
  for (int i = 0; i < kMR; ++i) acc[i][0] = acc[i][1] = wasm_f32x4_splat(0.f);
  for (int64_t k = 0; k < K; ++k) {
    const v128_t x0 = wasm_v128_load(xs + k * kNR), x1 = wasm_v128_load(xs + k * kNR + 4);
    for (int i = 0; i < kMR; ++i) {
      const v128_t w = wasm_v128_load32_splat(wp + k * kMR + i);
      acc[i][0] = wasm_f32x4_add(acc[i][0], wasm_f32x4_mul(w, x0));
      acc[i][1] = wasm_f32x4_add(acc[i][1], wasm_f32x4_mul(w, x1));
    }
  }
  for (int i = 0; i < kMR; ++i) {
    wasm_v128_store(y + i * ldy, acc[i][0]);
    wasm_v128_store(y + i * ldy + 4, acc[i][1]);
  }
}
using DenseTile = void (*)(const float*, const float*, int64_t, float*, int64_t);
DenseTile dense_tile_fn() { return dense_tile; }
#else
// The tile with GCC / Clang vector extensions: one 8-float vector per channel row, weights
// broadcast as scalars; the compiler picks the instructions (SSE2 pairs, or AVX2 + FMA below).
typedef float V8 __attribute__((vector_size(32)));
__attribute__((always_inline)) inline void dense_tile_body(const float* wp, const float* xs,
                                                           int64_t K, float* y, int64_t ldy) {
  static_assert(kNR == 8, "one V8 per row");
  V8 acc[kMR] = {};
  for (int64_t k = 0; k < K; ++k) {
    V8 xv;
    std::memcpy(&xv, xs + k * kNR, sizeof xv);
    for (int i = 0; i < kMR; ++i) acc[i] += wp[k * kMR + i] * xv;
  }
  for (int i = 0; i < kMR; ++i) std::memcpy(y + i * ldy, &acc[i], sizeof acc[i]);
}
void dense_tile_plain(const float* wp, const float* xs, int64_t K, float* y, int64_t ldy) {
  dense_tile_body(wp, xs, K, y, ldy);
}
using DenseTile = void (*)(const float*, const float*, int64_t, float*, int64_t);
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void dense_tile_avx2(const float* wp, const float* xs,
                                                         int64_t K, float* y, int64_t ldy) {
  dense_tile_body(wp, xs, K, y, ldy);
}
const char* kDenseLabel = "dense 8x8 GEMM (broadcast weights, packed panels), vector extensions";
DenseTile dense_tile_fn() {
  if (!isa_supported(Isa::kAvx2)) return dense_tile_plain;
  kDenseLabel = "dense 8x8 GEMM (broadcast weights, packed panels), C++ vector ext. for AVX2+FMA";
  return dense_tile_avx2;
}
#else
const char* const kDenseLabel =
    "dense 8x8 GEMM (broadcast weights, packed panels), C++ vector extensions";
DenseTile dense_tile_fn() { return dense_tile_plain; }
#endif
#endif

// Y [M, P] = W X, X [K, P]; xs is scratch of K * 8 floats. A last partial strip goes through a
// zero-padded copy.
void dense_gemm(DenseTile dense_tile, const std::vector<float>& wp, const float* x, int64_t M,
                int64_t K, int64_t P, float* xs, float* y) {
  float edge[kMR * kNR];
  for (int64_t p0 = 0; p0 < P; p0 += kNR) {
    const int64_t n = std::min<int64_t>(kNR, P - p0);
    for (int64_t k = 0; k < K; ++k) {
      const float* src = x + k * P + p0;
      float* dst = xs + k * kNR;
      for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
      for (int64_t j = n; j < kNR; ++j) dst[j] = 0.f;
    }
    for (int64_t mb = 0; mb < M / kMR; ++mb) {
      const float* w = wp.data() + mb * K * kMR;
      if (n == kNR) {
        dense_tile(w, xs, K, y + mb * kMR * P + p0, P);
      } else {
        dense_tile(w, xs, K, edge, kNR);
        for (int i = 0; i < kMR; ++i)
          for (int64_t j = 0; j < n; ++j) y[(mb * kMR + i) * P + p0 + j] = edge[i * kNR + j];
      }
    }
  }
}

// ---- sparse weight ------------------------------------------------------------------------------
struct Sparse {
  std::vector<int32_t> offsets;
  std::vector<uint8_t> indices;
  std::vector<float> values;
  SpmmWeight w{};
};

// Keeps each block of R rows x 1 column with probability 1 - sparsity; W is zeroed elsewhere.
Sparse prune(std::vector<float>& W, int64_t M, int64_t K, int64_t R, double sparsity, Rng& rng) {
  Sparse s;
  const int64_t KB = (K + kSpmmKBlock - 1) / kSpmmKBlock;
  std::vector<char> keep(static_cast<size_t>(M / R * K));
  for (auto& c : keep) c = static_cast<double>(rng.next() >> 11) / 9007199254740992.0 >= sparsity;
  s.offsets.push_back(0);
  for (int64_t g = 0; g < M / R; ++g)
    for (int64_t kb = 0; kb < KB; ++kb) {
      for (int64_t k = kb * kSpmmKBlock; k < std::min(K, (kb + 1) * kSpmmKBlock); ++k) {
        if (!keep[g * K + k]) {
          for (int64_t r = 0; r < R; ++r) W[(g * R + r) * K + k] = 0.f;
          continue;
        }
        s.indices.push_back(static_cast<uint8_t>(k - kb * kSpmmKBlock));
        for (int64_t r = 0; r < R; ++r) s.values.push_back(W[(g * R + r) * K + k]);
      }
      s.offsets.push_back(static_cast<int32_t>(s.indices.size()));
    }
  s.w = {M, K, R, static_cast<int64_t>(s.indices.size()), s.offsets.data(), s.indices.data(),
         s.values.data(), ValueType::kF32};
  return s;
}

// ---- timing -------------------------------------------------------------------------------------
// Median ms of each of three functions, timed in interleaved rounds (dense, conv, spmm, dense, ...)
// so that a change of machine load during the measurement hits all three alike. At least 5
// rounds, then until `min_seconds` have passed (at most 1000 rounds).
template <typename A, typename B, typename C>
void median_ms(A a, B b, C c, double min_seconds, double out[3]) {
  using clock = std::chrono::steady_clock;
  a(), b(), c();  // warm-up
  std::vector<double> ms[3];
  const auto start = clock::now();
  auto time = [](auto fn) {
    const auto t0 = clock::now();
    fn();
    return std::chrono::duration<double, std::milli>(clock::now() - t0).count();
  };
  while (ms[0].size() < 5 ||
         (std::chrono::duration<double>(clock::now() - start).count() < min_seconds &&
          ms[0].size() < 1000)) {
    ms[0].push_back(time(a));
    ms[1].push_back(time(b));
    ms[2].push_back(time(c));
  }
  for (int i = 0; i < 3; ++i) {
    std::sort(ms[i].begin(), ms[i].end());
    out[i] = ms[i][ms[i].size() / 2];
  }
}

double max_rel_error(const float* a, const float* ref, size_t n) {
  double worst = 0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - ref[i]) / (1.0 + std::fabs(ref[i]));
    if (!(e <= worst)) worst = e;
  }
  return worst;
}

const ConvUkernels* conv_for(int64_t R, int64_t pixels) {
  // The op's rule: a tier whose 1x1 ukernel needs a plane multiple passes to the next tier.
  for (Isa isa = active_isa();; isa = isa_fallback(isa)) {
    const ConvUkernels* k = conv_ukernels(isa, R);
    if (k != nullptr && (k->plane_multiple == 0 || pixels % k->plane_multiple == 0)) return k;
    if (isa == Isa::kScalar) return nullptr;
  }
}

}  // namespace

int main(int argc, char** argv) {
  int64_t R = 1;
  double min_seconds = 1.0;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--block-rows" && i + 1 < argc) {
      R = std::atoi(argv[++i]);
    } else if (a == "--min-seconds" && i + 1 < argc) {
      min_seconds = std::atof(argv[++i]);
    } else if (a == "--quick") {
      quick = true;
    } else {
      std::fprintf(stderr,
                   "usage: bench_portable [--block-rows 1|2|4|8] [--min-seconds S] [--quick]\n");
      return 2;
    }
  }
  if (R != 1 && R != 2 && R != 4 && R != 8) {
    std::fprintf(stderr, "--block-rows must be 1, 2, 4 or 8, got %ld\n", static_cast<long>(R));
    return 2;
  }
  const SpmmUkernels* sk = lookup_along_chain(
      active_isa(), [&](Isa isa) { return spmm_ukernels(isa, ValueType::kF32, R); });
  const DenseTile dense_tile = dense_tile_fn();
  std::printf("tier %s, one thread, interleaved medians (>= %.2f s a row), block rows %ld\n",
              isa_name(active_isa()), min_seconds, static_cast<long>(R));
  std::printf("baseline: %s\n", kDenseLabel);
  std::printf("conv: 1x1 conv ukernel on NCHW; spmm: %s / %s driver on pre-packed activations\n",
              sk->tile_name, sk->narrow_tile_name != nullptr ? sk->narrow_tile_name : "-");
  std::printf("%-20s %8s %10s %10s %8s %10s %8s  %s\n", "C_in x C_out x HW", "sparsity", "dense ms",
              "conv ms", "speedup", "spmm ms", "speedup", "conv ukernel");

  const int64_t shapes[][3] = {{128, 128, 56 * 56}, {256, 256, 28 * 28}, {512, 512, 14 * 14},
                               {1024, 1024, 7 * 7}};
  Rng rng(1);
  for (const auto& shape : shapes) {
    const int64_t K = shape[0], M = shape[1], P = shape[2];
    if (quick && K > 256) continue;
    std::vector<float> x(static_cast<size_t>(K * P));
    for (auto& v : x) v = rng.uniform();
    for (double sparsity : {0.7, 0.9}) {
      std::vector<float> W(static_cast<size_t>(M * K));
      for (auto& v : W) v = rng.uniform();
      const Sparse s = prune(W, M, K, R, sparsity, rng);
      const std::vector<float> wp = pack_weights(W, M, K);
      std::vector<float> xs(static_cast<size_t>(K * kNR)), yd(static_cast<size_t>(M * P)),
          yc(yd.size()), ys(yd.size());

      const ConvUkernels* ck = conv_for(R, P);
      const ConvEpilogue ep{nullptr, -INFINITY, INFINITY};
      const int64_t G = M / R;
      auto run_dense = [&] { dense_gemm(dense_tile, wp, x.data(), M, K, P, xs.data(), yd.data()); };
      auto run_conv = [&] { ck->conv1x1(s.w, x.data(), P, 0, P, 0, G, ep, yc.data(), P); };
      // SpMM: y [P, M] = x^T W^T, activations packed per tile of NT tokens, zero-padded.
      const int64_t NT = spmm_tile_cols_for(*sk, P), Kp = s.w.padded_cols();
      std::vector<float> xT(static_cast<size_t>((P + NT - 1) / NT * Kp * NT), 0.f);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t p = 0; p < P; ++p) xT[(p / NT) * Kp * NT + k * NT + p % NT] = x[k * P + p];
      SpmmActivations a{};
      a.tokens = P;
      a.xT = xT.data();
      a.y = ys.data();
      a.ldy = M;
      auto run_spmm = [&] { spmm_run_groups(s.w, a, *sk, 0, G); };

      run_dense();
      run_conv();
      run_spmm();
      std::vector<float> ysT(ys.size());
      for (int64_t p = 0; p < P; ++p)
        for (int64_t m = 0; m < M; ++m) ysT[m * P + p] = ys[p * M + m];
      const double tol = 1e-4 * std::sqrt(static_cast<double>(K));
      const double ec = max_rel_error(yc.data(), yd.data(), yd.size());
      const double es = max_rel_error(ysT.data(), yd.data(), yd.size());
      if (!(ec < tol) || !(es < tol)) {
        std::fprintf(stderr, "mismatch against dense at %ldx%ldx%ld: conv %g, spmm %g\n",
                     static_cast<long>(K), static_cast<long>(M), static_cast<long>(P), ec, es);
        return 1;
      }
      double t[3];
      median_ms(run_dense, run_conv, run_spmm, min_seconds, t);
      const double td = t[0], tc = t[1], ts = t[2];
      char label[32];
      std::snprintf(label, sizeof label, "%ldx%ldx%ld", static_cast<long>(K), static_cast<long>(M),
                    static_cast<long>(P));
      std::printf("%-20s %7.0f%% %10.3f %10.3f %7.2fx %10.3f %7.2fx  %s\n", label, sparsity * 100,
                  td, tc, td / tc, ts, td / ts, ck->conv1x1_name);
      std::fflush(stdout);
    }
  }
  return 0;
}

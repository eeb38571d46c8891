// MoE kernels: every registry GEMV entry against a double reference, routing against a brute-force
// top-k, permute / combine / scatter invariants, and rejection of bad inputs.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/common/bf16.h"
#include "kernels/moe/moe.h"
#include "test_util.h"

using namespace sparse_ext;
using sparse_ext_test::Rng;

namespace {

// Checks e.kernels->gemv, or ->gemm when `gemm` (same contract), over two row ranges as two work
// items would run them. Every buffer has exactly the size the contract allows (ASan sees any
// overrun); with `pad`, x and y rows carry padding that must stay untouched.
void check_gemv(const MoeRegistryEntry& e, bool gemm, int64_t rows, int64_t K, int64_t tokens,
                bool pad, Rng& rng) {
  const MoeGemvUkernel kernel = gemm ? e.kernels->gemm : e.kernels->gemv;
  const char* name = gemm ? e.kernels->gemm_name : e.kernels->gemv_name;
  std::vector<float> wf(static_cast<size_t>(rows * K));
  std::vector<uint16_t> wb(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) {
    wb[i] = float_to_bf16(rng.uniform());
    wf[i] = bf16_to_float(wb[i]);  // same numbers in both types
  }
  const void* w = e.weight_type == ValueType::kF32 ? static_cast<const void*>(wf.data())
                                                       : static_cast<const void*>(wb.data());
  const int64_t ldx = pad ? K + 3 : K;
  std::vector<float> x(static_cast<size_t>(tokens * ldx));
  for (auto& v : x) v = rng.uniform();
  const int64_t mid = rows / 2;
  const int64_t ranges[2][2] = {{0, mid}, {mid, rows}};
  double err = 0;
  int64_t clobbered = 0;
  for (const auto& range : ranges) {
    const int64_t r0 = range[0], width = range[1] - range[0];
    const int64_t ldy = pad ? width + 5 : width;
    std::vector<float> y(static_cast<size_t>(tokens * ldy), -7.f);
    kernel(w, K, r0, range[1], x.data(), ldx, tokens, y.data(), ldy);
    for (int64_t n = 0; n < tokens; ++n) {
      for (int64_t j = 0; j < width; ++j) {
        double ref = 0;
        for (int64_t c = 0; c < K; ++c)
          ref += static_cast<double>(wf[(r0 + j) * K + c]) * x[n * ldx + c];
        err = std::max(err, std::fabs(y[n * ldy + j] - ref) / (1.0 + std::fabs(ref)));
      }
      for (int64_t j = width; j < ldy; ++j) clobbered += y[n * ldy + j] != -7.f;
    }
  }
  SE_EXPECT(err < 1e-5 * std::sqrt(static_cast<double>(K) + 1),
            "%s rows=%ld K=%ld tokens=%ld: error %g", name, (long)rows, (long)K, (long)tokens,
            err);
  SE_EXPECT(clobbered == 0, "%s rows=%ld K=%ld tokens=%ld: %ld padding values written", name,
            (long)rows, (long)K, (long)tokens, (long)clobbered);
}

// Non-finite gates in every lane position: the vector paths give what the scalar reference gives
// (silu(-inf) = NaN, silu(inf) = inf, NaN stays NaN).
void check_silu_non_finite(const MoeRegistryEntry& e) {
  const float specials[] = {INFINITY, -INFINITY, NAN, -100.f, 100.f};
  for (int64_t n : {3, 17, 40}) {
    for (int64_t at = 0; at < n; at += 5) {
      for (float special : specials) {
        std::vector<float> g(static_cast<size_t>(n), 0.5f), u(g.size(), 2.f), h(g.size()),
            ref(g.size());
        g[static_cast<size_t>(at)] = special;
        u[static_cast<size_t>((at + 1) % n)] = -INFINITY;
        e.kernels->silu(g.data(), u.data(), n, h.data());
        moe_activate<float>(MoeActivation::kSilu, g.data(), u.data(), n, ref.data());
        for (int64_t i = 0; i < n; ++i) {
          const float a = h[static_cast<size_t>(i)], b = ref[static_cast<size_t>(i)];
          const bool same = (std::isnan(a) && std::isnan(b)) || a == b ||
                            std::fabs(a - b) <= 1e-6f * (1.f + std::fabs(b));
          SE_EXPECT(same, "%s n=%ld g[%ld]=%g: lane %ld gives %g, reference %g",
                    e.kernels->silu_name, (long)n, (long)at, special, (long)i, a, b);
        }
      }
    }
  }
}

// Gates at and past exp's overflow (std::exp(-g) = inf from g < -88.7228) times non-finite or
// zero up-projections in the same lane: silu(g) must be the reference's -0 there (so 0 * inf is
// NaN), a tiny finite value just before it (so tiny * inf is -inf). Exact NaN / inf / sign
// agreement in every lane position.
void check_silu_exp_overflow(const MoeRegistryEntry& e) {
  const float gates[] = {-88.5f, -88.72283f, -88.72284f, -89.f, -100.f, -1e30f};
  const float ups[] = {INFINITY, -INFINITY, 0.f, 1.f};
  for (int64_t n : {5, 19}) {
    for (int64_t at = 0; at < n; at += 3) {
      for (float gate : gates) {
        for (float up : ups) {
          std::vector<float> g(static_cast<size_t>(n), -0.25f), u(g.size(), 3.f), h(g.size()),
              ref(g.size());
          g[static_cast<size_t>(at)] = gate;
          u[static_cast<size_t>(at)] = up;
          e.kernels->silu(g.data(), u.data(), n, h.data());
          moe_activate<float>(MoeActivation::kSilu, g.data(), u.data(), n, ref.data());
          const float a = h[static_cast<size_t>(at)], b = ref[static_cast<size_t>(at)];
          const bool same = std::isnan(a) ? std::isnan(b)
                            : std::isinf(b) ? a == b
                            : !std::isnan(b) && std::signbit(a) == std::signbit(b) &&
                                  std::fabs(a - b) <= 1e-6f * (1.f + std::fabs(b));
          SE_EXPECT(same, "%s n=%ld lane %ld: silu(%g) * %g gives %g, reference %g",
                    e.kernels->silu_name, (long)n, (long)at, gate, up, a, b);
        }
      }
    }
  }
}

void check_silu(const MoeRegistryEntry& e, Rng& rng) {
  for (int64_t n : {1, 7, 8, 37, 300}) {
    std::vector<float> g(static_cast<size_t>(n)), u(g.size()), h(g.size()), h1(g.size());
    for (auto& v : g) v = rng.uniform() * 30.f;
    for (auto& v : u) v = rng.uniform();
    g[0] = -100.f;  // far past the exp clamp
    e.kernels->silu(g.data(), u.data(), n, h.data());
    e.kernels->silu(g.data(), nullptr, n, h1.data());
    for (int64_t i = 0; i < n; ++i) {
      const double gd = g[i], ref = gd / (1.0 + std::exp(-gd));
      SE_EXPECT(std::fabs(h1[i] - ref) <= 4e-7 * (1.0 + std::fabs(ref)), "%s silu(%g) = %g, want %g",
                e.kernels->silu_name, gd, h1[i], ref);
      SE_EXPECT(std::fabs(h[i] - ref * u[i]) <= 4e-7 * (1.0 + std::fabs(ref)), "%s swiglu",
                e.kernels->silu_name);
    }
  }
}

void check_route(Rng& rng) {
  for (int64_t E : {1, 4, 8, 13}) {
    for (int64_t k = 1; k <= E; k += (E > 4 ? 3 : 1)) {
      const int64_t T = 9;
      std::vector<float> logits(static_cast<size_t>(T * E));
      for (auto& v : logits) v = std::round(rng.uniform() * 3.f);  // plenty of ties
      MoeRouteParams p{E, k, MoeScoring::kSoftmax, true, 1, 1};
      SE_EXPECT(moe_route_validate(p).empty(), "valid params rejected");
      std::vector<float> w(static_cast<size_t>(T * k));
      std::vector<int64_t> idx(static_cast<size_t>(T * k));
      moe_route_tokens<float>(logits.data(), nullptr, p, 0, T, w.data(), idx.data());
      for (int64_t t = 0; t < T; ++t) {
        std::vector<int64_t> order(static_cast<size_t>(E));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
          return logits[t * E + a] > logits[t * E + b];
        });
        double sum = 0;
        for (int64_t j = 0; j < k; ++j) {
          SE_EXPECT(idx[t * k + j] == order[j], "E=%ld k=%ld t=%ld slot %ld: got %ld want %ld",
                    (long)E, (long)k, (long)t, (long)j, (long)idx[t * k + j], (long)order[j]);
          sum += w[t * k + j];
        }
        SE_EXPECT(std::fabs(sum - 1.0) < 1e-5, "renormalized weights sum to %g", sum);
      }
    }
  }
  MoeRouteParams bad{4, 5, MoeScoring::kSoftmax, true, 1, 1};
  SE_EXPECT(!moe_route_validate(bad).empty(), "top_k > E accepted");
  bad = {6, 2, MoeScoring::kSigmoid, true, 4, 1};
  SE_EXPECT(!moe_route_validate(bad).empty(), "E %% groups != 0 accepted");
}

void check_permute_combine(Rng& rng) {
  const int64_t T = 23, k = 2, E = 5, H = 7;
  std::vector<int64_t> idx(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    idx[t * k] = static_cast<int64_t>(rng.next() % E);
    idx[t * k + 1] = (idx[t * k] + 1 + static_cast<int64_t>(rng.next() % (E - 1))) % E;
  }
  for (int64_t capacity : {-1, 0, 3, 100}) {
    std::vector<int64_t> row_token(static_cast<size_t>(T * k)), offsets(E + 1),
        inverse(static_cast<size_t>(T * k));
    const std::string err = moe_permute(idx.data(), T, k, E, capacity, row_token.data(),
                                        offsets.data(), inverse.data());
    SE_EXPECT(err.empty(), "permute failed: %s", err.c_str());
    SE_EXPECT(offsets[0] == 0, "offsets[0]");
    for (int64_t e = 0; e < E; ++e) {
      SE_EXPECT(offsets[e + 1] >= offsets[e], "offsets decrease");
      if (capacity >= 0) SE_EXPECT(offsets[e + 1] - offsets[e] <= capacity, "capacity exceeded");
      for (int64_t p = offsets[e]; p + 1 < offsets[e + 1]; ++p)
        SE_EXPECT(row_token[p] <= row_token[p + 1], "segment not in token order (stability)");
    }
    for (int64_t i = 0; i < T * k; ++i) {
      SE_EXPECT(row_token[inverse[i]] == i / k, "inverse broken at %ld", (long)i);
      if (inverse[i] < offsets[E])
        SE_EXPECT(inverse[i] >= offsets[idx[i]] && inverse[i] < offsets[idx[i] + 1],
                  "pair %ld in the wrong segment", (long)i);
    }
    if (capacity < 0) SE_EXPECT(offsets[E] == T * k, "dropless lost pairs");
    // Combine against a direct sum, then its backward and the scatter.
    std::vector<double> y(static_cast<size_t>(T * k * H)), w(static_cast<size_t>(T * k)),
        out(static_cast<size_t>(T * H));
    for (auto& v : y) v = rng.uniform();
    for (auto& v : w) v = rng.uniform();
    moe_combine_tokens<double>(y.data(), w.data(), inverse.data(), k, H, 0, T, out.data());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        double ref = 0;
        for (int64_t j = 0; j < k; ++j) ref += w[t * k + j] * y[inverse[t * k + j] * H + h];
        SE_EXPECT(std::fabs(ref - out[t * H + h]) < 1e-12, "combine mismatch");
      }
    std::vector<int64_t> tok_off(T + 1), tok_rows(static_cast<size_t>(offsets[E]));
    SE_EXPECT(moe_rows_by_token(row_token.data(), offsets[E], T, tok_off.data(), tok_rows.data())
                  .empty(), "rows_by_token failed");
    std::vector<double> sc(static_cast<size_t>(T * H));
    moe_scatter_rows_tokens<double>(y.data(), tok_off.data(), tok_rows.data(), H, 0, T, sc.data());
    for (int64_t t = 0; t < T; ++t) {
      double ref = 0, got = sc[t * H];
      for (int64_t p = 0; p < offsets[E]; ++p)
        if (row_token[p] == t) ref += y[p * H];
      SE_EXPECT(std::fabs(ref - got) < 1e-12, "scatter mismatch");
    }
  }
  idx[3] = E;
  std::vector<int64_t> a(static_cast<size_t>(T * k)), b(E + 1), c(static_cast<size_t>(T * k));
  SE_EXPECT(moe_permute(idx.data(), T, k, E, -1, a.data(), b.data(), c.data()).find("out of range") !=
                std::string::npos, "expert index out of range accepted");
  std::vector<int64_t> bad_rows = {0, 5};
  std::vector<int64_t> to(3), tr(2);
  SE_EXPECT(!moe_rows_by_token(bad_rows.data(), 2, 2, to.data(), tr.data()).empty(),
            "row_token out of range accepted");
}

void check_activation() {
  const double xs[] = {-3.0, -0.5, 0.0, 0.7, 2.5};
  for (const char* name : {"silu", "gelu", "gelu_tanh", "relu"}) {
    MoeActivation act;
    SE_EXPECT(moe_activation_from_name(name, &act), "activation %s not parsed", name);
    for (double x : xs) {
      // Derivative against a central difference (relu away from 0).
      const double eps = 1e-6, u = 1.3, dh = 1.0;
      double gp, gm, g = x, dg, du;
      const double xp = x + eps, xm = x - eps;
      moe_activate<double>(act, &xp, &u, 1, &gp);
      moe_activate<double>(act, &xm, &u, 1, &gm);
      moe_activate_backward<double>(act, &g, &u, &dh, 1, &dg, &du);
      if (act == MoeActivation::kRelu && x == 0.0) continue;
      SE_EXPECT(std::fabs((gp - gm) / (2 * eps) - dg) < 1e-5, "%s'(%g) wrong", name, x);
    }
  }
  MoeActivation act;
  SE_EXPECT(!moe_activation_from_name("tanh", &act), "unknown activation accepted");
}

}  // namespace

int main() {
  Rng rng(7);
  for (int i = 0; i < moe_registry_size(); ++i) {
    const MoeRegistryEntry& e = moe_registry_entry(i);
    if (!isa_supported(e.isa)) continue;
    if (e.cpu_feature != nullptr && !cpu_has_feature(e.cpu_feature)) {
      std::printf("test_moe: SKIPPED %s (this CPU lacks %s)\n", e.kernels->gemv_name,
                  e.cpu_feature);
      continue;
    }
    sparse_ext_test::note_covered(isa_name(e.isa), e.kernels->gemv_name);
    sparse_ext_test::note_covered(isa_name(e.isa), e.kernels->silu_name);
    sparse_ext_test::note_covered(isa_name(e.isa), e.kernels->gemm_name);
    // rows x K x tokens: row-tile remainders (rows % 3, % 4, % 8, % 16, % 48), K tails (K % 8,
    // % 16, % 32, K < 8, K = 0), every token-pass split up to 16, GEMM token-tile remainders
    // (6 and 8 tokens), and row ranges past one 48-row panel with several 128-wide K blocks.
    const int64_t shapes[][3] = {{1, 1, 1},    {7, 33, 1},   {8, 64, 2},    {9, 100, 3},
                                 {13, 17, 5},  {32, 256, 8}, {5, 1024, 7},  {6, 40, 0},
                                 {40, 48, 1},  {37, 1040, 1}, {64, 20, 1},  {33, 64, 4},
                                 {50, 96, 6},  {49, 200, 11}, {48, 72, 12}, {10, 40, 9},
                                 {29, 136, 16}, {2, 24, 13},  {5, 0, 3},    {7, 5, 6},
                                 {9, 24, 1},   {9, 12, 1},   {17, 8, 1},    {19, 15, 10},
                                 {11, 40, 14}, {4, 24, 15},  {48, 1024, 64}, {40, 100, 131},
                                 {17, 33, 50}, {96, 9, 37},  {130, 300, 19}, {100, 161, 9},
                                 {194, 270, 57}};
    int shape_index = 0;
    for (const auto& s : shapes)
      for (bool gemm : {false, true})
        check_gemv(e, gemm, s[0], s[1], s[2], /*pad=*/(shape_index++ % 3) != 0, rng);
    check_silu(e, rng);
    check_silu_non_finite(e);
    check_silu_exp_overflow(e);
  }
#if defined(__wasm_simd128__)
  sparse_ext_test::expect_covered("wasmsimd");
#endif
#if defined(__aarch64__) && defined(SPARSE_EXT_HAVE_NEON_KERNELS)
  sparse_ext_test::expect_covered("neon");
#endif
  check_route(rng);
  check_permute_combine(rng);
  check_activation();
  return sparse_ext_test::finish("test_moe");
}

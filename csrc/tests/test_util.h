// Minimal test harness for the torch-free kernels: deterministic data and checked comparisons.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace sparse_ext_test {

inline int& failures() {
  static int count = 0;
  return count;
}

#define SE_EXPECT(cond, ...)                                                   \
  do {                                                                         \
    if (!(cond)) {                                                             \
      std::fprintf(stderr, "%s:%d: expectation failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                       \
      std::fprintf(stderr, "\n");                                              \
      ++sparse_ext_test::failures();                                           \
    }                                                                          \
  } while (0)

// xorshift64*: the same sequence on every platform (qemu included).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 2654435761u + 1) {}
  uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 2685821657736338717ull;
  }
  float uniform() { return static_cast<float>(next() >> 40) / static_cast<float>(1 << 24) * 2.f - 1.f; }
  bool bernoulli(double p) { return static_cast<double>(next() >> 11) / 9007199254740992.0 < p; }
};

// Max |a - b| / (1 + |b|) over two equal-length arrays.
inline double max_rel_error(const float* a, const float* b, size_t n) {
  double worst = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - b[i]) / (1.0 + std::fabs(b[i]));
    if (!(e <= worst)) worst = e;  // NaN propagates as a failure
  }
  return worst;
}

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all passed\n", name);
    return 0;
  }
  std::printf("%s: %d failure(s)\n", name, failures());
  return 1;
}

}  // namespace sparse_ext_test

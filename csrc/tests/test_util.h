// Minimal test harness for the torch-free kernels: deterministic data and checked comparisons.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
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

// SPARSE_EXT_TEST_SMALL=1 (e.g. under qemu): tests skip their largest shapes.
inline bool small_sizes() {
  const char* s = std::getenv("SPARSE_EXT_TEST_SMALL");
  return s != nullptr && s[0] != '\0' && std::strcmp(s, "0") != 0;
}

// Every ukernel a test exercised, as "isa:name"; finish() prints them so that a log shows what
// was covered (e.g. the NEON kernels under qemu).
inline std::vector<std::string>& covered() {
  static std::vector<std::string> names;
  return names;
}
inline void note_covered(const char* isa, const char* name) {
  if (name == nullptr) return;
  const std::string entry = std::string(isa) + ":" + name;
  for (const auto& c : covered())
    if (c == entry) return;
  covered().push_back(entry);
}

// Fails unless some ukernel of `isa` was checked: a build that compiles an ISA's kernels (the
// aarch64 cross build for "neon") must not pass by silently testing none of them.
inline void expect_covered(const char* isa) {
  const std::string prefix = std::string(isa) + ":";
  bool found = false;
  for (const auto& c : covered()) found = found || c.compare(0, prefix.size(), prefix) == 0;
  SE_EXPECT(found, "no %s ukernel was checked", isa);
}

inline int finish(const char* name) {
  if (!covered().empty()) {
    std::printf("%s: ukernels checked:", name);
    for (const auto& c : covered()) std::printf(" %s", c.c_str());
    std::printf("\n");
  }
  if (failures() == 0) {
    std::printf("%s: all passed\n", name);
    return 0;
  }
  std::printf("%s: %d failure(s)\n", name, failures());
  return 1;
}

}  // namespace sparse_ext_test

// N:M shape checks, canonical validation, the per-range drivers and the ukernel registry.
#include "nm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/registry.h"

namespace sparse_ext {

std::string nm_check_shape(const NmWeight& w) {
  if (w.m != 4 && w.m != 8 && w.m != 16)
    return "m must be 4, 8 or 16, got " + std::to_string(w.m);
  if (w.n < 1 || w.n >= w.m)
    return "n must satisfy 1 <= n < m (" + std::to_string(w.m) + "), got " + std::to_string(w.n);
  if (w.rows < 0 || w.cols < 0) return "sizes must be non-negative";
  return std::string();
}

std::string nm_validate(const NmWeight& w) {
  std::string error = nm_check_shape(w);
  if (!error.empty()) return error;
  const int64_t G = w.groups(), N = w.n, stride = w.meta_stride();
  const int bits = w.bits();
  for (int64_t r = 0; r < w.rows; ++r) {
    const uint8_t* meta = w.meta + r * stride;
    for (int64_t g = 0; g < G; ++g) {
      uint32_t previous = 0;
      for (int64_t i = 0; i < N; ++i) {
        const uint32_t idx = nm_read_index(meta, g * N + i, bits);
        if (i > 0 && idx <= previous)
          return "row " + std::to_string(r) + ", group " + std::to_string(g) +
                 ": indices must be strictly increasing within a group (slot " +
                 std::to_string(i) + " has " + std::to_string(idx) + " after " +
                 std::to_string(previous) + ")";
        previous = idx;
      }
    }
  }
  return std::string();
}

void nm_fill_gcol(int64_t n, int64_t m, int64_t count, int32_t* gcol) {
  for (int64_t j = 0; j < count; ++j) gcol[j] = static_cast<int32_t>((j / n) * m);
}

int64_t nm_k_block(int64_t n, int64_t m, int64_t nt) {
  // The x block [KC, nt] floats should stay in L1 (about 16 KB) while a chunk of rows reuses it;
  // full blocks hold a multiple of 8 slots per row and at most kNmMaxBlockSlots.
  // Measured on the 2-core Zen 4 dev VM (bench/bench_nm.py, tools in docs/nm.md): 32 KB blocks
  // and >= 32 slots per row and block beat 8-16 KB blocks, whose per-row setup then dominates.
  constexpr int64_t block_bytes = 32768;
  constexpr int64_t min_slots = 32;
  const int64_t unit = 8 * m;
  const int64_t by_bytes = block_bytes / (4 * nt) / unit * unit;
  const int64_t by_slots = (min_slots * m / n + unit - 1) / unit * unit;
  const int64_t want = std::max<int64_t>(unit, std::max(by_bytes, by_slots));
  const int64_t cap = std::max<int64_t>(unit, kNmMaxBlockSlots * m / n / unit * unit);
  return std::min(want, cap);
}

NmTileUkernel nm_tile_for(const NmUkernels& k, int64_t nt) {
  for (const auto& t : k.tiles)
    if (t.fn != nullptr && t.nt == nt) return t.fn;
  return nullptr;
}

int64_t nm_pick_nt(const NmUkernels& k, int64_t tokens) {
  // Narrowest tile that covers the tokens, else the widest.
  int64_t widest = 0;
  for (const auto& t : k.tiles) {
    if (t.fn == nullptr) continue;
    if (t.nt >= tokens) return t.nt;
    widest = std::max(widest, t.nt);
  }
  return widest;
}

void nm_run_rows(const NmWeight& w, const NmActivations& a, const NmUkernels& k, int64_t r0,
                 int64_t r1) {
  if (r1 <= r0) return;
  if (a.tokens == 1) {
    k.gemv(w, a.x, a.gcol, r0, r1, a.y);
    if (a.bias != nullptr)
      for (int64_t r = r0; r < r1; ++r) a.y[r] += a.bias[r];
    return;
  }
  const int64_t NT = a.nt, G = w.groups(), N = w.n, M = w.m;
  const NmTileUkernel tile = nm_tile_for(k, NT);
  const int64_t kb_groups = nm_k_block(N, M, NT) / M;
  const int64_t panels = (a.tokens + NT - 1) / NT;
  const int64_t panel_size = w.padded_cols() * NT;
  const int64_t chunk = panels == 1 && k.one_panel_rows > 0 ? k.one_panel_rows : kNmRowChunk;
  std::vector<float> ytile(static_cast<size_t>(chunk * NT));
  for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
    const int64_t c1 = std::min(r1, c0 + chunk);
    for (int64_t p = 0; p < panels; ++p) {
      const float* xP = a.panels + p * panel_size;
      std::memset(ytile.data(), 0, sizeof(float) * (c1 - c0) * NT);
      for (int64_t g0 = 0; g0 < G; g0 += kb_groups) {
        const int64_t g1 = std::min(G, g0 + kb_groups);
        tile(w, xP, a.gcol, g0, g1, c0, c1, ytile.data());
      }
      const int64_t t0 = p * NT, nt = std::min(NT, a.tokens - t0);
      for (int64_t t = 0; t < nt; ++t) {
        float* yrow = a.y + (t0 + t) * a.ldy;
        const float* src = ytile.data() + t;
        if (a.bias != nullptr) {
          for (int64_t r = c0; r < c1; ++r) yrow[r] = src[(r - c0) * NT] + a.bias[r];
        } else {
          for (int64_t r = c0; r < c1; ++r) yrow[r] = src[(r - c0) * NT];
        }
      }
    }
  }
}

void nm_grad_input_groups(const NmWeight& w, const float* dyP, int64_t tokens, const NmUkernels& k,
                          const int32_t* gcol, int64_t g0, int64_t g1, float* dx, int64_t ldx) {
  if (g1 <= g0) return;
  const int64_t NT = k.scatter_nt, M = w.m, N = w.n, K = w.cols;
  const int64_t kb_groups = nm_k_block(N, M, NT) / M;
  const int64_t panels = (tokens + NT - 1) / NT;
  std::vector<float> dxtile(static_cast<size_t>(kb_groups * M * NT));
  for (int64_t p = 0; p < panels; ++p) {
    const float* dP = dyP + p * w.rows * NT;
    const int64_t t0 = p * NT, nt = std::min(NT, tokens - t0);
    for (int64_t b0 = g0; b0 < g1; b0 += kb_groups) {
      const int64_t b1 = std::min(g1, b0 + kb_groups);
      std::memset(dxtile.data(), 0, sizeof(float) * (b1 - b0) * M * NT);
      k.scatter(w, dP, gcol, b0, b1, 0, w.rows, dxtile.data());
      const int64_t c0 = b0 * M, c1 = std::min(b1 * M, K);
      for (int64_t t = 0; t < nt; ++t) {
        float* drow = dx + (t0 + t) * ldx;
        for (int64_t c = c0; c < c1; ++c) drow[c] = dxtile[(c - c0) * NT + t];
      }
    }
  }
}

namespace {

const UkernelRegistry<NmRegistryEntry>& registry() {
  static const UkernelRegistry<NmRegistryEntry> entries([](auto add) {
    for (Isa isa : kAllIsas)
      for (ValueType vt : {ValueType::kF32, ValueType::kBF16}) add({isa, vt, nm_ukernels(isa, vt)});
  });
  return entries;
}

}  // namespace

const NmUkernels* nm_ukernels(Isa isa, ValueType value_type) {
  switch (isa) {
    case Isa::kScalar: return nm_ukernels_scalar(value_type);
    case Isa::kAvx2: return nm_ukernels_avx2(value_type);
    case Isa::kAvx512: return nm_ukernels_avx512(value_type);
    case Isa::kNeon: return nm_ukernels_neon(value_type);
    case Isa::kWasmSimd: return nm_ukernels_wasmsimd(value_type);
    default: return nullptr;
  }
}

NmUkernels nm_ukernels_for(Isa isa, ValueType value_type) {
  NmUkernels k{};
  for (;;) {
    if (const NmUkernels* t = nm_ukernels(isa, value_type)) {
      if (k.gemv == nullptr) k.gemv_name = t->gemv_name, k.gemv = t->gemv;
      if (k.tiles[0].fn == nullptr) {
        std::copy(std::begin(t->tiles), std::end(t->tiles), k.tiles);
        k.one_panel_rows = t->one_panel_rows;
      }
      if (k.scatter == nullptr)
        k.scatter_name = t->scatter_name, k.scatter = t->scatter, k.scatter_nt = t->scatter_nt;
      if (k.sddmm == nullptr) k.sddmm_name = t->sddmm_name, k.sddmm = t->sddmm;
    }
    if (isa == Isa::kScalar) return k;
    isa = isa_fallback(isa);
  }
}

int nm_registry_size() { return registry().size(); }
const NmRegistryEntry& nm_registry_entry(int i) { return registry().entry(i); }

}  // namespace sparse_ext

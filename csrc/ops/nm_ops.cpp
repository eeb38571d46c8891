// ATen glue for the N:M family: checks (shared with the CUDA glue, nm_args.h), panel packing,
// thread split, kernel calls.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>

#include "../kernels/nm/nm.h"
#include "common.h"
#include "plan.h"
#include "nm_args.h"

namespace sparse_ext {
namespace {

// The CPU's device checks for the shared argument checks (nm_args.h): every tensor on the CPU.
void check_cpu_operand(const at::Tensor&, const char*, const at::Tensor& t, const char* name) {
  check_cpu(t, name);
}
constexpr NmDeviceChecks kCpu{&check_cpu, &check_cpu_operand, /*float16=*/false};

// The kernels' own guard on a checked weight (it cannot fail after the shared checks).
NmWeight check_shape(const NmWeight& w) {
  const std::string error = nm_check_shape(w);
  TORCH_CHECK(error.empty(), "malformed N:M weight: ", error);
  return w;
}

NmUkernels ukernels_for(ValueType vt) {
  const NmUkernels k = nm_ukernels_for(active_isa(), vt);
  TORCH_CHECK(k.gemv != nullptr, "no N:M kernel for this value type");
  return k;
}

// The forward's candidates: each tier's merged entry at and below the active tier whose GEMV or
// tiles differ from the tier above's, best first (the scalar reference only when alone).
std::vector<PlanCandidate<NmUkernels>> forward_candidates(ValueType vt) {
  std::vector<PlanCandidate<NmUkernels>> out;
  for (Isa isa = active_isa();; isa = isa_fallback(isa)) {
    const NmUkernels k = nm_ukernels_for(isa, vt);
    const bool is_new = out.empty() || k.gemv != out.back().value.gemv ||
                        k.tiles[0].fn != out.back().value.tiles[0].fn;
    if (k.gemv != nullptr && is_new && (isa != Isa::kScalar || out.empty()))
      out.push_back({isa_name(isa), k});
    if (isa == Isa::kScalar) break;
  }
  TORCH_CHECK(!out.empty(), "no N:M kernel for this value type");
  return out;
}

at::Tensor as_float_rows(const at::Tensor& x, int64_t K) {
  return as_rows(x).to(at::kFloat).contiguous();
}

at::Tensor gcol_table(const NmWeight& w) {
  at::Tensor gcol = at::empty({w.kept() + 8}, at::TensorOptions().dtype(at::kInt));
  nm_fill_gcol(w.n, w.m, w.kept() + 8, gcol.data_ptr<int32_t>());
  return gcol;
}

// Runs fn(begin, end) over [0, items) in chunks of `grain`, on the calling thread plus
// torch.get_num_threads() - 1 helper tasks on ATen's inter-op pool that take chunks whenever they
// get a CPU. Unlike a fork-join region, the caller never waits for a helper that has not started:
// on a busy machine (more runnable threads than cores) a late helper finds no chunk left and
// returns. Each chunk has one writer, so results do not depend on who ran it. Used by the fp32 /
// bf16 paths, whose ~1 ms one-token calls a single descheduled thread would otherwise stall for
// a whole scheduler tick; the float64 reference paths keep at::parallel_for.
template <typename Fn>
void run_elastic(int64_t items, int64_t grain, const Fn& fn) {
  const int64_t chunks = (items + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(work_parts() - 1, chunks - 1);
  if (helpers <= 0 || at::in_parallel_region()) {
    fn(0, items);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
    std::function<void(int64_t, int64_t)> body;
    int64_t chunks, grain, items;
  };
  auto state = std::make_shared<State>();
  state->body = [&fn](int64_t b, int64_t e) { fn(b, e); };
  state->chunks = chunks;
  state->grain = grain;
  state->items = items;
  auto work = [state]() {
    for (int64_t c = state->next.fetch_add(1); c < state->chunks; c = state->next.fetch_add(1)) {
      state->body(c * state->grain, std::min(state->items, (c + 1) * state->grain));
      if (state->done.fetch_add(1) + 1 == state->chunks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch(work);
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == chunks; });
}

// Panels of `rows` [T, K] float: ceil(T / nt) blocks [Kp, nt], zero-padded in columns and tokens.
at::Tensor pack_panels(const at::Tensor& rows, int64_t Kp, int64_t nt) {
  const int64_t T = rows.size(0), K = rows.size(1);
  const int64_t P = (T + nt - 1) / nt;
  constexpr int64_t kCols = 64;
  const int64_t col_blocks = (Kp + kCols - 1) / kCols;
  at::Tensor out = at::empty({P, Kp, nt}, rows.options());
  const float* src = rows.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  run_elastic(P * col_blocks, 4, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t p = task / col_blocks, c0 = (task % col_blocks) * kCols;
      const int64_t c1 = std::min(Kp, c0 + kCols);
      float* panel = dst + p * Kp * nt;
      // Token-major reads (contiguous rows of x); the [64 columns, nt] destination stays in L1.
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t token = p * nt + t;
        const float* srow = src + token * K;
        if (token < T) {
          const int64_t cv = std::min(c1, K);
          for (int64_t c = c0; c < cv; ++c) panel[c * nt + t] = srow[c];
          for (int64_t c = std::max(c0, cv); c < c1; ++c) panel[c * nt + t] = 0.f;
        } else {
          for (int64_t c = c0; c < c1; ++c) panel[c * nt + t] = 0.f;
        }
      }
    }
  });
  return out;
}

at::Tensor transposed_padded(const at::Tensor& rows, int64_t padded_k, int64_t ld) {
  at::Tensor out = at::zeros({padded_k, ld}, rows.options().dtype(at::kFloat));
  out.narrow(0, 0, rows.size(1)).narrow(1, 0, rows.size(0)).copy_(rows.t());
  return out;
}

std::vector<int64_t> even_split(int64_t items) {
  return balanced_split(items, work_parts(), [](int64_t i) { return i; });
}


at::Tensor nm_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& metadata,
                         const c10::optional<at::Tensor>& bias, int64_t in_features, int64_t n,
                         int64_t m) {
  const NmOpArgs args = checked_nm_linear_args(x, values, metadata, bias, in_features, n, m, kCpu);
  const NmWeight w = check_shape(args.w);
  const std::vector<int64_t>& out_shape = args.out_shape;
  const int64_t K = w.cols, out_features = w.rows;
  if (w.value_type == ValueType::kF64) {
    const at::Tensor rows = as_rows(x).contiguous();
    const at::Tensor bias_d = bias.has_value() ? bias->to(at::kDouble).contiguous() : at::Tensor();
    at::Tensor y = at::empty({rows.size(0), out_features}, x.options());
    parallel_ranges(even_split(out_features), [&](int64_t r0, int64_t r1) {
      nm_f64_forward_rows(w, rows.data_ptr<double>(), rows.size(0),
                          bias_d.defined() ? bias_d.data_ptr<double>() : nullptr,
                          y.data_ptr<double>(), r0, r1);
    });
    return y.reshape(out_shape);
  }
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor rows = as_float_rows(x, K);
  const int64_t T = rows.size(0);
  at::Tensor y = at::empty({T, out_features}, x.options().dtype(at::kFloat));
  if (T > 0 && out_features > 0) {
    const at::Tensor gcol = gcol_table(w);
    const std::string key = plan_key(
        "nm", {w.value_type == ValueType::kBF16 ? "bf16" : "f32",
               std::to_string(n) + ":" + std::to_string(m),
               std::to_string(out_features) + "x" + std::to_string(K),
               "N" + std::to_string(plan_bucket(T))});
    run_planned(key, forward_candidates(w.value_type), [&](const NmUkernels& k) {
      NmActivations a{};
      a.tokens = T;
      a.gcol = gcol.data_ptr<int32_t>();
      a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
      a.y = y.data_ptr<float>();
      a.ldy = out_features;
      at::Tensor staged;
      if (T == 1) {
        staged = at::zeros({w.padded_cols() + 8}, rows.options());
        staged.narrow(0, 0, K).copy_(rows[0]);
        a.x = staged.data_ptr<float>();
      } else {
        a.nt = nm_pick_nt(k, T);
        staged = pack_panels(rows, w.padded_cols(), a.nt);
        a.panels = staged.data_ptr<float>();
      }
      // The driver's row chunk per task: every chunk costs the same (fixed slots per row), and
      // there are enough chunks for a late helper to be absorbed by the others.
      run_elastic(out_features, kNmRowChunk,
                  [&](int64_t r0, int64_t r1) { nm_run_rows(w, a, k, r0, r1); });
    });
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

at::Tensor nm_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                    const at::Tensor& metadata, int64_t in_features, int64_t n,
                                    int64_t m) {
  const NmOpArgs args =
      checked_nm_grad_input_args(grad_out, values, metadata, in_features, n, m, kCpu);
  const NmWeight w = check_shape(args.w);
  const std::vector<int64_t>& out_shape = args.out_shape;
  const int64_t M_out = w.rows, K = in_features, G = w.groups();
  if (w.value_type == ValueType::kF64) {
    const at::Tensor dy = as_rows(grad_out).contiguous();
    at::Tensor dx = at::empty({dy.size(0), K}, grad_out.options());
    parallel_ranges(even_split(G), [&](int64_t g0, int64_t g1) {
      nm_f64_grad_input_groups(w, dy.data_ptr<double>(), dy.size(0), dx.data_ptr<double>(), g0, g1);
    });
    return dx.reshape(out_shape);
  }
  const at::Tensor dy = as_float_rows(grad_out, M_out);
  const int64_t T = dy.size(0);
  at::Tensor dx = at::empty({T, K}, grad_out.options().dtype(at::kFloat));
  if (T > 0 && K > 0) {
    if (M_out == 0) {
      dx.zero_();
    } else {
      const NmUkernels k = ukernels_for(w.value_type);
      const at::Tensor gcol = gcol_table(w);
      // dy panels [P, rows, nt]: pack_panels of dy^T's rows is dy itself with K = rows.
      const at::Tensor dyP = pack_panels(dy, M_out, k.scatter_nt);
      // Threads own whole K-blocks so every slot range starts at a multiple of 8.
      const int64_t kbg = nm_k_block(n, m, k.scatter_nt) / m, units = (G + kbg - 1) / kbg;
      run_elastic(units, 1, [&](int64_t u0, int64_t u1) {
        nm_grad_input_groups(w, dyP.data_ptr<float>(), T, k, gcol.data_ptr<int32_t>(), u0 * kbg,
                             std::min(G, u1 * kbg), dx.data_ptr<float>(), K);
      });
    }
  }
  return dx.to(grad_out.scalar_type()).reshape(out_shape);
}

at::Tensor nm_linear_grad_values_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                     const at::Tensor& metadata, int64_t in_features, int64_t n,
                                     int64_t m) {
  NmWeight w =
      check_shape(checked_nm_grad_values_args(grad_out, x, metadata, in_features, n, m, kCpu));
  const int64_t K = w.cols, M_out = w.rows;
  if (x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble) {
    at::Tensor dv = at::empty({M_out, w.kept()}, x.options());
    const at::Tensor dy = as_rows(grad_out).contiguous();
    const at::Tensor xr = as_rows(x).contiguous();
    parallel_ranges(even_split(M_out), [&](int64_t r0, int64_t r1) {
      nm_f64_grad_values_rows(w, dy.data_ptr<double>(), xr.data_ptr<double>(), xr.size(0),
                              dv.data_ptr<double>(), r0, r1);
    });
    return dv;
  }
  w.value_type = ValueType::kF32;
  at::Tensor dv = at::zeros({M_out, w.kept()}, x.options().dtype(at::kFloat));
  const at::Tensor dy = as_float_rows(grad_out, M_out);
  const at::Tensor xr = as_float_rows(x, K);
  const int64_t T = xr.size(0);
  if (T == 0 || M_out == 0 || w.kept() == 0) return dv;
  const int64_t ld = round_up(T, 8);
  const at::Tensor dyT = transposed_padded(dy, M_out, ld);
  const at::Tensor xT = transposed_padded(xr, w.padded_cols(), ld);
  const at::Tensor gcol = gcol_table(w);
  const NmUkernels k = ukernels_for(ValueType::kF32);
  run_elastic(M_out, 64, [&](int64_t r0, int64_t r1) {
    k.sddmm(w, dyT.data_ptr<float>(), xT.data_ptr<float>(), ld, gcol.data_ptr<int32_t>(), r0, r1,
            dv.data_ptr<float>());
  });
  return dv;
}

at::Tensor nm_validate_cpu(const at::Tensor& values, const at::Tensor& metadata,
                           int64_t in_features, int64_t n, int64_t m) {
  const NmWeight w =
      check_shape(checked_nm_validate_args(values, metadata, in_features, n, m, kCpu));
  const std::string error = nm_validate(w);
  TORCH_CHECK(error.empty(), "malformed N:M metadata: ", error);
  return at::ones({}, metadata.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CPU, m) {
  m.impl("nm_linear", &nm_linear_cpu);
  m.impl("nm_linear_grad_input", &nm_linear_grad_input_cpu);
  m.impl("nm_linear_grad_values", &nm_linear_grad_values_cpu);
  m.impl("nm_validate", &nm_validate_cpu);
}

}  // namespace sparse_ext

// ATen glue for the SpMM family: checks, layout preparation, thread split, kernel calls.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../kernels/spmm/spmm.h"
#include "common.h"
#include "plan.h"
#include "spmm_weight.h"

namespace sparse_ext {

SpmmWeight checked_spmm_weight_args(const at::Tensor& offsets, const at::Tensor& indices,
                                    const at::Tensor* values, int64_t out_features,
                                    int64_t in_features, int64_t block_rows, const char* rows_name,
                                    void (*check_device)(const at::Tensor&, const char*),
                                    std::initializer_list<at::ScalarType> value_dtypes) {
  TORCH_CHECK(block_rows == 1 || block_rows == 2 || block_rows == 4 || block_rows == 8,
              "block_rows must be 1, 2, 4 or 8, got ", block_rows);
  TORCH_CHECK(out_features >= 0, rows_name, " must be non-negative, got ", out_features);
  TORCH_CHECK(out_features % block_rows == 0, rows_name, " (", out_features,
              ") must be a multiple of block_rows (", block_rows, ")");
  check_device(offsets, "offsets");
  check_device(indices, "indices");
  check_dtype(offsets, "offsets", {at::kInt});
  check_dtype(indices, "indices", {at::kByte});
  TORCH_CHECK(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  const int64_t k_blocks = (in_features + kSpmmKBlock - 1) / kSpmmKBlock;
  check_1d(offsets, "offsets", out_features / block_rows * k_blocks + 1);
  TORCH_CHECK(offsets.is_contiguous() && indices.is_contiguous(),
              "offsets and indices must be contiguous");
  SpmmWeight w{};
  w.rows = out_features;
  w.cols = in_features;
  w.block_rows = block_rows;
  w.nnz = indices.size(0);
  w.offsets = offsets.data_ptr<int32_t>();
  w.indices = indices.data_ptr<uint8_t>();
  if (values != nullptr) {
    check_device(*values, "values");
    check_dtype(*values, "values", value_dtypes);
    check_1d(*values, "values", w.nnz * block_rows);
    TORCH_CHECK(values->is_contiguous(), "values must be contiguous");
    w.values = values->data_ptr();
    w.value_type = values->scalar_type() == at::kFloat    ? ValueType::kF32
                   : values->scalar_type() == at::kDouble ? ValueType::kF64
                                                          : ValueType::kBF16;
  }
  return w;
}

// Checks the structure tensors and wraps them for the kernels; `values` may be null when only the
// structure is needed. `rows_name` names W's rows in messages (out_features, out_channels).
SpmmWeight checked_spmm_weight(const at::Tensor& offsets, const at::Tensor& indices,
                               const at::Tensor* values, int64_t out_features,
                               int64_t in_features, int64_t block_rows, const char* rows_name) {
  const SpmmWeight w = checked_spmm_weight_args(
      offsets, indices, values, out_features, in_features, block_rows, rows_name, &check_cpu,
      {at::kFloat, at::kBFloat16, at::kDouble});
  const std::string error = spmm_validate(w);
  TORCH_CHECK(error.empty(), "malformed sparse weight: ", error);
  return w;
}

namespace {

SpmmWeight make_weight(const at::Tensor& offsets, const at::Tensor& indices,
                       const at::Tensor* values, int64_t out_features, int64_t in_features,
                       int64_t block_rows) {
  return checked_spmm_weight(offsets, indices, values, out_features, in_features, block_rows,
                             "out_features");
}

const SpmmUkernels& ukernels_for(const SpmmWeight& w) {
  const SpmmUkernels* k = lookup_along_chain(
      active_isa(), [&](Isa isa) { return spmm_ukernels(isa, w.value_type, w.block_rows); });
  TORCH_CHECK(k != nullptr, "no SpMM kernel for block_rows ", w.block_rows);
  return *k;
}

// The forward's candidates: each tier's ukernels at and below the active tier.
std::vector<PlanCandidate<const SpmmUkernels*>> forward_candidates(const SpmmWeight& w) {
  auto out = tier_candidates<const SpmmUkernels*>(
      [&](Isa isa) { return spmm_ukernels(isa, w.value_type, w.block_rows); });
  TORCH_CHECK(!out.empty(), "no SpMM kernel for block_rows ", w.block_rows);
  return out;
}

// Density in whole percent: the crossover between tiers moves with the work per row.
std::string forward_plan_key(const SpmmWeight& w, int64_t tokens) {
  const double density = w.rows * w.cols == 0 ? 0.0
                             : static_cast<double>(w.nnz * w.block_rows) / (w.rows * w.cols);
  return plan_key("spmm", {w.value_type == ValueType::kBF16 ? "bf16" : "f32",
                           "R" + std::to_string(w.block_rows),
                           std::to_string(w.rows) + "x" + std::to_string(w.cols),
                           "d" + std::to_string(static_cast<int>(density * 100 + 0.5)),
                           "N" + std::to_string(plan_bucket(tokens))});
}

std::vector<int64_t> split_groups_by_nnz(const SpmmWeight& w, int64_t per_group_cost) {
  const int64_t KB = w.k_blocks();
  return balanced_split(w.groups(), work_parts(), [&](int64_t g) {
    return static_cast<int64_t>(w.offsets[g * KB]) + g * per_group_cost;
  });
}

// Activations [..., K] -> float32 [N, K] (a view when already float32 and contiguous).
at::Tensor as_token_rows(const at::Tensor& x) {
  return as_rows(x).to(at::kFloat).contiguous();
}

// Zero-padded transposed copy, packed per tile of `tile` tokens: [ceil(N/tile), padded_k, tile].
at::Tensor transposed_tiles(const at::Tensor& rows, int64_t padded_k, int64_t tile) {
  const int64_t N = rows.size(0), tiles = (N + tile - 1) / tile;
  // Nothing to pad (N a multiple of the tile, K of 256): one transposing copy instead of zeroing,
  // copying and transposing; 2.2 -> 1.2 ms of staging at N = 256, K = 4096, 1 thread.
  if (N == tiles * tile && rows.size(1) == padded_k && rows.is_contiguous())
    return rows.view({tiles, tile, padded_k}).transpose(1, 2).contiguous();
  at::Tensor padded = at::zeros({tiles * tile, padded_k}, rows.options().dtype(at::kFloat));
  padded.narrow(0, 0, N).narrow(1, 0, rows.size(1)).copy_(rows);
  return padded.view({tiles, tile, padded_k}).transpose(1, 2).contiguous();
}

// Zero-padded transposed copy [padded_k, ld] of rows [N, K].
at::Tensor transposed_padded(const at::Tensor& rows, int64_t padded_k, int64_t ld) {
  at::Tensor out = at::zeros({padded_k, ld}, rows.options().dtype(at::kFloat));
  out.narrow(0, 0, rows.size(1)).narrow(1, 0, rows.size(0)).copy_(rows.t());
  return out;
}

void check_activations(const at::Tensor& x, const char* name) {
  check_cpu(x, name);
  // float16 activations are computed in float32 like bfloat16 ones (docs/reliability.md, dtypes).
  check_dtype(x, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension, got a scalar");
}

at::Tensor spmm_cpu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& indices,
                    const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                    int64_t out_features, int64_t in_features, int64_t block_rows) {
  check_activations(x, "x");
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const int64_t K = in_features;
  const SpmmWeight w = make_weight(offsets, indices, &values, out_features, K, block_rows);
  at::Tensor bias_f;
  if (bias.has_value()) {
    check_cpu(*bias, "bias");
    check_dtype(*bias, "bias", {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
    check_1d(*bias, "bias", out_features);
    bias_f = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;
  TORCH_CHECK((x.scalar_type() == at::kDouble) == (w.value_type == ValueType::kF64),
              "float64 needs both x and values in float64 (the scalar reference path), got x ",
              x.scalar_type(), " and values ", values.scalar_type());
  if (w.value_type == ValueType::kF64) {
    const at::Tensor rows = as_rows(x).contiguous();
    const at::Tensor bias_d = bias.has_value() ? bias->to(at::kDouble).contiguous() : at::Tensor();
    at::Tensor y = at::empty({rows.size(0), out_features}, x.options());
    parallel_ranges(split_groups_by_nnz(w, 4 * block_rows), [&](int64_t g0, int64_t g1) {
      spmm_f64_groups(w, rows.data_ptr<double>(), rows.size(0),
                      bias_d.defined() ? bias_d.data_ptr<double>() : nullptr, y.data_ptr<double>(),
                      g0, g1);
    });
    return y.reshape(out_shape);
  }
  const at::Tensor rows = as_token_rows(x);
  const int64_t N = rows.size(0);
  at::Tensor y = at::empty({N, out_features}, x.options().dtype(at::kFloat));
  if (N > 0 && out_features > 0) {
    const std::vector<int64_t> split = split_groups_by_nnz(w, 4 * w.block_rows);
    run_planned(forward_plan_key(w, N), forward_candidates(w), [&](const SpmmUkernels* k) {
      SpmmActivations a{};
      a.tokens = N;
      a.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
      a.y = y.data_ptr<float>();
      a.ldy = out_features;
      at::Tensor staged;
      if (N == 1) {
        staged = at::zeros({w.padded_cols()}, rows.options());
        staged.narrow(0, 0, K).copy_(rows[0]);
        a.x = staged.data_ptr<float>();
      } else {
        staged = transposed_tiles(rows, w.padded_cols(), spmm_tile_cols_for(*k, N));
        a.xT = staged.data_ptr<float>();
      }
      parallel_ranges(split, [&](int64_t g0, int64_t g1) { spmm_run_groups(w, a, *k, g0, g1); });
    });
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_transpose_structure_cpu(
    const at::Tensor& offsets, const at::Tensor& indices, int64_t out_features,
    int64_t in_features, int64_t block_rows) {
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  const SpmmWeight w = make_weight(offsets, indices, nullptr, out_features, in_features, block_rows);
  const int64_t m_blocks = (out_features + kSpmmKBlock - 1) / kSpmmKBlock;
  at::Tensor offsets_t = at::empty({in_features * m_blocks + 1}, offsets.options());
  at::Tensor indices_t = at::empty({w.nnz * block_rows}, indices.options());
  at::Tensor perm = at::empty({w.nnz * block_rows}, offsets.options().dtype(at::kLong));
  spmm_transpose_structure(w, offsets_t.data_ptr<int32_t>(), indices_t.data_ptr<uint8_t>(),
                           perm.data_ptr<int64_t>());
  return {offsets_t, indices_t, perm};
}

at::Tensor spmm_sddmm_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                          const at::Tensor& offsets, const at::Tensor& indices,
                          int64_t out_features, int64_t in_features, int64_t block_rows) {
  check_activations(grad_out, "grad_out");
  check_activations(x, "x");
  check_weight_dim(out_features, "out_features");
  check_weight_dim(in_features, "in_features");
  check_width(grad_out, "grad_out", -1, out_features, "features", "out_features");
  check_width(x, "x", -1, in_features, "features", "in_features");
  const int64_t K = in_features, M = out_features;
  check_same_tokens(grad_out, x);
  SpmmWeight w = make_weight(offsets, indices, nullptr, M, K, block_rows);
  if (x.scalar_type() == at::kDouble || grad_out.scalar_type() == at::kDouble) {
    TORCH_CHECK(x.scalar_type() == grad_out.scalar_type(),
                "float64 needs both grad_out and x in float64, got ", grad_out.scalar_type(),
                " and ", x.scalar_type());
    at::Tensor dv = at::zeros({w.nnz * block_rows}, x.options());
    const at::Tensor dy_rows = as_rows(grad_out).contiguous();
    const at::Tensor x_rows = as_rows(x).contiguous();
    parallel_ranges(split_groups_by_nnz(w, 1), [&](int64_t g0, int64_t g1) {
      sddmm_f64_groups(w, dy_rows.data_ptr<double>(), x_rows.data_ptr<double>(), x_rows.size(0),
                       g0, g1, dv.data_ptr<double>());
    });
    return dv;
  }
  w.value_type = ValueType::kF32;
  at::Tensor dv = at::zeros({w.nnz * block_rows}, x.options().dtype(at::kFloat));
  const at::Tensor dy_rows = as_token_rows(grad_out);
  const at::Tensor x_rows = as_token_rows(x);
  const int64_t N = x_rows.size(0);
  if (N == 0 || w.nnz == 0) return dv;
  const int64_t ld = round_up(N, 8);
  const at::Tensor dyT = transposed_padded(dy_rows, M, ld);
  const at::Tensor xT = transposed_padded(x_rows, w.padded_cols(), ld);
  const SpmmUkernels& k = ukernels_for(w);
  parallel_ranges(split_groups_by_nnz(w, 1), [&](int64_t g0, int64_t g1) {
    k.sddmm(w, dyT.data_ptr<float>(), xT.data_ptr<float>(), ld, g0, g1, dv.data_ptr<float>());
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(sparse_ext, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_transpose_structure", &spmm_transpose_structure_cpu);
  m.impl("spmm_sddmm", &spmm_sddmm_cpu);
}

}  // namespace sparse_ext

"""SpMM benchmark: SparseLinear (unstructured and block) vs dense F.linear and torch.sparse CSR.

    python -m bench.bench_spmm [--full] [--cache hot|cold]   # standalone: table + targets

Every case runs hot (one layer timed repeatedly) and cold (rotating over layer copies that exceed
the last-level cache, as a model's forward reads its weights); see bench.common.CACHE_HELP.
"""
import argparse

import torch
import torch.nn.functional as F

import sparse_ext as se
from bench.common import (CACHE_HELP, CACHE_MODES, cache_modes, cold_copies, copies_of, geomean,
                          interleaved_median_ms, rotating)
from bench.table import MS, SPEEDUP, Column, common_linear_columns, render

FAMILY = "spmm"
QUICK_SHAPES = [(4096, 4096)]
FULL_SHAPES = [(4096, 4096), (11008, 4096)]
TOKENS = [1, 16, 64, 256]
SPARSITIES = [0.5, 0.7, 0.9, 0.95]


def _pick(args, name, default):
    value = getattr(args, name, None)
    return value if value else default


def _cases(args):
    shapes = _pick(args, "shapes", QUICK_SHAPES if args.quick else FULL_SHAPES)
    tokens = _pick(args, "tokens", TOKENS)
    sparsities = _pick(args, "sparsities", SPARSITIES)
    for shape in shapes:
        for sparsity in sparsities:
            yield shape, "unstructured", sparsity, tokens
    if not args.quick:
        yield (4096, 4096), "4x1", 0.9, tokens
        yield (4096, 4096), "8x1", 0.9, tokens


def _measure(lin_weight, pattern, sparsity, tokens_list, args, progress, value_dtype, cache="hot"):
    M, K = lin_weight.shape
    lin = torch.nn.Linear(K, M, bias=False)
    with torch.no_grad():
        lin.weight.copy_(lin_weight)
    layer = se.SparseLinear.from_dense(lin, sparsity=sparsity, pattern=pattern).to(value_dtype)
    layer.requires_grad_(False)
    dense_w = layer.weight_format().to_dense().float()
    hot = cache == "hot"
    csr = dense_w.to_sparse_csr() if hot and pattern == "unstructured" and value_dtype == torch.float32 else None
    copies = 1 if hot else cold_copies(dense_w.numel() * 4 + layer.weight_nbytes)
    if not hot and copies < 2:
        progress("spmm cold skipped: the last-level cache size is unknown")
        return []
    dense_ws, layers = copies_of(dense_w, copies), copies_of(layer, copies)
    rows = []
    for n in tokens_list:
        x = torch.randn(n, K)
        fns = [rotating(dense_ws, lambda w: F.linear(x, w)), rotating(layers, lambda m: m(x))]
        if csr is not None:
            xt = x.t().contiguous()
            fns.append(lambda: torch.sparse.mm(csr, xt))
        with torch.no_grad():
            times = interleaved_median_ms(fns, reps=args.reps)
        dense_ms, ours_ms = times[0], times[1]
        row = dict(family=FAMILY, shape=f"{M}x{K}", pattern=pattern, sparsity=sparsity, tokens=n,
                   dtype=str(value_dtype).replace("torch.", ""), cache=cache, dense_ms=dense_ms,
                   ours_ms=ours_ms, speedup=dense_ms / ours_ms,
                   gflops=2.0 * M * K * n / ours_ms / 1e6,
                   weight_bytes_ratio=layer.weight_nbytes / (M * K * 4))
        if csr is not None:
            row["torch_sparse_ms"] = times[2]
            row["vs_torch_sparse"] = times[2] / ours_ms
        rows.append(row)
        progress(f"spmm {M}x{K} {pattern} {sparsity:.0%} {cache} N={n}")
    return rows


def run(args, progress=lambda desc: None):
    torch.manual_seed(0)
    rows = []
    weights = {}
    for cache in cache_modes(args):
        for (M, K), pattern, sparsity, tokens in _cases(args):
            w = weights.setdefault((M, K), torch.randn(M, K))
            rows += _measure(w, pattern, sparsity, tokens, args, progress, torch.float32, cache)
        if not getattr(args, "shapes", None):
            rows += _mlp_rows(args, progress, cache)
    if not args.quick or getattr(args, "dtype", None) == "bfloat16":
        w = weights.setdefault((4096, 4096), torch.randn(4096, 4096))
        for sparsity in (0.9,):
            rows += _measure(w, "unstructured", sparsity, [1, 16], args, progress, torch.bfloat16)
    return rows


MLP_LAYERS, MLP_WIDTH = 4, 4096
MLP_TOKENS = [1, 64, 256]
MLP_SPARSITIES = [0.5, 0.7, 0.9]


def _mlp(width, layers, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i in range(layers):
        mods += [torch.nn.Linear(width, width, bias=False)] + ([torch.nn.ReLU()] if i < layers - 1 else [])
    return torch.nn.Sequential(*mods).eval().requires_grad_(False)


def _mlp_rows(args, progress, cache):
    """The 4-layer 4096x4096 MLP of TARGETS.md (the comparison with other sparse runtimes): the
    dense model vs the same model through sparse_ext.sparsify."""
    rows = []
    width = MLP_WIDTH
    dense = _mlp(width, MLP_LAYERS)
    dense_bytes = MLP_LAYERS * width * width * 4
    for sparsity in _pick(args, "sparsities", MLP_SPARSITIES):
        if sparsity not in MLP_SPARSITIES:
            continue
        sparse, _ = se.sparsify(_mlp(width, MLP_LAYERS), sparsity=sparsity)
        sparse_bytes = sum(m.weight_nbytes for m in sparse.modules() if isinstance(m, se.SparseLinear))
        copies = 1 if cache == "hot" else cold_copies(dense_bytes + sparse_bytes)
        if cache == "cold" and copies < 2:
            continue
        denses, sparses = copies_of(dense, copies), copies_of(sparse, copies)
        for n in [t for t in _pick(args, "tokens", MLP_TOKENS) if t in MLP_TOKENS]:
            x = torch.randn(n, width)
            with torch.no_grad():
                dense_ms, ours_ms = interleaved_median_ms(
                    [rotating(denses, lambda m: m(x)), rotating(sparses, lambda m: m(x))],
                    reps=args.reps)
            rows.append(dict(family=FAMILY, shape=f"mlp {MLP_LAYERS}x{width}", pattern="unstructured",
                             sparsity=sparsity, tokens=n, dtype="float32", cache=cache,
                             dense_ms=dense_ms, ours_ms=ours_ms, speedup=dense_ms / ours_ms,
                             gflops=2.0 * MLP_LAYERS * width * width * n / ours_ms / 1e6,
                             weight_bytes_ratio=sparse_bytes / dense_bytes))
            progress(f"spmm mlp {sparsity:.0%} {cache} N={n}")
        del denses, sparses
    return rows


TARGETS = [  # (sparsity, kind, threshold) from TARGETS.md
    (0.95, "geomean", 8.0),
    (0.9, "geomean", 5.0),
    (0.9, "min", 3.5),
    (0.7, "geomean", 2.2),
    (0.5, "min", 1.2),
]
MLP_TARGETS = [(0.9, "min", 5.0), (0.5, "min", 1.2)]  # AVX-512 machines, every N


def targets_report(rows):
    """The targets hold hot and cold: one line per (target, cache mode) measured."""
    lines = []
    fp32 = [r for r in rows if r["pattern"] == "unstructured" and r["dtype"] == "float32"]
    mlp = [r for r in fp32 if r["shape"].startswith("mlp")]
    fp32 = [r for r in fp32 if not r["shape"].startswith("mlp")]
    for label, targets, subset in (("SpMM", TARGETS, fp32), ("SpMM 4-layer MLP", MLP_TARGETS, mlp)):
        for sparsity, kind, threshold in targets:
            for cache in CACHE_MODES:
                s = [r["speedup"] for r in subset
                     if abs(r["sparsity"] - sparsity) < 1e-9 and r.get("cache", "hot") == cache]
                if not s:
                    continue
                value = geomean(s) if kind == "geomean" else min(s)
                ok = "met" if value >= threshold else "MISSED"
                lines.append(f"{label} {sparsity:.0%} {cache} {kind} speedup {value:.2f}x "
                             f"(target >= {threshold}x): {ok}")
    fp32 = [r for r in fp32 if r.get("cache", "hot") == "hot"]
    vs = [r["vs_torch_sparse"] for r in fp32 if "vs_torch_sparse" in r]
    if vs:
        ok = "met" if min(vs) >= 2.0 else "MISSED"
        lines.append(f"SpMM vs torch.sparse CSR, worst point {min(vs):.2f}x (target >= 2x): {ok}")
    b90 = [r["weight_bytes_ratio"] for r in fp32 if abs(r["sparsity"] - 0.9) < 1e-9]
    if b90:
        ok = "met" if max(b90) <= 0.16 else "MISSED"
        lines.append(f"weight bytes at 90%: {max(b90):.3f}x dense (target <= 0.16x): {ok}")
    for n in (1,):
        f32 = [r for r in fp32 if r["tokens"] == n and abs(r["sparsity"] - 0.9) < 1e-9]
        b16 = [r for r in rows if r["dtype"] == "bfloat16" and r["tokens"] == n]
        if f32 and b16:
            ratio = geomean([a["ours_ms"] for a in f32 if a["shape"] == b16[0]["shape"]]) / b16[0]["ours_ms"]
            ok = "met" if ratio >= 1.6 else "MISSED"
            lines.append(f"bf16 weights at 90%, N={n}: {ratio:.2f}x faster than fp32 (target >= 1.6x): {ok}")
    return lines


TABLE = common_linear_columns([
    Column("torch.sparse ms", "torch_sparse_ms", MS), Column("vs torch.sparse", "vs_torch_sparse", SPEEDUP),
    Column("weight bytes", "weight_bytes_ratio", "{:.3f}x")])


def format_table(rows):
    return render(rows, TABLE)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="both LLM shapes, block patterns, bf16")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--cache", nargs="+", choices=CACHE_MODES, help=CACHE_HELP)
    args = parser.parse_args()
    args.quick = not args.full
    rows = run(args, progress=lambda d: print(d, flush=True))
    print(format_table(rows))
    print("\n".join(targets_report(rows)))


if __name__ == "__main__":
    main()

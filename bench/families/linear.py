"""What the two sparse-weight x activations families (SpMM, N:M) share: their case labels, the
setup of a CUDA case (the layer at the case's dtype, its inputs, the fp64 reference output) and
the third-party baseline timed next to it."""
import torch
import torch.nn.functional as F

import sparse_ext as se
from bench.common import short_dtype
from bench.core.accuracy import max_err, short


def label(row, sparsity=True):
    """``4096x4096 2:4 bf16 cold N=16``: the pattern unless unstructured, the sparsity when asked,
    the dtype unless fp32, the cache mode when measured."""
    shape = row["shape"] if isinstance(row["shape"], str) else "x".join(map(str, row["shape"]))
    parts = [shape]
    if row.get("pattern", "unstructured") != "unstructured":
        parts.append(row["pattern"])
    if sparsity:
        parts.append(f"{row['sparsity']:.0%}")
    if row.get("dtype", "float32") != "float32":
        parts.append(short_dtype(row["dtype"]))
    if row.get("cache"):
        parts.append(row["cache"])
    return " ".join(parts + [f"N={row['tokens']}"])


def cuda_case(case, ctx, weight, dense_fp32):
    """(layer, dense weight, x, row, fp64 reference of x @ W^T) for ``case`` on ctx's device:
    ``weight`` (a CSRWeight or NMWeight) and ``dense_fp32`` at the case's dtype."""
    dev = ctx["device"]
    M, K = case["shape"]
    dt = getattr(torch, case["dtype"])
    layer = se.SparseLinear(weight, None, case["pattern"]).to(device=dev, dtype=dt)
    layer.requires_grad_(False)
    wd = dense_fp32.to(dtype=dt)
    x = torch.randn(case["tokens"], K, device=dev, dtype=dt)
    row = dict(case, shape=f"{M}x{K}",
               weight_bytes_ratio=layer.weight_nbytes / (M * K * wd.element_size()))
    with torch.no_grad():
        ref = F.linear(x.double(), wd.double())
    return layer, wd, x, row, ref


def fake_graph_extras(case, dense_ms, ours_ms):
    """--dry-run: CUDA-graph times of the small-N cases."""
    if case["tokens"] > 16:
        return {}
    return dict(dense_graph_ms=dense_ms / 2, ours_graph_ms=ours_ms / 3,
                speedup_graph=1.5 * dense_ms / ours_ms)


def add_baseline(row, fns, name, build, reference):
    """Appends third-party baseline ``name``'s call (``build()`` makes it) to ``fns`` and records
    its output's error against ``reference``; when this build, device or dtype lacks it, records
    why instead and leaves ``fns`` as it was."""
    try:
        call = build()
        row[f"{name}_max_abs_err"] = max_err(call(), reference)
    except Exception as exc:  # noqa: BLE001  recorded, the case goes on without the baseline
        row[f"{name}_error"] = short(exc)
        return
    fns.append(call)


def record_baseline_speed(row, name, times):
    """The baseline's time and our speedup over it, when :func:`add_baseline` added it (the third
    of ``times``, after dense and ours)."""
    if len(times) > 2:
        row[f"{name}_ms"] = times[2]
        row[f"vs_{name}"] = times[2] / times[1]

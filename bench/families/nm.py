"""N:M semi-structured: SparseLinear(pattern="N:M") (``sparse_ext.ops.nm_linear``) vs dense F.linear.

CPU: hot and cold cache modes (bench.common.CACHE_MODES), bf16 weights at 2:4 against our fp32.
CUDA: cuBLAS, and PyTorch's semi-structured 2:4 (torch.sparse.to_sparse_semi_structured) for 2:4;
each forward path of the glue (the nm_cuda_path setting) timed too, to tune its thresholds.
"""
import torch
import torch.nn.functional as F

import sparse_ext as se
from bench.common import (CACHE_MODES, LLM_SHAPES, cache_modes, cold_copies, copies_of, geomean,
                          rotating)
from bench.core.accuracy import (correctness, record_errors, record_graph_times, record_speed,
                                 short)
from bench.core.targets import check, report
from bench.core.timer import Timer
from bench.families import linear
from bench.table import MS, SPEEDUP, Column, text

NAME = "nm"
FAMILY = NAME
TITLE = "N:M: SparseLinear(pattern='N:M') vs dense F.linear"
DEVICES = ("cpu", "cuda")
BASELINES = {
    "cpu": "dense: F.linear on the dense weight; vs our fp32: bf16 weights against our own fp32 ones.",
    "cuda": "dense: cuBLAS (F.linear); vs torch 2:4: torch.sparse.to_sparse_semi_structured; graph: "
            "the ratio with both timed as CUDA-graph replays (small N).",
}
COLUMNS = [text("shape", "shape"), text("pattern", "pattern"), text("dtype", "dtype"),
           text("cache", "cache"), Column("N", "tokens"), Column("dense ms", "dense_ms", MS),
           Column("ours ms", "ours_ms", MS), Column("speedup", "speedup", SPEEDUP),
           Column("vs our fp32", "vs_ours_fp32", SPEEDUP),
           Column("vs torch 2:4", "vs_torch_2of4", SPEEDUP), Column("graph", "speedup_graph", SPEEDUP),
           Column("bytes", "weight_bytes_ratio", "{:.2f}x"), Column("max err", "max_abs_err", "{:.0e}")]


def label(row):
    return linear.label(row, sparsity=False)


FULL_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(4096, 4096)]
FULL_TOKENS = [1, 16, 64, 256]
QUICK_TOKENS = [1, 64]
FULL_PATTERNS = ["2:4", "1:4", "2:8", "1:8"]
QUICK_PATTERNS = ["2:4", "1:4", "1:8"]

# Geomean speedup over the (shape, tokens) points, per pattern.
TARGETS = {"2:4": 1.5, "1:4": 2.8, "2:8": 2.8, "1:8": 4.5}
BYTES_TARGET_2_4 = 0.57
BF16_TARGET = 1.6


def _reps(args, tokens, out_features):
    """Short calls get many repetitions: on a shared machine single runs can stall a scheduler
    tick (4 ms), which a median over few repetitions would report."""
    reps = int(getattr(args, "reps", 0) or 0)
    if reps > 0:
        return reps
    work = tokens * out_features
    if tokens == 1:
        return 31
    return 15 if work <= 16 * 11008 else 9 if work <= 64 * 11008 else 5


def _row(shape, pattern, tokens, dense_ms, ours_ms, flops, dtype="float32", cache="hot"):
    n, m = (int(v) for v in pattern.split(":"))
    return {
        "family": FAMILY,
        "shape": f"{shape[0]}x{shape[1]}",
        "pattern": pattern,
        "sparsity": 1.0 - n / m,
        "tokens": tokens,
        "dtype": dtype,
        "cache": cache,
        "dense_ms": dense_ms,
        "ours_ms": ours_ms,
        "speedup": dense_ms / ours_ms,
        "gflops": flops / (ours_ms * 1e6),
    }


def run(args, progress=lambda desc: None, timer=None):
    """The CPU suite: times every (shape, pattern, tokens) case; one dict per case."""
    timer = timer or Timer("cpu")
    quick = bool(getattr(args, "quick", False))
    shapes = getattr(args, "shapes", None) or (QUICK_SHAPES if quick else FULL_SHAPES)
    tokens_list = getattr(args, "tokens", None) or (QUICK_TOKENS if quick else FULL_TOKENS)
    patterns = QUICK_PATTERNS if quick else FULL_PATTERNS
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in shapes:
        out_f, in_f = shape
        dense_w = torch.randn(out_f, in_f, generator=gen)
        for pattern in patterns:
            n, m = (int(v) for v in pattern.split(":"))
            w = se.NMWeight.from_dense(dense_w, n, m)
            for cache in cache_modes(args):
                copies = 1 if cache == "hot" else cold_copies(dense_w.numel() * 4 + w.nbytes)
                if cache == "cold" and copies < 2:
                    progress("nm cold skipped: the last-level cache size is unknown")
                    continue
                dense_ws, ws = copies_of(dense_w, copies), copies_of(w, copies)
                for tokens in tokens_list:
                    x = torch.randn(tokens, in_f, generator=gen)
                    reps = _reps(args, tokens, out_f)
                    dense_ms, ours_ms = timer(
                        [rotating(dense_ws, lambda d: F.linear(x, d)),
                         rotating(ws, lambda v: se.ops.nm_linear(x, v))],
                        reps=reps, warmup=2)
                    row = _row(shape, pattern, tokens, dense_ms, ours_ms,
                               2.0 * out_f * in_f * tokens, cache=cache)
                    row["weight_bytes_ratio"] = w.nbytes / (out_f * in_f * 4)
                    rows.append(row)
                    progress(f"nm {row['shape']} {pattern} {cache} N={tokens}: {row['speedup']:.2f}x")
                del dense_ws, ws
            if pattern == "2:4":
                # bf16 weights at 2:4, one token: against dense fp32 and our own fp32 weights.
                wb = w.to(dtype=torch.bfloat16)
                x = torch.randn(1, in_f, generator=gen)
                dense_ms, fp32_ms, bf16_ms = timer(
                    [lambda: F.linear(x, dense_w), lambda: se.ops.nm_linear(x, w),
                     lambda: se.ops.nm_linear(x, wb)],
                    reps=_reps(args, 1, out_f), warmup=2)
                row = _row(shape, "2:4", 1, dense_ms, bf16_ms, 2.0 * out_f * in_f, "bfloat16")
                row["weight_bytes_ratio"] = wb.nbytes / (out_f * in_f * 4)
                row["vs_ours_fp32"] = fp32_ms / bf16_ms
                rows.append(row)
                progress(f"nm {row['shape']} 2:4 bf16 N=1: {row['vs_ours_fp32']:.2f}x over fp32")
            del w
        del dense_w
    return rows


def targets(rows, device="cpu"):
    return _cuda_targets(rows) if device.startswith("cuda") else _cpu_targets(rows)


def _cpu_targets(rows):
    out = []
    main = [r for r in rows if r.get("dtype", "float32") == "float32"]
    for pattern, target in TARGETS.items():
        for cache in CACHE_MODES:
            sp = [r["speedup"] for r in main
                  if r["pattern"] == pattern and r.get("cache", "hot") == cache]
            if sp:
                out.append(check(f"{pattern} {cache}, geomean speedup over {len(sp)} points",
                                 geomean(sp), ">=", target))
    b24 = [r["weight_bytes_ratio"] for r in main if r["pattern"] == "2:4"]
    if b24:
        out.append(check("2:4 weight bytes vs dense fp32", b24[0], "<=", BYTES_TARGET_2_4,
                         "{:.3f}x"))
    for r in rows:
        if r.get("vs_ours_fp32") is not None:
            out.append(check(f"bf16 2:4 N=1 {r['shape']} over our fp32", r["vs_ours_fp32"], ">=",
                             BF16_TARGET))
    return out


# ---- CUDA ----------------------------------------------------------------------------------------
CUDA_SIZES = {
    "tiny": dict(shapes=[(64, 128)], patterns=[("2:4", ["float32"]), ("1:8", ["float32"])],
                 tokens=[8]),
    "quick": dict(shapes=[(4096, 4096)],
                  patterns=[("2:4", ["float16", "bfloat16"]), ("1:8", ["float16"])],
                  tokens=[16, 4096]),
    "default": dict(shapes=LLM_SHAPES,
                    patterns=[("2:4", ["float16", "bfloat16"]), ("1:4", ["float16"]),
                              ("2:8", ["float16"]), ("1:8", ["float16"])],
                    tokens=[16, 256, 4096]),
    "full": dict(shapes=LLM_SHAPES + [(8192, 8192)],
                 patterns=[(p, ["float16", "bfloat16"]) for p in ("2:4", "1:4", "2:8", "1:8", "4:16")],
                 tokens=[1, 16, 256, 1024, 4096]),
}
# Worst point over cuBLAS per pattern; the other patterns are reported.
CUDA_TARGETS = {"2:4": 1.3, "1:8": 2.5}
CUDA_PATHS = ("cores", "cusparselt", "dense")


def cuda_cases(size, shapes=None, tokens=None, sparsities=None, dtypes=None):
    p = CUDA_SIZES[size]
    cases = []
    for shape in shapes or p["shapes"]:
        for pattern, dts in p["patterns"]:
            n_, m_ = (int(v) for v in pattern.split(":"))
            for dt in dts:
                if dtypes and dt not in dtypes:
                    continue
                cases += [dict(family=NAME, shape=list(shape), pattern=pattern,
                               sparsity=1.0 - n_ / m_, dtype=dt, tokens=n)
                          for n in tokens or p["tokens"]]
    return cases


def _cuda_weight(M, K, n, m, device, seed=0):
    """(NMWeight, its dense fp32 weight on ``device``), built on the device."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(M, K, generator=g, device=device)
    nm = se.NMWeight.from_dense(w, n, m)
    return nm, nm.to(device).to_dense()


def _path_times(row, timer, layer_call):
    """Times each forward path the glue can be forced onto (the nm_cuda_path setting), to tune
    the auto thresholds; a path that cannot apply falls back to the cores."""
    for path in CUDA_PATHS:
        with se.config.override(nm_cuda_path=path):
            try:
                row[f"path_{path}_ms"] = timer([layer_call])[0]
            except Exception as exc:  # noqa: BLE001  recorded, the case goes on
                row[f"path_{path}_error"] = short(exc)


def measure_cuda(case, ctx):
    timer = ctx["timer"]
    M, K = case["shape"]
    n_, m_ = (int(v) for v in case["pattern"].split(":"))
    nm, wd32 = ctx["cache"].get((NAME, M, K, n_, m_),
                                lambda: _cuda_weight(M, K, n_, m_, ctx["device"]))
    layer, wd, x, row, ref = linear.cuda_case(case, ctx, nm, wd32)
    with torch.no_grad():
        record_errors(row, layer(x), F.linear(x, wd), ref)
        fns = [lambda: F.linear(x, wd), lambda: layer(x)]
        if case["pattern"] == "2:4":
            def torch_2of4():  # PyTorch's own 2:4 (cuSPARSELt or CUTLASS); needs CUDA fp16/bf16
                from torch.sparse import to_sparse_semi_structured

                wss = to_sparse_semi_structured(wd)
                row["torch_2of4_backend"] = type(wss).__name__
                return lambda: F.linear(x, wss)
            linear.add_baseline(row, fns, "torch_2of4", torch_2of4, ref)
        times = timer(fns)
        record_graph_times(row, ctx, fns[0], fns[1])
        _path_times(row, timer, fns[1])
    record_speed(row, times[0], times[1], 2.0 * M * K * case["tokens"])
    linear.record_baseline_speed(row, "torch_2of4", times)
    return row


def fake_extras(case, dense_ms, ours_ms):
    extra = dict(linear.fake_graph_extras(case, dense_ms, ours_ms),
                 shape="x".join(map(str, case["shape"])))
    if case["pattern"] == "2:4":
        extra.update(torch_2of4_ms=dense_ms / 1.2, vs_torch_2of4=dense_ms / 1.2 / ours_ms)
    return extra


def _cuda_targets(rows):
    ok = [r for r in rows if r.get("speedup") is not None and not r.get("error")]
    out = []
    for pattern in ("2:4", "1:4", "2:8", "1:8", "4:16"):
        for dt in ("float16", "bfloat16", "float32"):
            sel = [r for r in ok if r["pattern"] == pattern and r["dtype"] == dt]
            if not sel:
                continue
            worst = min(r["speedup"] for r in sel)
            name = f"{pattern} {dt}, worst over cuBLAS"
            out.append(check(name, worst, ">=", CUDA_TARGETS[pattern]) if pattern in CUDA_TARGETS
                       else report(name, worst))
            vs = [r["vs_torch_2of4"] for r in sel if "vs_torch_2of4" in r]
            if vs:
                out.append(report(f"{pattern} {dt}, geomean vs torch semi-structured", geomean(vs)))
    return out + correctness(ok, label)

"""CUDA benchmark suite: our kernels vs cuBLAS, cuSPARSE, PyTorch 2:4 and HF's MoE loop.

Every case times our op and its baselines in ONE process on the same inputs, interleaved, with
CUDA events after warm-up, and reports medians; next to each time it records how far each output
is from an fp64 reference (``max_abs_err`` ours, ``dense_max_abs_err`` the dense PyTorch op at
the same dtype, ``err_ok``: ours is within 2x of the dense op's error, the flash-attention rule of
python_tests/reference.py). Baselines, all at the same dtype and on the same weights:

  spmm   cuBLAS (F.linear with the masked dense weight), cuSPARSE (torch.sparse CSR, W @ x^T)
  nm     cuBLAS; PyTorch's semi-structured 2:4 (torch.sparse.to_sparse_semi_structured) for 2:4
  conv   cuDNN (F.conv2d + ReLU with the masked dense weight); MobileNetV1 end to end vs dense
  moe    HF MixtralSparseMoeBlock (eager per-expert loop; bench_moe's local copy of that loop when
         transformers is missing), the equal-FLOP dense GEMMs, and the zero-overhead floor

Families run in separate subprocesses (a CUDA fault in one cannot take the others down), each
within a time budget; partial results survive a timeout. Cases come from ../shared/TARGETS.md's
CUDA table (--size default); --size quick is a short smoke run, --size full adds points.

    python -m bench.bench_cuda                              # default suite, ~4 minutes on an H200
    python -m bench.bench_cuda --families spmm --size quick --reps 5
    python -m bench.bench_cuda --smoke                      # tiny CUDA-vs-CPU check of every family
    python -m bench.bench_cuda --dry-run --out /tmp/x       # case list + report from fake timings
"""
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings

FAMILIES = ["spmm", "nm", "conv", "moe"]
# Share of the --budget-s each family gets (SpMM has the most points).
BUDGET_SHARE = {"spmm": 0.40, "nm": 0.25, "conv": 0.15, "moe": 0.20}

# ---- case lists (pure Python: no torch, no GPU; python_tests/test_bench_cuda.py checks them) -----
LLM_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]   # (out, in)
MOE_SHAPE = dict(hidden=1024, ffn=2816, experts=8, top_k=2)
# MobileNet 1x1 layers (in, out, H, W) at batch 32, and one 3x3 layer (implicit im2col).
CONV_1X1 = [("mbv1-pw3", 128, 128, 56, 56), ("mbv1-pw7", 512, 512, 14, 14),
            ("mbv1-pw13", 1024, 1024, 7, 7), ("mbv2-expand", 24, 144, 56, 56)]
CONV_1X1_FULL = CONV_1X1 + [("mbv1-pw1", 32, 64, 112, 112), ("mbv2-project", 144, 24, 56, 56),
                            ("mbv2-last", 320, 1280, 7, 7)]
CONV_3X3 = [("3x3", 128, 128, 56, 56, 3, 1, 1)]

SIZES = {
    # CPU test of the code paths (python_tests/test_bench_cuda.py): seconds on 2 cores.
    "tiny": dict(
        spmm=dict(shapes=[(64, 96)], sparsities=[0.9], dtypes=["float32"], tokens=[1, 8]),
        nm=dict(shapes=[(64, 128)], patterns=[("2:4", ["float32"]), ("1:8", ["float32"])],
                tokens=[8]),
        conv=dict(layers=[("tiny-pw", 16, 32, 8, 8)], conv3=[("tiny-3x3", 8, 8, 8, 8, 3, 1, 1)],
                  sparsities=[0.9], dtypes=["float32"], batch=2, e2e=dict(batch=1, image=32)),
        moe=dict(hidden=32, ffn=48, experts=4, top_k=2, tokens=[1, 8], dtypes=["float32"],
                 prefill_from=8),
    ),
    # A short GPU run (about a minute): one shape per family, the targets' key points.
    "quick": dict(
        spmm=dict(shapes=[(4096, 4096)], sparsities=[0.9], dtypes=["float16", "float32"],
                  tokens=[16, 256, 4096]),
        nm=dict(shapes=[(4096, 4096)],
                patterns=[("2:4", ["float16", "bfloat16"]), ("1:8", ["float16"])],
                tokens=[16, 4096]),
        conv=dict(layers=CONV_1X1[1:2], conv3=CONV_3X3, sparsities=[0.9], dtypes=["float16"],
                  batch=32, e2e=dict(batch=32, image=224)),
        moe=dict(MOE_SHAPE, tokens=[1, 32, 2048], dtypes=["bfloat16"], prefill_from=512),
    ),
    # TARGETS.md's CUDA table (what gpu_check.sh runs): about 4 minutes on an H200.
    "default": dict(
        spmm=dict(shapes=LLM_SHAPES, sparsities=[0.9, 0.95, 0.7], dtypes=["float16", "float32"],
                  tokens=[1, 16, 256, 1024, 4096]),
        nm=dict(shapes=LLM_SHAPES,
                patterns=[("2:4", ["float16", "bfloat16"]), ("1:4", ["float16"]),
                          ("2:8", ["float16"]), ("1:8", ["float16"])],
                tokens=[16, 256, 4096]),
        conv=dict(layers=CONV_1X1, conv3=CONV_3X3, sparsities=[0.9, 0.7], dtypes=["float16"],
                  batch=32, e2e=dict(batch=32, image=224)),
        moe=dict(MOE_SHAPE, tokens=[1, 32, 512, 2048], dtypes=["bfloat16", "float32"],
                 prefill_from=512),
    ),
    # Everything above plus 50% SpMM, bf16 everywhere, 4:16, fp32 conv, more MobileNet layers.
    "full": dict(
        spmm=dict(shapes=LLM_SHAPES, sparsities=[0.9, 0.95, 0.7, 0.5],
                  dtypes=["float16", "bfloat16", "float32"], tokens=[1, 16, 256, 1024, 4096]),
        nm=dict(shapes=LLM_SHAPES + [(8192, 8192)],
                patterns=[("2:4", ["float16", "bfloat16"]), ("1:4", ["float16", "bfloat16"]),
                          ("2:8", ["float16", "bfloat16"]), ("1:8", ["float16", "bfloat16"]),
                          ("4:16", ["float16", "bfloat16"])],
                tokens=[1, 16, 256, 1024, 4096]),
        conv=dict(layers=CONV_1X1_FULL, conv3=CONV_3X3 + [("3x3-s2", 256, 256, 28, 28, 3, 2, 1)],
                  sparsities=[0.9, 0.7], dtypes=["float16", "float32"], batch=32,
                  e2e=dict(batch=32, image=224)),
        moe=dict(MOE_SHAPE, tokens=[1, 8, 32, 128, 512, 2048, 4096],
                 dtypes=["bfloat16", "float16", "float32"], prefill_from=512),
    ),
}


def _filter(values, wanted):
    return [v for v in values if not wanted or v in wanted]


def build_cases(size="default", families=None, shapes=None, tokens=None, sparsities=None,
                dtypes=None):
    """Every case of the suite, in run order: a list of plain dicts (JSON-serialisable).

    ``shapes`` / ``tokens`` / ``sparsities`` replace the preset's lists; ``dtypes`` filters it."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    preset = SIZES[size]
    families = families or FAMILIES
    cases = []
    if "spmm" in families:
        p = preset["spmm"]
        # Sparsity outermost, in the preset's priority order (90% first), so a suite that runs out
        # of time has measured the target points of every shape.
        for sp in sparsities or p["sparsities"]:
            for shape in shapes or p["shapes"]:
                for dt in _filter(p["dtypes"], dtypes):
                    for n in tokens or p["tokens"]:
                        cases.append(dict(family="spmm", shape=list(shape), pattern="unstructured",
                                          sparsity=sp, dtype=dt, tokens=n))
    if "nm" in families:
        p = preset["nm"]
        for shape in shapes or p["shapes"]:
            for pattern, dts in p["patterns"]:
                n_, m_ = (int(v) for v in pattern.split(":"))
                for dt in _filter(dts, dtypes):
                    for n in tokens or p["tokens"]:
                        cases.append(dict(family="nm", shape=list(shape), pattern=pattern,
                                          sparsity=1.0 - n_ / m_, dtype=dt, tokens=n))
    if "conv" in families:
        p = preset["conv"]
        for dt in _filter(p["dtypes"], dtypes):
            for name, ci, co, h, w in p["layers"]:
                for sp in sparsities or p["sparsities"]:
                    cases.append(dict(family="conv", kind="layer", name=name,
                                      conv=[ci, co, h, w, 1, 1, 0], sparsity=sp, dtype=dt,
                                      batch=p["batch"]))
            for name, ci, co, h, w, k, s, pad in p["conv3"]:
                cases.append(dict(family="conv", kind="layer", name=name,
                                  conv=[ci, co, h, w, k, s, pad], sparsity=0.9, dtype=dt,
                                  batch=p["batch"]))
            e2e = p.get("e2e")
            if e2e:
                cases.append(dict(family="conv", kind="mobilenet_v1", name="mobilenet_v1",
                                  sparsity=0.9, dtype=dt, batch=e2e["batch"], image=e2e["image"]))
    if "moe" in families:
        p = preset["moe"]
        for dt in _filter(p["dtypes"], dtypes):
            for t in tokens or p["tokens"]:
                cases.append(dict(family="moe", hidden=p["hidden"], ffn=p["ffn"],
                                  experts=p["experts"], top_k=p["top_k"], tokens=t, dtype=dt,
                                  prefill=t >= p["prefill_from"]))
    return cases


def case_label(case):
    f = case["family"]
    if f in ("spmm", "nm"):
        M, K = case["shape"]
        return (f"{f} {M}x{K} {case['pattern']} {case['sparsity']:.0%} {case['dtype']} "
                f"N={case['tokens']}")
    if f == "conv":
        if case["kind"] == "layer":
            ci, co, h, w, k, s, _ = case["conv"]
            return (f"conv {case['name']} {ci}->{co} {h}x{w} k{k}s{s} {case['sparsity']:.0%} "
                    f"{case['dtype']} b{case['batch']}")
        return f"conv {case['name']} e2e {case['sparsity']:.0%} {case['dtype']} b{case['batch']}"
    return (f"moe h{case['hidden']}-f{case['ffn']}-e{case['experts']}-k{case['top_k']} "
            f"{case['dtype']} T={case['tokens']}")


# ---- timing --------------------------------------------------------------------------------------
class Timer:
    """Interleaved medians of several callables on one device.

    CUDA: each sample is ``inner`` back-to-back calls between two CUDA events (``inner`` chosen so
    a sample lasts about ``sample_ms``, so launch gaps of short calls are amortised as in a real
    model), samples of all callables interleaved round-robin, the median per call reported. The
    number of samples adapts to ``case_ms`` (at least ``min_reps``, at most ``reps``). With
    ``flush_l2`` every sample is one call preceded by overwriting a buffer twice the L2 size, so
    weights are read from HBM (off by default: in a model the next layer evicts them anyway for
    big weights, while small ones stay cached). CPU (tests only): bench.common's perf_counter
    medians.
    """

    def __init__(self, device, reps=10, min_reps=3, warmup=1, sample_ms=0.5, case_ms=400.0,
                 flush_l2=False):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.reps, self.min_reps, self.warmup = max(1, reps), max(1, min(min_reps, reps)), warmup
        self.sample_ms, self.case_ms = sample_ms, case_ms
        self.flush = None
        if flush_l2 and self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
            self.flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=self.device)

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def _estimate_ms(self, fn):
        """ms of one call (mean of a burst of 10 when one call is under a millisecond)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        Event = self.torch.cuda.Event
        start, end = Event(enable_timing=True), Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = start.elapsed_time(end)
        if one >= 1.0:
            return one
        start.record()
        for _ in range(10):
            fn()
        end.record()
        end.synchronize()
        return max(start.elapsed_time(end) / 10, 1e-4)

    def __call__(self, fns):
        if not self.cuda:
            from bench.common import interleaved_median_ms

            return interleaved_median_ms(fns, reps=self.reps, warmup=self.warmup)
        for fn in fns:          # first calls: lazy init, caches, one-time structure validation
            for _ in range(self.warmup):
                fn()
        self.sync()
        est = [self._estimate_ms(fn) for fn in fns]   # also warms up further
        inner = [1 if self.flush is not None else max(1, min(1000, math.ceil(self.sample_ms / e)))
                 for e in est]
        per_round = sum(e * i for e, i in zip(est, inner))
        reps = int(max(self.min_reps, min(self.reps, self.case_ms / max(per_round, 1e-3))))
        events = [[] for _ in fns]
        Event = self.torch.cuda.Event
        for _ in range(reps):
            for i, fn in enumerate(fns):
                if self.flush is not None:
                    self.flush.zero_()
                start, end = Event(enable_timing=True), Event(enable_timing=True)
                start.record()
                for _ in range(inner[i]):
                    fn()
                end.record()
                events[i].append((start, end))
        self.sync()
        return [statistics.median(s.elapsed_time(e) / inner[i] for s, e in events[i])
                for i in range(len(fns))]


# ---- helpers shared by the families --------------------------------------------------------------
def _dtype(torch, name):
    return getattr(torch, name)


def _max_err(out, ref):
    """max |out - ref| in float64 (out may be a tuple from HF blocks), NaN-aware."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    d = (out.double() - ref.double()).abs()
    if d.numel() == 0:
        return 0.0
    if bool(d.isnan().any()):
        return float("nan")
    return float(d.max())


def _errors(row, ours, dense, ref):
    """Error columns from the outputs of ours and of the dense (baseline) op and the fp64
    reference: each one's max error against the reference, ours against the dense output, and
    ``err_ok``: ours within twice the dense op's error (python_tests/reference.py's rule)."""
    ours_err, dense_err = _max_err(ours, ref), _max_err(dense, ref)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    row["max_abs_err"] = ours_err
    row["dense_max_abs_err"] = dense_err
    row["diff_vs_dense"] = _max_err(ours, dense[0] if isinstance(dense, (tuple, list)) else dense)
    row["ref_max_abs"] = scale
    row["err_ok"] = bool(ours_err <= 2.0 * dense_err + 1e-6 * max(scale, 1.0))


def _speed(row, dense_ms, ours_ms, flops):
    row["dense_ms"] = dense_ms
    row["ours_ms"] = ours_ms
    row["speedup"] = dense_ms / ours_ms if ours_ms > 0 else float("nan")
    row["tflops"] = flops / (ours_ms * 1e9) if ours_ms > 0 else float("nan")


def _graph_replay(torch, fn):
    """``fn`` captured once as a CUDA graph; returns its replay (no Python or launch overhead)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up on the capture stream, as PyTorch recommends
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _graph_times(row, ctx, dense_fn, ours_fn):
    """For small token counts (``--graphs``), also times dense and ours as CUDA-graph replays:
    at N <= 16 an eager call is dominated by Python dispatch, a replay shows the kernels. A
    failed capture is recorded and turns graphs off for the rest of the process."""
    torch, dev = ctx["torch"], ctx["device"]
    if (dev.type != "cuda" or ctx.get("graphs_off") or ctx.get("graph_max_tokens", 0) <= 0
            or row["tokens"] > ctx["graph_max_tokens"]):
        return
    try:
        replays = [_graph_replay(torch, dense_fn), _graph_replay(torch, ours_fn)]
        dense_ms, ours_ms = ctx["timer"](replays)
        row.update(dense_graph_ms=dense_ms, ours_graph_ms=ours_ms, speedup_graph=dense_ms / ours_ms)
    except Exception as exc:  # noqa: BLE001  e.g. an op that synchronises cannot be captured
        row["graph_error"] = _short(exc)
        ctx["graphs_off"] = True
        torch.cuda.synchronize(dev)   # raises (and the family stops) if the context is broken


def _short(exc):
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def context_lost(message):
    """True for CUDA errors after which the process's CUDA context is unusable."""
    m = (message or "").lower()
    return any(s in m for s in ("illegal memory access", "device-side assert", "unspecified launch",
                                "misaligned address", "illegal instruction", "an illegal",
                                "cuda error: launch failure", "context is destroyed"))


# ---- SpMM ----------------------------------------------------------------------------------------
class _WeightCache:
    """One pruned weight per key, built on the CPU once and reused across dtypes and tokens."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = None, None  # free the old one first
            self.value, self.key = build(), key
        return self.value


def _spmm_weight(torch, M, K, sparsity, device, seed=0):
    """(CSRWeight on the CPU, masked dense fp32 weight on ``device``): built on the device, which
    is much faster than the CPU for 45M-entry LLM weights (CSRWeight.from_dense is
    device-agnostic)."""
    import sparse_ext as se

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(M, K, generator=g, device=device)
    mask = torch.rand(M, K, generator=g, device=device) >= sparsity   # uniform random pattern
    csr = se.CSRWeight.from_dense(w, mask)
    return csr, w * mask


def run_spmm(case, ctx):
    torch, dev, timer = ctx["torch"], ctx["device"], ctx["timer"]
    import torch.nn.functional as F

    import sparse_ext as se

    M, K = case["shape"]
    dt = _dtype(torch, case["dtype"])
    csr, wd32 = ctx["cache"].get(("spmm", M, K, case["sparsity"]),
                                   lambda: _spmm_weight(torch, M, K, case["sparsity"], dev))
    layer = se.SparseLinear(csr, None, "unstructured").to(device=dev, dtype=dt)
    layer.requires_grad_(False)
    wd = wd32.to(dtype=dt)
    n = case["tokens"]
    x = torch.randn(n, K, device=dev, dtype=dt)
    row = dict(case, shape=f"{M}x{K}",
               weight_bytes_ratio=layer.weight_nbytes / (M * K * wd.element_size()))
    with torch.no_grad():
        ref = F.linear(x.double(), wd.double())
        ours_out, dense_out = layer(x), F.linear(x, wd)
        _errors(row, ours_out, dense_out, ref)
        del ours_out, dense_out
        fns = [lambda: F.linear(x, wd), lambda: layer(x)]
        try:  # cuSPARSE through torch.sparse CSR: W @ x^T -> [M, N]
            with warnings.catch_warnings():   # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                wcsr = wd.to_sparse_csr()
            xt = x.t().contiguous()
            row["cusparse_max_abs_err"] = _max_err(torch.mm(wcsr, xt), ref.t())
            fns.append(lambda: torch.mm(wcsr, xt))
        except Exception as exc:  # noqa: BLE001  baseline unavailable for this dtype/device
            row["cusparse_error"] = _short(exc)
        times = timer(fns)
        _graph_times(row, ctx, fns[0], fns[1])
    _speed(row, times[0], times[1], 2.0 * M * K * n)
    if len(times) > 2:
        row["cusparse_ms"] = times[2]
        row["vs_cusparse"] = times[2] / times[1]
    return row


# ---- N:M -----------------------------------------------------------------------------------------
def _nm_weight(torch, M, K, n, m, device, seed=0):
    """(NMWeight on the CPU, its dense fp32 weight on ``device``), built on the device."""
    import sparse_ext as se

    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(M, K, generator=g, device=device)
    nm = se.NMWeight.from_dense(w, n, m)
    return nm, nm.to(device).to_dense()


NM_CUDA_PATHS = ("cores", "cusparselt", "dense")


def _nm_path_times(row, timer, layer_call):
    """Times each forward path the glue can be forced onto (the nm_cuda_path setting), to tune
    the auto thresholds; a path that cannot apply falls back to the cores."""
    import sparse_ext

    for path in NM_CUDA_PATHS:
        with sparse_ext.config.override(nm_cuda_path=path):
            try:
                row[f"path_{path}_ms"] = timer([layer_call])[0]
            except Exception as exc:  # noqa: BLE001  recorded, the case goes on
                row[f"path_{path}_error"] = _short(exc)


def run_nm(case, ctx):
    torch, dev, timer = ctx["torch"], ctx["device"], ctx["timer"]
    import torch.nn.functional as F

    import sparse_ext as se

    M, K = case["shape"]
    n_, m_ = (int(v) for v in case["pattern"].split(":"))
    dt = _dtype(torch, case["dtype"])
    nm, wd32 = ctx["cache"].get(("nm", M, K, n_, m_), lambda: _nm_weight(torch, M, K, n_, m_, dev))
    layer = se.SparseLinear(nm, None, case["pattern"]).to(device=dev, dtype=dt)
    layer.requires_grad_(False)
    wd = wd32.to(dtype=dt)
    n = case["tokens"]
    x = torch.randn(n, K, device=dev, dtype=dt)
    row = dict(case, shape=f"{M}x{K}",
               weight_bytes_ratio=layer.weight_nbytes / (M * K * wd.element_size()))
    with torch.no_grad():
        ref = F.linear(x.double(), wd.double())
        _errors(row, layer(x), F.linear(x, wd), ref)
        fns = [lambda: F.linear(x, wd), lambda: layer(x)]
        if case["pattern"] == "2:4":
            try:  # PyTorch's own 2:4 (cuSPARSELt or CUTLASS); needs CUDA fp16/bf16
                from torch.sparse import to_sparse_semi_structured

                wss = to_sparse_semi_structured(wd)
                row["torch_2of4_backend"] = type(wss).__name__
                row["torch_2of4_max_abs_err"] = _max_err(F.linear(x, wss), ref)
                fns.append(lambda: F.linear(x, wss))
            except Exception as exc:  # noqa: BLE001  missing on this build/device/dtype
                row["torch_2of4_error"] = _short(exc)
        times = timer(fns)
        _graph_times(row, ctx, fns[0], fns[1])
        _nm_path_times(row, timer, fns[1])
    _speed(row, times[0], times[1], 2.0 * M * K * n)
    if len(times) > 2:
        row["torch_2of4_ms"] = times[2]
        row["vs_torch_2of4"] = times[2] / times[1]
    return row


# ---- sparse conv ---------------------------------------------------------------------------------
def run_conv(case, ctx):
    if case["kind"] == "mobilenet_v1":
        return _run_mobilenet(case, ctx)
    torch, dev, timer = ctx["torch"], ctx["device"], ctx["timer"]
    import torch.nn.functional as F
    from torch import nn

    import sparse_ext as se
    from sparse_ext.prune import build_mask

    ci, co, h, w, k, s, pad = case["conv"]
    dt = _dtype(torch, case["dtype"])
    torch.manual_seed(0)
    conv = nn.Conv2d(ci, co, k, s, pad)
    mask = build_mask(conv.weight.detach().reshape(co, -1), case["sparsity"], "unstructured")
    sparse = se.SparseConv2d.from_dense(conv, mask=mask, activation="relu")
    wd = sparse.dense_weight().to(device=dev, dtype=dt)   # before moving: to_dense runs on CPU
    bias = conv.bias.detach().to(device=dev, dtype=dt)
    sparse = sparse.to(device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(case["batch"], ci, h, w, device=dev, dtype=dt)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    row = dict(case, shape=f"{case['name']} {ci}->{co} {h}x{w} k{k}s{s}", pattern="unstructured",
               tokens=case["batch"] * oh * ow)
    with torch.no_grad():
        ref = F.relu(F.conv2d(x.double(), wd.double(), bias.double(), s, pad))
        _errors(row, sparse(x), F.relu(F.conv2d(x, wd, bias, s, pad)), ref)
        # cuDNN also on channels_last (NHWC) tensors, its fastest layout for fp16 (report only).
        x_cl = x.contiguous(memory_format=torch.channels_last)
        wd_cl = wd.contiguous(memory_format=torch.channels_last)
        times = timer([lambda: F.relu(F.conv2d(x, wd, bias, s, pad)), lambda: sparse(x),
                       lambda: F.relu(F.conv2d(x_cl, wd_cl, bias, s, pad))])
    _speed(row, times[0], times[1], 2.0 * ci * co * k * k * oh * ow * case["batch"])
    row["dense_channels_last_ms"] = times[2]
    return row


def _run_mobilenet(case, ctx):
    torch, dev, timer = ctx["torch"], ctx["device"], ctx["timer"]
    from bench.bench_conv import sparsify_dense_reference
    from bench.mobilenets import MobileNetV1, folded, sparsify_pointwise

    dt = _dtype(torch, case["dtype"])
    torch.manual_seed(0)
    dense = folded(MobileNetV1())                          # BatchNorm folded, CPU fp32
    sparse = sparsify_pointwise(dense, case["sparsity"])   # 1x1 convs sparse, ReLU fused
    masked = sparsify_dense_reference(sparse, dense)       # dense model with the pruned 1x1 weights
    ref_model = copy.deepcopy(masked).to(device=dev, dtype=torch.float64).eval()
    dense = dense.to(device=dev, dtype=dt).eval()
    masked = masked.to(device=dev, dtype=dt).eval()
    sparse = sparse.to(device=dev, dtype=dt).eval()
    img = case["image"]
    x = torch.randn(case["batch"], 3, img, img, device=dev, dtype=dt)
    row = dict(case, shape=f"mobilenet_v1 end-to-end {img}x{img} (1x1 at {case['sparsity']:.0%})",
               pattern="unstructured", tokens=case["batch"] * img * img)
    with torch.no_grad():
        ref = ref_model(x.double())
        _errors(row, sparse(x), masked(x), ref)
        del ref_model, ref
        times = timer([lambda: dense(x), lambda: sparse(x), lambda: masked(x)])
    flops = 2.0 * 569e6 * case["batch"] * (img / 224) ** 2   # MobileNetV1-1.0: 569 MMACs at 224
    _speed(row, times[0], times[1], flops)
    row["masked_dense_ms"] = times[2]
    return row


# ---- MoE -----------------------------------------------------------------------------------------
def _hf_block(torch, H, FF, E, K):
    """HF MixtralSparseMoeBlock with its eager per-expert loop, or None without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001  transformers is optional
        return None
    cfg = MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=E,
                        num_experts_per_tok=K)
    cfg._experts_implementation = "eager"   # the per-expert loop users run, not a fused kernel
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def run_moe(case, ctx):
    torch, dev, timer = ctx["torch"], ctx["device"], ctx["timer"]
    import torch.nn.functional as F

    import sparse_ext as se
    from bench.bench_moe import _floor_fn, _torch_loop

    H, FF, E, K, T = case["hidden"], case["ffn"], case["experts"], case["top_k"], case["tokens"]
    dt = _dtype(torch, case["dtype"])
    key = ("moe", H, FF, E, K)

    def build():
        block = _hf_block(torch, H, FF, E, K)
        if block is None:
            torch.manual_seed(0)
            layer = se.MoELayer(H, FF, E, K).eval()
            return None, layer
        return block, se.MoELayer.from_hf(block).eval()

    block_cpu, layer_cpu = ctx["cache"].get(key, build)
    models = ctx.setdefault("moe_models", {})   # device copies, reused across token counts
    if (key, dt) not in models:
        models.clear()
        models[(key, dt)] = (
            copy.deepcopy(layer_cpu).to(device=dev, dtype=dt).requires_grad_(False),
            copy.deepcopy(layer_cpu).to(device=dev, dtype=torch.float64).requires_grad_(False),
            None if block_cpu is None else copy.deepcopy(block_cpu).to(device=dev, dtype=dt),
            None if block_cpu is None else copy.deepcopy(block_cpu).to(device=dev,
                                                                        dtype=torch.float64))
    layer, ref_layer, block, ref_block = models[(key, dt)]
    if block is not None:
        base, baseline = (lambda: block(x)), "hf_mixtral_eager"
    else:
        # transformers missing: bench_moe._torch_loop is a faithful local copy of HF's eager
        # per-expert loop (route, then for each expert: gather its tokens, SwiGLU MLP, index_add).
        loop = _torch_loop(layer)
        base, baseline = (lambda: loop(x[0])), "torch_loop"
    torch.manual_seed(T)
    x = torch.randn(1, T, H, device=dev, dtype=dt)
    x2 = x.reshape(T, H)
    row = dict(case, family="moe", shape=f"h{H}-f{FF}-e{E}-k{K}", pattern=f"top-{K}",
               sparsity=1.0 - K / E, baseline=baseline)
    with torch.no_grad():
        ref = (ref_block(x.double()) if ref_block is not None
               else _torch_loop(ref_layer)(x2.double()))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).reshape(T, H)
        ours_out = layer(x).reshape(T, H)
        base_out = base()
        base_out = (base_out[0] if isinstance(base_out, (tuple, list)) else base_out).reshape(T, H)
        _errors(row, ours_out, base_out, ref)
        del ours_out, base_out
        floor, touched = _floor_fn(layer, x2)
        # Equal-FLOP dense GEMMs: T*k rows through one [2F, H] and one [H, F] projection.
        rows_ = T * K
        xr = torch.randn(rows_, H, device=dev, dtype=dt)
        hr = torch.randn(rows_, FF, device=dev, dtype=dt)
        w1d, w2d = layer.w1[0].contiguous(), layer.w2[0].contiguous()
        gemm = lambda: (F.linear(xr, w1d), F.linear(hr, w2d))  # noqa: E731
        times = timer([base, lambda: layer(x), floor, gemm])
    base_ms, ours_ms, floor_ms, gemm_ms = times
    flops = 2.0 * T * K * 3 * H * FF
    _speed(row, base_ms, ours_ms, flops)
    expert_bytes = 3 * H * FF * torch.empty((), dtype=dt).element_size()
    row.update(floor_ms=floor_ms, vs_floor=ours_ms / floor_ms, touched_experts=touched,
               dense_gemm_ms=gemm_ms, vs_dense_gemm=gemm_ms / ours_ms,
               gbps=touched * expert_bytes / (ours_ms * 1e6))
    return row


RUNNERS = {"spmm": run_spmm, "nm": run_nm, "conv": run_conv, "moe": run_moe}


# ---- targets (../shared/TARGETS.md, CUDA table) --------------------------------------------------
def _gm(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _verdict(ok):
    return "met" if ok else "MISSED"


def targets_report(rows):
    """One line per CUDA target with the measured worst point and geomean."""
    ok_rows = [r for r in rows if r.get("speedup") is not None and not r.get("error")]
    lines = []

    def pick(family, **kw):
        return [r for r in ok_rows if r["family"] == family
                and all((abs(r.get(k, -1) - v) < 1e-9) if isinstance(v, float) else r.get(k) == v
                        for k, v in kw.items())]

    for dt in ("float16", "float32", "bfloat16"):
        sel = [r for r in pick("spmm", dtype=dt, sparsity=0.9) if r["tokens"] >= 256]
        if sel:
            s = [r["speedup"] for r in sel]
            met = sum(v >= 2.0 for v in s)
            lines.append(f"SpMM 90% {dt}, N >= 256: {met}/{len(s)} points >= 2x over cuBLAS "
                         f"(worst {min(s):.2f}x, geomean {_gm(s):.2f}x): {_verdict(met == len(s))}")
        g = [r["speedup_graph"] for r in pick("spmm", dtype=dt, sparsity=0.9)
             if "speedup_graph" in r]
        if g:
            lines.append(f"SpMM 90% {dt}, small N as CUDA graphs: worst {min(g):.2f}x, geomean "
                         f"{_gm(g):.2f}x over cuBLAS (report)")
        vs = [r["vs_cusparse"] for r in pick("spmm", dtype=dt, sparsity=0.9) if "vs_cusparse" in r]
        if vs:
            lines.append(f"SpMM 90% {dt} vs cuSPARSE: worst {min(vs):.2f}x, geomean {_gm(vs):.2f}x "
                         f"(target >= 2x): {_verdict(min(vs) >= 2.0)}")
    for dt in ("float16", "bfloat16"):
        sel = pick("nm", pattern="2:4", dtype=dt)
        if sel:
            s = [r["speedup"] for r in sel]
            lines.append(f"N:M 2:4 {dt}: worst {min(s):.2f}x, geomean {_gm(s):.2f}x over cuBLAS "
                         f"(target >= 1.3x): {_verdict(min(s) >= 1.3)}")
            t = [r["vs_torch_2of4"] for r in sel if "vs_torch_2of4" in r]
            if t:
                lines.append(f"N:M 2:4 {dt} vs torch semi-structured: worst {min(t):.2f}x, "
                             f"geomean {_gm(t):.2f}x (report)")
    sel = pick("nm", pattern="1:8")
    if sel:
        s = [r["speedup"] for r in sel]
        lines.append(f"N:M 1:8: worst {min(s):.2f}x, geomean {_gm(s):.2f}x over cuBLAS "
                     f"(target >= 2.5x): {_verdict(min(s) >= 2.5)}")
    for pattern in ("1:4", "2:8", "4:16"):
        s = [r["speedup"] for r in pick("nm", pattern=pattern)]
        if s:
            lines.append(f"N:M {pattern}: worst {min(s):.2f}x, geomean {_gm(s):.2f}x over cuBLAS "
                         f"(report)")
    for dt in ("bfloat16", "float16", "float32"):
        dec = [r for r in pick("moe", dtype=dt) if not r.get("prefill")]
        if dec:
            s = [r["speedup"] for r in dec]
            lines.append(f"MoE {dt} decode (T={','.join(str(r['tokens']) for r in dec)}): worst "
                         f"{min(s):.2f}x over {dec[0]['baseline']} (target >= 3x): "
                         f"{_verdict(min(s) >= 3.0)}")
        pre = [r for r in pick("moe", dtype=dt) if r.get("prefill")]
        if pre:
            s = [r["vs_dense_gemm"] for r in pre]
            lines.append(f"MoE {dt} prefill (T={','.join(str(r['tokens']) for r in pre)}): worst "
                         f"{min(s):.0%} of equal-FLOP dense GEMM throughput (target >= 70%): "
                         f"{_verdict(min(s) >= 0.7)}")
    for sp in (0.9, 0.7):
        s = [r["speedup"] for r in ok_rows if r["family"] == "conv" and r.get("kind") == "layer"
             and r["conv"][4] == 1 and abs(r["sparsity"] - sp) < 1e-9]
        if s:
            lines.append(f"conv 1x1 at {sp:.0%}: worst {min(s):.2f}x, geomean {_gm(s):.2f}x over "
                         f"cuDNN (report)")
    for r in ok_rows:
        if r["family"] == "conv" and r.get("kind") == "mobilenet_v1":
            lines.append(f"MobileNetV1 {r['dtype']} batch {r['batch']} end to end: "
                         f"{r['speedup']:.2f}x over dense (report)")
    bad = [r for r in ok_rows if r.get("err_ok") is False]
    lines.append(f"correctness: {len(ok_rows) - len(bad)}/{len(ok_rows)} measured outputs within "
                 f"2x of the dense op's error vs fp64" + (": CHECK " + "; ".join(
                     case_label(r) for r in bad[:8]) if bad else ""))
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines.append(f"{len(failed)} case(s) failed or were skipped (see the error column)")
    return lines


# ---- report --------------------------------------------------------------------------------------
REPORT_COLUMNS = {
    "spmm": [("shape", "{}"), ("sparsity", "{:.0%}"), ("dtype", "{}"), ("tokens", "{}"),
             ("dense_ms", "{:.4f}"), ("ours_ms", "{:.4f}"), ("speedup", "{:.2f}x"),
             ("tflops", "{:.1f}"), ("cusparse_ms", "{:.4f}"), ("vs_cusparse", "{:.2f}x"),
             ("speedup_graph", "{:.2f}x"),
             ("max_abs_err", "{:.2e}"), ("dense_max_abs_err", "{:.2e}"),
             ("diff_vs_dense", "{:.2e}"), ("err_ok", "{}"), ("error", "{}")],
    "nm": [("shape", "{}"), ("pattern", "{}"), ("dtype", "{}"), ("tokens", "{}"),
           ("dense_ms", "{:.4f}"), ("ours_ms", "{:.4f}"), ("speedup", "{:.2f}x"),
           ("tflops", "{:.1f}"), ("torch_2of4_ms", "{:.4f}"), ("vs_torch_2of4", "{:.2f}x"),
           ("speedup_graph", "{:.2f}x"),
           ("max_abs_err", "{:.2e}"), ("dense_max_abs_err", "{:.2e}"),
           ("diff_vs_dense", "{:.2e}"), ("err_ok", "{}"), ("error", "{}")],
    "conv": [("shape", "{}"), ("sparsity", "{:.0%}"), ("dtype", "{}"), ("batch", "{}"),
             ("dense_ms", "{:.4f}"), ("ours_ms", "{:.4f}"), ("speedup", "{:.2f}x"),
             ("dense_channels_last_ms", "{:.4f}"),
             ("tflops", "{:.1f}"), ("max_abs_err", "{:.2e}"), ("dense_max_abs_err", "{:.2e}"),
             ("diff_vs_dense", "{:.2e}"), ("err_ok", "{}"), ("error", "{}")],
    "moe": [("shape", "{}"), ("dtype", "{}"), ("tokens", "{}"), ("baseline", "{}"),
            ("dense_ms", "{:.4f}"), ("ours_ms", "{:.4f}"), ("speedup", "{:.2f}x"),
            ("floor_ms", "{:.4f}"), ("dense_gemm_ms", "{:.4f}"), ("vs_dense_gemm", "{:.0%}"),
            ("gbps", "{:.0f}"), ("max_abs_err", "{:.2e}"), ("dense_max_abs_err", "{:.2e}"),
            ("diff_vs_dense", "{:.2e}"), ("err_ok", "{}"), ("error", "{}")],
}
BASELINE_NOTE = {
    "spmm": "dense_ms: cuBLAS (F.linear, masked dense weight); cusparse_ms: torch.sparse CSR "
            "(W @ x^T); speedup = dense_ms / ours_ms; tflops = dense-equivalent FLOPs / ours_ms; "
            "speedup_graph: the same ratio with both timed as CUDA-graph replays (small N only: "
            "eager times there include the Python dispatch of each call)",
    "nm": "dense_ms: cuBLAS (F.linear); torch_2of4_ms: torch.sparse.to_sparse_semi_structured; "
          "speedup_graph as for spmm",
    "conv": "dense_ms: cuDNN F.conv2d + ReLU with the masked dense weight, NCHW like ours "
            "(end to end: the dense folded MobileNetV1); dense_channels_last_ms: the same on NHWC "
            "tensors",
    "moe": "dense_ms and dense_max_abs_err: the baseline column (HF MixtralSparseMoeBlock eager "
           "loop); floor_ms: each "
           "touched expert's dense MLP on its own tokens; dense_gemm_ms: equal-FLOP dense GEMMs; "
           "vs_dense_gemm = dense_gemm_ms / ours_ms",
}


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None:
        return ""
    try:
        text = fmt.format(value)
    except (TypeError, ValueError):
        text = str(value)
    return text.replace("|", "\\|")


def markdown(result):
    m = result.get("machine", {})
    out = [f"Measured {result.get('time', '')} on {m.get('gpu')} (torch {m.get('torch')}, CUDA "
           f"{m.get('cuda')}, driver {m.get('driver')}), {result.get('size')} size, "
           f"{'L2 flushed before every call' if result.get('flush_l2') else 'L2 warm'}; "
           f"TF32 matmul {'on' if m.get('allow_tf32') else 'off'}. Medians of interleaved "
           "CUDA-event samples in one process; errors are max |out - fp64 reference|.", ""]
    rows = result.get("rows", [])
    if result.get("targets"):
        out += ["#### Targets", ""] + [f"- {line}" for line in result["targets"]] + [""]
    for family in FAMILIES:
        fam = [r for r in rows if r.get("family") == family]
        if not fam:
            continue
        cols = [(k, f) for k, f in REPORT_COLUMNS[family] if any(r.get(k) is not None for r in fam)]
        out += [f"#### {family}", "", f"{BASELINE_NOTE[family]}.", ""]
        out.append("| " + " | ".join(k for k, _ in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in fam:
            out.append("| " + " | ".join(_cell(r, k, f) for k, f in cols) + " |")
        out.append("")
    for note in result.get("notes", []):
        out.append(f"- {note}")
    return "\n".join(out).rstrip() + "\n"


def machine_info(device):
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "host": platform.node(), "gpu": None, "driver": None,
            "allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "fp16_reduced_precision_reduction":
                bool(torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, sm=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
    else:
        info["gpu"] = f"none ({device})"
    return info


# ---- running -------------------------------------------------------------------------------------
def run_family_in_process(family, cases, args, write_partial=None, stop_on_lost=False):
    """Runs ``cases`` of one family; a failing case is recorded and the next one runs, unless the
    CUDA context is lost: then the rest are marked skipped, or with ``stop_on_lost`` the run stops
    there (a child process; its parent starts a fresh one for the rest). Stops starting cases
    past the budget. Returns (rows, lost)."""
    import torch

    device = torch.device(args.device)
    ctx = dict(torch=torch, device=device, cache=_WeightCache(), graph_max_tokens=args.graphs,
               timer=Timer(device, reps=args.reps, min_reps=args.min_reps, case_ms=args.case_ms,
                           flush_l2=args.flush_l2))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import sparse_ext  # noqa: F401  registers the ops

    budget = getattr(args, "family_budget_s", None)
    fault = os.environ.get("BENCH_CUDA_TEST_FAULT")   # tests: a fake lost context in this case
    t_start = time.perf_counter()
    rows, lost = [], None
    for i, case in enumerate(cases):
        label = case_label(case)
        elapsed = time.perf_counter() - t_start
        if lost or (budget and elapsed > budget):
            why = (f"skipped: {lost}" if lost
                   else f"skipped: family time budget {budget:.0f} s spent")
            rows.append(dict(case, error=why))
            continue
        t0 = time.perf_counter()
        try:
            if fault == label:
                raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                   "(injected by BENCH_CUDA_TEST_FAULT)")
            row = RUNNERS[family](case, ctx)
        except Exception as exc:  # noqa: BLE001  record and go on
            row = dict(case, error=_short(exc))
            if context_lost(str(exc)):
                lost = f"CUDA context lost in {label}"
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if "error" in row:
            print(f"[{i + 1}/{len(cases)}] {label}: ERROR {row['error']}", flush=True)
        else:
            print(f"[{i + 1}/{len(cases)}] {label}: {row['speedup']:.2f}x "
                  f"({row['dense_ms']:.4f} -> {row['ours_ms']:.4f} ms) err {row['max_abs_err']:.2e}"
                  f"{'' if row['err_ok'] else ' CHECK'}", flush=True)
        if write_partial:
            write_partial(rows)
        if lost and stop_on_lost:
            break
    return rows, lost


def _json_dump(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


LOST_EXIT = 3   # a child's exit code: the CUDA context broke; the parent resumes after that case


def _family_subprocess(family, args, workdir, budget_s, max_restarts=3):
    """Runs one family in child processes (isolating CUDA faults) and returns (rows, status).

    A child that lost its CUDA context (an illegal address in one case, say) stops after
    recording that case; a fresh child then continues with the next case, up to ``max_restarts``
    times, within the family's budget. Cases no child reached are recorded as not run."""
    cases = build_cases(args.size, [family], args.shapes, args.tokens, args.sparsities, args.dtypes)
    started = time.perf_counter()
    rows, status, attempt = [], "ok", 0
    while len(rows) < len(cases):
        left = budget_s - (time.perf_counter() - started)
        if attempt > 0 and (attempt > max_restarts or left < 10):
            status = (f"stopped after {attempt} processes" if attempt > max_restarts
                      else "stopped: family time budget spent")
            break
        part = os.path.join(workdir, f"part-{family}-{attempt}.json")
        with contextlib.suppress(FileNotFoundError):
            os.remove(part)
        cmd = [sys.executable, "-m", "bench.bench_cuda", "--in-process", "--families", family,
               "--size", args.size, "--device", args.device, "--reps", str(args.reps),
               "--min-reps", str(args.min_reps), "--case-ms", str(args.case_ms),
               "--family-budget-s", str(max(left, 1.0)), "--partial-json", part,
               "--start-at", str(len(rows)), "--graphs", str(args.graphs)]
        for flag in ("shapes", "tokens", "sparsities", "dtypes"):
            values = getattr(args, flag)
            if values:
                cmd += [f"--{flag}"] + ["x".join(map(str, v)) if isinstance(v, (list, tuple))
                                        else str(v) for v in values]
        if args.flush_l2:
            cmd.append("--flush-l2")
        grace = 30.0   # the budget only stops *starting* cases; one case may run past it
        try:
            proc = subprocess.run(cmd, timeout=max(left, 1.0) + grace)
            code = proc.returncode
            status = ("ok" if code in (0, LOST_EXIT) else f"exit code {code}")
        except subprocess.TimeoutExpired:
            code, status = None, f"killed after {max(left, 1.0) + grace:.0f} s"
        got = []
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            with open(part) as f:
                got = json.load(f)
        rows += got
        attempt += 1
        if code != LOST_EXIT or not got:   # done, or a failure a restart would not cure
            break
    for case in cases[len(rows):]:   # cases no child reached (crash, timeout, budget)
        rows.append(dict(case, error=f"not run: family process {status}"))
    lost = [r for r in rows if context_lost(r.get("error", ""))]
    if lost:
        status = (f"{status}; CUDA context lost in {len(lost)} case(s) ("
                  + ", ".join(case_label(r) for r in lost[:3]) + "), a fresh process continued")
    return rows, status


def fake_rows(cases, seed=0):
    """Plausible made-up results for --dry-run (exercises the report without a GPU)."""
    rng = random.Random(seed)
    rows = []
    for case in cases:
        dense = rng.uniform(0.01, 5.0)
        ours = dense / rng.uniform(0.5, 4.0)
        row = dict(case, dense_ms=dense, ours_ms=ours, speedup=dense / ours,
                   tflops=rng.uniform(1, 500), max_abs_err=1e-3, dense_max_abs_err=1e-3,
                   diff_vs_dense=1e-3, err_ok=True)
        f = case["family"]
        if f in ("spmm", "nm"):
            row["shape"] = "x".join(map(str, case["shape"]))
        if f == "spmm":
            row.update(cusparse_ms=dense * 2, vs_cusparse=dense * 2 / ours)
        if f in ("spmm", "nm") and case["tokens"] <= 16:
            row.update(dense_graph_ms=dense / 2, ours_graph_ms=ours / 3,
                       speedup_graph=1.5 * dense / ours)
        if f == "nm" and case["pattern"] == "2:4":
            row.update(torch_2of4_ms=dense / 1.2, vs_torch_2of4=dense / 1.2 / ours)
        if f == "conv":
            row["shape"] = case_label(case)
        if f == "moe":
            row.update(shape="moe", baseline="hf_mixtral_eager", floor_ms=ours * 0.9,
                       dense_gemm_ms=ours * 0.8, vs_dense_gemm=0.8, vs_floor=1.1, gbps=1000.0)
        rows.append(row)
    if rows:
        rows[-1] = dict(cases[-1], error="RuntimeError: example failure (dry run)")
    return rows


def smoke(device="cuda"):
    """Tiny check of every family: outputs (and SpMM / N:M gradients) on ``device`` against the
    CPU ops. Prints one PASS / FAIL line per check; returns the number of failures. The fallback
    when pytest is missing, and a fast first signal before the test suite."""
    import torch
    from torch import nn

    import sparse_ext as se

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("smoke: FAIL: no CUDA device visible to torch (torch "
              f"{torch.__version__}, built with CUDA {torch.version.cuda})", flush=True)
        return 1
    failures = 0

    def check(name, fn):
        nonlocal failures
        try:
            err, tol = fn()
            ok = err <= tol
        except Exception as exc:  # noqa: BLE001
            ok, err, tol = False, _short(exc), None
        failures += not ok
        print(f"smoke {'PASS' if ok else 'FAIL'} {name}: "
              + (f"max rel err {err:.2e} (tol {tol:.0e})" if tol is not None else str(err)),
              flush=True)

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))

    torch.manual_seed(0)
    lin = nn.Linear(96, 72)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
    for pattern in ("unstructured", "4x1", "2:4", "1:8"):
        kw = {} if ":" in pattern else dict(sparsity=0.8)
        cpu = se.SparseLinear.from_dense(lin, pattern=pattern, **kw)
        for dt in dtypes:
            def fwd(cpu=cpu, dt=dt):
                x = torch.randn(5, 3, 96)
                ref = cpu(x)   # fp32 CPU op on the fp32 weights
                out = copy.deepcopy(cpu).to(device=dev, dtype=dt)(x.to(dev, dt))
                return rel(out, ref), 1e-4 if dt == torch.float32 else 3e-2
            check(f"SparseLinear {pattern} {str(dt)[6:]} forward", fwd)

        def grad(cpu=cpu):
            x = torch.randn(7, 96)
            xc, xd = x.clone().requires_grad_(), x.to(dev).requires_grad_()
            gpu = copy.deepcopy(cpu).to(dev)
            cpu(xc).square().sum().backward()
            gpu(xd).square().sum().backward()
            return max(rel(xd.grad, xc.grad), rel(gpu.values.grad, cpu.values.grad)), 1e-4
        check(f"SparseLinear {pattern} float32 backward (x, values)", grad)
    for k, stride in ((1, 1), (3, 1), (3, 2)):
        conv = nn.Conv2d(16, 24, k, stride, k // 2)
        cpu = se.SparseConv2d.from_dense(conv, sparsity=0.8, activation="relu")
        for dt in dtypes:
            def cfwd(cpu=cpu, dt=dt):
                x = torch.randn(2, 16, 11, 9)
                with torch.no_grad():
                    out = copy.deepcopy(cpu).to(device=dev, dtype=dt)(x.to(dev, dt))
                    return rel(out, cpu(x)), 1e-4 if dt == torch.float32 else 3e-2
            check(f"SparseConv2d k{k} s{stride} {str(dt)[6:]} forward", cfwd)
    moe = se.MoELayer(32, 48, 4, 2).eval()
    for dt in dtypes:
        def mfwd(dt=dt):
            x = torch.randn(2, 9, 32)
            with torch.no_grad():
                ref = moe(x)
                out = copy.deepcopy(moe).to(device=dev, dtype=dt)(x.to(dev, dt))
            return rel(out, ref), 1e-4 if dt == torch.float32 else 3e-2
        check(f"MoELayer {str(dt)[6:]} forward", mfwd)
    print(f"smoke: {failures} failure(s)", flush=True)
    return failures


DOCS_BEGIN = "<!-- cuda-results:begin -->"
DOCS_END = "<!-- cuda-results:end -->"


def update_docs(result, path=os.path.join("docs", "performance.md"), summary=None):
    """Replaces the text between the cuda-results markers of ``path`` (performance.md's CUDA
    section) with the report of ``result`` (and a gpu_check summary.md, when given)."""
    with open(path) as f:
        text = f.read()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{path} has no {DOCS_BEGIN} ... {DOCS_END} markers")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    body = markdown(result)
    if summary:   # its headings below this section's
        summary = "\n".join("#### " + line.lstrip("#").strip() if line.startswith("#") else line
                            for line in summary.strip().splitlines())
        body += "\n<details><summary>gpu_check summary</summary>\n\n" + summary + "\n\n</details>\n"
    with open(path, "w") as f:
        body = body.replace("\n#### ", "\n### ")   # one level up: subsections of "## CUDA"
        f.write(head + DOCS_BEGIN + "\n" + body + DOCS_END + tail)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.bench_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated subset of: " + ", ".join(FAMILIES) + " (default: all)")
    p.add_argument("--size", choices=list(SIZES), default="default",
                   help="case list: tiny (CPU tests), quick, default (TARGETS.md), full")
    p.add_argument("--shapes", nargs="+", metavar="OUTxIN", help="replace spmm/nm weight shapes")
    p.add_argument("--tokens", nargs="+", type=int, metavar="N", help="replace token counts")
    p.add_argument("--sparsities", nargs="+", type=float, metavar="S", help="replace sparsities")
    p.add_argument("--dtypes", nargs="+", choices=["float16", "bfloat16", "float32"],
                   help="only these dtypes")
    p.add_argument("--reps", type=int, default=10, help="most timed samples per callable (median)")
    p.add_argument("--min-reps", type=int, default=3, help="fewest timed samples per callable")
    p.add_argument("--case-ms", type=float, default=200.0,
                   help="GPU time aimed at per case for the timed samples (fewer reps above it)")
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="wall-time budget of the whole suite, shared by the families")
    p.add_argument("--flush-l2", action="store_true",
                   help="overwrite 2x the L2 cache before every timed call (weights from HBM)")
    p.add_argument("--graphs", type=int, default=16, metavar="N",
                   help="SpMM / N:M cases with at most N tokens are also timed as CUDA-graph "
                        "replays, without Python dispatch (default 16; 0: never)")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N; cpu only for tests")
    p.add_argument("--out", default=os.path.join("bench", "results"),
                   help="folder for cuda_latest.json and cuda_latest.md")
    p.add_argument("--json", default=None, help="JSON path (default OUT/cuda_latest.json)")
    p.add_argument("--markdown", default=None, help="report path (default OUT/cuda_latest.md)")
    p.add_argument("--workdir", default=None,
                   help="folder for per-family partial JSON (default OUT)")
    p.add_argument("--dry-run", action="store_true",
                   help="no timing: build the case list and write the report from fake results")
    p.add_argument("--smoke", action="store_true",
                   help="only the tiny CUDA-vs-CPU check of every family (exit code = failures)")
    p.add_argument("--list", action="store_true", help="print the case list and exit")
    p.add_argument("--render", metavar="JSON",
                   help="no measuring: rewrite the markdown report of an earlier run's JSON")
    p.add_argument("--update-docs", metavar="JSON",
                   help="no measuring: put an earlier run's report (and the summary.md beside "
                        "it, if any) into docs/performance.md between its cuda-results markers")
    p.add_argument("--in-process", action="store_true",
                   help="run the families in this process (default: one child process each)")
    p.add_argument("--family-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--partial-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        p.error(f"unknown family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if args.shapes:
        try:
            args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
        except ValueError:
            p.error("--shapes takes OUTxIN, e.g. 4096x4096")
        if any(len(s) != 2 for s in args.shapes):
            p.error("--shapes takes OUTxIN, e.g. 4096x4096")
    args.json = args.json or os.path.join(args.out, "cuda_latest.json")
    args.markdown = args.markdown or os.path.join(args.out, "cuda_latest.md")
    args.workdir = args.workdir or args.out
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.getcwd())
    cases = build_cases(args.size, args.families, args.shapes, args.tokens, args.sparsities,
                        args.dtypes)
    if args.list:
        for case in cases:
            print(case_label(case))
        print(f"{len(cases)} cases")
        return 0
    if args.smoke:
        return min(smoke(args.device), 100)
    if args.render or args.update_docs:
        with open(args.render or args.update_docs) as f:
            result = json.load(f)
        if args.render:
            with open(args.markdown, "w") as f:
                f.write(markdown(result))
            print(f"wrote {args.markdown}")
        else:
            summary_path = os.path.join(os.path.dirname(os.path.abspath(args.update_docs)),
                                        "summary.md")
            summary = open(summary_path).read() if os.path.exists(summary_path) else None
            print(f"updated {update_docs(result, summary=summary)}")
        return 0
    if args.partial_json:   # child process of _family_subprocess
        _json_dump([], args.partial_json)
        _, lost = run_family_in_process(args.families[0], cases[args.start_at:], args,
                                        lambda rows: _json_dump(rows, args.partial_json),
                                        stop_on_lost=True)
        return LOST_EXIT if lost else 0
    started = time.perf_counter()
    notes = []
    if args.dry_run:
        machine = {"gpu": "dry run (fake timings)", "torch": None, "cuda": None, "driver": None}
        rows = fake_rows(cases)
    else:
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("bench_cuda: no CUDA device visible to torch; nothing measured "
                  "(use --dry-run to check the report without a GPU)", file=sys.stderr)
            return 2
        machine = machine_info(args.device)
        print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items() if v is not None),
              flush=True)
        os.makedirs(args.workdir, exist_ok=True)
        rows = []
        shares = {f: BUDGET_SHARE[f] for f in args.families}
        for i, family in enumerate(args.families):
            fam_cases = [c for c in cases if c["family"] == family]
            if not fam_cases:
                continue
            # This family's share of what is left (a fast family leaves time to the next ones).
            left = args.budget_s - (time.perf_counter() - started)
            rest = sum(shares[f] for f in args.families[i:])
            budget = max(10.0, left * shares[family] / rest)
            print(f"== {family}: {len(fam_cases)} cases, budget {budget:.0f} s", flush=True)
            if args.in_process:
                args.family_budget_s = budget
                fam_rows, _ = run_family_in_process(family, fam_cases, args)
            else:
                fam_rows, status = _family_subprocess(family, args, args.workdir, budget)
                if status != "ok":
                    notes.append(f"{family}: family process {status}")
            rows += fam_rows
    targets = targets_report(rows)
    result = {"time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine, "size": args.size, "flush_l2": args.flush_l2,
              "args": {k: v for k, v in vars(args).items()}, "rows": rows, "targets": targets,
              "notes": notes, "wall_s": round(time.perf_counter() - started, 1)}
    for path in (args.json, args.markdown):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _json_dump(result, args.json)
    with open(args.markdown, "w") as f:
        f.write(markdown(result))
    print()
    print("Targets (../shared/TARGETS.md, CUDA):")
    print("\n".join("  " + line for line in targets))
    print(f"\nwrote {args.json} and {args.markdown} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the CUDA cases record next to their times: how far each output is from an fp64 reference,
the speed columns, and the CUDA-graph replay times of small calls. Device-agnostic (the CPU runs
the same code in the tests)."""
from bench.core.targets import Target


def short(exc):
    """One line of an exception, for a row's ``error``."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def max_err(out, ref):
    """max |out - ref| in float64 (out may be a tuple from HF blocks), NaN-aware."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    d = (out.double() - ref.double()).abs()
    if d.numel() == 0:
        return 0.0
    if bool(d.isnan().any()):
        return float("nan")
    return float(d.max())


def record_errors(row, ours, dense, ref):
    """Each output's max error against the fp64 reference, ours against the dense output, and
    ``err_ok``: ours within twice the dense op's error (python_tests/reference.py's rule)."""
    ours_err, dense_err = max_err(ours, ref), max_err(dense, ref)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    row["max_abs_err"] = ours_err
    row["dense_max_abs_err"] = dense_err
    row["diff_vs_dense"] = max_err(ours, dense[0] if isinstance(dense, (tuple, list)) else dense)
    row["ref_max_abs"] = scale
    row["err_ok"] = bool(ours_err <= 2.0 * dense_err + 1e-6 * max(scale, 1.0))


def record_speed(row, dense_ms, ours_ms, flops):
    row["dense_ms"] = dense_ms
    row["ours_ms"] = ours_ms
    row["speedup"] = dense_ms / ours_ms if ours_ms > 0 else float("nan")
    row["tflops"] = flops / (ours_ms * 1e9) if ours_ms > 0 else float("nan")


def graph_replay(torch, fn):
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


def record_graph_times(row, ctx, dense_fn, ours_fn, replay=None):
    """For small token counts (``--graphs``), also times dense and ours as CUDA-graph replays:
    at N <= 16 an eager call is dominated by Python dispatch, a replay shows the kernels. A
    failed capture is recorded and turns graphs off for the rest of the process."""
    torch, dev = ctx["torch"], ctx["device"]
    if (dev.type != "cuda" or ctx.get("graphs_off") or ctx.get("graph_max_tokens", 0) <= 0
            or row["tokens"] > ctx["graph_max_tokens"]):
        return
    replay = replay or graph_replay
    try:
        replays = [replay(torch, dense_fn), replay(torch, ours_fn)]
        dense_ms, ours_ms = ctx["timer"](replays)
        row.update(dense_graph_ms=dense_ms, ours_graph_ms=ours_ms, speedup_graph=dense_ms / ours_ms)
    except Exception as exc:  # noqa: BLE001  e.g. an op that synchronises cannot be captured
        row["graph_error"] = short(exc)
        ctx["graphs_off"] = True
        torch.cuda.synchronize(dev)   # raises (and the family stops) if the context is broken


class WeightCache:
    """One pruned weight per key, built once and reused across dtypes and token counts."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, key, build):
        if key != self.key:
            self.key, self.value = None, None  # free the old one first
            self.value, self.key = build(), key
        return self.value


def correctness(rows, label):
    """A target over a family's measured rows: ours within 2x of the dense op's error vs fp64."""
    checked = [r for r in rows if "err_ok" in r and not r.get("error")]
    if not checked:
        return []
    bad = [r for r in checked if r["err_ok"] is False]
    ok = len(checked) - len(bad)
    name = (f"correctness, outputs within 2x of the dense op's error vs fp64 ({ok}/{len(checked)})"
            + (": CHECK " + "; ".join(label(r) for r in bad[:4]) if bad else ""))
    return [Target(name, ok / len(checked), ">= 100%", not bad, "{:.0%}")]

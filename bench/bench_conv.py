"""Sparse conv benchmark: our sparse_conv2d vs F.conv2d, and whole MobileNets vs the folded dense model.

NCHW, batch 1, 224x224 inputs, fp32, all threads; ours and dense timed interleaved in one process
(bench/common.py), medians, both under torch.inference_mode() (deployment). ``gflops`` is the effective rate: dense FLOPs / our time.

    python -m bench.bench_conv            # quick subset
    python -m bench.bench_conv --full     # every 1x1 layer of MobileNetV1/V2 at 70% and 90%, both
                                          # networks end to end, 3x3 layers at 90%
"""
import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

import sparse_ext
from sparse_ext import ops
from sparse_ext.formats import CSRWeight
from sparse_ext.prune import build_mask

from .common import geomean, interleaved_median_ms, machine_info
from .table import MS, PERCENT, SPEEDUP, Column, render, text
from .mobilenets import (MobileNetV1, MobileNetV2, folded, pointwise_layers, sparsify_pointwise)

FAMILY = "conv"

TARGET_1X1 = {0.9: 3.0, 0.7: 1.5}
TARGET_NET = {"mobilenet_v1": 1.8, "mobilenet_v2": 1.5}


def _layer_row(name, ci, co, h, w, k, stride, pad, sparsity, pattern, reps, activation="relu"):
    torch.manual_seed(0)
    conv = nn.Conv2d(ci, co, k, stride, pad)
    mask = build_mask(conv.weight.detach().reshape(co, -1), sparsity, pattern)
    sparse = sparse_ext.SparseConv2d.from_dense(conv, mask=mask, pattern=pattern,
                                                activation=activation)
    wd = sparse.dense_weight()
    bias = conv.bias.detach()
    x = torch.randn(1, ci, h, w)
    dense_act = F.relu if activation == "relu" else (lambda t: t)

    def dense():
        return dense_act(F.conv2d(x, wd, bias, stride, pad))

    with torch.inference_mode():
        dense_ms, ours_ms = interleaved_median_ms([dense, lambda: sparse(x)], reps=reps)
    oh = (h + 2 * pad - k) // stride + 1
    ow = (w + 2 * pad - k) // stride + 1
    flops = 2.0 * ci * co * k * k * oh * ow
    row = {"family": FAMILY, "shape": f"{name} {ci}x{co} {h}x{w}" + (f" k{k}s{stride}" if k > 1 else ""),
           "pattern": pattern, "sparsity": sparsity, "tokens": oh * ow, "dense_ms": dense_ms,
           "ours_ms": ours_ms, "speedup": dense_ms / ours_ms, "gflops": flops / ours_ms / 1e6}
    if k == 1 and sparsity in TARGET_1X1:
        row["target"] = TARGET_1X1[sparsity]
    return row


def _unique_pointwise(model_cls, tag):
    seen, out = {}, []
    for name, conv, h, w in pointwise_layers(model_cls()):
        key = (conv.in_channels, conv.out_channels, h, w)
        if key in seen:
            seen[key].append(name)
            continue
        seen[key] = [name]
        out.append((f"{tag}-{name}", key))
    return out, seen


def _time_network(model_cls, tag, sparsity, reps):
    torch.manual_seed(0)
    dense = folded(model_cls())
    sparse = sparsify_pointwise(dense, sparsity)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        err = (sparse(x) - sparsify_dense_reference(sparse, dense)(x)).abs().max().item()
        dense_ms, ours_ms = interleaved_median_ms([lambda: dense(x), lambda: sparse(x)], reps=reps)
        # Where the dense time goes: 1x1, depthwise, rest (per-layer hooks, one timed pass).
        shares = _time_shares(dense, x)
    flops = _network_flops(dense)
    return {"family": FAMILY, "shape": f"{tag} end-to-end 224x224 (BN folded, 1x1 at {sparsity:.0%})",
            "pattern": "unstructured", "sparsity": sparsity, "tokens": 224 * 224,
            "dense_ms": dense_ms, "ours_ms": ours_ms, "speedup": dense_ms / ours_ms,
            "gflops": flops / ours_ms / 1e6, "target": TARGET_NET[tag], "max_abs_err": err,
            "dense_share": shares}


def sparsify_dense_reference(sparse, dense):
    """The dense model with each sparse layer's masked weight (checks the sparse model's output)."""
    ref = copy.deepcopy(dense)
    sparse_modules = dict(sparse.named_modules())
    with torch.no_grad():
        for name, m in ref.named_modules():
            s = sparse_modules.get(name)
            if isinstance(s, sparse_ext.SparseConv2d):
                m.weight.copy_(s.dense_weight())
    return ref


def _network_flops(model):
    flops = [0.0]
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                flops[0] += 2.0 * k * out.numel()
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return flops[0]


def _time_shares(model, x, reps=5):
    import time
    acc = {"1x1": 0.0, "depthwise": 0.0, "other conv": 0.0}
    starts = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            kind = ("depthwise" if m.groups > 1 else "1x1" if m.kernel_size == (1, 1) else "other conv")
            hooks.append(m.register_forward_pre_hook(lambda mod, inp: starts.__setitem__(id(mod), time.perf_counter())))
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, kind=kind: acc.__setitem__(kind, acc[kind] + time.perf_counter() - starts[id(mod)])))
    total = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        total += time.perf_counter() - t0
    for h in hooks:
        h.remove()
    shares = {k: v / total for k, v in acc.items()}
    shares["rest (activations, adds, pool, fc)"] = max(0.0, 1.0 - sum(shares.values()))
    return shares


def cases(quick):
    """(label, callable(reps) -> row) in run order."""
    out = []
    if quick:
        picks = [("mbv1-pw7", (512, 512, 14, 14)), ("mbv1-pw3", (128, 128, 56, 56)),
                 ("mbv1-pw13", (1024, 1024, 7, 7)), ("mbv2-expand", (24, 144, 56, 56))]
        for name, (ci, co, h, w) in picks:
            for sp in (0.9, 0.7):
                out.append((f"{name} {sp}", lambda reps, a=(name, ci, co, h, w, 1, 1, 0, sp): _layer_row(*a, "unstructured", reps)))
        out.append(("3x3 90%", lambda reps: _layer_row("3x3", 128, 128, 56, 56, 3, 1, 1, 0.9, "unstructured", reps)))
        out.append(("mobilenet_v1 e2e", lambda reps: _time_network(MobileNetV1, "mobilenet_v1", 0.9, max(5, reps // 2))))
        return out
    for cls, tag in ((MobileNetV1, "mbv1"), (MobileNetV2, "mbv2")):
        layers, _ = _unique_pointwise(cls, tag)
        for name, (ci, co, h, w) in layers:
            for sp in (0.9, 0.7):
                out.append((f"{name} {sp}", lambda reps, a=(name, ci, co, h, w, 1, 1, 0, sp): _layer_row(*a, "unstructured", reps)))
    # Output-channel blocks (NR = 4) on one layer, the group-sparsity option.
    out.append(("mbv1 512 4x1", lambda reps: _layer_row("mbv1-pw7", 512, 512, 14, 14, 1, 1, 0, 0.9, "4x1", reps)))
    out.append(("3x3 90%", lambda reps: _layer_row("3x3", 128, 128, 56, 56, 3, 1, 1, 0.9, "unstructured", reps)))
    out.append(("3x3 s2 90%", lambda reps: _layer_row("3x3", 256, 256, 28, 28, 3, 2, 1, 0.9, "unstructured", reps)))
    out.append(("mbv1-stem 3x3 90%", lambda reps: _layer_row("mbv1-stem", 3, 32, 224, 224, 3, 2, 1, 0.9, "unstructured", reps)))
    out.append(("mobilenet_v1 e2e", lambda reps: _time_network(MobileNetV1, "mobilenet_v1", 0.9, max(10, reps // 2))))
    out.append(("mobilenet_v2 e2e", lambda reps: _time_network(MobileNetV2, "mobilenet_v2", 0.9, max(10, reps // 2))))
    return out


def run(args, progress=lambda s: None):
    reps = int(getattr(args, "reps", 0) or (10 if args.quick else 20))
    rows = []
    for label, fn in cases(bool(args.quick)):
        progress(label)
        rows.append(fn(reps))
    return rows


def _target_mark(row):
    t = row.get("target")
    return None if t is None else f">= {t:.1f}x " + ("met" if row["speedup"] >= t else "MISS")


TABLE = [text("layer", "shape", 56), text("pattern", "pattern"), Column("sparsity", "sparsity", PERCENT),
         Column("dense ms", "dense_ms", MS), Column("ours ms", "ours_ms", MS), Column("speedup", "speedup", SPEEDUP),
         text("target", _target_mark), Column("GFLOP/s", "gflops", "{:.1f}")]


def format_table(rows):
    lines = [render(rows, TABLE)]
    for r in rows:
        if "dense_share" in r:
            shares = ", ".join(f"{k} {v:.0%}" for k, v in r["dense_share"].items())
            one_x_one = r["dense_share"]["1x1"]
            lines.append(f"{r['shape'].split()[0]}: dense time split: {shares}; with 1x1 convs free the "
                         f"end-to-end bound is {1 / max(1e-9, 1 - one_x_one):.2f}x (max abs err vs masked "
                         f"dense {r['max_abs_err']:.2e})")
    pw = [r for r in rows if r.get("target") and "end-to-end" not in r["shape"]]
    for sp in (0.9, 0.7):
        sel = [r["speedup"] for r in pw if r["sparsity"] == sp and r["pattern"] == "unstructured"]
        if sel:
            lines.append(f"1x1 layers at {sp:.0%}: geomean {geomean(sel):.2f}x, min {min(sel):.2f}x, "
                         f"{sum(s >= TARGET_1X1[sp] for s in sel)}/{len(sel)} meet >= {TARGET_1X1[sp]}x")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every MobileNet 1x1 layer and both networks")
    parser.add_argument("--reps", type=int, default=0)
    parser.add_argument("--json", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: all)")
    a = parser.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.quick = not a.full
    info = machine_info()
    print(f"# {info['cpu']}, {info['threads']} threads, isa {info['isa']}, torch {info['torch']}",
          file=sys.stderr)
    rows = run(a, lambda s: print(f"  .. {s}", file=sys.stderr, flush=True))
    print(format_table(rows))
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

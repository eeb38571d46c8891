"""Sparse conv: SparseConv2d vs F.conv2d (cuDNN on CUDA), and MobileNets end to end vs dense.

CPU: NCHW, batch 1, 224x224 inputs, fp32, both under torch.inference_mode() (deployment);
``gflops`` is the effective rate: dense FLOPs / our time. --full: every 1x1 layer of MobileNetV1/V2
at 70% and 90%, both networks end to end, 3x3 layers at 90%.
CUDA: MobileNet 1x1 layers and one 3x3 layer at batch 32 vs cuDNN with the masked dense weight
(NCHW like ours; NHWC also timed, reported in the JSON), MobileNetV1 end to end.
"""
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import sparse_ext
from sparse_ext.prune import build_mask

from bench.common import geomean, short_dtype
from bench.core.accuracy import correctness, record_errors, record_speed
from bench.core.targets import check, report
from bench.core.timer import Timer
from bench.families.mobilenets import (MobileNetV1, MobileNetV2, folded, pointwise_layers,
                                       sparsify_pointwise)
from bench.table import MS, PERCENT, SPEEDUP, Column, text

NAME = "conv"
FAMILY = NAME
TITLE = "Sparse conv: SparseConv2d vs F.conv2d, and whole MobileNets vs the folded dense model"
DEVICES = ("cpu", "cuda")
BASELINES = {
    "cpu": "dense: F.conv2d + ReLU with the masked dense weight; end to end: the dense folded model.",
    "cuda": "dense: cuDNN F.conv2d + ReLU with the masked dense weight, NCHW like ours (end to end: "
            "the dense folded MobileNetV1); dense_channels_last_ms in the JSON: the same on NHWC.",
}
COLUMNS = [text("layer", "shape", 48), text("pattern", "pattern"), text("dtype", "dtype"),
           Column("batch", "batch"), Column("sparsity", "sparsity", PERCENT),
           Column("dense ms", "dense_ms", MS), Column("ours ms", "ours_ms", MS),
           Column("speedup", "speedup", SPEEDUP), Column("GFLOP/s", "gflops", "{:.1f}"),
           Column("max err", "max_abs_err", "{:.0e}")]


def label(row):
    if row.get("kind") == "layer":        # a CUDA case: its layer's name
        k, stride = row["conv"][4:6]
        name = row["name"] + (f" k{k}s{stride}" if k > 1 else "")
    elif row.get("kind"):
        name = f"{row['name']} e2e"
    else:
        name = row["shape"].split(" (")[0]
        if "end-to-end" in name:
            name = name.split(" end-to-end")[0] + " e2e"
    dtype = "" if row.get("dtype", "float32") == "float32" else f" {short_dtype(row['dtype'])}"
    return f"{name} {row['sparsity']:.0%}{dtype}"


TARGET_1X1 = {0.9: 3.0, 0.7: 1.5}
TARGET_NET = {"mobilenet_v1": 1.8, "mobilenet_v2": 1.5}


def _layer_row(timer, name, ci, co, h, w, k, stride, pad, sparsity, pattern, reps, activation="relu"):
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
        dense_ms, ours_ms = timer([dense, lambda: sparse(x)], reps=reps)
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


def _time_network(timer, model_cls, tag, sparsity, reps):
    torch.manual_seed(0)
    dense = folded(model_cls())
    sparse = sparsify_pointwise(dense, sparsity)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        err = (sparse(x) - sparsify_dense_reference(sparse, dense)(x)).abs().max().item()
        dense_ms, ours_ms = timer([lambda: dense(x), lambda: sparse(x)], reps=reps)
        # Where the dense time goes: 1x1, depthwise, rest (per-layer hooks, one timed pass).
        shares = _time_shares(dense, x)
    flops = _network_flops(dense)
    return {"family": FAMILY, "shape": f"{tag} end-to-end 224x224 (BN folded)",
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
    """(label, callable(timer, reps) -> row) in run order."""
    out = []

    def layer(name, *a):
        out.append((name, lambda timer, reps: _layer_row(timer, *a, reps)))

    def network(name, cls, tag, min_reps):
        out.append((name, lambda timer, reps: _time_network(timer, cls, tag, 0.9,
                                                             max(min_reps, reps // 2))))
    if quick:
        picks = [("mbv1-pw7", (512, 512, 14, 14)), ("mbv1-pw3", (128, 128, 56, 56)),
                 ("mbv1-pw13", (1024, 1024, 7, 7)), ("mbv2-expand", (24, 144, 56, 56))]
        for name, (ci, co, h, w) in picks:
            for sp in (0.9, 0.7):
                layer(f"{name} {sp}", name, ci, co, h, w, 1, 1, 0, sp, "unstructured")
        layer("3x3 90%", "3x3", 128, 128, 56, 56, 3, 1, 1, 0.9, "unstructured")
        network("mobilenet_v1 e2e", MobileNetV1, "mobilenet_v1", 5)
        return out
    for cls, tag in ((MobileNetV1, "mbv1"), (MobileNetV2, "mbv2")):
        layers, _ = _unique_pointwise(cls, tag)
        for name, (ci, co, h, w) in layers:
            for sp in (0.9, 0.7):
                layer(f"{name} {sp}", name, ci, co, h, w, 1, 1, 0, sp, "unstructured")
    # Output-channel blocks (NR = 4) on one layer, the group-sparsity option.
    layer("mbv1 512 4x1", "mbv1-pw7", 512, 512, 14, 14, 1, 1, 0, 0.9, "4x1")
    layer("3x3 90%", "3x3", 128, 128, 56, 56, 3, 1, 1, 0.9, "unstructured")
    layer("3x3 s2 90%", "3x3", 256, 256, 28, 28, 3, 2, 1, 0.9, "unstructured")
    layer("mbv1-stem 3x3 90%", "mbv1-stem", 3, 32, 224, 224, 3, 2, 1, 0.9, "unstructured")
    network("mobilenet_v1 e2e", MobileNetV1, "mobilenet_v1", 10)
    network("mobilenet_v2 e2e", MobileNetV2, "mobilenet_v2", 10)
    return out


def run(args, progress=lambda s: None, timer=None):
    """The CPU suite's rows."""
    timer = timer or Timer("cpu", warmup=3)
    reps = int(getattr(args, "reps", 0) or (10 if args.quick else 20))
    rows = []
    for name, fn in cases(bool(args.quick)):
        progress(name)
        rows.append(fn(timer, reps))
    return rows


def targets(rows, device="cpu"):
    ok = [r for r in rows if r.get("speedup") is not None and not r.get("error")]
    if device.startswith("cuda"):
        return _cuda_targets(ok)
    out = []
    pointwise = [r for r in ok if r.get("target") and "end-to-end" not in r["shape"]
                 and r["pattern"] == "unstructured"]
    for sp, goal in TARGET_1X1.items():
        s = [r["speedup"] for r in pointwise if r["sparsity"] == sp]
        if s:
            out.append(check(f"1x1 layers at {sp:.0%}, worst of {len(s)} "
                             f"({sum(v >= goal for v in s)} met, geomean {geomean(s):.2f}x)",
                             min(s), ">=", goal))
    for r in ok:
        if "end-to-end" in r["shape"] and r.get("target"):
            out.append(check(f"{r['shape'].split()[0]} end to end", r["speedup"], ">=", r["target"]))
    return out


# ---- CUDA ----------------------------------------------------------------------------------------
# MobileNet 1x1 layers (name, in, out, H, W) at batch 32, and 3x3 layers (implicit im2col).
CUDA_1X1 = [("mbv1-pw3", 128, 128, 56, 56), ("mbv1-pw7", 512, 512, 14, 14),
            ("mbv1-pw13", 1024, 1024, 7, 7), ("mbv2-expand", 24, 144, 56, 56)]
CUDA_1X1_FULL = CUDA_1X1 + [("mbv1-pw1", 32, 64, 112, 112), ("mbv2-project", 144, 24, 56, 56),
                            ("mbv2-last", 320, 1280, 7, 7)]
CUDA_3X3 = [("3x3", 128, 128, 56, 56, 3, 1, 1)]
CUDA_SIZES = {
    "tiny": dict(layers=[("tiny-pw", 16, 32, 8, 8)], conv3=[("tiny-3x3", 8, 8, 8, 8, 3, 1, 1)],
                 sparsities=[0.9], dtypes=["float32"], batch=2, e2e=dict(batch=1, image=32)),
    "quick": dict(layers=CUDA_1X1[1:2], conv3=CUDA_3X3, sparsities=[0.9], dtypes=["float16"],
                  batch=32, e2e=dict(batch=32, image=224)),
    "default": dict(layers=CUDA_1X1, conv3=CUDA_3X3, sparsities=[0.9, 0.7], dtypes=["float16"],
                    batch=32, e2e=dict(batch=32, image=224)),
    "full": dict(layers=CUDA_1X1_FULL, conv3=CUDA_3X3 + [("3x3-s2", 256, 256, 28, 28, 3, 2, 1)],
                 sparsities=[0.9, 0.7], dtypes=["float16", "float32"], batch=32,
                 e2e=dict(batch=32, image=224)),
}


def cuda_cases(size, shapes=None, tokens=None, sparsities=None, dtypes=None):
    p = CUDA_SIZES[size]
    cases = []
    for dt in p["dtypes"]:
        if dtypes and dt not in dtypes:
            continue
        for name, ci, co, h, w in p["layers"]:
            cases += [dict(family=NAME, kind="layer", name=name, conv=[ci, co, h, w, 1, 1, 0],
                           sparsity=sp, dtype=dt, batch=p["batch"])
                      for sp in sparsities or p["sparsities"]]
        for name, ci, co, h, w, k, s, pad in p["conv3"]:
            cases.append(dict(family=NAME, kind="layer", name=name, conv=[ci, co, h, w, k, s, pad],
                              sparsity=0.9, dtype=dt, batch=p["batch"]))
        e2e = p.get("e2e")
        if e2e:
            cases.append(dict(family=NAME, kind="mobilenet_v1", name="mobilenet_v1", sparsity=0.9,
                              dtype=dt, batch=e2e["batch"], image=e2e["image"]))
    return cases


def measure_cuda(case, ctx):
    if case["kind"] == "mobilenet_v1":
        return _measure_mobilenet(case, ctx)
    dev, timer = ctx["device"], ctx["timer"]
    ci, co, h, w, k, s, pad = case["conv"]
    dt = getattr(torch, case["dtype"])
    torch.manual_seed(0)
    conv = nn.Conv2d(ci, co, k, s, pad)
    mask = build_mask(conv.weight.detach().reshape(co, -1), case["sparsity"], "unstructured")
    sparse = sparse_ext.SparseConv2d.from_dense(conv, mask=mask, activation="relu")
    wd = sparse.dense_weight().to(device=dev, dtype=dt)   # before moving: to_dense runs on CPU
    bias = conv.bias.detach().to(device=dev, dtype=dt)
    sparse = sparse.to(device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(case["batch"], ci, h, w, device=dev, dtype=dt)
    oh, ow = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    row = dict(case, shape=_cuda_layer_name(case), pattern="unstructured",
               tokens=case["batch"] * oh * ow)
    with torch.no_grad():
        ref = F.relu(F.conv2d(x.double(), wd.double(), bias.double(), s, pad))
        record_errors(row, sparse(x), F.relu(F.conv2d(x, wd, bias, s, pad)), ref)
        # cuDNN also on channels_last (NHWC) tensors, its fastest layout for fp16 (report only).
        x_cl = x.contiguous(memory_format=torch.channels_last)
        wd_cl = wd.contiguous(memory_format=torch.channels_last)
        times = timer([lambda: F.relu(F.conv2d(x, wd, bias, s, pad)), lambda: sparse(x),
                       lambda: F.relu(F.conv2d(x_cl, wd_cl, bias, s, pad))])
    record_speed(row, times[0], times[1], 2.0 * ci * co * k * k * oh * ow * case["batch"])
    row["dense_channels_last_ms"] = times[2]
    return row


def _measure_mobilenet(case, ctx):
    dev, timer = ctx["device"], ctx["timer"]
    dt = getattr(torch, case["dtype"])
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
    row = dict(case, shape=f"mobilenet_v1 end-to-end {img}x{img}",
               pattern="unstructured", tokens=case["batch"] * img * img)
    with torch.no_grad():
        ref = ref_model(x.double())
        record_errors(row, sparse(x), masked(x), ref)
        del ref_model, ref
        times = timer([lambda: dense(x), lambda: sparse(x), lambda: masked(x)])
    flops = 2.0 * 569e6 * case["batch"] * (img / 224) ** 2   # MobileNetV1-1.0: 569 MMACs at 224
    record_speed(row, times[0], times[1], flops)
    row["masked_dense_ms"] = times[2]
    return row


def _cuda_layer_name(case):
    ci, co, h, w, k, s, _ = case["conv"]
    return f"{case['name']} {ci}->{co} {h}x{w}" + (f" k{k}s{s}" if k > 1 else "")


def fake_extras(case, dense_ms, ours_ms):
    name = _cuda_layer_name(case) if case["kind"] == "layer" else "mobilenet_v1 end-to-end"
    return dict(shape=name, pattern="unstructured")


def _cuda_targets(ok):
    out = []
    for sp in (0.9, 0.7):
        s = [r["speedup"] for r in ok if r.get("kind") == "layer" and r["conv"][4] == 1
             and abs(r["sparsity"] - sp) < 1e-9]
        if s:
            out.append(report(f"1x1 at {sp:.0%}, geomean over cuDNN (worst {min(s):.2f}x)",
                              geomean(s)))
    for r in ok:
        if r.get("kind") == "mobilenet_v1":
            out.append(report(f"MobileNetV1 {r['dtype']} batch {r['batch']} end to end",
                              r["speedup"]))
    return out + correctness(ok, label)

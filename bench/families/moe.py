"""MoE layer: our MoELayer vs HF MixtralSparseMoeBlock and the zero-overhead floor.

CPU shape: hidden 1024, ffn 2816, 8 experts, top-2, SwiGLU, fp32, all cores.
  baseline  HF ``MixtralSparseMoeBlock`` on the same weights, the faster of its expert
            implementations at each T: ``eager`` (per-expert loop) and ``grouped_mm``
            (torch._grouped_mm over all experts), both timed; or the pure-torch per-expert loop
            below when transformers is absent.
  floor     each touched expert's dense MLP (F.linear, silu * up, F.linear) on its own
            pre-gathered tokens: no routing, no permute, no combine.
  gbps      touched expert weight bytes / our time (decode is bandwidth-bound).
  bf16      our layer with bf16 expert weights, as a speedup over our fp32 layer.
CUDA: the same layer at bf16 / fp32 vs HF's eager loop, the floor, and equal-FLOP dense GEMMs.
"""
import copy

import torch
import torch.nn.functional as F

from bench.common import short_dtype
from bench.core.accuracy import correctness, record_errors, record_speed
from bench.core.targets import check
from bench.core.timer import Timer
from bench.table import MS, SPEEDUP, Column, text

NAME = "moe"
FAMILY = NAME
TITLE = "MoE layer vs HF's Mixtral block (same weights) and the per-expert floor"
DEVICES = ("cpu", "cuda")
BASELINES = {
    "cpu": "dense: the faster of HF MixtralSparseMoeBlock's eager and grouped_mm expert "
           "implementations (baseline column); floor: each touched expert's dense MLP on its own "
           "tokens.",
    "cuda": "dense: HF MixtralSparseMoeBlock's eager loop (baseline column); floor: each touched "
            "expert's dense MLP on its own tokens; vs GEMM: equal-FLOP dense GEMMs / ours.",
}
COLUMNS = [text("dtype", "dtype"), Column("T", "tokens"), text("baseline", "baseline"),
           Column("base ms", "dense_ms", MS), Column("ours ms", "ours_ms", MS),
           Column("speedup", "speedup", SPEEDUP), Column("vs floor", "vs_floor", "{:.2f}"),
           Column("GB/s", "gbps", "{:.0f}"), Column("bf16 vs fp32", "bf16_speedup_vs_fp32", SPEEDUP),
           Column("vs GEMM", "vs_dense_gemm", "{:.0%}"), Column("max err", "max_abs_err", "{:.0e}")]


def label(row):
    dtype = "" if row.get("dtype", "float32") == "float32" else f" {short_dtype(row['dtype'])}"
    return f"T={row['tokens']}{dtype}"

H, FF, E, K = 1024, 2816, 8, 2
QUICK_TOKENS = (1, 32, 512)
FULL_TOKENS = (1, 32, 512, 2048)
READ_BW_GBS = 30.0  # the AVX2 reference machine's measured memory read bandwidth


HF_IMPLEMENTATIONS = ("eager", "grouped_mm")


def _hf_blocks(seed=0):
    """{implementation: MixtralSparseMoeBlock} with the same weights, for each expert
    implementation this transformers and torch can run on the CPU; {} without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001  transformers is an optional bench/test extra
        return {}
    blocks = {}
    for impl in HF_IMPLEMENTATIONS:
        cfg = MixtralConfig(hidden_size=H, intermediate_size=FF, num_local_experts=E,
                            num_experts_per_tok=K)
        cfg._experts_implementation = impl
        torch.manual_seed(seed)
        block = MixtralSparseMoeBlock(cfg).eval()
        with torch.no_grad():
            if blocks:
                block.load_state_dict(next(iter(blocks.values())).state_dict())
            else:
                for p in block.parameters():
                    p.normal_(0.0, 0.02)
            try:
                block(torch.randn(1, 3, H))
            except Exception:  # noqa: BLE001  an implementation this torch lacks on CPU
                continue
        blocks[impl] = block
    return blocks


def _torch_loop(layer):
    """Pure-torch per-expert loop on the layer's weights (the baseline without transformers)."""
    def run(x2):
        logits = F.linear(x2, layer.router.weight)
        probs = torch.softmax(logits.float(), -1)
        w, idx = torch.topk(probs, layer.top_k, -1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x2)
        for e in range(layer.num_experts):
            t, j = torch.where(idx == e)
            if t.numel() == 0:
                continue
            gu = F.linear(x2[t], layer.w1[e])
            g, u = gu.chunk(2, -1)
            y = F.linear(F.silu(g) * u, layer.w2[e]) * w[t, j, None]
            out.index_add_(0, t, y)
        return out
    return run


def _floor_fn(layer, x2):
    """Each touched expert's dense MLP on pre-gathered tokens (the zero-overhead floor)."""
    with torch.no_grad():
        _, _, idx = layer.route(x2)
    segs = []
    for e in range(layer.num_experts):
        t = (idx == e).any(-1).nonzero().flatten()
        if t.numel():
            segs.append((e, x2[t].contiguous()))
    w1, w2 = layer.w1, layer.w2

    def run():
        for e, xe in segs:
            g, u = F.linear(xe, w1[e]).chunk(2, -1)
            F.linear(F.silu(g) * u, w2[e])
    touched = len(segs)
    return run, touched


def run(args, progress=lambda desc: None, timer=None):
    """The CPU suite's rows."""
    import sparse_ext
    from sparse_ext import ops

    timer = timer or Timer("cpu", warmup=2)
    torch.manual_seed(0)
    blocks = _hf_blocks()
    if blocks:
        layer = sparse_ext.MoELayer.from_hf(next(iter(blocks.values()))).eval()
    else:
        layer = sparse_ext.MoELayer(H, FF, E, K).eval()
    layer_bf16 = sparse_ext.MoELayer(H, FF, E, K).eval()
    with torch.no_grad():
        layer_bf16.router.weight.copy_(layer.router.weight)
        layer_bf16.w1 = torch.nn.Parameter(layer.w1.detach().to(torch.bfloat16))
        layer_bf16.w2 = torch.nn.Parameter(layer.w2.detach().to(torch.bfloat16))
    loop = _torch_loop(layer)
    reps = max(3, int(getattr(args, "reps", 0) or 0)) if getattr(args, "reps", 0) else None
    tokens = getattr(args, "tokens", None) or (QUICK_TOKENS if getattr(args, "quick", False)
                                                else FULL_TOKENS)
    expert_bytes = (2 * FF * H + H * FF) * 4
    rows = []
    for T in tokens:
        torch.manual_seed(T)
        x = torch.randn(1, T, H)
        x2 = x.reshape(T, H)
        floor, touched = _floor_fn(layer, x2)
        with torch.no_grad():
            ours = lambda: layer(x)  # noqa: E731
            bases = {f"hf_mixtral/{impl}": (lambda b=b: b(x)) for impl, b in blocks.items()}
            if not bases:
                bases = {"torch_loop": lambda: loop(x2)}
            ours_bf16 = lambda: layer_bf16(x)  # noqa: E731
            quick = getattr(args, "quick", False)
            n = reps or (20 if T <= 32 else (5 if quick else 10) if T <= 512 else 4)
            fns = [ours, floor] + ([ours_bf16] if T <= 32 else []) + list(bases.values())
            times = timer(fns, reps=n)
            ours_ms, floor_ms = times[:2]
            base_times = dict(zip(bases, times[len(fns) - len(bases):]))
            baseline = min(base_times, key=base_times.get)
            base_ms = base_times[baseline]
            row = {
                "timer": "thread_cpu" if timer.clock == "thread" else "wall",
                "family": FAMILY, "shape": f"h{H}-f{FF}-e{E}-k{K}", "pattern": f"top-{K}",
                "sparsity": 1.0 - K / E, "tokens": T, "dtype": "float32", "baseline": baseline,
                "dense_ms": base_ms, "ours_ms": ours_ms, "speedup": base_ms / ours_ms,
                "gflops": 2.0 * T * K * 3 * H * FF / (ours_ms * 1e6),
                "floor_ms": floor_ms, "vs_floor": ours_ms / floor_ms,
                "touched_experts": touched,
                "gbps": touched * expert_bytes / (ours_ms * 1e6),
            }
            row.update({f"{name.split('/')[-1]}_ms": ms for name, ms in base_times.items()})
            if T <= 32:
                row["bf16_ms"] = times[2]
                row["bf16_speedup_vs_fp32"] = ours_ms / times[2]
                row["bf16_gbps"] = touched * expert_bytes / 2 / (times[2] * 1e6)
            if T == 512:
                row.update(_breakdown(timer, layer, x2, ops, n))
        rows.append(row)
        progress(f"moe T={T}: {row['speedup']:.2f}x vs {baseline}, {row['vs_floor']:.3f}x floor")
    return rows


def _breakdown(timer, layer, x2, ops, reps):
    """Routing (router GEMM + top-k), permute, expert MLPs and combine, timed separately."""
    logits, weights, idx = layer.route(x2)
    row_token, offsets, inverse = ops.moe_permute(idx, layer.num_experts, -1)
    y = ops.moe_expert_mlp(x2, row_token, offsets, layer.w1, layer.w2, "silu", True)
    fns = [
        lambda: layer.route(x2),
        lambda: ops.moe_permute(idx, layer.num_experts, -1),
        lambda: ops.moe_expert_mlp(x2, row_token, offsets, layer.w1, layer.w2, "silu", True),
        lambda: ops.moe_combine(y, weights, inverse),
        lambda: layer(x2),
    ]
    route_ms, permute_ms, experts_ms, combine_ms, total_ms = timer(fns, reps=reps)
    return {"route_ms": route_ms, "permute_ms": permute_ms, "experts_ms": experts_ms,
            "combine_ms": combine_ms, "layer_ms": total_ms,
            "overhead_frac": (route_ms + permute_ms + combine_ms) / total_ms}


def targets(rows, device="cpu"):
    ok = [r for r in rows if r.get("speedup") is not None and not r.get("error")]
    return _cuda_targets(ok) if device.startswith("cuda") else _cpu_targets(ok)


def _cpu_targets(rows):
    out = []
    for r in rows:
        T, name = r["tokens"], f"T={r['tokens']}"
        if T == 1:
            out.append(check(f"{name} speedup over HF", r["speedup"], ">=", 1.6))
        if T == 32:
            out.append(check(f"{name} speedup over HF", r["speedup"], ">=", 3.0))
        if T in (1, 32):
            out.append(check(f"{name} share of the read bandwidth ({READ_BW_GBS:.0f} GB/s)",
                             r["gbps"] / READ_BW_GBS, ">=", 0.75, "{:.0%}"))
            if "bf16_speedup_vs_fp32" in r:
                out.append(check(f"{name} bf16 over fp32", r["bf16_speedup_vs_fp32"], ">=", 1.6))
        if T >= 512:
            out.append(check(f"{name} speedup over HF", r["speedup"], ">=", 1.15))
            out.append(check(f"{name} time vs the floor", r["vs_floor"], "<=", 1.05, "{:.2f}"))
        if "overhead_frac" in r:
            out.append(check(f"{name} routing + permute + combine share", r["overhead_frac"], "<=",
                             0.10, "{:.0%}"))
    return out


# ---- CUDA ----------------------------------------------------------------------------------------
SHAPE = dict(hidden=H, ffn=FF, experts=E, top_k=K)
CUDA_SIZES = {
    "tiny": dict(hidden=32, ffn=48, experts=4, top_k=2, tokens=[1, 8], dtypes=["float32"],
                 prefill_from=8),
    "quick": dict(SHAPE, tokens=[1, 32, 2048], dtypes=["bfloat16"], prefill_from=512),
    "default": dict(SHAPE, tokens=[1, 32, 512, 2048], dtypes=["bfloat16", "float32"],
                    prefill_from=512),
    "full": dict(SHAPE, tokens=[1, 8, 32, 128, 512, 2048, 4096],
                 dtypes=["bfloat16", "float16", "float32"], prefill_from=512),
}
CUDA_DECODE_OVER_HF, CUDA_PREFILL_OF_GEMM = 3.0, 0.7


def cuda_cases(size, shapes=None, tokens=None, sparsities=None, dtypes=None):
    p = CUDA_SIZES[size]
    return [dict(family=NAME, hidden=p["hidden"], ffn=p["ffn"], experts=p["experts"],
                 top_k=p["top_k"], tokens=t, dtype=dt, prefill=t >= p["prefill_from"])
            for dt in p["dtypes"] if not dtypes or dt in dtypes for t in tokens or p["tokens"]]


def _hf_eager_block(H_, FF_, E_, K_):
    """HF MixtralSparseMoeBlock with its eager per-expert loop, or None without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception:  # noqa: BLE001  transformers is optional
        return None
    cfg = MixtralConfig(hidden_size=H_, intermediate_size=FF_, num_local_experts=E_,
                        num_experts_per_tok=K_)
    cfg._experts_implementation = "eager"   # the per-expert loop users run, not a fused kernel
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def measure_cuda(case, ctx, hf_block=None):
    import sparse_ext as se

    dev, timer = ctx["device"], ctx["timer"]
    hf_block = hf_block or _hf_eager_block
    H_, FF_, E_, K_, T = case["hidden"], case["ffn"], case["experts"], case["top_k"], case["tokens"]
    dt = getattr(torch, case["dtype"])
    key = (NAME, H_, FF_, E_, K_)

    def build():
        block = hf_block(H_, FF_, E_, K_)
        if block is None:
            torch.manual_seed(0)
            return None, se.MoELayer(H_, FF_, E_, K_).eval()
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
        # transformers missing: _torch_loop is a faithful local copy of HF's eager per-expert
        # loop (route, then for each expert: gather its tokens, SwiGLU MLP, index_add).
        loop = _torch_loop(layer)
        base, baseline = (lambda: loop(x[0])), "torch_loop"
    torch.manual_seed(T)
    x = torch.randn(1, T, H_, device=dev, dtype=dt)
    x2 = x.reshape(T, H_)
    row = dict(case, shape=f"h{H_}-f{FF_}-e{E_}-k{K_}", pattern=f"top-{K_}",
               sparsity=1.0 - K_ / E_, baseline=baseline)
    with torch.no_grad():
        ref = (ref_block(x.double()) if ref_block is not None
               else _torch_loop(ref_layer)(x2.double()))
        ref = (ref[0] if isinstance(ref, (tuple, list)) else ref).reshape(T, H_)
        ours_out = layer(x).reshape(T, H_)
        base_out = base()
        base_out = (base_out[0] if isinstance(base_out, (tuple, list)) else base_out).reshape(T, H_)
        record_errors(row, ours_out, base_out, ref)
        del ours_out, base_out
        floor, touched = _floor_fn(layer, x2)
        # Equal-FLOP dense GEMMs: T*k rows through one [2F, H] and one [H, F] projection.
        xr = torch.randn(T * K_, H_, device=dev, dtype=dt)
        hr = torch.randn(T * K_, FF_, device=dev, dtype=dt)
        w1d, w2d = layer.w1[0].contiguous(), layer.w2[0].contiguous()
        gemm = lambda: (F.linear(xr, w1d), F.linear(hr, w2d))  # noqa: E731
        base_ms, ours_ms, floor_ms, gemm_ms = timer([base, lambda: layer(x), floor, gemm])
    record_speed(row, base_ms, ours_ms, 2.0 * T * K_ * 3 * H_ * FF_)
    expert_bytes = 3 * H_ * FF_ * torch.empty((), dtype=dt).element_size()
    row.update(floor_ms=floor_ms, vs_floor=ours_ms / floor_ms, touched_experts=touched,
               dense_gemm_ms=gemm_ms, vs_dense_gemm=gemm_ms / ours_ms,
               gbps=touched * expert_bytes / (ours_ms * 1e6))
    return row


def fake_extras(case, dense_ms, ours_ms):
    return dict(shape="moe", baseline="hf_mixtral_eager", floor_ms=ours_ms * 0.9,
                dense_gemm_ms=ours_ms * 0.8, vs_dense_gemm=0.8, vs_floor=1.1, gbps=1000.0)


def _cuda_targets(ok):
    out = []
    for dt in ("bfloat16", "float16", "float32"):
        sel = [r for r in ok if r["dtype"] == dt]
        dec = [r for r in sel if not r.get("prefill")]
        if dec:
            out.append(check(f"{dt} decode (T={','.join(str(r['tokens']) for r in dec)}), worst "
                             f"over {dec[0]['baseline']}", min(r["speedup"] for r in dec), ">=",
                             CUDA_DECODE_OVER_HF))
        pre = [r for r in sel if r.get("prefill")]
        if pre:
            out.append(check(f"{dt} prefill (T={','.join(str(r['tokens']) for r in pre)}), worst "
                             "share of equal-FLOP dense GEMM throughput",
                             min(r["vs_dense_gemm"] for r in pre), ">=", CUDA_PREFILL_OF_GEMM,
                             "{:.0%}"))
    return out + correctness(ok, label)

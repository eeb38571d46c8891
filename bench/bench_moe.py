"""MoE layer benchmark: our MoELayer vs HF MixtralSparseMoeBlock and the zero-overhead floor.

Shape (TARGETS.md): hidden 1024, ffn 2816, 8 experts, top-2, SwiGLU, fp32, all cores.
  baseline  HF ``MixtralSparseMoeBlock`` on the same weights, the faster of its expert
            implementations at each T: ``eager`` (per-expert loop) and ``grouped_mm``
            (torch._grouped_mm over all experts), both timed; or the pure-torch per-expert loop
            of python_tests/reference.py when transformers is absent.
  floor     each touched expert's dense MLP (F.linear, silu * up, F.linear) on its own
            pre-gathered tokens: no routing, no permute, no combine.
  gbps      touched expert weight bytes / our time (decode is bandwidth-bound).
  bf16      our layer with bf16 expert weights, as a speedup over our fp32 layer.
Run: ``python -m bench.bench_moe [--full] [--reps N]``.
"""
import argparse
import io
import sys

import torch
import torch.nn.functional as F

from .common import interleaved_median_ms, machine_info
from .table import MS, SPEEDUP, Column, render, text

_TIMER = {"cpu": False}


def _interleaved_cpu_ms(fns, reps=15, warmup=3):
    """Like interleaved_median_ms but with this thread's CPU time (only meaningful with one
    torch thread): on a shared, oversubscribed machine it removes the time spent descheduled."""
    import statistics
    import time

    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.thread_time()
            fn()
            times[i].append(time.thread_time() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def _timed(fns, reps, warmup=2):
    if _TIMER["cpu"]:
        return _interleaved_cpu_ms(fns, reps=reps, warmup=warmup)
    return interleaved_median_ms(fns, reps=reps, warmup=warmup)

FAMILY = "moe"
H, FF, E, K = 1024, 2816, 8, 2
QUICK_TOKENS = (1, 32, 512)
FULL_TOKENS = (1, 32, 512, 2048)
READ_BW_GBS = 30.0  # reference machine's measured memory read bandwidth (TARGETS.md)


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


def run(args, progress):
    import sparse_ext
    from sparse_ext import ops

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
    tokens = QUICK_TOKENS if getattr(args, "quick", False) else FULL_TOKENS
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
            times = _timed(fns, reps=n, warmup=2)
            ours_ms, floor_ms = times[:2]
            base_times = dict(zip(bases, times[len(fns) - len(bases):]))
            baseline = min(base_times, key=base_times.get)
            base_ms = base_times[baseline]
            row = {
                "timer": "thread_cpu" if _TIMER["cpu"] else "wall",
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
                row.update(_breakdown(layer, x2, ops, n))
        rows.append(row)
        progress(f"moe T={T}: {row['speedup']:.2f}x vs {baseline}, {row['vs_floor']:.3f}x floor")
    return rows


def _breakdown(layer, x2, ops, reps):
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
    route_ms, permute_ms, experts_ms, combine_ms, total_ms = _timed(fns, reps=reps)
    return {"route_ms": route_ms, "permute_ms": permute_ms, "experts_ms": experts_ms,
            "combine_ms": combine_ms, "layer_ms": total_ms,
            "overhead_frac": (route_ms + permute_ms + combine_ms) / total_ms}


def _verdict(ok):
    return "met" if ok else "MISS"


def _checks(r):
    T, checks = r["tokens"], []
    if T == 1:
        checks.append(f">=1.6x vs HF {_verdict(r['speedup'] >= 1.6)}")
    if T == 32:
        checks.append(f">=3x vs HF {_verdict(r['speedup'] >= 3.0)}")
    if T in (1, 32):
        checks.append(f"BW>=75% {_verdict(r['gbps'] >= 0.75 * READ_BW_GBS)}")
        if "bf16_speedup_vs_fp32" in r:
            checks.append(f"bf16>=1.6x {_verdict(r['bf16_speedup_vs_fp32'] >= 1.6)}")
    if T >= 512:
        checks.append(f">=1.15x vs HF {_verdict(r['speedup'] >= 1.15)}")
        checks.append(f"floor<=1.05 {_verdict(r['vs_floor'] <= 1.05)}")
    if "overhead_frac" in r:
        checks.append(f"overhead<=10% {_verdict(r['overhead_frac'] <= 0.10)}")
    return checks


def targets_report(rows):
    """One line per token count with the TARGETS.md checks (hook for bench/run.py)."""
    lines = []
    for r in rows:
        lines.append(f"moe T={r['tokens']}: {r['speedup']:.2f}x vs {r['baseline']}, "
                     f"{r['vs_floor']:.3f}x floor, {r['gbps']:.1f} GB/s: " + ", ".join(_checks(r)))
    return lines


TABLE = [Column("T", "tokens"), text("baseline (faster HF)", "baseline"),
         Column("eager ms", "eager_ms", MS), Column("grouped_mm ms", "grouped_mm_ms", MS),
         Column("ours ms", "ours_ms", MS), Column("floor ms", "floor_ms", MS),
         Column("speedup", "speedup", SPEEDUP), Column("vs floor", "vs_floor", "{:.3f}"),
         Column("GB/s", "gbps", "{:.1f}"), Column("GFLOP/s", "gflops", "{:.1f}"),
         Column("bf16 vs fp32", "bf16_speedup_vs_fp32", SPEEDUP),
         text("targets", lambda r: ", ".join(_checks(r)))]


def format_table(rows):
    out = io.StringIO()
    print_table(rows, out)
    return out.getvalue().rstrip()


def print_table(rows, out=sys.stdout):
    print(render(rows, TABLE), file=out)
    for r in rows:
        if "overhead_frac" in r:
            print(f"T={r['tokens']} breakdown: route {r['route_ms']:.3f} ms, permute "
                  f"{r['permute_ms']:.3f} ms, experts {r['experts_ms']:.3f} ms, combine "
                  f"{r['combine_ms']:.3f} ms, layer {r['layer_ms']:.3f} ms -> routing+permute+"
                  f"combine = {100 * r['overhead_frac']:.1f}%", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="include T=2048")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per case")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (default: all cores, as TARGETS.md specifies)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with thread CPU time (forces 1 thread; for loaded machines)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
        _TIMER["cpu"] = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.quick = not args.full
    info = machine_info()
    print(f"# {info['cpu']}, {info['threads']} threads, isa {info['isa']}, torch {info['torch']}")
    rows = run(args, lambda msg: print(msg, file=sys.stderr))
    if args.cpu_time:
        print("# times are thread CPU time medians (1 thread)")
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()

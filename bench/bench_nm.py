"""N:M semi-structured benchmark: ``torch.ops.sparse_ext.nm_linear`` vs dense ``F.linear``.

Both run in the same process on the same inputs, interleaved (bench.common), medians reported.
``python -m bench.bench_nm [--full] [--reps R] [--cache hot|cold]`` prints a table and the
TARGETS.md geomeans, hot and cold (bench.common.CACHE_HELP).
As a suite module: ``FAMILY`` and ``run(args, progress) -> list[dict]``.
"""
import argparse
import math

import torch
import torch.nn.functional as F

import sparse_ext as se
from bench.common import (CACHE_HELP, CACHE_MODES, cache_modes, cold_copies, copies_of, geomean,
                          interleaved_median_ms, machine_info, rotating)
from bench.table import SPEEDUP, Column, common_linear_columns, render

FAMILY = "nm"

FULL_SHAPES = [(4096, 4096), (11008, 4096)]
QUICK_SHAPES = [(4096, 4096)]
FULL_TOKENS = [1, 16, 64, 256]
QUICK_TOKENS = [1, 64]
FULL_PATTERNS = ["2:4", "1:4", "2:8", "1:8"]
QUICK_PATTERNS = ["2:4", "1:4", "1:8"]

# TARGETS.md: geomean speedup over the 8 (shape, tokens) points, per pattern.
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


def run(args, progress=lambda desc: None):
    """Times every (shape, pattern, tokens) case; returns one dict per case."""
    quick = bool(getattr(args, "quick", False))
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    tokens_list = QUICK_TOKENS if quick else FULL_TOKENS
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
                    dense_ms, ours_ms = interleaved_median_ms(
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
                dense_ms, fp32_ms, bf16_ms = interleaved_median_ms(
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


def summarize(rows):
    """Lines comparing geomeans with TARGETS.md."""
    lines = []
    main = [r for r in rows if r["family"] == FAMILY and r.get("dtype", "float32") == "float32"]
    for pattern, target in TARGETS.items():
        for cache in CACHE_MODES:
            sp = [r["speedup"] for r in main
                  if r["pattern"] == pattern and r.get("cache", "hot") == cache]
            if not sp:
                continue
            g = geomean(sp)
            lines.append(f"N:M {pattern} {cache}: geomean {g:.2f}x over {len(sp)} points "
                         f"(target >= {target}x) {'PASS' if g >= target else 'MISS'}")
    b24 = [r["weight_bytes_ratio"] for r in main if r["pattern"] == "2:4"]
    if b24:
        lines.append(f"N:M 2:4 weight bytes: {b24[0]:.3f}x dense fp32 (target <= {BYTES_TARGET_2_4}) "
                     f"{'PASS' if b24[0] <= BYTES_TARGET_2_4 else 'MISS'}")
    for r in rows:
        if r.get("vs_ours_fp32") is not None:
            v = r["vs_ours_fp32"]
            lines.append(f"N:M bf16 2:4 N=1 {r['shape']}: {v:.2f}x over our fp32 "
                         f"(target >= {BF16_TARGET}x) {'PASS' if v >= BF16_TARGET else 'MISS'}")
    return lines


targets_report = summarize  # the suite runner (bench/run.py) prints these


TABLE = common_linear_columns([Column("vs our fp32", "vs_ours_fp32", SPEEDUP),
                               Column("weight bytes", "weight_bytes_ratio", "{:.3f}x")])


def format_table(rows):
    return render(rows, TABLE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every shape, pattern and N")
    parser.add_argument("--reps", type=int, default=0, help="timed repetitions per case")
    parser.add_argument("--cache", nargs="+", choices=CACHE_MODES, help=CACHE_HELP)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both sides (default: all cores, as TARGETS.md)")
    args = parser.parse_args()
    args.quick = not args.full
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# {info['cpu']}, {info['threads']} threads, isa {info['isa']}, torch {info['torch']}")
    rows = run(args, lambda msg: print(msg, flush=True))
    print()
    print(format_table(rows))
    print()
    for line in summarize(rows):
        print(line)
    if not math.isfinite(geomean([r["speedup"] for r in rows])):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()

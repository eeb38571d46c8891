"""sparse_ext default benchmark suite: our kernels vs dense PyTorch in the same process.

Runs every family that is built (SpMM, N:M, sparse conv, MoE, and the MiniLM workload when its
optional model is installed), shows a progress bar on a terminal, prints one table per family and
a summary of the targets,
and writes JSON plus PNG plots of speedup vs sparsity with the machine recorded.

    bash scripts/bench.sh                         # quick default suite (a few minutes on 2 cores)
    bash scripts/bench.sh --full                  # every shape of the targets (docs/performance.md)
    bash scripts/bench.sh --families spmm,nm --sparsities 0.9 --tokens 1 64 --threads 2
"""
import argparse
import datetime
import importlib
import json
import os
import re
import sys
import textwrap

from bench.table import common_linear_columns, render

FAMILY_MODULES = {
    "spmm": "bench.bench_spmm",
    "nm": "bench.bench_nm",
    "conv": "bench.bench_conv",
    "moe": "bench.bench_moe",
    "minilm": "bench.bench_minilm",
}
DEFAULT_FAMILIES = ["spmm", "nm", "conv", "moe"]
TITLES = {
    "spmm": "SpMM: SparseLinear (unstructured, RxC blocks) vs dense F.linear and torch.sparse CSR",
    "nm": "N:M: SparseLinear(pattern='N:M') vs dense F.linear",
    "conv": "Sparse conv: SparseConv2d vs F.conv2d, and whole MobileNets vs the folded dense model",
    "moe": "MoE layer vs HF's Mixtral block (same weights) and the per-expert floor",
    "minilm": "MiniLM encoder, sparsified, vs the dense model",
}


def format_family(family, module, rows):
    """One family's table under its title; the family module declares its columns."""
    table = module.format_table(rows) if hasattr(module, "format_table") else \
        render(rows, common_linear_columns())
    return f"{TITLES.get(family, family)}\n{table}"


# One word per verdict: the family modules say met / ok / PASS or MISS / MISSED.
_VERDICTS = [(re.compile(r"\b(PASS|ok)\b"), "met"), (re.compile(r"\bMISSED\b"), "MISS")]


def uniform_verdicts(line):
    for pattern, word in _VERDICTS:
        line = pattern.sub(word, line)
    return line


def _plot(rows, path_prefix, machine):
    try:
        from bench.plot import plot
    except ImportError:
        print("matplotlib not installed: skipping plots")
        return []
    path = plot(rows, f"{path_prefix}.png", machine)
    return [path] if path else []


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                        help="comma-separated subset of: " + ", ".join(FAMILY_MODULES)
                        + " (default: %(default)s)")
    parser.add_argument("--full", action="store_true",
                        help="every shape and pattern of TARGETS.md (tens of minutes on 2 cores)")
    parser.add_argument("--shapes", nargs="+", metavar="OUTxIN",
                        help="linear weight shapes for spmm/nm, e.g. 4096x4096 11008x4096")
    parser.add_argument("--sparsities", nargs="+", type=float, metavar="S",
                        help="sparsities (fraction of zeros) for spmm, e.g. 0.5 0.9")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="N", help="token counts, e.g. 1 64")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for everything (default: all cores)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="also/only run the weight dtype where a family supports it")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per case (median)")
    parser.add_argument("--cache", nargs="+", choices=["hot", "cold"], metavar="MODE",
                        help="spmm/nm cache modes (default: hot and cold). hot: one layer timed "
                        "again and again; cold: rotating over layer copies that exceed the "
                        "last-level cache, as a model's forward reads its weights")
    parser.add_argument("--out", default=os.path.join("bench", "results"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")
    args = parser.parse_args(argv)
    args.quick = not args.full
    if args.shapes:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    return args


def main(argv=None):
    args = parse_args(argv)  # before importing torch: --help needs no environment
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, os.getcwd())
    import sparse_ext  # noqa: F401
    from bench.common import machine_info

    machine = machine_info()
    print(textwrap.fill(", ".join(f"{k}={v}" for k, v in machine.items() if v is not None),
                        width=118, initial_indent="machine: ", subsequent_indent="         "))
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    all_rows, reports, tables = [], [], []
    for family in [f.strip() for f in args.families.split(",") if f.strip()]:
        if family not in FAMILY_MODULES:
            raise SystemExit(f"unknown family {family!r}; choose from {', '.join(FAMILY_MODULES)}")
        try:
            module = importlib.import_module(FAMILY_MODULES[family])
        except ImportError as exc:
            print(f"[{family}] skipped: {exc}")
            continue
        # A bar only on a terminal: redirected to a file, its redraws become one endless line.
        plain = tqdm is None or args.no_progress or not sys.stderr.isatty()
        bar = None if plain else tqdm(desc=family, unit="case")

        def progress(desc, bar=bar):
            if bar is None:
                print(f"  {desc}", flush=True)
            else:
                bar.set_postfix_str(desc)
                bar.update(1)

        try:
            rows = module.run(args, progress)
        except Exception as exc:  # a family that cannot run here must not hide the others
            rows = []
            print(f"[{family}] failed: {type(exc).__name__}: {exc}")
        if bar is not None:
            bar.close()
        all_rows += rows
        if rows:
            tables.append(format_family(family, module, rows))
        if hasattr(module, "targets_report") and rows:
            reports += module.targets_report(rows)
    for table in tables:
        print()
        print(table)
    if reports:
        print("\nSummary: the targets of docs/performance.md on this machine")
        print("\n".join("  " + uniform_verdicts(line) for line in reports))
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {"machine": machine, "args": {k: v for k, v in vars(args).items()}, "rows": all_rows,
              "targets": reports, "time": stamp}
    json_path = os.path.join(args.out, "latest.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    plots = _plot(all_rows, os.path.join(args.out, "speedup_vs_sparsity"), machine) if all_rows else []
    print(f"\nwrote {json_path}" + "".join(f", {p}" for p in plots))


if __name__ == "__main__":
    main()

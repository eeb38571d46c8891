"""sparse_ext benchmark suite: our kernels vs the dense (and other sparse) ops, in the same process.

Each family (SpMM, N:M, sparse conv, MoE, and the optional MiniLM workload) is a plugin of
bench/families/ measured on the device given: the CPU suite times ours and PyTorch's dense op
interleaved with wall-clock medians; the CUDA suite times ours against cuBLAS, cuSPARSE,
PyTorch's 2:4, cuDNN and HF's MoE block with CUDA events, records each output's error against an
fp64 reference, and runs each family in a child process with a time budget (a CUDA fault in one
case cannot take the others down). The console shows one table per family, its target checks and
a summary; the JSON keeps every metric (plus markdown, and plots on the CPU).

    bash scripts/bench.sh                         # the CPU suite (a few minutes on 2 cores)
    bash scripts/bench.sh --full                  # every shape of docs/performance.md
    python -m bench.run --families spmm,nm --sparsities 0.9 --tokens 1 64 --threads 2
    python -m bench.run --device cuda             # the CUDA suite, ~4 minutes on an H200
    python -m bench.run --device cuda --size quick --families spmm --reps 5
    python -m bench.run --device cuda --smoke     # tiny CUDA-vs-CPU check of every family
    python -m bench.run --device cuda --dry-run   # case list + report from fake timings
"""
import argparse
import datetime
import json
import os
import sys
import time

from bench.core.family import DEFAULT, FAMILIES, SIZES

# Share of the CUDA --budget-s each family gets (SpMM has the most points).
BUDGET_SHARE = {"spmm": 0.40, "nm": 0.25, "conv": 0.15, "moe": 0.20}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--families", default=",".join(DEFAULT["cpu"]),
                   help="comma-separated subset of: " + ", ".join(FAMILIES)
                   + " (default: %(default)s)")
    p.add_argument("--size", choices=SIZES, default="default",
                   help="case list. CPU: full = every shape and pattern (tens of minutes on 2 "
                   "cores), else the quick default. CUDA: tiny (CPU tests), quick, default "
                   "(the CUDA targets), full")
    p.add_argument("--full", action="store_true", help="same as --size full")
    p.add_argument("--shapes", nargs="+", metavar="OUTxIN",
                   help="linear weight shapes for spmm/nm, e.g. 4096x4096 11008x4096")
    p.add_argument("--sparsities", nargs="+", type=float, metavar="S",
                   help="sparsities (fraction of zeros) for spmm (and conv on CUDA), e.g. 0.5 0.9")
    p.add_argument("--tokens", nargs="+", type=int, metavar="N", help="token counts, e.g. 1 64")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                   help="CUDA: only these dtypes. CPU: bfloat16 adds the SpMM bf16-weight cases")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for everything (default: all cores)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per case, median (default: 9 on the CPU; on CUDA the "
                   "most samples per callable, 10)")
    p.add_argument("--cache", nargs="+", choices=["hot", "cold"], metavar="MODE",
                   help="spmm/nm on the CPU (default: hot and cold). hot: one layer timed again "
                   "and again; cold: rotating over layer copies that exceed the last-level cache, "
                   "as a model's forward reads its weights")
    p.add_argument("--cpu-time", action="store_true",
                   help="CPU: time with this thread's CPU time (forces 1 thread; loaded machines)")
    p.add_argument("--out", default=os.path.join("bench", "results"), help="output folder")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")
    cuda = p.add_argument_group("CUDA")
    cuda.add_argument("--min-reps", type=int, default=3, help="fewest timed samples per callable")
    cuda.add_argument("--case-ms", type=float, default=200.0,
                      help="GPU time aimed at per case for the timed samples (fewer reps above it)")
    cuda.add_argument("--budget-s", type=float, default=240.0,
                      help="wall-time budget of the whole suite, shared by the families")
    cuda.add_argument("--flush-l2", action="store_true",
                      help="overwrite 2x the L2 cache before every timed call (weights from HBM)")
    cuda.add_argument("--graphs", type=int, default=16, metavar="N",
                      help="SpMM / N:M cases with at most N tokens are also timed as CUDA-graph "
                      "replays, without Python dispatch (default 16; 0: never)")
    cuda.add_argument("--json", default=None,
                      help="JSON path (default OUT/latest.json, OUT/cuda_latest.json on CUDA)")
    cuda.add_argument("--markdown", default=None, help="report path (default: the JSON's, .md)")
    cuda.add_argument("--workdir", default=None, help="folder for per-family partial JSON (OUT)")
    cuda.add_argument("--dry-run", action="store_true",
                      help="no timing: build the CUDA case list and report fake results")
    cuda.add_argument("--smoke", action="store_true",
                      help="only the tiny device-vs-CPU check of every family (exit code = failures)")
    cuda.add_argument("--list", action="store_true", help="print the CUDA case list and exit")
    cuda.add_argument("--render", metavar="JSON",
                      help="no measuring: rewrite the markdown report of an earlier run's JSON")
    cuda.add_argument("--update-docs", metavar="JSON",
                      help="no measuring: put an earlier CUDA run's report (and the summary.md "
                      "beside it, if any) into docs/performance.md between its cuda-results markers")
    cuda.add_argument("--in-process", action="store_true",
                      help="run the families in this process (default on CUDA: a child each)")
    # The torch device the CUDA suite's code runs on: the tests run it on the CPU.
    p.add_argument("--torch-device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--family-budget-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--partial-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--start-at", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.full:
        args.size = "full"
    args.quick = args.size != "full"
    args.kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.torch_device = args.torch_device or args.device
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
    if args.reps is None:
        args.reps = 10 if args.kind == "cuda" else 9
    if args.cpu_time:
        args.threads = 1
    stem = "cuda_latest" if args.kind == "cuda" else "latest"
    args.json = args.json or os.path.join(args.out, f"{stem}.json")
    args.markdown = args.markdown or os.path.splitext(args.json)[0] + ".md"
    args.workdir = args.workdir or args.out
    return args


def _cases(args, families):
    from bench.core.family import build_cases

    return build_cases(args.size, families, args.shapes, args.tokens, args.sparsities, args.dtypes)


def _plugins(names):
    from bench.core.family import load

    return {name: load(name) for name in names}


def _progress(args, family):
    """(tick, close): a bar on a terminal; plain lines when redirected (its redraws would
    become one endless line) or with --no-progress."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or args.no_progress or not sys.stderr.isatty():
        return (lambda desc: print(f"  {desc}", flush=True)), (lambda: None)
    bar = tqdm(desc=family, unit="case")

    def tick(desc):
        bar.set_postfix_str(desc)
        bar.update(1)
    return tick, bar.close


def _cuda_timer(args):
    from bench.core.timer import Timer

    return Timer(args.torch_device, reps=args.reps, min_reps=args.min_reps, case_ms=args.case_ms,
                 flush_l2=args.flush_l2)


def _child(args):
    """A family's child process (bench.core.supervisor.run_in_children): its cases from
    ``--start-at``, rows written to ``--partial-json`` after each."""
    from bench.core import supervisor

    family = args.families[0]
    cases = _cases(args, [family])[args.start_at:]
    supervisor.json_dump([], args.partial_json)
    _, lost = supervisor.run_in_process(
        _plugins([family])[family], cases, args, _cuda_timer(args),
        lambda rows: supervisor.json_dump(rows, args.partial_json), stop_on_lost=True)
    return supervisor.LOST_EXIT if lost else 0


def _cuda_rows(args, plugin, started, notes):
    from bench.core import supervisor

    cases = _cases(args, [plugin.NAME])
    if args.dry_run:
        from bench.core.family import fake_rows

        return fake_rows(cases)
    if not cases:
        return []
    # This family's share of what is left (a fast family leaves time to the next ones).
    left = args.budget_s - (time.perf_counter() - started)
    todo = args.families[args.families.index(plugin.NAME):]
    rest = sum(BUDGET_SHARE.get(f, 0.2) for f in todo)
    budget = max(10.0, left * BUDGET_SHARE.get(plugin.NAME, 0.2) / rest)
    print(f"== {plugin.NAME}: {len(cases)} cases, budget {budget:.0f} s", flush=True)
    if args.in_process:
        args.family_budget_s = budget
        return supervisor.run_in_process(plugin, cases, args, _cuda_timer(args))[0]
    os.makedirs(args.workdir, exist_ok=True)
    rows, status = supervisor.run_in_children(plugin.NAME, cases, args, args.workdir, budget)
    if status != "ok":
        notes.append(f"{plugin.NAME}: family process {status}")
    return rows


def _cpu_rows(args, plugin, timer):
    tick, close = _progress(args, plugin.NAME)
    try:
        return plugin.run(args, tick, timer)
    except ImportError as exc:
        print(f"[{plugin.NAME}] skipped: {exc}")
    except Exception as exc:  # noqa: BLE001  a family that cannot run here must not hide the others
        print(f"[{plugin.NAME}] failed: {type(exc).__name__}: {exc}")
    finally:
        close()
    return []


def _write_outputs(args, result, plugins):
    from bench.core.render import markdown
    from bench.core.supervisor import json_dump

    for path in (args.json, args.markdown):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    json_dump(result, args.json)
    with open(args.markdown, "w") as f:
        f.write(markdown(result, plugins))
    written = [args.json, args.markdown]
    if args.kind == "cpu" and result["rows"]:
        try:
            from bench.plot import plot
        except ImportError:
            print("matplotlib not installed: skipping plots")
        else:
            path = plot(result["rows"], os.path.join(args.out, "speedup_vs_sparsity.png"),
                        result["machine"])
            written += [path] if path else []
            for name, plugin in plugins.items():  # a family's own picture, where it has one
                own = [r for r in result["rows"] if r.get("family") == name]
                if own and hasattr(plugin, "plot"):
                    written.append(plugin.plot(own, os.path.join(args.out, f"{name}.png")))
    return written


def _render_or_update(args):
    from bench.core.render import markdown, update_docs

    with open(args.render or args.update_docs) as f:
        result = json.load(f)
    plugins = _plugins(dict.fromkeys(r["family"] for r in result.get("rows", [])))
    if args.render:
        with open(args.markdown, "w") as f:
            f.write(markdown(result, plugins))
        print(f"wrote {args.markdown}")
        return 0
    summary_path = os.path.join(os.path.dirname(os.path.abspath(args.update_docs)), "summary.md")
    summary = open(summary_path).read() if os.path.exists(summary_path) else None
    print(f"updated {update_docs(result, plugins, summary=summary)}")
    return 0


def main(argv=None):
    args = parse_args(argv)  # before importing torch: --help needs no environment
    sys.path.insert(0, os.getcwd())
    if args.list:
        for case in _cases(args, args.families):
            print(case["family"], _plugins([case["family"]])[case["family"]].label(case))
        print(f"{len(_cases(args, args.families))} cases")
        return 0
    if args.render or args.update_docs:
        return _render_or_update(args)
    import warnings

    import torch

    # Library notices that say nothing about the numbers ("Sparse CSR tensor support is in beta").
    warnings.filterwarnings("ignore", message=".*is in beta state.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        from bench.smoke import smoke

        return min(smoke(args.torch_device), 100)
    if args.partial_json:
        return _child(args)
    from bench.core.machine import machine_info, machine_line
    from bench.core.render import console_report
    from bench.core.timer import Timer

    started = time.perf_counter()
    if args.kind == "cuda" and not args.dry_run and args.torch_device.startswith("cuda") \
            and not torch.cuda.is_available():
        print("bench.run: no CUDA device visible to torch; nothing measured "
              "(--dry-run checks the report without a GPU)", file=sys.stderr)
        return 2
    if args.dry_run:
        machine = {"gpu": "dry run (fake timings)", "torch": None, "cuda": None, "driver": None}
    else:
        machine = machine_info(args.torch_device)
    print(machine_line(machine), flush=True)
    cpu_timer = Timer("cpu", reps=args.reps, warmup=3,
                      clock="thread" if args.cpu_time else "wall")
    sections, rows, notes, plugins = [], [], [], {}
    for family in args.families:
        try:
            plugin = _plugins([family])[family]
        except ImportError as exc:
            print(f"[{family}] skipped: {exc}")
            continue
        if args.kind not in plugin.DEVICES:
            print(f"[{family}] skipped: no {args.kind} cases")
            continue
        plugins[family] = plugin
        fam_rows = (_cuda_rows(args, plugin, started, notes) if args.kind == "cuda"
                    else _cpu_rows(args, plugin, cpu_timer))
        sections.append((plugin, fam_rows, plugin.targets(fam_rows, args.kind)))
        rows += fam_rows
    print(console_report(sections))
    result = {"time": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "device": args.device, "machine": machine, "size": args.size,
              "flush_l2": args.flush_l2, "args": dict(vars(args)), "rows": rows,
              "targets": {p.NAME: [t.line() for t in targets] for p, _, targets in sections},
              "notes": notes, "wall_s": round(time.perf_counter() - started, 1)}
    written = _write_outputs(args, result, plugins)
    for note in notes:
        print(f"note: {note}")
    print(f"\n{result['wall_s']} s; wrote")
    print("\n".join(f"  {path}" for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Running a family's cases one by one, and (on CUDA) in child processes within a time budget.

A failing case is recorded (``error``) and the next one runs. A CUDA fault that breaks the
process's context (an illegal address, a device-side assert) would fail every later case, so on
CUDA each family runs in a child process that stops at such a case; a fresh child continues with
the next case, within the family's budget. Children write their rows after every case to a partial
JSON, so a timeout or a crash keeps what was measured.
"""
import contextlib
import json
import os
import subprocess
import sys
import time

from bench.core.accuracy import WeightCache, short

LOST_EXIT = 3   # a child's exit code: the CUDA context broke; the parent resumes after that case
FAULT_ENV = "BENCH_TEST_FAULT"   # tests: a case label whose run fakes a lost CUDA context


def context_lost(message):
    """True for CUDA errors after which the process's CUDA context is unusable."""
    m = (message or "").lower()
    return any(s in m for s in ("illegal memory access", "device-side assert", "unspecified launch",
                                "misaligned address", "illegal instruction", "an illegal",
                                "cuda error: launch failure", "context is destroyed"))


def json_dump(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def run_in_process(plugin, cases, args, timer, write_partial=None, stop_on_lost=False):
    """Runs ``cases`` of one family on ``args.torch_device``; stops starting cases past
    ``args.family_budget_s``. After a lost context the rest are marked skipped, or with
    ``stop_on_lost`` the run stops there. Returns (rows, lost)."""
    import torch

    device = torch.device(args.torch_device)
    ctx = dict(torch=torch, device=device, cache=WeightCache(), graph_max_tokens=args.graphs,
               timer=timer)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    import sparse_ext  # noqa: F401  registers the ops

    budget = getattr(args, "family_budget_s", None)
    fault = os.environ.get(FAULT_ENV)
    t_start = time.perf_counter()
    rows, lost = [], None
    for i, case in enumerate(cases):
        label = plugin.label(case)
        if lost or (budget and time.perf_counter() - t_start > budget):
            why = f"skipped: {lost}" if lost else f"skipped: family time budget {budget:.0f} s spent"
            rows.append(dict(case, error=why))
            continue
        t0 = time.perf_counter()
        try:
            if fault == label:
                raise RuntimeError("CUDA error: an illegal memory access was encountered "
                                   f"(injected by {FAULT_ENV})")
            row = plugin.measure_cuda(case, ctx)
        except Exception as exc:  # noqa: BLE001  record and go on
            row = dict(case, error=short(exc))
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


def child_command(args, family, part, start_at, budget_s):
    """The ``python -m bench.run`` line of a child process running ``family`` from case
    ``start_at`` on."""
    cmd = [sys.executable, "-m", "bench.run", "--in-process", "--families", family,
           "--device", args.device, "--torch-device", args.torch_device, "--size", args.size,
           "--reps", str(args.reps), "--min-reps", str(args.min_reps), "--case-ms",
           str(args.case_ms), "--family-budget-s", str(budget_s), "--partial-json", part,
           "--start-at", str(start_at), "--graphs", str(args.graphs), "--no-progress"]
    for flag in ("shapes", "tokens", "sparsities", "dtypes"):
        values = getattr(args, flag)
        if values:
            cmd += [f"--{flag}"] + ["x".join(map(str, v)) if isinstance(v, (list, tuple))
                                    else str(v) for v in values]
    if args.flush_l2:
        cmd.append("--flush-l2")
    return cmd


def run_in_children(family, cases, args, workdir, budget_s, max_restarts=3):
    """Runs one family's ``cases`` in child processes (isolating CUDA faults); (rows, status).
    Cases no child reached (a crash, a timeout, the budget) are recorded as not run."""
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
        cmd = child_command(args, family, part, len(rows), max(left, 1.0))
        grace = 30.0   # the budget only stops *starting* cases; one case may run past it
        try:
            code = subprocess.run(cmd, timeout=max(left, 1.0) + grace).returncode
            status = "ok" if code in (0, LOST_EXIT) else f"exit code {code}"
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
    for case in cases[len(rows):]:
        rows.append(dict(case, error=f"not run: family process {status}"))
    lost = [r for r in rows if context_lost(r.get("error", ""))]
    if lost:
        status = (f"{status}; CUDA context lost in {len(lost)} case(s), a fresh process continued")
    return rows, status

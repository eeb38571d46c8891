"""The family plugins and what the core asks of them.

A family is one module under ``bench/families/`` with:

  NAME, TITLE         its name on the command line and the title of its table
  DEVICES             the device types it measures ("cpu", "cuda")
  COLUMNS             its console and markdown table (bench.table.Column; about 10 at most, each
                      with its format); a column without a value in any row is left out
  label(row)          a short name of a case or row (progress, best/worst, failures)
  targets(rows, device) -> [bench.core.targets.Target]  its goals checked on these rows
  run(args, progress, timer)     the CPU suite: rows, measured in this process
  cuda_cases(size, shapes, tokens, sparsities, dtypes) -> [case dict]   for "cuda" in DEVICES:
                      the cases of a size preset (tiny, quick, default, full), JSON-serialisable
  measure_cuda(case, ctx) -> row   one case on ctx["device"] (any torch device: the tests run it
                      on the CPU); records record_errors / record_speed (bench.core.accuracy)
  fake_extras(case, dense_ms, ours_ms) -> dict   optional: made-up secondary metrics (--dry-run)
  BASELINES           optional {device type: one sentence naming the baselines} (markdown)

A row is a dict with at least ``family``, ``speedup``, ``dense_ms``, ``ours_ms`` (or ``error``).
"""
import importlib
import random

FAMILIES = {name: f"bench.families.{name}"
            for name in ("spmm", "nm", "conv", "moe", "minilm", "pruning")}
# What runs without --families (minilm and pruning are optional workloads: they run when asked).
DEFAULT = {"cpu": ["spmm", "nm", "conv", "moe"], "cuda": ["spmm", "nm", "conv", "moe"]}
SIZES = ("tiny", "quick", "default", "full")


def load(name):
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])


def build_cases(size="default", families=None, shapes=None, tokens=None, sparsities=None,
                dtypes=None):
    """Every CUDA case of the ``families``, in run order."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    cases = []
    for name in families or DEFAULT["cuda"]:
        cases += load(name).cuda_cases(size, shapes, tokens, sparsities, dtypes)
    return cases


def fake_rows(cases, seed=0):
    """Plausible made-up results for --dry-run (exercises the report without a GPU); the last
    case fails, as a real run's might."""
    rng = random.Random(seed)
    rows = []
    for case in cases:
        dense = rng.uniform(0.01, 5.0)
        ours = dense / rng.uniform(0.5, 4.0)
        row = dict(case, dense_ms=dense, ours_ms=ours, speedup=dense / ours,
                   tflops=rng.uniform(1, 500), max_abs_err=1e-3, dense_max_abs_err=1e-3,
                   diff_vs_dense=1e-3, err_ok=True)
        extras = getattr(load(case["family"]), "fake_extras", None)
        if extras:
            row.update(extras(case, dense, ours))
        rows.append(row)
    if rows:
        rows[-1] = dict(cases[-1], error="RuntimeError: example failure (dry run)")
    return rows

"""The CUDA benchmark suite (``python -m bench.run --device cuda``) and bench/gpu_check.sh,
exercised without a GPU.

GPU time is scarce: the one prepared GPU run must not fail on a typo. These tests run every code
path that does not need a GPU: the case lists (the CUDA targets' points), the target verdicts and
the report from made-up results, the whole measuring code on the CPU device at tiny sizes, the
smoke check, and gpu_check.sh end to end with the build and the tests skipped and a dry-run suite.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import run as bench_run
from bench.core import family, render, supervisor
from bench.core.accuracy import WeightCache, record_graph_times
from bench.core.timer import Timer
from bench.families import moe as moe_family
from bench.smoke import smoke

ROOT = Path(__file__).resolve().parent.parent


# One intra-op thread: the tiny cases are dominated by thread wake-ups on a shared machine.
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _run(args, env=ENV):
    return subprocess.run([sys.executable, "-m", "bench.run", "--device", "cuda", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def _label(case):
    return family.load(case["family"]).label(case)


def _main(args):
    return bench_run.main(["--device", "cuda", *args])


# The CUDA suite's code on the CPU device, in this process.
ON_CPU = ["--torch-device", "cpu", "--size", "tiny", "--reps", "2", "--no-progress"]


def test_help_and_list():
    proc = _run(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--size" in proc.stdout and "--flush-l2" in proc.stdout and "--dry-run" in proc.stdout
    proc = _run(["--list", "--families", "moe"])
    assert proc.returncode == 0, proc.stderr
    assert "moe T=2048" in proc.stdout and proc.stdout.strip().endswith("cases")


def test_default_cases_cover_the_cuda_targets():
    cases = family.build_cases("default")
    json.dumps(cases)   # goes to child processes and to the JSON
    labels = [(c["family"], _label(c)) for c in cases]
    assert len(labels) == len(set(labels)), "case labels must be unique"
    spmm = [c for c in cases if c["family"] == "spmm"]
    for shape in ([4096, 4096], [11008, 4096], [4096, 11008]):
        for sp in (0.7, 0.9, 0.95):
            for dt in ("float16", "float32"):
                got = sorted(c["tokens"] for c in spmm
                             if c["shape"] == shape and c["sparsity"] == sp and c["dtype"] == dt)
                assert got == [1, 16, 256, 1024, 4096], (shape, sp, dt)
    nm = [c for c in cases if c["family"] == "nm"]
    assert {(c["pattern"], c["dtype"]) for c in nm} >= {
        ("2:4", "float16"), ("2:4", "bfloat16"), ("1:4", "float16"), ("2:8", "float16"),
        ("1:8", "float16")}
    assert {c["tokens"] for c in nm} == {16, 256, 4096}
    assert all(min(c["shape"]) >= 4096 for c in nm)
    conv = [c for c in cases if c["family"] == "conv"]
    assert any(c["kind"] == "mobilenet_v1" and c["dtype"] == "float16" for c in conv)
    pointwise = [c for c in conv if c["kind"] == "layer" and c["conv"][4] == 1]
    assert len(pointwise) >= 4 and all(c["batch"] == 32 for c in pointwise)
    assert any(c["kind"] == "layer" and c["conv"][4] == 3 for c in conv)
    moe = [c for c in cases if c["family"] == "moe"]
    assert {c["tokens"] for c in moe} == {1, 32, 512, 2048}
    assert all((c["hidden"], c["ffn"], c["experts"], c["top_k"]) == (1024, 2816, 8, 2) for c in moe)
    assert {c["tokens"] for c in moe if c["prefill"]} == {512, 2048}


def test_sizes_and_overrides():
    for size in family.SIZES:
        assert family.build_cases(size), size
    quick, full = family.build_cases("quick"), family.build_cases("full")
    assert len(quick) < len(family.build_cases("default")) < len(full)
    cases = family.build_cases("default", ["spmm", "nm"], shapes=[(1024, 2048)], tokens=[8],
                               dtypes=["float16"])
    assert cases and all(c["shape"] == [1024, 2048] and c["tokens"] == 8 and c["dtype"] == "float16"
                         for c in cases)
    with pytest.raises(ValueError, match="size"):
        family.build_cases("huge")
    args = bench_run.parse_args(["--device", "cuda", "--families", "spmm,moe", "--shapes", "64x96",
                                 "--out", "x"])
    assert args.families == ["spmm", "moe"] and args.shapes == [(64, 96)]
    assert args.json == os.path.join("x", "cuda_latest.json")
    assert args.markdown == os.path.join("x", "cuda_latest.md") and args.torch_device == "cuda"
    cpu = bench_run.parse_args(["--out", "x"])
    assert cpu.kind == "cpu" and cpu.json == os.path.join("x", "latest.json") and cpu.quick
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--families", "nope"])


def _row(family, **kw):
    row = dict(family=family, dense_ms=1.0, ours_ms=0.5, speedup=2.0, max_abs_err=1e-3,
               dense_max_abs_err=1e-3, err_ok=True)
    row.update(kw)
    return row


def _lines(name, rows):
    return "\n".join(t.line() for t in family.load(name).targets(rows, "cuda"))


def test_targets_verdicts():
    spmm = [
        _row("spmm", shape="4096x4096", sparsity=0.9, dtype="float16", tokens=256, speedup=2.5,
             vs_cusparse=3.0),
        _row("spmm", shape="4096x4096", sparsity=0.9, dtype="float16", tokens=4096, speedup=1.5,
             vs_cusparse=1.5),
        _row("spmm", shape="4096x4096", sparsity=0.9, dtype="float16", tokens=16, speedup=0.5),
        dict(family="spmm", shape=[1, 1], sparsity=0.9, dtype="float16", tokens=1024,
             pattern="unstructured", error="RuntimeError: boom"),
    ]
    text = _lines("spmm", spmm)
    assert "90% float16, N >= 256, worst over cuBLAS (1/2 points met): 1.50x" in text
    assert "worst vs cuSPARSE: 1.50x (target >= 2.00x) MISS" in text
    assert "(3/3)" in text and "MISSED" not in text
    text = _lines("nm", [_row("nm", pattern="2:4", dtype="bfloat16", tokens=256, speedup=1.4,
                              vs_torch_2of4=1.1),
                         _row("nm", pattern="1:8", dtype="float16", tokens=256, speedup=2.0)])
    assert "2:4 bfloat16, worst over cuBLAS: 1.40x (target >= 1.30x) met" in text
    assert "1:8 float16, worst over cuBLAS: 2.00x (target >= 2.50x) MISS" in text
    text = _lines("moe", [_row("moe", dtype="bfloat16", tokens=1, prefill=False, speedup=3.5,
                               baseline="hf"),
                          _row("moe", dtype="bfloat16", tokens=2048, prefill=True, speedup=1.2,
                               vs_dense_gemm=0.8, baseline="hf")])
    assert "bfloat16 decode (T=1), worst over hf: 3.50x (target >= 3.00x) met" in text
    assert "bfloat16 prefill (T=2048), worst share of equal-FLOP dense GEMM throughput: 80%" in text
    text = _lines("conv", [_row("conv", kind="layer", conv=[8, 8, 8, 8, 1, 1, 0], sparsity=0.9,
                                dtype="float16", batch=32, name="pw", err_ok=False)])
    assert "(0/1): CHECK pw 90% fp16" in text and text.rstrip().endswith("MISS")


def test_dry_run_writes_json_and_report(tmp_path, capsys):
    assert _main(["--dry-run", "--out", str(tmp_path)]) == 0
    console = capsys.readouterr().out
    result = json.loads((tmp_path / "cuda_latest.json").read_text())
    assert len(result["rows"]) == len(family.build_cases("default"))
    report = (tmp_path / "cuda_latest.md").read_text()
    for heading in ("#### Targets", "#### spmm", "#### nm", "#### conv", "#### moe"):
        assert heading in report
    assert "example failure (dry run)" in report
    # The console: one table per family and a summary, every line within 120 columns.
    assert max(len(line) for line in console.splitlines()) <= render.WIDTH
    assert console.count("dense ms") + console.count("base ms") == 4
    summary = console.split("Summary")[1]
    for name in family.DEFAULT["cuda"]:
        assert f"\n{name} " in summary
    assert "MISSED" not in console and "PASS" not in console


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory):
    """The real measuring code of every family on the CPU device, tiny shapes, in process."""
    out = tmp_path_factory.mktemp("bench_cuda_cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _main([*ON_CPU, "--in-process", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((out / "cuda_latest.json").read_text())
    assert (out / "cuda_latest.md").read_text().startswith("Measured")
    return result["rows"]


def test_tiny_suite_runs_every_family_on_cpu(tiny_rows):
    assert {r["family"] for r in tiny_rows} == set(family.DEFAULT["cuda"])
    assert len(tiny_rows) == len(family.build_cases("tiny"))
    for r in tiny_rows:
        assert "error" not in r, (_label(r), r["error"])
        assert r["ours_ms"] > 0 and r["dense_ms"] > 0 and r["speedup"] > 0
        # fp32 everywhere at this size: ours must match the fp64 reference closely
        assert r["max_abs_err"] <= 1e-4 * max(1.0, r["ref_max_abs"]), _label(r)
    spmm = [r for r in tiny_rows if r["family"] == "spmm"]
    assert all("vs_cusparse" in r for r in spmm)   # torch.sparse CSR works on the CPU too
    two_four = [r for r in tiny_rows if r["family"] == "nm" and r["pattern"] == "2:4"]
    assert two_four and all("vs_torch_2of4" in r or "torch_2of4_error" in r for r in two_four)
    moe = [r for r in tiny_rows if r["family"] == "moe"]
    assert all(r["vs_dense_gemm"] > 0 and r["floor_ms"] > 0 for r in moe)
    assert any(r["prefill"] for r in moe)
    assert any(r.get("kind") == "mobilenet_v1" for r in tiny_rows)


def test_family_subprocess_and_partial_results(tmp_path):
    """The default mode: one child process per family, rows read back from its partial JSON."""
    proc = _run([*ON_CPU, "--families", "spmm", "--out", str(tmp_path), "--budget-s", "120"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "cuda_latest.json").read_text())["rows"]
    assert len(rows) == len(family.build_cases("tiny", ["spmm"]))
    assert not any("error" in r for r in rows)


def test_lost_context_restarts_the_family_after_that_case(tmp_path):
    """A case that breaks the CUDA context ends its child process; a fresh child runs the rest."""
    cases = family.build_cases("tiny", ["spmm"])
    env = dict(ENV, **{supervisor.FAULT_ENV: _label(cases[0])})
    proc = _run([*ON_CPU, "--families", "spmm", "--out", str(tmp_path)], env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "cuda_latest.json").read_text())
    rows = result["rows"]
    assert len(rows) == len(cases)
    assert "illegal memory access" in rows[0]["error"]
    assert all("error" not in r for r in rows[1:]) and rows[1]["speedup"] > 0
    assert any("CUDA context lost in 1 case" in n for n in result["notes"])


def test_smoke_on_cpu():
    assert smoke("cpu") == 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_end_to_end_without_gpu(tmp_path):
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = dict(ENV, PYTHON=sys.executable, SKIP_BUILD="1", SKIP_TESTS="1",
               BENCH_ARGS="--dry-run", TOTAL_BUDGET_S="300")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script), str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["env.txt", "build.log", "tests.log", "bench.log", "bench_cuda.json",
                            "bench_cuda.md", "summary.md"])
    summary = (out / "summary.md").read_text()
    for stage in ("| env |", "| build |", "| smoke |", "| pytest |", "| bench |"):
        assert stage in summary
    assert "## Benchmark targets" in summary and "spmm: 90%" in summary
    if not torch.cuda.is_available():
        assert "no CUDA device" in (out / "tests.log").read_text()


class _FakeEvent:
    """Stands in for torch.cuda.Event: wall-clock stamps, so the CUDA timing logic runs here."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        import time

        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_timer_cuda_logic_with_fake_events(monkeypatch):
    import time

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = {"fast": 0, "slow": 0}

    def fast():
        calls["fast"] += 1

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    timer = Timer("cpu", reps=5, min_reps=3, sample_ms=0.5, case_ms=50.0)
    timer.cuda = True   # take the CUDA-event path with the fake events
    fast_ms, slow_ms = timer([fast, slow])
    assert 0 < fast_ms < slow_ms and slow_ms >= 1.5
    assert calls["fast"] > calls["slow"]   # short calls are batched into longer samples
    # --flush-l2: one call per sample, after the flush
    timer.flush = torch.zeros(16)
    before = dict(calls)
    timer([fast, slow])
    # warm-up (1) + estimate (1, then a burst of 10 for calls under 1 ms) + one call per sample
    assert calls["fast"] - before["fast"] <= 1 + 11 + timer.reps


def test_moe_baseline_without_transformers():
    """Without transformers the MoE baseline is the family's local copy of HF's loop."""
    ctx = dict(torch=torch, device=torch.device("cpu"), cache=WeightCache(),
               timer=Timer("cpu", reps=1, warmup=0))
    case = family.build_cases("tiny", ["moe"])[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        row = moe_family.measure_cuda(case, ctx, hf_block=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    assert row["baseline"] == "torch_loop" and row["err_ok"] and row["speedup"] > 0


def test_render_and_update_docs(tmp_path):
    """A GPU run's JSON goes into docs/performance.md between the markers, without a GPU."""
    assert _main(["--dry-run", "--out", str(tmp_path)]) == 0
    (tmp_path / "summary.md").write_text("# GPU check\n\n| stage | status |\n")
    page = tmp_path / "performance.md"
    original = (ROOT / "docs" / "performance.md").read_text()
    assert render.DOCS_BEGIN in original and render.DOCS_END in original
    page.write_text(original)
    result = json.loads((tmp_path / "cuda_latest.json").read_text())
    summary = (tmp_path / "summary.md").read_text()
    plugins = {name: family.load(name) for name in family.DEFAULT["cuda"]}
    render.update_docs(result, plugins, str(page), summary)
    render.update_docs(result, plugins, str(page), summary)   # idempotent: replaces, never appends
    text = page.read_text()
    cuda = text.split(render.DOCS_BEGIN)[1].split(render.DOCS_END)[0]
    assert text.count(render.DOCS_BEGIN) == 1 and cuda.count("### Targets") == 1
    assert "### spmm" in cuda and "gpu_check summary" in cuda and "\n# " not in cuda
    assert text.split(render.DOCS_BEGIN)[0] == original.split(render.DOCS_BEGIN)[0]
    assert text.split(render.DOCS_END)[1] == original.split(render.DOCS_END)[1]
    assert _main(["--render", str(tmp_path / "cuda_latest.json"),
                  "--markdown", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == (tmp_path / "cuda_latest.md").read_text()


def test_graph_times_logic(monkeypatch):
    """The CUDA-graph timing of small-N cases, with capture stubbed out (no GPU here)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ctx = dict(torch=torch, device=SimpleNamespace(type="cuda"), graph_max_tokens=16,
               timer=Timer("cpu", reps=1, warmup=0))
    row = {"tokens": 1}
    record_graph_times(row, ctx, lambda: None, lambda: None, replay=lambda torch_, fn: fn)
    assert row["dense_graph_ms"] > 0 and row["speedup_graph"] > 0
    big = {"tokens": 256}
    record_graph_times(big, ctx, lambda: None, lambda: None, replay=lambda torch_, fn: fn)
    assert "speedup_graph" not in big

    def fail(torch_, fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    row = {"tokens": 1}
    record_graph_times(row, ctx, lambda: None, lambda: None, replay=fail)
    assert "capturing" in row["graph_error"] and ctx["graphs_off"]
    row = {"tokens": 1}
    record_graph_times(row, ctx, lambda: None, lambda: None)   # off for the rest of the process
    assert row == {"tokens": 1}

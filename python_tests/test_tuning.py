"""The plan cache behind the ops: timing picks a tier, the choice reaches a second process through
the file, a corrupt file is survived, two processes writing at once keep both entries, and tuning
off always runs the active tier's kernel."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparse_ext
from sparse_ext import CSRWeight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTOR_TIERS = [t for t in sparse_ext.supported_isas() if t != "scalar"]
needs_two_tiers = pytest.mark.skipif(
    len(VECTOR_TIERS) < 2,
    reason=f"one vector tier here ({VECTOR_TIERS}): an op has a single candidate, nothing to time")

# A child process: runs spmm on a few shapes with tuning on and prints the cache counters.
CHILD = textwrap.dedent("""
    import json, sys, torch, sparse_ext
    from sparse_ext import CSRWeight
    torch.manual_seed(0)
    for out_f, in_f, tokens in json.loads(sys.argv[1]):
        dense = torch.randn(out_f, in_f) * (torch.rand(out_f, in_f) < 0.2)
        w = CSRWeight.from_dense(dense)
        x = torch.randn(tokens, in_f)
        y = torch.ops.sparse_ext.spmm(x, w.offsets, w.indices, w.values, None, out_f, in_f, 1)
        torch.testing.assert_close(y, x @ dense.t(), rtol=1e-4, atol=1e-4)
    print(json.dumps(sparse_ext.tuning.plan_cache_stats()))
""")


def run_child(cache_dir, shapes, tune="1"):
    env = dict(os.environ, SPARSE_EXT_TUNE=tune, SPARSE_EXT_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(shapes)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_stats(proc):
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def cache_files(cache_dir):
    return [p for p in cache_dir.iterdir() if p.name.endswith(".tsv")]


@pytest.fixture
def memory_cache():
    """Tuning on with an in-memory cache for the test, restored afterwards."""
    previous = sparse_ext.tuning.plan_cache_path()
    sparse_ext.tuning.set_plan_cache_path(None)
    sparse_ext.tuning.clear_plan_cache()
    with sparse_ext.use_tuning(True):
        yield
    sparse_ext.tuning.set_plan_cache_path(previous)


def _spmm(out_f=64, in_f=300, tokens=5):
    dense = torch.randn(out_f, in_f) * (torch.rand(out_f, in_f) < 0.3)
    w = CSRWeight.from_dense(dense)
    x = torch.randn(tokens, in_f)
    y = torch.ops.sparse_ext.spmm(x, w.offsets, w.indices, w.values, None, out_f, in_f, 1)
    return y, x @ dense.t()


def test_tuning_off_runs_the_default():
    assert not sparse_ext.tuning_enabled()  # conftest
    sparse_ext.tuning.clear_plan_cache()
    y, ref = _spmm()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    stats = sparse_ext.tuning.plan_cache_stats()
    assert stats["timed"] == 0 and stats["entries"] == 0
    assert stats["defaults"] == (1 if len(VECTOR_TIERS) >= 2 else 0)


@needs_two_tiers
def test_tuning_times_once_and_remembers(memory_cache):
    y, ref = _spmm()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert sparse_ext.tuning.plan_cache_stats()["timed"] == 1
    y, ref = _spmm()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    stats = sparse_ext.tuning.plan_cache_stats()
    assert stats["timed"] == 1 and stats["hits"] == 1 and stats["entries"] == 1


def test_use_tuning_restores():
    before = sparse_ext.tuning_enabled()
    with sparse_ext.use_tuning(not before):
        assert sparse_ext.tuning_enabled() == (not before)
    assert sparse_ext.tuning_enabled() == before


def test_default_path_names_the_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_EXT_CACHE_DIR", str(tmp_path))
    path = sparse_ext.tuning.default_plan_cache_path()
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path).startswith("plans-") and path.endswith(".tsv")


@needs_two_tiers
def test_second_process_reads_the_file(tmp_path):
    shapes = [[64, 300, 5], [32, 520, 1]]
    first = child_stats(run_child(tmp_path, shapes))
    assert first["timed"] == 2 and first["last_error"] == ""
    (cache,) = cache_files(tmp_path)
    lines = cache.read_text().splitlines()
    assert lines[0] == "sparse_ext plan cache 1"
    entries = [line.split("\t") for line in lines[1:]]
    assert len(entries) == 2 and all(len(e) == 3 for e in entries)
    assert all(e[0].startswith("spmm|") and e[1] in VECTOR_TIERS for e in entries)
    second = child_stats(run_child(tmp_path, shapes))
    assert second["timed"] == 0 and second["hits"] == 2


@needs_two_tiers
def test_corrupt_file_is_survived_and_rewritten(tmp_path):
    shapes = [[64, 300, 5]]
    child_stats(run_child(tmp_path, shapes))  # creates the file: find its name
    (cache,) = cache_files(tmp_path)
    cache.write_bytes(b"\x00\xffgarbage\tx\n" * 100)
    stats = child_stats(run_child(tmp_path, shapes))
    assert stats["timed"] == 1 and stats["hits"] == 0
    assert cache.read_text().startswith("sparse_ext plan cache 1\nspmm|")


@needs_two_tiers
def test_two_processes_writing_at_once_keep_both(tmp_path):
    a = [[16 * (i + 1), 256, 3] for i in range(6)]
    b = [[16 * (i + 1), 512, 3] for i in range(6)]
    procs = [run_child(tmp_path, a), run_child(tmp_path, b)]
    for p in procs:
        assert child_stats(p)["timed"] == 6
    (cache,) = cache_files(tmp_path)
    keys = [line.split("\t")[0] for line in cache.read_text().splitlines()[1:]]
    assert len(keys) == 12 and len(set(keys)) == 12


def test_tuning_off_never_writes(tmp_path):
    child_stats(run_child(tmp_path, [[64, 300, 5]], tune="0"))
    assert cache_files(tmp_path) == []

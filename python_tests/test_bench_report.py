"""The benchmark's report: the committed reference runs (every CPU family, the --full shapes) read
through today's family plugins fit 120 columns, one table per family, a one-line summary each,
target verdicts in one vocabulary."""
import json
from pathlib import Path

import pytest

from bench.core.family import load
from bench.core.render import WIDTH, console_report, markdown
from bench.table import Column, render, text

REFERENCE = Path(__file__).resolve().parent.parent / "bench" / "results" / "reference"


def _sections(rows):
    out = []
    for name in dict.fromkeys(r["family"] for r in rows):
        plugin = load(name)
        fam = [r for r in rows if r["family"] == name]
        out.append((plugin, fam, plugin.targets(fam, "cpu")))
    return out


@pytest.mark.parametrize("path", sorted(REFERENCE.glob("*.json")), ids=lambda p: p.stem)
def test_reference_runs_read_as_a_report(path):
    result = json.loads(path.read_text())
    sections = _sections(result["rows"])
    report = console_report(sections)
    assert max(len(line) for line in report.splitlines()) <= WIDTH
    for plugin, _, targets in sections:
        assert report.count(plugin.TITLE) == 1
        assert all(t.verdict in ("met", "MISS", "") for t in targets)
    summary = report.split("Summary")[1].splitlines()[3:]
    assert [line.split()[0] for line in summary] == [p.NAME for p, _, _ in sections]
    for word in ("MISSED", "PASS", " ok", "{", "e+0"):
        assert word not in report
    page = markdown(result, {p.NAME: p for p, _, _ in sections})
    assert "#### Targets" in page and "MISSED" not in page


def test_table_leaves_out_empty_columns_and_folds_constant_text():
    rows = [{"shape": "4x4", "dtype": "float32", "ms": 1.23456, "x": None},
            {"shape": "8x8", "dtype": "float32", "ms": 12.3456, "x": None}]
    table = render(rows, [text("shape", "shape"), text("dtype", "dtype"),
                          Column("ms", "ms", "{:.2f}"), Column("x", "x")], "title")
    lines = table.splitlines()
    assert lines[:2] == ["title", "every row: dtype float32"]
    assert lines[2].split() == ["shape", "ms"] and lines[4].split() == ["4x4", "1.23"]

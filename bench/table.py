"""Text tables for the benchmark's console output: one table per family, its own columns, numbers
rounded and right-aligned, text left-aligned, sized to fit a terminal (about 120 columns)."""
from typing import Callable, List, NamedTuple, Optional, Sequence


class Column(NamedTuple):
    header: str
    key: str                          # the row's key, or a function of the row
    fmt: str = "{}"                   # format of a present value
    numeric: bool = True              # right-aligned

    def cell(self, row) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        if value is None:
            return ""
        try:
            return self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


def text(header, key, width: Optional[int] = None) -> Column:
    """A left-aligned text column (cut to ``width`` characters when given)."""
    fmt = "{}" if width is None else "{:." + str(width) + "}"
    return Column(header, key, fmt, numeric=False)


def render(rows: Sequence[dict], columns: Sequence[Column], title: Optional[str] = None) -> str:
    """Columns without any value in ``rows`` are left out."""
    cols = [c for c in columns if any(c.cell(r) for r in rows)]
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = [max([len(c.header)] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]

    def line(values):
        return "  ".join(v.rjust(w) if c.numeric else v.ljust(w)
                         for v, w, c in zip(values, widths, cols)).rstrip()

    out: List[str] = [] if title is None else [title]
    out += [line([c.header for c in cols]), "  ".join("-" * w for w in widths)]
    out += [line(values) for values in cells]
    return "\n".join(out)


SPEEDUP = "{:.2f}x"
MS = "{:.3f}"
PERCENT = "{:.0%}"


def speedup_column(header: str = "speedup", key="speedup") -> Column:
    return Column(header, key, SPEEDUP)


def common_linear_columns(extra: Sequence[Column] = ()) -> List[Column]:
    """The columns of a sparse-weight x activations family (SpMM, N:M)."""
    return [text("shape", "shape"), text("pattern", "pattern"), Column("sparsity", "sparsity", PERCENT),
            text("dtype", "dtype"), text("cache", "cache"), Column("N", "tokens"), Column("dense ms", "dense_ms", MS),
            Column("ours ms", "ours_ms", MS), speedup_column(), Column("GFLOP/s", "gflops", "{:.1f}"),
            *extra]


Renderer = Callable[[Sequence[dict]], str]

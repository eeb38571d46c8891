"""Text tables for the benchmark's console output: one table per family, its own columns, numbers
rounded and right-aligned, text left-aligned, sized to fit a terminal (about 120 columns)."""
import math
from typing import List, NamedTuple, Optional, Sequence


class Column(NamedTuple):
    header: str
    key: str                          # the row's key, or a function of the row
    fmt: object = "{}"                # format string or function of a present value
    numeric: bool = True              # right-aligned

    def cell(self, row) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        if value is None:
            return ""
        try:
            return self.fmt(value) if callable(self.fmt) else self.fmt.format(value)
        except (ValueError, TypeError):
            return str(value)


def text(header, key, width: Optional[int] = None) -> Column:
    """A left-aligned text column (cut to ``width`` characters when given)."""
    fmt = "{}" if width is None else "{:." + str(width) + "}"
    return Column(header, key, fmt, numeric=False)


def render(rows: Sequence[dict], columns: Sequence[Column], title: Optional[str] = None) -> str:
    """Columns without any value in ``rows`` are left out; a text column with the same value in
    every row (of several) becomes one line above the table, ``every row: dtype float32``."""
    cols = [c for c in columns if any(c.cell(r) for r in rows)]
    same = [c for c in cols if not c.numeric and len(rows) > 1
            and len({c.cell(r) for r in rows}) == 1]
    cols = [c for c in cols if c not in same]
    cells = [[c.cell(r) for c in cols] for r in rows]
    widths = [max([len(c.header)] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]

    def line(values):
        return "  ".join(v.rjust(w) if c.numeric else v.ljust(w)
                         for v, w, c in zip(values, widths, cols)).rstrip()

    out: List[str] = [] if title is None else [title]
    if same:
        out.append("every row: " + ", ".join(f"{c.header} {c.cell(rows[0])}" for c in same))
    out += [line([c.header for c in cols]), "  ".join("-" * w for w in widths)]
    out += [line(values) for values in cells]
    return "\n".join(out)


def MS(value):
    """Milliseconds with about three significant digits (0.0123, 1.23, 12.3, 123)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.{max(0, 2 - math.floor(math.log10(max(abs(value), 1e-6))))}f}"


SPEEDUP = "{:.2f}x"
PERCENT = "{:.0%}"


def speedup_column(header: str = "speedup", key="speedup") -> Column:
    return Column(header, key, SPEEDUP)


def common_linear_columns(extra: Sequence[Column] = ()) -> List[Column]:
    """The columns of a sparse-weight x activations family (SpMM, N:M)."""
    return [text("shape", "shape"), text("pattern", "pattern"), Column("sparsity", "sparsity", PERCENT),
            text("dtype", "dtype"), text("cache", "cache"), Column("N", "tokens"), Column("dense ms", "dense_ms", MS),
            Column("ours ms", "ours_ms", MS), speedup_column(), *extra]

"""A target check: one measured value against its goal, with one vocabulary (met / MISS).

The goals themselves are Python tables in each family module (``TARGETS``, ``CUDA_TARGETS``): the
numbers docs/performance.md reports against, kept next to the cases that measure them.
"""
import operator
from typing import NamedTuple, Optional

_OPS = {">=": operator.ge, "<=": operator.le}


class Target(NamedTuple):
    label: str                        # what was measured, e.g. "90% hot, geomean speedup"
    value: float
    goal: Optional[str] = None        # ">= 2x"; None: reported, not a target
    met: Optional[bool] = None
    fmt: str = "{:.2f}x"

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("met" if self.met else "MISS")

    def line(self) -> str:
        value = self.fmt.format(self.value)
        if self.goal is None:
            return f"{self.label}: {value}"
        return f"{self.label}: {value} (target {self.goal}) {self.verdict}"


def check(label, value, op, threshold, fmt="{:.2f}x") -> Target:
    """``value op threshold`` (op ">=" or "<="), e.g. check("90% geomean", 5.3, ">=", 5.0)."""
    return Target(label, value, f"{op} {fmt.format(threshold)}", bool(_OPS[op](value, threshold)),
                  fmt)


def report(label, value, fmt="{:.2f}x") -> Target:
    """A measured value worth a line that has no goal."""
    return Target(label, value, None, None, fmt)


def met_count(targets):
    """(met, checked) over the targets that have a goal."""
    goals = [t for t in targets if t.met is not None]
    return sum(t.met for t in goals), len(goals)

"""What ``sparsify`` did, layer by layer: :class:`LayerReport` rows in a :class:`SparsifyReport`."""
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Tuple

from torch import nn

__all__ = ["LayerReport", "SparsifyReport", "sparse_module_row"]


@dataclass
class LayerReport:
    """One row of a :class:`SparsifyReport`."""

    name: str
    kind: str                          # "Linear" or "Conv2d"
    shape: Tuple[int, ...]             # the weight's shape
    pattern: str
    status: str                        # "sparse", "skipped", "already sparse" or "moe"
    reason: str = ""                   # why skipped ("" when swapped)
    sparsity: Optional[float] = None   # fraction of zero weights reached (None when skipped)
    dense_bytes: int = 0               # dense weight bytes (bias not counted)
    sparse_bytes: Optional[int] = None  # bytes the sparse kernels read for the weight
    target: Optional[float] = None     # the sparsity asked for (None: set by an N:M pattern)
    speedup: Optional[float] = None    # dense time / sparse time, when only_if_faster measured it
    error: Optional[float] = None      # relative reconstruction error on the calibration inputs

    @property
    def ratio(self) -> Optional[float]:
        if self.sparse_bytes is None or not self.dense_bytes:
            return None
        return self.sparse_bytes / self.dense_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["ratio"] = self.ratio
        return d


@dataclass(repr=False)
class SparsifyReport:
    """What ``sparsify`` did, layer by layer. ``str(report)`` is a table; ``to_dicts()`` is JSON-ready."""

    layers: List[LayerReport] = field(default_factory=list)
    global_pruning: bool = False

    # container protocol: iterate rows, look up by layer name
    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return any(row.name == name for row in self.layers)

    def _with_status(self, status: str) -> List[LayerReport]:
        return [r for r in self.layers if r.status == status]

    @property
    def sparsified(self) -> List[LayerReport]:
        return self._with_status("sparse")

    @property
    def skipped(self) -> List[LayerReport]:
        return self._with_status("skipped")

    @property
    def already_sparse(self) -> List[LayerReport]:
        """Layers that were sparse_ext modules before the call (left as they are)."""
        return self._with_status("already sparse")

    @property
    def moe_blocks(self) -> List[LayerReport]:
        """Hugging Face MoE blocks seen: swapped for MoELayer (status "moe") or left as they are."""
        return [r for r in self.layers if r.kind == "MoE"]

    @property
    def dense_bytes(self) -> int:
        """Dense weight bytes of the swapped layers."""
        return sum(r.dense_bytes for r in self.sparsified)

    @property
    def sparse_bytes(self) -> int:
        """Sparse weight bytes of the swapped layers."""
        return sum(r.sparse_bytes or 0 for r in self.sparsified)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all swapped layers (weighted by size)."""
        total = sum(_numel(r.shape) for r in self.sparsified)
        zeros = sum(_numel(r.shape) * r.sparsity for r in self.sparsified)
        return zeros / total if total else 0.0

    def to_dicts(self) -> List[dict]:
        return [r.as_dict() for r in self.layers]

    def table(self) -> str:
        headers = ["layer", "kind", "shape", "pattern", "sparsity", "dense KiB", "sparse KiB",
                   "ratio", "note"]
        rows = []
        for r in self.layers:
            sparse = r.status not in ("skipped", "moe")
            rows.append([
                r.name or "<root>", r.kind, "x".join(str(s) for s in r.shape),
                r.pattern if sparse else "-",
                f"{r.sparsity:.3f}" if sparse else "-",
                f"{r.dense_bytes / 1024:.1f}",
                f"{r.sparse_bytes / 1024:.1f}" if sparse else "-",
                f"{r.ratio:.3f}" if sparse and r.ratio is not None else "-",
                (r.reason or _note(r))
                if sparse else r.reason if r.status == "moe" else f"skipped: {r.reason}",
            ])
        if self.sparsified:
            ratio = self.sparse_bytes / self.dense_bytes if self.dense_bytes else 0.0
            rows.append([f"total ({len(self.sparsified)} sparse, {len(self.skipped)} skipped"
                         + (f", {len(self.already_sparse)} already sparse)" if self.already_sparse
                            else ")"),
                         "", "", "global" if self.global_pruning else "per-layer",
                         f"{self.sparsity:.3f}", f"{self.dense_bytes / 1024:.1f}",
                         f"{self.sparse_bytes / 1024:.1f}", f"{ratio:.3f}", ""])
        else:
            rows.append([f"total (0 sparse, {len(self.skipped)} skipped"
                         + (f", {len(self.already_sparse)} already sparse)" if self.already_sparse
                            else ")")] + [""] * 8)
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        right = {4, 5, 6, 7}

        def fmt(cells):
            out = [str(c).rjust(w) if i in right else str(c).ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(out).rstrip()

        sep = "  ".join("-" * w for w in widths)
        lines = [fmt(headers), sep] + [fmt(r) for r in rows[:-1]] + [sep, fmt(rows[-1])]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__   # shows the table in a REPL or notebook, like a DataFrame


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def sparse_module_row(name: str, mod: nn.Module, status: str, reason: str = "") -> LayerReport:
    """A row for a sparse_ext module: its shape, pattern, zeros and bytes."""
    conv = hasattr(mod, "kernel_size")
    shape = ((mod.out_channels, mod.in_channels, *mod.kernel_size) if conv
             else (mod.out_features, mod.in_features))
    weight = mod.weight_format()
    return LayerReport(name=name, kind="Conv2d" if conv else "Linear", shape=shape,
                       pattern=mod.pattern, status=status, reason=reason,
                       sparsity=weight.zero_fraction(),
                       dense_bytes=_numel(shape) * mod.values.element_size(),
                       sparse_bytes=weight.nbytes)


def _note(row: LayerReport) -> str:
    """What a swapped layer's row adds: its measured speedup, its reconstruction error."""
    notes = []
    if row.speedup:
        notes.append(f"{row.speedup:.2f}x faster than dense here")
    if row.error is not None:
        notes.append(f"reconstruction error {row.error:.3g}")
    return ", ".join(notes)


def moe_report_rows(model: nn.Module, swap: bool,
                    prune: Optional[Callable[[str, nn.Module], bool]] = None) -> List[LayerReport]:
    """A row per Hugging Face sparse MoE block of ``model``, swapping each for a MoELayer first
    when ``swap``; ``prune(name, layer)`` then prunes the swapped layer's experts (returns whether
    it did). Experts left dense count as dense bytes in every total; pruned experts make the row a
    sparse one (shape ``(E, F1 + F, H)``: its element count is the experts' weights)."""
    from .moe_swap import find_moe_blocks, swap_moe

    blocks = find_moe_blocks(model)
    rows = []
    for name, block in blocks:
        experts = block.experts
        params = sum(p.numel() * p.element_size() for p in experts.parameters())
        e = block.gate.weight.shape[0]
        top_k = getattr(block, "top_k", None) or getattr(block.gate, "top_k", "?")
        rows.append(LayerReport(
            name=name, kind="MoE", shape=(e,), pattern=f"top-{top_k}",
            status="moe" if swap else "skipped", dense_bytes=params,
            reason=("swapped for sparse_ext.MoELayer (sparse dispatch, dense experts)" if swap
                    else "MoE block left as it is: sparsify(moe=True) swaps it for MoELayer")))
    if swap:
        swap_moe(model)
    for row in rows:
        if not swap:
            continue
        layer = model.get_submodule(row.name)
        row.shape = (layer.num_local_experts, layer.w1.shape[1] + layer.ffn_size,
                     layer.hidden_size)
        if prune is None or not prune(row.name, layer):
            continue
        experts = layer.sparse_experts
        row.status, row.pattern = "sparse", experts.pattern
        row.sparsity, row.sparse_bytes = experts.sparsity, experts.weight_nbytes
        row.dense_bytes = experts.dense_nbytes
        row.reason = f"MoELayer, {experts.num_experts} experts pruned one by one"
    return rows

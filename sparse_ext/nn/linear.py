"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored sparse."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import CSRWeight, NMWeight
from ..prune import build_mask, parse_pattern
from ._stored import adopt_saved_sizes, register_sparse_state


def _block_rows_for(pattern: str, out_features: int) -> int:
    """Rows that share a pattern in storage: the block height when the kernels have it."""
    kind, (rows, _) = parse_pattern(pattern)
    if kind == "block" and rows in (2, 4, 8) and out_features % rows == 0:
        return rows
    return 1


class SparseLinear(nn.Module):
    """``y = x @ W^T + bias`` with W sparse; the sparsity pattern is fixed, the kept values train.

    Build one with :meth:`from_dense`. Parameters: ``values`` (kept weights) and ``bias``;
    buffers: the structure (``offsets``, ``indices``).
    """

    def __init__(self, weight: CSRWeight, bias: Optional[torch.Tensor] = None,
                 pattern: str = "unstructured"):
        super().__init__()
        self.format_kind = "csr"
        if isinstance(weight, NMWeight):  # N:M (issue 3): own buffers, see _init_nm
            self._init_nm(weight, bias, pattern)
            return
        if not isinstance(weight, CSRWeight):
            raise TypeError(f"weight must be a CSRWeight, got {type(weight).__name__}")
        weight.validate()
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.block_rows = weight.block_rows
        self.pattern = pattern
        register_sparse_state(self, {"offsets": weight.offsets, "indices": weight.indices},
                              weight.values, bias, self.out_features)

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: Optional[float] = None,
                   pattern: str = "unstructured", method: str = "magnitude",
                   mask: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> "SparseLinear":
        """Prunes ``linear`` (by ``mask``, or to ``sparsity`` with ``pattern`` and ``method``)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        kind, _ = parse_pattern(pattern)
        if kind == "nm":  # N:M (issue 3)
            return cls._from_dense_nm(linear, sparsity, pattern, method, mask)
        if mask is None:
            if sparsity is None:
                raise ValueError("from_dense needs sparsity=... or mask=...")
            mask = build_mask(weight, sparsity, pattern, method, generator)
        elif mask.shape != weight.shape:
            raise ValueError(f"mask must have shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
        csr = CSRWeight.from_dense(weight, mask.bool(), _block_rows_for(pattern, weight.shape[0]))
        return cls(csr, linear.bias, pattern)

    def weight_format(self) -> CSRWeight:
        if self.format_kind == "nm":  # N:M (issue 3)
            return NMWeight(self.values, self.metadata, (self.out_features, self.in_features),
                            self.nm_n, self.nm_m)
        return CSRWeight(self.offsets, self.indices, self.values,
                         (self.out_features, self.in_features), self.block_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format_kind == "nm":  # N:M (issue 3)
            return ops.nm_linear(x, self.weight_format(), self.bias)
        return ops.spmm(x, self.weight_format(), self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same (zero-filled) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight_format().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weight_format().density

    @property
    def weight_nbytes(self) -> int:
        return self.weight_format().nbytes

    def get_extra_state(self):
        return {"shape": (self.out_features, self.in_features), "block_rows": self.block_rows,
                "pattern": self.pattern, "format": self.format_kind}

    def set_extra_state(self, state):
        if tuple(state["shape"]) != (self.out_features, self.in_features):
            raise ValueError(f"state_dict is for a {tuple(state['shape'])} weight, this module is "
                             f"{(self.out_features, self.in_features)}")
        if state.get("format", "csr") != self.format_kind:  # N:M (issue 3)
            raise ValueError(f"state_dict holds a {state.get('format', 'csr')!r} weight, this module "
                             f"stores {self.format_kind!r}: build it with the same pattern first")
        self.block_rows = int(state["block_rows"])
        self.pattern = state["pattern"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        names = ("metadata", "values") if self.format_kind == "nm" else ("offsets", "indices", "values")
        adopt_saved_sizes(self, state_dict, prefix, names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dense_bytes = self.out_features * self.in_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern!r}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, "
                f"weight_bytes={self.weight_nbytes} ({self.weight_nbytes / max(dense_bytes, 1):.3f}x dense)")

    # ---- N:M semi-structured (issue 3) ---------------------------------------------------------
    def _init_nm(self, weight: NMWeight, bias: Optional[torch.Tensor], pattern: str) -> None:
        """Parameters ``values`` [out, G*n] and ``bias``; buffer ``metadata`` (packed indices)."""
        weight.validate()
        self.format_kind = "nm"
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.block_rows = 1
        self.nm_n, self.nm_m = weight.n, weight.m
        self.pattern = pattern
        register_sparse_state(self, {"metadata": weight.metadata}, weight.values, bias,
                              self.out_features)

    @classmethod
    def _from_dense_nm(cls, linear: nn.Linear, sparsity: Optional[float], pattern: str,
                       method: str, mask: Optional[torch.Tensor]) -> "SparseLinear":
        from ..prune import parse_nm

        n, m = parse_nm(pattern)
        if sparsity is not None and abs(float(sparsity) - (1.0 - n / m)) > 1e-6:
            raise ValueError(f"pattern {pattern!r} fixes sparsity at {1.0 - n / m:g}, got "
                             f"sparsity={sparsity}")
        if method != "magnitude" and mask is None:
            raise ValueError(f"N:M patterns are built by magnitude (or pass mask=...), got "
                             f"method={method!r}")
        weight = linear.weight.detach()
        nm = NMWeight.from_dense(weight, n, m, mask=None if mask is None else mask.bool())
        return cls(nm, linear.bias, pattern)
    # ---- end N:M ----

"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored sparse."""
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..formats import CSRWeight, NMWeight
from ..prune import block_storage_rows, build_mask, check_block_mask, check_mask, parse_pattern
from ._stored import (adopt_saved_sizes, check_loaded_bias, check_loaded_structure,
                      register_sparse_state, saved_or_current)


class SparseLinear(nn.Module):
    """``y = x @ W^T + bias`` with W sparse; the sparsity pattern is fixed, the kept values train.

    Build one with :meth:`from_dense`. Parameters: ``values`` (kept weights) and ``bias``;
    buffers: the structure (``offsets``, ``indices``).
    """

    def __init__(self, weight: CSRWeight, bias: Optional[torch.Tensor] = None,
                 pattern: str = "unstructured"):
        super().__init__()
        self.format_kind = "csr"
        if isinstance(weight, NMWeight):  # N:M: own buffers, see _init_nm
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
        if kind == "nm":
            return cls._from_dense_nm(linear, sparsity, pattern, method, mask)
        block_rows = block_storage_rows(pattern, weight.shape)
        if mask is None:
            if sparsity is None:
                raise ValueError("from_dense needs sparsity=... or mask=...")
            mask = build_mask(weight, sparsity, pattern, method, generator)
        else:
            check_block_mask(check_mask(mask, weight.shape), pattern)
        csr = CSRWeight.from_dense(weight, mask, block_rows)
        return cls(csr, linear.bias, pattern)

    def weight_format(self) -> CSRWeight:
        if self.format_kind == "nm":
            return NMWeight(self.values, self.metadata, (self.out_features, self.in_features),
                            self.nm_n, self.nm_m)
        return CSRWeight(self.offsets, self.indices, self.values,
                         (self.out_features, self.in_features), self.block_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.format_kind == "nm":
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

    def _check_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not {"shape", "block_rows", "pattern"} <= set(state):
            raise ValueError(f"state_dict's extra state must be a dict with shape, block_rows and "
                             f"pattern, got {state!r}")
        if tuple(state["shape"]) != (self.out_features, self.in_features):
            raise ValueError(f"state_dict is for a {tuple(state['shape'])} weight, this module is "
                             f"{(self.out_features, self.in_features)}")
        if state.get("format", "csr") != self.format_kind:
            raise ValueError(f"state_dict holds a {state.get('format', 'csr')!r} weight, this module "
                             f"stores {self.format_kind!r}: build it with the same pattern first")
        if self.format_kind == "nm" and state["pattern"] != self.pattern:
            raise ValueError(f"state_dict holds a weight of pattern {state['pattern']!r}, this "
                             f"module stores pattern {self.pattern!r}")
        kind, _ = parse_pattern(state["pattern"])
        if kind == "block" and block_storage_rows(state["pattern"], state["shape"]) != \
                int(state["block_rows"]):
            raise ValueError(f"state_dict's block_rows {state['block_rows']} does not match its "
                             f"pattern {state['pattern']!r}")

    def set_extra_state(self, state):
        self._check_extra_state(state)
        self.block_rows = int(state["block_rows"])
        self.pattern = state["pattern"]

    def _loaded_weight(self, state_dict, prefix):
        """The weight this module would hold after loading ``state_dict``."""
        def get(name):
            return saved_or_current(self, state_dict, prefix, name)

        shape = (self.out_features, self.in_features)
        if self.format_kind == "nm":
            return NMWeight(get("values"), get("metadata"), shape, self.nm_n, self.nm_m)
        extra = state_dict.get(prefix + "_extra_state")
        block_rows = int(extra["block_rows"]) if extra is not None else self.block_rows
        return CSRWeight(get("offsets"), get("indices"), get("values"), shape, block_rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Everything is checked before anything is copied: a corrupt checkpoint raises here and
        # the module keeps its weight.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self._check_extra_state(extra)
        check_loaded_structure(self, prefix, self._loaded_weight(state_dict, prefix))
        check_loaded_bias(self, state_dict, prefix, self.out_features)
        names = ("metadata", "values") if self.format_kind == "nm" else ("offsets", "indices", "values")
        adopt_saved_sizes(self, state_dict, prefix, names)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dense_bytes = self.out_features * self.in_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern!r}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, "
                f"weight_bytes={self.weight_nbytes} ({self.weight_nbytes / max(dense_bytes, 1):.3f}x dense)")

    # ---- N:M semi-structured --------------------------------------------------------------------
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
        nm = NMWeight.from_dense(linear.weight.detach(), n, m, mask=mask)
        return cls(nm, linear.bias, pattern)

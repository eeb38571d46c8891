"""SparseLinear: a drop-in ``nn.Linear`` whose weight is stored sparse."""
from typing import Optional, Tuple

import torch
from torch import nn

from ..formats import SparseWeight, build_weight
from ._stored import SparseWeightModule, encode_extra_state


class SparseLinear(SparseWeightModule):
    """``y = x @ W^T + bias`` with W sparse; the sparsity pattern is fixed, the kept values train.

    Build one with :meth:`from_dense`. Parameters: ``values`` (kept weights) and ``bias``;
    buffers: the structure of W's format (``offsets`` and ``indices`` for unstructured and block
    patterns, ``metadata`` for N:M).

    Args:
        weight: a :class:`~sparse_ext.formats.SparseWeight` (``CSRWeight`` or ``NMWeight``) of
            shape ``[out_features, in_features]``; validated here (ValueError naming the buffer).
        bias: ``[out_features]`` or None; copied.
        pattern: the pattern name the weight was built with (default: the weight's own); it must
            describe the weight, else ValueError.
    """

    def __init__(self, weight: SparseWeight, bias: Optional[torch.Tensor] = None,
                 pattern: Optional[str] = None):
        super().__init__()
        self._store_weight(weight, bias, pattern)
        self.in_features = weight.in_features
        self.out_features = weight.out_features

    @classmethod
    def from_dense(cls, linear: nn.Linear, sparsity: Optional[float] = None,
                   pattern: str = "unstructured", method: str = "magnitude",
                   mask: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weight pruned and its bias.

        Args:
            linear: the ``nn.Linear`` to prune (float32, bfloat16 or float64; not modified).
            sparsity: fraction of weights to zero, in [0, 1); needed unless ``pattern`` is N:M
                (whose sparsity is 1 - N/M) or ``mask`` is given.
            pattern: ``"unstructured"`` (default), ``"RxC"`` row blocks (``"4x1"``, ``"8x1"``:
                R consecutive output rows share their kept columns) or ``"N:M"`` (``"2:4"``,
                ``"1:4"``, ``"2:8"``, ...: N kept in every group of M inputs).
            method: ``"magnitude"`` (keep the largest, per row for N:M and per layer otherwise)
                or ``"random"`` (with ``generator``).
            mask: bool ``[out_features, in_features]``, True = keep; overrides ``sparsity`` and
                ``method`` and must fit ``pattern`` (ValueError naming the first group that
                does not).
            generator: ``torch.Generator`` for ``method="random"``.

        Raises TypeError for a non-``nn.Linear``, ValueError for a bad sparsity, pattern or
        mask, NotImplementedError for a pattern this build has no kernel for."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = build_weight(linear.weight.detach(), pattern, mask=mask, sparsity=sparsity,
                              method=method, generator=generator)
        return cls(weight, linear.bias, pattern)

    def weight_shape(self) -> Tuple[int, int]:
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight_format().linear(x, self.bias)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same (zero-filled) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            linear.weight.copy_(self.weight_format().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def get_extra_state(self):
        return encode_extra_state({"shape": list(self.weight_shape()),
                                   **self._weight_extra_state()})

    def _check_extra_state(self, state) -> None:
        if not isinstance(state, dict) or not {"shape", "block_rows", "pattern"} <= set(state):
            raise ValueError(f"state_dict's extra state must be a dict with shape, block_rows and "
                             f"pattern, got {state!r}")
        if tuple(state["shape"]) != self.weight_shape():
            raise ValueError(f"state_dict is for a {tuple(state['shape'])} weight, this module is "
                             f"{self.weight_shape()}")

    def extra_repr(self) -> str:
        dense_bytes = self.out_features * self.in_features * self.values.element_size()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, pattern={self.pattern!r}, "
                f"sparsity={self.sparsity:.3f}, dtype={self.values.dtype}, "
                f"weight_bytes={self.weight_nbytes} ({self.weight_nbytes / max(dense_bytes, 1):.3f}x dense)")

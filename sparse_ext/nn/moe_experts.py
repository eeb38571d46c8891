"""SparseExperts: a MoE layer's expert weights stored sparse, one sparse format per expert matrix.

Expert weights are 3-D (``w1 [E, 2F, H]``, ``w2 [E, H, F]``); every sparse format of the library is
2-D. The per-expert format is therefore one :class:`SparseLinear` per expert projection
(``gate_up[e]``: ``[2F, H]`` or ``[F, H]``, ``down[e]``: ``[H, F]``), each with its own pattern
metadata, so a checkpoint holds plain tensors per expert and any pattern the linears take
(unstructured, ``RxC`` blocks, ``N:M``) serves the experts too. The forward runs each non-empty
segment of the permuted rows through its expert's two sparse products: at decode sizes (a few
rows per expert) that is the SpMM / N:M GEMV, which is where pruned experts pay off.
"""
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from .linear import SparseLinear


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype,
                      device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


class SparseExperts(nn.Module):
    """The experts of a :class:`~sparse_ext.MoELayer` as sparse linears (see the module docstring).

    Build with :meth:`from_dense`; :meth:`to_dense` gives ``(w1, w2)`` back."""

    def __init__(self, gate_up, down):
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise ValueError(f"gate_up and down must hold one layer per expert, got "
                             f"{len(gate_up)} and {len(down)}")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)

    @classmethod
    def from_dense(cls, w1: torch.Tensor, w2: torch.Tensor, sparsity: Optional[float] = None,
                   pattern: str = "unstructured", method: str = "magnitude",
                   generator: Optional[torch.Generator] = None) -> "SparseExperts":
        """Prunes every expert matrix of ``w1 [E, F1, H]`` and ``w2 [E, H, F]`` on its own (same
        ``sparsity`` / ``pattern`` / ``method`` as ``SparseLinear.from_dense``)."""
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0]:
            raise ValueError(f"w1 and w2 must be [E, F1, H] and [E, H, F], got "
                             f"{list(w1.shape)} and {list(w2.shape)}")

        def prune(w):
            return SparseLinear.from_dense(_linear_from(w.detach()), sparsity=sparsity,
                                           pattern=pattern, method=method, generator=generator)

        return cls([prune(w) for w in w1], [prune(w) for w in w2])

    @property
    def num_experts(self) -> int:
        return len(self.gate_up)

    @property
    def pattern(self) -> str:
        return self.gate_up[0].pattern

    def to_dense(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(w1 [E, F1, H], w2 [E, H, F])`` with the pruned weights zero."""
        w1 = torch.stack([m.weight_format().to_dense() for m in self.gate_up])
        w2 = torch.stack([m.weight_format().to_dense() for m in self.down])
        return w1, w2

    @property
    def weight_nbytes(self) -> int:
        """Bytes the sparse kernels read for all experts' weights."""
        return sum(m.weight_nbytes for m in (*self.gate_up, *self.down))

    @property
    def dense_nbytes(self) -> int:
        return sum(m.out_features * m.in_features * m.values.element_size()
                   for m in (*self.gate_up, *self.down))

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all experts (weighted by size)."""
        layers = (*self.gate_up, *self.down)
        total = sum(m.out_features * m.in_features for m in layers)
        zeros = sum(m.out_features * m.in_features * m.weight_format().zero_fraction()
                    for m in layers)
        return zeros / total if total else 0.0

    def forward(self, x: torch.Tensor, row_token: torch.Tensor, offsets: torch.Tensor,
                activation: Callable[[torch.Tensor], torch.Tensor], gated: bool) -> torch.Tensor:
        """``y[p] = down_e(act(gate_e(x[row_token[p]])) * up_e(...))`` for the rows ``p`` of
        segment ``e`` (``offsets [E + 1]``), zero for rows past ``offsets[E]``; ``x [T, H]``,
        ``y [P, H]`` in ``x``'s dtype (float32 or float64)."""
        P = row_token.shape[0]
        hidden = self.down[0].out_features
        bounds = offsets.tolist()  # one host copy: the segment loop is host-side
        if len(bounds) != self.num_experts + 1:
            raise ValueError(f"offsets must have num_experts + 1 = {self.num_experts + 1} "
                             f"entries, got {len(bounds)}")
        parts = []
        for e in range(self.num_experts):
            start, end = bounds[e], bounds[e + 1]
            if end == start:
                continue
            rows = x.index_select(0, row_token[start:end])
            dtype = self.gate_up[e].values.dtype
            h = self.gate_up[e](rows.to(dtype))
            if gated:
                gate, up = h.chunk(2, dim=-1)
                h = activation(gate) * up
            else:
                h = activation(h)
            parts.append(self.down[e](h).to(x.dtype))
        kept = bounds[-1]
        if P > kept or not parts:
            parts.append(x.new_zeros((P - kept, hidden)))
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, pattern={self.pattern!r}, "
                f"sparsity={self.sparsity:.3f}, weight_bytes={self.weight_nbytes} "
                f"({self.weight_nbytes / max(self.dense_nbytes, 1):.3f}x dense)")

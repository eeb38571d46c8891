"""Input statistics of one linear layer, accumulated over calibration batches.

What the one-shot pruning methods need from a layer's inputs X [tokens, in_features]:
  ``hessian``   X^T X / tokens (float64, [in, in]): SparseGPT's Hessian (up to the factor 2) and
                the quadratic form of the reconstruction error DSnoT minimises;
  ``col_norms`` ||X_j||_2 over all tokens, per input feature: Wanda's activation term.
Only one layer's statistics are held at a time (the calibration driver streams the inputs).
"""
from typing import Optional

import torch


class InputStats:
    """Running X^T X and per-feature squared norms of a layer's inputs."""

    def __init__(self, in_features: int, with_hessian: bool = True):
        self.in_features = in_features
        self.tokens = 0
        self.sq_sum = torch.zeros(in_features, dtype=torch.float64)
        self._xtx: Optional[torch.Tensor] = (
            torch.zeros(in_features, in_features, dtype=torch.float64) if with_hessian else None)

    def add(self, x: torch.Tensor) -> None:
        """Adds a batch of inputs [..., in_features] (any float dtype)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have {self.in_features} features, got shape "
                             f"{tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float64)
        self.tokens += rows.shape[0]
        self.sq_sum += rows.pow(2).sum(0)
        if self._xtx is not None:
            self._xtx += rows.t() @ rows

    @property
    def col_norms(self) -> torch.Tensor:
        """||X_j||_2 per input feature (float64)."""
        return self.sq_sum.sqrt()

    @property
    def hessian(self) -> torch.Tensor:
        """X^T X / tokens (float64 [in, in]); raises when collected without it or empty."""
        if self._xtx is None:
            raise RuntimeError("these statistics were collected without the Hessian")
        if self.tokens == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return self._xtx / self.tokens

    @classmethod
    def from_inputs(cls, x: torch.Tensor, with_hessian: bool = True) -> "InputStats":
        stats = cls(x.shape[-1], with_hessian)
        stats.add(x)
        return stats

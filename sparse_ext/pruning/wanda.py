"""Wanda (Sun et al., 2023): prune by |W_ij| * ||X_j||_2, compared within each output row.

No weight update: the kept weights keep their values. With equal input norms it is magnitude
pruning per row.
"""
import torch

from .scores import mask_from_scores
from .stats import InputStats


def wanda_scores(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return weight.detach().double().abs() * stats.col_norms.to(weight.device)[None, :]


def wanda(weight: torch.Tensor, stats: InputStats, sparsity: float, pattern: str = "unstructured"):
    """Returns ``(mask, None)``: the kept weights of ``weight`` [out, in] (no new values)."""
    return mask_from_scores(wanda_scores(weight, stats), sparsity, pattern), None

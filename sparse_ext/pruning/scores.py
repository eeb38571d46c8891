"""Masks from per-weight importance scores, for every pattern the kernels take.

Scores are compared per output row (per row group for "RxC" blocks), as Wanda does: every row
keeps the same number of weights, which also balances the kernels' threads. N:M keeps the N best
of every group of M consecutive inputs.
"""
import torch

from ..prune import parse_nm, parse_pattern


def keep_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Each row keeps its round((1 - sparsity) * cols) highest scores (ties: lower column)."""
    rows, cols = scores.shape
    keep = int(round((1.0 - sparsity) * cols))
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=scores.device)
    if keep > 0:
        order = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
        mask.scatter_(1, order[:, :keep], True)
    return mask


def keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Each group of m consecutive columns keeps its n highest scores (a partial last group keeps
    at most n)."""
    rows, cols = scores.shape
    groups = -(-cols // m)
    padded = torch.full((rows, groups * m), -float("inf"), dtype=torch.float64,
                        device=scores.device)
    padded[:, :cols] = scores.double()
    idx = torch.topk(padded.reshape(rows, groups, m), n, dim=-1, sorted=False).indices
    keep = torch.zeros(rows, groups, m, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, idx, True)
    return keep.reshape(rows, groups * m)[:, :cols] & torch.isfinite(padded[:, :cols])


def keep_blocks_per_row_group(scores: torch.Tensor, sparsity: float, block) -> torch.Tensor:
    """Whole (R, C) tiles scored by their summed scores; each group of R rows keeps the same
    number of tiles. The tiles must divide the shape (block_storage_rows checks that)."""
    r, c = block
    rows, cols = scores.shape
    tiles = scores.double().reshape(rows // r, r, cols // c, c).sum((1, 3))
    keep = keep_per_row(tiles, sparsity)
    return keep[:, None, :, None].expand(rows // r, r, cols // c, c).reshape(rows, cols).clone()


def mask_from_scores(scores: torch.Tensor, sparsity: float, pattern: str) -> torch.Tensor:
    """The kept weights (True) for ``pattern``; ``sparsity`` is ignored for N:M patterns."""
    kind, shape = parse_pattern(pattern)
    if kind == "nm":
        return keep_n_of_m(scores, *parse_nm(pattern))
    if kind == "block" and shape != (1, 1):
        return keep_blocks_per_row_group(scores, sparsity, shape)
    return keep_per_row(scores, sparsity)

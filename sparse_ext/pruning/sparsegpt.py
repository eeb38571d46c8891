"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with the inverse Hessian of the layer's
inputs, updating the kept weights to compensate.

Columns are processed left to right in blocks; within a block each pruned weight's error is
spread over the not-yet-processed columns of its row (the optimal-brain-surgeon update with
H^-1's upper Cholesky factor), and the block's accumulated error is applied to the columns right
of it in one matrix product ("lazy batch" updates). Which weights a block prunes is chosen from
w^2 / [H^-1]_jj at the start of the block (unstructured: the block's lowest scores over all rows,
as the reference implementation does), at the start of every group of M columns (N:M), or per
(R, C) tile (blocks). The solver runs in float64.
"""
import torch

from ..prune import parse_nm, parse_pattern
from .stats import InputStats


def _inverse_hessian_factor(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1."""
    h = hessian.clone()
    n = h.shape[0]
    h += damping * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype, device=h.device)
    for extra in (0.0, 1e-6, 1e-4, 1e-2):  # a singular H (few tokens) needs more damping
        try:
            if extra:
                h += extra * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inv, upper=True)
        except RuntimeError:
            continue
    raise RuntimeError("the layer's input Hessian is not positive definite even with damping")


def sparsegpt(weight: torch.Tensor, stats: InputStats, sparsity: float,
              pattern: str = "unstructured", block_size: int = 128, damping: float = 0.01):
    """Returns ``(mask, new_weight)``: the kept weights and the updated values (zero where
    pruned) of ``weight`` [out, in], in ``weight``'s dtype."""
    kind, (br, bc) = parse_pattern(pattern)
    n_keep, m = parse_nm(pattern) if kind == "nm" else (0, 0)
    if kind == "block":
        block_size = max(bc, block_size // bc * bc)
    w = weight.detach().to(torch.float64).clone()
    rows, cols = w.shape
    h = stats.hessian.to(w.device).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_hessian_factor(h, damping)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)

    for c0 in range(0, cols, block_size):
        c1 = min(c0 + block_size, cols)
        w1 = w[:, c0:c1].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[c0:c1, c0:c1]
        d = torch.diag(hinv1)
        p1 = torch.zeros_like(w1, dtype=torch.bool)
        if kind == "unstructured" or (kind == "block" and (br, bc) == (1, 1)):
            score = w1.pow(2) / d.pow(2)[None, :]
            k = int(score.numel() * sparsity)
            if k > 0:
                p1.view(-1)[torch.argsort(score.reshape(-1), stable=True)[:k]] = True
        elif kind == "block":
            width = c1 - c0
            tiles = (w1.pow(2) / d.pow(2)[None, :]).reshape(rows // br, br, width // bc, bc)
            tile_score = tiles.sum((1, 3))
            k = int(tile_score.numel() * sparsity)
            drop = torch.zeros(tile_score.numel(), dtype=torch.bool, device=w.device)
            if k > 0:
                drop[torch.argsort(tile_score.reshape(-1), stable=True)[:k]] = True
            p1 = drop.reshape(rows // br, 1, width // bc, 1).expand(
                rows // br, br, width // bc, bc).reshape(rows, width).clone()
        for i in range(c1 - c0):
            if kind == "nm" and i % m == 0:
                g = slice(i, min(i + m, c1 - c0))
                width = g.stop - g.start
                if width > n_keep:
                    score = w1[:, g].pow(2) / d[g].pow(2)[None, :]
                    drop = torch.topk(score, width - n_keep, dim=1, largest=False).indices
                    p1[:, g].scatter_(1, drop, True)
            col = w1[:, i]
            q = torch.where(p1[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, c0:c1] = q1
        pruned[:, c0:c1] = p1
        if c1 < cols:
            w[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    keep = ~pruned
    return keep, (w * keep).to(weight.dtype)

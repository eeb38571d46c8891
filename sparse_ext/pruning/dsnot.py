"""Prune-and-grow refinement of a mask without training, in the spirit of DSnoT (Zhang et al.,
2023): swap a pruned weight back in and a kept one out, row by row, while that lowers the row's
reconstruction error. Here the error is the exact expected one over the calibration inputs,

    e_r(mask) = (w_r - w_r * mask_r) H (w_r - w_r * mask_r)^T,   H = X^T X / tokens,

so a swap is accepted only when it lowers e_r: the refinement never increases the error it
optimises (DSnoT's own rule uses the inputs' mean and variance as a proxy for this quantity).
Each step picks, per row, the best single growth j and, given it, the best prune k (for N:M, k in
j's group, so every group keeps exactly N). The kept weights keep their values.
"""
import torch

from ..prune import parse_nm, parse_pattern
from .stats import InputStats


def reconstruction_error(weight: torch.Tensor, mask: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Per-row expected squared output error of keeping only ``mask`` (float64 [out])."""
    d = weight.detach().double() * (~mask)
    return ((d @ stats.hessian.to(d.device)) * d).sum(1)


def dsnot(weight: torch.Tensor, stats: InputStats, mask: torch.Tensor, pattern: str = "unstructured",
          max_swaps: int = 0, tolerance: float = 1e-12):
    """Refines ``mask`` (True = kept) of ``weight`` [out, in]; returns ``(mask, None)``.

    ``max_swaps`` bounds the swaps per row (default: a tenth of the kept weights per row, at
    least 1). Block patterns other than 1x1 are returned unchanged (a swap would break tiles)."""
    kind, shape = parse_pattern(pattern)
    if kind == "block" and shape != (1, 1):
        return mask, None
    w = weight.detach().double()
    h = stats.hessian.to(w.device)
    hdiag = torch.diag(h)
    keep = mask.clone()
    rows, cols = w.shape
    d = w * (~keep)                      # the pruned part of each row
    hd = d @ h                           # (H d_r) for every row
    steps = max_swaps or max(1, int(keep.sum(1).float().mean().item() / 10))
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    row_ids = torch.arange(rows, device=w.device)
    if kind == "nm":
        _, m = parse_nm(pattern)
        groups = -(-cols // m)
        pad = groups * m - cols
        hp = torch.nn.functional.pad(h, (0, pad, 0, pad))
        hblocks = torch.stack([hp[g * m:(g + 1) * m, g * m:(g + 1) * m] for g in range(groups)])
        hkk = torch.diagonal(hblocks, dim1=1, dim2=2)                    # [G, m]
        wp = torch.nn.functional.pad(w, (0, pad)).reshape(rows, groups, m)
    for _ in range(steps):
        # growing j (pruned) changes e by  -2 d_j (Hd)_j + d_j^2 H_jj
        grow = -2 * d * hd + d.pow(2) * hdiag[None, :]
        grow = torch.where(keep, torch.full_like(grow, float("inf")), grow)
        if kind == "nm":
            # pair (j grown, k pruned) in the same group: after growing j, pruning k changes e by
            #   2 w_k ((Hd)_k - d_j H_kj) + w_k^2 H_kk
            hdp = torch.nn.functional.pad(hd, (0, pad)).reshape(rows, groups, m)
            dp = torch.nn.functional.pad(d, (0, pad)).reshape(rows, groups, m)
            kp = torch.nn.functional.pad(keep, (0, pad)).reshape(rows, groups, m)
            gp = torch.nn.functional.pad(grow, (0, pad), value=float("inf")).reshape(rows, groups, m)
            # cost[r, g, j, k]
            prune_k = 2 * wp[:, :, None, :] * (hdp[:, :, None, :] - dp[:, :, :, None] *
                                                hblocks[None]) + wp.pow(2)[:, :, None, :] * hkk[None, :, None, :]
            valid_k = kp[:, :, None, :]
            cost = gp[:, :, :, None] + torch.where(valid_k, prune_k, torch.full_like(prune_k, float("inf")))
            flat = cost.reshape(rows, -1)
            best, arg = flat.min(1)
            g_idx = arg // (m * m)
            j = g_idx * m + (arg // m) % m
            k = g_idx * m + arg % m
        else:
            gbest, j = grow.min(1)
            dj = d[row_ids, j]
            prune_k = 2 * w * (hd - dj[:, None] * h[j]) + w.pow(2) * hdiag[None, :]
            prune_k = torch.where(keep, prune_k, torch.full_like(prune_k, float("inf")))
            prune_k[row_ids, j] = float("inf")
            pbest, k = prune_k.min(1)
            best = gbest + pbest
        accept = active & torch.isfinite(best) & (best < -tolerance)
        if not accept.any():
            break
        r = row_ids[accept]
        jr, kr = j[accept], k[accept]
        dj = d[r, jr].clone()
        wk = w[r, kr]
        keep[r, jr] = True
        keep[r, kr] = False
        d[r, jr] = 0.0
        d[r, kr] = wk
        hd[r] += -dj[:, None] * h[jr] + wk[:, None] * h[kr]
        active = accept
    return keep, None

"""Mask builders: which weights survive pruning.

Every function returns a ``torch.bool`` mask of the weight's shape where True means "kept".
``sparsity`` is the fraction of zeros, in [0, 1].
"""
import re
from typing import List, Optional, Tuple

import torch

_BLOCK = re.compile(r"^(\d+)x(\d+)$")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> Tuple[str, Tuple[int, int]]:
    """``"unstructured"`` -> ("unstructured", (1, 1)); ``"4x1"`` -> ("block", (4, 1));
    ``"2:4"`` -> ("nm", (2, 4)). Raises ``ValueError`` naming the accepted forms otherwise."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {type(pattern).__name__}")
    if pattern == "unstructured":
        return "unstructured", (1, 1)
    m = _BLOCK.match(pattern)
    if m:
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows < 1 or cols < 1:
            raise ValueError(f"block pattern {pattern!r} needs positive sizes")
        return "block", (rows, cols)
    m = _NM.match(pattern)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        return "nm", (n, mm)
    raise ValueError(
        f"pattern must be 'unstructured', a block shape 'RxC' (e.g. '4x1') or 'N:M' (e.g. '2:4'), "
        f"got {pattern!r}")


def check_mask(mask, shape, name: str = "mask") -> torch.Tensor:
    """A caller's mask: a bool tensor of ``shape`` (True = keep). Any other dtype is refused, not
    guessed at: a float mask of scores or probabilities has no one obvious threshold, and
    ``mask.bool()`` would keep every nonzero score."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {mask.dtype}: threshold "
                        f"it explicitly, e.g. {name}=scores > t, or {name}=m.bool() for 0/1 values")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def block_storage_rows(pattern: str, shape: Tuple[int, int]) -> int:
    """Rows stored as one group (the kernels' block_rows) for a weight ``shape`` [out, in] with
    ``pattern``; raises when a block pattern does not tile the shape, so that a module never
    reports a pattern it does not hold."""
    kind, (rows, cols) = parse_pattern(pattern)
    if kind != "block":
        return 1
    out, inp = int(shape[0]), int(shape[1])
    if out % rows or inp % cols:
        raise ValueError(f"pattern {pattern!r} needs whole {rows}x{cols} tiles, but the weight is "
                         f"[{out}, {inp}] ({out} rows % {rows} = {out % rows}, {inp} columns "
                         f"% {cols} = {inp % cols}); use a block that divides it or "
                         f"'unstructured'")
    return next(b for b in (8, 4, 2, 1) if rows % b == 0)


def check_block_mask(mask: torch.Tensor, pattern: str) -> None:
    """Raises unless the 2-D ``mask`` keeps whole tiles of a block ``pattern`` (after
    :func:`block_storage_rows` has checked that the tiles divide it)."""
    kind, (rows, cols) = parse_pattern(pattern)
    if kind != "block" or rows * cols == 1:
        return
    out, inp = mask.shape
    tiles = mask.reshape(out // rows, rows, inp // cols, cols)
    partial = (tiles.any(3).any(1) != tiles.all(3).all(1)).nonzero()
    if partial.numel():
        r, c = (int(v) for v in partial[0])
        raise ValueError(f"mask is not made of whole {rows}x{cols} tiles as pattern {pattern!r} "
                         f"says: the tile at rows {r * rows}..{r * rows + rows - 1}, columns "
                         f"{c * cols}..{c * cols + cols - 1} is partly kept ({partial.shape[0]} "
                         f"such tiles); pass pattern='unstructured' for an arbitrary mask")


def _check_sparsity(sparsity: float) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return float(sparsity)


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keeps the round((1 - sparsity) * numel) highest scores; ties broken by position."""
    total = scores.numel()
    keep = int(round((1.0 - sparsity) * total))
    mask = torch.zeros(total, dtype=torch.bool, device=scores.device)
    if keep > 0:
        order = torch.argsort(scores.reshape(-1).float(), descending=True, stable=True)
        mask[order[:keep]] = True
    return mask.reshape(scores.shape)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keeps the largest-magnitude weights."""
    return _keep_top(weight.detach().abs(), _check_sparsity(sparsity))


def random_mask(weight: torch.Tensor, sparsity: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Keeps a uniformly random subset of exactly round((1 - sparsity) * numel) weights."""
    scores = torch.rand(weight.shape, generator=generator, device=weight.device)
    return _keep_top(scores, _check_sparsity(sparsity))


def tile_scores(weight: torch.Tensor, block: Tuple[int, int] = (1, 1), method: str = "magnitude",
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One score per ``block = (R, C)`` tile of ``weight`` flattened to [out, -1], float32
    [ceil(out / R), ceil(in / C)]: |w| for single weights, the tile's sum of squares for larger
    tiles (edge tiles padded with zeros), uniform random numbers for ``method="random"``. Per-layer
    and global masks both keep the highest scores."""
    rows, cols = block
    w = weight.detach().reshape(weight.shape[0], -1)
    M, K = w.shape
    gm, gk = -(-M // rows), -(-K // cols)
    if method == "random":
        return torch.rand(gm, gk, generator=generator, device=w.device)
    if method != "magnitude":
        raise ValueError(f"method must be 'magnitude' or 'random', got {method!r}")
    if (rows, cols) == (1, 1):
        return w.abs().float()
    padded = torch.zeros(gm * rows, gk * cols, dtype=torch.float32, device=w.device)
    padded[:M, :K] = w.float()
    return padded.reshape(gm, rows, gk, cols).pow(2).sum((1, 3))


def _tile_sizes(weight: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """Weights per tile of :func:`tile_scores` (edge tiles may be partial)."""
    rows, cols = block
    M, K = weight.shape[0], weight[0].numel()
    gm, gk = -(-M // rows), -(-K // cols)
    r = torch.full((gm,), rows)
    r[-1] = M - rows * (gm - 1)
    c = torch.full((gk,), cols)
    c[-1] = K - cols * (gk - 1)
    return r[:, None] * c[None, :]


def _expand_tiles(keep: torch.Tensor, block: Tuple[int, int], weight: torch.Tensor) -> torch.Tensor:
    """A mask of ``weight``'s shape from one keep flag per tile."""
    rows, cols = block
    gm, gk = keep.shape
    full = keep[:, None, :, None].expand(gm, rows, gk, cols).reshape(gm * rows, gk * cols)
    M, K = weight.shape[0], weight[0].numel()
    return full[:M, :K].reshape(weight.shape).contiguous().to(weight.device)


def block_mask(weight: torch.Tensor, sparsity: float, block: Tuple[int, int],
               method: str = "magnitude", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Keeps whole ``block = (R, C)`` tiles of a 2-D (or flattened [out, -1]) weight, scored by
    :func:`tile_scores` (the tile's sum of squares, or random). Edge tiles may be partial."""
    sparsity = _check_sparsity(sparsity)
    scores = tile_scores(weight, block, method, generator)
    return _expand_tiles(_keep_top(scores, sparsity), block, weight)


def global_masks(weights: List[torch.Tensor], sparsity: float, pattern: str = "unstructured",
                 method: str = "magnitude",
                 generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
    """Masks (each of its weight's shape, weights flattened to [out, -1]) from one threshold over
    the :func:`tile_scores` of all ``weights``, keeping ``round((1 - sparsity) * total)`` weights
    in all (whole tiles, so possibly a few more): layers with many small weights lose more."""
    sparsity = _check_sparsity(sparsity)
    kind, shape = parse_pattern(pattern)
    if kind == "nm":
        raise ValueError("global_pruning=True needs an 'unstructured' or 'RxC' block pattern; "
                         "N:M patterns fix the sparsity of every group of M weights already")
    block = (1, 1) if kind == "unstructured" else shape
    scores = [tile_scores(w, block, method, generator) for w in weights]
    flat = torch.cat([s.reshape(-1).cpu() for s in scores])
    keep_weights = int(round((1.0 - sparsity) * sum(w.numel() for w in weights)))
    tile_weights = torch.cat([_tile_sizes(w, block).reshape(-1) for w in weights])
    order = torch.argsort(flat, descending=True, stable=True)
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep_weights > 0:
        cum = tile_weights[order].cumsum(0)
        n_tiles = int(torch.searchsorted(cum, torch.tensor(keep_weights), right=False)) + 1
        kept[order[:min(n_tiles, flat.numel())]] = True
    masks, start = [], 0
    for w, s in zip(weights, scores):
        masks.append(_expand_tiles(kept[start:start + s.numel()].reshape(s.shape), block, w))
        start += s.numel()
    return masks


def build_mask(weight: torch.Tensor, sparsity: float, pattern: str = "unstructured",
               method: str = "magnitude", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Dispatches to the mask builder for ``pattern`` (unstructured or "RxC" blocks)."""
    kind, shape = parse_pattern(pattern)
    if kind == "unstructured":
        if method == "magnitude":
            return magnitude_mask(weight, sparsity)
        if method == "random":
            return random_mask(weight, sparsity, generator)
        raise ValueError(f"method must be 'magnitude' or 'random', got {method!r}")
    if kind == "block":
        return block_mask(weight, sparsity, shape, method, generator)
    raise ValueError(f"build_mask handles unstructured and block patterns, got {pattern!r}")


# ---- N:M semi-structured ------------------------------------------------------------------------
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the ``n`` largest magnitudes in every group of ``m`` consecutive entries along the last
    dimension of any weight (flattened to [out, -1], e.g. conv kernels); a partial last group keeps
    at most ``n`` of its entries."""
    if m not in (4, 8, 16):
        raise ValueError(f"m must be 4, 8 or 16, got {m!r}")
    if not isinstance(n, int) or not 1 <= n < m:
        raise ValueError(f"n must be an integer with 1 <= n < m ({m}), got {n!r}")
    w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach()[None]
    M, K = w.shape
    G = -(-K // m)
    score = torch.full((M, G * m), -1.0, dtype=torch.float32, device=w.device)
    score[:, :K] = torch.nan_to_num(w.abs().float(), nan=0.0)
    idx = torch.topk(score.reshape(M, G, m), n, dim=-1, sorted=False).indices
    keep = torch.zeros(M, G, m, dtype=torch.bool, device=w.device)
    keep.scatter_(-1, idx, True)
    return keep.reshape(M, G * m)[:, :K].reshape(weight.shape).contiguous()


def parse_nm(pattern: str) -> Tuple[int, int]:
    """``"2:4"`` -> (2, 4), checking M in {4, 8, 16} and 1 <= N < M."""
    kind, (n, m) = parse_pattern(pattern)
    if kind != "nm":
        raise ValueError(f"expected an 'N:M' pattern, got {pattern!r}")
    if m not in (4, 8, 16) or not 1 <= n < m:
        raise ValueError(f"N:M pattern {pattern!r} needs M in 4, 8, 16 and 1 <= N < M")
    return n, m

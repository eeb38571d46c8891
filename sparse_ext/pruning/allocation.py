"""Per-layer sparsity for a global target: uniform, ERK, or outlier-weighted (OWL).

Each rule returns {layer: sparsity} whose parameter-weighted mean is the target (up to the clamp to
[0, max_sparsity]), so the model as a whole has the asked-for sparsity.
"""
from typing import Dict, Mapping, Tuple

import torch

from .stats import InputStats
from .wanda import wanda_scores


def _rebalance(sparsity: Dict[str, float], sizes: Mapping[str, int], target: float,
               max_sparsity: float) -> Dict[str, float]:
    """Shifts every layer by the same amount so the size-weighted mean is ``target``, clamping to
    [0, max_sparsity] and spreading what a clamp cuts off over the others."""
    total = sum(sizes.values())
    s = dict(sparsity)
    for _ in range(50):
        mean = sum(s[k] * sizes[k] for k in s) / total
        if abs(mean - target) < 1e-9:
            break
        free = [k for k in s if (mean < target and s[k] < max_sparsity) or (mean > target and s[k] > 0)]
        if not free:
            break
        shift = (target - mean) * total / sum(sizes[k] for k in free)
        for k in free:
            s[k] = min(max_sparsity, max(0.0, s[k] + shift))
    return s


def uniform(shapes: Mapping[str, Tuple[int, int]], target: float) -> Dict[str, float]:
    return {name: target for name in shapes}


def erk(shapes: Mapping[str, Tuple[int, int]], target: float,
        max_sparsity: float = 0.99) -> Dict[str, float]:
    """Erdos-Renyi-Kernel: density proportional to (out + in) / (out * in), so small layers stay
    denser (Evci et al., 2020)."""
    raw = {k: (o + i) / (o * i) for k, (o, i) in shapes.items()}
    sizes = {k: o * i for k, (o, i) in shapes.items()}
    scale = (1.0 - target) * sum(sizes.values()) / sum(raw[k] * sizes[k] for k in shapes)
    start = {k: 1.0 - min(1.0, scale * raw[k]) for k in shapes}
    return _rebalance(start, sizes, target, max_sparsity)


def outlier_ratio(weight: torch.Tensor, stats: InputStats, threshold: float = 5.0) -> float:
    """Fraction of Wanda scores above ``threshold`` times the layer's mean score."""
    scores = wanda_scores(weight, stats)
    return float((scores > threshold * scores.mean()).double().mean())


def owl(ratios: Mapping[str, float], sizes: Mapping[str, int], target: float, lam: float = 0.08,
        max_sparsity: float = 0.99) -> Dict[str, float]:
    """Outlier-weighted layer-wise sparsity (Yin et al., 2024): layers with more activation
    outliers (``outlier_ratio``) keep more weights, within target +- ``lam``."""
    lo, hi = min(ratios.values()), max(ratios.values())
    span = hi - lo
    start = {k: target + lam - 2 * lam * ((r - lo) / span if span > 0 else 0.5)
             for k, r in ratios.items()}
    return _rebalance(start, sizes, target, max_sparsity)

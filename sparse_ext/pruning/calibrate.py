"""Calibrated one-shot pruning of a whole model, layer after layer.

Each layer is pruned on the inputs it receives from the already-pruned layers before it (as the
reference SparseGPT and Wanda implementations do): for every layer in execution order, the
calibration batches run through the model with a hook that collects that layer's input
statistics and stops the forward there; the layer is pruned and its pruned weights are written
back in place, so the next layer sees them. Only one layer's statistics exist at a time.

``calibration`` is an iterable of model inputs: tensors (``model(x)``), tuples (``model(*x)``)
or dicts of tensors (``model(**x)``, as Hugging Face models take them).
"""
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..prune import parse_pattern
from . import allocation as alloc
from .dsnot import dsnot, reconstruction_error
from .sparsegpt import sparsegpt
from .stats import InputStats
from .wanda import wanda

METHODS = {"wanda": wanda, "sparsegpt": sparsegpt}
REFINERS = ("dsnot",)
ALLOCATIONS = ("uniform", "erk", "owl")


@dataclass
class LayerPruning:
    """The outcome for one layer: the kept weights, and the relative reconstruction error
    e(mask) / ||W X||^2 over the calibration inputs, before and after refinement."""

    mask: torch.Tensor
    error: float
    error_before_refine: Optional[float] = None
    sparsity: Optional[float] = None


class _Stop(Exception):
    """Raised by a statistics hook once its layer has seen the batch: nothing after it runs."""


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def weight_matrix(mod: nn.Module) -> torch.Tensor:
    """The weight as a [out, in] matrix (a copy for HF Conv1D and convolutions)."""
    w = mod.weight.detach()
    if _is_conv1d(mod):
        return w.t()
    return w.reshape(w.shape[0], -1)


def write_weight_matrix(mod: nn.Module, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        if _is_conv1d(mod):
            mod.weight.copy_(matrix.t())
        else:
            mod.weight.copy_(matrix.reshape(mod.weight.shape))


def _layer_rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the [tokens, in] rows its weight matrix multiplies."""
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1:
            raise ValueError("calibrated pruning of grouped convolutions is not supported")
        cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, tuple):
        model(*batch)
    else:
        model(batch)


def _collect(model, mod, batches, with_hessian, stop=True) -> InputStats:
    stats = InputStats(weight_matrix(mod).shape[1], with_hessian)

    def hook(_m, args):
        stats.add(_layer_rows(mod, args[0]))
        if stop:
            raise _Stop

    handle = mod.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    _run(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return stats


def execution_order(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> List[str]:
    """Layer names in the order the model first calls them (uncalled ones last, by name)."""
    order: List[str] = []
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
               for n, m in layers.items()]
    try:
        with torch.no_grad():
            _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order + sorted(n for n in layers if n not in order)


def _relative(err: torch.Tensor, weight: torch.Tensor, stats: InputStats) -> float:
    w = weight.double()
    energy = float(((w @ stats.hessian) * w).sum())
    return float(err.sum()) / energy if energy > 0 else 0.0


def allocate(model, layers: Mapping[str, nn.Module], target: float, rule: str, batches) -> Dict[str, float]:
    """Per-layer sparsity for a global ``target`` by ``rule`` (see allocation.py)."""
    shapes = {n: tuple(weight_matrix(m).shape) for n, m in layers.items()}
    if rule == "uniform":
        return alloc.uniform(shapes, target)
    if rule == "erk":
        return alloc.erk(shapes, target)
    # OWL: outlier ratios of the dense model's Wanda scores, one pass with norm-only hooks
    stats = {n: InputStats(shapes[n][1], with_hessian=False) for n in layers}
    handles = [m.register_forward_pre_hook(
        lambda _m, a, n=n, m_=m: stats[n].add(_layer_rows(m_, a[0]))) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                _run(model, batch)
    finally:
        for h in handles:
            h.remove()
    ratios = {n: alloc.outlier_ratio(weight_matrix(layers[n]), stats[n]) for n in layers}
    return alloc.owl(ratios, {n: math.prod(s) for n, s in shapes.items()}, target)


def prune_calibrated(model: nn.Module, layers: Mapping[str, nn.Module],
                     sparsity: Mapping[str, Optional[float]], pattern: str, method: str,
                     calibration, refine: Optional[str] = None,
                     progress: Optional[Callable] = None) -> Dict[str, LayerPruning]:
    """Prunes ``layers`` of ``model`` in place (their weights are overwritten with the pruned,
    possibly updated values) and returns each layer's mask and reconstruction error.

    ``sparsity[name]`` is the layer's target (ignored for N:M). ``progress`` wraps the layer
    iterable (e.g. ``tqdm``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} for calibrated pruning, "
                         f"got {method!r}")
    if refine is not None and refine not in REFINERS:
        raise ValueError(f"refine must be None or 'dsnot', got {refine!r}")
    if refine == "dsnot" and method == "sparsegpt":
        raise ValueError("refine='dsnot' refines masks of methods that keep the weights' values "
                         "(wanda); sparsegpt updates them")
    parse_pattern(pattern)
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration must hold at least one batch of model inputs")
    names = execution_order(model, layers, batches[0])
    results: Dict[str, LayerPruning] = {}
    for name in (progress(names) if progress else names):
        mod = layers[name]
        stats = _collect(model, mod, batches, with_hessian=True)  # the error report needs H
        w = weight_matrix(mod)
        mask, new_w = METHODS[method](w, stats, sparsity.get(name) or 0.0, pattern)
        before = None
        if refine == "dsnot":
            before = _relative(reconstruction_error(w, mask, stats), w, stats)
            mask, _ = dsnot(w, stats, mask, pattern)
        pruned = new_w if new_w is not None else w * mask
        err = ((w.double() - pruned.double()) @ stats.hessian * (w.double() - pruned.double())).sum(1)
        results[name] = LayerPruning(mask=mask, error=_relative(err, w, stats),
                                     error_before_refine=before,
                                     sparsity=1.0 - float(mask.double().mean()))
        write_weight_matrix(mod, pruned.to(mod.weight.dtype))
        del stats
    return results

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

from .._model_inputs import call_model, forward_pre_hooks
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


def _token_mask(batch) -> Optional[torch.Tensor]:
    """The batch's ``attention_mask`` (Hugging Face inputs), whose zeros mark padding."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def _real_tokens(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` [batch, tokens, features] without its padded positions, when ``mask`` describes it:
    padding's hidden states are not inputs the layer serves, and they would skew its Hessian."""
    if mask is None or x.dim() != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(device=x.device).bool()]


def _collect(model, mods: List[nn.Module], batches) -> InputStats:
    """Input statistics of layers that all take the same input, in one pass per batch that stops
    once the last of them has seen it."""
    first = mods[0]
    stats = InputStats(weight_matrix(first).shape[1])
    seen = set()
    current = {"mask": None}

    def hook(m, args):
        if m is first:
            x = args[0] if isinstance(m, nn.Conv2d) else _real_tokens(args[0], current["mask"])
            stats.add(_layer_rows(first, x))
        seen.add(id(m))
        if len(seen) == len(mods):
            raise _Stop

    with forward_pre_hooks((m, hook) for m in mods), torch.no_grad():
        for batch in batches:
            seen.clear()
            current["mask"] = _token_mask(batch)
            try:
                call_model(model, batch)
            except _Stop:
                pass
    return stats


def execution_groups(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> List[List[str]]:
    """Layer names in the order the model first calls them, consecutive layers that receive the
    very same input tensor (attention's q, k, v) grouped: they share one pass and one Hessian.
    Layers the batch never reaches come last, one group each."""
    calls: List[Tuple[str, torch.Tensor]] = []  # the inputs themselves: ids of freed tensors recur
    hooks = [(m, lambda _m, a, n=n:
              calls.append((n, a[0])) if all(c[0] != n for c in calls) else None)
             for n, m in layers.items()]
    with forward_pre_hooks(hooks), torch.no_grad():
        call_model(model, batch)
    groups: List[List[str]] = []
    last_input = None
    for name, inputs in calls:
        shared = (groups and inputs is last_input and
                  isinstance(layers[name], type(layers[groups[-1][0]])) and
                  weight_matrix(layers[name]).shape[1] == weight_matrix(layers[groups[-1][0]]).shape[1])
        if shared:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inputs
    called = {n for n, _ in calls}
    return groups + [[n] for n in sorted(layers) if n not in called]


def execution_order(model: nn.Module, layers: Mapping[str, nn.Module], batch) -> List[str]:
    """Layer names in the order the model first calls them (uncalled ones last, by name)."""
    return [n for group in execution_groups(model, layers, batch) for n in group]


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
    current = {"mask": None}
    hooks = [(m, lambda _m, a, n=n, m_=m: stats[n].add(_layer_rows(
                 m_, a[0] if isinstance(m_, nn.Conv2d) else _real_tokens(a[0], current["mask"]))))
             for n, m in layers.items()]
    with forward_pre_hooks(hooks), torch.no_grad():
        for batch in batches:
            current["mask"] = _token_mask(batch)
            call_model(model, batch)
    ratios = {n: alloc.outlier_ratio(weight_matrix(layers[n]), stats[n]) for n in layers}
    return alloc.owl(ratios, {n: math.prod(s) for n, s in shapes.items()}, target)


def prune_calibrated(model: nn.Module, layers: Mapping[str, nn.Module],
                     sparsity: Mapping[str, Optional[float]], pattern: str, method: str,
                     calibration, refine: Optional[str] = None,
                     progress: Optional[Callable] = None) -> Dict[str, LayerPruning]:
    """Prunes ``layers`` of ``model`` in place (their weights are overwritten with the pruned,
    possibly updated values) and returns each layer's mask and reconstruction error.

    ``sparsity[name]`` is the layer's target (ignored for N:M). ``progress`` wraps the iterable
    of layer groups (e.g. ``tqdm``): layers that take the same input are pruned together."""
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
    groups = execution_groups(model, layers, batches[0])
    results: Dict[str, LayerPruning] = {}
    for group in (progress(groups) if progress else groups):
        stats = _collect(model, [layers[n] for n in group], batches)  # the error report needs H
        for name in group:
            results[name] = _prune_one(layers[name], stats, sparsity.get(name) or 0.0, pattern,
                                       method, refine)
        del stats
    return results


def _prune_one(mod: nn.Module, stats: InputStats, sparsity: float, pattern: str, method: str,
               refine: Optional[str]) -> LayerPruning:
    """Prunes one layer from its input statistics and writes the pruned weights back."""
    w = weight_matrix(mod).clone()  # a view of the parameter, which is overwritten below
    mask, new_w = METHODS[method](w, stats, sparsity, pattern)
    before = None
    if refine == "dsnot":
        before = _relative(reconstruction_error(w, mask, stats), w, stats)
        mask, _ = dsnot(w, stats, mask, pattern)
    pruned = new_w if new_w is not None else w * mask
    diff = w.double() - pruned.double()
    err = ((diff @ stats.hessian) * diff).sum(1)
    write_weight_matrix(mod, pruned.to(mod.weight.dtype))
    return LayerPruning(mask=mask, error=_relative(err, w, stats), error_before_refine=before,
                        sparsity=1.0 - float(mask.double().mean()))

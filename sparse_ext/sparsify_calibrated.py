"""``sparsify(method="wanda" | "sparsegpt", calibration=...)``: the candidates are pruned with
calibration data before conversion (``sparse_ext.pruning``), and each conversion takes its mask.

The candidates' dense weights are overwritten with their pruned (for SparseGPT: updated) values
during pruning, because each layer must see the already-pruned layers before it; a layer whose
conversion then fails gets its original weights back.
"""
import sys
from typing import Dict, List, Optional

import torch

from . import pruning
from .prune import parse_pattern
from .sparsify_select import Candidate

CALIBRATED = tuple(pruning.METHODS)


def check_arguments(method, calibration, refine, allocation, global_pruning, sparsity) -> None:
    calibrated = method in CALIBRATED
    if calibrated and calibration is None:
        raise ValueError(f"method={method!r} needs calibration=... (an iterable of model inputs: "
                         f"tensors, tuples of arguments or dicts of keyword arguments)")
    if not calibrated and calibration is not None:
        raise ValueError(f"calibration is used by method='wanda' or 'sparsegpt', not {method!r}")
    if refine is not None and method != "wanda":
        raise ValueError(f"refine={refine!r} refines the masks of method='wanda' (which keeps "
                         f"the weights' values), got method={method!r}")
    if allocation not in pruning.ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(pruning.ALLOCATIONS)}, got "
                         f"{allocation!r}")
    if allocation != "uniform" and not (calibrated and isinstance(sparsity, float)):
        raise ValueError("allocation='erk' / 'owl' spreads one float sparsity over the layers "
                         "with a calibrated method (wanda, sparsegpt)")
    if calibrated and global_pruning:
        raise ValueError("global_pruning=True is for magnitude pruning; with a calibrated method "
                         "use allocation='owl' or 'erk' to spread the sparsity over the layers")


def _progress():
    """A tqdm bar over the layers on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return lambda names: tqdm(names, desc="pruning", unit="layer")


def prune_candidates(model, candidates: List[Candidate], pattern: str, method: str, calibration,
                     refine: Optional[str], allocation: str,
                     sparsity) -> Dict[str, torch.Tensor]:
    """Prunes the candidates in place; returns their masks (weight-shaped) and fills each report
    row's ``error`` (and ``target`` when the allocation changed it)."""
    layers = {c.name: c.module for c in candidates}
    batches = list(calibration)
    targets = {c.name: c.target for c in candidates}
    if allocation != "uniform" and parse_pattern(pattern)[0] != "nm":
        targets = pruning.allocate(model, layers, float(sparsity), allocation, batches)
        for c in candidates:
            c.target = c.row.target = targets[c.name]
    results = pruning.prune_calibrated(model, layers, targets, pattern, method, batches,
                                       refine=refine, progress=_progress())
    masks = {}
    for c in candidates:
        res = results[c.name]
        c.row.error = res.error
        mask = res.mask
        if c.kind == "Conv2d":
            mask = mask.reshape(c.module.weight.shape)
        masks[c.name] = mask
    return masks


def snapshot(candidates: List[Candidate]) -> Dict[str, torch.Tensor]:
    return {c.name: c.module.weight.detach().clone() for c in candidates}


def restore(candidates: List[Candidate], original: Dict[str, torch.Tensor], names) -> None:
    for c in candidates:
        if c.name in names:
            with torch.no_grad():
                c.module.weight.copy_(original[c.name])

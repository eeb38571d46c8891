"""Model-level swapping: ``sparsify`` turns eligible ``nn.Linear`` / ``nn.Conv2d`` layers sparse,
``densify`` turns them back.

    model, report = sparse_ext.sparsify(model, sparsity=0.9)
    print(report)                      # one row per layer: shape, pattern, sparsity, bytes
    sparse_ext.densify(model)          # back to nn.Linear / nn.Conv2d (pruned weights stay zero)

Which layers are swapped
  * ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; becomes a SparseLinear) and ``nn.Conv2d``
    (when this build has ``SparseConv2d``), except
    those owned by ``nn.MultiheadAttention`` or by a sparse_ext module such as ``MoELayer``
    (their owners read ``.weight`` directly), or whose parent's ``forward`` source reads
    ``self.<child>.weight`` (T5's FFN reads ``self.wo.weight.dtype``).
  * Not layers whose smaller dimension is below ``min_features`` (the kernels cannot beat dense
    there; 64 for linears, 16 channels for convs by default), not depthwise convolutions, not
    layers whose weight is tied to another module's.
  * ``include`` / ``exclude``: a module name, an ``fnmatch`` glob (``"encoder.*.fc?"``) or a list
    of them; a pattern also matches every module below a matched name (``"encoder"`` covers
    ``"encoder.layer.0.fc1"``). When ``include`` is given only matching layers are candidates and
    they are *forced*: the size and depthwise heuristics do not apply to them. ``exclude`` wins.
  * A layer whose sparse module refuses it (``from_dense`` raises ValueError: a grouped conv, a
    shape the pattern does not divide) stays dense, with the error in the report.

Pruning
  * per layer (default): each layer reaches ``sparsity`` on its own
    (``SparseLinear.from_dense(layer, sparsity=, pattern=, method=)``);
  * with calibration data (``method="wanda"`` or ``"sparsegpt"``, ``calibration=batches``): the
    layers are pruned one after another on the inputs the already-pruned layers give them
    (``sparse_ext.pruning``), optionally refined (``refine="dsnot"``) and with the sparsity spread
    over the layers (``allocation="owl"`` / ``"erk"``); the report gives each layer's
    reconstruction error;
  * ``global_pruning=True``: one magnitude threshold across all candidate layers (for
    ``"unstructured"`` and block ``"RxC"`` patterns), so overall ``sparsity`` is met exactly and
    layers with many small weights lose more of them. Masks go in via ``from_dense(mask=...)``.
"""
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import _layer_speed, sparsify_calibrated
from .prune import _check_sparsity, global_masks, parse_pattern
from .sparsify_report import LayerReport, SparsifyReport  # noqa: F401  (exported here)
from .sparsify_report import moe_report_rows
from .sparsify_select import (Candidate, Patterns, as_linear, conv_class, linear_weight,
                              matches, parse_min_features, select_layers, sparse_types)

__all__ = ["LayerReport", "SparsifyReport", "densify", "sparsify"]


# ---- swapping ----------------------------------------------------------------------------------
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _convert(module: nn.Module, kind: str, mask, sparsity, pattern, method, generator):
    if kind in ("Linear", "Conv1D"):
        from .nn import SparseLinear as cls
    else:
        cls = conv_class()
    kwargs = {"pattern": pattern, "method": method}
    if mask is not None:
        kwargs["mask"] = mask
    elif sparsity is not None:
        kwargs["sparsity"] = sparsity
    if generator is not None and mask is None and method == "random":
        kwargs["generator"] = generator
    new = cls.from_dense(as_linear(module) if kind == "Conv1D" else module, **kwargs)
    device = module.weight.device
    if device.type != "cpu":
        new = new.to(device)
    _copy_training_state(module, new)
    return new


def _copy_training_state(src: nn.Module, dst: nn.Module) -> None:
    """Train/eval mode and frozen weights carry over from ``src`` to ``dst``."""
    dst.train(src.training)
    w_grad = src.weight.requires_grad if isinstance(getattr(src, "weight", None), torch.Tensor) \
        else True
    b = getattr(src, "bias", None)
    b_grad = b.requires_grad if isinstance(b, torch.Tensor) else True
    for name, p in dst.named_parameters(recurse=False):
        p.requires_grad_(b_grad if name == "bias" else w_grad)


def sparsify(model: nn.Module, sparsity: Union[None, float, Mapping[str, float]] = None,
             pattern: str = "unstructured",
             method: str = "magnitude", include: Patterns = None, exclude: Patterns = None,
             min_features: Union[None, int, Mapping[str, int]] = None,
             global_pruning: bool = False,
             generator: Optional[torch.Generator] = None,
             only_if_faster: bool = False,
             example_inputs=None,
             calibration=None,
             refine: Optional[str] = None,
             allocation: str = "uniform",
             moe: bool = False,
             prune_experts: bool = False) -> Tuple[nn.Module, SparsifyReport]:
    """Swaps eligible ``nn.Linear`` (and ``nn.Conv2d`` when ``sparse_ext.SparseConv2d`` exists)
    layers of ``model`` in place for sparse ones; returns ``(model, report)``.

    Args:
      sparsity: fraction of zeros to reach (per layer, or overall with ``global_pruning``).
        Optional for ``"N:M"`` patterns, whose sparsity is 1 - N/M. Or a dict from layer name /
        glob to sparsity, e.g. ``{"*.attention.*": 0.5, "*": 0.9}``: the first matching key (in
        the dict's order) sets a layer's sparsity; layers matching no key stay dense.
      pattern: ``"unstructured"``, a block shape ``"RxC"`` or ``"N:M"``; passed to ``from_dense``.
      method: ``"magnitude"`` (default), ``"random"``, or with ``calibration``: ``"wanda"``
        (|W| x input norms, per row) or ``"sparsegpt"`` (inverse-Hessian pruning that also
        updates the kept weights).
      include / exclude: names or ``fnmatch`` globs (see the module docstring); ``include``
        restricts to and forces the matching layers, ``exclude`` always wins.
      min_features: skip layers whose smaller dimension (``in_features`` or ``out_features``;
        ``in_channels/groups`` or ``out_channels`` for convs) is below this. An int for both
        kinds, or a dict ``{"Linear": 64, "Conv2d": 16}`` (the default, None).
      global_pruning: one magnitude threshold across all candidate layers.
      generator: for ``method="random"``.
      only_if_faster: time each converted layer against its dense original on this machine
        (interleaved medians) and keep it dense when the sparse one is not faster; the report
        gives each layer's measured speedup, or why it stayed dense. With ``global_pruning``
        the layers left dense lower the overall sparsity reached.
      example_inputs: what ``model`` takes (a tensor, a tuple of arguments or a dict of keyword
        arguments): with ``only_if_faster``, each layer is timed on the input shape it sees in
        ``model(example_inputs)``. Without it: 16 tokens for linears, a 56x56 image for convs.
      calibration: for ``method="wanda"`` / ``"sparsegpt"``: an iterable of model inputs (tensors,
        tuples of arguments, or dicts of keyword arguments as Hugging Face models take them),
        a few hundred samples in all; run under ``torch.no_grad``.
      refine: ``"dsnot"`` to refine Wanda's masks by prune-and-grow swaps that lower each row's
        reconstruction error (N:M groups stay N:M).
      moe: swap every Hugging Face sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) for a
        ``sparse_ext.MoELayer`` first (same weights; sparse dispatch, dense experts). Without it
        such blocks are left as they are; either way the report has a row for each.
      prune_experts: with ``moe=True``, also prune every expert matrix on its own with the same
        ``sparsity`` / ``pattern`` and ``method`` (``"magnitude"`` or ``"random"``; a sparsity
        dict is matched against the block's name) into ``MoELayer.sparse_experts``;
        ``include`` / ``exclude`` apply to the linear layers only.
      allocation: how one float ``sparsity`` is spread over the layers with a calibrated method:
        ``"uniform"`` (default), ``"erk"`` (small layers denser) or ``"owl"`` (layers with more
        activation outliers denser); the overall sparsity stays ``sparsity``.

    The returned ``model`` is the same object, except when ``model`` itself is a single layer,
    which cannot be swapped in place: then it is the new sparse module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    kind_, _ = parse_pattern(pattern)
    if sparsity is None and kind_ != "nm":
        raise ValueError(f"sparsify needs sparsity=... for pattern {pattern!r}")
    if global_pruning and kind_ == "nm":
        raise ValueError("global_pruning=True needs an 'unstructured' or 'RxC' block pattern; "
                         "N:M patterns fix the sparsity of every group of M weights already")
    per_layer: Optional[Dict[str, float]] = None
    if isinstance(sparsity, Mapping):
        if global_pruning:
            raise ValueError("global_pruning=True takes one overall sparsity, not a dict")
        per_layer = {}
        for key, value in sparsity.items():
            if not isinstance(key, str):
                raise TypeError(f"sparsity dict keys must be layer names or globs, got {key!r}")
            per_layer[key] = _check_sparsity(value)
    elif sparsity is not None:
        sparsity = _check_sparsity(sparsity)
    if method not in ("magnitude", "random") + sparsify_calibrated.CALIBRATED:
        raise ValueError(f"method must be 'magnitude', 'random', 'wanda' or 'sparsegpt', got "
                         f"{method!r}")
    sparsify_calibrated.check_arguments(method, calibration, refine, allocation, global_pruning,
                                        sparsity)
    min_features = parse_min_features(min_features)

    report = SparsifyReport(global_pruning=global_pruning)
    moe_rows = moe_report_rows(model, swap=moe, prune=_expert_pruner(
        moe, prune_experts, pattern, sparsity, per_layer, method, generator))
    report.layers, candidates = select_layers(model, pattern, sparsity, per_layer, include,
                                              exclude, min_features)
    report.layers = moe_rows + report.layers
    calibrated_masks, original = {}, {}
    if method in sparsify_calibrated.CALIBRATED and candidates:
        original = sparsify_calibrated.snapshot(candidates)
        calibrated_masks = sparsify_calibrated.prune_candidates(
            model, candidates, pattern, method, calibration, refine, allocation, sparsity)
    # Convert every candidate; with global pruning, a layer that refuses its mask (a grouped
    # conv, say) leaves the set and the threshold is recomputed over the rest, so the overall
    # sparsity holds for the layers actually swapped.
    converted = {}
    while True:
        masks = [calibrated_masks.get(c.name) for c in candidates]
        if global_pruning and candidates:
            masks = global_masks([linear_weight(c.module) for c in candidates], float(sparsity),
                                  pattern, method, generator)
        converted.clear()
        failed = []
        for c, mask in zip(candidates, masks):
            try:
                converted[c.name] = _convert(c.module, c.kind, mask, c.target, pattern,
                                             "magnitude" if mask is not None else method,
                                             generator)
            except NotImplementedError:
                raise  # the build cannot do this pattern at all: say so, don't skip every layer
            except (ValueError, TypeError, RuntimeError) as exc:
                # this layer cannot be served (a grouped conv, a shape the pattern does not
                # divide...): it stays dense, forced or not, and the report says why
                c.row.reason = f"{type(exc).__name__}: {exc}"
                failed.append(c.name)
        if not failed or not global_pruning:
            break
        candidates = [c for c in candidates if c.name not in failed]

    if only_if_faster:
        _keep_dense_where_slower(model, candidates, converted, example_inputs)
    if original:  # a layer that stays dense keeps its unpruned weights
        sparsify_calibrated.restore(candidates, original,
                                    [c.name for c in candidates if c.name not in converted])

    replaced_root = None
    for c in candidates:
        new = converted.get(c.name)
        if new is None:
            continue
        weight = new.weight_format()
        c.row.status = "sparse"
        c.row.reason = ""
        c.row.sparsity = weight.zero_fraction()
        c.row.sparse_bytes = weight.nbytes
        if c.name == "":
            replaced_root = new
        else:
            _set_module(model, c.name, new)
    return (replaced_root if replaced_root is not None else model), report


def _expert_pruner(moe: bool, prune_experts: bool, pattern: str, sparsity, per_layer, method: str,
                   generator):
    """``prune(name, layer)`` for ``moe_report_rows``, or None when experts stay dense."""
    if not prune_experts:
        return None
    if not moe:
        raise ValueError("prune_experts=True needs moe=True: experts are pruned inside the "
                         "MoELayer that replaces each Hugging Face MoE block")
    if method not in ("magnitude", "random"):
        raise ValueError(f"prune_experts prunes by method='magnitude' or 'random', got "
                         f"{method!r}: the calibrated methods do not see expert inputs; prune "
                         f"the linears with it and the experts in a second call, or call "
                         f"MoELayer.sparsify_experts yourself")

    def prune(name: str, layer: nn.Module) -> bool:
        value = sparsity
        if per_layer is not None:
            value = next((v for key, v in per_layer.items() if matches(name, [key])), None)
            if value is None:
                return False
        layer.sparsify_experts(value, pattern, method, generator)
        return True

    return prune


def _keep_dense_where_slower(model: nn.Module, candidates: List[Candidate],
                             converted: Dict[str, nn.Module], example_inputs) -> None:
    """Times every converted layer against its dense original; drops the slower conversions
    from ``converted`` and records the outcome in each row."""
    shapes = {}
    if example_inputs is not None:
        shapes = _layer_speed.capture_input_shapes(
            model, {c.name: c.module for c in candidates if c.name in converted}, example_inputs)
    for c in candidates:
        new = converted.get(c.name)
        if new is None:
            continue
        shape = shapes.get(c.name) or _layer_speed.default_input_shape(new)
        speedup = _layer_speed.dense_over_sparse(c.module, new, shape,
                                                 dtype=linear_weight(c.module).dtype)
        c.row.speedup = speedup
        if speedup < 1.0:
            del converted[c.name]
            c.row.reason = (f"kept dense: sparse ran {speedup:.2f}x the dense speed here "
                          f"(input {tuple(shape)})")


def densify(model: nn.Module) -> nn.Module:
    """Replaces every sparse_ext module in ``model`` by its dense equivalent (``to_dense()``), in
    place, and gives every ``MoELayer`` with pruned experts dense ``w1`` / ``w2`` again. Pruned
    weights stay zero: ``densify(sparsify(m)[0])`` computes what the sparse model did.
    Returns ``model`` (or the dense layer when ``model`` itself is a sparse module)."""
    types = sparse_types()
    if isinstance(model, types):
        return _dense_equivalent(model)
    for mod in model.modules():
        densify_experts = getattr(mod, "densify_experts", None)  # MoELayer's pruned experts
        if densify_experts is not None:
            densify_experts()
    for name, mod in list(model.named_modules()):
        if name and isinstance(mod, types):
            _set_module(model, name, _dense_equivalent(mod))
    return model


_ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6}


def _dense_equivalent(mod: nn.Module) -> nn.Module:
    """``mod.to_dense()``, followed by the activation the sparse module fused (if any)."""
    dense = mod.to_dense()
    _copy_training_state_from_sparse(mod, dense)
    act = getattr(mod, "activation", None)
    if act is None:
        return dense
    if isinstance(act, str) and act in _ACTIVATIONS:
        act_module = _ACTIVATIONS[act]()
    elif isinstance(act, (tuple, list)) and len(act) == 2:
        act_module = nn.Hardtanh(float(act[0]), float(act[1]))
    else:
        raise ValueError(f"cannot densify a module with fused activation {act!r}")
    seq = nn.Sequential(dense, act_module)
    seq.train(mod.training)
    return seq


def _copy_training_state_from_sparse(src: nn.Module, dst: nn.Module) -> None:
    dst.train(src.training)
    grads = {name: p.requires_grad for name, p in src.named_parameters(recurse=False)}
    w_grad = any(v for k, v in grads.items() if k != "bias") if grads else True
    for name, p in dst.named_parameters(recurse=False):
        p.requires_grad_(grads.get("bias", True) if name == "bias" else w_grad)

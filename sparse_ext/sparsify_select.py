"""Which layers ``sparsify`` converts, and why the others stay dense.

Candidates are ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d`` layers; a layer is
skipped (with the reason in its report row) when ``include`` / ``exclude`` say so, when its owner
reads its ``.weight`` directly, when its weight is tied, when its dtype has no kernel, or (unless
``include`` forces it) when it is depthwise or thinner than ``min_features``.
"""
import fnmatch
import functools
import inspect
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .sparsify_report import LayerReport, sparse_module_row

Patterns = Union[None, str, Sequence[str]]


@dataclass
class Candidate:
    """A layer ``sparsify`` converts, with its report row and its sparsity target."""

    name: str
    module: nn.Module
    kind: str                  # "Linear", "Conv1D" or "Conv2d"
    row: LayerReport
    target: Optional[float]


# ---- name matching -----------------------------------------------------------------------------
def as_patterns(patterns: Patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"include/exclude take names or globs (str), got {type(p).__name__}")
    return out


def matches(name: str, patterns: List[str]) -> bool:
    for pat in patterns:
        if name == pat or fnmatch.fnmatchcase(name, pat):
            return True
        # a pattern naming a parent module covers everything below it
        parts = name.split(".")
        for i in range(1, len(parts)):
            if fnmatch.fnmatchcase(".".join(parts[:i]), pat):
                return True
    return False


# ---- layer kinds -------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError, AttributeError):
        return ""


def _parent_reads_weight(model: nn.Module, name: str) -> Optional[str]:
    """The parent's class name when its forward reads ``self.<child>.weight`` (T5's FFN checks
    ``self.wo.weight.dtype``): swapping that child would break the parent."""
    parent_name, _, child = name.rpartition(".")
    if not child:
        return None
    parent = model.get_submodule(parent_name) if parent_name else model
    src = _forward_source(type(parent))
    if src and re.search(rf"self\.{re.escape(child)}\.weight\b", src):
        return type(parent).__name__
    return None


def sparse_types() -> tuple:
    from . import nn as se_nn

    types = [se_nn.SparseLinear]
    conv = getattr(se_nn, "SparseConv2d", None)
    if conv is not None:
        types.append(conv)
    return tuple(types)


def conv_class():
    import sparse_ext

    return getattr(sparse_ext, "SparseConv2d", None)


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, sparse_types()):
        return None
    if isinstance(module, nn.Linear):
        return "Linear"
    if _is_hf_conv1d(module):
        return "Conv1D"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    return None


DEFAULT_MIN_FEATURES = {"Linear": 64, "Conv2d": 16}


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and friends): a linear layer with weight [in, out]."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and tuple(module.weight.shape) == (module.nx, module.nf))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an nn.Linear holds it, [out, in] (a view for HF Conv1D)."""
    return module.weight.t() if _is_hf_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """HF Conv1D -> the equivalent nn.Linear (weight transposed); nn.Linear as is."""
    if not _is_hf_conv1d(module):
        return module
    w = module.weight.detach()
    linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, dtype=w.dtype,
                       device=w.device)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.weight.requires_grad_(module.weight.requires_grad)
    return linear


def _too_small(module: nn.Module, kind: str, min_features: Dict[str, int]) -> Optional[str]:
    if kind == "Conv1D":
        dims = (module.nx, module.nf)
        kind = "Linear"
    elif kind == "Linear":
        dims = (module.in_features, module.out_features)
    else:
        # a conv's work also scales with its output pixels: only thin channel counts are tiny
        dims = (module.in_channels // module.groups, module.out_channels)
    if min(dims) < min_features[kind]:
        return f"smaller than min_features={min_features[kind]}"
    return None


def parse_min_features(value) -> Dict[str, int]:
    if value is None:
        return dict(DEFAULT_MIN_FEATURES)
    if isinstance(value, Mapping):
        out = dict(DEFAULT_MIN_FEATURES)
        for k, v in value.items():
            if k not in out:
                raise ValueError(f"min_features keys are 'Linear' and 'Conv2d', got {k!r}")
            out[k] = v
    else:
        out = {k: value for k in DEFAULT_MIN_FEATURES}
    for v in out.values():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"min_features must be a non-negative int, got {value!r}")
    return out


def _owned_layers(model: nn.Module) -> Dict[int, str]:
    """id -> owner of the layers whose owners read their .weight directly: those inside an
    nn.MultiheadAttention (out_proj) or a sparse_ext module (MoELayer's router, say)."""
    owned: Dict[int, str] = {}
    for mod in model.modules():
        owner = None
        if isinstance(mod, nn.MultiheadAttention):
            owner = "nn.MultiheadAttention"
        elif type(mod).__module__.startswith("sparse_ext.") and _kind(mod) is None \
                and not isinstance(mod, sparse_types()):
            owner = f"sparse_ext.{type(mod).__name__}"
        if owner:
            for m in mod.modules():
                if m is not mod:
                    owned.setdefault(id(m), owner)
    return owned


def _weight_owners(model: nn.Module) -> Dict[int, int]:
    """id(weight) -> how many modules hold it (more than one: tied)."""
    owners: Dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners[id(w)] = owners.get(id(w), 0) + 1
    return owners


def select_layers(model: nn.Module, pattern: str, sparsity: Optional[float],
                  per_layer: Optional[Dict[str, float]], include: Patterns, exclude: Patterns,
                  min_features: Dict[str, int]) -> Tuple[List[LayerReport], List[Candidate]]:
    """A report row for every layer of ``model`` sparsify knows (skipped ones with their reason,
    sparse_ext modules as "already sparse"), and the candidates to convert."""
    includes, excludes = as_patterns(include), as_patterns(exclude)
    owners = _weight_owners(model)
    owned = _owned_layers(model)
    rows: List[LayerReport] = []
    candidates: List[Candidate] = []
    for name, mod in model.named_modules():
        if isinstance(mod, sparse_types()):
            if id(mod) in owned:
                continue  # a MoELayer's pruned expert: the MoE block's row covers it
            rows.append(sparse_module_row(name, mod, "already sparse",
                                          "already sparse (left as it is)"))
            continue
        kind = _kind(mod)
        if kind is None:
            continue
        row = LayerReport(name=name, kind=kind, shape=tuple(mod.weight.shape), pattern=pattern,
                          status="skipped",
                          dense_bytes=mod.weight.numel() * mod.weight.element_size())
        forced = bool(includes) and matches(name, includes)
        target = sparsity
        if per_layer is not None:
            target = next((v for k, v in per_layer.items() if matches(name, [k])), None)
        row.target = target
        reason = None
        if excludes and matches(name, excludes):
            reason = "excluded"
        elif includes and not forced:
            reason = "not included"
        elif per_layer is not None and target is None:
            reason = "no sparsity given for this layer"
        elif kind == "Conv2d" and conv_class() is None:
            reason = "SparseConv2d not available in this build"
        elif id(mod) in owned:
            reason = f"owned by {owned[id(mod)]} (reads .weight directly)"
        elif _parent_reads_weight(model, name):
            reason = (f"{_parent_reads_weight(model, name)}.forward reads "
                      f"{name.rpartition('.')[2]}.weight directly")
        elif owners.get(id(mod.weight), 0) > 1:
            reason = "weight is tied to another module"
        elif mod.weight.dtype not in (torch.float32, torch.bfloat16, torch.float64):
            reason = f"dtype {mod.weight.dtype} not supported"
        elif not forced and kind == "Conv2d" and mod.groups > 1 and mod.groups == mod.in_channels:
            reason = "depthwise convolution"
        elif not forced:
            reason = _too_small(mod, kind, min_features)
        rows.append(row)
        if reason:
            row.reason = reason
        else:
            candidates.append(Candidate(name, mod, kind, row, target))

    if includes and not any(matches(r.name, includes) for r in rows):
        layers = [r.name for r in rows if r.status == "skipped"]
        warnings.warn(f"sparsify: include={include!r} matches no Linear or Conv2d layer of the "
                      f"model, so nothing is sparsified; its layers are "
                      f"{layers[:8] + (['...'] if len(layers) > 8 else [])}", stacklevel=3)
    return rows, candidates

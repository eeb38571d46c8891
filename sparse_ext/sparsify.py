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
  * ``global_pruning=True``: one magnitude threshold across all candidate layers (for
    ``"unstructured"`` and block ``"RxC"`` patterns), so overall ``sparsity`` is met exactly and
    layers with many small weights lose more of them. Masks go in via ``from_dense(mask=...)``.
"""
import fnmatch
import functools
import inspect
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _layer_speed
from .prune import _check_sparsity, parse_pattern

Patterns = Union[None, str, Sequence[str]]

__all__ = ["LayerReport", "SparsifyReport", "densify", "sparsify"]


# ---- report ------------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One row of a :class:`SparsifyReport`."""

    name: str
    kind: str                          # "Linear" or "Conv2d"
    shape: Tuple[int, ...]             # the weight's shape
    pattern: str
    status: str                        # "sparse", "skipped" or "already sparse"
    reason: str = ""                   # why skipped ("" when swapped)
    sparsity: Optional[float] = None   # fraction of zero weights reached (None when skipped)
    dense_bytes: int = 0               # dense weight bytes (bias not counted)
    sparse_bytes: Optional[int] = None  # bytes the sparse kernels read for the weight
    target: Optional[float] = None     # the sparsity asked for (None: set by an N:M pattern)
    speedup: Optional[float] = None    # dense time / sparse time, when only_if_faster measured it

    @property
    def ratio(self) -> Optional[float]:
        if self.sparse_bytes is None or not self.dense_bytes:
            return None
        return self.sparse_bytes / self.dense_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["ratio"] = self.ratio
        return d


@dataclass(repr=False)
class SparsifyReport:
    """What ``sparsify`` did, layer by layer. ``str(report)`` is a table; ``to_dicts()`` is JSON-ready."""

    layers: List[LayerReport] = field(default_factory=list)
    global_pruning: bool = False

    # container protocol: iterate rows, look up by layer name
    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerReport:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(name)

    def __contains__(self, name) -> bool:
        return any(row.name == name for row in self.layers)

    @property
    def sparsified(self) -> List[LayerReport]:
        return [r for r in self.layers if r.status == "sparse"]

    @property
    def skipped(self) -> List[LayerReport]:
        return [r for r in self.layers if r.status == "skipped"]

    @property
    def already_sparse(self) -> List[LayerReport]:
        """Layers that were sparse_ext modules before the call (left as they are)."""
        return [r for r in self.layers if r.status == "already sparse"]

    @property
    def dense_bytes(self) -> int:
        """Dense weight bytes of the swapped layers."""
        return sum(r.dense_bytes for r in self.sparsified)

    @property
    def sparse_bytes(self) -> int:
        """Sparse weight bytes of the swapped layers."""
        return sum(r.sparse_bytes or 0 for r in self.sparsified)

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights over all swapped layers (weighted by size)."""
        total = sum(_numel(r.shape) for r in self.sparsified)
        zeros = sum(_numel(r.shape) * r.sparsity for r in self.sparsified)
        return zeros / total if total else 0.0

    def to_dicts(self) -> List[dict]:
        return [r.as_dict() for r in self.layers]

    def table(self) -> str:
        headers = ["layer", "kind", "shape", "pattern", "sparsity", "dense KiB", "sparse KiB",
                   "ratio", "note"]
        rows = []
        for r in self.layers:
            sparse = r.status != "skipped"
            rows.append([
                r.name or "<root>", r.kind, "x".join(str(s) for s in r.shape),
                r.pattern if sparse else "-",
                f"{r.sparsity:.3f}" if sparse else "-",
                f"{r.dense_bytes / 1024:.1f}",
                f"{r.sparse_bytes / 1024:.1f}" if sparse else "-",
                f"{r.ratio:.3f}" if sparse and r.ratio is not None else "-",
                (r.reason or (f"{r.speedup:.2f}x faster than dense here" if r.speedup else ""))
                if sparse else f"skipped: {r.reason}",
            ])
        if self.sparsified:
            ratio = self.sparse_bytes / self.dense_bytes if self.dense_bytes else 0.0
            rows.append([f"total ({len(self.sparsified)} sparse, {len(self.skipped)} skipped"
                         + (f", {len(self.already_sparse)} already sparse)" if self.already_sparse
                            else ")"),
                         "", "", "global" if self.global_pruning else "per-layer",
                         f"{self.sparsity:.3f}", f"{self.dense_bytes / 1024:.1f}",
                         f"{self.sparse_bytes / 1024:.1f}", f"{ratio:.3f}", ""])
        else:
            rows.append([f"total (0 sparse, {len(self.skipped)} skipped"
                         + (f", {len(self.already_sparse)} already sparse)" if self.already_sparse
                            else ")")] + [""] * 8)
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
        right = {4, 5, 6, 7}

        def fmt(cells):
            out = [str(c).rjust(w) if i in right else str(c).ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(out).rstrip()

        sep = "  ".join("-" * w for w in widths)
        lines = [fmt(headers), sep] + [fmt(r) for r in rows[:-1]] + [sep, fmt(rows[-1])]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    __repr__ = __str__   # shows the table in a REPL or notebook, like a DataFrame


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---- name matching -----------------------------------------------------------------------------
def _as_patterns(patterns: Patterns) -> List[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"include/exclude take names or globs (str), got {type(p).__name__}")
    return out


def _matches(name: str, patterns: List[str]) -> bool:
    for pat in patterns:
        if name == pat or fnmatch.fnmatchcase(name, pat):
            return True
        # a pattern naming a parent module covers everything below it
        parts = name.split(".")
        for i in range(1, len(parts)):
            if fnmatch.fnmatchcase(".".join(parts[:i]), pat):
                return True
    return False


# ---- candidates --------------------------------------------------------------------------------
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


def _sparse_types() -> tuple:
    from . import nn as se_nn

    types = [se_nn.SparseLinear]
    conv = getattr(se_nn, "SparseConv2d", None)
    if conv is not None:
        types.append(conv)
    return tuple(types)


def _conv_class():
    import sparse_ext

    return getattr(sparse_ext, "SparseConv2d", None)


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, _sparse_types()):
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


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as an nn.Linear holds it, [out, in] (a view for HF Conv1D)."""
    return module.weight.t() if _is_hf_conv1d(module) else module.weight


def _as_linear(module: nn.Module) -> nn.Linear:
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


def _min_features(value) -> Dict[str, int]:
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


def _sparse_nbytes(module: nn.Module) -> int:
    n = getattr(module, "weight_nbytes", None)
    if isinstance(n, int):
        return n
    total = 0
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if name != "bias" and t is not None:
            total += t.numel() * t.element_size()
    return total


def _zero_fraction(module: nn.Module) -> float:
    """Fraction of zeros in the module's effective weight (explicit zeros of blocks included),
    from the stored values: unstored positions plus stored zeros. N:M slots past in_features hold
    zeros (a validated weight), so they add one to nnz and one to the stored zeros alike."""
    from .formats import CSRWeight, NMWeight

    fmt = getattr(module, "weight_format", None)
    weight = fmt() if callable(fmt) else None
    if isinstance(weight, (CSRWeight, NMWeight)):
        total = weight.shape[0] * weight.shape[1]
        zeros = total - weight.nnz + int((weight.values == 0).sum())
        return zeros / max(total, 1)
    dense = module.to_dense()
    w = dense.weight.detach()
    return float((w == 0).sum()) / max(w.numel(), 1)


# ---- global masks ------------------------------------------------------------------------------
def _tile_scores(weight: torch.Tensor, block: Tuple[int, int], method: str,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """Scores of ``block`` tiles of ``weight`` flattened to [out, -1] (partial edge tiles)."""
    rows, cols = block
    w = weight.detach().reshape(weight.shape[0], -1)
    M, K = w.shape
    gm, gk = -(-M // rows), -(-K // cols)
    if method == "random":
        return torch.rand(gm, gk, generator=generator)
    padded = torch.zeros(gm * rows, gk * cols, dtype=torch.float32)
    padded[:M, :K] = w.float().cpu().abs()
    tiles = padded.reshape(gm, rows, gk, cols)
    # mean (not sum) so that partial edge tiles compete fairly; equal to |w| for 1x1 tiles
    counts = torch.zeros(gm * rows, gk * cols)
    counts[:M, :K] = 1
    n = counts.reshape(gm, rows, gk, cols).sum((1, 3)).clamp_min(1)
    return tiles.pow(2).sum((1, 3)) / n if (rows, cols) != (1, 1) else tiles.reshape(gm, gk)


def _global_masks(weights: List[torch.Tensor], sparsity: float, pattern: str, method: str,
                  generator: Optional[torch.Generator]) -> List[torch.Tensor]:
    """Masks (each of its weight's shape) from one threshold over all ``weights``."""
    kind, shape = parse_pattern(pattern)
    if kind == "nm":
        raise ValueError("global_pruning=True needs an 'unstructured' or 'RxC' block pattern; "
                         "N:M patterns fix the sparsity of every group of M weights already")
    if method not in ("magnitude", "random"):
        raise ValueError(f"method must be 'magnitude' or 'random', got {method!r}")
    block = (1, 1) if kind == "unstructured" else shape
    scores = [_tile_scores(w, block, method, generator) for w in weights]
    flat = torch.cat([s.reshape(-1) for s in scores])
    # keep the same number of weights as per-layer pruning would over the whole set
    total_weights = sum(w.numel() for w in weights)
    keep_weights = int(round((1.0 - sparsity) * total_weights))
    tile_weights = torch.cat([_tile_sizes(w, block).reshape(-1) for w in weights])
    order = torch.argsort(flat, descending=True, stable=True)
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep_weights > 0:
        cum = tile_weights[order].cumsum(0)
        n_tiles = int(torch.searchsorted(cum, torch.tensor(keep_weights), right=False)) + 1
        kept[order[:min(n_tiles, flat.numel())]] = True
    masks, start = [], 0
    for w, s in zip(weights, scores):
        k = kept[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
        rows, cols = block
        gm, gk = s.shape
        full = k[:, None, :, None].expand(gm, rows, gk, cols).reshape(gm * rows, gk * cols)
        M = w.shape[0]
        K = w[0].numel()
        masks.append(full[:M, :K].reshape(w.shape).contiguous().to(w.device))
    return masks


def _tile_sizes(weight: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    rows, cols = block
    M = weight.shape[0]
    K = weight[0].numel()
    gm, gk = -(-M // rows), -(-K // cols)
    r = torch.full((gm,), rows)
    r[-1] = M - rows * (gm - 1)
    c = torch.full((gk,), cols)
    c[-1] = K - cols * (gk - 1)
    return r[:, None] * c[None, :]


# ---- swapping ----------------------------------------------------------------------------------
def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _convert(module: nn.Module, kind: str, mask, sparsity, pattern, method, generator):
    if kind in ("Linear", "Conv1D"):
        from .nn import SparseLinear as cls
    else:
        cls = _conv_class()
    kwargs = {"pattern": pattern, "method": method}
    if mask is not None:
        kwargs["mask"] = mask
    elif sparsity is not None:
        kwargs["sparsity"] = sparsity
    if generator is not None and mask is None and method == "random":
        kwargs["generator"] = generator
    new = cls.from_dense(_as_linear(module) if kind == "Conv1D" else module, **kwargs)
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
             example_inputs=None) -> Tuple[nn.Module, SparsifyReport]:
    """Swaps eligible ``nn.Linear`` (and ``nn.Conv2d`` when ``sparse_ext.SparseConv2d`` exists)
    layers of ``model`` in place for sparse ones; returns ``(model, report)``.

    Args:
      sparsity: fraction of zeros to reach (per layer, or overall with ``global_pruning``).
        Optional for ``"N:M"`` patterns, whose sparsity is 1 - N/M. Or a dict from layer name /
        glob to sparsity, e.g. ``{"*.attention.*": 0.5, "*": 0.9}``: the first matching key (in
        the dict's order) sets a layer's sparsity; layers matching no key stay dense.
      pattern: ``"unstructured"``, a block shape ``"RxC"`` or ``"N:M"``; passed to ``from_dense``.
      method: ``"magnitude"`` (default) or ``"random"``.
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
    if method not in ("magnitude", "random"):
        raise ValueError(f"method must be 'magnitude' or 'random', got {method!r}")
    min_features = _min_features(min_features)
    includes, excludes = _as_patterns(include), _as_patterns(exclude)

    report = SparsifyReport(global_pruning=global_pruning)
    # weights used by more than one module (tied) cannot be swapped without untying them
    owners: Dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners[id(w)] = owners.get(id(w), 0) + 1

    candidates: List[Tuple[str, nn.Module, str, bool, LayerReport, Optional[float]]] = []
    # modules whose owners read their .weight directly: nn.MultiheadAttention (out_proj), and
    # sparse_ext's own modules (MoELayer's router and shared expert, say)
    owned: Dict[int, str] = {}
    for name, mod in model.named_modules():
        owner = None
        if isinstance(mod, nn.MultiheadAttention):
            owner = "nn.MultiheadAttention"
        elif type(mod).__module__.startswith("sparse_ext.") and _kind(mod) is None \
                and not isinstance(mod, _sparse_types()):
            owner = f"sparse_ext.{type(mod).__name__}"
        if owner:
            for m in mod.modules():
                if m is not mod:
                    owned.setdefault(id(m), owner)
    for name, mod in model.named_modules():
        if isinstance(mod, _sparse_types()):
            report.layers.append(_already_sparse_row(name, mod))
            continue
        kind = _kind(mod)
        if kind is None:
            continue
        row = LayerReport(name=name, kind=kind, shape=tuple(mod.weight.shape), pattern=pattern,
                          status="skipped",
                          dense_bytes=mod.weight.numel() * mod.weight.element_size())
        forced = bool(includes) and _matches(name, includes)
        target = sparsity
        if per_layer is not None:
            target = next((v for k, v in per_layer.items() if _matches(name, [k])), None)
        row.target = target
        reason = None
        if excludes and _matches(name, excludes):
            reason = "excluded"
        elif includes and not forced:
            reason = "not included"
        elif per_layer is not None and target is None:
            reason = "no sparsity given for this layer"
        elif kind == "Conv2d" and _conv_class() is None:
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
        if reason:
            row.reason = reason
            report.layers.append(row)
            continue
        report.layers.append(row)
        candidates.append((name, mod, kind, forced, row, target))

    if includes and not any(_matches(r.name, includes) for r in report.layers):
        layers = [r.name for r in report.layers if r.status == "skipped"]
        warnings.warn(f"sparsify: include={include!r} matches no Linear or Conv2d layer of the "
                      f"model, so nothing is sparsified; its layers are "
                      f"{layers[:8] + (['...'] if len(layers) > 8 else [])}", stacklevel=2)

    # Convert every candidate; with global pruning, a layer that refuses its mask (a grouped
    # conv, say) leaves the set and the threshold is recomputed over the rest, so the overall
    # sparsity holds for the layers actually swapped.
    converted = {}
    while True:
        masks = [None] * len(candidates)
        if global_pruning and candidates:
            masks = _global_masks([_linear_weight(c[1]) for c in candidates], float(sparsity),
                                  pattern, method, generator)
        converted.clear()
        failed = []
        for (name, mod, kind, forced, row, target), mask in zip(candidates, masks):
            try:
                converted[name] = _convert(mod, kind, mask, target, pattern, method, generator)
            except NotImplementedError:
                raise  # the build cannot do this pattern at all: say so, don't skip every layer
            except (ValueError, TypeError, RuntimeError) as exc:
                # this layer cannot be served (a grouped conv, a shape the pattern does not
                # divide...): it stays dense, forced or not, and the report says why
                row.reason = f"{type(exc).__name__}: {exc}"
                failed.append(name)
        if not failed or not global_pruning:
            break
        candidates = [c for c in candidates if c[0] not in failed]

    if only_if_faster:
        _keep_dense_where_slower(model, candidates, converted, example_inputs)

    replaced_root = None
    for name, mod, kind, forced, row, _ in candidates:
        new = converted.get(name)
        if new is None:
            continue
        row.status = "sparse"
        row.reason = ""
        row.sparsity = _zero_fraction(new)
        row.sparse_bytes = _sparse_nbytes(new)
        if name == "":
            replaced_root = new
        else:
            _set_module(model, name, new)
    return (replaced_root if replaced_root is not None else model), report


def _keep_dense_where_slower(model, candidates, converted, example_inputs) -> None:
    """Times every converted layer against its dense original; drops the slower conversions
    from ``converted`` and records the outcome in each row."""
    shapes = {}
    if example_inputs is not None:
        shapes = _layer_speed.capture_input_shapes(
            model, {c[0]: c[1] for c in candidates if c[0] in converted}, example_inputs)
    for name, mod, _, _, row, _ in candidates:
        new = converted.get(name)
        if new is None:
            continue
        shape = shapes.get(name) or _layer_speed.default_input_shape(new)
        speedup = _layer_speed.dense_over_sparse(mod, new, shape, dtype=_linear_weight(mod).dtype)
        row.speedup = speedup
        if speedup < 1.0:
            del converted[name]
            row.reason = (f"kept dense: sparse ran {speedup:.2f}x the dense speed here "
                          f"(input {tuple(shape)})")


def _already_sparse_row(name: str, mod: nn.Module) -> LayerReport:
    """A report row for a layer that is a sparse_ext module already (nothing is densified)."""
    conv = hasattr(mod, "kernel_size")
    shape = ((mod.out_channels, mod.in_channels, *mod.kernel_size) if conv
             else (mod.out_features, mod.in_features))
    return LayerReport(name=name, kind="Conv2d" if conv else "Linear", shape=shape,
                       pattern=mod.pattern, status="already sparse",
                       reason="already sparse (left as it is)", sparsity=_zero_fraction(mod),
                       dense_bytes=_numel(shape) * mod.values.element_size(),
                       sparse_bytes=_sparse_nbytes(mod))


def densify(model: nn.Module) -> nn.Module:
    """Replaces every sparse_ext module in ``model`` by its dense equivalent (``to_dense()``), in
    place. Pruned weights stay zero: ``densify(sparsify(m)[0])`` computes what the sparse model did.
    Returns ``model`` (or the dense layer when ``model`` itself is a sparse module)."""
    types = _sparse_types()
    if isinstance(model, types):
        return _dense_equivalent(model)
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

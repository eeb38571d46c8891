"""compressed-tensors interop: sparse checkpoints of the field's tools in and out, no dense detour.

Models pruned with llm-compressor are published in the ``compressed-tensors`` format; its two
sparse compressors, ``sparse-bitmask`` (any pattern: the nonzeros, a bitmask and row offsets) and
``sparse-24-bitmask`` (the two kept values of every group of four and their bitmask), store each
linear layer's weight as a few tensors (layout: ``compressed_tensors_codec.py``). Where the
installed ``compressed-tensors`` package still has those compressors (up to 0.14) it does the
(un)packing and writes the config; newer releases dropped them, and a built-in codec writing the
same bytes takes over, so neither direction needs the package.

:func:`load_compressed_tensors` turns each compressed layer of a (dense) model into a
``SparseLinear`` straight from those tensors: 2:4 layers become the N:M format with the bitmask's
positions as their metadata (no dense matrix at all), bitmask layers the unstructured format (one
layer's dense matrix at a time, never the model's). :func:`save_compressed_tensors` writes a
sparsified model back (2:4 layers as ``sparse-24-bitmask`` when every sparse layer is 2:4, else
everything as ``sparse-bitmask``) with the ``quantization_config`` entry the package's
``ModelCompressor`` reads from a Hugging Face ``config.json``.
"""
import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .checkpoint import read_state_dict
from .compressed_tensors_codec import BITMASK, BITMASK_24, codec
from .formats import NMWeight
from .formats.nm import nm_pack_indices
from .sparsify_select import as_linear

__all__ = ["load_compressed_tensors", "save_compressed_tensors", "to_compressed_tensors"]

_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def _compressed_layers(state: Dict[str, torch.Tensor]) -> Dict[str, Tuple[str, Dict]]:
    """{layer: (prefix of its compressed tensors, {part: tensor})} for every compressed weight."""
    layers = {}
    for key in state:
        if not key.endswith(".compressed"):
            continue
        prefix = key[:-len(".compressed")]
        layer = prefix[:-len(".weight")] if prefix.endswith(".weight") else prefix
        parts = {p: state[f"{prefix}.{p}"] for p in _PARTS if f"{prefix}.{p}" in state}
        missing = {"shape", "bitmask"} - set(parts)
        if missing:
            raise ValueError(f"compressed weight {prefix!r} lacks {sorted(missing)}")
        layers[layer] = (prefix, parts)
    return layers


def _is_24(parts) -> bool:
    return parts["compressed"].dim() == 2


def _sparse_linear(dense: nn.Linear, parts) -> nn.Module:
    """A SparseLinear holding the compressed weight, with ``dense``'s bias."""
    from .nn import SparseLinear

    rows, cols = (int(v) for v in parts["shape"].flatten().tolist())
    if (rows, cols) != (dense.out_features, dense.in_features):
        raise ValueError(f"compressed weight is [{rows}, {cols}], the model's layer is "
                         f"[{dense.out_features}, {dense.in_features}]")
    expected = (rows, -(-cols // 8))
    if tuple(parts["bitmask"].shape) != expected:
        raise ValueError(f"compressed weight's bitmask is {list(parts['bitmask'].shape)}, "
                         f"expected {list(expected)} for a [{rows}, {cols}] weight")
    keep = codec().unpack(parts["bitmask"], rows, cols)
    values = parts["compressed"]
    bias = dense.bias.detach() if dense.bias is not None else None
    if _is_24(parts) and cols % 4 == 0 and bool((keep.reshape(rows, -1, 4).sum(-1) == 2).all()):
        positions = keep.reshape(rows, -1, 4).nonzero()[:, 2].reshape(rows, -1)  # ascending
        weight = NMWeight(values.reshape(rows, -1).contiguous(), nm_pack_indices(positions, 4),
                          (rows, cols), 2, 4)
        return SparseLinear(weight, bias)
    if int(keep.sum()) != values.numel():
        raise ValueError(f"compressed weight holds {values.numel()} values but its bitmask keeps "
                         f"{int(keep.sum())}")
    weight = torch.zeros(rows, cols, dtype=values.dtype)
    weight[keep] = values.flatten()
    layer = nn.Linear(cols, rows, bias=False, dtype=values.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    sparse = SparseLinear.from_dense(layer, mask=keep)
    if bias is not None:
        sparse.bias = nn.Parameter(bias.clone())
    return sparse


def _check_config(folder: str) -> None:
    """Refuses quantized or unknown formats named in a folder's config.json."""
    config = os.path.join(folder, "config.json")
    if not os.path.exists(config):
        return
    with open(config) as f:
        q = json.load(f).get("quantization_config") or {}
    fmt = (q.get("sparsity_config") or {}).get("format")
    if q.get("config_groups") or q.get("format") not in (None, "dense", BITMASK, BITMASK_24):
        raise NotImplementedError("quantized compressed-tensors checkpoints are not supported; "
                                  "sparse_ext reads the sparse formats only")
    if fmt not in (None, "dense", BITMASK, BITMASK_24):
        raise NotImplementedError(f"compressed-tensors sparsity format {fmt!r} is not supported "
                                  f"(sparse-bitmask, sparse-24-bitmask are)")


def load_compressed_tensors(model: nn.Module, source, strict: bool = True) -> nn.Module:
    """Loads a compressed-tensors checkpoint (a ``save_pretrained`` folder, a ``.safetensors``
    file or a state dict) into ``model`` (dense, same architecture): every compressed linear
    layer becomes a ``SparseLinear`` holding its weight, everything else loads as usual.
    Quantized compressed-tensors formats are refused. Returns ``model``."""
    path = None if isinstance(source, dict) else os.fspath(source)
    if path is not None and os.path.isdir(path):
        _check_config(path)
    state = read_state_dict(source)
    plain = dict(state)
    for layer, (prefix, parts) in _compressed_layers(state).items():
        module = model.get_submodule(layer)
        new = _sparse_linear(as_linear(module), parts).to(module.weight.device)
        new.train(module.training)
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        for p in parts:
            del plain[f"{prefix}.{p}"]
        for name, tensor in new.state_dict().items():  # its own tensors, and the dense bias
            plain.setdefault(f"{layer}.{name}", tensor)
    model.load_state_dict(plain, strict=strict)
    return model


def _sparse_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from .nn import SparseLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _format_of(sparse: Dict[str, nn.Module]) -> str:
    all_24 = bool(sparse) and all(m.pattern == "2:4" and m.in_features % 4 == 0
                                  for m in sparse.values())
    return BITMASK_24 if all_24 else BITMASK


def _quantization_config(fmt: str, sparse: Dict[str, nn.Module], coder) -> dict:
    """The ``quantization_config`` entry ``ModelCompressor`` reads: the sparsity config for
    ``fmt`` targeting exactly the sparse layers."""
    weights = [m.weight_format() for m in sparse.values()]
    total = sum(w.out_features * w.in_features for w in weights)
    kept = sum(w.nnz for w in weights)
    config = {"quant_method": "compressed-tensors",
              "sparsity_config": coder.sparsity_config(
                  fmt, sorted(sparse), (1.0 - kept / total) if total else 0.0)}
    if coder.version is not None:
        config["version"] = coder.version
    return config


def _compress(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], str, dict]:
    """(compressed state dict, format, quantization_config), one layer's dense matrix at a
    time."""
    coder = codec()
    sparse = _sparse_layers(model)
    fmt = _format_of(sparse)
    state = {}
    for key, tensor in model.state_dict().items():
        layer = key.rpartition(".")[0]
        if layer not in sparse:
            state[key] = tensor.detach().cpu().contiguous()
    for name, module in sparse.items():
        dense = module.weight_format().to_dense().detach().cpu()
        state.update(coder.compress(name, dense, fmt))
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    return state, fmt, _quantization_config(fmt, sparse, coder)


def to_compressed_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict in compressed-tensors layout, its sparsity format) for a sparsified model."""
    state, fmt, _ = _compress(model)
    return state, fmt


def save_compressed_tensors(model: nn.Module, folder, config: Optional[dict] = None) -> str:
    """Writes ``model`` (sparsified) to ``folder`` as ``model.safetensors`` in the
    compressed-tensors layout, and a ``config.json`` (the model's Hugging Face config, or
    ``config``) carrying the ``quantization_config`` that names the sparsity format. Returns the
    safetensors path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state, fmt, quantization_config = _compress(model)
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    if config is None and hasattr(getattr(model, "config", None), "to_dict"):
        config = model.config.to_dict()
    config = dict(config or {})
    config["quantization_config"] = quantization_config
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return path

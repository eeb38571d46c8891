"""compressed-tensors interop: sparse checkpoints of the field's tools in and out, no dense detour.

Models pruned with llm-compressor are published in the ``compressed-tensors`` format. Its two
sparse compressors store, per linear layer (bit order little-endian within each byte, rows padded
to whole bytes):

  ``sparse-bitmask``      ``<layer>.weight.shape``  the dense [rows, cols]
                          ``<layer>.weight.compressed``  the nonzeros, row-major (1-D)
                          ``<layer>.weight.bitmask``  uint8 [rows, ceil(cols / 8)]: which are kept
                          ``<layer>.weight.row_offsets``  where each row starts in ``compressed``
  ``sparse-24-bitmask``   ``<layer>.shape``, ``<layer>.compressed`` [rows, cols / 2] (the two kept
                          values of every group of four), ``<layer>.bitmask`` as above

:func:`load_compressed_tensors` turns each such layer of a (dense) model into a ``SparseLinear``
straight from those tensors: 2:4 layers become the N:M format with the bitmask's positions as
their metadata (no dense matrix at all), bitmask layers the unstructured format (one layer's
dense matrix at a time, never the model's). :func:`save_compressed_tensors` writes a sparsified
model back (2:4 layers as ``sparse-24-bitmask`` when every sparse layer is 2:4, else everything
as ``sparse-bitmask``), with the ``quantization_config`` entry of a Hugging Face ``config.json``.
The library itself is not needed for either direction.
"""
import json
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .checkpoint import read_state_dict
from .formats import NMWeight
from .formats.nm import nm_pack_indices
from .sparsify_select import as_linear

__all__ = ["load_compressed_tensors", "save_compressed_tensors", "to_compressed_tensors"]

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"
_PARTS = ("shape", "compressed", "bitmask", "row_offsets")


def _unpack_bits(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] little-endian bits -> bool [rows, cols]."""
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (bitmask.to(torch.uint8)[..., None] >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].bool()


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], little-endian within each byte."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask.to(torch.uint8)
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


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
    keep = _unpack_bits(parts["bitmask"], cols)
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


def load_compressed_tensors(model: nn.Module, source, strict: bool = True) -> nn.Module:
    """Loads a compressed-tensors checkpoint (a ``save_pretrained`` folder, a ``.safetensors``
    file or a state dict) into ``model`` (dense, same architecture): every compressed linear
    layer becomes a ``SparseLinear`` holding its weight, everything else loads as usual.
    Quantized compressed-tensors formats are refused. Returns ``model``."""
    path = None if isinstance(source, dict) else os.fspath(source)
    if path is not None and os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if os.path.exists(config):
            with open(config) as f:
                q = json.load(f).get("quantization_config") or {}
            fmt = (q.get("sparsity_config") or {}).get("format")
            if q.get("config_groups") or q.get("format") not in (None, "dense", BITMASK,
                                                                 BITMASK_24):
                raise NotImplementedError("quantized compressed-tensors checkpoints are not "
                                          "supported; sparse_ext reads the sparse formats only")
            if fmt not in (None, "dense", BITMASK, BITMASK_24):
                raise NotImplementedError(f"compressed-tensors sparsity format {fmt!r} is not "
                                          f"supported (sparse-bitmask, sparse-24-bitmask are)")
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


def _layer_tensors(name: str, module, fmt: str) -> Dict[str, torch.Tensor]:
    weight = module.weight_format()
    dense = weight.to_dense().cpu()
    keep = weight.mask().cpu() & (dense != 0)
    rows, cols = dense.shape
    if fmt == BITMASK_24:
        keep = weight.mask().cpu()  # two slots per group, zeros included, as the format wants
        return {f"{name}.shape": torch.tensor([rows, cols]).reshape(-1, 1),
                f"{name}.compressed": dense[keep].reshape(rows, cols // 2),
                f"{name}.bitmask": _pack_bits(keep)}
    counts = keep.sum(1)
    return {f"{name}.weight.shape": torch.tensor([rows, cols]),
            f"{name}.weight.compressed": dense[keep],
            f"{name}.weight.bitmask": _pack_bits(keep),
            f"{name}.weight.row_offsets": torch.cumsum(counts, 0) - counts}


def to_compressed_tensors(model: nn.Module) -> Tuple[Dict[str, torch.Tensor], str]:
    """(state dict in compressed-tensors layout, its sparsity format) for a sparsified model."""
    from .nn import SparseLinear

    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    all_24 = bool(sparse) and all(m.pattern == "2:4" and m.in_features % 4 == 0
                                  for m in sparse.values())
    fmt = BITMASK_24 if all_24 else BITMASK
    state = {}
    for key, tensor in model.state_dict().items():
        layer = key.rpartition(".")[0]
        if layer not in sparse:
            state[key] = tensor.detach().cpu().contiguous()
    for name, module in sparse.items():
        state.update(_layer_tensors(name, module, fmt))
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
    return state, fmt


def save_compressed_tensors(model: nn.Module, folder, config: Optional[dict] = None) -> str:
    """Writes ``model`` (sparsified) to ``folder`` as ``model.safetensors`` in the
    compressed-tensors layout, and a ``config.json`` (the model's Hugging Face config, or
    ``config``) carrying the ``quantization_config`` that names the sparsity format. Returns the
    safetensors path."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    state, fmt = to_compressed_tensors(model)
    path = os.path.join(folder, "model.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"format": "pt"})
    if config is None and hasattr(getattr(model, "config", None), "to_dict"):
        config = model.config.to_dict()
    config = dict(config or {})
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense",
        "sparsity_config": {"format": fmt, "sparsity_structure": "2:4" if fmt == BITMASK_24
                            else "unstructured", "targets": ["Linear"], "ignore": []},
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, default=str)
    return path

"""Whole-model sparse checkpoints: :func:`load_sparse` loads one into a model that is still dense.

A sparse module's state is tensors only (its shape and pattern travel as a small metadata tensor,
``<layer>._extra_state``), so ``model.state_dict()``, ``torch.save``, safetensors and Hugging
Face's ``save_pretrained`` write a sparsified model as they write any other. To read it back, the
model must first hold sparse modules of the same formats: ``load_sparse`` builds them from each
layer's metadata in the checkpoint, then loads every tensor.

    model, _ = sparse_ext.sparsify(model, sparsity=0.9)
    model.save_pretrained("out")                           # or torch.save(model.state_dict(), f)
    fresh = AutoModel.from_pretrained("base")              # dense, same architecture
    sparse_ext.load_sparse(fresh, "out")                   # now sparse, with the saved weights

MoE layers travel too: HF MoE blocks that the checkpoint holds as ``MoELayer`` are swapped, and
pruned experts rebuilt, before the tensors load.

``sparse_ext.densify(model)`` before saving gives a checkpoint any dense model loads instead.
"""
import glob
import json
import os
import re
from typing import Mapping, Union

import torch
from torch import nn

from .moe_swap import prepare_moe_for_state
from .nn._stored import decode_extra_state
from .sparsify_select import as_linear, sparse_types

__all__ = ["load_sparse", "read_state_dict"]

_EXTRA = "_extra_state"


def read_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> dict:
    """A state dict from a mapping, a ``.safetensors`` file, a ``torch.save`` file (read with
    ``weights_only=True``) or a ``save_pretrained`` folder (single or sharded safetensors, or
    ``pytorch_model.bin``)."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            files = [os.path.join(path, s) for s in shards]
        else:
            files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) or \
                sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
        if not files:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path!r}")
        merged = {}
        for f in files:
            merged.update(read_state_dict(f))
        return merged
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _hf_renamed(model: nn.Module, state: dict) -> dict:
    """``state`` with the key renames a Hugging Face model applies when it loads a checkpoint
    (``save_pretrained`` writes some modules under legacy names, e.g. Mixtral's ``mlp`` as
    ``block_sparse_moe``); unchanged for other models. Only renames apply: tensors a conversion
    would merge or split are left as they are."""
    try:
        from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    except ImportError:
        return state
    if not hasattr(model, "config"):
        return state
    renames = []
    for rule in get_model_conversion_mapping(model):
        if isinstance(rule, WeightRenaming):
            targets = rule.target_patterns
            for i, source_pattern in enumerate(rule.source_patterns):
                target = targets[i] if len(targets) == len(rule.source_patterns) else targets[0]
                renames.append((re.compile(source_pattern), target))
    if not renames:
        return state
    renamed = {}
    for key, tensor in state.items():
        for pattern, target in renames:
            key = pattern.sub(target, key)
        renamed[key] = tensor
    return renamed


def _sparse_module_for(module: nn.Module, meta: dict) -> nn.Module:
    """A sparse module of the checkpoint's format and pattern in place of dense ``module``; its
    weights are placeholders that loading replaces."""
    from .nn import SparseConv2d, SparseLinear

    pattern = meta["pattern"]
    prune = {} if ":" in pattern else {"sparsity": 0.5}
    if "in_channels" in meta:
        if not isinstance(module, nn.Conv2d):
            raise ValueError(f"the checkpoint holds a sparse conv where the model has a "
                             f"{type(module).__name__}")
        act = meta.get("activation")
        return SparseConv2d.from_dense(module, pattern=pattern,
                                       activation=tuple(act) if isinstance(act, list) else act,
                                       **prune)
    dense = as_linear(module)
    if not isinstance(dense, nn.Linear):
        raise ValueError(f"the checkpoint holds a sparse linear layer where the model has a "
                         f"{type(module).__name__}")
    return SparseLinear.from_dense(dense, pattern=pattern, **prune)


def load_sparse(model: nn.Module, source, strict: bool = True) -> nn.Module:
    """Turns every layer that ``source`` stores sparse into the matching sparse module (and every
    MoE block it stores as a ``MoELayer`` into one), then loads ``source`` into ``model`` (``strict`` as in ``load_state_dict``). Layers already sparse
    are left to ``load_state_dict``. Returns ``model``."""
    state = _hf_renamed(model, read_state_dict(source))
    prepare_moe_for_state(model, state)
    sparse = sparse_types()
    for key in [k for k in state if k == _EXTRA or k.endswith("." + _EXTRA)]:
        name = key[:-len(_EXTRA)].rstrip(".")
        meta = decode_extra_state(state[key])
        if "pattern" not in meta:
            continue  # another module's extra state
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"the checkpoint has a sparse layer {name!r} that the model lacks") \
                from None
        if isinstance(module, sparse):
            continue
        new = _sparse_module_for(module, meta).to(module.weight.device)
        new.train(module.training)
        if name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            raise ValueError("load_sparse needs a model that contains the layer, not the layer "
                             "itself: load the state into a sparse module directly")
    model.load_state_dict(state, strict=strict)
    return model

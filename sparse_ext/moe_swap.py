"""Whole-model MoE swap: every Hugging Face sparse MoE block (Mixtral, Qwen2-MoE and their
layouts, whatever ``MoELayer.from_hf`` reads) becomes a ``sparse_ext.MoELayer`` in place: the
same weights, routed, permuted and run through the grouped expert kernels. The experts stay dense
(only the dispatch is sparse) until ``MoELayer.sparsify_experts`` prunes them.
``sparsify(model, moe=True)`` does this before swapping the linears, and ``load_sparse`` through
:func:`prepare_moe_for_state` when a checkpoint holds MoE layers.
"""
from typing import List, Mapping, Tuple

from torch import nn

__all__ = ["find_moe_blocks", "prepare_moe_for_state", "swap_moe"]


def _is_hf_moe_block(module: nn.Module) -> bool:
    from .nn import MoELayer

    if isinstance(module, MoELayer):
        return False
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (isinstance(gate, nn.Module) and hasattr(gate, "weight") and experts is not None
            and (hasattr(experts, "gate_up_proj") or isinstance(experts, nn.ModuleList)))


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, block) for every HF sparse MoE block of ``model`` (outermost ones only)."""
    found: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f, _ in found):
            continue
        if _is_hf_moe_block(module):
            found.append((name, module))
    return found


def swap_moe(model: nn.Module) -> List[str]:
    """Replaces every HF sparse MoE block of ``model`` by an equal ``MoELayer`` (train/eval mode
    kept); returns the swapped names. ``output_router_logits`` keeps working: the layer hands
    its router logits to the model's hooks."""
    from .nn import MoELayer

    swapped = []
    for name, block in find_moe_blocks(model):
        layer = MoELayer.from_hf(block).train(block.training)
        if not name:
            raise ValueError("swap_moe needs a model that contains the block; call "
                             "MoELayer.from_hf(block) on a block itself")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        swapped.append(name)
    return swapped


def prepare_moe_for_state(model: nn.Module, state: Mapping) -> None:
    """Gives ``model`` the MoE modules a checkpoint ``state`` holds: HF blocks whose entry in
    ``state`` is a MoELayer's (``<block>.router.weight``) are swapped, and MoELayers saved with
    pruned experts get sparse experts of the saved pattern (placeholders that loading fills)."""
    from .nn import MoELayer
    from .nn._stored import decode_extra_state

    for name, block in find_moe_blocks(model):
        if f"{name}.router.weight" in state:
            parent, _, child = name.rpartition(".")
            layer = MoELayer.from_hf(block).train(block.training)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    for name, layer in model.named_modules():
        if not isinstance(layer, MoELayer) or layer.sparse_experts is not None:
            continue
        prefix = f"{name}." if name else ""
        meta = state.get(f"{prefix}sparse_experts.gate_up.0._extra_state")
        if meta is None:
            continue
        pattern = decode_extra_state(meta)["pattern"]
        layer.sparsify_experts(sparsity=None if ":" in pattern else 0.5, pattern=pattern)

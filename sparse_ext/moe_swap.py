"""Whole-model MoE swap: every Hugging Face sparse MoE block (Mixtral, Qwen2-MoE and their
layouts, whatever ``MoELayer.from_hf`` reads) becomes a ``sparse_ext.MoELayer`` in place: the
same weights, routed, permuted and run through the grouped expert kernels. The experts stay dense;
only the dispatch is sparse. ``sparsify(model, moe=True)`` does this before swapping the linears.
"""
from typing import List, Tuple

from torch import nn

__all__ = ["find_moe_blocks", "swap_moe"]


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

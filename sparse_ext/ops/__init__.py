"""Typed wrappers over ``torch.ops.sparse_ext``, plus their fake kernels and autograd, one module
per family (spmm, conv, nm, moe).

Every schema is defined once in ``csrc/registration.cpp``; these modules make each op traceable
(``register_fake``) and differentiable (``register_autograd``, backward built from other ops).
"""
from .conv import activation_bounds, conv_output_size, sparse_conv2d, sparse_conv2d_op
from .moe import moe_combine, moe_expert_mlp, moe_permute, moe_route
from .nm import nm_linear
from .spmm import spmm

__all__ = ["activation_bounds", "conv_output_size", "moe_combine", "moe_expert_mlp", "moe_permute",
           "moe_route", "nm_linear", "sparse_conv2d", "sparse_conv2d_op", "spmm"]


def _document_ops() -> None:
    """Gives every ``torch.ops.sparse_ext`` op a docstring: its schema, and the typed wrapper's
    docstring where the op has one (``help(torch.ops.sparse_ext.spmm)``)."""
    import importlib
    import inspect

    import torch

    families = {prefix: importlib.import_module(f"{__name__}.{module}")
                for prefix, module in (("spmm", "spmm"), ("sparse_conv2d", "conv"), ("nm", "nm"),
                                       ("moe", "moe"))}
    for name in dir(torch.ops.sparse_ext):
        packet = getattr(torch.ops.sparse_ext, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        schema = "\n".join(str(getattr(packet, o)._schema) for o in packet.overloads())
        family = next((m for prefix, m in families.items() if name.startswith(prefix)), None)
        wrapper = getattr(family, name, None) if family is not None else None
        if callable(wrapper) and inspect.getdoc(wrapper):
            body = f"Typed wrapper: {wrapper.__module__}.{name}\n\n{inspect.getdoc(wrapper)}"
        else:
            body = (f"Part of the {family.__name__.rsplit('.', 1)[-1] if family else 'sparse_ext'} "
                    f"family's internals (a backward or a structure helper); docs/ops.md describes it.")
        packet.__doc__ = f"{schema}\n\n{body}"


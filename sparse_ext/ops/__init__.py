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

"""Modules that own sparse weights and call ``sparse_ext.ops``."""
from .linear import SparseLinear
from .conv import SparseConv, SparseConv2d, fold_batchnorm, fuse_activations  # sparse conv (issue 4)

__all__ = ["SparseLinear"]
__all__ += ["SparseConv", "SparseConv2d", "fold_batchnorm", "fuse_activations"]  # sparse conv
from .moe import MoELayer  # MoE

__all__ = ["SparseLinear"]
__all__ += ["MoELayer"]  # MoE

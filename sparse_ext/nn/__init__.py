"""Modules that own sparse weights and call ``sparse_ext.ops``."""
from .conv import SparseConv, SparseConv2d, fold_batchnorm, fuse_activations
from .linear import SparseLinear
from .moe import MoELayer

__all__ = ["MoELayer", "SparseConv", "SparseConv2d", "SparseLinear", "fold_batchnorm",
           "fuse_activations"]

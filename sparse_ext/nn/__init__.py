"""Modules that own sparse weights and call ``sparse_ext.ops``."""
from .linear import SparseLinear
from .moe import MoELayer  # MoE

__all__ = ["SparseLinear"]
__all__ += ["MoELayer"]  # MoE

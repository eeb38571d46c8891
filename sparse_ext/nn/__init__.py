"""Modules that own sparse weights and call ``sparse_ext.ops``."""
from .linear import SparseLinear

__all__ = ["SparseLinear"]

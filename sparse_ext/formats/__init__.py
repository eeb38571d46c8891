"""Sparse weight formats behind one interface, :class:`SparseWeight`.

``csr.py`` (blocked CSR: SpMM and sparse conv) and ``nm.py`` (N:M semi-structured) mirror
``csrc/kernels/<family>/``; ``registry.py`` maps a pattern to its format and builds weights.
"""
from ..ops.spmm import K_BLOCK
from .base import SparseWeight, require_weight
from .csr import CSRWeight
from .nm import NMWeight, nm_meta_stride, nm_pack_indices, nm_unpack_indices
from .registry import FORMATS, build_weight, format_for

__all__ = ["FORMATS", "K_BLOCK", "CSRWeight", "NMWeight", "SparseWeight", "build_weight",
           "format_for", "nm_meta_stride", "nm_pack_indices", "nm_unpack_indices",
           "require_weight"]

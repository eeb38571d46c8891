"""sparse_ext: compiled sparse kernels for PyTorch behind drop-in modules.

Importing this package loads the compiled extension, which registers ``torch.ops.sparse_ext.*``.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C  # noqa: F401  registers the sparse_ext operator library
from . import ops  # noqa: F401  fake kernels and autograd
from . import tuning  # noqa: F401  the plan cache (kernel choice by measurement)
from . import config  # noqa: F401  typed settings
from .formats import CSRWeight, NMWeight
from .isa import cpu_features, get_isa, set_isa, supported_isas, use_isa
from .nn import MoELayer, SparseConv, SparseConv2d, SparseLinear, fold_batchnorm, fuse_activations
from .prune import block_mask, magnitude_mask, nm_mask, parse_pattern, random_mask
from .checkpoint import load_sparse
from .moe_swap import swap_moe
from .sparsify import SparsifyReport, densify, sparsify
from .tuning import set_tuning, tuning_enabled, use_tuning

__version__ = "0.1.0"

__all__ = [
    "CSRWeight",
    "MoELayer",
    "NMWeight",
    "SparseConv",
    "SparseConv2d",
    "SparseLinear",
    "SparsifyReport",
    "block_mask",
    "config",
    "cpu_features",
    "densify",
    "fold_batchnorm",
    "fuse_activations",
    "load_sparse",
    "get_isa",
    "magnitude_mask",
    "nm_mask",
    "ops",
    "parse_pattern",
    "random_mask",
    "set_isa",
    "set_tuning",
    "sparsify",
    "supported_isas",
    "swap_moe",
    "tuning",
    "tuning_enabled",
    "use_isa",
    "use_tuning",
]

ops._document_ops()  # after every import above: the op packets are final by now

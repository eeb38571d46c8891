"""sparse_ext: compiled sparse kernels for PyTorch behind drop-in modules.

Importing this package loads the compiled extension, which registers ``torch.ops.sparse_ext.*``.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C  # noqa: F401  registers the sparse_ext operator library
from . import ops  # noqa: F401  fake kernels and autograd
from .formats import CSRWeight
from .isa import get_isa, set_isa, supported_isas, use_isa
from .nn import SparseLinear
from .nn import SparseConv, SparseConv2d, fold_batchnorm, fuse_activations  # sparse conv (issue 4)
from .nn import MoELayer  # MoE
from .prune import block_mask, magnitude_mask, parse_pattern, random_mask

# --- sparsify (issue 6) -------------------------------------------------------------------------
from .sparsify import SparsifyReport, densify, sparsify
# --- end sparsify -------------------------------------------------------------------------------

__version__ = "0.1.0"

__all__ = [
    "CSRWeight",
    "SparseLinear",
    "block_mask",
    "get_isa",
    "magnitude_mask",
    "ops",
    "parse_pattern",
    "random_mask",
    "set_isa",
    "supported_isas",
    "use_isa",
    # sparsify (issue 6)
    "SparsifyReport",
    "densify",
    "sparsify",
]
__all__ += ["SparseConv", "SparseConv2d", "fold_batchnorm", "fuse_activations"]  # sparse conv

# ---- N:M semi-structured (issue 3) ----
from .formats import NMWeight  # noqa: E402
from .prune import nm_mask  # noqa: E402

__all__ += ["NMWeight", "nm_mask"]
# ---- end N:M ----
__all__ += ["MoELayer"]  # MoE

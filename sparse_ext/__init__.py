"""sparse_ext: compiled sparse kernels for PyTorch behind drop-in modules.

Importing this package loads the compiled extension, which registers ``torch.ops.sparse_ext.*``.
"""
import torch  # noqa: F401  (the extension links against torch's libraries)

from . import _C  # noqa: F401  registers the sparse_ext operator library
from . import ops  # noqa: F401  fake kernels and autograd
from .formats import CSRWeight
from .isa import get_isa, set_isa, supported_isas, use_isa
from .nn import SparseLinear
from .nn import MoELayer  # MoE
from .prune import block_mask, magnitude_mask, parse_pattern, random_mask

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
]
__all__ += ["MoELayer"]  # MoE

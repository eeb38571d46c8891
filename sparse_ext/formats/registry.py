"""Which format stores which pattern, and the one place a weight is built from a dense tensor."""
from typing import Dict, Optional, Type

import torch

from ..prune import parse_pattern
from .base import SparseWeight
from .csr import CSRWeight
from .nm import NMWeight

# parse_pattern's kind -> the format that stores it. A new format adds its row here (and, for a
# new pattern syntax, its kind to parse_pattern).
FORMATS: Dict[str, Type[SparseWeight]] = {
    "unstructured": CSRWeight,
    "block": CSRWeight,
    "nm": NMWeight,
}


def format_for(pattern: str) -> Type[SparseWeight]:
    """The :class:`SparseWeight` class that stores ``pattern``."""
    kind, _ = parse_pattern(pattern)
    if kind not in FORMATS:
        raise NotImplementedError(f"no sparse weight format stores pattern {pattern!r}")
    return FORMATS[kind]


def build_weight(dense: torch.Tensor, pattern: str = "unstructured",
                 mask: Optional[torch.Tensor] = None, sparsity: Optional[float] = None,
                 method: str = "magnitude",
                 generator: Optional[torch.Generator] = None) -> SparseWeight:
    """The sparse weight of 2-D ``dense`` [out_features, in_features] in ``pattern``'s format:
    exactly the entries where ``mask`` is True, or else the ones ``sparsity`` and ``method``
    keep (``"magnitude"`` or ``"random"`` with ``generator``; N:M patterns fix the sparsity)."""
    return format_for(pattern).from_pattern(dense, pattern, mask=mask, sparsity=sparsity,
                                            method=method, generator=generator)

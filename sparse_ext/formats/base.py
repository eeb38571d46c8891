"""The interface every sparse weight format implements.

A format stores W [out_features, in_features] as one trainable tensor ``values`` plus structure
tensors (``structure_names``: CSR offsets and indices, N:M metadata, ...). Modules hold those
tensors as their parameter and buffers and rebuild the weight on use with :meth:`from_state`, so
a module never needs to know which format it holds.
"""
import abc
from typing import ClassVar, Dict, Mapping, Optional, Tuple

import torch

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def check_dense_weight(weight) -> None:
    """``weight`` must be a 2-D tensor [out_features, in_features]."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")


class SparseWeight(abc.ABC):
    """A sparse weight W [out_features, in_features].

    Every format has ``shape``, ``values`` (the stored weights, explicit zeros of a block or an
    N:M group included) and the structure tensors named by ``structure_names``. ``nnz`` is the
    number of stored values, ``values.numel()``; the C++ SpMM weight's ``nnz`` counts column
    entries instead (one per ``block_rows`` values).
    """

    format_name: ClassVar[str]                 # saved in a module's extra state ("csr", "nm")
    structure_names: ClassVar[Tuple[str, ...]]  # the tensors besides ``values``
    has_conv2d: ClassVar[bool] = False          # whether :meth:`conv2d` has a kernel
    block_rows: int = 1                         # rows stored as one group

    shape: Tuple[int, int]
    values: torch.Tensor

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_pattern(cls, dense: torch.Tensor, pattern: str, mask: Optional[torch.Tensor] = None,
                     sparsity: Optional[float] = None, method: str = "magnitude",
                     generator: Optional[torch.Generator] = None) -> "SparseWeight":
        """Prunes 2-D ``dense`` to ``pattern``: keeps exactly ``mask`` when given, else what
        ``sparsity`` and ``method`` select (see :func:`sparse_ext.formats.build_weight`)."""

    @classmethod
    @abc.abstractmethod
    def config_for(cls, pattern: str, block_rows: int, shape: Tuple[int, int]) -> Dict[str, int]:
        """The :meth:`state_config` of a weight of this format stored with ``pattern`` and
        ``block_rows`` (what a module's extra state records); ValueError when they disagree."""

    @abc.abstractmethod
    def state_config(self) -> Dict[str, int]:
        """What rebuilds the weight from its tensors besides ``shape`` (e.g. ``block_rows``)."""

    @property
    @abc.abstractmethod
    def pattern(self) -> str:
        """The pattern this weight holds (``"unstructured"``, ``"4x1"``, ``"2:4"``...)."""

    @classmethod
    def from_state(cls, tensors: Mapping[str, torch.Tensor], shape: Tuple[int, int],
                   config: Mapping[str, int]) -> "SparseWeight":
        """Rebuilds a weight from :meth:`state_tensors`, ``shape`` and :meth:`state_config`."""
        return cls(**{name: tensors[name] for name in cls.state_names()}, shape=shape, **config)

    @classmethod
    def state_names(cls) -> Tuple[str, ...]:
        return cls.structure_names + ("values",)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.state_names()}

    def structure(self) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.structure_names}

    def with_values(self, values: torch.Tensor) -> "SparseWeight":
        """The same structure holding ``values`` (e.g. the values' gradient)."""
        return self.from_state({**self.state_tensors(), "values": values}, self.shape,
                               self.state_config())

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> "SparseWeight":
        """Checks dtypes, shapes and the structure with the kernels' own check (the op's); raises
        ValueError naming the tensor that is wrong and what was expected. Returns ``self``."""
        try:
            self._check_with_op()
        except RuntimeError as e:
            raise ValueError(str(e).split("\n")[0]) from None
        return self

    @abc.abstractmethod
    def _check_with_op(self) -> None:
        """Runs the C++ check of this format's op (RuntimeError when malformed)."""

    # ---- compute ------------------------------------------------------------------------------
    @abc.abstractmethod
    def linear(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ W^T + bias`` for ``x [..., in_features]``, through this format's op."""

    def conv2d(self, x: torch.Tensor, bias: Optional[torch.Tensor], in_channels: int,
               kernel_size, stride, padding, dilation, out_min: float = -float("inf"),
               out_max: float = float("inf")) -> torch.Tensor:
        """``clamp(conv2d(x, W.reshape(out, in_channels, kh, kw), bias), out_min, out_max)``
        (NCHW, groups=1, zero padding) through this format's op."""
        raise NotImplementedError(f"{type(self).__name__} (pattern {self.pattern!r}) has no "
                                  f"convolution kernel")

    @abc.abstractmethod
    def to_dense(self) -> torch.Tensor:
        """W as a dense [out_features, in_features] tensor of ``values``' dtype."""

    @abc.abstractmethod
    def mask(self) -> torch.Tensor:
        """Positions of the stored values, bool [out_features, in_features]."""

    @abc.abstractmethod
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SparseWeight":
        """The weight with its tensors on ``device`` and ``values`` in ``dtype``."""

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        """Stored values (explicit zeros of a block or group included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Stored values over ``out_features * in_features`` (at most 1)."""
        total = self.shape[0] * self.shape[1]
        return min(1.0, self.nnz / total) if total else 0.0

    def zero_fraction(self) -> float:
        """Fraction of zeros in W: unstored positions plus stored zeros. Stored slots past
        ``in_features`` (N:M padding) hold zeros, so they count once in each term and cancel."""
        total = self.shape[0] * self.shape[1]
        zeros = total - self.nnz + int((self.values == 0).sum())
        return zeros / max(total, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of everything the kernels read: the structure and the values."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def dense_nbytes(self, dtype: Optional[torch.dtype] = None) -> int:
        dtype = dtype or self.values.dtype
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=dtype).element_size()


def require_weight(weight) -> "SparseWeight":
    """``weight`` itself when it is a :class:`SparseWeight`, else TypeError."""
    if not isinstance(weight, SparseWeight):
        raise TypeError(f"weight must be a SparseWeight (CSRWeight, NMWeight, ...), got "
                        f"{type(weight).__name__}")
    return weight

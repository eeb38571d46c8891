"""The two ways sparse_ext (un)packs the compressed-tensors sparse layouts: through the
``compressed-tensors`` package where it still has its sparse compressors (releases up to 0.14),
else with the built-in codec below. Releases from 0.15 on dropped ``sparse-bitmask`` and
``sparse-24-bitmask`` (their configs call them legacy formats), while the checkpoints that
llm-compressor wrote with them stay published; the layout is frozen, so the built-in codec writes
exactly what the package wrote (the tests compare both against the package).

Layout per linear layer ``<name>`` (bit order little-endian within each byte, rows padded to
whole bytes): ``sparse-bitmask``: ``shape`` [2] the dense [rows, cols], ``compressed`` the nonzeros
row-major, ``bitmask`` uint8 [rows, ceil(cols / 8)], ``row_offsets`` [rows] where each row starts in
``compressed``; ``sparse-24-bitmask``: ``shape`` [2, 1], ``compressed`` [rows, cols / 2] (the two
largest-magnitude values of every group of four), ``bitmask`` as above.
"""
from typing import Dict, List, Optional

import torch

BITMASK = "sparse-bitmask"
BITMASK_24 = "sparse-24-bitmask"


class Codec:
    """Packs and unpacks one layer's tensors and writes the format's sparsity config."""

    version: Optional[str] = None  # the package's, when it does the work

    def unpack(self, bitmask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """uint8 [rows, ceil(cols / 8)] -> bool [rows, cols]."""
        raise NotImplementedError

    def compress(self, name: str, dense: torch.Tensor, fmt: str) -> Dict[str, torch.Tensor]:
        """The tensors of layer ``name`` whose weight is ``dense`` [rows, cols] (zeros pruned)."""
        raise NotImplementedError

    def sparsity_config(self, fmt: str, targets: List[str], global_sparsity: float) -> dict:
        """The ``sparsity_config`` entry of a ``quantization_config``."""
        raise NotImplementedError


def _structure(fmt: str) -> str:
    return "2:4" if fmt == BITMASK_24 else "unstructured"


class PackageCodec(Codec):
    """The package's own compressors and config classes (compressed-tensors < 0.15)."""

    def __init__(self):
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.config import SparsityCompressionConfig
        from compressed_tensors.utils.helpers import unpack_bitmasks

        self.version = compressed_tensors.__version__
        self._model_compressor = ModelCompressor
        self._config = SparsityCompressionConfig
        self._unpack = unpack_bitmasks

    def unpack(self, bitmask, rows, cols):
        return self._unpack(bitmask.to(torch.uint8), [rows, cols])

    def compress(self, name, dense, fmt):
        config = {"sparsity_config": self.sparsity_config(fmt, [name], 0.0)}
        compressor = self._model_compressor.from_compression_config(config).sparsity_compressor
        return compressor.compress_weight(name, dense)

    def sparsity_config(self, fmt, targets, global_sparsity):
        return self._config.load_from_registry(
            fmt, targets=targets, ignore=[], global_sparsity=global_sparsity,
            sparsity_structure=_structure(fmt)).model_dump()


class BuiltinCodec(Codec):
    """The same layout in plain torch, for environments whose package lacks the sparse formats."""

    def unpack(self, bitmask, rows, cols):
        shifts = torch.arange(8, dtype=torch.uint8)
        bits = (bitmask.to(torch.uint8)[..., None] >> shifts) & 1
        return bits.reshape(rows, -1)[:, :cols].bool()

    @staticmethod
    def _pack(keep: torch.Tensor) -> torch.Tensor:
        rows, cols = keep.shape
        padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
        padded[:, :cols] = keep.to(torch.uint8)
        weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
        return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)

    def compress(self, name, dense, fmt):
        rows, cols = dense.shape
        if fmt == BITMASK_24:
            if cols % 4:
                raise ValueError(f"{fmt} needs a multiple of 4 columns, {name} has {cols}")
            groups = dense.reshape(-1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
            keep = keep.reshape(rows, cols)
            return {f"{name}.shape": torch.tensor([rows, cols]).reshape(-1, 1),
                    f"{name}.compressed": dense[keep].reshape(rows, cols // 2),
                    f"{name}.bitmask": self._pack(keep)}
        keep = dense != 0
        counts = keep.sum(1)
        return {f"{name}.shape": torch.tensor([rows, cols]),
                f"{name}.compressed": dense[keep],
                f"{name}.bitmask": self._pack(keep),
                f"{name}.row_offsets": torch.cumsum(counts, 0) - counts}

    def sparsity_config(self, fmt, targets, global_sparsity):
        return {"format": fmt, "targets": targets, "ignore": [],
                "global_sparsity": global_sparsity, "sparsity_structure": _structure(fmt)}


def codec() -> Codec:
    """The package's codec where the installed compressed-tensors has the sparse compressors,
    else the built-in one."""
    try:
        from compressed_tensors.compressors.sparse_compressors import (  # noqa: F401
            sparse_24_bitmask, sparse_bitmask)
    except ImportError:
        return BuiltinCodec()
    return PackageCodec()

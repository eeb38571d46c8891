"""Sparse weight containers. The layout is the kernels' business; users see from_dense / to_dense.

``CSRWeight`` holds W [out_features, in_features] in the blocked-CSR layout of
``csrc/kernels/spmm/spmm.h``: rows in groups of ``block_rows`` sharing a column pattern, columns in
blocks of 256 so each column index is one byte, values in float32 / bfloat16 (float64 for tests).
"""
from typing import Optional, Tuple

import torch

K_BLOCK = 256
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


class CSRWeight:
    """Blocked CSR weight.

    Attributes (all CPU tensors unless moved):
      offsets  int32 [G * KB + 1], G = out_features / block_rows, KB = ceil(in_features / 256)
      indices  uint8 [nnz]            column within its 256-wide block
      values   float [nnz * block_rows]
    """

    def __init__(self, offsets: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                 shape: Tuple[int, int], block_rows: int = 1):
        self.offsets = offsets
        self.indices = indices
        self.values = values
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_rows = int(block_rows)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: Optional[torch.Tensor] = None,
                   block_rows: int = 1) -> "CSRWeight":
        """Stores the entries of 2-D ``weight`` where ``mask`` is True (default: nonzeros).

        With ``block_rows = R > 1`` the rows are grouped R at a time and a column is stored for the
        group when any of its R rows keeps it (zeros fill the others)."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if weight.dtype not in _VALUE_DTYPES:
            raise TypeError(f"weight must be float32, bfloat16 or float64, got {weight.dtype}")
        if block_rows not in (1, 2, 4, 8):
            raise ValueError(f"block_rows must be 1, 2, 4 or 8, got {block_rows}")
        M, K = weight.shape
        if M % block_rows:
            raise ValueError(f"out_features ({M}) must be a multiple of block_rows ({block_rows})")
        weight = weight.detach()
        if mask is None:
            mask = weight != 0
        if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
            raise ValueError(f"mask must be a tensor of shape {tuple(weight.shape)}, got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        R, G = block_rows, M // block_rows
        KB = max(1, -(-K // K_BLOCK)) if K > 0 else 0
        Kp = KB * K_BLOCK
        wp = torch.zeros(M, Kp, dtype=weight.dtype, device=weight.device)
        wp[:, :K] = weight * mask
        mp = torch.zeros(M, Kp, dtype=torch.bool, device=weight.device)
        mp[:, :K] = mask
        group_mask = mp.reshape(G, R, KB, K_BLOCK).any(1)            # [G, KB, 256]
        counts = group_mask.sum(-1).reshape(-1)                      # [G * KB]
        offsets = torch.zeros(G * KB + 1, dtype=torch.int64, device=weight.device)
        offsets[1:] = counts.cumsum(0)
        if int(offsets[-1]) >= 2**31:
            raise ValueError("too many stored entries for 32-bit offsets")
        _, _, col = group_mask.nonzero(as_tuple=True)
        values = wp.reshape(G, R, KB, K_BLOCK).permute(0, 2, 3, 1)[group_mask]  # [nnz, R]
        return cls(offsets.to(torch.int32).cpu(), col.to(torch.uint8).cpu(),
                   values.reshape(-1).contiguous().cpu(), (M, K), R)

    # ---- views ------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def k_blocks(self) -> int:
        return -(-self.in_features // K_BLOCK)

    @property
    def nnz(self) -> int:
        """Stored weight values (entries x block_rows, explicit zeros of a block included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of everything the kernels read: offsets, indices and values."""
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.indices, self.values))

    def dense_nbytes(self, dtype: Optional[torch.dtype] = None) -> int:
        dtype = dtype or self.values.dtype
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=dtype).element_size()

    def row_and_col(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(first row of the entry's group, column) of every entry, int64 [nnz // block_rows]."""
        G, KB = self.out_features // self.block_rows, self.k_blocks
        counts = (self.offsets[1:] - self.offsets[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(G * KB), counts)
        row = (segment // KB) * self.block_rows
        col = (segment % KB) * K_BLOCK + self.indices.long()
        return row, col

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        R = self.block_rows
        dense = torch.zeros(M, K, dtype=self.values.dtype)
        row, col = self.row_and_col()
        vals = self.values.reshape(-1, R)
        for r in range(R):
            dense[row + r, col] = vals[:, r]
        return dense

    def validate(self) -> "CSRWeight":
        """Checks the structure with the same rules as the kernels; raises ValueError if broken."""
        M, K = self.shape
        R = self.block_rows
        if R not in (1, 2, 4, 8) or M % R:
            raise ValueError(f"block_rows {R} must be 1, 2, 4 or 8 and divide out_features {M}")
        if self.offsets.dtype != torch.int32 or self.indices.dtype != torch.uint8:
            raise ValueError("offsets must be int32 and indices uint8")
        if self.values.dtype not in _VALUE_DTYPES:
            raise ValueError(f"values must be float32, bfloat16 or float64, got {self.values.dtype}")
        G, KB = M // R, self.k_blocks
        if self.offsets.shape != (G * KB + 1,):
            raise ValueError(f"offsets must have length {G * KB + 1}, got {tuple(self.offsets.shape)}")
        nnz = self.indices.numel()
        if self.values.shape != (nnz * R,):
            raise ValueError(f"values must have length {nnz * R}, got {tuple(self.values.shape)}")
        off = self.offsets.long()
        if off[0] != 0 or off[-1] != nnz or bool((off[1:] < off[:-1]).any()):
            raise ValueError("offsets must start at 0, never decrease and end at len(indices)")
        _, col = self.row_and_col()
        if nnz and int(col.max()) >= K:
            raise ValueError(f"column index {int(col.max())} out of range for in_features {K}")
        return self

    # ---- movement -----------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CSRWeight":
        return CSRWeight(self.offsets.to(device), self.indices.to(device),
                         self.values.to(device=device, dtype=dtype), self.shape, self.block_rows)

    def transposed_structure(self):
        """(offsets, indices, perm) of W^T with block_rows 1; ``values[perm]`` are its values."""
        return torch.ops.sparse_ext.spmm_transpose_structure(
            self.offsets, self.indices, self.out_features, self.in_features, self.block_rows)

    def __repr__(self) -> str:
        return (f"CSRWeight(shape={self.shape}, block_rows={self.block_rows}, nnz={self.nnz}, "
                f"density={self.density:.3f}, dtype={self.values.dtype}, nbytes={self.nbytes})")

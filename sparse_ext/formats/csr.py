"""Blocked CSR: the SpMM and sparse conv families' weight (``csrc/kernels/spmm/spmm.h``).

Rows in groups of ``block_rows`` sharing a column pattern (1 = unstructured; "RxC" block patterns
store R rows a group), columns in blocks of 256 so each column index is one byte, values in
float32 / bfloat16 (float64 for tests).
"""
from typing import Dict, Optional, Tuple

import torch

from ..ops._registration import lib
from ..ops.conv import sparse_conv2d_op
from ..ops.spmm import K_BLOCK, spmm
from ..prune import block_storage_rows, build_mask, check_block_mask, check_mask, parse_pattern
from .base import VALUE_DTYPES, SparseWeight, check_dense_weight


class CSRWeight(SparseWeight):
    """Blocked CSR weight.

    Attributes (all CPU tensors unless moved):
      offsets  int32 [G * KB + 1], G = out_features / block_rows, KB = ceil(in_features / 256)
      indices  uint8 [entries]        column within its 256-wide block
      values   float [entries * block_rows]
    """

    format_name = "csr"
    structure_names = ("offsets", "indices")
    has_conv2d = True

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
        check_dense_weight(weight)
        if weight.dtype not in VALUE_DTYPES:
            raise TypeError(f"weight must be float32, bfloat16 or float64, got {weight.dtype}")
        if block_rows not in (1, 2, 4, 8):
            raise ValueError(f"block_rows must be 1, 2, 4 or 8, got {block_rows}")
        M, K = weight.shape
        if M % block_rows:
            raise ValueError(f"out_features ({M}) must be a multiple of block_rows ({block_rows})")
        weight = weight.detach()
        mask = weight != 0 if mask is None else check_mask(mask, weight.shape)
        mask = mask.to(device=weight.device)
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
        values = wp.reshape(G, R, KB, K_BLOCK).permute(0, 2, 3, 1)[group_mask]  # [entries, R]
        return cls(offsets.to(torch.int32).cpu(), col.to(torch.uint8).cpu(),
                   values.reshape(-1).contiguous().cpu(), (M, K), R)

    @classmethod
    def from_pattern(cls, dense, pattern, mask=None, sparsity=None, method="magnitude",
                     generator=None) -> "CSRWeight":
        """``"unstructured"`` or a block ``"RxC"`` (stored ``R`` rows a group when R divides 8,
        else the largest of 8, 4, 2, 1 dividing R; the mask keeps whole tiles)."""
        check_dense_weight(dense)
        block_rows = block_storage_rows(pattern, dense.shape)
        if mask is None:
            if sparsity is None:
                raise ValueError("from_dense needs sparsity=... or mask=...")
            mask = build_mask(dense, sparsity, pattern, method, generator)
        else:
            check_block_mask(check_mask(mask, dense.shape), pattern)
        return cls.from_dense(dense, mask, block_rows)

    @classmethod
    def config_for(cls, pattern, block_rows, shape) -> Dict[str, int]:
        kind, _ = parse_pattern(pattern)
        if kind == "nm" or (kind == "block" and block_storage_rows(pattern, shape)
                            != int(block_rows)):
            raise ValueError(f"block_rows {block_rows} does not match pattern {pattern!r}")
        return {"block_rows": int(block_rows)}

    def state_config(self) -> Dict[str, int]:
        return {"block_rows": self.block_rows}

    @property
    def pattern(self) -> str:
        return "unstructured" if self.block_rows == 1 else f"{self.block_rows}x1"

    # ---- views ------------------------------------------------------------------------------
    @property
    def k_blocks(self) -> int:
        return -(-self.in_features // K_BLOCK)

    @property
    def entries(self) -> int:
        """Column entries (``len(indices)``; each holds ``block_rows`` values)."""
        return self.indices.numel()

    def row_and_col(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(first row of the entry's group, column) of every entry, int64 [entries]."""
        G, KB = self.out_features // self.block_rows, self.k_blocks
        counts = (self.offsets[1:] - self.offsets[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(G * KB, device=counts.device), counts)
        row = (segment // KB) * self.block_rows
        col = (segment % KB) * K_BLOCK + self.indices.long()
        return row, col

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        R = self.block_rows
        dense = torch.zeros(M, K, dtype=self.values.dtype, device=self.values.device)
        row, col = self.row_and_col()
        vals = self.values.reshape(-1, R)
        for r in range(R):
            dense[row + r, col] = vals[:, r]
        return dense

    def mask(self) -> torch.Tensor:
        """Positions of the stored entries (a block's explicit zeros included), bool
        [out_features, in_features]."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.indices.device)
        row, col = self.row_and_col()
        for r in range(self.block_rows):
            out[row + r, col] = True
        return out

    def _check_with_op(self) -> None:
        for name, t in self.state_tensors().items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        # The SpMM op checks everything before it reads a token: zero tokens run only the checks.
        # They run on the host (the structure walk reads the offsets).
        x = torch.zeros(0, self.in_features, dtype=torch.float64 if self.values.dtype ==
                        torch.float64 else torch.float32)
        cpu = {name: t.detach().cpu().contiguous() for name, t in self.state_tensors().items()}
        try:
            with torch.no_grad():
                lib.spmm(x, cpu["offsets"], cpu["indices"], cpu["values"], None,
                                  self.out_features, self.in_features, self.block_rows)
        except RuntimeError as e:
            # The structure walk's messages name offsets or a column index: say which tensors.
            msg = str(e).split("\n")[0].replace("malformed sparse weight: ",
                                                 "malformed structure (offsets, indices): ")
            raise RuntimeError(msg) from None

    # ---- compute ------------------------------------------------------------------------------
    def linear(self, x, bias=None):
        return spmm(x, self, bias)

    def conv2d(self, x, bias, in_channels, kernel_size, stride, padding, dilation,
               out_min=-float("inf"), out_max=float("inf")):
        return sparse_conv2d_op(x, self.offsets, self.indices, self.values, bias, self.out_features,
                                in_channels, list(kernel_size), list(stride), list(padding),
                                list(dilation), self.block_rows, out_min, out_max)

    def transposed_structure(self):
        """(offsets, indices, perm) of W^T with block_rows 1; ``values[perm]`` are its values."""
        return lib.spmm_transpose_structure(
            self.offsets, self.indices, self.out_features, self.in_features, self.block_rows)

    # ---- movement -----------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "CSRWeight":
        return CSRWeight(self.offsets.to(device), self.indices.to(device),
                         self.values.to(device=device, dtype=dtype), self.shape, self.block_rows)

    def __repr__(self) -> str:
        return (f"CSRWeight(shape={self.shape}, block_rows={self.block_rows}, nnz={self.nnz}, "
                f"density={self.density:.3f}, dtype={self.values.dtype}, nbytes={self.nbytes})")

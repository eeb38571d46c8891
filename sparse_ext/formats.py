"""Sparse weight containers. The layout is the kernels' business; users see from_dense / to_dense.

``CSRWeight`` holds W [out_features, in_features] in the blocked-CSR layout of
``csrc/kernels/spmm/spmm.h``: rows in groups of ``block_rows`` sharing a column pattern, columns in
blocks of 256 so each column index is one byte, values in float32 / bfloat16 (float64 for tests).
"""
from typing import Optional, Tuple

import torch

from .prune import check_mask

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

    def validate(self) -> "CSRWeight":
        """Checks the structure with the same rules as the kernels; raises ValueError naming the
        tensor that is wrong (``offsets``, ``indices``, ``values``) and what was expected."""
        M, K = self.shape
        R = self.block_rows
        if M < 0 or K < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        if R not in (1, 2, 4, 8) or M % R:
            raise ValueError(f"block_rows {R} must be 1, 2, 4 or 8 and divide out_features {M}")
        for name, t, dtype in (("offsets", self.offsets, torch.int32),
                               ("indices", self.indices, torch.uint8)):
            if not isinstance(t, torch.Tensor) or t.dtype != dtype:
                raise ValueError(f"{name} must be a {dtype} tensor, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)}")
        if not isinstance(self.values, torch.Tensor) or self.values.dtype not in _VALUE_DTYPES:
            raise ValueError(f"values must be float32, bfloat16 or float64, got "
                             f"{getattr(self.values, 'dtype', type(self.values).__name__)}")
        G, KB = M // R, self.k_blocks
        if tuple(self.offsets.shape) != (G * KB + 1,):
            raise ValueError(f"offsets must have shape ({G * KB + 1},) for a {M}x{K} weight with "
                             f"block_rows {R}, got {tuple(self.offsets.shape)}")
        if self.indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(self.indices.shape)}")
        nnz = self.indices.numel()
        if tuple(self.values.shape) != (nnz * R,):
            raise ValueError(f"values must have shape ({nnz * R},) (len(indices) * block_rows), "
                             f"got {tuple(self.values.shape)}")
        off = self.offsets.long()
        if int(off[0]) != 0:
            raise ValueError(f"offsets[0] must be 0, got {int(off[0])}")
        drops = (off[1:] < off[:-1]).nonzero()
        if drops.numel():
            i = int(drops[0, 0]) + 1
            raise ValueError(f"offsets must not decrease, but offsets[{i}] = {int(off[i])} < "
                             f"offsets[{i - 1}] = {int(off[i - 1])}")
        if int(off[-1]) != nnz:
            raise ValueError(f"offsets[-1] must equal len(indices) = {nnz}, got {int(off[-1])}")
        row, col = self.row_and_col()
        bad = (col >= K).nonzero()
        if bad.numel():
            j = int(bad[0, 0])
            raise ValueError(f"indices[{j}] = {int(self.indices[j])} puts an entry of row "
                             f"{int(row[j])} at column {int(col[j])}, out of range for "
                             f"in_features {K}")
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


# ---- N:M semi-structured ------------------------------------------------------------------------
# Layout of csrc/kernels/nm/nm.h. Padding rule: when in_features % M != 0 the last group is padded
# with virtual zero columns in_features .. G*M - 1 (G = ceil(in_features / M)); slots may point at
# them and then hold zero values; they never contribute (activations are zero-padded).
_NM_BITS = {4: 2, 8: 3, 16: 4}


def _check_nm_pattern(n, m):
    if m not in _NM_BITS:
        raise ValueError(f"m must be 4, 8 or 16, got {m!r}")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n < m:
        raise ValueError(f"n must be an integer with 1 <= n < m ({m}), got {n!r}")


def nm_meta_stride(in_features: int, n: int, m: int) -> int:
    """Bytes of packed metadata per row: ceil(ceil(in_features / m) * n * log2(m) / 8)."""
    return (-(-in_features // m) * n * _NM_BITS[m] + 7) // 8


def nm_pack_indices(indices: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, slots] indices in [0, m) -> uint8 [rows, ceil(slots * log2(m) / 8)] bit stream
    (slot j's index in bits j*B .. j*B+B-1, little-endian within and across bytes)."""
    bits = _NM_BITS[m]
    rows, slots = indices.shape
    idx = indices.to(torch.uint8)
    planes = torch.stack([(idx >> k) & 1 for k in range(bits)], dim=-1).reshape(rows, slots * bits)
    stride = (slots * bits + 7) // 8
    padded = torch.zeros(rows, stride * 8, dtype=torch.uint8, device=indices.device)
    padded[:, :slots * bits] = planes
    padded = padded.reshape(rows, stride, 8)
    out = torch.zeros(rows, stride, dtype=torch.uint8, device=indices.device)
    for p in range(8):
        out |= padded[..., p] << p
    return out


def nm_unpack_indices(metadata: torch.Tensor, slots: int, m: int) -> torch.Tensor:
    """Inverse of :func:`nm_pack_indices`: int64 [rows, slots]."""
    bits = _NM_BITS[m]
    rows = metadata.shape[0]
    meta = metadata.to(torch.uint8)
    planes = torch.stack([(meta >> p) & 1 for p in range(8)], dim=-1).reshape(rows, -1)
    planes = planes[:, :slots * bits].reshape(rows, slots, bits)
    idx = torch.zeros(rows, slots, dtype=torch.uint8, device=metadata.device)
    for k in range(bits):
        idx |= planes[..., k] << k
    return idx.long()


class NMWeight:
    """N:M semi-structured weight W [out_features, in_features]: every group of ``m`` consecutive
    input columns keeps ``n`` slots (``m`` in 4/8/16, ``1 <= n < m``).

    Attributes:
      values    float32 | bfloat16 | float64 (| float16 on CUDA) [out_features, G * n],
                G = ceil(in_features / m)
      metadata  uint8 [out_features, ceil(G * n * log2(m) / 8)]: each slot's index in its group,
                log2(m) bits per slot (see :func:`nm_pack_indices`)
    Canonical form: the n indices of a group strictly increase; unused slots hold zeros.
    """

    def __init__(self, values: torch.Tensor, metadata: torch.Tensor, shape: Tuple[int, int],
                 n: int, m: int):
        self.values = values
        self.metadata = metadata
        self.shape = (int(shape[0]), int(shape[1]))
        self.n = int(n)
        self.m = int(m)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, n: int, m: int,
                   mask: Optional[torch.Tensor] = None) -> "NMWeight":
        """Keeps the ``n`` largest magnitudes of every group of ``m`` columns, or, with ``mask``,
        exactly the masked entries (a group with more than ``n`` masked entries is rejected)."""
        _check_nm_pattern(n, m)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out_features, in_features], got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        # float16 exists only on CUDA (the CUDA kernels take it): such a weight stays on its device.
        cuda_half = weight.dtype == torch.float16 and weight.is_cuda
        if weight.dtype not in _VALUE_DTYPES and not cuda_half:
            raise TypeError(f"weight must be float32, bfloat16 or float64 (or float16 on CUDA), "
                            f"got {weight.dtype}")
        weight = weight.detach()
        M, K = weight.shape
        G = -(-K // m)
        wp = torch.zeros(M, G * m, dtype=weight.dtype, device=weight.device)
        wp[:, :K] = weight
        wg = wp.reshape(M, G, m)
        pos = torch.arange(m, device=weight.device, dtype=torch.float32)
        if mask is None:
            score = wg.abs().float()
            score = torch.nan_to_num(score, nan=0.0)
            valid = torch.zeros(M, G * m, dtype=torch.bool, device=weight.device)
            valid[:, :K] = True
            valid = valid.reshape(M, G, m)
            # real columns rank above padding columns (which only fill slots when K % m < n)
            score = torch.where(valid, score + 1.0, torch.zeros_like(score))
            keep = None
        else:
            check_mask(mask, (M, K))
            mp = torch.zeros(M, G * m, dtype=torch.bool, device=weight.device)
            mp[:, :K] = mask.to(device=weight.device)
            keep = mp.reshape(M, G, m)
            counts = keep.sum(-1)
            bad = (counts > n).nonzero()
            if bad.numel():
                r, g = (int(v) for v in bad[0])
                raise ValueError(
                    f"mask breaks the {n}:{m} pattern: row {r}, group {g} (columns {g * m}.."
                    f"{min(g * m + m, K) - 1}) keeps {int(counts[r, g])} > {n} entries "
                    f"({bad.shape[0]} such groups)")
            # masked first, then the lowest free index fills the remaining slots with zeros
            score = keep.float() * 2.0 - pos / m
        idx = torch.topk(score, n, dim=-1).indices.sort(dim=-1).values      # [M, G, n]
        vals = torch.gather(wg, -1, idx)
        if keep is not None:
            vals = vals * torch.gather(keep, -1, idx).to(vals.dtype)
        out_device = weight.device if cuda_half else torch.device("cpu")
        return cls(vals.reshape(M, G * n).contiguous().to(out_device),
                   nm_pack_indices(idx.reshape(M, G * n), m).to(out_device), (M, K), n, m)

    @classmethod
    def from_indices(cls, values: torch.Tensor, indices: torch.Tensor, shape: Tuple[int, int],
                     n: int, m: int) -> "NMWeight":
        """From unpacked per-slot indices [out, G*n] (each in [0, m), strictly increasing within a
        group) and values of the same shape; checks everything and packs the metadata."""
        _check_nm_pattern(n, m)
        M, K = int(shape[0]), int(shape[1])
        G = -(-K // m)
        if tuple(indices.shape) != (M, G * n) or tuple(values.shape) != (M, G * n):
            raise ValueError(f"values and indices must both have shape {(M, G * n)} for shape "
                             f"{(M, K)} and {n}:{m}, got {tuple(values.shape)} and "
                             f"{tuple(indices.shape)}")
        if indices.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        idx = indices.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m):
            bad = ((idx < 0) | (idx >= m)).nonzero()[0]
            raise ValueError(f"index {int(idx[bad[0], bad[1]])} at row {int(bad[0])}, slot "
                             f"{int(bad[1])} is outside [0, {m}) for m = {m}")
        grouped = idx.reshape(M, G, n)
        if n > 1 and bool((grouped[..., 1:] <= grouped[..., :-1]).any()):
            r, g = (int(v) for v in (grouped[..., 1:] <= grouped[..., :-1]).any(-1).nonzero()[0])
            raise ValueError(f"row {r}, group {g}: indices {grouped[r, g].tolist()} must be strictly "
                             f"increasing (a group names more than its {n} distinct columns)")
        return cls(values.contiguous(), nm_pack_indices(idx, m), (M, K), n, m).validate()

    # ---- views ------------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> int:
        return -(-self.in_features // self.m)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def nnz(self) -> int:
        """Stored slots (explicit zeros included)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.shape[0] * self.shape[1]
        return min(1.0, self.nnz / total) if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of everything the kernels read: values and metadata."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.metadata))

    def dense_nbytes(self, dtype: Optional[torch.dtype] = None) -> int:
        dtype = dtype or self.values.dtype
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=dtype).element_size()

    def indices(self) -> torch.Tensor:
        """Unpacked slot indices, int64 [out_features, G * n]."""
        return nm_unpack_indices(self.metadata, self.groups * self.n, self.m)

    def columns(self) -> torch.Tensor:
        """Column of every slot, int64 [out_features, G * n] (may be >= in_features: padding)."""
        slot = torch.arange(self.groups * self.n, device=self.metadata.device)
        return (slot // self.n) * self.m + self.indices()

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        dense = torch.zeros(M, self.groups * self.m, dtype=self.values.dtype,
                            device=self.values.device)
        dense.scatter_(1, self.columns().to(self.values.device), self.values)
        return dense[:, :K].contiguous()

    def mask(self) -> torch.Tensor:
        """Positions of the stored slots, bool [out_features, in_features]."""
        M, K = self.shape
        out = torch.zeros(M, self.groups * self.m, dtype=torch.bool, device=self.metadata.device)
        out.scatter_(1, self.columns(), True)
        return out[:, :K].contiguous()

    def validate(self) -> "NMWeight":
        """Checks dtypes, shapes and the canonical metadata with the kernels' rules; raises
        ValueError naming what is wrong."""
        _check_nm_pattern(self.n, self.m)
        M, K = self.shape
        # float16 is accepted on CUDA (the CUDA kernels take it); there the check runs on device.
        on_cuda = self.values.is_cuda and self.metadata.is_cuda
        if self.values.dtype not in _VALUE_DTYPES + ((torch.float16,) if on_cuda else ()):
            raise ValueError(f"values must be float32, bfloat16 or float64 (or float16 on CUDA), "
                             f"got {self.values.dtype}")
        if self.metadata.dtype != torch.uint8:
            raise ValueError(f"metadata must be uint8, got {self.metadata.dtype}")
        want_v = (M, self.groups * self.n)
        want_m = (M, nm_meta_stride(K, self.n, self.m))
        if tuple(self.values.shape) != want_v:
            raise ValueError(f"values must have shape {want_v}, got {tuple(self.values.shape)}")
        if tuple(self.metadata.shape) != want_m:
            raise ValueError(f"metadata must have shape {want_m} ({self.groups * self.n} slots of "
                             f"{_NM_BITS[self.m]} bits per row), got {tuple(self.metadata.shape)}")
        try:
            if on_cuda and self.values.device == self.metadata.device:
                torch.ops.sparse_ext.nm_validate(self.values.contiguous(),
                                                 self.metadata.contiguous(), K, self.n, self.m)
            else:
                torch.ops.sparse_ext.nm_validate(self.values.cpu().contiguous(),
                                                 self.metadata.cpu().contiguous(), K, self.n, self.m)
        except RuntimeError as e:
            raise ValueError(str(e).split("\n")[0]) from None
        if K % self.m:
            # Slots in the last group may name the virtual zero columns past in_features only
            # with a zero value (what from_dense stores): a nonzero one is a weight outside W.
            cols = self.columns().to(self.values.device)
            bad = ((cols >= K) & (self.values != 0)).nonzero()
            if bad.numel():
                r, slot = (int(v) for v in bad[0])
                raise ValueError(f"metadata: row {r}, slot {slot} names column "
                                 f"{int(cols[r, slot])} past in_features {K} with a nonzero "
                                 f"value ({bad.shape[0]} such slots)")
        return self

    # ---- movement -----------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "NMWeight":
        return NMWeight(self.values.to(device=device, dtype=dtype), self.metadata.to(device),
                        self.shape, self.n, self.m)

    def __repr__(self) -> str:
        return (f"NMWeight(shape={self.shape}, pattern='{self.n}:{self.m}', "
                f"dtype={self.values.dtype}, nbytes={self.nbytes} "
                f"({self.nbytes / max(self.dense_nbytes(), 1):.3f}x dense))")

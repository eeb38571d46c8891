"""N:M semi-structured: the N:M family's weight (``csrc/kernels/nm/nm.h``).

Every group of ``m`` consecutive input columns keeps ``n`` slots; each slot's index in its group
is packed in log2(m) bits of ``metadata``. Padding rule: when in_features % m != 0 the last group
is padded with virtual zero columns in_features .. G*m - 1 (G = ceil(in_features / m)); slots may
point at them and then hold zero values; they never contribute (activations are zero-padded).
"""
from typing import Dict, Optional, Tuple

import torch

from ..ops._registration import lib
from ..ops.nm import nm_linear
from ..prune import check_mask, parse_nm
from .base import VALUE_DTYPES, SparseWeight, check_dense_weight

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


class NMWeight(SparseWeight):
    """N:M semi-structured weight W [out_features, in_features]: every group of ``m`` consecutive
    input columns keeps ``n`` slots (``m`` in 4/8/16, ``1 <= n < m``).

    Attributes:
      values    float32 | bfloat16 | float64 (| float16 on CUDA) [out_features, G * n],
                G = ceil(in_features / m)
      metadata  uint8 [out_features, ceil(G * n * log2(m) / 8)]: each slot's index in its group,
                log2(m) bits per slot (see :func:`nm_pack_indices`)
    Canonical form: the n indices of a group strictly increase; unused slots hold zeros.
    """

    format_name = "nm"
    structure_names = ("metadata",)

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
        check_dense_weight(weight)
        # float16 exists only on CUDA (the CUDA kernels take it): such a weight stays on its device.
        cuda_half = weight.dtype == torch.float16 and weight.is_cuda
        if weight.dtype not in VALUE_DTYPES and not cuda_half:
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

    @classmethod
    def from_pattern(cls, dense, pattern, mask=None, sparsity=None, method="magnitude",
                     generator=None) -> "NMWeight":
        """``"N:M"``: the N largest magnitudes of every group of M columns, or exactly ``mask``.
        ``sparsity`` may be given but must equal 1 - N/M."""
        n, m = parse_nm(pattern)
        if sparsity is not None and abs(float(sparsity) - (1.0 - n / m)) > 1e-6:
            raise ValueError(f"pattern {pattern!r} fixes sparsity at {1.0 - n / m:g}, got "
                             f"sparsity={sparsity}")
        if method != "magnitude" and mask is None:
            raise ValueError(f"N:M patterns are built by magnitude (or pass mask=...), got "
                             f"method={method!r}")
        return cls.from_dense(dense, n, m, mask=mask)

    @classmethod
    def config_for(cls, pattern, block_rows, shape) -> Dict[str, int]:
        n, m = parse_nm(pattern)
        return {"n": n, "m": m}

    def state_config(self) -> Dict[str, int]:
        return {"n": self.n, "m": self.m}

    # ---- views ------------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return -(-self.in_features // self.m)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    def slot_indices(self) -> torch.Tensor:
        """Unpacked slot indices, int64 [out_features, G * n]."""
        return nm_unpack_indices(self.metadata, self.groups * self.n, self.m)

    def columns(self) -> torch.Tensor:
        """Column of every slot, int64 [out_features, G * n] (may be >= in_features: padding)."""
        slot = torch.arange(self.groups * self.n, device=self.metadata.device)
        return (slot // self.n) * self.m + self.slot_indices()

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

    def _check_with_op(self) -> None:
        _check_nm_pattern(self.n, self.m)
        M, K = self.shape
        # The op takes out_features from values: check that against this weight's shape first.
        want = (M, self.groups * self.n)
        if tuple(self.values.shape) != want:
            raise ValueError(f"values must have shape {want}, got {tuple(self.values.shape)}")
        # On CUDA the check runs on the device (float16 is accepted there); elsewhere on the host.
        on_cuda = self.values.is_cuda and self.metadata.device == self.values.device
        values, metadata = ((self.values, self.metadata) if on_cuda
                            else (self.values.cpu(), self.metadata.cpu()))
        with torch.no_grad():
            lib.nm_validate(values.detach().contiguous(), metadata.contiguous(), K,
                                   self.n, self.m)
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

    # ---- compute ------------------------------------------------------------------------------
    def linear(self, x, bias=None):
        return nm_linear(x, self, bias)

    # ---- movement -----------------------------------------------------------------------------
    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "NMWeight":
        return NMWeight(self.values.to(device=device, dtype=dtype), self.metadata.to(device),
                        self.shape, self.n, self.m)

    def __repr__(self) -> str:
        return (f"NMWeight(shape={self.shape}, pattern='{self.n}:{self.m}', "
                f"dtype={self.values.dtype}, nbytes={self.nbytes} "
                f"({self.nbytes / max(self.dense_nbytes(), 1):.3f}x dense))")

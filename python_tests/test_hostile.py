"""Hostile inputs to every raw ``torch.ops.sparse_ext`` op.

Every case must either raise a Python exception or return a correct result. The cases run in child
Python processes (``python test_hostile.py --child NAME...``) that report one JSON line per case, so
a segfault or abort fails that case instead of killing pytest; after a crash the remaining cases
run in a fresh child. Children run under an address-space limit so that a shape whose product
overflows turns into an allocation error rather than an out-of-memory kill.

Case kinds: ``must_raise`` (malformed structure, impossible shapes: a return is a failure),
``must_be_correct`` (valid input such as zero tokens, NaN, non-contiguous views: raising is a
failure too, and ``check`` compares with a reference on every ISA) and ``raise_or_correct``
(inputs at the edge of what an op can serve, such as sizes near 2^62 or non-canonical metadata: it
may raise; if it returns, ``check`` compares).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import sparse_ext
from reference import sparse_conv_reference, sparse_product_reference
from sparse_ext.formats import CSRWeight, NMWeight

OPS = torch.ops.sparse_ext
I32_MAX = 2**31 - 1
INF, NAN = float("inf"), float("nan")
CASES = {}  # name -> (kind, run, check)


def case(name, run, check=None, may_raise=False):
    assert name not in CASES, name
    kind = "must_raise" if check is None else "raise_or_correct" if may_raise else "must_be_correct"
    CASES[name] = (kind, run, check)


def same(out, ref, atol=1e-4, rtol=1e-4):
    """Equal shapes, NaN exactly where the reference has NaN, infinities matching, rest close."""
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol, equal_nan=True)


# ---- SpMM ---------------------------------------------------------------------------------------
def spmm_weight(M=8, K=20, br=1, dtype=torch.float32, density=0.4):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(M, K, generator=g).to(dtype)
    mask = torch.rand(M, K, generator=g) < density
    return CSRWeight.from_dense(w, mask, br)


def spmm_ref(x, csr, bias=None):
    """Sum over stored entries only (so 0 * NaN at an unstored position contributes nothing)."""
    return sparse_product_reference(x, csr.to_dense(), csr.mask(), bias)


W = spmm_weight()
X = torch.randn(3, 20)


def spmm(x=None, offsets=None, indices=None, values=None, bias=None, M=8, br=1, w=W, K=None):
    return OPS.spmm(X if x is None else x, w.offsets if offsets is None else offsets,
                    w.indices if indices is None else indices,
                    w.values if values is None else values, bias, M,
                    w.in_features if K is None else K, br)


def _with(t, idx, v):
    t = t.clone()
    t[idx] = v
    return t


case("spmm/index_out_of_range", lambda: spmm(indices=_with(W.indices, 0, 250)))
case("spmm/offsets_not_monotone", lambda: spmm(offsets=_with(W.offsets, 3, int(W.offsets[4]) + 5)))
case("spmm/offsets_last_int32_max", lambda: spmm(offsets=_with(W.offsets, -1, I32_MAX)))
case("spmm/offsets_all_int32_max", lambda: spmm(offsets=torch.full_like(W.offsets, I32_MAX)))
case("spmm/offsets_negative", lambda: spmm(offsets=_with(W.offsets, 1, -5)))
case("spmm/offsets_first_nonzero", lambda: spmm(offsets=_with(W.offsets, 0, 1)))
case("spmm/offsets_too_short", lambda: spmm(offsets=W.offsets[:-1].contiguous()))
case("spmm/offsets_int64", lambda: spmm(offsets=W.offsets.long()))
case("spmm/indices_int32", lambda: spmm(indices=W.indices.int()))
case("spmm/values_too_short", lambda: spmm(values=W.values[:-1].contiguous()))
case("spmm/values_too_long", lambda: spmm(values=torch.cat([W.values, W.values[:1]])))
case("spmm/indices_longer_than_offsets_say", lambda: spmm(
    indices=torch.cat([W.indices, W.indices[:1]]), values=torch.cat([W.values, W.values[:1]])))
case("spmm/out_features_2pow31", lambda: spmm(M=2**31))
case("spmm/out_features_2pow62", lambda: spmm(M=2**62))
case("spmm/out_features_negative", lambda: spmm(M=-8))
case("spmm/block_rows_3", lambda: spmm(br=3))
case("spmm/block_rows_0", lambda: spmm(br=0))
case("spmm/block_rows_negative", lambda: spmm(br=-1))
case("spmm/x_wrong_in_features", lambda: spmm(x=torch.randn(3, 300)))
# Widths inside the weight's last 256-column block: the structure alone cannot tell them apart.
case("spmm/wrong_width_wider", lambda: spmm(x=torch.randn(3, 24)))
case("spmm/wrong_width_narrower", lambda: spmm(x=torch.randn(3, 19)))
case("spmm/wrong_width_batched", lambda: spmm(x=torch.randn(2, 3, 21)))
case("spmm/in_features_2pow31", lambda: spmm(K=2**31))
case("spmm/in_features_negative", lambda: spmm(K=-20))
case("spmm/x_int", lambda: spmm(x=torch.ones(3, 20, dtype=torch.int32)))
case("spmm/x_scalar", lambda: spmm(x=torch.tensor(1.0)))
case("spmm/x_f64_values_f32", lambda: spmm(x=X.double()))
case("spmm/bias_wrong_len", lambda: spmm(bias=torch.zeros(7)))
case("spmm/bias_2d", lambda: spmm(bias=torch.zeros(1, 8)))
# The structure and the stored values must be contiguous (docs/reliability.md, views).
case("spmm/values_noncontig", lambda: spmm(values=torch.stack([W.values, W.values], 1)[:, 0]))
case("spmm/x_nan_inf", lambda: spmm(x=_with(_with(X, (0, 3), NAN), (1, 5), INF)),
     lambda out: same(out, spmm_ref(_with(_with(X, (0, 3), NAN), (1, 5), INF), W)))
_WN = CSRWeight(W.offsets, W.indices, _with(_with(W.values, 0, NAN), 2, -INF), W.shape, 1)
case("spmm/values_nan_inf", lambda: spmm(w=_WN), lambda out: same(out, spmm_ref(X, _WN)))
case("spmm/bias_nan", lambda: spmm(bias=_with(torch.zeros(8), 2, NAN)),
     lambda out: same(out, spmm_ref(X, W, _with(torch.zeros(8), 2, NAN))))
case("spmm/x_huge_values", lambda: spmm(x=X * 1e30),
     lambda out: same(out, spmm_ref(X * 1e30, W), rtol=1e-3))
case("spmm/zero_tokens", lambda: spmm(x=torch.randn(0, 20)),
     lambda out: same(out, torch.zeros(0, 8)))
case("spmm/zero_batch_3d", lambda: spmm(x=torch.randn(2, 0, 20)),
     lambda out: same(out, torch.zeros(2, 0, 8)))
_W0K = spmm_weight(8, 0)
case("spmm/zero_in_features", lambda: spmm(x=torch.randn(3, 0), w=_W0K, bias=torch.ones(8)),
     lambda out: same(out, torch.ones(3, 8)))
_W0M = spmm_weight(0, 20)
case("spmm/zero_out_features", lambda: spmm(w=_W0M, M=0), lambda out: same(out, torch.zeros(3, 0)))
case("spmm/x_transposed_view", lambda: spmm(x=X.t().contiguous().t()),
     lambda out: same(out, spmm_ref(X, W)))
case("spmm/x_expanded", lambda: spmm(x=X[:1].expand(5, 20)),
     lambda out: same(out, spmm_ref(X[:1].expand(5, 20), W)))
_XO = torch.randn(64).as_strided((6, 20), (2, 1))  # rows overlap
case("spmm/x_overlapping_as_strided", lambda: spmm(x=_XO), lambda out: same(out, spmm_ref(_XO, W)))
_XS = torch.randn(3, 1).expand(3, 20)
case("spmm/x_zero_stride_last", lambda: spmm(x=_XS), lambda out: same(out, spmm_ref(_XS, W)))
_W8 = spmm_weight(16, 300, br=8)
case("spmm/block8_index_past_in_features",
     lambda: spmm(x=torch.randn(3, 300), w=_W8, M=16, br=8,
                  indices=_with(_W8.indices, -1, 255)))

# Edge paths with non-finite values: GEMV (one token), several column blocks, 8-row blocks,
# bf16 and float64 values.
for _name, (_M, _K, _br, _dt, _T) in {
        "gemv_k257": (8, 257, 1, torch.float32, 1), "gemv_block8": (16, 300, 8, torch.float32, 1),
        "tokens9_block4_k513": (16, 513, 4, torch.float32, 9), "bf16_gemv": (8, 40, 2, torch.bfloat16, 1),
        "bf16_tokens5": (8, 40, 1, torch.bfloat16, 5), "f64_tokens3": (8, 300, 2, torch.float64, 3)}.items():
    _w = spmm_weight(_M, _K, _br, _dt)
    _w = CSRWeight(_w.offsets, _w.indices, _with(_w.values, -1, INF), _w.shape, _br)
    _x = torch.randn(_T, _K).to(_dt if _dt == torch.float64 else torch.float32)
    _x[0, _K - 1] = NAN
    _x[-1, 0] = -INF
    case(f"spmm/nonfinite_{_name}",
         (lambda w=_w, x=_x, M=_M, br=_br: OPS.spmm(x, w.offsets, w.indices, w.values, None, M,
                                                    w.in_features, br)),
         (lambda out, w=_w, x=_x: same(out, spmm_ref(x, w), atol=1e-3, rtol=1e-3)))

# spmm_transpose_structure
case("spmm_t/index_out_of_range",
     lambda: OPS.spmm_transpose_structure(W.offsets, _with(W.indices, 0, 250), 8, 20, 1))
case("spmm_t/offsets_not_monotone",
     lambda: OPS.spmm_transpose_structure(_with(W.offsets, 3, 10**6), W.indices, 8, 20, 1))
case("spmm_t/offsets_int32_max",
     lambda: OPS.spmm_transpose_structure(_with(W.offsets, -1, I32_MAX), W.indices, 8, 20, 1))
case("spmm_t/in_features_negative",
     lambda: OPS.spmm_transpose_structure(W.offsets, W.indices, 8, -20, 1))
case("spmm_t/in_features_2pow40",
     lambda: OPS.spmm_transpose_structure(W.offsets, W.indices, 8, 2**40, 1))
case("spmm_t/wrong_width_offsets_for_other_in_features",  # offsets sized for 2 column blocks
     lambda: OPS.spmm_transpose_structure(W.offsets, W.indices, 8, 300, 1))
case("spmm_t/out_features_2pow31",
     lambda: OPS.spmm_transpose_structure(W.offsets, W.indices, 2**31, 20, 1))
case("spmm_t/out0_in_2pow40",  # in_features above the 2^31 - 1 bound, even with no entries
     lambda: OPS.spmm_transpose_structure(torch.zeros(1, dtype=torch.int32),
                                          torch.zeros(0, dtype=torch.uint8), 0, 2**40, 1))


def _check_transpose(out):
    ot, it, perm = out
    t = CSRWeight(ot, it, W.values[perm], (20, 8), 1)
    same(t.to_dense(), W.to_dense().t())


case("spmm_t/valid_reference", lambda: OPS.spmm_transpose_structure(W.offsets, W.indices, 8, 20, 1),
     _check_transpose)

# spmm_sddmm
G = torch.randn(3, 8)


def sddmm_ref(g, x, csr):
    full = g.double().reshape(-1, g.shape[-1]).t() @ x.double().reshape(-1, x.shape[-1])
    stored = csr.mask()
    return full[stored]  # row-major order == storage order for block_rows = 1


case("sddmm/token_mismatch", lambda: OPS.spmm_sddmm(torch.randn(4, 8), X, W.offsets, W.indices,
                                                   8, 20, 1))
case("sddmm/wrong_width_x", lambda: OPS.spmm_sddmm(G, torch.randn(3, 23), W.offsets, W.indices,
                                                   8, 20, 1))
case("sddmm/wrong_width_grad_out", lambda: OPS.spmm_sddmm(torch.randn(3, 7), X, W.offsets,
                                                         W.indices, 8, 20, 1))
case("sddmm/index_out_of_range",
     lambda: OPS.spmm_sddmm(G, X, W.offsets, _with(W.indices, 0, 250), 8, 20, 1))
case("sddmm/offsets_int32_max",
     lambda: OPS.spmm_sddmm(G, X, _with(W.offsets, -1, I32_MAX), W.indices, 8, 20, 1))
case("sddmm/offsets_not_monotone",
     lambda: OPS.spmm_sddmm(G, X, _with(W.offsets, 2, int(W.offsets[-1])), W.indices, 8, 20, 1))
case("sddmm/mixed_f64", lambda: OPS.spmm_sddmm(G.double(), X, W.offsets, W.indices, 8, 20, 1))
case("sddmm/nan_inf", lambda: OPS.spmm_sddmm(_with(G, (0, 0), NAN), _with(X, (1, 1), INF),
                                             W.offsets, W.indices, 8, 20, 1),
     lambda out: same(out, sddmm_ref(_with(G, (0, 0), NAN), _with(X, (1, 1), INF), W)))
case("sddmm/zero_tokens", lambda: OPS.spmm_sddmm(torch.randn(0, 8), torch.randn(0, 20), W.offsets,
                                                 W.indices, 8, 20, 1),
     lambda out: same(out, torch.zeros(W.nnz)))
case("sddmm/noncontig_views", lambda: OPS.spmm_sddmm(G.t().contiguous().t(), X[:1].expand(3, 20),
                                                     W.offsets, W.indices, 8, 20, 1),
     lambda out: same(out, sddmm_ref(G, X[:1].expand(3, 20), W)))

# ---- sparse conv ----------------------------------------------------------------------------------
CW = spmm_weight(4, 2 * 3 * 3)
CX = torch.randn(2, 2, 6, 5)


def conv(x=None, offsets=None, indices=None, values=None, bias=None, co=4, k=(3, 3), s=(1, 1),
         p=(1, 1), d=(1, 1), br=1, lo=-INF, hi=INF, w=CW, ci=None):
    x = CX if x is None else x
    ci = w.in_features // (k[0] * k[1]) if ci is None and k[0] * k[1] > 0 else ci
    return OPS.sparse_conv2d(x, w.offsets if offsets is None else offsets,
                             w.indices if indices is None else indices,
                             w.values if values is None else values, bias, co,
                             2 if ci is None else ci, list(k), list(s), list(p), list(d), br, lo,
                             hi)


def conv_ref(x, csr, k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1), bias=None, lo=-INF, hi=INF):
    """Sum over stored weights only; padding taps contribute exactly 0 (skipped)."""
    shape = (csr.shape[0], x.shape[1], *k)
    y = sparse_conv_reference(x, csr.to_dense().reshape(shape), csr.mask().reshape(shape), s, p,
                              d, bias)
    return torch.clamp(y, lo, hi)


case("conv/index_out_of_range", lambda: conv(indices=_with(CW.indices, 0, 200)))
case("conv/offsets_int32_max", lambda: conv(offsets=_with(CW.offsets, -1, I32_MAX)))
case("conv/offsets_not_monotone", lambda: conv(offsets=_with(CW.offsets, 1, int(CW.offsets[-1]))))
case("conv/values_short", lambda: conv(values=CW.values[:-1].contiguous()))
# x with 3 channels where the weight has 2: the structure (18 columns) would also be valid for 27
# columns, so only in_channels tells the op that x is wrong.
case("conv/wrong_width_one_more_channel", lambda: conv(x=torch.randn(2, 3, 6, 5)))
case("conv/wrong_width_one_fewer_channel", lambda: conv(x=torch.randn(2, 1, 6, 5)))
case("conv/channels_mismatch_too_many", lambda: conv(x=torch.randn(2, 40, 6, 5)))
case("conv/in_channels_disagrees_with_structure", lambda: conv(x=torch.randn(2, 40, 6, 5), ci=40))
case("conv/in_channels_2pow40", lambda: conv(ci=2**40))
case("conv/x_3d", lambda: conv(x=torch.randn(2, 6, 5)))
case("conv/stride_zero", lambda: conv(s=(0, 1)))
case("conv/stride_negative", lambda: conv(s=(1, -1)))
case("conv/padding_negative", lambda: conv(p=(-1, 1)))
case("conv/dilation_zero", lambda: conv(d=(0, 1)))
case("conv/kernel_zero", lambda: conv(k=(0, 3)))
case("conv/kernel_size_3_elems", lambda: OPS.sparse_conv2d(CX, CW.offsets, CW.indices, CW.values,
                                                           None, 4, 2, [3, 3, 3], [1, 1], [1, 1],
                                                           [1, 1], 1, -INF, INF))
case("conv/kernel_bigger_than_input", lambda: conv(p=(0, 0), k=(3, 3), d=(4, 4)))
case("conv/padding_2pow40", lambda: conv(p=(2**40, 2**40)))
case("conv/padding_2pow20", lambda: conv(p=(2**20, 2**20)))
case("conv/dilation_2pow40", lambda: conv(d=(2**40, 1)))
# At the edge of what the op can serve: 2^62 strides overflow the phase planes' size.
case("conv/stride_2pow62", lambda: conv(s=(2**62, 2**62)),
     lambda out: same(out, conv_ref(CX, CW, s=(2**62, 2**62))), may_raise=True)
case("conv/out_channels_2pow31", lambda: conv(co=2**31))
case("conv/out_min_gt_max", lambda: conv(lo=1.0, hi=0.0))
case("conv/out_min_nan", lambda: conv(lo=NAN))
case("conv/block_rows_5", lambda: conv(br=5))
case("conv/bias_wrong_len", lambda: conv(bias=torch.zeros(3)))
case("conv/x_nan_inf", lambda: conv(x=_with(_with(CX, (0, 1, 2, 2), NAN), (1, 0, 0, 0), -INF)),
     lambda out: same(out, conv_ref(_with(_with(CX, (0, 1, 2, 2), NAN), (1, 0, 0, 0), -INF), CW)))
case("conv/x_nan_relu", lambda: conv(x=_with(CX, (0, 1, 2, 2), NAN), lo=0.0),
     lambda out: same(out, conv_ref(_with(CX, (0, 1, 2, 2), NAN), CW, lo=0.0)))
_CWN = CSRWeight(CW.offsets, CW.indices, _with(CW.values, 1, INF), CW.shape, 1)
# An infinite weight at a zero-padding tap: padding is not an input, so it contributes nothing on
# every path (F.conv2d would give inf * 0 = NaN there).
case("conv/values_inf", lambda: conv(w=_CWN), lambda out: same(out, conv_ref(CX, _CWN)))
case("conv/values_inf_stride2_ragged", lambda: conv(w=_CWN, s=(2, 2)),
     lambda out: same(out, conv_ref(CX, _CWN, s=(2, 2))))
case("conv/zero_batch", lambda: conv(x=torch.randn(0, 2, 6, 5)),
     lambda out: same(out, torch.zeros(0, 4, 6, 5)))
case("conv/zero_width", lambda: conv(x=torch.randn(2, 2, 6, 0), p=(1, 0)))
case("conv/x_channels_last", lambda: conv(x=CX.contiguous(memory_format=torch.channels_last)),
     lambda out: same(out, conv_ref(CX, CW)))
case("conv/x_expanded", lambda: conv(x=CX[:1].expand(3, 2, 6, 5)),
     lambda out: same(out, conv_ref(CX[:1].expand(3, 2, 6, 5), CW)))
_CXO = torch.randn(200).as_strided((2, 2, 6, 5), (7, 3, 2, 1))
case("conv/x_overlapping", lambda: conv(x=_CXO), lambda out: same(out, conv_ref(_CXO, CW)))
case("conv/x_noncontig_slice", lambda: conv(x=CX[:, :, ::2, :]),
     lambda out: same(out, conv_ref(CX[:, :, ::2, :], CW)))

GO = torch.randn(2, 4, 6, 5)


def conv_gi(g=None, offsets=None, indices=None, ci=2, size=(6, 5), k=(3, 3), s=(1, 1), p=(1, 1),
            d=(1, 1), co=4):
    return OPS.sparse_conv2d_grad_input(GO if g is None else g,
                                        CW.offsets if offsets is None else offsets,
                                        CW.indices if indices is None else indices, CW.values, co,
                                        ci, list(size), list(k), list(s), list(p), list(d), 1)


def conv_gi_ref(g):
    dense = CW.to_dense().double().reshape(4, 2, 3, 3)
    return torch.nn.grad.conv2d_input((2, 2, 6, 5), dense, g.double(), padding=1)


case("conv_gi/index_out_of_range", lambda: conv_gi(indices=_with(CW.indices, 0, 200)))
case("conv_gi/offsets_int32_max", lambda: conv_gi(offsets=_with(CW.offsets, -1, I32_MAX)))
case("conv_gi/grad_out_wrong_spatial", lambda: conv_gi(g=torch.randn(2, 4, 5, 5)))
case("conv_gi/in_channels_negative", lambda: conv_gi(ci=-2))
case("conv_gi/wrong_width_grad_out", lambda: conv_gi(g=torch.randn(2, 5, 6, 5)))
case("conv_gi/out_channels_2pow40", lambda: conv_gi(co=2**40))
case("conv_gi/in_channels_wider", lambda: conv_gi(ci=3),  # third channel unstored: zero gradient
     lambda out: same(out, torch.cat([conv_gi_ref(GO), torch.zeros(2, 1, 6, 5)], 1)))
case("conv_gi/in_channels_too_many", lambda: conv_gi(ci=40))
case("conv_gi/input_size_negative", lambda: conv_gi(size=(-6, 5)))
case("conv_gi/input_size_2pow40", lambda: conv_gi(size=(2**40, 2**40)))
case("conv_gi/valid_noncontig", lambda: conv_gi(g=GO.contiguous(memory_format=torch.channels_last)),
     lambda out: same(out, conv_gi_ref(GO)))
case("conv_gi/zero_batch", lambda: conv_gi(g=torch.randn(0, 4, 6, 5)),
     lambda out: same(out, torch.zeros(0, 2, 6, 5)))


def conv_gv(g=None, x=None, offsets=None, indices=None, k=(3, 3), s=(1, 1), p=(1, 1), co=4,
            ci=2):
    return OPS.sparse_conv2d_grad_values(GO if g is None else g, CX if x is None else x,
                                         CW.offsets if offsets is None else offsets,
                                         CW.indices if indices is None else indices, co, ci,
                                         list(k), list(s), list(p), [1, 1], 1)


def conv_gv_ref(g, x):
    full = torch.nn.grad.conv2d_weight(x.double(), (4, 2, 3, 3), g.double(), padding=1)
    return full.reshape(4, -1)[CW.mask()]


case("conv_gv/index_out_of_range", lambda: conv_gv(indices=_with(CW.indices, 0, 200)))
case("conv_gv/offsets_not_monotone", lambda: conv_gv(offsets=_with(CW.offsets, 1, 10**6)))
case("conv_gv/wrong_width_x", lambda: conv_gv(x=torch.randn(2, 3, 6, 5)))
case("conv_gv/wrong_width_grad_out", lambda: conv_gv(g=torch.randn(2, 3, 6, 5)))
case("conv_gv/batch_mismatch", lambda: conv_gv(g=torch.randn(3, 4, 6, 5)))
case("conv_gv/spatial_mismatch", lambda: conv_gv(g=torch.randn(2, 4, 6, 4)))
case("conv_gv/mixed_f64", lambda: conv_gv(g=GO.double()))
case("conv_gv/nan", lambda: conv_gv(x=_with(CX, (0, 0, 0, 0), NAN)),
     lambda out: same(out, conv_gv_ref(GO, _with(CX, (0, 0, 0, 0), NAN))))
case("conv_gv/expanded", lambda: conv_gv(x=CX[:1].expand(2, 2, 6, 5)),
     lambda out: same(out, conv_gv_ref(GO, CX[:1].expand(2, 2, 6, 5))))

# ---- N:M ------------------------------------------------------------------------------------------
NW = NMWeight.from_dense(torch.randn(8, 22), 2, 4)
NX = torch.randn(3, 22)


def nm(x=None, values=None, meta=None, bias=None, n=2, m=4, K=22):
    return OPS.nm_linear(NX if x is None else x, NW.values if values is None else values,
                         NW.metadata if meta is None else meta, bias, K, n, m)


def _nm_cols(w):
    """Absolute column of every stored slot [out, G*n] (may reach past in_features)."""
    from sparse_ext.formats import nm_unpack_indices
    slots = w.values.shape[1]
    idx = nm_unpack_indices(w.metadata, slots, w.m).long()
    return idx + torch.arange(slots).div(w.n, rounding_mode="floor") * w.m


def nm_ref(x, w=NW, bias=None):
    """Per stored slot: y[r] = sum_s values[r, s] * x[col(r, s)], x zero-padded to G*m columns
    (so duplicate indices add up and a slot past in_features reads 0)."""
    cols = _nm_cols(w)
    K = w.shape[1]
    xp = torch.nn.functional.pad(x.double(), (0, cols.shape[1] // w.n * w.m - K))
    y = (xp[..., cols] * w.values.double()).sum(-1)  # [..., out, slots] -> [..., out]
    return y if bias is None else y + bias.double()


def nm_gi_ref(g, w):
    cols = _nm_cols(w)
    Kp = cols.shape[1] // w.n * w.m
    contrib = g.double().unsqueeze(-1) * w.values.double()  # [T, out, slots]
    out = torch.zeros(g.shape[0], Kp, dtype=torch.float64)
    out.index_add_(1, cols.reshape(-1), contrib.reshape(g.shape[0], -1))
    return out[:, :w.shape[1]]


case("nm/n_zero", lambda: nm(n=0))
case("nm/n_equals_m", lambda: nm(n=4))
case("nm/n_negative", lambda: nm(n=-2))
case("nm/m_3", lambda: nm(m=3))
case("nm/m_2pow31", lambda: nm(m=2**31))
case("nm/values_wrong_cols", lambda: nm(values=NW.values[:, :-1].contiguous()))
case("nm/values_wrong_rows", lambda: nm(values=NW.values[:-1].contiguous()))
case("nm/meta_wrong_shape", lambda: nm(meta=NW.metadata[:, :-1].contiguous()))
case("nm/meta_int32", lambda: nm(meta=NW.metadata.int()))
case("nm/x_wrong_in_features", lambda: nm(x=torch.randn(3, 30)))
# 21 and 23 columns need the same 6 groups of 4 as 22: only in_features tells them apart.
case("nm/wrong_width_narrower_same_groups", lambda: nm(x=torch.randn(3, 21)))
case("nm/wrong_width_wider_same_groups", lambda: nm(x=torch.randn(3, 23)))
case("nm/in_features_2pow40", lambda: nm(K=2**40))
case("nm/x_int", lambda: nm(x=torch.ones(3, 22, dtype=torch.int64)))
case("nm/bias_wrong_len", lambda: nm(bias=torch.zeros(9)))
case("nm/values_1d", lambda: nm(values=NW.values.reshape(-1)))
case("nm/x_f64_values_f32", lambda: nm(x=NX.double()))
# every metadata byte 0xFF: indices 3,3 in each group, duplicates, and the last group (columns 20,
# 21 of a 22-wide weight) points at columns 23 past in_features.
_META_FF = torch.full_like(NW.metadata, 255)
case("nm/metadata_all_ones", lambda: nm(meta=_META_FF),
     lambda out: same(out, nm_ref(NX, NMWeight(NW.values, _META_FF, NW.shape, 2, 4))))
case("nm/x_nan_inf", lambda: nm(x=_with(_with(NX, (0, 0), NAN), (1, 21), INF)),
     lambda out: same(out, nm_ref(_with(_with(NX, (0, 0), NAN), (1, 21), INF))))
case("nm/values_nan", lambda: nm(values=_with(NW.values, (0, 0), NAN)),
     lambda out: same(out, nm_ref(NX, NMWeight(_with(NW.values, (0, 0), NAN), NW.metadata,
                                               NW.shape, 2, 4))))
case("nm/zero_tokens", lambda: nm(x=torch.randn(0, 22)), lambda out: same(out, torch.zeros(0, 8)))
_NW0 = NMWeight.from_dense(torch.randn(0, 22), 2, 4)
case("nm/zero_out_features", lambda: OPS.nm_linear(NX, _NW0.values, _NW0.metadata, None, 22, 2, 4),
     lambda out: same(out, torch.zeros(3, 0)))
case("nm/values_noncontig", lambda: nm(values=NW.values.t().contiguous().t()))
case("nm/x_expanded", lambda: nm(x=NX[:1].expand(4, 22)),
     lambda out: same(out, nm_ref(NX[:1].expand(4, 22))))
_NXO = torch.randn(100).as_strided((5, 22), (3, 1))
case("nm/x_overlapping", lambda: nm(x=_NXO), lambda out: same(out, nm_ref(_NXO)))
case("nm/x_bf16_batch", lambda: nm(x=NX.bfloat16().reshape(3, 1, 22)),
     lambda out: same(out, nm_ref(NX.bfloat16().reshape(3, 1, 22)), atol=0.1, rtol=0.05))

for _name, (_n, _m, _K, _T, _dt) in {"gemv_1of16_k37": (1, 16, 37, 1, torch.float32),
                                     "tokens7_3of8_k9": (3, 8, 9, 7, torch.float32),
                                     "bf16_gemv_2of4_k6": (2, 4, 6, 1, torch.bfloat16),
                                     "f64_2of4": (2, 4, 22, 3, torch.float64)}.items():
    _w = NMWeight.from_dense(torch.randn(5, _K).to(_dt), _n, _m)
    _w = NMWeight(_with(_w.values, (0, 0), INF), _w.metadata, _w.shape, _n, _m)
    _x = torch.randn(_T, _K).to(_dt if _dt == torch.float64 else torch.float32)
    _x[-1, _K - 1] = NAN
    case(f"nm/nonfinite_{_name}",
         (lambda w=_w, x=_x, n=_n, m=_m: OPS.nm_linear(x, w.values, w.metadata, None,
                                                       w.in_features, n, m)),
         (lambda out, w=_w, x=_x: same(out, nm_ref(x, w), atol=1e-3, rtol=1e-3)))

_CW1 = spmm_weight(8, 6, br=4)
_CX1 = torch.randn(2, 6, 7, 9)
_CX1[0, 2, 3, 4] = NAN
for _name, (_x, _s) in {"1x1_nan_stride2_cl": (_CX1.contiguous(memory_format=torch.channels_last), 2),
                        "1x1_nan": (_CX1, 1), "1x1_f64": (_CX1.double(), 1)}.items():
    _ww = _CW1 if _x.dtype != torch.float64 else CSRWeight(_CW1.offsets, _CW1.indices,
                                                           _CW1.values.double(), _CW1.shape, 4)
    case(f"conv/{_name}",
         (lambda x=_x, s=_s, w=_ww: conv(x=x, w=w, co=8, k=(1, 1), s=(s, s), p=(0, 0), br=4)),
         (lambda out, x=_x, s=_s: same(out, conv_ref(x, _CW1, k=(1, 1), s=(s, s), p=(0, 0)))))

NG = torch.randn(3, 8)
case("nm_gi/in_features_wrong", lambda: OPS.nm_linear_grad_input(NG, NW.values, NW.metadata, 30, 2, 4))
case("nm_gi/in_features_negative",
     lambda: OPS.nm_linear_grad_input(NG, NW.values, NW.metadata, -22, 2, 4))
case("nm_gi/in_features_2pow40",
     lambda: OPS.nm_linear_grad_input(NG, NW.values, NW.metadata, 2**40, 2, 4))
case("nm_gi/wrong_width_grad_out", lambda: OPS.nm_linear_grad_input(torch.randn(3, 7), NW.values,
                                                                NW.metadata, 22, 2, 4))
case("nm_gi/metadata_all_ones",
     lambda: OPS.nm_linear_grad_input(NG, NW.values, _META_FF, 22, 2, 4),
     lambda out: same(out, nm_gi_ref(NG, NMWeight(NW.values, _META_FF, NW.shape, 2, 4))))
case("nm_gi/nan", lambda: OPS.nm_linear_grad_input(_with(NG, (0, 0), NAN), NW.values, NW.metadata,
                                                   22, 2, 4),
     lambda out: same(out[1:], NG[1:].double() @ NW.to_dense().double()))
case("nm_gv/token_mismatch", lambda: OPS.nm_linear_grad_values(torch.randn(4, 8), NX, NW.metadata,
                                                               22, 2, 4))
case("nm_gv/wrong_width_x", lambda: OPS.nm_linear_grad_values(NG, torch.randn(3, 23), NW.metadata,
                                                              22, 2, 4))
case("nm_gv/wrong_width_grad_out", lambda: OPS.nm_linear_grad_values(torch.randn(3, 9), NX,
                                                                     NW.metadata, 22, 2, 4))
case("nm_gv/meta_wrong_shape", lambda: OPS.nm_linear_grad_values(NG, NX, NW.metadata[:-1], 22, 2,
                                                                 4))
case("nm_gv/metadata_all_ones", lambda: OPS.nm_linear_grad_values(NG, NX, _META_FF, 22, 2, 4),
     lambda out: _check_nm_gv(out, _META_FF))
case("nm_gv/expanded", lambda: OPS.nm_linear_grad_values(NG[:1].expand(3, 8), NX, NW.metadata, 22,
                                                         2, 4),
     lambda out: _check_nm_gv(out, NW.metadata, NG[:1].expand(3, 8)))


def _check_nm_gv(out, meta, g=NG):
    from sparse_ext.formats import nm_unpack_indices
    full = g.double().t() @ torch.nn.functional.pad(NX.double(), (0, 2))  # [8, 24]
    idx = nm_unpack_indices(meta, NW.values.shape[1], 4).long()
    cols = idx + torch.arange(NW.values.shape[1]).div(2, rounding_mode="floor") * 4
    same(out, full.gather(1, cols))


case("nm_validate/duplicate_indices", lambda: OPS.nm_validate(NW.values, _META_FF, 22, 2, 4))
case("nm_validate/wrong_width_in_features", lambda: OPS.nm_validate(NW.values, NW.metadata, 40, 2, 4))
case("nm_validate/in_features_negative", lambda: OPS.nm_validate(NW.values, NW.metadata, -1, 2, 4))
case("nm_validate/valid", lambda: OPS.nm_validate(NW.values, NW.metadata, 22, 2, 4),
     lambda out: None if bool(out) else (_ for _ in ()).throw(AssertionError("not true")))

# ---- MoE ------------------------------------------------------------------------------------------
T, E, H, FF, K = 5, 4, 6, 3, 2
LG = torch.randn(T, E)
MX = torch.randn(T, H)
W1 = torch.randn(E, 2 * FF, H) * 0.3
W2 = torch.randn(E, H, FF) * 0.3


def route(lg=None, k=K, scoring="softmax", renorm=True, bias=None, ng=1, tg=1):
    return OPS.moe_route(LG if lg is None else lg, k, scoring, renorm, bias, ng, tg)


def _check_route(out, lg, k=K, finite_rows=None):
    from reference import moe_route_reference
    w, idx = out
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (lg.shape[0], k)
    assert bool(((idx >= 0) & (idx < lg.shape[-1])).all()), f"index out of range: {idx}"
    rows = torch.isfinite(lg).all(-1) if finite_rows is None else finite_rows
    if rows.any():
        rw, ri = moe_route_reference(lg[rows], k)
        assert torch.equal(idx[rows], ri), (idx[rows], ri)
        same(w[rows], rw)


case("route/top_k_zero", lambda: route(k=0))
case("route/top_k_gt_E", lambda: route(k=E + 1))
case("route/top_k_negative", lambda: route(k=-1))
case("route/top_k_2pow40", lambda: route(k=2**40))
case("route/scoring_bogus", lambda: route(scoring="bogus"))
case("route/groups_not_dividing", lambda: route(ng=3, tg=1))
case("route/groups_zero", lambda: route(ng=0, tg=0))
case("route/topk_groups_gt_groups", lambda: route(ng=2, tg=3))
case("route/groups_negative", lambda: route(ng=-2, tg=1))
case("route/wrong_width_selection_bias", lambda: route(bias=torch.zeros(E + 1)))
case("route/wrong_width_selection_bias_narrower", lambda: route(bias=torch.zeros(E - 1)))
case("route/logits_scalar", lambda: OPS.moe_route(torch.tensor(1.0), 1, "softmax", True, None, 1, 1))
case("route/logits_int", lambda: route(lg=torch.ones(T, E, dtype=torch.int32)))
case("route/zero_experts", lambda: route(lg=torch.randn(T, 0), k=1))
case("route/zero_tokens", lambda: route(lg=torch.randn(0, E)),
     lambda out: (same(out[0], torch.zeros(0, K)), same(out[1], torch.zeros(0, K))))
_LGN = _with(_with(_with(LG, (0, 1), NAN), (1, 2), INF), (2, 0), -INF)
case("route/nan_inf_logits", lambda: route(lg=_LGN),
     lambda out: _check_route(out, _LGN, finite_rows=torch.isfinite(_LGN).all(-1)))
case("route/all_nan_row", lambda: route(lg=_with(LG, 0, NAN)),
     lambda out: _check_route(out, _with(LG, 0, NAN)))
case("route/sigmoid_nan", lambda: route(lg=_with(LG, (0, 1), NAN), scoring="sigmoid"),
     lambda out: _check_idx_distinct(out))
case("route/noncontig", lambda: route(lg=LG.t().contiguous().t()), lambda out: _check_route(out, LG))
case("route/expanded", lambda: route(lg=LG[:1].expand(T, E)),
     lambda out: _check_route(out, LG[:1].expand(T, E)))


def _check_idx_distinct(out):
    idx = out[1]
    assert bool(((idx >= 0) & (idx < E)).all())
    for row in idx.tolist():
        assert len(set(row)) == len(row), row


IDX = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]])
case("permute/index_negative", lambda: OPS.moe_permute(_with(IDX, (0, 0), -1), E, -1))
case("permute/index_eq_E", lambda: OPS.moe_permute(_with(IDX, (0, 0), E), E, -1))
case("permute/index_2pow40", lambda: OPS.moe_permute(_with(IDX, (0, 0), 2**40), E, -1))
case("permute/index_int64_min", lambda: OPS.moe_permute(_with(IDX, (0, 0), -2**63), E, -1))
case("permute/num_experts_zero", lambda: OPS.moe_permute(IDX, 0, -1))
case("permute/num_experts_negative", lambda: OPS.moe_permute(IDX, -4, -1))
case("permute/wrong_width_k_gt_E", lambda: OPS.moe_permute(IDX, 1, -1))
case("permute/num_experts_2pow62", lambda: OPS.moe_permute(IDX, 2**62, -1))
case("permute/indices_1d", lambda: OPS.moe_permute(IDX.reshape(-1), E, -1))
case("permute/indices_float", lambda: OPS.moe_permute(IDX.float(), E, -1))
case("permute/capacity_negative_not_minus1", lambda: OPS.moe_permute(IDX, E, -7),
     lambda out: _check_permute(out, IDX, -1))
case("permute/capacity_huge", lambda: OPS.moe_permute(IDX, E, 2**62),
     lambda out: _check_permute(out, IDX, -1))
case("permute/capacity_zero", lambda: OPS.moe_permute(IDX, E, 0),
     lambda out: _check_permute(out, IDX, 0))
case("permute/num_experts_2pow31", lambda: OPS.moe_permute(IDX, 2**31, -1))
case("permute/duplicate_expert_in_row", lambda: OPS.moe_permute(_with(IDX, (0, 1), 0), E, -1),
     lambda out: _check_permute(out, _with(IDX, (0, 1), 0), -1))
case("permute/zero_tokens", lambda: OPS.moe_permute(torch.zeros(0, 2, dtype=torch.long), E, -1),
     lambda out: _check_permute(out, torch.zeros(0, 2, dtype=torch.long), -1))
case("permute/noncontig", lambda: OPS.moe_permute(IDX.t().contiguous().t(), E, -1),
     lambda out: _check_permute(out, IDX, -1))


def _check_permute(out, idx, capacity):
    row_token, offsets, inverse = out
    Tn, k = idx.shape
    assert offsets.shape == (E + 1,) and int(offsets[0]) == 0
    assert bool((offsets[1:] >= offsets[:-1]).all())
    kept = int(offsets[-1])
    assert row_token.shape == (Tn * k,) and inverse.shape == (Tn, k)
    taken = {}
    for j in range(k):  # slot-major keeps, like reference.moe_experts_reference
        for t in range(Tn):
            e = int(idx[t, j])
            taken[e] = taken.get(e, 0) + 1
            p = int(inverse[t, j])
            assert 0 <= p < Tn * k
            if capacity < 0 or taken[e] <= capacity:
                assert int(offsets[e]) <= p < int(offsets[e + 1]), (t, j, p)
                assert int(row_token[p]) == t
            else:
                assert p >= kept


ROW_TOKEN, OFFS, _INV = OPS.moe_permute(IDX, E, -1)


def mlp(x=None, rt=None, offs=None, w1=None, w2=None, act="silu", gated=True):
    return OPS.moe_expert_mlp(MX if x is None else x, ROW_TOKEN if rt is None else rt,
                              OFFS if offs is None else offs, W1 if w1 is None else w1,
                              W2 if w2 is None else w2, act, gated)


def mlp_ref(x, rt=ROW_TOKEN, offs=OFFS, w1=W1, w2=W2):
    y = torch.zeros(rt.shape[0], H, dtype=torch.float64)
    for e in range(E):
        for p in range(int(offs[e]), int(offs[e + 1])):
            h = w1[e].double() @ x[int(rt[p])].double()
            h = torch.nn.functional.silu(h[:FF]) * h[FF:]
            y[p] = w2[e].double() @ h
    return y


case("mlp/row_token_negative", lambda: mlp(rt=_with(ROW_TOKEN, 0, -1)))
case("mlp/row_token_eq_T", lambda: mlp(rt=_with(ROW_TOKEN, 0, T)))
case("mlp/row_token_2pow40", lambda: mlp(rt=_with(ROW_TOKEN, 3, 2**40)))
case("mlp/offsets_first_nonzero", lambda: mlp(offs=_with(OFFS, 0, 1)))
case("mlp/offsets_not_monotone", lambda: mlp(offs=_with(OFFS, 2, 0)))
case("mlp/offsets_last_past_rows", lambda: mlp(offs=_with(OFFS, E, 2 * T * K)))
case("mlp/offsets_int64_max", lambda: mlp(offs=_with(OFFS, E, 2**63 - 1)))
case("mlp/offsets_int32_max", lambda: mlp(offs=_with(OFFS, E, I32_MAX)))
case("mlp/offsets_negative", lambda: mlp(offs=_with(OFFS, 1, -3)))
case("mlp/offsets_wrong_len", lambda: mlp(offs=OFFS[:-1].contiguous()))
case("mlp/offsets_int32_dtype", lambda: mlp(offs=OFFS.int()))
case("mlp/row_token_2d", lambda: mlp(rt=ROW_TOKEN.reshape(2, -1)))
case("mlp/w1_wrong_shape", lambda: mlp(w1=W1[:, :-1].contiguous()))
case("mlp/w2_wrong_experts", lambda: mlp(w2=W2[:-1].contiguous()))
case("mlp/w_dtype_mix", lambda: mlp(w1=W1.double()))
case("mlp/activation_bogus", lambda: mlp(act="bogus"))
case("mlp/wrong_width_x_hidden", lambda: mlp(x=torch.randn(T, H + 1)))
case("mlp/wrong_width_x_hidden_narrower", lambda: mlp(x=torch.randn(T, H - 1)))
case("mlp/x_nan_inf", lambda: mlp(x=_with(_with(MX, (0, 0), NAN), (1, 1), INF)),
     lambda out: same(out, mlp_ref(_with(_with(MX, (0, 0), NAN), (1, 1), INF))))
case("mlp/offsets_partial_rows", lambda: mlp(offs=_with(OFFS, E, int(OFFS[E]) - 2)),
     lambda out: same(out, mlp_ref(MX, offs=_with(OFFS, E, int(OFFS[E]) - 2))))
case("mlp/zero_rows", lambda: mlp(rt=torch.zeros(0, dtype=torch.long),
                                  offs=torch.zeros(E + 1, dtype=torch.long)),
     lambda out: same(out, torch.zeros(0, H)))
case("mlp/noncontig_weights", lambda: mlp(w1=W1.transpose(1, 2).contiguous().transpose(1, 2),
                                          x=MX[:1].expand(T, H)),
     lambda out: same(out, mlp_ref(MX[:1].expand(T, H))))

GY = torch.randn(T * K, H)
case("mlp_bwd/grad_wrong_shape", lambda: OPS.moe_expert_mlp_backward(
    GY[:-1], MX, ROW_TOKEN, OFFS, W1, W2, "silu", True))
case("mlp_bwd/wrong_width_grad_hidden", lambda: OPS.moe_expert_mlp_backward(
    torch.randn(T * K, H + 1), MX, ROW_TOKEN, OFFS, W1, W2, "silu", True))
case("mlp_bwd/wrong_width_x_hidden", lambda: OPS.moe_expert_mlp_backward(
    GY, torch.randn(T, H + 1), ROW_TOKEN, OFFS, W1, W2, "silu", True))
case("mlp_bwd/row_token_oob", lambda: OPS.moe_expert_mlp_backward(
    GY, MX, _with(ROW_TOKEN, 0, 99), OFFS, W1, W2, "silu", True))
case("mlp_bwd/offsets_int64_max", lambda: OPS.moe_expert_mlp_backward(
    GY, MX, ROW_TOKEN, _with(OFFS, E, 2**63 - 1), W1, W2, "silu", True))
case("mlp_bwd/offsets_not_monotone", lambda: OPS.moe_expert_mlp_backward(
    GY, MX, ROW_TOKEN, _with(OFFS, 1, 9), W1, W2, "silu", True))


def _check_mlp_bwd(out):
    x, w1, w2 = (t.double().requires_grad_() for t in (MX, W1, W2))
    y = torch.zeros(T * K, H, dtype=torch.float64)
    rows = []
    for e in range(E):
        for p in range(int(OFFS[e]), int(OFFS[e + 1])):
            h = w1[e] @ x[int(ROW_TOKEN[p])]
            h = torch.nn.functional.silu(h[:FF]) * h[FF:]
            rows.append((p, w2[e] @ h))
    y = torch.stack([r for _, r in sorted(rows, key=lambda t: t[0])])
    y.backward(GY[:y.shape[0]].double())
    for got, ref in zip(out, (x.grad, w1.grad, w2.grad)):
        same(got, ref)


case("mlp_bwd/expanded_grad", lambda: OPS.moe_expert_mlp_backward(
    GY.contiguous(), MX, ROW_TOKEN, OFFS, W1, W2, "silu", True), _check_mlp_bwd)

EY = torch.randn(T * K, H)
TW = torch.rand(T, K)
case("combine/inverse_negative", lambda: OPS.moe_combine(EY, TW, _with(_INV, (0, 0), -1)))
case("combine/inverse_oob", lambda: OPS.moe_combine(EY, TW, _with(_INV, (0, 0), T * K)))
case("combine/inverse_2pow40", lambda: OPS.moe_combine(EY, TW, _with(_INV, (0, 0), 2**40)))
case("combine/wrong_width_topk", lambda: OPS.moe_combine(EY, TW[:, :1], _INV))
case("combine/weights_1d", lambda: OPS.moe_combine(EY, TW.reshape(-1), _INV.reshape(-1)))
case("combine/inverse_float", lambda: OPS.moe_combine(EY, TW, _INV.float()))
case("combine/expert_out_1d", lambda: OPS.moe_combine(EY.reshape(-1), TW, _INV))


def combine_ref(ey, tw, inv):
    return (tw.double().unsqueeze(-1) * ey.double()[inv]).sum(1)


case("combine/nan_inf", lambda: OPS.moe_combine(_with(EY, (0, 0), NAN), _with(TW, (1, 1), INF), _INV),
     lambda out: same(out, combine_ref(_with(EY, (0, 0), NAN), _with(TW, (1, 1), INF), _INV)))
case("combine/shared_rows", lambda: OPS.moe_combine(EY, TW, torch.zeros_like(_INV)),
     lambda out: same(out, combine_ref(EY, TW, torch.zeros_like(_INV))))
case("combine/expanded_views", lambda: OPS.moe_combine(EY[:1].expand(T * K, H), TW.t().contiguous().t(),
                                                       _INV),
     lambda out: same(out, combine_ref(EY[:1].expand(T * K, H), TW, _INV)))
case("combine/zero_tokens", lambda: OPS.moe_combine(EY, torch.zeros(0, K),
                                                    torch.zeros(0, K, dtype=torch.long)),
     lambda out: same(out, torch.zeros(0, H)))
GC = torch.randn(T, H)
case("combine_bwd/inverse_oob", lambda: OPS.moe_combine_backward(GC, EY, TW, _with(_INV, (0, 0), 99)))
case("combine_bwd/grad_wrong_shape", lambda: OPS.moe_combine_backward(GC[:-1], EY, TW, _INV))
case("combine_bwd/wrong_width_grad_hidden",
     lambda: OPS.moe_combine_backward(torch.randn(T, H + 1), EY, TW, _INV))
case("combine_bwd/inverse_negative",
     lambda: OPS.moe_combine_backward(GC, EY, TW, _with(_INV, (2, 1), -2**62)))


def _check_combine_bwd(out, inv=_INV):
    ey, tw = EY.double().requires_grad_(), TW.double().requires_grad_()
    combine_ref(ey, tw, inv).backward(GC.double())
    same(out[0], ey.grad)
    same(out[1], tw.grad)


case("combine_bwd/valid", lambda: OPS.moe_combine_backward(GC, EY, TW, _INV), _check_combine_bwd)
# inverse must not repeat a row (each pair owns its gradient row): raises.
case("combine_bwd/shared_rows",
     lambda: OPS.moe_combine_backward(GC, EY, TW, torch.zeros_like(_INV)))


# ---- structure tensors as views: strided, expanded (stride 0), overlapping ------------------------
def _strided(t):
    """The same values as ``t`` in a non-contiguous view (every other element of a doubled copy)."""
    return torch.stack([t, t], -1).select(-1, 0)


# The structure and the stored values must be contiguous: these raise.
case("views/spmm_offsets_strided", lambda: spmm(offsets=_strided(W.offsets)))
case("views/spmm_indices_strided", lambda: spmm(indices=_strided(W.indices)))
case("views/spmm_values_expanded", lambda: spmm(values=torch.ones(1).expand(W.nnz)))
case("views/spmm_bias_expanded", lambda: spmm(bias=torch.ones(1).expand(8)),
     lambda out: same(out, spmm_ref(X, W, torch.ones(8))))
case("views/conv_offsets_strided", lambda: conv(offsets=_strided(CW.offsets)))
case("views/conv_values_expanded", lambda: conv(values=torch.randn(1).expand(CW.nnz)))
case("views/nm_metadata_strided", lambda: nm(meta=_strided(NW.metadata)))
case("views/nm_values_expanded", lambda: nm(values=torch.ones(1, 1).expand(*NW.values.shape)))
case("views/permute_indices_expanded", lambda: OPS.moe_permute(IDX[:1].expand(T, K), E, -1),
     lambda out: _check_permute(out, IDX[:1].expand(T, K), -1))
case("views/mlp_offsets_strided", lambda: mlp(offs=_strided(OFFS), rt=_strided(ROW_TOKEN)),
     lambda out: same(out, mlp_ref(MX)))
case("views/mlp_w2_overlapping", lambda: mlp(w2=W2[:1].expand(E, H, FF)),
     lambda out: same(out, mlp_ref(MX, w2=W2[:1].expand(E, H, FF))))
case("views/combine_inverse_strided", lambda: OPS.moe_combine(EY, TW, _strided(_INV)),
     lambda out: same(out, combine_ref(EY, TW, _INV)))
case("views/combine_bwd_inverse_expanded",  # repeats rows: must raise (see combine_bwd/shared_rows)
     lambda: OPS.moe_combine_backward(GC, EY, TW, _INV[:1].expand(T, K)))
case("views/route_bias_expanded", lambda: route(bias=torch.zeros(1).expand(E)),
     lambda out: _check_route(out, LG))


# ---- driver ---------------------------------------------------------------------------------------
OP_PREFIX = {"spmm": "spmm", "spmm_t": "spmm_transpose_structure", "sddmm": "spmm_sddmm",
             "conv": "sparse_conv2d", "conv_gi": "sparse_conv2d_grad_input",
             "conv_gv": "sparse_conv2d_grad_values", "nm": "nm_linear",
             "nm_gi": "nm_linear_grad_input", "nm_gv": "nm_linear_grad_values",
             "nm_validate": "nm_validate", "route": "moe_route", "permute": "moe_permute",
             "mlp": "moe_expert_mlp", "mlp_bwd": "moe_expert_mlp_backward",
             "combine": "moe_combine", "combine_bwd": "moe_combine_backward", "views": None}
MEM_LIMIT = 12 * 2**30  # address space of a child: an overflowed shape fails to allocate


def _child(names):
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEM_LIMIT, MEM_LIMIT))
    for name in names:
        kind, run, check = CASES[name]
        print(json.dumps({"start": name}), flush=True)
        isas = sparse_ext.supported_isas() if check else [None]
        res = {"name": name, "status": "ok", "detail": ""}
        for isa in isas:
            ctx = sparse_ext.use_isa(isa) if isa else _nullctx()
            with ctx:
                try:
                    out = run()
                except (RuntimeError, ValueError, TypeError, IndexError, OverflowError,
                        MemoryError, NotImplementedError) as e:
                    res = {"name": name, "status": "raised",
                           "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                    continue
                if check is None:
                    res = {"name": name, "status": "returned", "detail": _describe(out)}
                    break
                try:
                    check(out)
                except Exception as e:  # noqa: BLE001 - any check failure is a wrong result
                    res = {"name": name, "status": "wrong",
                           "detail": f"isa={isa}: {type(e).__name__}: {str(e)[:300]}"}
                    break
        print(json.dumps(res), flush=True)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _describe(out):
    outs = out if isinstance(out, (tuple, list)) else [out]
    return ", ".join(f"{tuple(o.shape)} {o.dtype}" if isinstance(o, torch.Tensor) else repr(o)
                     for o in outs)


def run_all(names, timeout=240):
    """Runs ``names`` in children; a child that dies is restarted after its crashing case."""
    results, todo = {}, list(names)
    here = os.path.dirname(os.path.abspath(__file__))
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(sparse_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here, pkg_root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    while todo:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *todo],
                              capture_output=True, text=True, timeout=timeout, cwd=here, env=env)
        started = None
        for line in proc.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["name"]] = msg
                started = None
        if started is not None:
            results[started] = {"name": started, "status": "crashed",
                                "detail": f"exit code {proc.returncode}: {proc.stderr[-400:]}"}
        todo = [n for n in todo if n not in results]
        if todo and started is None:  # died before starting anything: give up on the rest
            for n in todo:
                results[n] = {"name": n, "status": "crashed",
                              "detail": f"child failed: {proc.stderr[-400:]}"}
            todo = []
    return results


@pytest.fixture(scope="module")
def results():
    return run_all(sorted(CASES))


def _registered_ops():
    """Every schema of the library (``dir(torch.ops.sparse_ext)`` lists only ops touched so far)."""
    return {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
            if n.startswith("sparse_ext::")}


def test_every_op_has_hostile_cases():
    covered = {OP_PREFIX[name.split("/")[0]] for name in CASES} - {None}
    assert _registered_ops() <= covered, (
        f"ops with no hostile case: {sorted(_registered_ops() - covered)}")


def test_every_op_has_a_wrong_width_case():
    """Each op gets an argument whose width disagrees with the weight (or with the other tensors):
    a case named ``<op>/wrong_width...`` that must raise."""
    covered = {OP_PREFIX[name.split("/")[0]] for name in CASES
               if name.split("/")[1].startswith("wrong_width") and CASES[name][0] == "must_raise"}
    missing = _registered_ops() - covered
    assert not missing, f"ops with no must-raise wrong_width case: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile(results, name):
    kind, _, _ = CASES[name]
    res = results[name]
    assert res["status"] != "crashed", f"{name} crashed the process: {res['detail']}"
    assert res["status"] != "wrong", f"{name} returned a wrong result: {res['detail']}"
    if kind == "must_raise":
        assert res["status"] == "raised", f"{name} must raise, returned {res['detail']}"
    if kind == "must_be_correct":
        assert res["status"] == "ok", f"{name} is a valid input and must not raise: {res['detail']}"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])


@pytest.mark.parametrize("family", ["spmm", "nm", "conv", "moe"])
def test_meta_tensor_mixed_with_cpu_raises(family):
    """A meta tensor among CPU arguments dispatches to the fake kernel, which must raise like the
    real kernel instead of returning uninitialized memory."""
    ops = torch.ops.sparse_ext
    if family == "spmm":
        w = CSRWeight.from_dense(torch.randn(8, 16) * (torch.rand(8, 16) > 0.5))
        call = lambda: ops.spmm(torch.randn(2, 16), w.offsets.to("meta"), w.indices, w.values,
                                None, 8, 16, 1)
    elif family == "nm":
        w = NMWeight.from_dense(torch.randn(8, 16), 2, 4)
        call = lambda: ops.nm_linear(torch.randn(2, 16), w.values, w.metadata.to("meta"), None,
                                     16, 2, 4)
    elif family == "conv":
        w = CSRWeight.from_dense(torch.randn(4, 3) * (torch.rand(4, 3) > 0.3))
        call = lambda: ops.sparse_conv2d(torch.randn(1, 3, 5, 5), w.offsets, w.indices,
                                         w.values.to("meta"), None, 4, 3, [1, 1], [1, 1], [0, 0],
                                         [1, 1], 1, float("-inf"), float("inf"))
    else:
        call = lambda: ops.moe_combine(torch.randn(4, 8), torch.rand(2, 2),
                                       torch.arange(4).reshape(2, 2).to("meta"))
    with pytest.raises(RuntimeError, match="must be on .*'s device cpu, got meta"):
        call()

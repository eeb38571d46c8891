"""Typed wrappers over ``torch.ops.sparse_ext``, plus their fake kernels and autograd.

Every schema is defined once in ``csrc/registration.cpp``; this file makes each op traceable
(``register_fake``) and differentiable (``register_autograd``, backward built from other ops).
"""
from typing import Optional

import torch

from . import _C  # noqa: F401  registers the library before the registrations below
from .formats import K_BLOCK, CSRWeight

_lib = torch.ops.sparse_ext


# ---- SpMM --------------------------------------------------------------------------------------
def spmm(x: torch.Tensor, weight: CSRWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and a ``CSRWeight`` W."""
    return _lib.spmm(x, weight.offsets, weight.indices, weight.values, bias,
                     weight.out_features, weight.block_rows)


@torch.library.register_fake("sparse_ext::spmm")
def _spmm_fake(x, offsets, indices, values, bias, out_features, block_rows):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparse_ext::spmm_transpose_structure")
def _spmm_transpose_structure_fake(offsets, indices, out_features, in_features, block_rows):
    m_blocks = -(-out_features // K_BLOCK)
    entries = indices.shape[0] * block_rows
    return (offsets.new_empty(in_features * m_blocks + 1), indices.new_empty(entries),
            offsets.new_empty(entries, dtype=torch.int64))


@torch.library.register_fake("sparse_ext::spmm_sddmm")
def _spmm_sddmm_fake(grad_out, x, offsets, indices, block_rows):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(indices.shape[0] * block_rows, dtype=dtype)


def _spmm_setup_context(ctx, inputs, output):
    x, offsets, indices, values, bias, out_features, block_rows = inputs
    ctx.save_for_backward(x, offsets, indices, values)
    ctx.out_features = out_features
    ctx.block_rows = block_rows
    ctx.bias_dtype = None if bias is None else bias.dtype


def _spmm_backward(ctx, grad):
    x, offsets, indices, values = ctx.saved_tensors
    M, K, R = ctx.out_features, x.shape[-1], ctx.block_rows
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        offsets_t, indices_t, perm = _lib.spmm_transpose_structure(offsets, indices, M, K, R)
        grad_x = _lib.spmm(grad.to(x.dtype), offsets_t, indices_t, values[perm], None, K, 1)
    if ctx.needs_input_grad[3]:
        grad_values = _lib.spmm_sddmm(grad, x, offsets, indices, R).to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, M).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_values, grad_bias, None, None


torch.library.register_autograd("sparse_ext::spmm", _spmm_backward,
                                setup_context=_spmm_setup_context)


# ---- N:M semi-structured (issue 3) ------------------------------------------------------------
from .formats import NMWeight  # noqa: E402


def nm_linear(x: torch.Tensor, weight: NMWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and an ``NMWeight`` W."""
    return _lib.nm_linear(x, weight.values, weight.metadata, bias, weight.n, weight.m)


@torch.library.register_fake("sparse_ext::nm_linear")
def _nm_linear_fake(x, values, metadata, bias, n, m):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(values.dim() == 2, lambda: "values must be 2-D")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparse_ext::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_out, values, metadata, in_features, n, m):
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.register_fake("sparse_ext::nm_linear_grad_values")
def _nm_linear_grad_values_fake(grad_out, x, metadata, n, m):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((grad_out.shape[-1], -(-x.shape[-1] // m) * n), dtype=dtype)


@torch.library.register_fake("sparse_ext::nm_validate")
def _nm_validate_fake(values, metadata, in_features, n, m):
    return metadata.new_empty((), dtype=torch.bool)


def _nm_linear_setup_context(ctx, inputs, output):
    x, values, metadata, bias, n, m = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.n, ctx.m = n, m
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nm_linear_backward(ctx, grad):
    x, values, metadata = ctx.saved_tensors
    n, m = ctx.n, ctx.m
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        g = grad.to(torch.float64) if values.dtype == torch.float64 else grad
        grad_x = _lib.nm_linear_grad_input(g, values, metadata, x.shape[-1], n, m).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = _lib.nm_linear_grad_values(grad, x, metadata, n, m).to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, grad_values, None, grad_bias, None, None


torch.library.register_autograd("sparse_ext::nm_linear", _nm_linear_backward,
                                setup_context=_nm_linear_setup_context)
# ---- end N:M ----

"""SpMM ops: ``spmm`` (blocked-CSR weight x activations), its fake kernels and autograd."""
from typing import TYPE_CHECKING, Optional

import torch

from ._registration import (call_differentiable, check_weight_dim, check_width, lib,
                            register_fake)

if TYPE_CHECKING:
    from ..formats import CSRWeight

K_BLOCK = 256  # kSpmmKBlock (csrc/kernels/spmm/spmm.h): one byte per column index


def spmm(x: torch.Tensor, weight: "CSRWeight", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and a ``CSRWeight`` W."""
    return call_differentiable(lib.spmm, x, weight.offsets, weight.indices, weight.values, bias,
                               weight.out_features, weight.in_features, weight.block_rows)


@register_fake("sparse_ext::spmm")
def _spmm_fake(x, offsets, indices, values, bias, out_features, in_features, block_rows):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    check_weight_dim(out_features, "out_features")
    check_weight_dim(in_features, "in_features")
    check_width(x, "x", -1, in_features, "features", "in_features")
    return x.new_empty((*x.shape[:-1], out_features))


@register_fake("sparse_ext::spmm_transpose_structure")
def _spmm_transpose_structure_fake(offsets, indices, out_features, in_features, block_rows):
    m_blocks = -(-out_features // K_BLOCK)
    entries = indices.shape[0] * block_rows
    return (offsets.new_empty(in_features * m_blocks + 1), indices.new_empty(entries),
            offsets.new_empty(entries, dtype=torch.int64))


@register_fake("sparse_ext::spmm_sddmm")
def _spmm_sddmm_fake(grad_out, x, offsets, indices, out_features, in_features, block_rows):
    check_width(grad_out, "grad_out", -1, out_features, "features", "out_features")
    check_width(x, "x", -1, in_features, "features", "in_features")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(indices.shape[0] * block_rows, dtype=dtype)


def _spmm_setup_context(ctx, inputs, output):
    x, offsets, indices, values, bias, out_features, in_features, block_rows = inputs
    ctx.save_for_backward(x, offsets, indices, values)
    ctx.out_features = out_features
    ctx.in_features = in_features
    ctx.block_rows = block_rows
    ctx.bias_dtype = None if bias is None else bias.dtype


def _spmm_backward(ctx, grad):
    x, offsets, indices, values = ctx.saved_tensors
    M, K, R = ctx.out_features, ctx.in_features, ctx.block_rows
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        offsets_t, indices_t, perm = lib.spmm_transpose_structure(offsets, indices, M, K, R)
        grad_x = lib.spmm(grad.to(x.dtype), offsets_t, indices_t, values[perm], None, K, M, 1)
    if ctx.needs_input_grad[3]:
        grad_values = lib.spmm_sddmm(grad, x, offsets, indices, M, K, R).to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, M).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_values, grad_bias, None, None, None


torch.library.register_autograd("sparse_ext::spmm", _spmm_backward,
                                setup_context=_spmm_setup_context)

"""N:M ops: ``nm_linear`` (semi-structured weight x activations), its fake kernels and autograd."""
from typing import TYPE_CHECKING, Optional

import torch

from ._registration import (call_differentiable, check_weight_dim, check_width, lib,
                            register_fake)

if TYPE_CHECKING:
    from ..formats import NMWeight


def nm_linear(x: torch.Tensor, weight: "NMWeight", bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and an ``NMWeight`` W."""
    return call_differentiable(lib.nm_linear, x, weight.values, weight.metadata, bias,
                               weight.in_features, weight.n, weight.m)


@register_fake("sparse_ext::nm_linear")
def _nm_linear_fake(x, values, metadata, bias, in_features, n, m):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(values.dim() == 2, lambda: "values must be 2-D")
    check_weight_dim(in_features, "in_features")
    check_width(x, "x", -1, in_features, "features", "in_features")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@register_fake("sparse_ext::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_out, values, metadata, in_features, n, m):
    check_weight_dim(in_features, "in_features")
    check_width(grad_out, "grad_out", -1, values.shape[0], "features", "out_features")
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@register_fake("sparse_ext::nm_linear_grad_values")
def _nm_linear_grad_values_fake(grad_out, x, metadata, in_features, n, m):
    check_width(grad_out, "grad_out", -1, metadata.shape[0], "features", "out_features")
    check_width(x, "x", -1, in_features, "features", "in_features")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((grad_out.shape[-1], -(-x.shape[-1] // m) * n), dtype=dtype)


@register_fake("sparse_ext::nm_validate")
def _nm_validate_fake(values, metadata, in_features, n, m):
    return metadata.new_empty((), dtype=torch.bool)


def _nm_linear_setup_context(ctx, inputs, output):
    x, values, metadata, bias, in_features, n, m = inputs
    ctx.save_for_backward(x, values, metadata)
    ctx.in_features, ctx.n, ctx.m = in_features, n, m
    ctx.bias_dtype = None if bias is None else bias.dtype


def _nm_linear_backward(ctx, grad):
    x, values, metadata = ctx.saved_tensors
    K, n, m = ctx.in_features, ctx.n, ctx.m
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        g = grad.to(torch.float64) if values.dtype == torch.float64 else grad
        grad_x = lib.nm_linear_grad_input(g, values, metadata, K, n, m).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = lib.nm_linear_grad_values(grad, x, metadata, K, n, m).to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, grad_values, None, grad_bias, None, None, None


torch.library.register_autograd("sparse_ext::nm_linear", _nm_linear_backward,
                                setup_context=_nm_linear_setup_context)

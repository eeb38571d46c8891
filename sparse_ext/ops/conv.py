"""Sparse conv ops: ``sparse_conv2d`` (NCHW, blocked-CSR weight), its fake kernels and autograd."""
from typing import TYPE_CHECKING, Optional

import torch

from ._registration import (call_differentiable, check_weight_dim, check_width, lib,
                            register_fake)

if TYPE_CHECKING:
    from ..formats import CSRWeight


# Schemas in csrc/registration.cpp; kernels in csrc/kernels/conv. W is a CSRWeight of shape
# [out_channels, in_channels * kh * kw] (nn.Conv2d's weight.reshape(out_channels, -1)).
_INF = float("inf")


def _pair(v, name):
    if isinstance(v, int):
        return [v, v]
    v = [int(e) for e in v]
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v}")
    return v


def activation_bounds(activation):
    """``None`` | ``"relu"`` | ``"relu6"`` | ``(min, max)`` -> the (out_min, out_max) clamp."""
    if activation is None or activation == "none":
        return -_INF, _INF
    if activation == "relu":
        return 0.0, _INF
    if activation == "relu6":
        return 0.0, 6.0
    if isinstance(activation, (tuple, list)) and len(activation) == 2:
        lo = -_INF if activation[0] is None else float(activation[0])
        hi = _INF if activation[1] is None else float(activation[1])
        if not lo <= hi:
            raise ValueError(f"activation clamp needs min <= max, got {activation}")
        return lo, hi
    raise ValueError(f"activation must be None, 'relu', 'relu6' or a (min, max) pair, got {activation!r}")


def conv_output_size(size, kernel, stride, padding, dilation):
    return [(size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
            for i in range(2)]


def sparse_conv2d(x: torch.Tensor, weight: "CSRWeight", bias: Optional[torch.Tensor] = None,
                  kernel_size=1, stride=1, padding=0, dilation=1, activation=None) -> torch.Tensor:
    """``act(conv2d(x, W, bias))`` for NCHW ``x [B, C_in, H, W]`` (channels_last accepted) and a
    CSRWeight W [out_channels, in_channels * kh * kw]; groups = 1, zero padding."""
    lo, hi = activation_bounds(activation)
    kernel_size = _pair(kernel_size, "kernel_size")
    taps = kernel_size[0] * kernel_size[1]
    if taps < 1 or weight.in_features % taps:
        raise ValueError(f"a weight with {weight.in_features} columns cannot hold a "
                         f"{kernel_size[0]}x{kernel_size[1]} kernel (in_channels * kh * kw columns)")
    return call_differentiable(lib.sparse_conv2d, x, weight.offsets, weight.indices,
                               weight.values, bias, weight.out_features,
                               weight.in_features // taps, kernel_size, _pair(stride, "stride"),
                               _pair(padding, "padding"), _pair(dilation, "dilation"),
                               weight.block_rows, lo, hi)


def sparse_conv2d_op(x, offsets, indices, values, bias, out_channels, in_channels, kernel_size,
                     stride, padding, dilation, block_rows, out_min, out_max):
    """The raw op with every argument explicit (lists for the pairs); modules cache them."""
    return call_differentiable(lib.sparse_conv2d, x, offsets, indices, values, bias,
                               out_channels, in_channels, kernel_size, stride, padding, dilation,
                               block_rows, out_min, out_max)


@register_fake("sparse_ext::sparse_conv2d")
def _sparse_conv2d_fake(x, offsets, indices, values, bias, out_channels, in_channels, kernel_size,
                        stride, padding, dilation, block_rows, out_min, out_max):
    torch._check(x.dim() == 4, lambda: "x must be 4-D [batch, channels, height, width]")
    check_weight_dim(out_channels, "out_channels")
    check_weight_dim(in_channels, "in_channels")
    check_width(x, "x", 1, in_channels, "channels", "in_channels")
    oh, ow = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, oh, ow))  # always NCHW-contiguous


@register_fake("sparse_ext::sparse_conv2d_grad_input")
def _sparse_conv2d_grad_input_fake(grad_out, offsets, indices, values, out_channels, in_channels,
                                   input_size, kernel_size, stride, padding, dilation, block_rows):
    check_width(grad_out, "grad_out", 1, out_channels, "channels", "out_channels")
    check_weight_dim(in_channels, "in_channels")
    return grad_out.new_empty((grad_out.shape[0], in_channels, input_size[0], input_size[1]))


@register_fake("sparse_ext::sparse_conv2d_grad_values")
def _sparse_conv2d_grad_values_fake(grad_out, x, offsets, indices, out_channels, in_channels,
                                    kernel_size, stride, padding, dilation, block_rows):
    check_width(grad_out, "grad_out", 1, out_channels, "channels", "out_channels")
    check_width(x, "x", 1, in_channels, "channels", "in_channels")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(indices.shape[0] * block_rows, dtype=dtype)


def _sparse_conv2d_setup_context(ctx, inputs, output):
    (x, offsets, indices, values, bias, out_channels, in_channels, kernel_size, stride, padding,
     dilation, block_rows, out_min, out_max) = inputs
    ctx.clamped = out_min != -_INF or out_max != _INF
    ctx.save_for_backward(x, offsets, indices, values, output if ctx.clamped else None)
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation))
    ctx.out_channels, ctx.block_rows = out_channels, block_rows
    ctx.bounds = (out_min, out_max)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _sparse_conv2d_backward(ctx, grad):
    x, offsets, indices, values, out = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.geometry
    M, R, C = ctx.out_channels, ctx.block_rows, x.shape[1]
    if ctx.clamped:  # d clamp / d pre-activation: 1 strictly inside (out_min, out_max)
        lo, hi = ctx.bounds
        grad = grad * ((out > lo) & (out < hi)).to(grad.dtype)
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        pointwise = (kernel_size == [1, 1] and stride == [1, 1] and padding == [0, 0])
        if pointwise:  # W^T is another 1x1 sparse conv (the SpMM family's transposed structure)
            offsets_t, indices_t, perm = lib.spmm_transpose_structure(offsets, indices, M, C, R)
            grad_x = lib.sparse_conv2d(grad.to(x.dtype), offsets_t, indices_t, values[perm], None,
                                       C, M, [1, 1], [1, 1], [0, 0], [1, 1], 1, -_INF, _INF)
        else:
            grad_x = lib.sparse_conv2d_grad_input(grad.to(x.dtype), offsets, indices, values, M,
                                                  C, list(x.shape[2:]), kernel_size, stride,
                                                  padding, dilation, R)
    if ctx.needs_input_grad[3]:
        grad_values = lib.sparse_conv2d_grad_values(grad.to(x.dtype), x, offsets, indices, M, C,
                                                    kernel_size, stride, padding, dilation,
                                                    R).to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
    return (grad_x, None, None, grad_values, grad_bias, None, None, None, None, None, None, None,
            None, None)


torch.library.register_autograd("sparse_ext::sparse_conv2d", _sparse_conv2d_backward,
                                setup_context=_sparse_conv2d_setup_context)

"""Typed wrappers over ``torch.ops.sparse_ext``, plus their fake kernels and autograd.

Every schema is defined once in ``csrc/registration.cpp``; this file makes each op traceable
(``register_fake``) and differentiable (``register_autograd``, backward built from other ops).
"""
import functools
import inspect
from typing import Optional

import torch

from . import _C  # noqa: F401  registers the library before the registrations below
from .formats import K_BLOCK, CSRWeight, NMWeight

_lib = torch.ops.sparse_ext


def _register_fake(op_name):
    """``register_fake`` plus the check every real kernel makes first: all tensor arguments on one
    device. Without it a meta tensor meeting a CPU tensor would reach the fake kernel (the Meta
    key wins dispatch) and return an uninitialized result instead of an error."""
    def register(fake):
        names = list(inspect.signature(fake).parameters)

        @functools.wraps(fake)
        def checked(*args, **kwargs):
            tensors = [(names[i], a) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
            tensors += [(k, v) for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
            if tensors:
                first, ref = tensors[0]
                for name, t in tensors[1:]:
                    torch._check(t.device == ref.device, lambda: (
                        f"{name} must be on {first}'s device {ref.device}, got {t.device}"))
            return fake(*args, **kwargs)

        torch.library.register_fake(op_name)(checked)
        return fake
    return register


def _check_width(t, name, dim, expected, unit, weight_dim):
    """The kernels' width check (csrc/ops/common.h check_width), same wording, for fake tensors."""
    # On failure the message shows sizes, not symbols (a compiled graph traces x's width as a
    # symbol once it has seen two widths); int() only runs once the check has failed.
    torch._check(t.shape[dim] == expected, lambda: (
        f"{name} has {int(t.shape[dim])} {unit}, this weight expects {weight_dim}={expected} "
        f"({name} shape {[int(s) for s in t.shape]})"))


def _check_weight_dim(value, name):
    torch._check(0 <= value <= _MAX_WEIGHT_DIM,
                 lambda: f"{name} must be in [0, 2^31 - 1], got {value}")


_MAX_WEIGHT_DIM = 2**31 - 1
_MAX_EXPERTS = 2**20  # kMoeMaxExperts in csrc/ops/moe_args.h


# ---- SpMM --------------------------------------------------------------------------------------
def spmm(x: torch.Tensor, weight: CSRWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and a ``CSRWeight`` W."""
    return _lib.spmm(x, weight.offsets, weight.indices, weight.values, bias,
                     weight.out_features, weight.in_features, weight.block_rows)


@_register_fake("sparse_ext::spmm")
def _spmm_fake(x, offsets, indices, values, bias, out_features, in_features, block_rows):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    _check_weight_dim(out_features, "out_features")
    _check_weight_dim(in_features, "in_features")
    _check_width(x, "x", -1, in_features, "features", "in_features")
    return x.new_empty((*x.shape[:-1], out_features))


@_register_fake("sparse_ext::spmm_transpose_structure")
def _spmm_transpose_structure_fake(offsets, indices, out_features, in_features, block_rows):
    m_blocks = -(-out_features // K_BLOCK)
    entries = indices.shape[0] * block_rows
    return (offsets.new_empty(in_features * m_blocks + 1), indices.new_empty(entries),
            offsets.new_empty(entries, dtype=torch.int64))


@_register_fake("sparse_ext::spmm_sddmm")
def _spmm_sddmm_fake(grad_out, x, offsets, indices, out_features, in_features, block_rows):
    _check_width(grad_out, "grad_out", -1, out_features, "features", "out_features")
    _check_width(x, "x", -1, in_features, "features", "in_features")
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
        offsets_t, indices_t, perm = _lib.spmm_transpose_structure(offsets, indices, M, K, R)
        grad_x = _lib.spmm(grad.to(x.dtype), offsets_t, indices_t, values[perm], None, K, M, 1)
    if ctx.needs_input_grad[3]:
        grad_values = _lib.spmm_sddmm(grad, x, offsets, indices, M, K, R).to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, M).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_values, grad_bias, None, None, None


torch.library.register_autograd("sparse_ext::spmm", _spmm_backward,
                                setup_context=_spmm_setup_context)


# ---- sparse conv --------------------------------------------------------------------------------
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


def sparse_conv2d(x: torch.Tensor, weight: CSRWeight, bias: Optional[torch.Tensor] = None,
                  kernel_size=1, stride=1, padding=0, dilation=1, activation=None) -> torch.Tensor:
    """``act(conv2d(x, W, bias))`` for NCHW ``x [B, C_in, H, W]`` (channels_last accepted) and a
    CSRWeight W [out_channels, in_channels * kh * kw]; groups = 1, zero padding."""
    lo, hi = activation_bounds(activation)
    kernel_size = _pair(kernel_size, "kernel_size")
    taps = kernel_size[0] * kernel_size[1]
    if taps < 1 or weight.in_features % taps:
        raise ValueError(f"a weight with {weight.in_features} columns cannot hold a "
                         f"{kernel_size[0]}x{kernel_size[1]} kernel (in_channels * kh * kw columns)")
    return _lib.sparse_conv2d(x, weight.offsets, weight.indices, weight.values, bias,
                              weight.out_features, weight.in_features // taps, kernel_size,
                              _pair(stride, "stride"), _pair(padding, "padding"),
                              _pair(dilation, "dilation"), weight.block_rows, lo, hi)


def sparse_conv2d_op(x, offsets, indices, values, bias, out_channels, in_channels, kernel_size,
                     stride, padding, dilation, block_rows, out_min, out_max):
    """The raw op with every argument explicit (lists for the pairs); modules cache them."""
    return _lib.sparse_conv2d(x, offsets, indices, values, bias, out_channels, in_channels,
                              kernel_size, stride, padding, dilation, block_rows, out_min, out_max)


@_register_fake("sparse_ext::sparse_conv2d")
def _sparse_conv2d_fake(x, offsets, indices, values, bias, out_channels, in_channels, kernel_size,
                        stride, padding, dilation, block_rows, out_min, out_max):
    torch._check(x.dim() == 4, lambda: "x must be 4-D [batch, channels, height, width]")
    _check_weight_dim(out_channels, "out_channels")
    _check_weight_dim(in_channels, "in_channels")
    _check_width(x, "x", 1, in_channels, "channels", "in_channels")
    oh, ow = conv_output_size(x.shape[2:], kernel_size, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_channels, oh, ow))  # always NCHW-contiguous


@_register_fake("sparse_ext::sparse_conv2d_grad_input")
def _sparse_conv2d_grad_input_fake(grad_out, offsets, indices, values, out_channels, in_channels,
                                   input_size, kernel_size, stride, padding, dilation, block_rows):
    _check_width(grad_out, "grad_out", 1, out_channels, "channels", "out_channels")
    _check_weight_dim(in_channels, "in_channels")
    return grad_out.new_empty((grad_out.shape[0], in_channels, input_size[0], input_size[1]))


@_register_fake("sparse_ext::sparse_conv2d_grad_values")
def _sparse_conv2d_grad_values_fake(grad_out, x, offsets, indices, out_channels, in_channels,
                                    kernel_size, stride, padding, dilation, block_rows):
    _check_width(grad_out, "grad_out", 1, out_channels, "channels", "out_channels")
    _check_width(x, "x", 1, in_channels, "channels", "in_channels")
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
            offsets_t, indices_t, perm = _lib.spmm_transpose_structure(offsets, indices, M, C, R)
            grad_x = _lib.sparse_conv2d(grad.to(x.dtype), offsets_t, indices_t, values[perm], None,
                                        C, M, [1, 1], [1, 1], [0, 0], [1, 1], 1, -_INF, _INF)
        else:
            grad_x = _lib.sparse_conv2d_grad_input(grad.to(x.dtype), offsets, indices, values, M,
                                                   C, list(x.shape[2:]), kernel_size, stride,
                                                   padding, dilation, R)
    if ctx.needs_input_grad[3]:
        grad_values = _lib.sparse_conv2d_grad_values(grad.to(x.dtype), x, offsets, indices, M, C,
                                                     kernel_size, stride, padding, dilation,
                                                     R).to(values.dtype)
    if ctx.needs_input_grad[4]:
        grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
    return (grad_x, None, None, grad_values, grad_bias, None, None, None, None, None, None, None,
            None, None)


torch.library.register_autograd("sparse_ext::sparse_conv2d", _sparse_conv2d_backward,
                                setup_context=_sparse_conv2d_setup_context)


# ---- N:M semi-structured ------------------------------------------------------------------------
def nm_linear(x: torch.Tensor, weight: NMWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for ``x [..., in_features]`` and an ``NMWeight`` W."""
    return _lib.nm_linear(x, weight.values, weight.metadata, bias, weight.in_features, weight.n,
                          weight.m)


@_register_fake("sparse_ext::nm_linear")
def _nm_linear_fake(x, values, metadata, bias, in_features, n, m):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(values.dim() == 2, lambda: "values must be 2-D")
    _check_weight_dim(in_features, "in_features")
    _check_width(x, "x", -1, in_features, "features", "in_features")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@_register_fake("sparse_ext::nm_linear_grad_input")
def _nm_linear_grad_input_fake(grad_out, values, metadata, in_features, n, m):
    _check_weight_dim(in_features, "in_features")
    _check_width(grad_out, "grad_out", -1, values.shape[0], "features", "out_features")
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@_register_fake("sparse_ext::nm_linear_grad_values")
def _nm_linear_grad_values_fake(grad_out, x, metadata, in_features, n, m):
    _check_width(grad_out, "grad_out", -1, metadata.shape[0], "features", "out_features")
    _check_width(x, "x", -1, in_features, "features", "in_features")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((grad_out.shape[-1], -(-x.shape[-1] // m) * n), dtype=dtype)


@_register_fake("sparse_ext::nm_validate")
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
        grad_x = _lib.nm_linear_grad_input(g, values, metadata, K, n, m).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_values = _lib.nm_linear_grad_values(grad, x, metadata, K, n, m).to(values.dtype)
    if ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, grad_values, None, grad_bias, None, None, None


torch.library.register_autograd("sparse_ext::nm_linear", _nm_linear_backward,
                                setup_context=_nm_linear_setup_context)


# ---- MoE (csrc/kernels/moe, docs/moe.md) --------------------------------------------------------
def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
              renormalize: bool = True, selection_bias: Optional[torch.Tensor] = None,
              num_groups: int = 1, topk_groups: int = 1):
    """Scores (softmax or sigmoid over the last dim) + top-k (+ renormalization).

    Returns ``(topk_weights, topk_indices)`` of shape ``[..., top_k]``: weights in float32 (float64
    for float64 logits) in descending order, ties broken by the lower expert index
    (``torch.topk`` order). ``selection_bias`` is added to the scores for selection only.
    """
    return _lib.moe_route(router_logits, top_k, scoring, renormalize, selection_bias, num_groups,
                          topk_groups)


def moe_permute(topk_indices: torch.Tensor, num_experts: int, capacity: int = -1):
    """Counting sort of (token, slot) pairs by expert: ``(row_token, expert_offsets, inverse)``."""
    return _lib.moe_permute(topk_indices, num_experts, capacity)


def moe_expert_mlp(x: torch.Tensor, row_token: torch.Tensor, expert_offsets: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, activation: str = "silu",
                   gated: bool = True) -> torch.Tensor:
    """Expert MLP over permuted rows: ``y[p] = mlp_e(x[row_token[p]])`` for the segment e of p."""
    return _lib.moe_expert_mlp(x, row_token, expert_offsets, w1, w2, activation, gated)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[inverse[t, j]]`` (fixed order)."""
    return _lib.moe_combine(expert_out, topk_weights, inverse)


def _moe_compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@_register_fake("sparse_ext::moe_route")
def _moe_route_fake(router_logits, top_k, scoring, renormalize, selection_bias, num_groups,
                    topk_groups):
    torch._check(router_logits.dim() >= 1, lambda: "router_logits must be [..., num_experts]")
    torch._check(1 <= top_k <= router_logits.shape[-1],
                 lambda: f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    shape = (*router_logits.shape[:-1], top_k)
    return (router_logits.new_empty(shape, dtype=_moe_compute_dtype(router_logits)),
            router_logits.new_empty(shape, dtype=torch.int64))


@_register_fake("sparse_ext::moe_permute")
def _moe_permute_fake(topk_indices, num_experts, capacity):
    torch._check(topk_indices.dim() == 2, lambda: "topk_indices must be 2-D [tokens, top_k]")
    torch._check(1 <= num_experts <= _MAX_EXPERTS, lambda: (
        f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}"))
    T, k = topk_indices.shape
    return (topk_indices.new_empty(T * k, dtype=torch.int64),
            topk_indices.new_empty(num_experts + 1, dtype=torch.int64),
            topk_indices.new_empty((T, k), dtype=torch.int64))


@_register_fake("sparse_ext::moe_expert_mlp")
def _moe_expert_mlp_fake(x, row_token, expert_offsets, w1, w2, activation, gated):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [tokens, hidden]")
    return x.new_empty((row_token.shape[0], x.shape[1]), dtype=_moe_compute_dtype(x))


@_register_fake("sparse_ext::moe_expert_mlp_backward")
def _moe_expert_mlp_backward_fake(grad_y, x, row_token, expert_offsets, w1, w2, activation, gated):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


@_register_fake("sparse_ext::moe_combine")
def _moe_combine_fake(expert_out, topk_weights, inverse):
    torch._check(topk_weights.dim() == 2, lambda: "topk_weights must be 2-D [tokens, top_k]")
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]),
                                dtype=_moe_compute_dtype(expert_out))


@_register_fake("sparse_ext::moe_combine_backward")
def _moe_combine_backward_fake(grad_out, expert_out, topk_weights, inverse):
    return torch.empty_like(expert_out), torch.empty_like(topk_weights)


def _moe_route_setup_context(ctx, inputs, output):
    router_logits, top_k, scoring, renormalize, selection_bias, num_groups, topk_groups = inputs
    weights, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(router_logits, weights, indices)
    ctx.scoring = scoring
    ctx.renormalize = renormalize


def _moe_route_backward(ctx, grad_weights, grad_indices):
    logits, weights, indices = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        S = weights.dtype
        lg = logits.to(S)
        scores = torch.softmax(lg, -1) if ctx.scoring == "softmax" else torch.sigmoid(lg)
        gw = grad_weights.to(S)
        if ctx.renormalize:
            # w_j = s_j / Z  ->  ds_j = (gw_j - sum_l gw_l w_l) / Z, Z = s_j / w_j.
            sel = scores.gather(-1, indices)
            z = sel.sum(-1, keepdim=True)
            ds_sel = (gw - (gw * weights).sum(-1, keepdim=True)) / z
        else:
            ds_sel = gw
        ds = torch.zeros_like(scores).scatter(-1, indices, ds_sel)
        if ctx.scoring == "softmax":
            grad = scores * (ds - (ds * scores).sum(-1, keepdim=True))
        else:
            grad = ds * scores * (1 - scores)
        grad_logits = grad.to(logits.dtype)
    return grad_logits, None, None, None, None, None, None


torch.library.register_autograd("sparse_ext::moe_route", _moe_route_backward,
                                setup_context=_moe_route_setup_context)


def _moe_expert_mlp_setup_context(ctx, inputs, output):
    x, row_token, expert_offsets, w1, w2, activation, gated = inputs
    ctx.save_for_backward(x, row_token, expert_offsets, w1, w2)
    ctx.activation = activation
    ctx.gated = gated


def _moe_expert_mlp_backward(ctx, grad):
    x, row_token, expert_offsets, w1, w2 = ctx.saved_tensors
    grad_x, grad_w1, grad_w2 = _lib.moe_expert_mlp_backward(
        grad.contiguous(), x, row_token, expert_offsets, w1, w2, ctx.activation, ctx.gated)
    return grad_x, None, None, grad_w1, grad_w2, None, None


torch.library.register_autograd("sparse_ext::moe_expert_mlp", _moe_expert_mlp_backward,
                                setup_context=_moe_expert_mlp_setup_context)


def _moe_combine_setup_context(ctx, inputs, output):
    expert_out, topk_weights, inverse = inputs
    ctx.save_for_backward(expert_out, topk_weights, inverse)


def _moe_combine_backward(ctx, grad):
    expert_out, topk_weights, inverse = ctx.saved_tensors
    grad_y, grad_w = _lib.moe_combine_backward(grad.contiguous(), expert_out, topk_weights, inverse)
    return grad_y, grad_w, None


torch.library.register_autograd("sparse_ext::moe_combine", _moe_combine_backward,
                                setup_context=_moe_combine_setup_context)

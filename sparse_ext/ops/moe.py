"""MoE ops: routing, permutation, expert MLP and combine, their fake kernels and autograd."""
from typing import Optional

import torch

from ._registration import MAX_EXPERTS, call_differentiable, lib, register_fake


def moe_route(router_logits: torch.Tensor, top_k: int, scoring: str = "softmax",
              renormalize: bool = True, selection_bias: Optional[torch.Tensor] = None,
              num_groups: int = 1, topk_groups: int = 1):
    """Scores (softmax or sigmoid over the last dim) + top-k (+ renormalization).

    Returns ``(topk_weights, topk_indices)`` of shape ``[..., top_k]``: weights in float32 (float64
    for float64 logits) in descending order, ties broken by the lower expert index
    (``torch.topk`` order). ``selection_bias`` is added to the scores for selection only.
    """
    return call_differentiable(lib.moe_route, router_logits, top_k, scoring, renormalize,
                               selection_bias, num_groups, topk_groups)


def moe_permute(topk_indices: torch.Tensor, num_experts: int, capacity: int = -1):
    """Counting sort of (token, slot) pairs by expert: ``(row_token, expert_offsets, inverse)``."""
    return lib.moe_permute(topk_indices, num_experts, capacity)


def moe_expert_mlp(x: torch.Tensor, row_token: torch.Tensor, expert_offsets: torch.Tensor,
                   w1: torch.Tensor, w2: torch.Tensor, activation: str = "silu",
                   gated: bool = True) -> torch.Tensor:
    """Expert MLP over permuted rows: ``y[p] = mlp_e(x[row_token[p]])`` for the segment e of p."""
    return call_differentiable(lib.moe_expert_mlp, x, row_token, expert_offsets, w1, w2,
                               activation, gated)


def moe_combine(expert_out: torch.Tensor, topk_weights: torch.Tensor,
                inverse: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * expert_out[inverse[t, j]]`` (fixed order)."""
    return call_differentiable(lib.moe_combine, expert_out, topk_weights, inverse)


def _moe_compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@register_fake("sparse_ext::moe_route")
def _moe_route_fake(router_logits, top_k, scoring, renormalize, selection_bias, num_groups,
                    topk_groups):
    torch._check(router_logits.dim() >= 1, lambda: "router_logits must be [..., num_experts]")
    torch._check(1 <= top_k <= router_logits.shape[-1],
                 lambda: f"top_k must be in [1, {router_logits.shape[-1]}], got {top_k}")
    shape = (*router_logits.shape[:-1], top_k)
    return (router_logits.new_empty(shape, dtype=_moe_compute_dtype(router_logits)),
            router_logits.new_empty(shape, dtype=torch.int64))


@register_fake("sparse_ext::moe_permute")
def _moe_permute_fake(topk_indices, num_experts, capacity):
    torch._check(topk_indices.dim() == 2, lambda: "topk_indices must be 2-D [tokens, top_k]")
    torch._check(1 <= num_experts <= MAX_EXPERTS, lambda: (
        f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}"))
    T, k = topk_indices.shape
    return (topk_indices.new_empty(T * k, dtype=torch.int64),
            topk_indices.new_empty(num_experts + 1, dtype=torch.int64),
            topk_indices.new_empty((T, k), dtype=torch.int64))


@register_fake("sparse_ext::moe_expert_mlp")
def _moe_expert_mlp_fake(x, row_token, expert_offsets, w1, w2, activation, gated):
    torch._check(x.dim() == 2, lambda: "x must be 2-D [tokens, hidden]")
    return x.new_empty((row_token.shape[0], x.shape[1]), dtype=_moe_compute_dtype(x))


@register_fake("sparse_ext::moe_expert_mlp_backward")
def _moe_expert_mlp_backward_fake(grad_y, x, row_token, expert_offsets, w1, w2, activation, gated):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2)


@register_fake("sparse_ext::moe_combine")
def _moe_combine_fake(expert_out, topk_weights, inverse):
    torch._check(topk_weights.dim() == 2, lambda: "topk_weights must be 2-D [tokens, top_k]")
    return expert_out.new_empty((topk_weights.shape[0], expert_out.shape[1]),
                                dtype=_moe_compute_dtype(expert_out))


@register_fake("sparse_ext::moe_combine_backward")
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
    grad_x, grad_w1, grad_w2 = lib.moe_expert_mlp_backward(
        grad.contiguous(), x, row_token, expert_offsets, w1, w2, ctx.activation, ctx.gated)
    return grad_x, None, None, grad_w1, grad_w2, None, None


torch.library.register_autograd("sparse_ext::moe_expert_mlp", _moe_expert_mlp_backward,
                                setup_context=_moe_expert_mlp_setup_context)


def _moe_combine_setup_context(ctx, inputs, output):
    expert_out, topk_weights, inverse = inputs
    ctx.save_for_backward(expert_out, topk_weights, inverse)


def _moe_combine_backward(ctx, grad):
    expert_out, topk_weights, inverse = ctx.saved_tensors
    grad_y, grad_w = lib.moe_combine_backward(grad.contiguous(), expert_out, topk_weights, inverse)
    return grad_y, grad_w, None


torch.library.register_autograd("sparse_ext::moe_combine", _moe_combine_backward,
                                setup_context=_moe_combine_setup_context)

"""Pure-torch references the kernels are checked against, and the tolerance rule.

Tolerance rule (flash-attention's): at reduced precision our error against a float64 reference
must be at most twice the error of PyTorch's own dense op at the same dtype (plus a tiny floor).
"""
import torch
import torch.nn.functional as F


def linear_reference(x, dense_weight, bias=None):
    """float64 ``x @ W^T + bias``."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), dense_weight.double(), b)


def max_abs_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(ours, reference, torch_same_dtype=None, floor=1e-5):
    """``ours`` within 2x of PyTorch's error (``torch_same_dtype``) against ``reference`` (fp64);
    with no PyTorch result given, within a float32 tolerance scaled to the reference magnitude."""
    err = max_abs_err(ours, reference)
    if torch_same_dtype is not None:
        bound = 2.0 * max_abs_err(torch_same_dtype, reference) + floor
    else:
        scale = reference.abs().max().item() if reference.numel() else 0.0
        bound = 1e-5 * max(1.0, scale) * 4 + floor
    assert err <= bound, f"max abs error {err:.3g} exceeds bound {bound:.3g}"


# ---- MoE ---------------------------------------------------------------------------------------
def _moe_act(name):
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[name]


def moe_route_reference(logits, top_k, scoring="softmax", renormalize=True, selection_bias=None,
                        num_groups=1, topk_groups=1):
    """float64 scores + top-k (a stable sort) on the (biased, group-masked) selection scores."""
    lg = logits.double()
    scores = torch.softmax(lg, -1) if scoring == "softmax" else torch.sigmoid(lg)
    sel = scores if selection_bias is None else scores + selection_bias.double()
    if num_groups > 1:
        T, E = sel.shape
        grouped = sel.view(T, num_groups, E // num_groups)
        gscore = grouped.topk(min(2, E // num_groups), -1).values.sum(-1)
        keep = torch.zeros_like(gscore).scatter(-1, gscore.topk(topk_groups, -1).indices, 1.0)
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(T, E)
        sel = sel.masked_fill(mask == 0, float("-inf"))
    # ties go to the lower expert index (the documented rule; torch.topk does not promise it)
    idx = torch.sort(sel, stable=True, dim=-1, descending=True).indices[..., :top_k]
    w = scores.gather(-1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def moe_experts_reference(x, topk_weights, topk_indices, w1, w2, activation="silu", gated=True,
                          capacity=-1, dtype=torch.float64):
    """Per-expert loop in ``dtype`` (float64: the reference; a 16-bit dtype: PyTorch's own error
    at that dtype, for the tolerance rule): out[t] = sum_j w[t, j] * mlp_{idx[t, j]}(x[t]); with a
    capacity, each expert keeps its first `capacity` pairs in slot-major token order, the rest add
    zero."""
    act = _moe_act(activation)
    xd, wd = x.to(dtype), topk_weights.to(dtype)
    w1, w2 = w1.to(dtype), w2.to(dtype)
    T, k = topk_indices.shape
    out = torch.zeros(T, x.shape[1], dtype=dtype)
    taken = {}
    for j in range(k):
        for t in range(T):
            e = int(topk_indices[t, j])
            taken[e] = taken.get(e, 0) + 1
            if capacity >= 0 and taken[e] > capacity:
                continue
            h = w1[e] @ xd[t]
            F_ = w2.shape[2]
            h = act(h[:F_]) * h[F_:] if gated else act(h)
            out[t] += wd[t, j] * (w2[e] @ h)
    return out


def sparse_product_reference(x, dense_weight, stored, bias=None):
    """``x @ W^T + bias`` in float64 summing over the *stored* positions only (``stored`` bool
    [out, in]): the semantics of a sparse product (``torch.sparse.mm``), where a NaN or inf in
    input column j reaches only the outputs whose row stores column j."""
    prod = x.double().unsqueeze(-2) * dense_weight.double()          # [..., out, in]
    y = torch.where(stored, prod, torch.zeros((), dtype=torch.float64)).sum(-1)
    return y if bias is None else y + bias.double()


def sparse_conv_reference(x, dense_weight, stored, stride, padding, dilation, bias=None):
    """A convolution in float64 over the stored taps that fall inside the image: zero padding
    never enters a product, so an infinite weight next to the border stays finite there."""
    import torch.nn.functional as F

    B, C, H, W = x.shape
    out_c, _, kh, kw = dense_weight.shape
    unfold = dict(kernel_size=(kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = F.unfold(x.double(), **unfold)                                          # [B, CKK, L]
    inside = F.unfold(torch.ones_like(x, dtype=torch.float64), **unfold).bool()
    prod = dense_weight.double().reshape(out_c, -1)[None, :, :, None] * cols[:, None]
    keep = stored.reshape(out_c, -1)[None, :, :, None] & inside[:, None]
    y = torch.where(keep, prod, torch.zeros((), dtype=torch.float64)).sum(2)
    if bias is not None:
        y = y + bias.double()[None, :, None]
    oh = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return y.reshape(B, out_c, oh, ow)


def tile_tail_counts(ukernel_names):
    """Token counts that reach every tail of the tiles named in a ukernel registry: for each tile
    width MR of ``<dtype>-<op>-<MR>x<NR>-<isa>`` names, MR - 1, MR + 1, 2*MR - 1 and MR + 8 (a
    kernel that pads to 8 and steps 16 at a time leaves a last step of 8 there), plus 1 and 2."""
    import re

    widths = {int(m.group(1)) for name in ukernel_names
              for m in [re.search(r"-(\d+)x\d+-", name or "")] if m}
    counts = {1, 2}
    for w in widths:
        counts |= {max(1, w - 1), w + 1, 2 * w - 1, w + 8}
    return sorted(counts)

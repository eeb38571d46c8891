"""MoE family: routing, permute, expert MLP, combine ops and MoELayer (incl. HF and EP oracles)."""
import math
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

import sparse_ext
from sparse_ext import ops
from sparse_ext.nn import MoELayer

from reference import (assert_close_to_reference, moe_experts_reference, moe_route_reference)

L = torch.ops.sparse_ext


def _layer(H=16, Fs=24, E=6, k=2, dtype=torch.float32, **kw):
    torch.manual_seed(1)
    return MoELayer(H, Fs, E, k, dtype=dtype, **kw)


def _cuda_only_isa(device, isa):
    """CUDA cases run once (the ISA fixture selects CPU kernels only)."""
    if device.type == "cuda" and isa != "scalar":
        pytest.skip("ISA paths are CPU-only; the CUDA case runs once (isa=scalar)")


def _random_routing(T, E, k, skew=None):
    if skew is not None:  # every token picks `skew` first
        rest = [torch.randperm(E - 1)[: k - 1] for _ in range(T)]
        rows = [torch.cat([torch.tensor([skew]), (r + (r >= skew).long())]) for r in rest]
        idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)]) if T else \
            torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(T, k)
    return w, idx


# ---- routing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k", [(0, 4, 2), (1, 8, 2), (37, 8, 2), (50, 60, 4), (9, 5, 5)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
def test_route_matches_torch_topk(device, T, E, k, scoring, renorm):
    logits = (torch.randn(T, E) * 3).to(device)
    w, idx = ops.moe_route(logits, k, scoring, renorm)
    assert w.device == logits.device and idx.device == logits.device
    rw, ridx = moe_route_reference(logits, k, scoring, renorm)
    # torch.topk on float32 scores, exactly what HF does.
    probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    assert torch.equal(idx, torch.topk(probs, k, -1).indices)
    assert torch.equal(idx, ridx)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,E,k,G,TG", [(33, 8, 2, 1, 1), (5, 7000, 4, 1, 1), (17, 64, 6, 8, 3)])
def test_route_dtypes_wide_and_grouped(device, dtype, T, E, k, G, TG):
    # E = 7000 does not fit a warp's scores in shared memory: the CUDA kernel uses global scratch.
    logits = (torch.randn(T, E) * 2).to(dtype)
    bias = torch.randn(E).to(dtype) * 0.05 if G > 1 else None
    w, idx = ops.moe_route(logits.to(device), k, "sigmoid" if G > 1 else "softmax", True,
                           None if bias is None else bias.to(device), G, TG)
    cw, cidx = ops.moe_route(logits, k, "sigmoid" if G > 1 else "softmax", True, bias, G, TG)
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(idx.cpu(), cidx)
    torch.testing.assert_close(w.cpu(), cw, rtol=1e-5, atol=1e-6)
    rw, ridx = moe_route_reference(logits.double() if dtype == torch.float64 else logits.float(),
                                   k, "sigmoid" if G > 1 else "softmax", True,
                                   None if bias is None else bias.float(), G, TG)
    torch.testing.assert_close(w.cpu().double(), rw, rtol=1e-5, atol=1e-6)
    assert torch.equal(idx.cpu(), ridx)


def test_route_ties_lower_index_first(device):
    logits = torch.tensor([[0.0] * 8, [1.0, 2, 2, 1, 2, 0, 0, 0], [5.0, 5, 1, 5, 5, 5, 0, 5]],
                          device=device)
    _, idx = ops.moe_route(logits, 3, "softmax", True)
    stable = torch.argsort(-logits, dim=-1, stable=True)[:, :3]
    assert torch.equal(idx, stable)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [1, 2, 4]


def test_route_grouped_with_selection_bias(device):
    T, E, G, TG, k = 40, 16, 4, 2, 4
    logits = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) * 0.1
    w, idx = ops.moe_route(logits, k, "sigmoid", True, bias, G, TG)
    rw, ridx = moe_route_reference(logits, k, "sigmoid", True, bias, G, TG)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)
    # every chosen expert lies in at most TG groups
    assert all(len(set((r // (E // G)).tolist())) <= TG for r in idx)


# ---- permute -----------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k,capacity", [(0, 4, 2, -1), (1, 8, 2, -1), (30, 8, 2, -1),
                                            (30, 4, 4, -1), (30, 8, 2, 3), (12, 3, 1, 0)])
def test_permute_stable_with_inverse(device, T, E, k, capacity):
    _, idx = _random_routing(T, E, k)
    row_token, offsets, inverse = (t.cpu() for t in ops.moe_permute(idx.to(device), E, capacity))
    flat = idx.reshape(-1)
    kept = []
    taken = [0] * E
    keep = torch.ones(T * k, dtype=torch.bool)
    if capacity >= 0:
        for j in range(k):
            for t in range(T):
                e = int(idx[t, j])
                keep[t * k + j] = taken[e] < capacity
                taken[e] += 1
    for e in range(E):
        pairs = [i for i in range(T * k) if int(flat[i]) == e and keep[i]]
        kept += pairs
        assert offsets[e + 1] - offsets[e] == len(pairs)
    dropped = [i for i in range(T * k) if not keep[i]]
    order = kept + dropped
    assert offsets[0] == 0 and offsets[-1] == len(kept)
    assert row_token.tolist() == [i // k for i in order]
    assert torch.equal(row_token[inverse.reshape(-1)], torch.arange(T * k) // k)
    assert sorted(inverse.reshape(-1).tolist()) == list(range(T * k))


def _permute_by_stable_sort(idx, E, capacity):
    """Vectorized reference: kept pairs by (expert, flat id), then dropped pairs by flat id."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    keep = torch.ones(T * k, dtype=torch.bool)
    if capacity >= 0 and T * k:
        sm = idx.t().reshape(-1)                              # slot-major order
        sm_ids = torch.arange(T * k).view(T, k).t().reshape(-1)
        order = torch.argsort(sm, stable=True)
        first = torch.searchsorted(sm[order], sm[order], right=False)
        rank = torch.empty(T * k, dtype=torch.long)
        rank[order] = torch.arange(T * k) - first
        keep[sm_ids] = rank < capacity
    key = torch.where(keep, flat, torch.full_like(flat, E))
    order = torch.argsort(key, stable=True)
    offsets = torch.zeros(E + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.bincount(flat[keep], minlength=E), 0)
    inverse = torch.empty(T * k, dtype=torch.long)
    inverse[order] = torch.arange(T * k)
    return order // k, offsets, inverse.view(T, k)


# Large cases span many 256-pair chunks and (E + 1) * chunks > 8192 (several scan tiles on CUDA).
@pytest.mark.parametrize("T,E,k,capacity", [(3000, 300, 4, -1), (3000, 300, 4, 37),
                                            (700, 8, 2, 100), (257, 3, 3, 0), (1, 1, 1, 5)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_permute_matches_stable_sort(device, T, E, k, capacity, index_dtype):
    _, idx = _random_routing(T, E, k, skew=0 if E > 4 else None)
    got = ops.moe_permute(idx.to(index_dtype).to(device), E, capacity)
    expected = _permute_by_stable_sort(idx, E, capacity)
    for g, e in zip(got, expected):
        assert g.dtype == torch.int64 and g.device == device
        assert torch.equal(g.cpu(), e)


# ---- expert MLP + combine ----------------------------------------------------------------------
# Segments above 48 rows (skewed to one expert) take the GEMM ukernel, the rest the GEMV ukernels;
# both appear in one call. T=300 skewed: a 300-row segment runs as two token chunks (256 + 44).
@pytest.mark.parametrize("T,E,k,skew", [(1, 8, 2, None), (5, 8, 2, None), (40, 6, 2, None),
                                        (70, 4, 2, 0), (200, 5, 2, 3), (3, 16, 2, None),
                                        (20, 3, 3, None), (300, 4, 2, 1)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_experts_and_combine_vs_reference(device, isa, T, E, k, skew, wdtype):
    _cuda_only_isa(device, isa)
    if wdtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 expert weights are CUDA-only")
    H, Fs = 24, 40
    x = torch.randn(T, H)
    w1 = (torch.randn(E, 2 * Fs, H) * 0.3).to(wdtype)
    w2 = (torch.randn(E, H, Fs) * 0.3).to(wdtype)
    w, idx = _random_routing(T, E, k, skew)
    row_token, offsets, inverse = ops.moe_permute(idx.to(device), E)
    y = ops.moe_expert_mlp(x.to(device), row_token, offsets, w1.to(device), w2.to(device))
    out = ops.moe_combine(y, w.to(device), inverse)
    assert y.dtype == torch.float32 and out.device == device
    ref = moe_experts_reference(x, w, idx, w1.float(), w2.float())
    assert_close_to_reference(out.cpu(), ref, floor=1e-4)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_expert_gemm_partial_panels(isa, wdtype):
    """Segments above the GEMV rows (48) run the GEMM ukernel: segment lengths that end in every
    tail of its token tile (6 tokens on AVX2, 8 on AVX-512), and H / F whose last panel is partial
    (16-column panels: 9 to 15 columns; 48-column panels: 43 and 29), against the float64
    per-expert loop."""
    H, Fs = 16 * 2 + 11, 16 + 13           # panels of 16: H ends with 11, 2F = 58 with 10
    # Every remainder of a 6-token tile (49, 50, 53, 54, 60, 65) and of an 8-token tile (adds 51,
    # 55, 56), past 48 rows.
    segments = [49, 50, 51, 53, 54, 55, 56, 60, 65]
    E = len(segments)
    idx = torch.cat([torch.full((n,), e) for e, n in enumerate(segments)])[:, None]
    T = idx.shape[0]
    x = torch.randn(T, H)
    w1 = (torch.randn(E, 2 * Fs, H) * 0.3).to(wdtype)
    w2 = (torch.randn(E, H, Fs) * 0.3).to(wdtype)
    w = torch.rand(T, 1) + 0.5
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    out = ops.moe_combine(ops.moe_expert_mlp(x, row_token, offsets, w1, w2), w, inverse)
    ref = moe_experts_reference(x, w, idx, w1.float(), w2.float())
    err = (out.double() - ref).abs().max().item()
    assert err <= 2e-5 * ref.abs().max().item(), f"error {err:.3g}"


def _torch_experts_same_dtype(x, w, idx, w1, w2):
    """HF-style per-expert loop in the inputs' dtype (PyTorch's own error at that dtype)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    Fs = w2.shape[2]
    for e in range(w1.shape[0]):
        t, j = torch.where(idx == e)
        if t.numel() == 0:
            continue
        gu = x[t] @ w1[e].t()
        h = F.silu(gu[:, :Fs]) * gu[:, Fs:]
        out.index_add_(0, t, (h @ w2[e].t()) * w[t, j, None].to(x.dtype))
    return out


# x, w1, w2 all 16-bit: small segments take the GEMV kernel, large ones (> 16 rows on CUDA) the
# 16-bit GEMMs with fp32 accumulation. Tolerance: 2x PyTorch's error at the same dtype.
@pytest.mark.parametrize("T,E,k,skew", [(3, 8, 2, None), (90, 4, 2, 1)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_experts_16bit_inputs(device, T, E, k, skew, dtype):
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 expert weights are CUDA-only")
    H, Fs = 64, 96
    x = torch.randn(T, H)
    w1 = torch.randn(E, 2 * Fs, H) * 0.2
    w2 = torch.randn(E, H, Fs) * 0.2
    w, idx = _random_routing(T, E, k, skew)
    xd, w1d, w2d = (t.to(dtype).to(device) for t in (x, w1, w2))
    row_token, offsets, inverse = ops.moe_permute(idx.to(device), E)
    out = ops.moe_combine(ops.moe_expert_mlp(xd, row_token, offsets, w1d, w2d),
                          w.to(device), inverse)
    ref = moe_experts_reference(xd.cpu().float(), w, idx, w1d.cpu().float(), w2d.cpu().float())
    same = _torch_experts_same_dtype(xd, w.to(device), idx.to(device), w1d, w2d)
    assert_close_to_reference(out.cpu(), ref, torch_same_dtype=same.cpu(), floor=1e-3)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_expert_activations(device, isa, activation, gated):
    _cuda_only_isa(device, isa)
    T, E, k, H, Fs = 170, 4, 2, 16, 20
    x = torch.randn(T, H)
    w1 = torch.randn(E, (2 if gated else 1) * Fs, H) * 0.3
    w2 = torch.randn(E, H, Fs) * 0.3
    w, idx = _random_routing(T, E, k, skew=1)  # expert 1: 170 rows (BLAS path), others small

    def check(x, w, idx):
        row_token, offsets, inverse = ops.moe_permute(idx.to(device), E)
        out = ops.moe_combine(ops.moe_expert_mlp(x.to(device), row_token, offsets, w1.to(device),
                                                 w2.to(device), activation, gated),
                              w.to(device), inverse)
        ref = moe_experts_reference(x, w, idx, w1, w2, activation, gated)
        assert_close_to_reference(out.cpu(), ref, floor=1e-4)

    check(x, w, idx)
    # Decode-size call (every segment small: the CUDA GEMV kernels without a host read).
    check(x[:3], w[:3], idx[:3])


@pytest.mark.parametrize("T,cap", [(30, 5), (6, 2)])
def test_capacity_drops_contribute_zero(device, T, cap):
    E, k, H, Fs = 4, 2, 8, 12
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, 2 * Fs, H), torch.randn(E, H, Fs)
    w, idx = _random_routing(T, E, k, skew=2)
    row_token, offsets, inverse = ops.moe_permute(idx.to(device), E, cap)
    y = ops.moe_expert_mlp(x.to(device), row_token, offsets, w1.to(device), w2.to(device))
    assert int(offsets[-1]) < T * k
    assert torch.all(y[int(offsets[-1]):] == 0)
    out = ops.moe_combine(y, w.to(device), inverse)
    ref = moe_experts_reference(x, w, idx, w1, w2, capacity=cap)
    assert_close_to_reference(out.cpu(), ref, floor=1e-4)


# ---- layer -------------------------------------------------------------------------------------
def _layer_reference(layer, x):
    x2 = x.reshape(-1, layer.hidden_size)
    logits = x2.double() @ layer.router.weight.double().t()
    w, idx = moe_route_reference(logits, layer.top_k, layer.scoring, layer.norm_topk_prob,
                                 layer.selection_bias, layer.num_groups, layer.topk_groups)
    w = w * layer.routed_scaling_factor
    return moe_experts_reference(x2, w, idx, layer.w1.detach(), layer.w2.detach(),
                                 layer.activation, layer.gated,
                                 layer.capacity(x2.shape[0])).reshape(x.shape)


@pytest.mark.parametrize("shape", [(0, 16), (1, 16), (3, 7, 16), (64, 16)])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_layer_vs_reference(device, isa, shape, k):
    _cuda_only_isa(device, isa)
    layer = _layer(k=k).eval()
    x = torch.randn(*shape)
    ref = _layer_reference(layer, x)
    out = layer.to(device)(x.to(device))
    assert out.shape == x.shape and out.device == device
    assert_close_to_reference(out.cpu(), ref, floor=1e-5)


def test_layer_capacity_and_bf16_input(device):
    layer = _layer(capacity_factor=0.5).eval()
    x = torch.randn(40, 16)
    ref = _layer_reference(layer, x)
    assert_close_to_reference(layer.to(device)(x.to(device)).cpu(), ref, floor=1e-5)
    layer = _layer().eval()
    xb = torch.randn(10, 16).bfloat16()
    ref = _layer_reference(layer, xb.float())
    out = layer.to(device)(xb.to(device))
    assert out.dtype == torch.bfloat16
    # The layer computes in float32 from bf16 input: its error is the rounding of the result to
    # bf16, which PyTorch's own bf16 output has too (flash-attention rule: at most twice that).
    rounding = (ref.bfloat16().double() - ref).abs().max()
    assert (out.cpu().double() - ref).abs().max() <= 2 * rounding + 1e-6


def test_layer_grouped_sigmoid_bias_and_state_dict(tmp_path):
    kw = dict(scoring="sigmoid", num_groups=3, topk_groups=2, selection_bias=True,
              routed_scaling_factor=2.5, E=6, k=3)
    layer = _layer(**kw).eval()
    with torch.no_grad():
        layer.selection_bias.normal_(0, 0.2)
    x = torch.randn(21, 16)
    out = layer(x)
    assert_close_to_reference(out, _layer_reference(layer, x), floor=1e-5)
    torch.save(layer.state_dict(), tmp_path / "moe.pt")
    other = _layer(**kw).eval()
    other.load_state_dict(torch.load(tmp_path / "moe.pt"))
    assert torch.equal(other(x), out)
    assert "num_experts=6" in repr(other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_16bit_parameters(device, dtype):
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 parameters are CUDA-only")
    layer = _layer(shared_expert_size=8, shared_expert_gate=True).eval()
    x = torch.randn(2, 9, 16)
    ref = layer(x)
    layer = layer.to(device=device, dtype=dtype)
    out = layer(x.to(device=device, dtype=dtype))
    assert out.dtype == dtype and layer.w1.dtype == dtype
    assert (out.float().cpu() - ref).abs().max() < 3e-2 * max(1.0, ref.abs().max().item())


def test_layer_grads_vs_torch_reference(device):
    layer = _layer(E=4, k=2).train().to(device)
    x = torch.randn(33, 16, device=device, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    # Pure-torch differentiable reference with the same routing.
    params = [p.detach().clone().requires_grad_(True) for p in (layer.router.weight, layer.w1, layer.w2)]
    xr = x.detach().clone().requires_grad_(True)
    rw, w1, w2 = params
    logits = xr @ rw.t()
    probs = torch.softmax(logits, -1)
    tw, idx = torch.topk(probs, 2, -1)
    tw = tw / tw.sum(-1, keepdim=True)
    ref = torch.zeros_like(xr)
    for e in range(4):
        t, j = torch.where(idx == e)
        gu = xr[t] @ w1[e].t()
        h = F.silu(gu[:, :24]) * gu[:, 24:]
        ref = ref.index_add(0, t, (h @ w2[e].t()) * tw[t, j, None])
    (ref * g).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, rw.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.w1.grad, w1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.w2.grad, w2.grad, rtol=1e-4, atol=1e-5)


def test_losses_hf_convention():
    layer = _layer(E=6, k=2).eval()
    x = torch.randn(25, 16)
    layer(x)
    logits = x @ layer.router.weight.t()
    probs = torch.softmax(logits, -1)
    idx = torch.topk(probs, 2, -1).indices
    mask = F.one_hot(idx, 6).float()
    expected = (mask.mean(0) * probs.mean(0)).sum() * 6
    torch.testing.assert_close(layer.aux_loss, expected)
    torch.testing.assert_close(layer.z_loss, torch.logsumexp(logits, -1).pow(2).mean())
    try:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    except Exception:  # noqa: BLE001
        return
    hf = load_balancing_loss_func((logits,), 6, 2)
    torch.testing.assert_close(layer.aux_loss, hf)


def test_gradcheck_ops_float64(device):
    torch.manual_seed(3)
    T, E, k, H, Fs = 5, 4, 2, 3, 4
    f64 = dict(dtype=torch.float64, device=device, requires_grad=True)
    for scoring in ("softmax", "sigmoid"):
        for renorm in (True, False):
            logits = torch.randn(T, E, **f64)
            assert torch.autograd.gradcheck(
                lambda lg: ops.moe_route(lg, k, scoring, renorm)[0], (logits,))
    _, idx = _random_routing(T, E, k, skew=0)
    row_token, offsets, inverse = ops.moe_permute(idx.to(device), E)
    for act, gated in (("silu", True), ("gelu", False), ("gelu_tanh", True), ("relu", False)):
        x = torch.randn(T, H, **f64)
        w1 = torch.randn(E, (2 if gated else 1) * Fs, H, **f64)
        w2 = torch.randn(E, H, Fs, **f64)
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.moe_expert_mlp(a, row_token, offsets, b, c, act, gated),
            (x, w1, w2))
    y = torch.randn(T * k, H, **f64)
    w = torch.rand(T, k, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.moe_combine(a, b, inverse), (y, w))


def test_gradcheck_layer_float64(device):
    layer = _layer(H=4, Fs=5, E=4, k=2, dtype=torch.float64, shared_expert_size=3,
                   shared_expert_gate=True).eval().to(device)
    x = torch.randn(6, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    names = ["router.weight", "w1", "w2"]
    params = [dict(layer.named_parameters())[n] for n in names]

    def fn(*ps):
        for n, p in zip(names, ps):
            mod, _, attr = n.rpartition(".")
            owner = layer.get_submodule(mod) if mod else layer
            owner._parameters[attr] = p
        return layer(x.detach())

    leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("T", [7, 40])
def test_opcheck_every_op(device, T):
    # T = 7: 14 pairs (CUDA: every segment on the GEMV kernels, no host read); T = 40: 80 pairs,
    # segments above 16 rows on cuBLAS.
    E, k, H, Fs = 4, 2, 8, 6
    logits = torch.randn(T, E, device=device)
    for args in [(logits, k, "softmax", True, None, 1, 1),
                 (logits, k, "sigmoid", False, torch.randn(E, device=device), 2, 1)]:
        torch.library.opcheck(L.moe_route, args)
    _, idx = _random_routing(T, E, k, skew=0)
    idx = idx.to(device)
    torch.library.opcheck(L.moe_permute, (idx, E, -1))
    torch.library.opcheck(L.moe_permute, (idx, E, 2))
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    x = torch.randn(T, H, device=device, requires_grad=True)
    w1 = torch.randn(E, 2 * Fs, H, device=device, requires_grad=True)
    w2 = torch.randn(E, H, Fs, device=device, requires_grad=True)
    torch.library.opcheck(L.moe_expert_mlp, (x, row_token, offsets, w1, w2, "silu", True))
    gy = torch.randn(T * k, H, device=device)
    torch.library.opcheck(L.moe_expert_mlp_backward,
                          (gy, x.detach(), row_token, offsets, w1.detach(), w2.detach(), "silu",
                           True))
    y = torch.randn(T * k, H, device=device, requires_grad=True)
    w = torch.rand(T, k, device=device, requires_grad=True)
    torch.library.opcheck(L.moe_combine, (y, w, inverse))
    torch.library.opcheck(L.moe_combine_backward, (torch.randn(T, H, device=device), y.detach(),
                                                   w.detach(), inverse))


def test_forward_backward_deterministic(device):
    """Same inputs, same bits: no float atomics anywhere (routing, combine, gather backward)."""
    layer = _layer(E=6, k=3).train().to(device)
    x = torch.randn(70, 16, device=device)
    g = torch.randn(70, 16, device=device)
    results = []
    for _ in range(2):
        xr = x.clone().requires_grad_(True)
        layer.zero_grad()
        out = layer(xr)
        (out * g).sum().backward()
        results.append([out.detach(), xr.grad, layer.w1.grad, layer.w2.grad,
                        layer.router.weight.grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph(device):
    layer = _layer().eval()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), layer, torch.nn.ReLU()).to(device)
    x = torch.randn(2, 5, 16, device=device)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


def test_torch_compile_fullgraph_training_backward(device):
    layer = _layer(router_jitter=0.0).train().to(device)
    x = torch.randn(9, 16, device=device)
    layer(x).square().sum().backward()
    expected = [p.grad.clone() for p in (layer.router.weight, layer.w1, layer.w2)]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (out.square().sum() + 0 * layer.aux_loss).backward()
    for p, e in zip((layer.router.weight, layer.w1, layer.w2), expected):
        torch.testing.assert_close(p.grad, e)


# ---- HF oracle ---------------------------------------------------------------------------------
def _randomize(block):
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.2)
    return block


@pytest.mark.parametrize("T", [1, 9, 80])
def test_from_hf_mixtral(device, isa, T):
    _cuda_only_isa(device, isa)
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                        num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    block = _randomize(MixtralSparseMoeBlock(cfg)).eval().to(device)
    layer = MoELayer.from_hf(block).eval()
    assert layer.w1.device == device
    x = torch.randn(2, T, 32, device=device)
    with torch.no_grad():
        expected = block(x.clone())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_from_hf_qwen2_moe(device, isa, norm):
    _cuda_only_isa(device, isa)
    pytest.importorskip("transformers")
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_experts=6,
                         num_experts_per_tok=3, norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    block = _randomize(Qwen2MoeSparseMoeBlock(cfg)).eval().to(device)
    layer = MoELayer.from_hf(block).eval()
    x = torch.randn(3, 11, 32, device=device)
    with torch.no_grad():
        expected = block(x.clone())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(device):
    T, E, k, H, Fs = 4, 4, 2, 8, 6
    d = dict(device=device)
    x = torch.randn(T, H, **d)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_route(torch.randn(T, E, **d), 5)
    with pytest.raises(RuntimeError, match="scoring"):
        ops.moe_route(torch.randn(T, E, **d), 2, "tanh")
    with pytest.raises(RuntimeError, match="num_groups"):
        ops.moe_route(torch.randn(T, 6, **d), 2, "softmax", True, None, 4, 1)
    with pytest.raises(RuntimeError, match="selection_bias"):
        ops.moe_route(torch.randn(T, E, **d), 2, "softmax", True, torch.randn(E + 1, **d))
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe_permute(torch.tensor([[0, 4]], **d), E)
    with pytest.raises(RuntimeError, match=r"topk_indices\[0, 1\] = -1"):
        ops.moe_permute(torch.tensor([[0, -1]], **d), E)
    with pytest.raises(RuntimeError, match=r"topk_indices\[1, 0\] = 9"):
        ops.moe_permute(torch.tensor([[0, 1], [9, 2], [7, 1]], dtype=torch.int32, **d), E, 1)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_permute(torch.zeros(3, 5, dtype=torch.long, **d), E)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]], **d)
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    w1, w2 = torch.randn(E, 2 * Fs, H, **d), torch.randn(E, H, Fs, **d)
    with pytest.raises(RuntimeError, match="w1 must have shape"):
        ops.moe_expert_mlp(x, row_token, offsets, torch.randn(E, 2 * Fs, H + 1, **d), w2)
    with pytest.raises(RuntimeError, match="w2 must have"):
        ops.moe_expert_mlp(x, row_token, offsets, w1, torch.randn(E + 1, H, Fs, **d))
    with pytest.raises(RuntimeError, match="row_token"):
        ops.moe_expert_mlp(x, row_token + 10, offsets, w1, w2)
    with pytest.raises(RuntimeError, match=r"row_token\[3\] = -1"):
        bad_rt = row_token.clone()
        bad_rt[3] = -1
        ops.moe_expert_mlp(x, bad_rt, offsets, w1, w2)
    bad = offsets.clone()
    bad[2] = 100
    with pytest.raises(RuntimeError, match="expert_offsets"):
        ops.moe_expert_mlp(x, row_token, bad, w1, w2)
    bad = offsets.clone()
    bad[0] = 1
    with pytest.raises(RuntimeError, match=r"expert_offsets\[0\] must be 0"):
        ops.moe_expert_mlp(x, row_token, bad, w1, w2)
    bad = offsets.clone()
    bad[-1] = T * k + 1
    with pytest.raises(RuntimeError, match="must not exceed the number of rows"):
        ops.moe_expert_mlp(x, row_token, bad, w1, w2)
    with pytest.raises(RuntimeError, match="activation"):
        ops.moe_expert_mlp(x, row_token, offsets, w1, w2, "tanh")
    with pytest.raises(RuntimeError, match="float64"):
        ops.moe_expert_mlp(x.double(), row_token, offsets, w1, w2)
    with pytest.raises(RuntimeError, match="inverse"):
        ops.moe_combine(torch.randn(T * k, H, **d), torch.rand(T, k, **d), inverse + 100)
    rep_inv = inverse.clone()
    rep_inv[1, 1] = rep_inv[0, 0]
    with pytest.raises(RuntimeError, match="repeats a row"):
        L.moe_combine_backward(torch.randn(T, H, **d), torch.randn(T * k, H, **d),
                               torch.rand(T, k, **d), rep_inv)
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 8, 4, 5)
    with pytest.raises(ValueError, match="hidden_size"):
        MoELayer(8, 8, 4, 2).to(device)(torch.randn(3, 7, **d))


def test_cuda_decode_chain_has_no_host_sync():
    """route -> permute -> expert MLP -> combine at decode size: every metadata tensor is
    well-formed by construction (validation hand-off) and <= 64 pairs keep the offsets on the
    device, so the layer's forward must not synchronize with the host."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine")
    layer = _layer(E=8, k=2).eval().cuda()
    x = torch.randn(4, 16, device="cuda")
    expected = layer(x)  # warm-up (library handles, allocator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(out, expected)


def test_cuda_wrong_device_raises():
    if not torch.cuda.is_available():
        pytest.skip("CUDA not available on this machine")
    T, E, k, H, Fs = 4, 4, 2, 8, 6
    c = torch.device("cuda")
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]], device=c)
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    x = torch.randn(T, H, device=c)
    w1, w2 = torch.randn(E, 2 * Fs, H, device=c), torch.randn(E, H, Fs, device=c)
    with pytest.raises(RuntimeError, match="selection_bias must be on"):
        ops.moe_route(torch.randn(T, E, device=c), 2, "softmax", True, torch.randn(E))
    with pytest.raises(RuntimeError, match="w1 must be on"):
        ops.moe_expert_mlp(x, row_token, offsets, w1.cpu(), w2)
    with pytest.raises(RuntimeError, match="expert_offsets must be on"):
        ops.moe_expert_mlp(x, row_token, offsets.cpu(), w1, w2)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        ops.moe_expert_mlp(x.cpu(), row_token, offsets, w1, w2)
    with pytest.raises(RuntimeError, match="inverse must be on"):
        ops.moe_combine(torch.randn(T * k, H, device=c), torch.rand(T, k, device=c),
                        inverse.cpu())
    with pytest.raises(RuntimeError, match="topk_weights must be on"):
        ops.moe_combine(torch.randn(T * k, H, device=c), torch.rand(T, k), inverse)


# ---- expert parallelism ------------------------------------------------------------------------
def _ep_worker(rank, world, init_file, result_file, backend="gloo"):
    import torch.distributed as dist

    torch.set_num_threads(1)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        full = MoELayer(16, 12, 4, 2, shared_expert_size=8, shared_expert_gate=True)
        xs = [torch.randn(n, 16) for n in (9, 5)]          # ranks hold different token counts
        gs = [torch.randn(n, 16) for n in (9, 5)]
        layer = MoELayer(16, 12, 4, 2, shared_expert_size=8, shared_expert_gate=True,
                         process_group=dist.group.WORLD)
        state = {k: v for k, v in full.state_dict().items() if k not in ("w1", "w2")}
        El = layer.num_local_experts
        state["w1"] = full.w1.detach()[rank * El:(rank + 1) * El]
        state["w2"] = full.w2.detach()[rank * El:(rank + 1) * El]
        layer.load_state_dict(state)
        layer.to(device)
        x = xs[rank].clone().to(device).requires_grad_(True)
        out = layer(x)
        (out * gs[rank].to(device)).sum().backward()
        router_grad = layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        torch.save({"out": out.detach().cpu(), "x_grad": x.grad.cpu(),
                    "w1_grad": layer.w1.grad.cpu(), "w2_grad": layer.w2.grad.cpu(),
                    "router_grad": router_grad.cpu()}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["gloo", "nccl"])
def test_expert_parallel_matches_single_process(backend):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if backend == "gloo" and not dist.is_gloo_available():
        pytest.skip("torch.distributed with Gloo is not available")
    if backend == "nccl" and (not dist.is_nccl_available() or torch.cuda.device_count() < 2):
        pytest.skip("NCCL expert parallelism needs two CUDA devices")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_ep_worker, args=(2, init_file, result_file, backend), nprocs=2, join=True)
        results = [torch.load(f"{result_file}.{r}") for r in range(2)]
    torch.manual_seed(0)
    full = MoELayer(16, 12, 4, 2, shared_expert_size=8, shared_expert_gate=True)
    xs = [torch.randn(n, 16) for n in (9, 5)]
    gs = [torch.randn(n, 16) for n in (9, 5)]
    x = torch.cat(xs).requires_grad_(True)
    out = full(x)
    (out * torch.cat(gs)).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x.grad)
    torch.testing.assert_close(torch.cat([r["w1_grad"] for r in results]), full.w1.grad)
    torch.testing.assert_close(torch.cat([r["w2_grad"] for r in results]), full.w2.grad)
    torch.testing.assert_close(results[0]["router_grad"], full.router.weight.grad)


def test_ukernel_registry_lists_every_isa():
    rows = sparse_ext._C.moe_registry()
    isas = {r[0] for r in rows}
    assert "scalar" in isas
    assert all(r[2].startswith(("f32-moegemv-", "bf16-moegemv-")) for r in rows)
    assert all(r[4].startswith(("f32-moegemm-", "bf16-moegemm-")) for r in rows)
    for isa in sparse_ext.supported_isas():
        if isa in ("scalar", "avx2", "avx512"):
            assert isa in isas


def test_bench_module_smoke(monkeypatch):
    """The MoE benchmark family runs end to end (tiny shapes) and yields the row keys the
    benchmark core uses."""
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    from bench.core.render import console_report
    from bench.families import moe as bench_moe

    monkeypatch.setattr(bench_moe, "H", 32)
    monkeypatch.setattr(bench_moe, "FF", 48)
    monkeypatch.setattr(bench_moe, "QUICK_TOKENS", (1, 32, 512))
    seen = []
    rows = bench_moe.run(types.SimpleNamespace(quick=True, reps=3), seen.append)
    assert len(rows) == 3 and len(seen) == 3
    for r in rows:
        for key in ("family", "shape", "pattern", "sparsity", "tokens", "dense_ms", "ours_ms",
                    "speedup", "gflops", "baseline", "floor_ms", "gbps"):
            assert key in r
    assert "overhead_frac" in rows[2] and "bf16_speedup_vs_fp32" in rows[0]
    targets = bench_moe.targets(rows, "cpu")
    assert {t.verdict for t in targets} <= {"met", "MISS"} and len(targets) == 9
    report = console_report([(bench_moe, rows, targets)])
    assert max(len(line) for line in report.splitlines()) <= 120
    print(report)

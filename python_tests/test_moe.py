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
def test_route_matches_torch_topk(T, E, k, scoring, renorm):
    logits = torch.randn(T, E) * 3
    w, idx = ops.moe_route(logits, k, scoring, renorm)
    rw, ridx = moe_route_reference(logits, k, scoring, renorm)
    # torch.topk on float32 scores, exactly what HF does.
    probs = torch.softmax(logits, -1) if scoring == "softmax" else torch.sigmoid(logits)
    assert torch.equal(idx, torch.topk(probs, k, -1).indices)
    assert torch.equal(idx, ridx)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)


def test_route_ties_lower_index_first():
    logits = torch.tensor([[0.0] * 8, [1.0, 2, 2, 1, 2, 0, 0, 0], [5.0, 5, 1, 5, 5, 5, 0, 5]])
    _, idx = ops.moe_route(logits, 3, "softmax", True)
    stable = torch.argsort(-logits, dim=-1, stable=True)[:, :3]
    assert torch.equal(idx, stable)
    assert idx[0].tolist() == [0, 1, 2] and idx[1].tolist() == [1, 2, 4]


def test_route_grouped_with_selection_bias():
    T, E, G, TG, k = 40, 16, 4, 2, 4
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.1
    w, idx = ops.moe_route(logits, k, "sigmoid", True, bias, G, TG)
    rw, ridx = moe_route_reference(logits, k, "sigmoid", True, bias, G, TG)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w.double(), rw, rtol=1e-5, atol=1e-6)
    # every chosen expert lies in at most TG groups
    assert all(len(set((r // (E // G)).tolist())) <= TG for r in idx)


# ---- permute -----------------------------------------------------------------------------------
@pytest.mark.parametrize("T,E,k,capacity", [(0, 4, 2, -1), (1, 8, 2, -1), (30, 8, 2, -1),
                                            (30, 4, 4, -1), (30, 8, 2, 3), (12, 3, 1, 0)])
def test_permute_stable_with_inverse(T, E, k, capacity):
    _, idx = _random_routing(T, E, k)
    row_token, offsets, inverse = ops.moe_permute(idx, E, capacity)
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


# ---- expert MLP + combine ----------------------------------------------------------------------
# Segments above 160 rows (skew to one expert with T=200) take the at::mm path, the rest the
# GEMV ukernels; both appear in one call.
@pytest.mark.parametrize("T,E,k,skew", [(1, 8, 2, None), (5, 8, 2, None), (40, 6, 2, None),
                                        (70, 4, 2, 0), (200, 5, 2, 3), (3, 16, 2, None),
                                        (20, 3, 3, None)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_experts_and_combine_vs_reference(isa, T, E, k, skew, wdtype):
    H, Fs = 24, 40
    x = torch.randn(T, H)
    w1 = (torch.randn(E, 2 * Fs, H) * 0.3).to(wdtype)
    w2 = (torch.randn(E, H, Fs) * 0.3).to(wdtype)
    w, idx = _random_routing(T, E, k, skew)
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    y = ops.moe_expert_mlp(x, row_token, offsets, w1, w2)
    out = ops.moe_combine(y, w, inverse)
    ref = moe_experts_reference(x, w, idx, w1.float(), w2.float())
    assert_close_to_reference(out, ref, floor=1e-4)


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("gated", [True, False])
def test_expert_activations(isa, activation, gated):
    T, E, k, H, Fs = 170, 4, 2, 16, 20
    x = torch.randn(T, H)
    w1 = torch.randn(E, (2 if gated else 1) * Fs, H) * 0.3
    w2 = torch.randn(E, H, Fs) * 0.3
    w, idx = _random_routing(T, E, k, skew=1)  # expert 1: 170 rows (BLAS path), others small
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    out = ops.moe_combine(ops.moe_expert_mlp(x, row_token, offsets, w1, w2, activation, gated),
                          w, inverse)
    ref = moe_experts_reference(x, w, idx, w1, w2, activation, gated)
    assert_close_to_reference(out, ref, floor=1e-4)


def test_capacity_drops_contribute_zero():
    T, E, k, H, Fs = 30, 4, 2, 8, 12
    x = torch.randn(T, H)
    w1, w2 = torch.randn(E, 2 * Fs, H), torch.randn(E, H, Fs)
    w, idx = _random_routing(T, E, k, skew=2)
    cap = 5
    row_token, offsets, inverse = ops.moe_permute(idx, E, cap)
    y = ops.moe_expert_mlp(x, row_token, offsets, w1, w2)
    assert int(offsets[-1]) < T * k
    assert torch.all(y[int(offsets[-1]):] == 0)
    out = ops.moe_combine(y, w, inverse)
    ref = moe_experts_reference(x, w, idx, w1, w2, capacity=cap)
    assert_close_to_reference(out, ref, floor=1e-4)


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
def test_layer_vs_reference(isa, shape, k):
    layer = _layer(k=k).eval()
    x = torch.randn(*shape)
    out = layer(x)
    assert out.shape == x.shape
    assert_close_to_reference(out, _layer_reference(layer, x), floor=1e-5)


def test_layer_capacity_and_bf16_input():
    layer = _layer(capacity_factor=0.5).eval()
    x = torch.randn(40, 16)
    assert_close_to_reference(layer(x), _layer_reference(layer, x), floor=1e-5)
    layer = _layer().eval()
    xb = torch.randn(10, 16).bfloat16()
    out = layer(xb)
    assert out.dtype == torch.bfloat16
    ref = _layer_reference(layer, xb.float())
    assert (out.double() - ref).abs().max() < 2e-2


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


def test_layer_bf16_parameters():
    layer = _layer(shared_expert_size=8, shared_expert_gate=True).eval()
    x = torch.randn(2, 9, 16)
    ref = layer(x)
    layer = layer.to(torch.bfloat16)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16 and layer.w1.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 3e-2 * max(1.0, ref.abs().max().item())


def test_layer_grads_vs_torch_reference():
    layer = _layer(E=4, k=2).train()
    x = torch.randn(33, 16, requires_grad=True)
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


def test_gradcheck_ops_float64():
    torch.manual_seed(3)
    T, E, k, H, Fs = 5, 4, 2, 3, 4
    for scoring in ("softmax", "sigmoid"):
        for renorm in (True, False):
            logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
            assert torch.autograd.gradcheck(
                lambda lg: ops.moe_route(lg, k, scoring, renorm)[0], (logits,))
    _, idx = _random_routing(T, E, k, skew=0)
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    for act, gated in (("silu", True), ("gelu", False), ("gelu_tanh", True)):
        x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
        w1 = torch.randn(E, (2 if gated else 1) * Fs, H, dtype=torch.float64, requires_grad=True)
        w2 = torch.randn(E, H, Fs, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, b, c: ops.moe_expert_mlp(a, row_token, offsets, b, c, act, gated),
            (x, w1, w2))
    y = torch.randn(T * k, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.moe_combine(a, b, inverse), (y, w))


def test_gradcheck_layer_float64():
    layer = _layer(H=4, Fs=5, E=4, k=2, dtype=torch.float64, shared_expert_size=3,
                   shared_expert_gate=True).eval()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
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


def test_opcheck_every_op():
    T, E, k, H, Fs = 7, 4, 2, 8, 6
    logits = torch.randn(T, E)
    for args in [(logits, k, "softmax", True, None, 1, 1),
                 (logits, k, "sigmoid", False, torch.randn(E), 2, 1)]:
        torch.library.opcheck(L.moe_route, args)
    _, idx = _random_routing(T, E, k)
    torch.library.opcheck(L.moe_permute, (idx, E, -1))
    torch.library.opcheck(L.moe_permute, (idx, E, 2))
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    x = torch.randn(T, H, requires_grad=True)
    w1 = torch.randn(E, 2 * Fs, H, requires_grad=True)
    w2 = torch.randn(E, H, Fs, requires_grad=True)
    torch.library.opcheck(L.moe_expert_mlp, (x, row_token, offsets, w1, w2, "silu", True))
    gy = torch.randn(T * k, H)
    torch.library.opcheck(L.moe_expert_mlp_backward,
                          (gy, x.detach(), row_token, offsets, w1.detach(), w2.detach(), "silu",
                           True))
    y = torch.randn(T * k, H, requires_grad=True)
    w = torch.rand(T, k, requires_grad=True)
    torch.library.opcheck(L.moe_combine, (y, w, inverse))
    torch.library.opcheck(L.moe_combine_backward, (torch.randn(T, H), y.detach(), w.detach(),
                                                   inverse))


def test_torch_compile_fullgraph():
    layer = _layer().eval()
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), layer, torch.nn.ReLU())
    x = torch.randn(2, 5, 16)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


def test_torch_compile_fullgraph_training_backward():
    layer = _layer(router_jitter=0.0).train()
    x = torch.randn(9, 16)
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
def test_from_hf_mixtral(isa, T):
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                        num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    block = _randomize(MixtralSparseMoeBlock(cfg)).eval()
    layer = MoELayer.from_hf(block).eval()
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        expected = block(x.clone())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", [False, True])
def test_from_hf_qwen2_moe(isa, norm):
    pytest.importorskip("transformers")
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_experts=6,
                         num_experts_per_tok=3, norm_topk_prob=norm)
    cfg._experts_implementation = "eager"
    block = _randomize(Qwen2MoeSparseMoeBlock(cfg)).eval()
    layer = MoELayer.from_hf(block).eval()
    x = torch.randn(3, 11, 32)
    with torch.no_grad():
        expected = block(x.clone())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    T, E, k, H, Fs = 4, 4, 2, 8, 6
    x = torch.randn(T, H)
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_route(torch.randn(T, E), 5)
    with pytest.raises(RuntimeError, match="scoring"):
        ops.moe_route(torch.randn(T, E), 2, "tanh")
    with pytest.raises(RuntimeError, match="num_groups"):
        ops.moe_route(torch.randn(T, 6), 2, "softmax", True, None, 4, 1)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe_permute(torch.tensor([[0, 4]]), E)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.moe_permute(torch.tensor([[0, -1]]), E)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3]])
    row_token, offsets, inverse = ops.moe_permute(idx, E)
    w1, w2 = torch.randn(E, 2 * Fs, H), torch.randn(E, H, Fs)
    with pytest.raises(RuntimeError, match="w1 must have shape"):
        ops.moe_expert_mlp(x, row_token, offsets, torch.randn(E, 2 * Fs, H + 1), w2)
    with pytest.raises(RuntimeError, match="w2 must have"):
        ops.moe_expert_mlp(x, row_token, offsets, w1, torch.randn(E + 1, H, Fs))
    with pytest.raises(RuntimeError, match="row_token"):
        ops.moe_expert_mlp(x, row_token + 10, offsets, w1, w2)
    bad = offsets.clone()
    bad[2] = 100
    with pytest.raises(RuntimeError, match="expert_offsets"):
        ops.moe_expert_mlp(x, row_token, bad, w1, w2)
    with pytest.raises(RuntimeError, match="activation"):
        ops.moe_expert_mlp(x, row_token, offsets, w1, w2, "tanh")
    with pytest.raises(RuntimeError, match="float64"):
        ops.moe_expert_mlp(x.double(), row_token, offsets, w1, w2)
    with pytest.raises(RuntimeError, match="inverse"):
        ops.moe_combine(torch.randn(T * k, H), torch.rand(T, k), inverse + 100)
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 8, 4, 5)
    with pytest.raises(ValueError, match="hidden_size"):
        MoELayer(8, 8, 4, 2)(torch.randn(3, 7))


# ---- expert parallelism ------------------------------------------------------------------------
def _ep_worker(rank, world, init_file, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
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
        x = xs[rank].clone().requires_grad_(True)
        out = layer(x)
        (out * gs[rank]).sum().backward()
        router_grad = layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        torch.save({"out": out.detach(), "x_grad": x.grad, "w1_grad": layer.w1.grad,
                    "w2_grad": layer.w2.grad, "router_grad": router_grad}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_expert_parallel_gloo_matches_single_process():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with Gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result")
        mp.spawn(_ep_worker, args=(2, init_file, result_file), nprocs=2, join=True)
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
    assert all(r[2].startswith(("se_f32_moe_gemv_ukernel", "se_bf16_moe_gemv_ukernel")) for r in rows)
    for isa in sparse_ext.supported_isas():
        if isa in ("scalar", "avx2"):
            assert isa in isas


def test_bench_module_smoke(monkeypatch):
    """bench/bench_moe.py runs end to end (tiny shapes) and yields the row keys bench/run.py uses."""
    import sys
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.syspath_prepend(root)
    from bench import bench_moe

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
    assert len(bench_moe.targets_report(rows)) == 3
    bench_moe.print_table(rows, out=sys.stdout)

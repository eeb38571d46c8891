"""Hugging Face MoE models as a whole: sparsify(moe=True) / swap_moe replace every sparse MoE block
by MoELayer with the same outputs, the report lists the blocks, and output_router_logits (the
load-balancing loss) keeps working after the swap."""
import pytest
import torch

import sparse_ext

transformers = pytest.importorskip("transformers")


def tiny_mixtral(seed=0):
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_sparsify_moe_swaps_blocks_and_reports_them():
    model, ref = tiny_mixtral(), tiny_mixtral()
    attention = "model.layers.*.self_attn.*"
    _, report = sparse_ext.sparsify(model, sparsity=0.5, moe=True, include=attention)
    sparse_ext.sparsify(ref, sparsity=0.5, include=attention)  # the same attention, HF MoE
    blocks = report.moe_blocks
    assert [r.name for r in blocks] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(r.status == "moe" and r.dense_bytes > 0 for r in blocks)
    assert all(isinstance(layer.mlp, sparse_ext.MoELayer) for layer in model.model.layers)
    assert "swapped for sparse_ext.MoELayer" in str(report)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_swap_moe_keeps_outputs_and_router_logits():
    model, ref = tiny_mixtral(), tiny_mixtral()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = ref(ids, labels=ids, output_router_logits=True)
    assert sparse_ext.swap_moe(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    with torch.no_grad():
        got = model(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    assert len(got.router_logits) == 2
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)


def test_router_logits_after_a_forward_before_the_swap():
    """Hooks the model installed on the HF routers before the swap see the MoELayer's logits."""
    model = tiny_mixtral()
    ids = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        model(ids, output_router_logits=True)
        sparse_ext.swap_moe(model)
        out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == 2 and torch.isfinite(out.aux_loss)


def test_without_moe_the_blocks_are_reported_as_left_alone():
    model = tiny_mixtral()
    _, report = sparse_ext.sparsify(model, sparsity=0.5, min_features=0)
    assert [r.status for r in report.moe_blocks] == ["skipped", "skipped"]
    assert "sparsify(moe=True)" in report.moe_blocks[0].reason
    assert not any(isinstance(layer.mlp, sparse_ext.MoELayer) for layer in model.model.layers)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None), ("4x1", 0.5)])
def test_sparsify_prunes_experts_and_reports_their_bytes(pattern, sparsity):
    model = tiny_mixtral()
    _, report = sparse_ext.sparsify(model, sparsity=sparsity, pattern=pattern, moe=True,
                                    prune_experts=True, include="model.layers.*.self_attn.*")
    blocks = report.moe_blocks
    assert [r.status for r in blocks] == ["sparse", "sparse"]
    for row, layer in zip(blocks, model.model.layers):
        experts = layer.mlp.sparse_experts
        assert layer.mlp.w1 is None and experts is not None and experts.pattern == pattern
        assert row.sparse_bytes == experts.weight_nbytes < row.dense_bytes
        assert row.sparsity == pytest.approx(sparsity or 0.5, abs=0.02)
    # the expert linears are not listed on their own: the block's row covers them
    assert not any(".sparse_experts." in r.name for r in report)
    assert report.dense_bytes >= sum(r.dense_bytes for r in blocks)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        got = model(ids).logits
        sparse_ext.densify(model)
        assert all(layer.mlp.sparse_experts is None for layer in model.model.layers)
        torch.testing.assert_close(model(ids).logits, got, rtol=1e-4, atol=1e-4)


def test_pruned_experts_train():
    layer = sparse_ext.MoELayer(16, 24, 4, 2)
    layer.sparsify_experts(sparsity=0.5)
    x = torch.randn(9, 16, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    values = layer.sparse_experts.gate_up[0].values
    assert values.grad is not None and values.grad.shape == values.shape
    # the same loss through dense experts holding the pruned weights: the same input gradient
    dense = sparse_ext.MoELayer(16, 24, 4, 2)
    w1, w2 = layer.sparse_experts.to_dense()
    dense.load_state_dict({"router.weight": layer.router.weight.detach(), "w1": w1, "w2": w2})
    x2 = x.detach().clone().requires_grad_(True)
    dense(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_prune_experts_argument_errors():
    with pytest.raises(ValueError, match="prune_experts=True needs moe=True"):
        sparse_ext.sparsify(tiny_mixtral(), sparsity=0.5, prune_experts=True)
    with pytest.raises(ValueError, match="prune_experts prunes by method='magnitude'"):
        sparse_ext.sparsify(tiny_mixtral(), sparsity=0.5, moe=True, prune_experts=True,
                            method="wanda", calibration=[torch.randint(0, 64, (1, 4))])
    layer = sparse_ext.MoELayer(16, 24, 4, 2).sparsify_experts(sparsity=0.5)
    with pytest.raises(RuntimeError, match="densify_experts"):
        layer.sparsify_experts(sparsity=0.5)


@pytest.mark.parametrize("prune", [False, True])
def test_save_pretrained_round_trip_with_moe(tmp_path, prune):
    """A sparsified Mixtral saved with save_pretrained (which writes the MoE blocks under the
    legacy ``block_sparse_moe`` name) loads into the dense base model with one load_sparse."""
    model = tiny_mixtral()
    model.save_pretrained(tmp_path / "base")
    sparse_ext.sparsify(model, pattern="2:4", moe=True, prune_experts=prune, min_features=0)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "sparse")
    fresh = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base").eval()
    sparse_ext.load_sparse(fresh, tmp_path / "sparse")
    assert all(isinstance(layer.mlp, sparse_ext.MoELayer) for layer in fresh.model.layers)
    assert all((layer.mlp.sparse_experts is not None) == prune for layer in fresh.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, want)


def _tiny_causal_lm(kind):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=24, **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.OlmoeConfig(intermediate_size=24, **common)
        model = transformers.OlmoeForCausalLM(cfg)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen3_moe", "olmoe"])
def test_sparsify_moe_on_qwen3_moe_and_olmoe(kind):
    torch.manual_seed(0)
    model = _tiny_causal_lm(kind)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(ids, labels=ids, output_router_logits=True)
    _, report = sparse_ext.sparsify(model, sparsity=0.5, moe=True, exclude="*")
    assert [r.status for r in report.moe_blocks] == ["moe", "moe"]
    with torch.no_grad():
        got = model(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)

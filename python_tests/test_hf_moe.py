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

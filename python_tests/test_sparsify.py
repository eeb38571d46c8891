"""sparsify / densify: which layers are swapped, the report's numbers, and that outputs match."""
import json

import pytest
import torch
from torch import nn

import sparse_ext
from sparse_ext import SparseLinear, densify, sparsify


def mlp(d_in=64, hidden=128, d_out=96, tiny=8):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.ReLU(),
        nn.Linear(hidden, d_out), nn.ReLU(),
        nn.Linear(d_out, tiny),              # tiny head: skipped by default
    )


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q": nn.Linear(64, 64), "k": nn.Linear(64, 64),
                                   "v": nn.Linear(64, 64)})
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        a = self.attn["q"](x) + self.attn["k"](x) + self.attn["v"](x)
        return self.fc2(torch.relu(self.fc1(a)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        for blk in self.encoder:
            x = blk(x)
        return self.head(x)


def sparse_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, SparseLinear))


# ---- swapping ----------------------------------------------------------------------------------
def test_swaps_eligible_linears_in_place():
    model = mlp()
    out, report = sparsify(model, sparsity=0.75)
    assert out is model
    assert sparse_names(model) == ["0", "2"]
    assert isinstance(model[4], nn.Linear) and not isinstance(model[4], SparseLinear)
    assert report["4"].status == "skipped" and "min_features" in report["4"].reason
    assert [r.name for r in report.sparsified] == ["0", "2"]
    y = model(torch.randn(3, 64))
    assert y.shape == (3, 8)


def test_min_features_zero_swaps_everything():
    model = mlp()
    sparsify(model, sparsity=0.5, min_features=0)
    assert sparse_names(model) == ["0", "2", "4"]
    model = mlp()
    sparsify(model, sparsity=0.5, min_features={"Linear": 100})
    assert sparse_names(model) == []
    with pytest.raises(ValueError, match="min_features"):
        sparsify(mlp(), sparsity=0.5, min_features={"Embedding": 3})
    with pytest.raises(ValueError, match="min_features"):
        sparsify(mlp(), sparsity=0.5, min_features=-1)


def test_include_exclude_and_globs():
    model = Net()
    _, report = sparsify(model, sparsity=0.5, exclude="encoder.*.attn.*")
    assert sparse_names(model) == ["encoder.0.fc1", "encoder.0.fc2", "encoder.1.fc1",
                                   "encoder.1.fc2"]
    assert report["encoder.0.attn.q"].reason == "excluded"
    assert report["head"].reason.startswith("smaller than min_features")

    model = Net()
    sparsify(model, sparsity=0.5, include=["encoder.1"])          # a parent name covers children
    assert sparse_names(model) == [f"encoder.1.{n}" for n in
                                   ("attn.k", "attn.q", "attn.v", "fc1", "fc2")]

    model = Net()
    sparsify(model, sparsity=0.5, include="encoder.?.fc[12]", exclude="encoder.0.*")
    assert sparse_names(model) == ["encoder.1.fc1", "encoder.1.fc2"]   # exclude wins


def test_include_forces_tiny_layers():
    model = Net()
    _, report = sparsify(model, sparsity=0.5, include="head", min_features=1000)
    assert sparse_names(model) == ["head"]
    assert report["encoder.0.fc1"].reason == "not included"


def test_root_layer_returns_new_module():
    lin = nn.Linear(64, 64)
    new, report = sparsify(lin, sparsity=0.5)
    assert isinstance(new, SparseLinear) and len(report.sparsified) == 1
    assert isinstance(densify(new), nn.Linear)


def test_skips_multihead_attention_and_tied_weights():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(64, 4, batch_first=True)
            self.a = nn.Linear(64, 64)
            self.b = nn.Linear(64, 64)
            self.b.weight = self.a.weight      # tied
            self.c = nn.Linear(64, 64)

        def forward(self, x):
            return self.c(self.mha(x, x, x)[0] + self.a(x) + self.b(x))

    model = M()
    _, report = sparsify(model, sparsity=0.5)
    assert sparse_names(model) == ["c"]
    assert "MultiheadAttention" in report["mha.out_proj"].reason
    assert "tied" in report["a"].reason and "tied" in report["b"].reason
    model(torch.randn(2, 5, 64))


class CastsToWo(nn.Module):
    """Like T5's FFN, whose forward reads ``self.wo.weight.dtype``."""

    def __init__(self):
        super().__init__()
        self.wi = nn.Linear(64, 256)
        self.wo = nn.Linear(256, 64)

    def forward(self, x):
        h = torch.relu(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


def test_skips_layers_whose_parent_reads_weight():
    model = nn.Sequential(CastsToWo())
    _, report = sparsify(model, sparsity=0.5)
    assert isinstance(model[0].wi, SparseLinear)
    assert report["0.wo"].reason == "CastsToWo.forward reads wo.weight directly"
    model(torch.randn(2, 64))


def test_skips_linears_inside_sparse_ext_modules():
    class Router(nn.Module):          # stands in for e.g. MoELayer, which reads router.weight
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(64, 64)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.router.weight)

    Router.__module__ = "sparse_ext.nn.fake"
    model = nn.Sequential(Router(), nn.Linear(64, 64))
    _, report = sparsify(model, sparsity=0.5, min_features=0)
    assert "owned by sparse_ext.Router" in report["0.router"].reason
    assert isinstance(model[1], SparseLinear)
    model(torch.randn(2, 64))


def test_conv2d_left_alone_without_sparse_conv():
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Flatten(), nn.Linear(64 * 4, 64))
    _, report = sparsify(model, sparsity=0.5)
    assert isinstance(model[2], SparseLinear)
    if getattr(sparse_ext, "SparseConv2d", None) is None:
        assert isinstance(model[0], nn.Conv2d)
        assert "SparseConv2d" in report["0"].reason
    else:
        assert isinstance(model[0], sparse_ext.SparseConv2d)
    assert model(torch.randn(1, 64, 2, 2)).shape == (1, 64)


def test_depthwise_conv_skipped():
    if getattr(sparse_ext, "SparseConv2d", None) is None:
        pytest.skip("SparseConv2d not in this build")
    model = nn.Sequential(nn.Conv2d(64, 64, 3, groups=64, padding=1), nn.Conv2d(64, 128, 1))
    _, report = sparsify(model, sparsity=0.5)
    assert report["0"].reason == "depthwise convolution"
    assert isinstance(model[1], sparse_ext.SparseConv2d)


def test_argument_errors():
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(mlp())
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(mlp(), sparsity=1.5)
    with pytest.raises(ValueError, match="method"):
        sparsify(mlp(), sparsity=0.5, method="l1")
    with pytest.raises(ValueError, match="pattern"):
        sparsify(mlp(), sparsity=0.5, pattern="diagonal")
    with pytest.raises(TypeError):
        sparsify(torch.zeros(3), sparsity=0.5)
    with pytest.raises(ValueError, match="global"):
        sparsify(mlp(), pattern="2:4", global_pruning=True)


def test_nm_pattern_passes_through():
    model = mlp()
    try:
        _, report = sparsify(model, pattern="2:4")
    except NotImplementedError:
        pytest.skip("N:M patterns not in this build")
    assert all(r.pattern == "2:4" for r in report.sparsified)
    assert all(abs(r.sparsity - 0.5) < 0.02 for r in report.sparsified)
    with pytest.raises(ValueError, match="global"):
        sparsify(mlp(), pattern="2:4", sparsity=0.5, global_pruning=True)


def test_sparsity_per_layer_dict():
    model = Net()
    _, report = sparsify(model, sparsity={"*.attn.*": 0.5, "encoder.0.*": 0.9, "encoder.1.fc1": 0.8})
    assert report["encoder.0.attn.q"].sparsity == pytest.approx(0.5, abs=1e-3)   # first key wins
    assert report["encoder.1.attn.v"].target == 0.5
    assert report["encoder.0.fc2"].sparsity == pytest.approx(0.9, abs=1e-3)
    assert report["encoder.1.fc1"].sparsity == pytest.approx(0.8, abs=1e-3)
    assert report["encoder.1.fc2"].reason == "no sparsity given for this layer"
    assert isinstance(model.encoder[1].fc2, nn.Linear) and not isinstance(model.encoder[1].fc2, SparseLinear)
    with pytest.raises(ValueError, match="global"):
        sparsify(Net(), sparsity={"*": 0.5}, global_pruning=True)
    with pytest.raises(ValueError, match="sparsity"):
        sparsify(Net(), sparsity={"*": 2.0})


# ---- per-layer vs global ----------------------------------------------------------------------
def test_per_layer_sparsity_is_exact():
    _, report = sparsify(mlp(), sparsity=0.7)
    for r in report.sparsified:
        assert r.sparsity == pytest.approx(0.7, abs=1.0 / (r.shape[0] * r.shape[1]) + 1e-6)


def test_global_threshold_is_shared():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    with torch.no_grad():
        model[1].weight.mul_(10.0)             # layer 1 has the big weights
    dense = [m.weight.detach().clone() for m in model]
    _, report = sparsify(model, sparsity=0.5, global_pruning=True)
    s0, s1 = report["0"].sparsity, report["1"].sparsity
    assert s0 > 0.9 and s1 < 0.1                # most of the pruning lands on layer 0
    assert report.sparsity == pytest.approx(0.5, abs=1e-4)   # overall target met
    # one threshold: every kept weight is >= every pruned weight, across layers
    kept, pruned = [], []
    for m, w in zip(model, dense):
        wd = m.to_dense().weight.detach()
        keep = wd != 0
        kept.append(w[keep].abs())
        pruned.append(w[~keep].abs())
    assert torch.cat(kept).min() >= torch.cat(pruned).max()
    assert "global" in str(report)


def test_global_vs_per_layer_differ_on_uneven_layers():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    with torch.no_grad():
        a[1].weight.mul_(3.0)
    b = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128))
    b.load_state_dict(a.state_dict())
    _, per_layer = sparsify(a, sparsity=0.6)
    _, glob = sparsify(b, sparsity=0.6, global_pruning=True)
    assert per_layer["0"].sparsity == pytest.approx(0.6, abs=1e-4)
    assert per_layer["1"].sparsity == pytest.approx(0.6, abs=1e-4)
    assert glob["0"].sparsity > 0.6 > glob["1"].sparsity


def test_global_block_pattern():
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    _, report = sparsify(model, sparsity=0.75, pattern="4x1", global_pruning=True)
    assert report.sparsity == pytest.approx(0.75, abs=0.01)
    for m in model:
        w = m.to_dense().weight.detach()
        tiles = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1])
        assert bool((tiles.all(1) | ~tiles.any(1)).all())      # whole 4x1 tiles kept or dropped


# ---- report ------------------------------------------------------------------------------------
def test_report_numbers_and_formats():
    model = mlp()
    layer = model[0]
    _, report = sparsify(model, sparsity=0.9)
    row = report["0"]
    assert row.kind == "Linear" and row.shape == (128, 64) and row.pattern == "unstructured"
    assert row.dense_bytes == 128 * 64 * 4
    assert row.sparse_bytes == model[0].weight_nbytes
    assert row.sparse_bytes < 0.2 * row.dense_bytes
    assert row.ratio == pytest.approx(row.sparse_bytes / row.dense_bytes)
    assert report.dense_bytes == sum(r.dense_bytes for r in report.sparsified)
    assert report.sparse_bytes == sum(r.sparse_bytes for r in report.sparsified)
    assert layer is not model[0]
    dicts = report.to_dicts()
    json.dumps(dicts)
    assert {d["name"] for d in dicts} == {"0", "2", "4"}
    assert dicts[0]["shape"] == [128, 64] and dicts[0]["status"] == "sparse"
    text = str(report)
    assert repr(report) == text
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "kind", "shape"]
    assert any(line.startswith("0 ") and "128x64" in line and "0.900" in line for line in lines)
    assert "skipped: smaller than min_features" in text
    assert lines[-1].startswith("total (2 sparse, 1 skipped)")


def test_random_method_is_seeded_by_generator():
    def masks(seed):
        model = mlp()
        sparsify(model, sparsity=0.6, method="random", generator=torch.Generator().manual_seed(seed))
        return [model[i].to_dense().weight != 0 for i in (0, 2)]

    a, b, c = masks(1), masks(1), masks(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert all(abs(1 - float(m.float().mean()) - 0.6) < 1e-3 for m in a)


def test_report_when_nothing_is_swapped():
    _, report = sparsify(mlp(), sparsity=0.5, min_features=10_000)
    assert report.sparsified == [] and report.sparse_bytes == 0
    assert "total (0 sparse, 3 skipped)" in str(report)


# ---- outputs -----------------------------------------------------------------------------------
def test_sparsified_mlp_matches_masked_dense():
    model = mlp()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    sparsify(model, sparsity=0.8)
    with torch.no_grad():
        for i in (0, 2):
            w = reference[i].weight
            mask = sparse_ext.magnitude_mask(w, 0.8)
            w.mul_(mask)
    x = torch.randn(5, 7, 64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def _sparsified_output(model, sparsity, x):
    """Sparsifies ``model`` in place at ``sparsity`` and returns its output on ``x``."""
    sparsify(model, sparsity=sparsity)
    with torch.no_grad():
        return model(x)


def test_densify_round_trip():
    model = Net()
    x = torch.randn(4, 64)
    y_sparse = _sparsified_output(model, 0.7, x)
    out = densify(model)
    assert out is model
    assert sparse_names(model) == []
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        y_dense = model(x)
    torch.testing.assert_close(y_dense, y_sparse, rtol=1e-5, atol=1e-5)
    # a second sparsify of the densified model prunes nothing more at the same level
    _, report = sparsify(model, sparsity=0.7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_sparse, rtol=1e-5, atol=1e-5)


def test_mode_and_frozen_weights_carry_over():
    model = mlp().eval()
    model[0].weight.requires_grad_(False)
    sparsify(model, sparsity=0.5)
    assert not model[0].training and not model[2].training
    assert not model[0].values.requires_grad and model[0].bias.requires_grad
    assert model[2].values.requires_grad
    densify(model)
    assert not model[0].training
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[2].weight.requires_grad


def test_train_after_sparsify():
    model = mlp()
    sparsify(model, sparsity=0.5)
    loss = model(torch.randn(4, 64)).square().sum()
    loss.backward()
    assert model[0].values.grad is not None and model[0].values.grad.shape == model[0].values.shape


def test_bf16_model():
    model = mlp().to(torch.bfloat16)
    _, report = sparsify(model, sparsity=0.5)
    assert len(report.sparsified) == 2
    assert report["0"].dense_bytes == 128 * 64 * 2
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_fp16_skipped_and_no_bias_and_odd_sizes():
    _, report = sparsify(mlp().half(), sparsity=0.5)
    assert report.sparsified == [] and "float16" in report["0"].reason
    model = nn.Sequential(nn.Linear(100, 67, bias=False), nn.Linear(67, 65))
    _, report = sparsify(model, sparsity=0.5)
    assert len(report.sparsified) == 2 and model[0].bias is None
    x = torch.randn(3, 100)
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(densify(model)(x), y, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    model = mlp()
    x = torch.randn(3, 64)
    eager = _sparsified_output(model, 0.9, x)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager)


# ---- the Conv2d path -----------------------------------------------------------------------------
@pytest.fixture
def conv_class():
    """The conv module sparsify swaps in (the real one: every build has it)."""
    return sparse_ext.SparseConv2d


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1),                 # 3 input channels < min_features: dense
        nn.Conv2d(64, 64, 3, padding=1, groups=64),     # depthwise: dense
        nn.Conv2d(64, 128, 1),                          # pointwise: sparse
        nn.Conv2d(128, 128, 3, padding=1, groups=2),    # grouped: the module refuses it
        nn.Flatten(), nn.Linear(128 * 4 * 4, 64))


def test_conv_swapping_and_densify(conv_class):
    model = convnet()
    x = torch.randn(1, 3, 4, 4)
    _, report = sparsify(model, sparsity=0.75)
    assert isinstance(model[2], conv_class) and isinstance(model[5], SparseLinear)
    assert type(model[0]) is nn.Conv2d and report["0"].reason == "smaller than min_features=16"
    assert report["1"].reason == "depthwise convolution"
    assert type(model[3]) is nn.Conv2d and "groups" in report["3"].reason
    assert report["2"].kind == "Conv2d" and report["2"].shape == (128, 64, 1, 1)
    assert report["2"].sparsity == pytest.approx(0.75, abs=1e-3)
    with torch.no_grad():
        y = model(x)
        densify(model)
        assert type(model[2]) is nn.Conv2d and type(model[5]) is nn.Linear
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_densify_keeps_a_fused_activation(conv_class):
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Identity())
    sparsify(model, sparsity=0.5)
    model[0].activation = "relu6"          # as if fused into the sparse conv's store
    densify(model)
    assert isinstance(model[0], nn.Sequential) and isinstance(model[0][1], nn.ReLU6)


def test_conv_include_forces_and_global(conv_class):
    model = convnet()
    _, report = sparsify(model, sparsity=0.5, include=["0", "1", "2"], global_pruning=True)
    assert isinstance(model[0], conv_class) and isinstance(model[2], conv_class)
    assert type(model[1]) is nn.Conv2d and "groups" in report["1"].reason   # forced, still refused
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)


def test_hf_conv1d_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    reference = transformers.GPT2LMHeadModel(cfg).eval()
    reference.load_state_dict(model.state_dict())
    _, report = sparsify(model, sparsity=0.75, global_pruning=True)
    convs = [r for r in report.sparsified if r.kind == "Conv1D"]
    assert len(convs) == 8                                 # c_attn, c_proj, c_fc, mlp.c_proj x 2
    assert report["transformer.h.0.mlp.c_fc"].shape == (64, 256)      # Conv1D weight is [in, out]
    assert "tied" in report["lm_head"].reason
    assert report.sparsity == pytest.approx(0.75, abs=1e-3)
    # the reference with the same weights zeroed in Conv1D orientation
    with torch.no_grad():
        for name, mod in reference.named_modules():
            if type(mod).__name__ == "Conv1D":
                kept = model.get_submodule(name).to_dense().weight.t() != 0
                mod.weight.mul_(kept)
        ids = torch.randint(0, 128, (2, 12))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


# ---- only_if_faster ----------------------------------------------------------------------------
def test_only_if_faster_keeps_slower_layers_dense(monkeypatch):
    """The decision follows the measured ratio (faked here, so the test cannot depend on timing);
    each layer is timed on the input it sees in the model."""
    from sparse_ext import _layer_speed

    seen = {}

    def fake_ratio(dense, sparse, shape, dtype=None, reps=7):
        seen[dense.in_features] = shape
        return {64: 0.5, 128: 2.0}[dense.in_features]

    monkeypatch.setattr(_layer_speed, "dense_over_sparse", fake_ratio)
    model = mlp()
    x = torch.randn(5, 64)
    dense_y = model(x)
    _, report = sparsify(model, sparsity=0.5, only_if_faster=True, example_inputs=x)
    assert sparse_names(model) == ["2"]
    assert report["0"].status == "skipped" and report["0"].speedup == 0.5
    assert "kept dense" in report["0"].reason and "0.50x" in report["0"].reason
    assert report["2"].status == "sparse" and report["2"].speedup == 2.0
    assert "2.00x faster than dense" in str(report)
    assert seen == {64: (5, 64), 128: (5, 128)}  # the shapes model(x) gives them
    assert model(x).shape == dense_y.shape
    torch.testing.assert_close(model[0](x), nn.functional.linear(x, model[0].weight, model[0].bias))


def test_only_if_faster_default_shapes_and_real_timing():
    """Without example inputs a linear is timed on 16 tokens; with real timing every converted
    layer is either sparse and at least as fast, or dense with its ratio in the report."""
    from sparse_ext import _layer_speed

    model = mlp()
    assert _layer_speed.default_input_shape(SparseLinear.from_dense(model[0], sparsity=0.5)) == \
        (_layer_speed.DEFAULT_TOKENS, 64)
    _, report = sparsify(model, sparsity=0.9, only_if_faster=True)
    for name in ("0", "2"):
        row = report[name]
        assert row.speedup is not None and row.speedup > 0
        assert (row.status == "sparse") == (row.speedup >= 1.0)
        assert isinstance(model[int(name)], SparseLinear) == (row.status == "sparse")

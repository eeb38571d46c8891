"""One-shot pruning methods on small synthetic layers: exact sparsity and pattern, SparseGPT's
reconstruction on low-rank inputs, Wanda = magnitude under equal input norms, DSnoT never
increasing its error, allocations hitting the global target, and the sequential driver."""
import pytest
import torch
from torch import nn

from sparse_ext import pruning
from sparse_ext.pruning import InputStats, dsnot, reconstruction_error, sparsegpt, wanda

PATTERNS = ["unstructured", "2:4", "1:4", "2:8", "4:16", "4x1", "2x2"]


def layer(out_f=48, in_f=64, tokens=600, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    if rank is None:
        # columns of different scales, as real activations have
        x = torch.randn(tokens, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)
    else:
        x = torch.randn(tokens, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
    return w, x, InputStats.from_inputs(x)


def check_pattern(mask, pattern, sparsity, per_row=True):
    rows, cols = mask.shape
    if ":" in pattern:
        n, m = (int(v) for v in pattern.split(":"))
        assert (mask.reshape(rows, cols // m, m).sum(-1) == n).all()
    elif "x" in pattern and pattern != "unstructured":
        r, c = (int(v) for v in pattern.split("x"))
        tiles = mask.reshape(rows // r, r, cols // c, c)
        assert (tiles.all(3).all(1) == tiles.any(3).any(1)).all(), "whole tiles only"
        assert abs(1 - mask.double().mean().item() - sparsity) < 0.05
    elif per_row:
        kept = mask.sum(1)
        assert (kept == round((1 - sparsity) * cols)).all(), "every row keeps the same count"
    else:  # SparseGPT chooses over all rows of a column block, as the reference does
        assert abs(1 - mask.double().mean().item() - sparsity) <= 1.0 / mask.numel() * 8


def rel_error(w, mask, values, stats):
    pruned = values if values is not None else w * mask
    d = (w.double() - pruned.double())
    return float(((d @ stats.hessian) * d).sum() / ((w.double() @ stats.hessian) * w.double()).sum())


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", [wanda, sparsegpt])
def test_mask_has_the_pattern_and_sparsity(method, pattern):
    w, _, stats = layer()
    mask, values = method(w, stats, 0.5, pattern)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    check_pattern(mask, pattern, 0.5, per_row=method is wanda)
    if values is not None:
        assert values.dtype == w.dtype and (values[~mask] == 0).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.7, 0.9])
def test_unstructured_sparsity_is_exact(sparsity):
    w, _, stats = layer()
    for method in (wanda, sparsegpt):
        mask, _ = method(w, stats, sparsity)
        assert abs((1 - mask.double().mean().item()) - sparsity) < 1.0 / w.shape[1] + 1e-9


def test_wanda_is_magnitude_per_row_when_input_norms_are_equal():
    w, _, _ = layer()
    x = torch.eye(64).repeat(3, 1)  # every input feature has the same norm
    mask, values = wanda(w, InputStats.from_inputs(x), 0.6)
    assert values is None
    keep = round(0.4 * 64)
    expected = torch.zeros_like(mask)
    expected.scatter_(1, w.abs().argsort(1, descending=True)[:, :keep], True)
    assert torch.equal(mask, expected)


def test_sparsegpt_reconstructs_low_rank_inputs():
    """With inputs of rank 8 < the 32 weights kept per row, the kept weights can absorb the
    pruned ones exactly; SparseGPT's updates get the output error to near zero."""
    w, x, stats = layer(rank=8)
    mask, values = sparsegpt(w, stats, 0.5, damping=1e-6)
    err = (x @ w.t() - x @ values.t()).pow(2).sum() / (x @ w.t()).pow(2).sum()
    assert float(err) < 1e-4
    magnitude = w * (w.abs() >= w.abs().median(1, keepdim=True).values)
    assert float(err) < 1e-3 * float((x @ w.t() - x @ magnitude.t()).pow(2).sum() /
                                     (x @ w.t()).pow(2).sum())


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4", "2:8"])
def test_sparsegpt_beats_wanda_on_its_objective(pattern):
    w, _, stats = layer(seed=3)
    m_s, v_s = sparsegpt(w, stats, 0.5, pattern)
    m_w, _ = wanda(w, stats, 0.5, pattern)
    assert rel_error(w, m_s, v_s, stats) <= rel_error(w, m_w, None, stats)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "1:4", "2:8", "4:16"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_dsnot_never_increases_its_error_and_keeps_the_pattern(pattern, sparsity):
    w, _, stats = layer(seed=1)
    mask, _ = wanda(w, stats, sparsity, pattern)
    before = reconstruction_error(w, mask, stats)
    refined, values = dsnot(w, stats, mask, pattern)
    after = reconstruction_error(w, refined, stats)
    assert values is None
    assert (after <= before + 1e-9).all(), "per row, the error never grows"
    check_pattern(refined, pattern, sparsity)
    assert torch.equal(refined.sum(1), mask.sum(1))
    if sparsity == 0.7 or ":" not in pattern:
        assert after.sum() < before.sum(), "a random-ish start leaves room to improve"


def test_dsnot_leaves_tile_patterns_alone():
    w, _, stats = layer()
    mask, _ = wanda(w, stats, 0.5, "4x1")
    assert torch.equal(dsnot(w, stats, mask, "4x1")[0], mask)


def test_allocations_hit_the_global_target():
    shapes = {"a": (64, 64), "b": (256, 64), "c": (64, 1024)}
    sizes = {k: o * i for k, (o, i) in shapes.items()}
    total = sum(sizes.values())
    for result in (pruning.uniform(shapes, 0.7), pruning.erk(shapes, 0.7),
                   pruning.owl({"a": 0.01, "b": 0.05, "c": 0.0}, sizes, 0.7)):
        mean = sum(result[k] * sizes[k] for k in shapes) / total
        assert abs(mean - 0.7) < 1e-6
        assert all(0.0 <= v <= 0.99 for v in result.values())
    owl = pruning.owl({"a": 0.01, "b": 0.05, "c": 0.0}, sizes, 0.7)
    assert owl["b"] < owl["a"] < owl["c"], "more outliers, fewer weights pruned"
    erk = pruning.erk(shapes, 0.7)
    assert erk["a"] < erk["c"], "smaller layers stay denser"


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 16)

    def forward(self, x=None, *, inputs=None):
        x = inputs if x is None else x
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("method,refine", [("wanda", None), ("wanda", "dsnot"), ("sparsegpt", None)])
def test_sequential_driver_prunes_in_execution_order(method, refine):
    model = MLP()
    layers = {"fc3": model.fc3, "fc1": model.fc1, "fc2": model.fc2}  # not in execution order
    batches = [{"inputs": torch.randn(20, 32)} for _ in range(4)]
    assert pruning.calibrate.execution_order(model, layers, batches[0]) == ["fc1", "fc2", "fc3"]
    seen = []
    out = pruning.prune_calibrated(model, layers, {n: 0.5 for n in layers}, "unstructured", method,
                                   batches, refine=refine, progress=lambda names: seen.extend(names) or names)
    assert seen == [["fc1"], ["fc2"], ["fc3"]]  # groups of layers, in execution order
    for name, res in out.items():
        w = layers[name].weight
        assert torch.equal(w != 0, res.mask) or (w[res.mask] == 0).sum() < 3
        assert (w[~res.mask] == 0).all(), "pruned weights are written back as zeros"
        assert 0.0 <= res.error < 1.0 and abs(res.sparsity - 0.5) < 0.02
        if refine:
            assert res.error <= res.error_before_refine + 1e-12


def test_driver_argument_errors():
    model = MLP()
    with pytest.raises(ValueError, match="method must be one of"):
        pruning.prune_calibrated(model, {"fc1": model.fc1}, {"fc1": 0.5}, "unstructured",
                                 "magnitude", [torch.randn(2, 32)])
    with pytest.raises(ValueError, match="refine='dsnot'"):
        pruning.prune_calibrated(model, {"fc1": model.fc1}, {"fc1": 0.5}, "unstructured",
                                 "sparsegpt", [torch.randn(2, 32)], refine="dsnot")
    with pytest.raises(ValueError, match="at least one batch"):
        pruning.prune_calibrated(model, {"fc1": model.fc1}, {"fc1": 0.5}, "unstructured",
                                 "wanda", [])


# ---- through sparsify --------------------------------------------------------------------------
@pytest.mark.parametrize("method,refine,pattern", [("wanda", None, "unstructured"),
                                                   ("wanda", "dsnot", "2:4"),
                                                   ("sparsegpt", None, "unstructured"),
                                                   ("sparsegpt", None, "4x1")])
def test_sparsify_with_calibration(method, refine, pattern):
    import sparse_ext

    model = MLP()
    dense = MLP()
    batches = [torch.randn(16, 32) for _ in range(4)]
    kwargs = {} if ":" in pattern else {"sparsity": 0.5}
    _, report = sparse_ext.sparsify(model, pattern=pattern, method=method, calibration=batches,
                                    refine=refine, min_features=0, **kwargs)
    assert [r.name for r in report.sparsified] == ["fc1", "fc2", "fc3"]
    for r in report.sparsified:
        assert r.error is not None and 0 <= r.error < 1
        assert abs(r.sparsity - 0.5) < 0.03
    assert "reconstruction error" in str(report)
    x = torch.randn(8, 32)
    with torch.no_grad():
        rel = (model(x) - dense(x)).norm() / dense(x).norm()
    assert rel < 0.6


def test_sparsify_calibration_beats_magnitude():
    import sparse_ext

    torch.manual_seed(0)
    scale = torch.linspace(0.05, 4.0, 64)  # a few input features carry most of the signal
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    batches = [torch.randn(64, 64) * scale for _ in range(4)]
    x = torch.randn(256, 64) * scale
    with torch.no_grad():
        ref = net(x)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = __import__("copy").deepcopy(net)
        cal = batches if method != "magnitude" else None
        sparse_ext.sparsify(m, sparsity=0.7, method=method, calibration=cal, min_features=0)
        with torch.no_grad():
            errors[method] = float((m(x) - ref).norm() / ref.norm())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsify_owl_allocation_keeps_the_overall_sparsity():
    import sparse_ext

    model = MLP()
    batches = [torch.randn(16, 32) for _ in range(2)]
    _, report = sparse_ext.sparsify(model, sparsity=0.6, method="wanda", calibration=batches,
                                    allocation="owl", min_features=0)
    targets = {r.name: r.target for r in report.sparsified}
    assert len(set(round(t, 6) for t in targets.values())) > 1
    assert abs(report.sparsity - 0.6) < 0.02


def test_sparsify_calibration_hf_bert_dict_inputs():
    transformers = pytest.importorskip("transformers")
    import sparse_ext

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 100, (4, 12)),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    with torch.no_grad():
        ref = model(**batches[0]).last_hidden_state
        _, report = sparse_ext.sparsify(model, sparsity=0.5, method="sparsegpt",
                                        calibration=batches, include="encoder.*")
        out = model(**batches[0]).last_hidden_state
    assert len(report.sparsified) == 12
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean()
    assert cos > 0.8


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsify_calibration_hf_mixtral_dict_inputs(method):
    """A tiny randomly initialised Mixtral: dict batches through the calibrated methods under
    no_grad, the MoE blocks swapped (and the attention and head linears pruned)."""
    transformers = pytest.importorskip("transformers")
    import sparse_ext

    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    batches = [{"input_ids": torch.randint(0, 64, (2, 10)),
                "attention_mask": torch.ones(2, 10, dtype=torch.long)} for _ in range(3)]
    with torch.no_grad():
        ref = model(**batches[0]).logits
        _, report = sparse_ext.sparsify(model, sparsity=0.5, method=method, calibration=batches,
                                        moe=True, min_features=0)
        out = model(**batches[0]).logits
    assert [r.status for r in report.moe_blocks] == ["moe", "moe"]
    assert len(report.sparsified) == 9  # 4 attention projections x 2 layers + lm_head
    assert all(r.error is not None for r in report.sparsified)
    assert torch.isfinite(out).all()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean()
    assert cos > 0.5


def test_sparsify_calibration_argument_errors():
    import sparse_ext

    with pytest.raises(ValueError, match="needs calibration"):
        sparse_ext.sparsify(MLP(), sparsity=0.5, method="wanda")
    with pytest.raises(ValueError, match="calibration is used by"):
        sparse_ext.sparsify(MLP(), sparsity=0.5, calibration=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="refine"):
        sparse_ext.sparsify(MLP(), sparsity=0.5, method="sparsegpt", refine="dsnot",
                            calibration=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="allocation must be one of"):
        sparse_ext.sparsify(MLP(), sparsity=0.5, method="wanda", allocation="best",
                            calibration=[torch.randn(2, 32)])
    with pytest.raises(ValueError, match="global_pruning"):
        sparse_ext.sparsify(MLP(), sparsity=0.5, method="wanda", global_pruning=True,
                            calibration=[torch.randn(2, 32)])


def test_layers_sharing_an_input_are_grouped():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
            self.o = nn.Linear(16, 16)

        def forward(self, x):
            return self.o(self.q(x) * self.k(x) + self.v(x))

    model = Attn()
    layers = dict(model.named_children())
    groups = pruning.calibrate.execution_groups(model, layers, torch.randn(3, 16))
    assert groups == [["q", "k", "v"], ["o"]]


def test_padding_positions_are_left_out_of_the_statistics():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, inputs, attention_mask):
            return self.fc(inputs)

    model = Seq()
    x = torch.randn(2, 5, 8)
    x[1, 3:] = 100.0  # padding garbage
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    stats = pruning.calibrate._collect(model, [model.fc], [{"inputs": x, "attention_mask": mask}])
    assert stats.tokens == 8
    real = torch.cat([x[0], x[1, :3]])
    torch.testing.assert_close(stats.hessian, (real.double().t() @ real.double()) / 8)

"""The correctness contract of docs/reliability.md, driven through every module and typed op.

Wrong widths, wrong dtypes, wrong devices and corrupt checkpoints must raise a clear Python
exception (naming the argument, what was expected and what was received) and leave the module as it
was; the dtype promotion rule, mask and pattern rules and the sparse-product NaN semantics hold on
every ISA this machine runs. Cases that could crash the process live in test_hostile.py (child
processes); everything here raises or returns.
"""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_ext as se
from reference import sparse_conv_reference, sparse_product_reference
from sparse_ext.formats import CSRWeight, NMWeight

IN, OUT = 300, 16   # 300 columns: two 256-column blocks, the second one partial


def _linear(pattern="unstructured"):
    lin = nn.Linear(IN, OUT)
    if ":" in pattern:
        return se.SparseLinear.from_dense(lin, pattern=pattern)
    return se.SparseLinear.from_dense(lin, sparsity=0.7, pattern=pattern)


def _conv(k=3):
    conv = nn.Conv2d(4, 8, k, padding=k // 2)
    return se.SparseConv2d.from_dense(conv, sparsity=0.6)


MODULES = {
    "linear_csr": lambda: _linear(),
    "linear_4x1": lambda: _linear("4x1"),
    "linear_2:4": lambda: _linear("2:4"),
    "linear_1:8": lambda: _linear("1:8"),
    "conv_1x1": lambda: _conv(1),
    "conv_3x3": lambda: _conv(3),
    "moe": lambda: se.MoELayer(IN, 24, num_experts=4, top_k=2),
}


def _input(name, width, batch):
    if name.startswith("conv"):
        return torch.randn(*batch[:1] or (1,), width, 5, 5)
    return torch.randn(*batch, width)


def _width(name):
    return 4 if name.startswith("conv") else IN


def _expected_message(name, got):
    if name.startswith("conv"):
        return f"x has {got} channels, this weight expects in_channels=4"
    if name == "moe":
        return f"x has {got} features, this layer expects hidden_size={IN}"
    return f"x has {got} features, this weight expects in_features={IN}"


def _tensors(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _assert_unchanged(module, before):
    after = _tensors(module)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k


# ---- 1. input width ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("delta", [-1, 1, 24, -44])
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_module_refuses_wrong_width(name, delta, batch):
    if name.startswith("conv") and (len(batch) > 1 or abs(delta) > 3):
        pytest.skip("images take one batch dim; 4 channels")
    module = MODULES[name]()
    got = _width(name) + delta
    with pytest.raises((RuntimeError, ValueError), match=_expected_message(name, got)):
        module(_input(name, got, batch))


@pytest.mark.parametrize("name", ["linear_csr", "linear_2:4", "conv_3x3", "moe"])
def test_compiled_module_refuses_wrong_width(name):
    torch._dynamo.reset()
    module = MODULES[name]()
    compiled = torch.compile(module, fullgraph=True)
    good = _input(name, _width(name), (2,))
    torch.testing.assert_close(compiled(good), module(good))
    with pytest.raises(Exception, match=_expected_message(name, _width(name) + 1)):
        compiled(_input(name, _width(name) + 1, (2,)))


def test_typed_ops_refuse_wrong_width():
    csr = CSRWeight.from_dense(torch.randn(OUT, IN), torch.rand(OUT, IN) < 0.3)
    nm = NMWeight.from_dense(torch.randn(OUT, IN - 2), 2, 4)   # 298 and 300 need the same groups
    with pytest.raises(RuntimeError, match="x has 301 features, this weight expects in_features=300"):
        se.ops.spmm(torch.randn(2, 301), csr)
    with pytest.raises(RuntimeError, match="x has 300 features, this weight expects in_features=298"):
        se.ops.nm_linear(torch.randn(2, IN), nm)
    conv = CSRWeight.from_dense(torch.randn(8, 4 * 9), torch.rand(8, 36) < 0.5)
    with pytest.raises(RuntimeError, match="x has 5 channels, this weight expects in_channels=4"):
        se.ops.sparse_conv2d(torch.randn(1, 5, 6, 6), conv, None, 3, 1, 1)


# ---- 2. dtypes ----------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _family_call(family, x_dtype, w_dtype):
    """(run, reference) for one family with activations and stored weights in the given dtypes."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=g).to(w_dtype)
    x = torch.randn(3, 32, generator=g).to(x_dtype)
    if family == "spmm":
        csr = CSRWeight.from_dense(w, torch.rand(8, 32, generator=g) < 0.5)
        return (lambda: se.ops.spmm(x, csr)), x.double() @ csr.to_dense().double().t()
    if family == "nm":
        nm = NMWeight.from_dense(w, 2, 4)
        return (lambda: se.ops.nm_linear(x, nm)), x.double() @ nm.to_dense().double().t()
    if family == "conv":
        csr = CSRWeight.from_dense(w, torch.rand(8, 32, generator=g) < 0.5)
        xi = x.reshape(3, 32, 1, 1)
        ref = F.conv2d(xi.double(), csr.to_dense().double().reshape(8, 32, 1, 1))
        return (lambda: se.ops.sparse_conv2d(xi, csr)), ref
    moe = se.MoELayer(32, 16, num_experts=4, top_k=2).to(w_dtype)
    ref_layer = se.MoELayer(32, 16, num_experts=4, top_k=2).double()
    ref_layer.load_state_dict(moe.state_dict())
    return (lambda: moe(x)), ref_layer(x.double()).detach()


@pytest.mark.parametrize("family", ["spmm", "nm", "conv", "moe"])
@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dtype_rule(family, x_dtype, w_dtype):
    """One rule for every family: the output has x's dtype and is computed in float32 (float64
    when x is float64); stored weights in float32 or bfloat16 work with any activation dtype;
    float64 is all or nothing."""
    run, ref = _family_call(family, x_dtype, w_dtype)
    if (x_dtype == torch.float64) != (w_dtype == torch.float64):
        with pytest.raises(RuntimeError, match="float64 needs"):
            run()
        return
    y = run()
    assert y.dtype == x_dtype
    # the error comes from rounding the output (and, for the MoE router, its logits) to x's dtype
    tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3,
           torch.bfloat16: 3e-2}[x_dtype]
    if family == "moe" and x_dtype != torch.float64:
        tol = max(tol, 1e-2 if w_dtype == torch.bfloat16 or x_dtype != torch.float32 else tol)
    scale = ref.abs().max().item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= tol * scale


# ---- 3. devices -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_refuses_input_on_another_device(name):
    module = MODULES[name]()
    x = _input(name, _width(name), (2,)).to("meta")
    with pytest.raises((RuntimeError, ValueError), match="device"):
        module(x)


# ---- 4. corrupt checkpoints -------------------------------------------------------------------
def _last_block_entry(csr):
    """Index of an entry in the last (partial) column block, where index 200 is out of range."""
    kb = csr.k_blocks
    off = csr.offsets.long()
    for g in range(csr.out_features // csr.block_rows):
        lo, hi = int(off[g * kb + kb - 1]), int(off[g * kb + kb])
        if hi > lo:
            return lo
    raise AssertionError("no entry in the last block")


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _extra(sd, **changes):
    """The state_dict's extra state (metadata) with ``changes``, encoded as modules save it."""
    from sparse_ext.nn._stored import decode_extra_state, encode_extra_state

    return encode_extra_state(dict(decode_extra_state(sd["_extra_state"]), **changes))


CSR_CORRUPTIONS = {
    "index_out_of_range": (lambda sd, m: {"indices": _with(sd["indices"], _last_block_entry(
        m.weight_format()), 200)}, "indices"),
    "offsets_not_monotone": (lambda sd, m: {"offsets": _with(sd["offsets"], 3, 10**6)}, "offsets"),
    "offsets_negative": (lambda sd, m: {"offsets": _with(sd["offsets"], 2, -5)}, "offsets"),
    "offsets_wrong_length": (lambda sd, m: {"offsets": sd["offsets"][:-1].clone()}, "offsets"),
    "offsets_int64": (lambda sd, m: {"offsets": sd["offsets"].long()}, "offsets"),
    "values_wrong_length": (lambda sd, m: {"values": sd["values"][:-1].clone()}, "values"),
    "indices_longer": (lambda sd, m: {"indices": torch.cat([sd["indices"], sd["indices"][:1]])},
                       "values|offsets"),
    "extra_state_shape": (lambda sd, m: {"_extra_state": _extra(sd, shape=[OUT, IN + 1])},
                          "weight"),
    "extra_state_garbage": (lambda sd, m: {"_extra_state": torch.tensor([7, 255, 0, 1],
                                                                        dtype=torch.uint8)},
                            "extra state"),
}
NM_CORRUPTIONS = {
    "metadata_random": (lambda sd, m: {"metadata": torch.randint(
        0, 256, sd["metadata"].shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))},
        "metadata"),
    "metadata_all_ones": (lambda sd, m: {"metadata": torch.full_like(sd["metadata"], 255)},
                          "metadata"),
    "metadata_wrong_shape": (lambda sd, m: {"metadata": sd["metadata"][:, :-1].clone()},
                             "metadata"),
    "values_wrong_shape": (lambda sd, m: {"values": sd["values"][:-1].clone()}, "values"),
    "extra_state_pattern": (lambda sd, m: {"_extra_state": _extra(sd, pattern="1:4")}, "pattern"),
}
MOE_CORRUPTIONS = {
    "w1_wrong_shape": (lambda sd, m: {"w1": sd["w1"][:, :-1].clone()}, "w1"),
    "w2_wrong_experts": (lambda sd, m: {"w2": sd["w2"][:-1].clone()}, "w2"),
    "router_wrong_shape": (lambda sd, m: {"router.weight": sd["router.weight"][:-1].clone()},
                           "router.weight"),
}
CHECKPOINT_CASES = (
    [(n, c) for n in ("linear_csr", "linear_4x1", "conv_1x1", "conv_3x3")
     for c in CSR_CORRUPTIONS if not (n.startswith("conv") and c == "extra_state_shape")]
    + [(n, c) for n in ("linear_2:4", "linear_1:8") for c in NM_CORRUPTIONS]
    + [("moe", c) for c in MOE_CORRUPTIONS])


@pytest.mark.parametrize("name,corruption", CHECKPOINT_CASES)
@pytest.mark.parametrize("route", ["state_dict", "torch_load", "non_strict"])
def test_corrupt_checkpoint_raises_at_load_and_leaves_module(name, corruption, route):
    module = MODULES[name]()
    table = {**CSR_CORRUPTIONS, **NM_CORRUPTIONS, **MOE_CORRUPTIONS}
    make, names = table[corruption]
    source = MODULES[name]()  # another module of the same configuration: different weights
    sd = dict(source.state_dict())
    sd.update(make(sd, source))
    if route == "torch_load":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=False)
    before = _tensors(module)
    x = _input(name, _width(name), (2,))
    y_before = module(x)
    with pytest.raises(ValueError, match=names):
        module.load_state_dict(sd, strict=route != "non_strict")
    _assert_unchanged(module, before)
    torch.testing.assert_close(module(x), y_before)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_valid_checkpoint_still_loads(name):
    module, source = MODULES[name](), MODULES[name]()
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    module.load_state_dict(torch.load(buf, weights_only=False))
    x = _input(name, _width(name), (2,))
    torch.testing.assert_close(module(x), source(x))


# ---- 5. masks and patterns --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_non_bool_mask_refused(dtype):
    lin = nn.Linear(32, 16)
    mask = (torch.rand(16, 32) > 0.5).to(dtype)
    with pytest.raises(TypeError, match=f"mask must be a bool tensor .*got {dtype}"):
        se.SparseLinear.from_dense(lin, mask=mask)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        se.SparseLinear.from_dense(lin, mask=mask, pattern="2:4")
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        se.SparseConv2d.from_dense(nn.Conv2d(4, 8, 3), mask=torch.rand(8, 4, 3, 3).to(dtype))


@pytest.mark.parametrize("pattern,shape", [("4x1", (10, 32)), ("8x1", (12, 32)), ("1x4", (16, 30)),
                                           ("4x4", (16, 18)), ("3x1", (16, 32))])
def test_block_pattern_that_does_not_tile_raises(pattern, shape):
    with pytest.raises(ValueError, match=f"pattern '{pattern}' needs whole"):
        se.SparseLinear.from_dense(nn.Linear(shape[1], shape[0]), sparsity=0.5, pattern=pattern)


@pytest.mark.parametrize("pattern", ["2x1", "4x1", "8x1", "1x4", "4x4", "16x1"])
def test_module_holds_the_pattern_it_reports(pattern):
    layer = se.SparseLinear.from_dense(nn.Linear(64, 32), sparsity=0.6, pattern=pattern)
    assert layer.pattern == pattern
    rows, cols = (int(v) for v in pattern.split("x"))
    kept = layer.weight_format().to_dense() != 0
    tiles = kept.reshape(32 // rows, rows, 64 // cols, cols)
    assert torch.equal(tiles.any(3).any(1), tiles.all(3).all(1)), "kept entries are not whole tiles"
    assert layer.block_rows == next(b for b in (8, 4, 2, 1) if rows % b == 0)


def test_mask_breaking_the_block_pattern_raises():
    mask = torch.zeros(16, 32, dtype=torch.bool)
    mask[:4, 0] = True
    mask[5, 3] = True   # a lone entry of a 4x1 tile
    with pytest.raises(ValueError, match="rows 4..7, columns 3..3 is partly kept"):
        se.SparseLinear.from_dense(nn.Linear(32, 16), mask=mask, pattern="4x1")
    whole = torch.zeros(16, 32, dtype=torch.bool)
    whole[4:8, 3] = True
    assert se.SparseLinear.from_dense(nn.Linear(32, 16), mask=whole, pattern="4x1").block_rows == 4


def test_sparsify_include_matching_nothing_warns():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    with pytest.warns(UserWarning, match="include='encoder.\\*' matches no Linear or Conv2d"):
        _, report = se.sparsify(model, sparsity=0.5, include="encoder.*")
    assert not report.sparsified


def test_sparsify_twice_lists_the_sparse_layers():
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
    se.sparsify(model, sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = se.sparsify(model, sparsity=0.9)
    assert [r.name for r in report.already_sparse] == ["0", "2"]
    assert not report.sparsified and not report.skipped
    assert all(abs(r.sparsity - 0.5) < 0.01 for r in report.already_sparse)
    assert "already sparse" in str(report)


# ---- 6. NaN / inf: a sparse product -----------------------------------------------------------
@pytest.mark.parametrize("pattern", ["unstructured", "4x1", "2:4", "1:8"])
def test_nan_reaches_only_rows_that_store_its_column(isa, pattern):
    lin = nn.Linear(IN, OUT)
    layer = (se.SparseLinear.from_dense(lin, pattern=pattern) if ":" in pattern else
             se.SparseLinear.from_dense(lin, sparsity=0.8, pattern=pattern))
    fmt = layer.weight_format()
    dense = fmt.to_dense()
    stored = fmt.mask()
    for tokens in (1, 5, 33):
        x = torch.randn(tokens, IN)
        x[0, 7] = float("nan")
        x[-1, IN - 1] = float("inf")
        y = layer(x).detach()
        ref = sparse_product_reference(x, dense, stored, layer.bias.detach())
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), f"NaN positions differ ({tokens})"
        assert torch.equal(torch.isinf(y), torch.isinf(ref))
        finite = torch.isfinite(ref)
        torch.testing.assert_close(y[finite].double(), ref[finite], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1),
                                                       (3, 1, 2, 2), (1, 1, 0, 1)])
def test_conv_nonfinite_matches_sparse_reference(isa, k, stride, padding, dilation):
    """An inf weight next to the zero padding stays finite there (padding is not an input) and a
    NaN pixel reaches only the outputs whose stored taps read it, on every ISA."""
    conv = nn.Conv2d(3, 8, k, stride, padding, dilation)
    layer = se.SparseConv2d.from_dense(conv, sparsity=0.5)
    with torch.no_grad():
        layer.values[::5] = float("inf")
    fmt = layer.weight_format()
    dense = layer.dense_weight()
    stored = fmt.mask().reshape(dense.shape)
    x = torch.rand(2, 3, 9, 11) + 0.1    # positive: inf * x never meets -inf
    x[0, 1, 4, 5] = float("nan")
    y = layer(x).detach()
    ref = sparse_conv_reference(x, dense, stored, (stride,) * 2, (padding,) * 2, (dilation,) * 2,
                                layer.bias.detach())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite].double(), ref[finite], atol=1e-4, rtol=1e-4)


def test_conv_inf_weight_only_in_the_last_stored_value(isa):
    """The kernels decide per call whether a non-finite weight exists (a vector scan with a
    scalar tail): an inf in the last of 27 stored values, whose tap (2, 2) meets the bottom and
    right zero padding, must still keep padding out of the product."""
    conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
    layer = se.SparseConv2d.from_dense(conv, mask=torch.ones(3, 1, 3, 3, dtype=torch.bool))
    with torch.no_grad():
        layer.values[-1] = float("inf")
    dense = layer.dense_weight()
    x = torch.rand(1, 1, 6, 7) + 0.1
    y = layer(x).detach()
    ref = sparse_conv_reference(x, dense, torch.ones_like(dense, dtype=torch.bool), (1, 1),
                                (1, 1), (1, 1))
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and not torch.isnan(ref).any()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))

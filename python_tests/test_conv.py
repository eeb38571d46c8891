"""SparseConv2d and torch.ops.sparse_ext.sparse_conv2d* against F.conv2d on the masked dense weight."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_ext
from sparse_ext import ops
from sparse_ext.formats import CSRWeight

INF = float("inf")


def make_weight(co, ci, kh, kw, density=0.3, R=1, dtype=torch.float32):
    w = torch.randn(co, ci, kh, kw, dtype=dtype)
    keep = torch.rand(co // R, 1, ci * kh * kw) < density
    mask = keep.expand(co // R, R, ci * kh * kw).reshape(co, ci, kh, kw)
    dense = w * mask
    csr = CSRWeight.from_dense(dense.reshape(co, -1), mask.reshape(co, -1), block_rows=R)
    return csr, dense


def _one_isa_on_cuda(isa, device):
    """The CUDA kernels do not depend on the CPU ISA: run each CUDA case once (with "scalar")."""
    if device.type == "cuda" and isa != "scalar":
        pytest.skip("CUDA path does not depend on the CPU ISA")


def reference(x, dense, bias, stride, padding, dilation, activation=None):
    y = F.conv2d(x.double(), dense.double(), None if bias is None else bias.double(), stride,
                 padding, dilation)
    lo, hi = ops.activation_bounds(activation)
    return y.clamp(lo, hi) if (lo, hi) != (-INF, INF) else y


# (ci, co, H, W, k, stride, padding, dilation)
GEOMETRIES = [
    (16, 24, 7, 5, 1, 1, 0, 1),     # 1x1, odd spatial
    (40, 16, 1, 1, 1, 1, 0, 1),     # 1x1 spatial
    (300, 16, 9, 11, 1, 1, 0, 1),   # two column blocks
    (8, 16, 7, 5, 3, 1, 1, 1),
    (8, 16, 9, 11, 3, 2, 1, 1),
    (6, 8, 12, 13, 3, 1, 2, 2),
    (5, 8, 11, 9, 5, 2, 2, 1),
    (3, 8, 15, 15, 7, 2, 3, 1),
    (4, 8, 8, 8, 1, 2, 0, 1),       # strided 1x1 goes through the direct path
    (4, 8, 1, 1, 3, 1, 1, 1),
    (4, 8, 10, 37, 3, (1, 2), (0, 1), (2, 1)),  # rectangular arguments
    (40, 8, 9, 70, 3, 1, 1, 1),     # two column blocks of taps, rows wider than a register tile
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:5])) + f"s{g[5]}p{g[6]}d{g[7]}")
@pytest.mark.parametrize("R", [1, 4, 8])
def test_forward_matches_conv2d(isa, device, geom, R):
    _one_isa_on_cuda(isa, device)
    ci, co, H, W, k, s, p, d = geom
    csr, dense = make_weight(co, ci, k, k, 0.3, R)
    csr, dense = csr.to(device), dense.to(device)
    x = torch.randn(2, ci, H, W).to(device)
    bias = torch.randn(co).to(device)
    for act in (None, "relu6"):
        y = ops.sparse_conv2d(x, csr, bias, k, s, p, d, act)
        ref = reference(x, dense, bias, s, p, d, act)
        assert y.shape == ref.shape and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_activations_layouts_dtypes(isa, device, k, s, p):
    _one_isa_on_cuda(isa, device)
    csr, dense = make_weight(32, 12, k, k, 0.5, 2)
    csr, dense = csr.to(device), dense.to(device)
    x = torch.randn(3, 12, 14, 10).to(device)
    bias = torch.randn(32).to(device)
    for act in ("relu", (-0.5, 0.25), (None, 1.0)):
        ref = reference(x, dense, bias, s, p, 1, act)
        torch.testing.assert_close(ops.sparse_conv2d(x, csr, bias, k, s, p, 1, act).double(), ref,
                                   atol=1e-4, rtol=1e-4)
    # channels_last input (converted) and no bias.
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(ops.sparse_conv2d(xc, csr, None, k, s, p, 1).double(),
                               reference(x, dense, None, s, p, 1), atol=1e-4, rtol=1e-4)
    # bf16 activations computed in fp32, returned in bf16.
    yb = ops.sparse_conv2d(x.bfloat16(), csr, bias, k, s, p, 1)
    assert yb.dtype == torch.bfloat16
    ref = reference(x.bfloat16(), dense, bias, s, p, 1)
    torch_err = (F.conv2d(x.bfloat16(), dense.bfloat16(), bias.bfloat16(), s, p).double() - ref).abs().max()
    assert (yb.double() - ref).abs().max() <= 2 * torch_err + 1e-2


def test_all_zero_and_dense_weights(isa, device):
    _one_isa_on_cuda(isa, device)
    for density in (0.0, 1.0):
        csr, dense = make_weight(16, 8, 3, 3, density, 1)
        pointwise = CSRWeight.from_dense(dense[:, :, :1, :1].reshape(16, 8)).to(device)
        csr, dense = csr.to(device), dense.to(device)
        x = torch.randn(1, 8, 6, 7).to(device)
        torch.testing.assert_close(ops.sparse_conv2d(x, csr, None, 3, 1, 1, 1).double(),
                                   reference(x, dense, None, 1, 1, 1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            ops.sparse_conv2d(x, pointwise, None).double(),
            reference(x, dense[:, :, :1, :1].contiguous(), None, 1, 0, 1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,s,p,d,R", [(1, 1, 0, 1, 1), (1, 1, 0, 1, 2), (3, 2, 1, 1, 1),
                                       (3, 1, 2, 2, 2)])
def test_gradcheck_float64(device, k, s, p, d, R):
    csr, _ = make_weight(4, 3, k, k, 0.5, R, dtype=torch.float64)
    csr = csr.to(device)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).to(device).requires_grad_(True)
    values = csr.values.clone().requires_grad_(True)
    bias = torch.randn(4, dtype=torch.float64).to(device).requires_grad_(True)

    def f(x, values, bias):
        w = CSRWeight(csr.offsets, csr.indices, values, csr.shape, csr.block_rows)
        return ops.sparse_conv2d(x, w, bias, k, s, p, d)

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_activation_backward_matches_torch(device):
    csr, dense = make_weight(6, 4, 3, 3, 0.6, 2, dtype=torch.float64)
    csr, dense = csr.to(device), dense.to(device)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64).to(device).requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    for act, fn in (("relu", F.relu), ("relu6", F.relu6), ((-0.3, 0.4), lambda t: F.hardtanh(t, -0.3, 0.4))):
        values = csr.values.clone().requires_grad_(True)
        w = CSRWeight(csr.offsets, csr.indices, values, csr.shape, 2)
        y = ops.sparse_conv2d(x, w, None, 3, 1, 1, 1, act)
        g = torch.randn_like(y)
        gx, gv = torch.autograd.grad(y, (x, values), g)
        dw = dense.clone().requires_grad_(True)
        yr = fn(F.conv2d(xr, dw, None, 1, 1))
        gxr, gwr = torch.autograd.grad(yr, (xr, dw), g)
        torch.testing.assert_close(gx, gxr)
        row, col = (t.to(device) for t in csr.row_and_col())
        flat = gwr.reshape(6, -1)
        expect = torch.stack([flat[row + r, col] for r in range(2)], 1).reshape(-1)
        torch.testing.assert_close(gv, expect)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (3, 2, 1)])
def test_opcheck(device, k, s, p):
    csr, _ = make_weight(8, 4, k, k, 0.5, 2)
    csr = csr.to(device)
    x = torch.randn(2, 4, 7, 5).to(device).requires_grad_(True)
    values = csr.values.clone().requires_grad_(True)
    bias = torch.randn(8).to(device).requires_grad_(True)
    args = (x, csr.offsets, csr.indices, values, bias, 8, 4, [k, k], [s, s], [p, p], [1, 1], 2, 0.0,
            6.0)
    torch.library.opcheck(torch.ops.sparse_ext.sparse_conv2d.default, args)
    y = torch.ops.sparse_ext.sparse_conv2d(*args)
    g = torch.randn_like(y)
    torch.library.opcheck(torch.ops.sparse_ext.sparse_conv2d_grad_input.default,
                          (g, csr.offsets, csr.indices, csr.values, 8, 4, [7, 5], [k, k], [s, s],
                           [p, p], [1, 1], 2))
    torch.library.opcheck(torch.ops.sparse_ext.sparse_conv2d_grad_values.default,
                          (g, x.detach(), csr.offsets, csr.indices, 8, 4, [k, k], [s, s], [p, p],
                           [1, 1], 2))


# ---- module ---------------------------------------------------------------------------------------
def test_module_from_dense_patterns_and_alias():
    assert sparse_ext.SparseConv is sparse_ext.SparseConv2d
    assert sparse_ext.nn.SparseConv is sparse_ext.SparseConv2d
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 11, 9)
    for kwargs in ({"sparsity": 0.9}, {"sparsity": 0.7, "pattern": "4x1"},
                   {"sparsity": 0.8, "pattern": "8x1", "method": "random"},
                   {"mask": torch.rand(32, 16, 3, 3) > 0.5}):
        m = sparse_ext.SparseConv2d.from_dense(conv, **kwargs)
        ref = F.conv2d(x, m.dense_weight(), m.bias, 2, 1)
        torch.testing.assert_close(m(x), ref, atol=1e-4, rtol=1e-4)
        assert m.to_dense().weight.shape == conv.weight.shape
        torch.testing.assert_close(m.to_dense()(x), ref, atol=1e-4, rtol=1e-4)
    m = sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.9)
    assert abs(m.sparsity - 0.9) < 0.01
    assert m.block_rows == 1
    assert sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.5, pattern="4x1").block_rows == 4
    text = repr(m)
    assert "sparsity=0.900" in text and "weight_bytes=" in text
    # unbatched input, padding='same', fused activation
    c2 = nn.Conv2d(4, 8, 3, padding="same")
    m2 = sparse_ext.SparseConv2d.from_dense(c2, sparsity=0.5, activation="relu")
    xu = torch.randn(4, 6, 5)
    torch.testing.assert_close(m2(xu), F.relu(F.conv2d(xu[None], m2.dense_weight(), m2.bias, 1, 1))[0],
                               atol=1e-5, rtol=1e-5)


def test_module_rejects_unsupported():
    with pytest.raises(ValueError, match="groups=1"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, groups=8), sparsity=0.5)
    with pytest.raises(ValueError, match="padding_mode"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
                                           sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match="activation"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3), sparsity=0.5, activation="gelu")
    with pytest.raises(ValueError, match="mask"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 8, 3), mask=torch.ones(3, 3, dtype=torch.bool))


def test_module_training_state_dict_roundtrip():
    conv = nn.Conv2d(8, 16, 3, padding=1)
    m = sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.8, pattern="2x1", activation="relu6")
    pattern = (m.offsets.clone(), m.indices.clone())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(4, 8, 6, 6)
    before = m.values.detach().clone()
    loss = m(x).square().mean()
    loss.backward()
    assert m.values.grad is not None and m.bias.grad is not None
    opt.step()
    assert not torch.equal(before, m.values.detach())
    assert torch.equal(pattern[0], m.offsets) and torch.equal(pattern[1], m.indices)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.3, pattern="2x1")
    other.load_state_dict(torch.load(buf))
    assert other.activation == "relu6"
    torch.testing.assert_close(other(x), m(x))
    with pytest.raises(ValueError, match="state_dict"):
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 16, 5), sparsity=0.5).load_state_dict(m.state_dict())


def test_torch_compile_fullgraph():
    model = nn.Sequential(
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(3, 8, 3, stride=2, padding=1), sparsity=0.5,
                                           activation="relu"),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise stays dense
        sparse_ext.SparseConv2d.from_dense(nn.Conv2d(8, 16, 1), sparsity=0.9, activation="relu6"),
    )
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_fold_batchnorm_and_fuse_activations():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 4, 9, 9)
    ref = model(x)
    sparse_ext.fold_batchnorm(model)
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5)
    model[3] = sparse_ext.SparseConv2d.from_dense(model[3], mask=torch.ones(8, 8, 1, 1, dtype=torch.bool))
    model[0] = sparse_ext.SparseConv2d.from_dense(model[0], mask=torch.ones(8, 4, 3, 3, dtype=torch.bool))
    sparse_ext.fuse_activations(model)
    assert model[0].activation == "relu6" and model[3].activation == "relu"
    assert isinstance(model[2], nn.Identity) and isinstance(model[5], nn.Identity)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)


# ---- bad input ------------------------------------------------------------------------------------
def test_malformed_metadata_and_arguments_raise(device):
    csr, _ = make_weight(8, 4, 3, 3, 0.5, 1)
    x = torch.randn(1, 4, 6, 6)
    op = torch.ops.sparse_ext.sparse_conv2d

    def call(x=x, offsets=csr.offsets, indices=csr.indices, values=csr.values, bias=None, co=8,
             k=(3, 3), s=(1, 1), p=(1, 1), d=(1, 1), R=1, lo=-INF, hi=INF):
        x, offsets, indices, values = (t.to(device) for t in (x, offsets, indices, values))
        bias = None if bias is None else bias.to(device)
        return op(x, offsets, indices, values, bias, co, x.shape[1] if x.dim() == 4 else 4, list(k),
                  list(s), list(p), list(d), R, lo, hi)

    call()
    bad = csr.offsets.clone()
    bad[2], bad[3] = bad[3].item() + 5, bad[2].item()
    with pytest.raises(RuntimeError, match="offsets"):
        call(offsets=bad)
    idx = csr.indices.clone()
    idx[-1] = 200  # K = 36 columns
    with pytest.raises(RuntimeError, match="out of range"):
        call(indices=idx)
    with pytest.raises(RuntimeError, match="values must have length"):
        call(values=csr.values[:-1].contiguous())
    with pytest.raises(RuntimeError, match="offsets must have length"):
        call(co=16)
    with pytest.raises(RuntimeError, match="indices must have dtype"):
        call(indices=csr.indices.int())
    with pytest.raises(RuntimeError, match="block_rows"):
        call(R=3)
    with pytest.raises(RuntimeError, match="4-D"):
        call(x=x[0])
    with pytest.raises(RuntimeError, match="offsets must have length"):
        call(x=torch.randn(1, 300, 6, 6))  # in_channels do not match the weight's columns
    with pytest.raises(RuntimeError, match="x has 5 channels, this weight expects in_channels=4"):
        ops.sparse_conv2d(torch.randn(1, 5, 6, 6, device=device), csr.to(device), None, 3, 1, 1)
    with pytest.raises(RuntimeError, match="kernel_size"):
        op(x.to(device), csr.offsets.to(device), csr.indices.to(device), csr.values.to(device),
           None, 8, 4, [3], [1, 1], [1, 1], [1, 1], 1, -INF, INF)
    with pytest.raises(RuntimeError, match="stride"):
        call(s=(0, 1))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        call(p=(0, 0), d=(4, 4))
    with pytest.raises(RuntimeError, match="out_min <= out_max"):
        call(lo=1.0, hi=0.0)
    with pytest.raises(RuntimeError, match="bias"):
        call(bias=torch.randn(7))
    with pytest.raises(RuntimeError, match="float64"):
        call(x=x.double())
    with pytest.raises(RuntimeError, match="grad_out must be"):
        torch.ops.sparse_ext.sparse_conv2d_grad_input(
            torch.randn(1, 8, 5, 5, device=device), csr.offsets.to(device), csr.indices.to(device),
            csr.values.to(device), 8, 4, [6, 6], [3, 3], [1, 1], [1, 1], [1, 1], 1)
    if device.type == "cuda":
        with pytest.raises(RuntimeError, match="offsets must be on x's device"):
            op(x.to(device), csr.offsets, csr.indices.to(device), csr.values.to(device), None, 8,
               4, [3, 3], [1, 1], [1, 1], [1, 1], 1, -INF, INF)
        with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
            op(x, csr.offsets.to(device), csr.indices.to(device), csr.values.to(device), None, 8,
               4, [3, 3], [1, 1], [1, 1], [1, 1], 1, -INF, INF)


@pytest.mark.parametrize("k,s,p,d", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 4, 2)])
@pytest.mark.parametrize("R", [1, 2, 8])
def test_device_ops_match_cpu(device, k, s, p, d, R):
    """Forward (fp32 and fp16), input and values gradients on the device against the CPU ops."""
    if device.type != "cuda":
        pytest.skip("compares a device against the CPU")
    csr, dense = make_weight(16, 12, k, k, 0.3, R)
    dev = csr.to(device)
    x = torch.randn(2, 12, 13, 11)
    bias = torch.randn(16)
    y_cpu = ops.sparse_conv2d(x, csr, bias, k, s, p, d, "relu6")
    y_dev = ops.sparse_conv2d(x.to(device), dev, bias.to(device), k, s, p, d, "relu6")
    torch.testing.assert_close(y_dev.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    # float16 within twice PyTorch's own fp16 error against the float64 reference.
    ref = reference(x, dense, bias, s, p, d)
    yh = ops.sparse_conv2d(x.to(device).half(), dev.to(device, torch.float16), bias.to(device).half(),
                           k, s, p, d)
    assert yh.dtype == torch.float16
    torch_h = F.conv2d(x.to(device).half(), dense.to(device).half(), bias.to(device).half(), s, p, d)
    torch_err = (torch_h.double().cpu() - ref).abs().max()
    assert (yh.double().cpu() - ref).abs().max() <= 2 * torch_err + 1e-2
    g = torch.randn_like(y_cpu)
    args = ([k, k], [s, s], [p, p], [d, d], R)
    gi_cpu = torch.ops.sparse_ext.sparse_conv2d_grad_input(g, csr.offsets, csr.indices, csr.values,
                                                           16, 12, [13, 11], *args)
    gi_dev = torch.ops.sparse_ext.sparse_conv2d_grad_input(g.to(device), dev.offsets, dev.indices,
                                                           dev.values, 16, 12, [13, 11], *args)
    torch.testing.assert_close(gi_dev.cpu(), gi_cpu, atol=1e-4, rtol=1e-4)
    gv_cpu = torch.ops.sparse_ext.sparse_conv2d_grad_values(g, x, csr.offsets, csr.indices, 16, 12,
                                                            *args)
    gv_dev = torch.ops.sparse_ext.sparse_conv2d_grad_values(g.to(device), x.to(device), dev.offsets,
                                                            dev.indices, 16, 12, *args)
    assert gv_dev.dtype == torch.float32
    torch.testing.assert_close(gv_dev.cpu(), gv_cpu, atol=1e-3, rtol=1e-4)


def test_module_on_device_trains(device):
    """SparseConv2d after .to(device): forward against a float64 conv, backward, optimizer step."""
    if device.type != "cuda":
        pytest.skip("the CPU module is covered by the tests above")
    for k, s, p in ((3, 2, 1), (1, 1, 0)):
        conv = nn.Conv2d(16, 32, k, stride=s, padding=p)
        m = sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.8, pattern="4x1",
                                               activation="relu").to(device)
        x = torch.randn(2, 16, 12, 9, device=device, requires_grad=True)
        y = m(x)
        ref = F.relu(F.conv2d(x.double(), m.dense_weight().double(), m.bias.double(), s, p))
        torch.testing.assert_close(y.double(), ref, atol=1e-4, rtol=1e-4)
        y.square().sum().backward()
        assert x.grad.device == x.device and m.values.grad.device == x.device
        xr = x.detach().double().requires_grad_(True)
        F.relu(F.conv2d(xr, m.dense_weight().double(), m.bias.double(), s, p)).square().sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-3, rtol=1e-3)


def test_registry_covers_every_block_rows():
    # Which ukernels each ISA registers is checked with the other registries in test_build.py.
    assert {r[1] for r in sparse_ext._C.conv_registry()} == {1, 2, 4, 8}


def test_streaming_store_path(isa):
    # Outputs of at least conv_stream_mb use non-temporal stores; force them on small ones.
    with sparse_ext.config.override(conv_stream_mb=0):
        _check_streaming_outputs()


def _check_streaming_outputs():
    for hw in ((8, 8), (7, 5), (16, 20)):
        csr, dense = make_weight(16, 24, 1, 1, 0.3, 1)
        x = torch.randn(2, 24, *hw)
        bias = torch.randn(16)
        torch.testing.assert_close(ops.sparse_conv2d(x, csr, bias, activation="relu").double(),
                                   reference(x, dense, bias, 1, 0, 1, "relu"), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,p,d,R,hw", [(3, 1, 1, 1, (9, 11)), (3, 0, 1, 2, (8, 8)),
                                        (5, 2, 1, 4, (7, 13)), (3, 2, 2, 8, (12, 9)),
                                        (2, 1, 1, 1, (6, 7)), (3, 1, 1, 1, (1, 1)),
                                        (3, 3, 1, 1, (6, 6))])
def test_stride1_input_gradient_through_the_forward_kernels(isa, k, p, d, R, hw):
    """fp32 input gradients of stride-1 convs run as a forward conv of grad_out with the flipped,
    transposed weight (the tier's kxk ukernels); padding past the dilated kernel's reach (the
    last case) keeps the reference loop. Both must equal the float64 reference."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, k, padding=p, dilation=d)
    pattern = "unstructured" if R == 1 else f"{R}x1"
    w = sparse_ext.SparseConv2d.from_dense(conv, sparsity=0.7, pattern=pattern).weight_format()
    with torch.no_grad():
        w.values[0] = float("inf")  # must not meet a pixel outside the image
    out = [(hw[i] + 2 * p - d * (k - 1)) for i in range(2)]
    g = torch.randn(2, 24, *out)
    args = (24, 16, list(hw), [k, k], [1, 1], [p, p], [d, d], R)
    got = torch.ops.sparse_ext.sparse_conv2d_grad_input(g, w.offsets, w.indices, w.values, *args)
    ref = torch.ops.sparse_ext.sparse_conv2d_grad_input(g.double(), w.offsets, w.indices,
                                                         w.values.double(), *args)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)

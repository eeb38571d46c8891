"""SpMM family: kernels vs a dense masked reference, autograd, opcheck, compile, bad input."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparse_ext as se
from reference import assert_close_to_reference, linear_reference, max_abs_err, tile_tail_counts

SHAPES = [  # (out, in, leading dims of x)
    (7, 33, (1,)),
    (8, 256, (3,)),
    (16, 300, (2, 5)),
    (24, 513, (37,)),
    (64, 1000, (1, 1)),
    (32, 70, (70,)),
]


def _make(out_f, in_f, sparsity, pattern="unstructured", dtype=torch.float32, bias=True,
          device="cpu"):
    lin = nn.Linear(in_f, out_f, bias=bias)
    sl = se.SparseLinear.from_dense(lin, sparsity=sparsity, pattern=pattern)
    return sl.to(device=device, dtype=dtype)


def _one_isa_on_cuda(isa, device):
    """The CUDA kernels do not depend on the CPU ISA: run each CUDA case once (with "scalar")."""
    if device.type == "cuda" and isa != "scalar":
        pytest.skip("CUDA path does not depend on the CPU ISA")


@pytest.mark.parametrize("out_f,in_f,lead", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_matches_dense_reference(isa, device, out_f, in_f, lead, sparsity):
    _one_isa_on_cuda(isa, device)
    sl = _make(out_f, in_f, sparsity, device=device)
    x = torch.randn(*lead, in_f).to(device)
    dense = sl.weight_format().to_dense()
    with torch.no_grad():
        y = sl(x)
    assert y.shape == (*lead, out_f)
    assert_close_to_reference(y, linear_reference(x, dense, sl.bias))


@pytest.mark.parametrize("pattern", ["2x1", "4x1", "8x1", "4x4", "1x4", "3x1", "6x1"])
@pytest.mark.parametrize("tokens", [1, 5, 40, 8, 9, 300])
def test_block_patterns(isa, device, pattern, tokens):
    _one_isa_on_cuda(isa, device)
    M, K = 48, 300  # every block of the list tiles it
    sl = _make(M, K, 0.8, pattern, device=device)
    x = torch.randn(tokens, K).to(device)
    dense = sl.weight_format().to_dense()
    R, C = (int(v) for v in pattern.split("x"))
    assert sl.block_rows == next(b for b in (8, 4, 2, 1) if R % b == 0)
    # The kept pattern really is made of whole R x C tiles.
    tiles = (dense != 0).reshape(M // R, R, K // C, C).cpu()
    assert torch.equal(tiles.any(3).any(1), tiles.all(3).all(1))
    with torch.no_grad():
        assert_close_to_reference(sl(x), linear_reference(x, dense, sl.bias))


def test_empty_rows_and_columns(isa, device):
    _one_isa_on_cuda(isa, device)
    lin = nn.Linear(40, 16)
    mask = torch.zeros(16, 40, dtype=torch.bool)
    mask[3, 5] = mask[3, 39] = mask[9, :] = True
    sl = se.SparseLinear.from_dense(lin, mask=mask).to(device)
    lin = lin.to(device)
    mask = mask.to(device)
    for tokens in (1, 9):
        x = torch.randn(tokens, 40).to(device)
        with torch.no_grad():
            y = sl(x)
        assert_close_to_reference(y, linear_reference(x, lin.weight * mask, lin.bias))


def test_noncontiguous_input(isa, device):
    _one_isa_on_cuda(isa, device)
    sl = _make(16, 64, 0.7, device=device)
    x = torch.randn(64, 10).to(device).t()  # [10, 64], not contiguous
    assert not x.is_contiguous()
    with torch.no_grad():
        assert_close_to_reference(sl(x), linear_reference(x, sl.weight_format().to_dense(), sl.bias))


@pytest.mark.parametrize("tokens", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bf16_within_twice_torch_error(isa, device, tokens, dtype):
    _one_isa_on_cuda(isa, device)
    if dtype == torch.float16 and device.type != "cuda":
        pytest.skip("float16 is a CUDA dtype")
    lin = nn.Linear(512, 96)
    sl = se.SparseLinear.from_dense(lin, sparsity=0.7).to(device=device, dtype=dtype)
    dense_bf16 = sl.weight_format().to_dense()  # bf16 (or fp16)
    x = torch.randn(tokens, 512).to(device=device, dtype=dtype)
    ref = linear_reference(x, dense_bf16, sl.bias)
    torch_bf16 = F.linear(x, dense_bf16, sl.bias)
    with torch.no_grad():
        ours = sl(x)
    assert ours.dtype == dtype
    assert_close_to_reference(ours, ref, torch_same_dtype=torch_bf16, floor=1e-2)


def test_bf16_weights_fp32_activations(isa, device):
    _one_isa_on_cuda(isa, device)
    lin = nn.Linear(300, 32)
    csr = se.CSRWeight.from_dense(lin.weight.detach().bfloat16(), lin.weight.abs() > 0.03)
    csr = csr.to(device)
    x = torch.randn(6, 300).to(device)
    y = se.ops.spmm(x, csr)
    assert y.dtype == torch.float32
    assert_close_to_reference(y, linear_reference(x, csr.to_dense().float()))


def test_isa_paths_agree():
    if len(se.supported_isas()) < 2:
        pytest.skip("one ISA only")
    sl = _make(64, 700, 0.9)
    x = torch.randn(20, 700)
    outs = []
    for name in se.supported_isas():
        with se.use_isa(name), torch.no_grad():
            outs.append(sl(x))
    for o in outs[1:]:
        assert max_abs_err(o, outs[0]) < 1e-4


def test_zero_tokens_and_zero_features(device):
    sl = _make(8, 16, 0.5, device=device)
    assert sl(torch.randn(0, 16, device=device)).shape == (0, 8)
    empty = se.CSRWeight.from_dense(torch.zeros(0, 16)).to(device)
    assert se.ops.spmm(torch.randn(3, 16, device=device), empty).shape == (3, 0)


# ---- autograd ----------------------------------------------------------------------------------
@pytest.mark.parametrize("block_rows", [1, 4])
def test_gradcheck_float64(device, block_rows):
    w = torch.randn(8, 300, dtype=torch.float64)
    mask = torch.rand(8, 300) < 0.3
    csr = se.CSRWeight.from_dense(w, mask, block_rows=block_rows).to(device)
    values = csr.values.clone().requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(2, 3, 300, dtype=torch.float64, device=device, requires_grad=True)

    def fn(x, values, bias):
        return torch.ops.sparse_ext.spmm(x, csr.offsets, csr.indices, values, bias, 8, 300,
                                         block_rows)

    assert torch.autograd.gradcheck(fn, (x, values, bias))


def test_training_grads_match_dense(isa, device):
    _one_isa_on_cuda(isa, device)
    lin = nn.Linear(300, 24)
    sl = se.SparseLinear.from_dense(lin, sparsity=0.6).to(device)
    dense = sl.to_dense()
    mask = dense.weight.detach() != 0
    x = torch.randn(4, 7, 300).to(device).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    sl(x).square().sum().backward()
    dense(x2).square().sum().backward()
    assert max_abs_err(x.grad, x2.grad) < 1e-3
    assert max_abs_err(sl.bias.grad, dense.bias.grad) < 1e-3
    # Kept values get exactly the dense gradient at their positions.
    grad_dense = sl.weight_format().to_dense().clone()
    row, col = sl.weight_format().row_and_col()
    g = torch.zeros_like(grad_dense)
    g[row.to(device), col.to(device)] = sl.values.grad
    assert max_abs_err(g[mask], dense.weight.grad[mask]) < 1e-3


def _spmm_tail_counts():
    names = [n for row in se._C.spmm_registry() if row[0] in se.supported_isas() for n in row[3:]]
    return tile_tail_counts(names)


@pytest.mark.parametrize("R", [1, 4, 8])
@pytest.mark.parametrize("tokens", _spmm_tail_counts())
def test_gradients_at_every_tile_tail(isa, R, tokens):
    """Forward, input gradient and values gradient (the SDDMM) for token counts that end in every
    tail of every registered tile, against float64 dense autograd at the stored positions."""
    lin = nn.Linear(300, 16)
    sl = se.SparseLinear.from_dense(lin, sparsity=0.6, pattern=f"{R}x1" if R > 1 else "unstructured")
    dense = sl.weight_format().to_dense().detach().double().requires_grad_()
    stored = sl.weight_format().mask()
    x = torch.randn(tokens, 300, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    gy = torch.randn(tokens, 16)
    y = sl(x)
    y.backward(gy)
    ref = F.linear(x64, dense, sl.bias.detach().double())
    ref.backward(gy.double())
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= 1e-5 * scale
    assert (x.grad.double() - x64.grad).abs().max().item() <= 1e-5 * x64.grad.abs().max().item()
    g = torch.zeros(16, 300, dtype=torch.float64)
    row, col = sl.weight_format().row_and_col()
    vals = sl.values.grad.double().reshape(-1, R)
    for r in range(R):
        g[row + r, col] = vals[:, r]
    want = dense.grad[stored]
    assert (g[stored] - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_training_step_keeps_pattern():
    sl = _make(16, 64, 0.75)
    before = sl.weight_format().to_dense() != 0
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        sl(torch.randn(5, 64)).sum().backward()
        opt.step()
    after = sl.weight_format().to_dense() != 0
    assert not (after & ~before).any()


# ---- registration: opcheck and compile ----------------------------------------------------------
def _op_samples():
    w = torch.randn(16, 300)
    csr = se.CSRWeight.from_dense(w, torch.rand(16, 300) < 0.3)
    csr4 = se.CSRWeight.from_dense(w, torch.rand(16, 300) < 0.3, block_rows=4)
    for c, R in ((csr, 1), (csr4, 4)):
        for x in (torch.randn(5, 300), torch.randn(1, 300), torch.randn(2, 3, 300),
                  torch.randn(20, 300)):
            yield "spmm", (x, c.offsets, c.indices, c.values.clone().requires_grad_(),
                           torch.randn(16, requires_grad=True), 16, 300, R)
        yield "spmm_transpose_structure", (c.offsets, c.indices, 16, 300, R)
        yield "spmm_sddmm", (torch.randn(4, 16), torch.randn(4, 300), c.offsets, c.indices, 16,
                             300, R)


def _to_device(args, device):
    return tuple(a.detach().to(device).requires_grad_(a.requires_grad)
                 if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name,args", list(_op_samples()))
def test_opcheck(device, name, args):
    torch.library.opcheck(getattr(torch.ops.sparse_ext, name).default, _to_device(args, device))


def test_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    model[0] = se.SparseLinear.from_dense(model[0], sparsity=0.8)
    model[2] = se.SparseLinear.from_dense(model[2], sparsity=0.5, pattern="4x1")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert max_abs_err(compiled(x), model(x)) < 1e-5


# ---- module behaviour ------------------------------------------------------------------------
def test_state_dict_round_trip_and_save():
    sl = _make(16, 64, 0.7)
    other = _make(16, 64, 0.3)  # different nnz: loading must adopt the saved sizes
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(other(x), sl(x))


def test_to_dense_and_dtype_and_repr():
    lin = nn.Linear(64, 16)
    sl = se.SparseLinear.from_dense(lin, sparsity=0.9)
    back = sl.to_dense()
    assert isinstance(back, nn.Linear)
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert max_abs_err(back(x), sl(x)) < 1e-5
    text = repr(sl)
    assert "sparsity=0.900" in text and "weight_bytes=" in text
    bf = sl.to(torch.bfloat16)
    assert bf.values.dtype == torch.bfloat16 and bf.offsets.dtype == torch.int32


def test_weight_bytes_at_90_percent():
    lin = nn.Linear(4096, 512, bias=False)
    sl = se.SparseLinear.from_dense(lin, sparsity=0.9)
    assert sl.weight_nbytes <= 0.16 * 4096 * 512 * 4


def test_magnitude_and_random_masks():
    w = torch.randn(32, 64)
    m = se.magnitude_mask(w, 0.75)
    assert m.sum() == 512
    assert w.abs()[m].min() >= w.abs()[~m].max()
    r = se.random_mask(w, 0.5, generator=torch.Generator().manual_seed(1))
    assert r.sum() == 1024
    b = se.block_mask(w, 0.5, (4, 2))
    tiles = b.reshape(8, 4, 32, 2).permute(0, 2, 1, 3).reshape(8, 32, 8)
    assert ((tiles.all(-1)) | (~tiles.any(-1))).all()


# ---- bad input ------------------------------------------------------------------------------------
def _raw(**over):
    csr = se.CSRWeight.from_dense(torch.randn(8, 300), torch.rand(8, 300) < 0.5)
    args = dict(x=torch.randn(3, 300), offsets=csr.offsets.clone(), indices=csr.indices.clone(),
                values=csr.values.clone(), bias=None, out_features=8, in_features=300,
                block_rows=1)
    args.update(over)
    return args


@pytest.mark.parametrize("case,match", [
    ("offsets_decreasing", "must not decrease"),
    ("offsets_start", "offsets\\[0\\]"),
    ("offsets_end", "offsets\\[-1\\]"),
    ("offsets_len", "offsets must have length"),
    ("index_past_k", "column index out of range"),
    ("values_len", "values must have length"),
    ("values_dtype", "values must have dtype"),
    ("offsets_dtype", "offsets must have dtype"),
    ("x_dtype", "x must have dtype"),
    ("bias_len", "bias must have length"),
    ("block_rows", "block_rows must be"),
    ("out_features_neg", "out_features must be in \\[0, 2\\^31 - 1\\]"),
    ("x_width", "x has 299 features, this weight expects in_features=300"),
    ("x_scalar", "at least one dimension"),
    ("mixed_f64", "float64 needs both"),
])
def test_bad_input_raises(device, case, match):
    a = _raw()
    if case == "offsets_decreasing":
        a["offsets"][2], a["offsets"][3] = a["offsets"][3].item() + 5, a["offsets"][2].item()
    elif case == "offsets_start":
        a["offsets"][0] = 1
    elif case == "offsets_end":
        a["offsets"][-1] += 1
    elif case == "offsets_len":
        a["offsets"] = a["offsets"][:-1]
    elif case == "index_past_k":
        # last segment of the last row lives in the partial block (columns 256..299)
        j = int(a["offsets"][-2])
        a["indices"][j] = 200
    elif case == "values_len":
        a["values"] = a["values"][:-1]
    elif case == "values_dtype":
        # float16 values are valid on CUDA (fp16 is in the CUDA contract): use an integer dtype.
        a["values"] = a["values"].half() if device.type == "cpu" else a["values"].int()
    elif case == "offsets_dtype":
        a["offsets"] = a["offsets"].long()
    elif case == "x_dtype":
        a["x"] = a["x"].int()
    elif case == "bias_len":
        a["bias"] = torch.randn(7)
    elif case == "block_rows":
        a["block_rows"] = 3
    elif case == "out_features_neg":
        a["out_features"] = -8
    elif case == "x_width":
        a["x"] = a["x"][:, :-1]
    elif case == "x_scalar":
        a["x"] = torch.tensor(1.0)
    elif case == "mixed_f64":
        a["x"] = a["x"].double()
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparse_ext.spmm(**a)


@pytest.mark.parametrize("case", ["offsets", "indices", "values", "bias", "x"])
def test_wrong_device_raises(device, case):
    if device.type != "cuda":
        pytest.skip("needs a second device type")
    a = _raw(bias=torch.randn(8))
    a = {k: v.to(device) if isinstance(v, torch.Tensor) and k != case else v for k, v in a.items()}
    match = "x must be a CUDA tensor" if case == "x" else f"{case} must be on x's device"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparse_ext.spmm(**a)


def test_structure_revalidated_after_in_place_edit(device):
    # The CUDA op validates a structure once per tensor version; an in-place edit must be caught.
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _raw().items()}
    torch.ops.sparse_ext.spmm(**a)
    torch.ops.sparse_ext.spmm(**a)
    a["offsets"][0] = 1
    with pytest.raises(RuntimeError, match="offsets\\[0\\]"):
        torch.ops.sparse_ext.spmm(**a)
    a["offsets"][0] = 0
    torch.ops.sparse_ext.spmm(**a)


@pytest.mark.parametrize("R", [1, 2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 7, 8, 9, 64, 131])
def test_device_ops_match_cpu(device, R, tokens):
    """The three ops on the device against the CPU ops (identical structure, close values)."""
    if device.type != "cuda":
        pytest.skip("compares a device against the CPU")
    M, K = 64, 700
    w = torch.randn(M, K)
    csr = se.CSRWeight.from_dense(w, torch.rand(M, K) < 0.2, block_rows=R)
    dev = csr.to(device)
    x = torch.randn(tokens, K)
    bias = torch.randn(M)
    y_cpu = se.ops.spmm(x, csr, bias)
    y_dev = se.ops.spmm(x.to(device), dev, bias.to(device))
    assert max_abs_err(y_dev.cpu(), y_cpu) < 1e-4
    for got, want in zip(torch.ops.sparse_ext.spmm_transpose_structure(dev.offsets, dev.indices, M, K, R),
                         torch.ops.sparse_ext.spmm_transpose_structure(csr.offsets, csr.indices, M, K, R)):
        assert torch.equal(got.cpu(), want)
    dy = torch.randn(tokens, M)
    dv_cpu = torch.ops.sparse_ext.spmm_sddmm(dy, x, csr.offsets, csr.indices, M, K, R)
    dv_dev = torch.ops.sparse_ext.spmm_sddmm(dy.to(device), x.to(device), dev.offsets, dev.indices,
                                             M, K, R)
    assert dv_dev.dtype == torch.float32
    assert max_abs_err(dv_dev.cpu(), dv_cpu) < 1e-3


def test_module_to_device_trains(device):
    """SparseLinear after .to(device): forward, backward and an optimizer step stay on the device."""
    sl = _make(32, 300, 0.8, "4x1", device=device)
    x = torch.randn(3, 20, 300, device=device)
    with torch.no_grad():
        assert_close_to_reference(sl(x), linear_reference(x, sl.weight_format().to_dense(), sl.bias))
    before = sl.weight_format().to_dense() != 0
    sl(x).square().sum().backward()
    assert sl.values.grad.device == x.device and sl.bias.grad.device == x.device
    torch.optim.SGD(sl.parameters(), lr=0.1).step()
    assert not ((sl.weight_format().to_dense() != 0) & ~before).any()

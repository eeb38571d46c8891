"""N:M semi-structured sparsity: format, ops, autograd, module, bad input."""
import io

import pytest
import torch
import torch.nn.functional as F

import sparse_ext as se
from sparse_ext.formats import NMWeight, nm_pack_indices, nm_unpack_indices
from reference import assert_close_to_reference, linear_reference

PATTERNS = [(2, 4), (1, 4), (3, 4), (2, 8), (1, 8), (4, 16), (1, 16)]
_lib = torch.ops.sparse_ext


@pytest.fixture
def nm_cuda_path():
    """Forces the CUDA N:M forward path for one test: ``nm_cuda_path("cores")``; the setting is
    restored afterwards."""
    previous = se.config.get("nm_cuda_path")
    yield lambda path: se.config.set("nm_cuda_path", path)
    se.config.set("nm_cuda_path", previous)


def _nm(out_f, in_f, n, m, dtype=torch.float32, device="cpu"):
    w = torch.randn(out_f, in_f, dtype=torch.float32)
    return NMWeight.from_dense(w, n, m).to(device=device, dtype=dtype)


def _one_isa_on_cuda(isa, device):
    """Tests that take both ``isa`` and ``device`` run their CUDA case once (ISAs are CPU paths)."""
    if device.type == "cuda" and isa != "scalar":
        pytest.skip("CPU ISA paths do not apply on CUDA; the CUDA case runs with isa=scalar")


# ---- format -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("in_f", [1, 3, 16, 33, 100])
def test_from_dense_keeps_n_largest(n, m, in_f):
    w = torch.randn(7, in_f)
    nm = NMWeight.from_dense(w, n, m).validate()
    dense = nm.to_dense()
    G = -(-in_f // m)
    assert nm.values.shape == (7, G * n)
    assert nm.metadata.dtype == torch.uint8
    assert nm.metadata.shape == (7, (G * n * {4: 2, 8: 3, 16: 4}[m] + 7) // 8)
    # every kept entry equals the original, every group keeps min(n, its width) entries
    kept = dense != 0
    assert torch.equal(dense[kept], w[kept])
    pad = torch.zeros(7, G * m)
    pad[:, :in_f] = w.abs()
    groups = pad.reshape(7, G, m)
    mask = torch.zeros(7, G * m, dtype=torch.bool)
    mask[:, :in_f] = kept
    mask = mask.reshape(7, G, m)
    widths = torch.tensor([min(m, in_f - g * m) for g in range(G)])
    assert torch.equal(mask.sum(-1), torch.minimum(widths, torch.tensor(n)).expand(7, G))
    # the kept ones are the largest: smallest kept >= largest dropped in each group
    kept_min = torch.where(mask, groups, torch.full_like(groups, float("inf"))).amin(-1)
    real = torch.arange(G * m).reshape(G, m) < in_f
    dropped = torch.where(~mask & real, groups, torch.full_like(groups, -1.0)).amax(-1)
    assert bool((kept_min >= dropped).all())
    assert torch.equal(nm.mask(), kept)


def test_pack_unpack_roundtrip():
    for m in (4, 8, 16):
        idx = torch.randint(0, m, (5, 37))
        assert torch.equal(nm_unpack_indices(nm_pack_indices(idx, m), 37, m), idx)


def test_from_dense_mask_and_rejection():
    w = torch.randn(4, 10)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, 0] = True
    mask[1, 5] = True
    mask[2, 9] = True
    nm = NMWeight.from_dense(w, 2, 4, mask=mask).validate()
    assert torch.equal(nm.to_dense(), w * mask)
    bad = mask.clone()
    bad[3, 0:3] = True
    with pytest.raises(ValueError, match=r"breaks the 2:4 pattern: row 3, group 0"):
        NMWeight.from_dense(w, 2, 4, mask=bad)
    with pytest.raises(ValueError, match="mask must have shape"):
        NMWeight.from_dense(w, 2, 4, mask=mask[:, :5])


def test_nm_mask_builder():
    w = torch.randn(6, 3, 5)  # conv-like weight, flattened to [6, 15]
    mask = se.nm_mask(w, 2, 4)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    flat = torch.zeros(6, 16, dtype=torch.bool)
    flat[:, :15] = mask.reshape(6, 15)
    assert bool((flat.reshape(6, 4, 4).sum(-1) <= 2).all())
    lin = torch.randn(8, 64)
    m2 = se.nm_mask(lin, 1, 8)
    nm = NMWeight.from_dense(lin, 1, 8, mask=m2)
    assert torch.equal(nm.to_dense(), NMWeight.from_dense(lin, 1, 8).to_dense())


@pytest.mark.parametrize("bad_n,bad_m", [(0, 4), (4, 4), (2, 6), (1, 32)])
def test_bad_pattern(bad_n, bad_m):
    with pytest.raises(ValueError):
        NMWeight.from_dense(torch.randn(4, 8), bad_n, bad_m)
    with pytest.raises((RuntimeError, ValueError), match="must"):
        _lib.nm_linear(torch.randn(2, 8), torch.randn(4, 4), torch.zeros(4, 1, dtype=torch.uint8),
                       None, 8, bad_n, bad_m)


def test_nbytes_2_4():
    nm = _nm(256, 512, 2, 4)
    assert nm.nbytes == 256 * 256 * 4 + 256 * 64
    assert nm.nbytes / nm.dense_nbytes() <= 0.57
    assert nm.to(dtype=torch.bfloat16).nbytes / nm.dense_nbytes() <= 0.29


# ---- forward against the dense masked reference -------------------------------------------------
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("in_f", [7, 33, 64, 300])
@pytest.mark.parametrize("tokens", [1, 5, 17, 40, 70])
def test_forward_matches_reference(isa, device, n, m, in_f, tokens):
    _one_isa_on_cuda(isa, device)
    out_f = 24
    nm = _nm(out_f, in_f, n, m, device=device)
    x = torch.randn(tokens, in_f, device=device)
    bias = torch.randn(out_f, device=device)
    y = se.ops.nm_linear(x, nm, bias)
    assert_close_to_reference(y, linear_reference(x, nm.to_dense(), bias))


@pytest.mark.parametrize("shape", [(2, 3, 40), (40,), (1, 1, 40), (0, 40)])
def test_forward_batch_dims(isa, device, shape):
    _one_isa_on_cuda(isa, device)
    nm = _nm(9, 40, 2, 4, device=device)
    x = torch.randn(*shape, device=device)
    y = se.ops.nm_linear(x, nm)
    assert y.shape == (*shape[:-1], 9)
    assert_close_to_reference(y, linear_reference(x, nm.to_dense()))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 16)])
@pytest.mark.parametrize("tokens", [1, 16, 33])
def test_forward_bf16(isa, device, n, m, tokens):
    _one_isa_on_cuda(isa, device)
    nm32 = _nm(48, 96, n, m, device=device)
    # float16 is part of the contract on CUDA only
    for dtype in (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.bfloat16,):
        nm = nm32.to(dtype=dtype)
        x = torch.randn(tokens, 96, device=device).to(dtype)
        ref = linear_reference(x, nm.to_dense())
        torch_same = F.linear(x, nm.to_dense())
        y = se.ops.nm_linear(x, nm)
        assert y.dtype == dtype
        assert_close_to_reference(y, ref, torch_same)
        # reduced-precision weights with fp32 activations compute in fp32
        xf = x.float()
        assert_close_to_reference(se.ops.nm_linear(xf, nm), linear_reference(xf, nm.to_dense()))


def test_isas_agree():
    nm = _nm(40, 200, 2, 8)
    x = torch.randn(37, 200)
    outs = {}
    for isa in se.supported_isas():
        with se.use_isa(isa):
            outs[isa] = se.ops.nm_linear(x, nm)
    ref = linear_reference(x, nm.to_dense())
    for y in outs.values():
        assert_close_to_reference(y, ref)


@pytest.mark.parametrize("tokens", [1, 50])
def test_deterministic_across_threads(tokens):
    nm = _nm(300, 256, 2, 4)
    x = torch.randn(tokens, 256)
    dy = torch.randn(tokens, 300)
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            outs.append((se.ops.nm_linear(x, nm),
                         _lib.nm_linear_grad_input(dy, nm.values, nm.metadata, 256, 2, 4),
                         _lib.nm_linear_grad_values(dy, x, nm.metadata, 256, 2, 4)))
    finally:
        torch.set_num_threads(previous)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


# ---- backward ops, opcheck, gradcheck -------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (3, 8), (4, 16)])
@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_backward_ops(isa, device, n, m, tokens):
    _one_isa_on_cuda(isa, device)
    nm = _nm(20, 37, n, m, device=device)
    x = torch.randn(tokens, 37, device=device)
    dy = torch.randn(tokens, 20, device=device)
    dense = nm.to_dense()
    dx = _lib.nm_linear_grad_input(dy, nm.values, nm.metadata, 37, n, m)
    assert_close_to_reference(dx, dy.double() @ dense.double())
    dv = _lib.nm_linear_grad_values(dy, x, nm.metadata, 37, n, m)
    cols = nm.columns()
    full = torch.zeros(20, nm.groups * m, dtype=torch.float64, device=device)
    full[:, :37] = dy.double().t() @ x.double()
    assert_close_to_reference(dv, torch.gather(full, 1, cols))


def test_opcheck(device):
    nm = _nm(12, 21, 2, 4, device=device)
    x = torch.randn(3, 21, device=device)
    bias = torch.randn(12, device=device)
    dy = torch.randn(3, 12, device=device)
    torch.library.opcheck(_lib.nm_linear, (x, nm.values, nm.metadata, bias, 21, 2, 4))
    torch.library.opcheck(_lib.nm_linear, (x.requires_grad_(), nm.values.requires_grad_(),
                                           nm.metadata, bias.requires_grad_(), 21, 2, 4))
    torch.library.opcheck(_lib.nm_linear_grad_input, (dy, nm.values.detach(), nm.metadata, 21, 2, 4))
    torch.library.opcheck(_lib.nm_linear_grad_values, (dy, x.detach(), nm.metadata, 21, 2, 4))
    torch.library.opcheck(_lib.nm_validate, (nm.values.detach(), nm.metadata, 21, 2, 4))


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8), (1, 16)])
def test_gradcheck_float64(device, n, m):
    nm = _nm(6, 19, n, m, dtype=torch.float64, device=device)
    x = torch.randn(2, 3, 19, dtype=torch.float64, device=device, requires_grad=True)
    values = nm.values.clone().requires_grad_()
    bias = torch.randn(6, dtype=torch.float64, device=device, requires_grad=True)
    fn = lambda x_, v_, b_: _lib.nm_linear(x_, v_, nm.metadata, b_, 19, n, m)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values, bias))


def test_autograd_float32_matches_dense(device):
    nm = _nm(16, 40, 2, 4, device=device)
    x = torch.randn(5, 40, device=device, requires_grad=True)
    values = nm.values.clone().requires_grad_()
    bias = torch.randn(16, device=device, requires_grad=True)
    y = _lib.nm_linear(x, values, nm.metadata, bias, 40, 2, 4)
    g = torch.randn_like(y)
    y.backward(g)
    dense = nm.to_dense().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b2 = bias.detach().clone().requires_grad_()
    F.linear(x2, dense, b2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, b2.grad)
    torch.testing.assert_close(values.grad, torch.gather(
        F.pad(dense.grad, (0, nm.groups * 4 - 40)), 1, nm.columns()), rtol=1e-5, atol=1e-5)


# ---- malformed input ------------------------------------------------------------------------------
def test_bad_metadata_and_lengths(device):
    nm = _nm(8, 32, 2, 4, device=device)
    x = torch.randn(3, 32, device=device)
    v, meta = nm.values, nm.metadata
    with pytest.raises(RuntimeError, match=r"metadata must have shape \[8, 4\]"):
        _lib.nm_linear(x, v, meta[:, :3].contiguous(), None, 32, 2, 4)
    with pytest.raises(RuntimeError, match=r"values must have shape \[8, 16\]"):
        _lib.nm_linear(x, v[:, :15].contiguous(), meta, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="x has 40 features, this weight expects in_features=32"):
        _lib.nm_linear(torch.randn(3, 40, device=device), v, meta, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match=r"in_features 40 .* got \[8, 4\]"):
        _lib.nm_linear(torch.randn(3, 40, device=device), v, meta, None, 40, 2, 4)
    with pytest.raises(RuntimeError, match="metadata must have dtype"):
        _lib.nm_linear(x, v, meta.int(), None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="values must have dtype"):
        # float16 values are accepted on CUDA; an integer dtype is wrong everywhere
        _lib.nm_linear(x, v.half() if device.type == "cpu" else v.int(), meta, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="x must have dtype"):
        _lib.nm_linear(x.int(), v, meta, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="bias must have length 8"):
        _lib.nm_linear(x, v, meta, torch.randn(7, device=device), 32, 2, 4)
    with pytest.raises(RuntimeError, match="float64 needs both"):
        _lib.nm_linear(x.double(), v, meta, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="metadata must be contiguous"):
        _lib.nm_linear(x, v, torch.zeros(4, 8, dtype=torch.uint8, device=device).t(), None, 32,
                       2, 4)
    with pytest.raises(RuntimeError, match="same number of tokens"):
        _lib.nm_linear_grad_values(torch.randn(2, 8, device=device), x, meta, 32, 2, 4)


def test_from_indices_rejects_bad_metadata():
    v = torch.randn(2, 4)
    good = torch.tensor([[0, 3, 1, 2], [1, 2, 0, 1]])
    nm = NMWeight.from_indices(v, good, (2, 8), 2, 4)
    assert torch.equal(nm.slot_indices(), good)
    with pytest.raises(ValueError, match=r"index 4 at row 0, slot 1 is outside \[0, 4\)"):
        NMWeight.from_indices(v, torch.tensor([[0, 4, 1, 2], [1, 2, 0, 1]]), (2, 8), 2, 4)
    with pytest.raises(ValueError, match="strictly increasing"):
        NMWeight.from_indices(v, torch.tensor([[1, 1, 1, 2], [1, 2, 0, 1]]), (2, 8), 2, 4)
    with pytest.raises(ValueError, match="must both have shape"):
        NMWeight.from_indices(v[:, :3], good[:, :3], (2, 8), 2, 4)
    with pytest.raises(TypeError, match="integer"):
        NMWeight.from_indices(v, good.float(), (2, 8), 2, 4)


def test_validate_catches_noncanonical_packed_metadata(device):
    nm = _nm(4, 16, 2, 4, device=device)
    idx = nm.slot_indices()
    idx[2, 3] = idx[2, 2]  # slot repeats its neighbour: the group names fewer than 2 columns
    broken = NMWeight(nm.values, nm_pack_indices(idx, 4).to(device), nm.shape, 2, 4)
    with pytest.raises(ValueError, match="row 2, group 1: indices must be strictly increasing"):
        broken.validate()
    with pytest.raises(RuntimeError, match="row 2, group 1: indices must be strictly increasing"):
        _lib.nm_validate(broken.values, broken.metadata, 16, 2, 4)
    # the kernel never reads out of bounds whatever the bits say: random metadata runs safely
    junk = torch.randint(0, 256, nm.metadata.shape, dtype=torch.uint8).to(device)
    y = _lib.nm_linear(torch.randn(3, 16, device=device), nm.values, junk, None, 16, 2, 4)
    assert torch.isfinite(y).all()
    dx = _lib.nm_linear_grad_input(torch.randn(3, 4, device=device), nm.values, junk, 16, 2, 4)
    dv = _lib.nm_linear_grad_values(torch.randn(3, 4, device=device),
                                    torch.randn(3, 16, device=device), junk, 16, 2, 4)
    assert torch.isfinite(dx).all() and torch.isfinite(dv).all()
    with pytest.raises(ValueError, match="metadata must have shape"):
        NMWeight(nm.values, nm.metadata[:, :1], nm.shape, 2, 4).validate()


# ---- module ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "2:8", "1:8", "4:16"])
def test_sparse_linear_from_dense(device, pattern):
    lin = torch.nn.Linear(48, 20)
    sl = se.SparseLinear.from_dense(lin, pattern=pattern).to(device)
    lin = lin.to(device)
    n, m = (int(v) for v in pattern.split(":"))
    assert isinstance(sl.weight_format(), NMWeight)
    assert abs(sl.sparsity - (1 - n / m)) < 1e-6
    r = repr(sl)
    assert f"pattern='{pattern}'" in r and "weight_bytes" in r
    x = torch.randn(2, 3, 48, device=device)
    ref = F.linear(x, sl.to_dense().weight, lin.bias)
    torch.testing.assert_close(sl(x), ref, rtol=1e-5, atol=1e-5)
    dense_again = sl.to_dense()
    assert isinstance(dense_again, torch.nn.Linear)
    assert torch.equal(dense_again.weight, sl.weight_format().to_dense())


def test_sparse_linear_mask_and_errors():
    lin = torch.nn.Linear(16, 4)
    mask = se.nm_mask(lin.weight, 1, 4)
    sl = se.SparseLinear.from_dense(lin, pattern="2:4", mask=mask)
    assert torch.equal(sl.to_dense().weight, lin.weight.detach() * mask)
    with pytest.raises(ValueError, match="fixes sparsity"):
        se.SparseLinear.from_dense(lin, sparsity=0.9, pattern="2:4")
    se.SparseLinear.from_dense(lin, sparsity=0.5, pattern="2:4")
    with pytest.raises(ValueError, match="N:M pattern"):
        se.SparseLinear.from_dense(lin, pattern="3:5")
    with pytest.raises(ValueError, match="breaks the 2:4 pattern"):
        se.SparseLinear.from_dense(lin, pattern="2:4", mask=torch.ones(4, 16, dtype=torch.bool))


def test_sparse_linear_training_state_dict_bf16():
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 8)
    sl = se.SparseLinear.from_dense(lin, pattern="2:8")
    meta_before = sl.metadata.clone()
    opt = torch.optim.SGD(sl.parameters(), lr=0.1)
    x, target = torch.randn(16, 32), torch.randn(16, 8)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(sl(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(sl.metadata, meta_before)  # the pattern is fixed
    # state_dict round trip through torch.save
    buf = io.BytesIO()
    torch.save(sl.state_dict(), buf)
    buf.seek(0)
    other = se.SparseLinear.from_dense(torch.nn.Linear(32, 8), pattern="2:8")
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x), sl(x))
    csr = se.SparseLinear.from_dense(torch.nn.Linear(32, 8), sparsity=0.75)
    with pytest.raises(ValueError, match="state_dict holds a 'nm' weight"):
        csr.load_state_dict(sl.state_dict())
    # bf16
    sb = sl.to(torch.bfloat16)
    assert sb.values.dtype == torch.bfloat16 and sb.metadata.dtype == torch.uint8
    yb = sb(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    ref = linear_reference(x.bfloat16(), sb.to_dense().weight, sb.bias)
    assert_close_to_reference(yb, ref, F.linear(x.bfloat16(), sb.to_dense().weight, sb.bias))
    assert "bfloat16" in repr(sb)


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    model = torch.nn.Sequential(
        se.SparseLinear.from_dense(torch.nn.Linear(32, 24), pattern="2:4"),
        torch.nn.ReLU(),
        se.SparseLinear.from_dense(torch.nn.Linear(24, 8), pattern="1:8"),
    ).to(device)
    x = torch.randn(5, 32, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))
    xg = x.clone().requires_grad_()
    compiled(xg).sum().backward()
    assert xg.grad is not None and model[0].values.grad is not None


# ---- CUDA only: device checks, both CUDA paths, the compressed-weight cache ----------------------
_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


@_cuda
def test_cuda_wrong_device():
    nm = _nm(8, 32, 2, 4, device="cuda")
    x = torch.randn(3, 32, device="cuda")
    with pytest.raises(RuntimeError, match="values must be on x's device"):
        _lib.nm_linear(x, nm.values.cpu(), nm.metadata, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="metadata must be on x's device"):
        _lib.nm_linear(x, nm.values, nm.metadata.cpu(), None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="bias must be on x's device"):
        _lib.nm_linear(x, nm.values, nm.metadata, torch.randn(8), 32, 2, 4)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        _lib.nm_linear(x.cpu(), nm.values, nm.metadata, None, 32, 2, 4)
    with pytest.raises(RuntimeError, match="values must be on grad_out's device"):
        _lib.nm_linear_grad_input(torch.randn(3, 8, device="cuda"), nm.values.cpu(), nm.metadata,
                                  32, 2, 4)
    with pytest.raises(RuntimeError, match="x must be"):
        _lib.nm_linear_grad_values(torch.randn(3, 8, device="cuda"), x.cpu(), nm.metadata, 32,
                                   2, 4)
    with pytest.raises(RuntimeError, match="metadata must be on values's device"):
        _lib.nm_validate(nm.values, nm.metadata.cpu(), 32, 2, 4)


@_cuda
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (1, 8), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_cuda_paths_agree(nm_cuda_path, n, m, dtype, tokens):
    """Every forward path matches: CUDA cores, cuSPARSELt (n <= 2; others fall back), dense
    expansion + cuBLAS, and the automatic choice."""
    nm = _nm(128, 256, n, m, dtype=dtype, device="cuda")
    x = torch.randn(tokens, 256, device="cuda", dtype=dtype)
    bias = torch.randn(128, device="cuda", dtype=dtype)
    ref = linear_reference(x, nm.to_dense(), bias)
    torch_same = F.linear(x, nm.to_dense(), bias)
    for path in ("cores", "cusparselt", "dense", "auto"):
        nm_cuda_path(path)
        assert_close_to_reference(se.ops.nm_linear(x, nm, bias), ref, torch_same)


@_cuda
def test_cuda_compressed_cache_sees_inplace_edits(nm_cuda_path):
    nm_cuda_path("cusparselt")
    nm = _nm(64, 128, 2, 4, dtype=torch.float16, device="cuda")
    x = torch.randn(32, 128, device="cuda", dtype=torch.float16)
    y1 = se.ops.nm_linear(x, nm)
    assert torch.equal(se.ops.nm_linear(x, nm), y1)
    with torch.no_grad():
        nm.values.mul_(2)  # bumps the version: the cached compressed weight must not be reused
    y2 = se.ops.nm_linear(x, nm)
    assert_close_to_reference(y2, linear_reference(x, nm.to_dense()), F.linear(x, nm.to_dense()))
    # any metadata bits give a valid 2:4 matrix (slots naming one column are summed): the 2:4
    # path agrees with the cores on random metadata too
    junk = torch.randint(0, 256, nm.metadata.shape, dtype=torch.uint8).cuda()
    y_junk = _lib.nm_linear(x, nm.values, junk, None, x.shape[-1], 2, 4)
    nm_cuda_path("cores")
    y_cores = _lib.nm_linear(x, nm.values, junk, None, x.shape[-1], 2, 4)
    assert torch.isfinite(y_junk).all()
    scale = y_cores.float().abs().max().item()
    assert (y_junk.float() - y_cores.float()).abs().max().item() <= 1e-2 * max(1.0, scale)


@_cuda
@pytest.mark.parametrize("n,m", [(2, 4), (1, 8), (4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cuda_backward_paths_agree(nm_cuda_path, n, m, dtype):
    """Backward at training sizes: the kernels and the dense-GEMM path (>= 64 tokens) match."""
    nm = _nm(48, 100, n, m, dtype=dtype, device="cuda")
    x = torch.randn(130, 100, device="cuda", dtype=dtype)
    dy = torch.randn(130, 48, device="cuda", dtype=dtype)
    dense = nm.to_dense()
    ref_dx = dy.double() @ dense.double()
    full = torch.zeros(48, nm.groups * m, dtype=torch.float64, device="cuda")
    full[:, :100] = dy.double().t() @ x.double()
    ref_dv = torch.gather(full, 1, nm.columns())
    torch_dx = dy @ dense
    torch_dv = torch.gather(torch.nn.functional.pad((dy.t() @ x).double(), (0, nm.groups * m - 100)),
                            1, nm.columns())
    for path in ("cores", "auto"):
        nm_cuda_path(path)
        dx = _lib.nm_linear_grad_input(dy, nm.values, nm.metadata, 100, n, m)
        dv = _lib.nm_linear_grad_values(dy, x, nm.metadata, 100, n, m)
        assert dx.dtype == dtype and dv.dtype == (torch.float64 if dtype == torch.float64
                                                  else torch.float32)
        if dtype == torch.bfloat16:
            assert_close_to_reference(dx, ref_dx, torch_dx)
            assert_close_to_reference(dv, ref_dv, torch_dv)
        else:
            assert_close_to_reference(dx, ref_dx)
            assert_close_to_reference(dv, ref_dv)


@_cuda
@pytest.mark.parametrize("tokens", [1, 50])
def test_cuda_deterministic(tokens):
    nm = _nm(300, 256, 2, 4, device="cuda")
    x = torch.randn(tokens, 256, device="cuda")
    dy = torch.randn(tokens, 300, device="cuda")
    runs = [(se.ops.nm_linear(x, nm),
             _lib.nm_linear_grad_input(dy, nm.values, nm.metadata, 256, 2, 4),
             _lib.nm_linear_grad_values(dy, x, nm.metadata, 256, 2, 4)) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@_cuda
def test_cuda_mixed_dtypes():
    nm = _nm(32, 64, 1, 8, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(5, 64, device="cuda", dtype=torch.float16)  # computed in fp32, returned fp16
    b = torch.randn(32, device="cuda", dtype=torch.float64)
    y = se.ops.nm_linear(x, nm, b)
    assert y.dtype == torch.float16
    dense = nm.to_dense().float()
    assert_close_to_reference(y, linear_reference(x, dense, b),
                              F.linear(x.float(), dense, b.float()).half())


@_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_module_training(dtype):
    torch.manual_seed(1)
    sl = se.SparseLinear.from_dense(torch.nn.Linear(64, 32), pattern="2:4").cuda().to(dtype)
    sl.weight_format().validate()  # runs the device-side check (float16 allowed on CUDA)
    meta_before = sl.metadata.clone()
    opt = torch.optim.SGD(sl.parameters(), lr=0.05)
    x = torch.randn(40, 64, device="cuda", dtype=dtype)
    target = torch.randn(40, 32, device="cuda", dtype=dtype)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.mse_loss(sl(x).float(), target.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(sl.metadata, meta_before)
    ref = linear_reference(x, sl.to_dense().weight, sl.bias)
    assert_close_to_reference(sl(x), ref, F.linear(x, sl.to_dense().weight, sl.bias))


@_cuda
def test_cuda_float16_from_dense():
    """An fp16 CUDA nn.Linear converts directly (its N:M weight stays on the GPU)."""
    lin = torch.nn.Linear(64, 32).cuda().half()
    sl = se.SparseLinear.from_dense(lin, pattern="2:4")
    assert sl.values.is_cuda and sl.values.dtype == torch.float16 and sl.metadata.is_cuda
    x = torch.randn(3, 64, device="cuda", dtype=torch.float16)
    w = sl.to_dense().weight
    assert_close_to_reference(sl(x), linear_reference(x, w, sl.bias), F.linear(x, w, sl.bias))
    with pytest.raises(TypeError, match="float16 on CUDA"):
        NMWeight.from_dense(torch.randn(4, 8).half(), 2, 4)


@_cuda
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("in_f", [7, 33, 300])
@pytest.mark.parametrize("tokens", [16, 70])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_16bit_odd_shapes(nm_cuda_path, n, m, in_f, tokens, dtype):
    """The tensor-core kernel on partial tiles: rows, tokens and columns not multiples of its tile
    (scalar activation loads when in_features % 8 != 0)."""
    nm_cuda_path("cores")
    nm = _nm(24, in_f, n, m, dtype=dtype, device="cuda")
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    bias = torch.randn(24, device="cuda", dtype=dtype)
    dense = nm.to_dense()
    assert_close_to_reference(se.ops.nm_linear(x, nm, bias), linear_reference(x, dense, bias),
                              F.linear(x, dense, bias))

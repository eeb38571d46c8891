"""Property tests (hypothesis) for the modules against pure-torch references.

Random valid shapes, sparsities, patterns (unstructured, RxC blocks, N:M), dtypes (fp32, bf16),
batch dims and ISA paths for SparseLinear (CSR and N:M), SparseConv2d and MoELayer. The profile is
deterministic (derandomized, no database) and bounded so the whole file stays well under a minute.
Reduced precision follows reference.py's rule: error at most twice PyTorch's own dense op's error
at the same dtype (plus a floor).
"""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_ext as se
from reference import (assert_close_to_reference, linear_reference, moe_experts_reference,
                       moe_route_reference)

settings.register_profile("sparse_ext_fuzz", derandomize=True, database=None, deadline=None,
                          max_examples=300, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile("sparse_ext_fuzz")

ISAS = st.sampled_from(se.supported_isas())
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
SEEDS = st.integers(0, 2**31 - 1)


def _check(ours, ref, dense_same_dtype, dtype):
    assert ours.dtype == dtype
    if dtype == torch.float32:
        assert_close_to_reference(ours, ref, floor=1e-4)
    else:
        assert_close_to_reference(ours, ref, dense_same_dtype, floor=1e-2)


def _batch(batch_shape, generator, dtype, K):
    shape = tuple(batch_shape) + (K,)
    return torch.randn(shape, generator=generator).to(dtype)


def _check_sparse_linear(sl, x, isa):
    """``sl(x)`` on ``isa`` against the reference of its dense twin (x's dtype kept)."""
    dense = sl.to_dense()
    bias = None if dense.bias is None else dense.bias.to(x.dtype)
    with se.use_isa(isa), torch.no_grad():
        ours = sl(x)
        same_dtype = F.linear(x, dense.weight.to(x.dtype), bias)
    assert ours.shape == x.shape[:-1] + (sl.out_features,)
    _check(ours, linear_reference(x, dense.weight, dense.bias), same_dtype, x.dtype)


def _tile_multiple(pattern, rows, cols):
    """The drawn sizes rounded up to whole tiles of a block pattern "RxC" (which must tile the
    weight); other patterns take any size."""
    if "x" not in pattern:
        return rows, cols
    r, c = (int(v) for v in pattern.split("x"))
    return -(-rows // r) * r, -(-cols // c) * c


@FUZZ
@given(M=st.integers(1, 40), K=st.integers(1, 300), batch=st.lists(st.integers(0, 5), max_size=2),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]),
       pattern=st.sampled_from(["unstructured", "1x1", "2x1", "4x1", "8x1", "4x4", "1x4"]),
       bias=st.booleans(), dtype=DTYPES, isa=ISAS, seed=SEEDS,
       noncontig=st.booleans())
def test_sparse_linear_csr(M, K, batch, sparsity, pattern, bias, dtype, isa, seed, noncontig):
    M, K = _tile_multiple(pattern, M, K)
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, M, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(M, K, generator=g))
        if bias:
            lin.bias.copy_(torch.randn(M, generator=g))
    sl = se.SparseLinear.from_dense(lin, sparsity=sparsity, pattern=pattern,
                                    method="random", generator=g).to(dtype)
    x = _batch(batch, g, dtype, K)
    if noncontig and x.dim() >= 2:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    _check_sparse_linear(sl, x, isa)


@FUZZ
@given(M=st.integers(1, 40), K=st.integers(1, 200), batch=st.lists(st.integers(0, 5), max_size=2),
       nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 16), (8, 16)]),
       bias=st.booleans(), dtype=DTYPES, isa=ISAS, seed=SEEDS)
def test_sparse_linear_nm(M, K, batch, nm, bias, dtype, isa, seed):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, M, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(M, K, generator=g))
    sl = se.SparseLinear.from_dense(lin, pattern=f"{n}:{m}").to(dtype)
    assert isinstance(sl.weight_format(), se.NMWeight)
    x = _batch(batch, g, dtype, K)
    kept = (sl.to_dense().weight != 0).reshape(M, -1).sum(-1)
    assert bool((kept <= n * -(-K // m)).all())
    _check_sparse_linear(sl, x, isa)


@FUZZ
@given(cin=st.integers(1, 9), cout=st.sampled_from([1, 3, 4, 8, 16]), k=st.sampled_from([1, 2, 3, 5]),
       stride=st.integers(1, 3), padding=st.integers(0, 2), dilation=st.integers(1, 2),
       hw=st.tuples(st.integers(1, 9), st.integers(1, 9)), batch=st.integers(0, 3),
       sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       pattern=st.sampled_from(["unstructured", "2x1", "4x1", "8x1"]),
       activation=st.sampled_from([None, "relu", "relu6"]), bias=st.booleans(),
       dtype=DTYPES, isa=ISAS, seed=SEEDS, unbatched=st.booleans(), channels_last=st.booleans())
def test_sparse_conv2d(cin, cout, k, stride, padding, dilation, hw, batch, sparsity, pattern,
                       activation, bias, dtype, isa, seed, unbatched, channels_last):
    H, W = hw
    cout, _ = _tile_multiple(pattern, cout, 1)
    if H + 2 * padding < dilation * (k - 1) + 1 or W + 2 * padding < dilation * (k - 1) + 1:
        return  # no output position: not a valid convolution
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    sc = se.SparseConv2d.from_dense(conv, sparsity=sparsity, pattern=pattern, method="random",
                                    generator=g, activation=activation).to(dtype)
    x = torch.randn(batch, cin, H, W, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if unbatched:
        x = x[0] if batch else torch.randn(cin, H, W, generator=g).to(dtype)
    dense = sc.to_dense()
    xd = x.double()
    lo, hi = {None: (-float("inf"), float("inf")), "relu": (0.0, float("inf")),
              "relu6": (0.0, 6.0)}[activation]
    b64 = None if dense.bias is None else dense.bias.double()
    ref = F.conv2d(xd, dense.weight.double(), b64, stride, padding, dilation).clamp(lo, hi)
    with se.use_isa(isa), torch.no_grad():
        ours = sc(x)
        same_dtype = F.conv2d(x, dense.weight.to(dtype),
                              None if dense.bias is None else dense.bias.to(dtype),
                              stride, padding, dilation).clamp(lo, hi)
    assert ours.shape == ref.shape
    _check(ours, ref, same_dtype, dtype)


@FUZZ
@given(H=st.integers(1, 24), F_=st.integers(1, 20), E=st.integers(1, 8), k=st.integers(1, 8),
       tokens=st.lists(st.integers(0, 6), min_size=1, max_size=2),
       activation=st.sampled_from(["silu", "gelu", "relu", "gelu_tanh"]), gated=st.booleans(),
       norm=st.booleans(), capacity_factor=st.sampled_from([None, 0.5, 1.0, 2.0]),
       dtype=DTYPES, isa=ISAS, seed=SEEDS)
def test_moe_layer(H, F_, E, k, tokens, activation, gated, norm, capacity_factor, dtype, isa, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    moe = se.MoELayer(H, F_, num_experts=E, top_k=k, activation=activation, gated=gated,
                      norm_topk_prob=norm, capacity_factor=capacity_factor).to(dtype).eval()
    x = torch.randn(*tokens, H).to(dtype)
    with se.use_isa(isa), torch.no_grad():
        ours = moe(x)
        logits = F.linear(x.reshape(-1, H), moe.router.weight)
    # routing from the pure-torch reference, not from the op under test
    w, idx = moe_route_reference(logits.float(), k, "softmax", norm)
    assert ours.shape == x.shape and ours.dtype == dtype
    T = x.numel() // H
    cap = moe.capacity(T)
    args = (x.reshape(-1, H), w, idx, moe.w1.detach(), moe.w2.detach(), activation, gated, cap)
    ref = moe_experts_reference(*args)
    if dtype == torch.float32:
        assert_close_to_reference(ours.reshape(-1, H), ref, floor=1e-4)
    elif ref.numel():  # bf16: at most twice PyTorch's own error at bf16 (its per-expert loop)
        torch_err = (moe_experts_reference(*args, dtype=dtype).double() - ref).abs().max().item()
        err = (ours.reshape(-1, H).double() - ref).abs().max().item()
        floor = 1e-3 * max(ref.abs().max().item(), 1e-3)
        assert err <= 2 * torch_err + floor, f"bf16 MoE error {err:.3g}, torch's {torch_err:.3g}"


# ---- gradients (the *_grad_* and backward ops) through each module's autograd ------------------
GRAD = settings(FUZZ, max_examples=150)


def _grad_close(ours, ref, name):
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 2e-4 * scale, f"{name}: error {err:.3g} (scale {scale:.3g})"


def _stored_dense(fmt, values):
    """The dense matrix holding ``values`` at the stored positions of ``fmt`` (zero elsewhere)."""
    if isinstance(fmt, se.NMWeight):
        return se.NMWeight(values, fmt.metadata, fmt.shape, fmt.n, fmt.m).to_dense()
    return se.CSRWeight(fmt.offsets, fmt.indices, values, fmt.shape, fmt.block_rows).to_dense()


@GRAD
@given(M=st.integers(1, 24), K=st.integers(1, 280), tokens=st.integers(1, 12),
       pattern=st.sampled_from(["unstructured", "4x1", "8x1", "2:4", "1:8", "3:16"]),
       sparsity=st.sampled_from([0.5, 0.9]), isa=ISAS, seed=SEEDS)
def test_sparse_linear_gradients(M, K, tokens, pattern, sparsity, isa, seed):
    M, K = _tile_multiple(pattern, M, K)
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(K, M)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(M, K, generator=g))
    nm = ":" in pattern
    sl = (se.SparseLinear.from_dense(lin, pattern=pattern) if nm else
          se.SparseLinear.from_dense(lin, sparsity=sparsity, pattern=pattern, method="random",
                                     generator=g))
    x = torch.randn(tokens, K, generator=g, requires_grad=True)
    gy = torch.randn(tokens, M, generator=g)
    with se.use_isa(isa):
        sl(x).backward(gy)
    fmt = sl.weight_format()
    ones = torch.ones_like(fmt.values, dtype=torch.float32)
    stored = _stored_dense(fmt, ones).ne(0)
    wd = sl.to_dense().weight.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    F.linear(xd, wd).backward(gy.double())
    _grad_close(x.grad, xd.grad, "grad_input")
    _grad_close(_stored_dense(fmt, sl.values.grad.float()), wd.grad * stored, "grad_values")
    _grad_close(sl.bias.grad, gy.double().sum(0), "grad_bias")


@GRAD
@given(cin=st.integers(1, 6), cout=st.sampled_from([1, 4, 8]), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), padding=st.integers(0, 1), hw=st.integers(3, 8),
       batch=st.integers(1, 2), pattern=st.sampled_from(["unstructured", "4x1"]), isa=ISAS,
       seed=SEEDS)
def test_sparse_conv2d_gradients(cin, cout, k, stride, padding, hw, batch, pattern, isa, seed):
    cout, _ = _tile_multiple(pattern, cout, 1)
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    sc = se.SparseConv2d.from_dense(conv, sparsity=0.6, pattern=pattern, method="random",
                                    generator=g)
    x = torch.randn(batch, cin, hw, hw, generator=g, requires_grad=True)
    with se.use_isa(isa):
        y = sc(x)
        gy = torch.randn(y.shape, generator=g)
        y.backward(gy)
    fmt = sc.weight_format()
    stored = _stored_dense(fmt, torch.ones_like(fmt.values, dtype=torch.float32)).ne(0)
    wd = sc.to_dense().weight.detach().double().requires_grad_()
    xd = x.detach().double().requires_grad_()
    F.conv2d(xd, wd, None, stride, padding).backward(gy.double())
    _grad_close(x.grad, xd.grad, "grad_input")
    _grad_close(_stored_dense(fmt, sc.values.grad.float()),
                wd.grad.reshape(cout, -1) * stored, "grad_values")


@GRAD
@given(H=st.integers(1, 16), F_=st.integers(1, 12), E=st.integers(1, 6), k=st.integers(1, 3),
       T=st.integers(1, 10), gated=st.booleans(),
       activation=st.sampled_from(["silu", "gelu", "relu"]), isa=ISAS, seed=SEEDS)
def test_moe_gradients(H, F_, E, k, T, gated, activation, isa, seed):
    k = min(k, E)
    torch.manual_seed(seed)
    moe = se.MoELayer(H, F_, num_experts=E, top_k=k, activation=activation, gated=gated)
    x = torch.randn(T, H, requires_grad=True)
    gy = torch.randn(T, H)
    with se.use_isa(isa):
        moe(x).backward(gy)
    # float64 reference with the same routing decisions (indices fixed, weights differentiable)
    xd = x.detach().double().requires_grad_()
    w1 = moe.w1.detach().double().requires_grad_()
    w2 = moe.w2.detach().double().requires_grad_()
    rw = moe.router.weight.detach().double().requires_grad_()
    logits = F.linear(xd, rw)
    idx = moe._topk_indices
    scores = torch.softmax(logits, -1)
    w = scores.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    out = torch.zeros(T, H, dtype=torch.float64)
    for j in range(k):
        h = torch.einsum("tfh,th->tf", w1[idx[:, j]], xd)
        h = act(h[:, :F_]) * h[:, F_:] if gated else act(h)
        out = out + w[:, j:j + 1] * torch.einsum("thf,tf->th", w2[idx[:, j]], h)
    out.backward(gy.double())
    _grad_close(x.grad, xd.grad, "grad_x")
    _grad_close(moe.w1.grad, w1.grad, "grad_w1")
    _grad_close(moe.w2.grad, w2.grad, "grad_w2")
    _grad_close(moe.router.weight.grad, rw.grad, "grad_router")

"""Concurrency and determinism (the guarantees are tabulated in docs/reliability.md).

- Many Python threads calling the same module's forward at once give exactly the serial results.
- Forward (and, where listed, backward) outputs are bitwise identical run to run and across
  ``torch.set_num_threads`` values.
- Only one OpenMP runtime (torch's libgomp) is loaded, so ATen's pool is not oversubscribed by a
  second runtime.
"""
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import sparse_ext as se

THREAD_COUNTS = [1, 2, 3, 4]


def _linear(pattern, sparsity=None, K=300, M=96):
    torch.manual_seed(1)
    return se.SparseLinear.from_dense(torch.nn.Linear(K, M), sparsity=sparsity, pattern=pattern)


def _modules():
    torch.manual_seed(2)
    conv3 = se.SparseConv2d.from_dense(torch.nn.Conv2d(16, 32, 3, padding=1), sparsity=0.8,
                                       activation="relu")
    conv1 = se.SparseConv2d.from_dense(torch.nn.Conv2d(24, 32, 1), sparsity=0.8, pattern="4x1")
    torch.manual_seed(3)
    moe = se.MoELayer(64, 48, num_experts=8, top_k=2).eval()
    return {
        "linear_csr": (_linear("unstructured", 0.9), lambda g: torch.randn(37, 300, generator=g)),
        "linear_csr_gemv": (_linear("unstructured", 0.9), lambda g: torch.randn(1, 300, generator=g)),
        "linear_block4x1": (_linear("4x1", 0.8), lambda g: torch.randn(2, 9, 300, generator=g)),
        "linear_nm_2:4": (_linear("2:4"), lambda g: torch.randn(37, 300, generator=g)),
        "linear_nm_1:8_bf16": (_linear("1:8").to(torch.bfloat16),
                               lambda g: torch.randn(29, 300, generator=g).bfloat16()),
        "conv3x3": (conv3, lambda g: torch.randn(2, 16, 13, 11, generator=g)),
        "conv1x1": (conv1, lambda g: torch.randn(3, 24, 9, 17, generator=g)),
        "moe": (moe, lambda g: torch.randn(3, 21, 64, generator=g)),
    }


MODULES = _modules()
NAMES = sorted(MODULES)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _inputs(name, count=6):
    _, make = MODULES[name]
    g = torch.Generator().manual_seed(11)
    return [make(g) for _ in range(count)]


@pytest.mark.parametrize("name", NAMES)
def test_threads_share_a_module(name):
    module, _ = MODULES[name]
    xs = _inputs(name)
    with torch.no_grad():
        serial = [module(x) for x in xs]
    barrier = threading.Barrier(8)

    def call(i):
        if i < 8:
            barrier.wait()  # start the first wave together
        with torch.no_grad():
            return i, module(xs[i % len(xs)])

    with ThreadPoolExecutor(8) as pool:
        for i, out in pool.map(call, range(48)):
            assert torch.equal(out, serial[i % len(xs)]), f"{name}: call {i} differs from serial"


@pytest.mark.parametrize("name", NAMES)
def test_bitwise_run_to_run(name):
    module, _ = MODULES[name]
    x = _inputs(name, 1)[0]
    with torch.no_grad():
        first = module(x)
        for _ in range(3):
            assert torch.equal(module(x), first)


def _forward_backward(module, x):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x.is_floating_point())
    y = module(x)
    g = torch.Generator().manual_seed(5)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


# Which backward results are bitwise identical across thread counts (docs/reliability.md has the
# table). MoE's expert backward runs ATen GEMMs (at::mm), whose blocking, and so rounding, may
# change with the thread count (seen at 2 threads vs 1): bitwise run to run at a fixed thread
# count only (test_backward_bitwise_run_to_run).
BACKWARD_DETERMINISTIC = set(NAMES) - {"moe"}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_backward_bitwise_run_to_run(name, threads, restore_threads):
    module, _ = MODULES[name]
    x = _inputs(name, 1)[0]
    torch.set_num_threads(threads)
    y0, gx0, gp0 = _forward_backward(module, x)
    for _ in range(2):
        y, gx, gp = _forward_backward(module, x)
        assert torch.equal(y, y0) and torch.equal(gx, gx0)
        assert all(torch.equal(gp[k], gp0[k]) for k in gp0)


@pytest.mark.parametrize("name", NAMES)
def test_bitwise_across_thread_counts(name, isa, restore_threads):
    module, _ = MODULES[name]
    x = _inputs(name, 1)[0]
    results = {}
    for n in THREAD_COUNTS:
        torch.set_num_threads(n)
        assert torch.get_num_threads() == n
        results[n] = _forward_backward(module, x)
    y1, gx1, gp1 = results[1]
    for n in THREAD_COUNTS[1:]:
        y, gx, gp = results[n]
        assert torch.equal(y, y1), f"{name}: forward differs between 1 and {n} threads"
        if name in BACKWARD_DETERMINISTIC:
            assert torch.equal(gx, gx1), f"{name}: input grad differs between 1 and {n} threads"
            for k in gp1:
                assert torch.equal(gp[k], gp1[k]), f"{name}: grad of {k} differs, 1 vs {n} threads"


def test_single_thread_and_default_both_work(restore_threads):
    default = torch.get_num_threads()
    for n in (1, default):
        torch.set_num_threads(n)
        for name in NAMES:
            module, _ = MODULES[name]
            with torch.no_grad():
                y = module(_inputs(name, 1)[0])
            assert torch.isfinite(y.float()).all()


_MAPS_SCRIPT = r"""
import torch, sparse_ext as se
lin = se.SparseLinear.from_dense(torch.nn.Linear(64, 64), sparsity=0.9)
nm = se.SparseLinear.from_dense(torch.nn.Linear(64, 64), pattern="2:4")
lin(torch.randn(8, 64)); nm(torch.randn(8, 64))
se.MoELayer(16, 8, num_experts=4, top_k=2)(torch.randn(4, 16))
libs = set()
for line in open("/proc/self/maps"):
    path = line.split()[-1] if len(line.split()) >= 6 else ""
    base = path.rsplit("/", 1)[-1]
    if any(k in base for k in ("libgomp", "libiomp", "libomp", "libkmp")):
        libs.add(path)
print("\n".join(sorted(libs)))
"""


def test_one_openmp_runtime():
    """A fresh process importing sparse_ext maps exactly one OpenMP runtime: torch's libgomp
    (our extension links libgomp.so.1 by SONAME, which resolves to the copy torch already
    loaded). Two runtimes would each start a thread pool sized to the machine."""
    out = subprocess.run([sys.executable, "-c", _MAPS_SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert len(out) == 1, f"expected one OpenMP runtime, found {out}"
    assert "libgomp" in out[0]


_FORK_SCRIPT = r"""
import os, torch, sparse_ext as se
torch.manual_seed(0)
mods = [(se.SparseLinear.from_dense(torch.nn.Linear(300, 256), sparsity=0.9), (64, 300)),
        (se.SparseLinear.from_dense(torch.nn.Linear(300, 256), pattern="2:4"), (64, 300)),
        (se.SparseConv2d.from_dense(torch.nn.Conv2d(16, 32, 3, padding=1), sparsity=0.8), (2, 16, 12, 12)),
        (se.MoELayer(64, 32, num_experts=4, top_k=2), (40, 64))]
xs = [torch.randn(s) for _, s in mods]
with torch.no_grad():
    ref = [m(x) for (m, _), x in zip(mods, xs)]   # the parent's OpenMP pool is now running
pid = os.fork()
if pid == 0:
    torch.set_num_threads(1)   # what DataLoader workers do
    with torch.no_grad():
        ok = all(torch.equal(m(x), r) for (m, _), x, r in zip(mods, xs, ref))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
raise SystemExit(os.waitstatus_to_exitcode(status))
"""


def test_forked_worker_single_thread():
    """A fork()ed child (a DataLoader worker) that sets one thread gets the parent's results.
    (A forked child that keeps several threads hangs in libgomp after the parent used its pool:
    a property of torch's OpenMP runtime, dense nn.Linear included; see docs/reliability.md.)"""
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

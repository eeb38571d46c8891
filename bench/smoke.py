"""A tiny correctness check of every family on a device against the CPU ops: outputs at fp32,
bf16 (and fp16 on CUDA), SpMM / N:M gradients. One PASS / FAIL line per check; seconds. The first
signal of a GPU run (bench/gpu_check.sh) and the fallback when pytest is missing.

    python -m bench.run --smoke --device cuda
"""
import copy

from bench.core.accuracy import short


def smoke(device="cuda"):
    """Tiny check of every family: outputs (and SpMM / N:M gradients) on ``device`` against the
    CPU ops. Prints one PASS / FAIL line per check; returns the number of failures. The fallback
    when pytest is missing, and a fast first signal before the test suite."""
    import torch
    from torch import nn

    import sparse_ext as se

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("smoke: FAIL: no CUDA device visible to torch (torch "
              f"{torch.__version__}, built with CUDA {torch.version.cuda})", flush=True)
        return 1
    failures = 0

    def check(name, fn):
        nonlocal failures
        try:
            err, tol = fn()
            ok = err <= tol
        except Exception as exc:  # noqa: BLE001
            ok, err, tol = False, short(exc), None
        failures += not ok
        print(f"smoke {'PASS' if ok else 'FAIL'} {name}: "
              + (f"max rel err {err:.2e} (tol {tol:.0e})" if tol is not None else str(err)),
              flush=True)

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        return float((a - b).abs().max() / max(float(b.abs().max()), 1e-12))

    torch.manual_seed(0)
    lin = nn.Linear(96, 72)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if dev.type == "cuda" else [])
    for pattern in ("unstructured", "4x1", "2:4", "1:8"):
        kw = {} if ":" in pattern else dict(sparsity=0.8)
        cpu = se.SparseLinear.from_dense(lin, pattern=pattern, **kw)
        for dt in dtypes:
            def fwd(cpu=cpu, dt=dt):
                x = torch.randn(5, 3, 96)
                ref = cpu(x)   # fp32 CPU op on the fp32 weights
                out = copy.deepcopy(cpu).to(device=dev, dtype=dt)(x.to(dev, dt))
                return rel(out, ref), 1e-4 if dt == torch.float32 else 3e-2
            check(f"SparseLinear {pattern} {str(dt)[6:]} forward", fwd)

        def grad(cpu=cpu):
            x = torch.randn(7, 96)
            xc, xd = x.clone().requires_grad_(), x.to(dev).requires_grad_()
            gpu = copy.deepcopy(cpu).to(dev)
            cpu(xc).square().sum().backward()
            gpu(xd).square().sum().backward()
            return max(rel(xd.grad, xc.grad), rel(gpu.values.grad, cpu.values.grad)), 1e-4
        check(f"SparseLinear {pattern} float32 backward (x, values)", grad)
    for k, stride in ((1, 1), (3, 1), (3, 2)):
        conv = nn.Conv2d(16, 24, k, stride, k // 2)
        cpu = se.SparseConv2d.from_dense(conv, sparsity=0.8, activation="relu")
        for dt in dtypes:
            def cfwd(cpu=cpu, dt=dt):
                x = torch.randn(2, 16, 11, 9)
                with torch.no_grad():
                    out = copy.deepcopy(cpu).to(device=dev, dtype=dt)(x.to(dev, dt))
                    return rel(out, cpu(x)), 1e-4 if dt == torch.float32 else 3e-2
            check(f"SparseConv2d k{k} s{stride} {str(dt)[6:]} forward", cfwd)
    moe = se.MoELayer(32, 48, 4, 2).eval()
    for dt in dtypes:
        def mfwd(dt=dt):
            x = torch.randn(2, 9, 32)
            with torch.no_grad():
                ref = moe(x)
                out = copy.deepcopy(moe).to(device=dev, dtype=dt)(x.to(dev, dt))
            return rel(out, ref), 1e-4 if dt == torch.float32 else 3e-2
        check(f"MoELayer {str(dt)[6:]} forward", mfwd)
    print(f"smoke: {failures} failure(s)", flush=True)
    return failures

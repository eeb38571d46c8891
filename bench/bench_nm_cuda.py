"""N:M on CUDA: ``nm_linear`` (every path) vs cuBLAS (``F.linear``) and PyTorch's 2:4.

Run on a GPU machine (one short run; GPU time is scarce):
    python -m bench.bench_nm_cuda [--out DIR] [--quick]
Times, in one process on the same inputs, with CUDA events (median of repeated calls after
warm-up): dense ``F.linear`` (cuBLAS), our op in auto mode, each forced path
(``SPARSE_EXT_NM_CUDA_PATH=cores|cusparselt|dense``: the data to tune the thresholds in
csrc/ops/cuda/nm_cuda.cpp and csrc/cuda/nm/nm_cuda.cu), and for 2:4 PyTorch's
``to_sparse_semi_structured``. Prints a table; with ``--out`` writes ``nm_cuda.json`` there.
TARGETS.md (CUDA): 2:4 >= 1.3x over cuBLAS on 4096+ shapes, 1:8 >= 2.5x.
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

import sparse_ext as se
from sparse_ext.formats import NMWeight

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
QUICK_SHAPES = [(4096, 4096)]
TOKENS = [1, 16, 64, 256, 1024, 4096]
QUICK_TOKENS = [1, 64, 1024]
PATTERNS = ["2:4", "1:4", "2:8", "1:8", "4:16"]
PATHS = ["auto", "cores", "cusparselt", "dense"]


def cuda_ms(fn, reps=20, warmup=5):
    """Median milliseconds of fn() over `reps` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def with_path(path, fn):
    def run():
        previous = os.environ.get("SPARSE_EXT_NM_CUDA_PATH")
        os.environ["SPARSE_EXT_NM_CUDA_PATH"] = path
        try:
            return fn()
        finally:
            if previous is None:
                os.environ.pop("SPARSE_EXT_NM_CUDA_PATH", None)
            else:
                os.environ["SPARSE_EXT_NM_CUDA_PATH"] = previous
    return run


def semi_structured(dense_weight):
    """PyTorch's own 2:4 weight (to_sparse_semi_structured), or None where it is unavailable."""
    try:
        from torch.sparse import to_sparse_semi_structured
        return to_sparse_semi_structured(dense_weight)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        print(f"  (torch semi-structured unavailable: {type(e).__name__}: {str(e)[:80]})")
        return None


def run(args):
    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    tokens_list = QUICK_TOKENS if args.quick else TOKENS
    rows = []
    for out_f, in_f in shapes:
        for pattern in PATTERNS:
            n, m = (int(v) for v in pattern.split(":"))
            torch.manual_seed(0)
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.float32)
            nm = NMWeight.from_dense(w, n, m).to(device=dev, dtype=dtype)
            dense_w = nm.to_dense()
            semi_w = semi_structured(dense_w) if pattern == "2:4" else None
            for tokens in tokens_list:
                x = torch.randn(tokens, in_f, device=dev, dtype=dtype)
                dense_ms = cuda_ms(lambda: F.linear(x, dense_w))
                row = {"shape": f"{out_f}x{in_f}", "pattern": pattern, "tokens": tokens,
                       "dtype": args.dtype, "dense_ms": dense_ms}
                for path in PATHS:
                    ms = cuda_ms(with_path(path, lambda: se.ops.nm_linear(x, nm)))
                    row[f"{path}_ms"] = ms
                    row[f"{path}_speedup"] = dense_ms / ms
                if semi_w is not None:
                    try:
                        ms = cuda_ms(lambda: F.linear(x, semi_w))
                        row["torch_2_4_ms"] = ms
                        row["torch_2_4_speedup"] = dense_ms / ms
                    except Exception as e:  # noqa: BLE001 - e.g. a shape it refuses
                        print(f"  (torch semi-structured failed at T={tokens}: {str(e)[:80]})")
                rows.append(row)
                print(f"{row['shape']:>11} {pattern:>5} T={tokens:<5} cuBLAS {dense_ms:8.4f} ms | "
                      + " ".join(f"{p} {row[p + '_speedup']:5.2f}x" for p in PATHS)
                      + (f" | torch 2:4 {row['torch_2_4_speedup']:5.2f}x"
                         if "torch_2_4_speedup" in row else ""), flush=True)
    for pattern in PATTERNS:
        sp = [r["auto_speedup"] for r in rows if r["pattern"] == pattern]
        print(f"geomean auto speedup {pattern}: "
              f"{math.exp(sum(math.log(v) for v in sp) / len(sp)):.2f}x over {len(sp)} points")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="", help="folder for nm_cuda.json")
    parser.add_argument("--quick", action="store_true", help="one shape, three token counts")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_nm_cuda: no CUDA device")
    rows = run(args)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
        with open(os.path.join(args.out, "nm_cuda.json"), "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

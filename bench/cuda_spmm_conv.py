"""CUDA benchmark of the SpMM and sparse-conv kernels against cuBLAS / cuDNN / cuSPARSE.

    python -m bench.cuda_spmm_conv OUT_DIR [--quick]

Times (CUDA events, median of repeated runs after warm-up, interleaved) our ``spmm`` against
dense ``F.linear`` (cuBLAS) and ``torch.sparse`` CSR (cuSPARSE) on LLM shapes, and
``sparse_conv2d`` against ``F.conv2d`` (cuDNN) on ResNet/MobileNet-like layers. Writes
``OUT_DIR/cuda_spmm_conv.json`` and ``OUT_DIR/cuda_spmm_conv.md`` (a table for docs/performance.md).
Needs a GPU; exits with a message otherwise.
"""
import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import sparse_ext as se


def cuda_median_ms(fns, reps=30, warmup=5):
    """Median GPU time (ms) of each callable, measured with CUDA events, run round-robin."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]


def bench_spmm(quick):
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (11008, 4096), (4096, 11008)]
    tokens = [1, 8, 64, 256, 1024] if not quick else [1, 256]
    rows = []
    for (M, K) in shapes:
        for sparsity, pattern in ((0.7, "unstructured"), (0.9, "unstructured"), (0.9, "4x1")):
            lin = torch.nn.Linear(K, M, bias=False)
            for dtype in (torch.float16, torch.bfloat16):
                sl = se.SparseLinear.from_dense(lin, sparsity=sparsity, pattern=pattern).to("cuda", dtype)
                dense = sl.weight_format().to_dense().contiguous()
                try:
                    csr = dense.to_sparse_csr()
                except RuntimeError:
                    csr = None
                for n in tokens:
                    x = torch.randn(n, K, device="cuda", dtype=dtype)
                    fns = [lambda: sl(x), lambda: F.linear(x, dense)]
                    if csr is not None:
                        xt = x.t().contiguous()
                        fns.append(lambda: torch.sparse.mm(csr, xt))
                    with torch.no_grad():
                        try:
                            ms = cuda_median_ms(fns)
                        except RuntimeError:  # cuSPARSE may reject a dtype: time without it
                            ms = cuda_median_ms(fns[:2]) + [float("nan")]
                    if len(ms) == 2:
                        ms.append(float("nan"))
                    rows.append({"op": "spmm", "M": M, "K": K, "N": n, "pattern": pattern,
                                 "sparsity": sparsity, "dtype": str(dtype).split(".")[-1],
                                 "ours_ms": ms[0], "cublas_ms": ms[1], "cusparse_ms": ms[2],
                                 "vs_cublas": ms[1] / ms[0], "vs_cusparse": ms[2] / ms[0]})
                    print(rows[-1], flush=True)
    return rows


def bench_conv(quick):
    layers = [(8, 256, 64, 56, 1, 1, 0), (8, 64, 64, 56, 3, 1, 1), (8, 512, 512, 14, 3, 1, 1),
              (8, 128, 128, 28, 3, 2, 1), (8, 1024, 256, 14, 1, 1, 0)]
    if quick:
        layers = layers[:2]
    rows = []
    for (B, ci, co, hw, k, s, p) in layers:
        conv = torch.nn.Conv2d(ci, co, k, stride=s, padding=p)
        for sparsity in (0.7, 0.9):
            m = se.SparseConv2d.from_dense(conv, sparsity=sparsity).to("cuda", torch.float16)
            w = m.dense_weight().contiguous()
            x = torch.randn(B, ci, hw, hw, device="cuda", dtype=torch.float16)
            with torch.no_grad():
                ms = cuda_median_ms([lambda: m(x), lambda: F.conv2d(x, w, m.bias, s, p)])
            rows.append({"op": "conv", "B": B, "C_in": ci, "C_out": co, "HW": hw, "k": k,
                         "stride": s, "sparsity": sparsity, "dtype": "float16",
                         "ours_ms": ms[0], "cudnn_ms": ms[1], "vs_cudnn": ms[1] / ms[0]})
            print(rows[-1], flush=True)
    return rows


def markdown(spmm_rows, conv_rows, device):
    out = [f"### SpMM and sparse conv on {device}", "",
           "| M x K | N | pattern | sparsity | dtype | ours ms | cuBLAS ms | cuSPARSE ms | vs cuBLAS | vs cuSPARSE |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in spmm_rows:
        out.append(f"| {r['M']}x{r['K']} | {r['N']} | {r['pattern']} | {r['sparsity']} | {r['dtype']} | "
                   f"{r['ours_ms']:.4f} | {r['cublas_ms']:.4f} | {r['cusparse_ms']:.4f} | "
                   f"{r['vs_cublas']:.2f}x | {r['vs_cusparse']:.2f}x |")
    out += ["", "| B, C_in -> C_out, HxW, k, stride | sparsity | ours ms | cuDNN ms | vs cuDNN |",
            "|---|---|---|---|---|"]
    for r in conv_rows:
        out.append(f"| {r['B']}, {r['C_in']}->{r['C_out']}, {r['HW']}x{r['HW']}, {r['k']}, {r['stride']} | "
                   f"{r['sparsity']} | {r['ours_ms']:.4f} | {r['cudnn_ms']:.4f} | {r['vs_cudnn']:.2f}x |")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_spmm_conv: SKIPPED: no GPU")
        return 0
    torch.manual_seed(0)
    os.makedirs(args.out_dir, exist_ok=True)
    spmm_rows, conv_rows = bench_spmm(args.quick), bench_conv(args.quick)
    device = torch.cuda.get_device_name(0)
    with open(os.path.join(args.out_dir, "cuda_spmm_conv.json"), "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "spmm": spmm_rows,
                   "conv": conv_rows}, f, indent=1)
    with open(os.path.join(args.out_dir, "cuda_spmm_conv.md"), "w") as f:
        f.write(markdown(spmm_rows, conv_rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())

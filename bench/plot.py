"""Plots of a benchmark run: one panel per question a user asks.

    python -m bench.plot bench/results/latest.json docs/img/speedup_vs_sparsity.png
"""
import json
import sys

from bench.common import geomean


def _linear_panel(ax, rows, shape):
    """Unstructured vs N:M vs row blocks at equal sparsity, one line per token count."""
    styles = {"unstructured": "o-", "N:M": "s--", "block": "^:"}
    for fam_rows, kind in ((rows["spmm"], None), (rows["nm"], "N:M")):
        series = {}
        for r in fam_rows:
            if r["shape"] != shape or r.get("dtype", "float32") != "float32":
                continue
            k = kind or ("unstructured" if r["pattern"] == "unstructured" else "block")
            series.setdefault((k, r["tokens"]), []).append(r)
        for (k, tokens), pts in sorted(series.items()):
            pts.sort(key=lambda r: r["sparsity"])
            label = f"{k} N={tokens}" + (f" ({', '.join(p['pattern'] for p in pts)})" if k != "unstructured" else "")
            ax.plot([100 * p["sparsity"] for p in pts], [p["speedup"] for p in pts], styles[k],
                    label=label, markersize=4)
    ax.set_title(f"linear {shape}: which pattern?")
    ax.set_xlabel("sparsity (%)")


def _conv_panel(ax, rows):
    layers = [r for r in rows if "x" in r["shape"].split()[-1] and "end-to-end" not in r["shape"]
              and r["pattern"] == "unstructured" and " k" not in r["shape"]]
    by_sparsity = {}
    for r in layers:
        by_sparsity.setdefault(r["sparsity"], []).append(r["speedup"])
    xs = sorted(by_sparsity)
    ax.plot([100 * s for s in xs], [geomean(by_sparsity[s]) for s in xs], "o-",
            label="1x1 layers, geomean")
    ax.plot([100 * s for s in xs], [min(by_sparsity[s]) for s in xs], "v:", label="1x1 layers, worst")
    for r in rows:
        if "end-to-end" in r["shape"]:
            ax.plot([100 * r["sparsity"]], [r["speedup"]], "*", markersize=10,
                    label=r["shape"].split(" end")[0] + " end to end")
    ax.set_title("MobileNet convs (batch 1, 224x224)")
    ax.set_xlabel("sparsity of 1x1 layers (%)")


def _moe_panel(ax, rows):
    pts = sorted(rows, key=lambda r: r["tokens"])
    xs = [str(r["tokens"]) for r in pts]
    ax.bar(xs, [r["speedup"] for r in pts], color="tab:blue", label="vs HF Mixtral block")
    if all("vs_floor" in r for r in pts):
        ax.plot(xs, [1.0 / r["vs_floor"] for r in pts], "ko--", label="floor / ours (>1: beat floor)")
    ax.set_title("MoE layer (h1024 f2816 8 experts top-2)")
    ax.set_xlabel("tokens")


def _minilm_panel(ax, rows):
    series = {}
    for r in rows:
        series.setdefault((r["shape"], r["pattern"] == "unstructured"), []).append(r)
    for (shape, unstructured), pts in sorted(series.items()):
        pts.sort(key=lambda r: r["sparsity"])
        ax.plot([100 * p["sparsity"] for p in pts], [p["speedup"] for p in pts],
                "o-" if unstructured else "s", label=shape.replace("all-MiniLM-L6-v2 ", "")
                + ("" if unstructured else " 2:4"))
    ax.set_title("all-MiniLM-L6-v2 encoder")
    ax.set_xlabel("sparsity (%)")


def plot(rows, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = {f: [r for r in rows if r["family"] == f] for f in ("spmm", "nm", "conv", "moe", "minilm")}
    panels = []
    shapes = list(dict.fromkeys(r["shape"] for r in fams["spmm"] + fams["nm"]))
    panels += [lambda ax, s=s: _linear_panel(ax, fams, s) for s in shapes]
    if fams["conv"]:
        panels.append(lambda ax: _conv_panel(ax, fams["conv"]))
    if fams["moe"]:
        panels.append(lambda ax: _moe_panel(ax, fams["moe"]))
    if fams["minilm"]:
        panels.append(lambda ax: _minilm_panel(ax, fams["minilm"]))
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, draw in zip(axes.flat, panels):
        draw(ax)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel("speedup over dense PyTorch (x)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"sparse_ext vs dense PyTorch, same process: {machine.get('cpu')}, "
                 f"{machine.get('threads')} threads, {machine.get('isa')}, torch {machine.get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main():
    with open(sys.argv[1]) as f:
        result = json.load(f)
    print(plot(result["rows"], sys.argv[2], result["machine"]))


if __name__ == "__main__":
    main()

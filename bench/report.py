"""Markdown report of a benchmark JSON (what docs/performance.md embeds).

    python -m bench.report bench/results/latest.json [--plot docs/img/speedup_vs_sparsity.png]
"""
import argparse
import json

COLUMNS = [("shape", "{}"), ("pattern", "{}"), ("sparsity", "{:.0%}"), ("tokens", "{}"),
           ("dtype", "{}"), ("dense_ms", "{:.3f}"), ("ours_ms", "{:.3f}"), ("speedup", "{:.2f}x"),
           ("gflops", "{:.1f}"), ("torch_sparse_ms", "{:.3f}"), ("vs_torch_sparse", "{:.2f}x")]


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None:
        return ""
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def markdown(result, plot=None):
    machine = result["machine"]
    out = [f"Measured {result.get('time', '')} on: {machine.get('cpu')}, {machine.get('cores')} cores, "
           f"{machine.get('threads')} threads, ISA `{machine.get('isa')}`, torch {machine.get('torch')}."
           " Ratios are medians of interleaved runs in one process.", ""]
    rows = result["rows"]
    for family in dict.fromkeys(r["family"] for r in rows):
        fam = [r for r in rows if r["family"] == family]
        cols = [(k, f) for k, f in COLUMNS if any(r.get(k) is not None for r in fam)]
        extra = sorted({k for r in fam for k in r} - {k for k, _ in COLUMNS} - {"family", "weight_bytes_ratio"})
        cols += [(k, "{:.3g}" if isinstance(fam[0].get(k), float) else "{}") for k in extra]
        out.append(f"### {family}")
        out.append("")
        out.append("| " + " | ".join(k for k, _ in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in fam:
            out.append("| " + " | ".join(_cell(r, k, f) for k, f in cols) + " |")
        out.append("")
    if result.get("targets"):
        out.append("### Targets")
        out.append("")
        out += [f"- {line}" for line in result["targets"]]
        out.append("")
    if plot:
        out.append(f"![speedup vs sparsity]({plot})")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_path")
    parser.add_argument("--plot", default=None, help="image path to reference below the tables")
    args = parser.parse_args()
    with open(args.json_path) as f:
        print(markdown(json.load(f), args.plot))


if __name__ == "__main__":
    main()

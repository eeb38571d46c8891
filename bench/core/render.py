"""The report of a run, on the console and as markdown: one compact table per family (the columns
it declares, at most 120 characters a line), its target checks, then one summary line per family.
Every other metric a case measured stays in the JSON."""
import os

from bench.common import geomean
from bench.core.targets import met_count
from bench.table import Column, render, text

WIDTH = 120


def fit(line, width=WIDTH):
    return line if len(line) <= width else line[:width - 3] + "..."


def measured(rows):
    """The rows that have a speedup (not failed, not skipped)."""
    return [r for r in rows if r.get("speedup") is not None and not r.get("error")]


def family_section(plugin, rows, targets):
    """Title, table, failed cases and target lines of one family, as console text."""
    ok = measured(rows)
    out = [plugin.TITLE]
    if ok:
        out.append(render(ok, plugin.COLUMNS))
    out += [fit(f"  failed: {plugin.label(r)}: {r['error']}") for r in rows if r.get("error")]
    out += [fit(f"  {t.line()}") for t in targets]
    return "\n".join(out)


def summary_row(plugin, rows, targets):
    """One family's line of the summary: geomean speedup, best and worst case, targets met."""
    ok = measured(rows)
    row = {"family": plugin.NAME, "cases": len(ok), "failed": (len(rows) - len(ok)) or None}
    met, checked = met_count(targets)
    if checked:
        row["targets"] = f"{met}/{checked}"
    if ok:
        best = max(ok, key=lambda r: r["speedup"])
        worst = min(ok, key=lambda r: r["speedup"])
        row.update(geomean=geomean([r["speedup"] for r in ok]),
                   best=f"{best['speedup']:.2f}x {plugin.label(best)}",
                   worst=f"{worst['speedup']:.2f}x {plugin.label(worst)}")
    return row


SUMMARY_COLUMNS = [text("family", "family"), Column("cases", "cases"), Column("failed", "failed"),
                   Column("geomean", "geomean", "{:.2f}x"), Column("targets", "targets"),
                   text("best", "best", 36), text("worst", "worst", 36)]


def console_report(sections):
    """``sections``: [(plugin, rows, targets)] -> the tables, then the summary."""
    out = []
    for plugin, rows, targets in sections:
        if rows:
            out += ["", family_section(plugin, rows, targets)]
    summary = [summary_row(p, rows, targets) for p, rows, targets in sections if rows]
    if summary:
        out += ["", render(summary, SUMMARY_COLUMNS,
                           "Summary: speedup over each family's baseline; targets: met / checked")]
    return "\n".join(out)


# ---- markdown ------------------------------------------------------------------------------------
def _md_cell(column: Column, row):
    return column.cell(row).replace("|", "\\|")


def markdown(result, plugins):
    """The report of a run's JSON ``result`` as markdown: what docs/performance.md embeds.
    ``plugins``: {family name: plugin module}."""
    m = result.get("machine", {})
    if result.get("device", "cpu").startswith("cuda"):
        head = (f"Measured {result.get('time', '')} on {m.get('gpu')} (torch {m.get('torch')}, "
                f"CUDA {m.get('cuda')}, driver {m.get('driver')}), {result.get('size')} size, "
                f"{'L2 flushed before every call' if result.get('flush_l2') else 'L2 warm'}; "
                f"TF32 matmul {'on' if m.get('allow_tf32') else 'off'}. Medians of interleaved "
                "CUDA-event samples in one process; errors are max |out - fp64 reference|.")
    else:
        head = (f"Measured {result.get('time', '')} on: {m.get('cpu')}, {m.get('cores')} cores, "
                f"{m.get('threads')} threads, ISA `{m.get('isa')}`, torch {m.get('torch')}. "
                "Ratios are medians of interleaved runs in one process.")
    out = [head, ""]
    rows = result.get("rows", [])
    device = result.get("device", "cpu").split(":")[0]
    # Checked again from the rows, so a JSON of an older run reads in today's words.
    checks = {family: plugin.targets([r for r in rows if r.get("family") == family], device)
              for family, plugin in plugins.items()}
    if any(checks.values()):
        out += ["#### Targets", ""]
        out += [f"- {family}: {t.line()}" for family, targets in checks.items() for t in targets]
        out.append("")
    for family, plugin in plugins.items():
        fam = [r for r in rows if r.get("family") == family]
        if not fam:
            continue
        columns = list(plugin.COLUMNS) + [text("error", "error")]
        cols = [c for c in columns if any(c.cell(r) for r in fam)]
        out += [f"#### {family}", ""]
        note = getattr(plugin, "BASELINES", {}).get(device)
        if note:
            out += [note, ""]
        out.append("| " + " | ".join(c.header for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        out += ["| " + " | ".join(_md_cell(c, r) for c in cols) + " |" for r in fam]
        out.append("")
    out += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(out).rstrip() + "\n"


DOCS_BEGIN = "<!-- cuda-results:begin -->"
DOCS_END = "<!-- cuda-results:end -->"


def update_docs(result, plugins, path=os.path.join("docs", "performance.md"), summary=None):
    """Replaces the text between the cuda-results markers of ``path`` (performance.md's CUDA
    section) with the report of ``result`` (and a gpu_check summary.md, when given)."""
    with open(path) as f:
        page = f.read()
    if DOCS_BEGIN not in page or DOCS_END not in page:
        raise ValueError(f"{path} has no {DOCS_BEGIN} ... {DOCS_END} markers")
    head, rest = page.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    body = markdown(result, plugins)
    if summary:   # its headings below this section's
        summary = "\n".join("#### " + line.lstrip("#").strip() if line.startswith("#") else line
                            for line in summary.strip().splitlines())
        body += "\n<details><summary>gpu_check summary</summary>\n\n" + summary + "\n\n</details>\n"
    body = body.replace("\n#### ", "\n### ")   # one level up: subsections of "## CUDA"
    with open(path, "w") as f:
        f.write(head + DOCS_BEGIN + "\n" + body + DOCS_END + tail)
    return path

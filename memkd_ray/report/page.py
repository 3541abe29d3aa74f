"""The report's HTML: one self-contained page (inline CSS, no scripts, no remote assets)
that refers only to the PNGs beside it."""

from __future__ import annotations

from html import escape
from typing import Any

import numpy as np
import yaml

from memkd_ray.checkpoint_format import checkpoint_decision
from memkd_ray.config import MEMORY_SITES
from memkd_ray.metrics import METRIC_LABELS, nan_mean, percent
from memkd_ray.report.paper import METHODS, PaperResults
from memkd_ray.report.run_data import CategoryResult, RunData

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: bold; border-top: 2px solid #888; }
tr.paper td { color: #555; font-style: italic; }
td.failed { color: #b00; text-align: left; }
table.info td { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
code { font-size: 0.9em; }
.note { color: #666; font-size: 0.9em; }
.wide { overflow-x: auto; font-size: 0.85em; }
"""


def render_page(run: RunData, figures: dict[str, dict[str, str]],
                paper: PaperResults | None, version: str) -> str:
    """`figures`: category -> {"curves"|"losses"|"examples": PNG file name}."""
    benchmarks = sorted({c.benchmark for c in run.categories})
    parts = [
        f"<h1>memkd-ray {run.kind} run <code>{escape(run.run_id)}</code></h1>",
        f"<p>Benchmark {escape(', '.join(benchmarks) or '-')}; results "
        f"<code>{escape(run.results_uri)}</code>; report by memkd-ray {escape(version)}.</p>",
        "<h2>Test metrics (%)</h2>",
        _metrics_table(run, paper),
    ]
    parts += ["<h2>Decisions on the test split</h2>", _decisions_table(run)]
    parts += ["<h2>What the memories recall</h2>", _recall_table(run)]
    if run.kind == "tune":
        parts += ["<h2>Trials</h2>", _trials_table(run.rows)]
    for category in run.categories:
        parts.append(_category_section(category, figures.get(category.category, {})))
    parts += ["<h2>Run</h2>", _run_section(run)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>memkd-ray run {escape(run.run_id)}</title>\n<style>{STYLE}</style>\n"
            f"</head>\n<body>\n{body}\n</body>\n</html>\n")


def _header_row(names: list[str]) -> str:
    return "<tr>" + "".join(f"<th>{escape(name)}</th>" for name in names) + "</tr>"


def _cell(category: str, metric: str, value: float | None) -> str:
    # data-* attributes name each number, so tools (and the tests) can read the table back.
    return (f'<td data-category="{escape(category)}" data-metric="{metric}">'
            f"{percent(value)}</td>")


PAPER_PRO_MARK = "\u2020"
PAPER_PRO_NOTE = (
    "The paper's P-PRO is not this page's AU-PRO. Its RD row comes from RD's evaluation code, "
    "which computes PRO per defective image with 200 evenly spaced thresholds, rescales each "
    "image's FPR axis by its own maximum below 0.3 and averages over images; the paper does "
    "not say that its MemKD row was computed differently. AU-PRO here is the official MVTec "
    "AD metric: regions over the whole test set, every distinct score a threshold, the area "
    "up to FPR 0.3 divided by 0.3. The two can differ by several points on the same maps."
)


def _metrics_table(run: RunData, paper: PaperResults | None) -> str:
    per_category = bool(paper and paper.categories)
    header = ["category", *METRIC_LABELS.values()]
    if per_category:
        header += [f"{method} (paper) I-AUROC" for method in METHODS]
    header.append("status")
    lines = ["<table>", _header_row(header)]
    for c in run.categories:
        cells = [f"<td>{escape(c.category)}</td>"]
        cells += [_cell(c.category, key, c.metrics[key]) for key in METRIC_LABELS]
        if per_category:
            cells += [_paper_cell(paper.category(c.category, method, "image_auroc"))
                      for method in METHODS]
        failed = c.status != "ok"
        cells.append(f'<td class="{"failed" if failed else ""}">{escape(c.status)}</td>')
        lines.append("<tr>" + "".join(cells) + "</tr>")
    done = [c for c in run.categories if c.status == "ok"]
    if done:
        cells = [f"<td>mean of {len(done)}</td>"]
        cells += [_cell("mean", key, nan_mean([c.metrics[key] for c in done]))
                  for key in METRIC_LABELS]
        if per_category:
            cells += ["<td></td>"] * len(METHODS)
        lines.append('<tr class="mean">' + "".join(cells) + "<td></td></tr>")
    if paper:
        for method in METHODS:
            cells = [f"<td>{method}, paper {escape(paper.source)}</td>"]
            cells += [_paper_cell(paper.mean.get(method, {}).get(key),
                                  PAPER_PRO_MARK if key == "pixel_aupro" else "")
                      for key in METRIC_LABELS]
            cells += ["<td></td>"] * ((len(METHODS) if per_category else 0) + 1)
            lines.append('<tr class="paper">' + "".join(cells) + "</tr>")
    lines.append("</table>")
    if paper and any("pixel_aupro" in values for values in paper.mean.values()):
        lines.append(f'<p class="note">{PAPER_PRO_MARK} {escape(PAPER_PRO_NOTE)}</p>')
    if paper and len(done) != paper.category_count:
        lines.append('<p class="note">The paper\'s means cover every category of the '
                     "benchmark; this run's mean covers the categories above.</p>")
    return "\n".join(lines)


def _decisions_table(run: RunData) -> str:
    """Per category, at its calibrated threshold: normal test images flagged and defective
    ones caught, counted from the evaluation record's scores; and the totals."""
    header = ["category", "threshold", "target FPR", "held-out normals", "normal flagged",
              "defective caught"]
    lines = ["<table>", _header_row(header)]
    flagged_total = normal_total = 0
    for c in run.categories:
        decision = checkpoint_decision(c.meta or {}, c.checkpoint_uri)
        if decision is None or c.record is None:
            why = "no decision (trained without one)" if decision is None else "no record"
            lines.append(f"<tr><td>{escape(c.category)}</td>"
                         f'<td colspan="5" class="note">{why}</td></tr>')
            continue
        scores = np.array([row["score"] for row in c.record.images], np.float64)
        labels = np.array([row["label"] for row in c.record.images])
        flags = decision.anomalous(scores)
        normal, defective = labels == 0, labels == 1
        flagged_total += int(flags[normal].sum())
        normal_total += int(normal.sum())
        target = "" if decision.target_fpr is None else f"{100 * decision.target_fpr:g} %"
        lines.append(
            f"<tr><td>{escape(c.category)}</td><td>{decision.threshold:.4g}</td>"
            f"<td>{target}</td><td>{decision.held_out_images}</td>"
            f'<td data-category="{escape(c.category)}" data-metric="normal_flagged">'
            f"{_count(flags[normal])}</td>"
            f'<td data-category="{escape(c.category)}" data-metric="defect_caught">'
            f"{_count(flags[defective])}</td></tr>")
    if normal_total:
        lines.append(f'<tr class="mean"><td>all categories</td><td></td><td></td><td></td>'
                     f"<td>{flagged_total} of {normal_total} "
                     f"({100 * flagged_total / normal_total:.1f} %)</td><td></td></tr>")
    lines.append("</table>")
    lines.append('<p class="note">Each threshold was fitted on normal training images held '
                 "out from training (memkd-ray's normal prediction bound for the target "
                 "false-positive rate); the test split only reports how it does.</p>")
    return "\n".join(lines)


def _recall_table(run: RunData) -> str:
    """Per category and memory, the Eq. 10 error of its recall on held-out normal images after
    the first and the last epoch, next to the errors of a zero vector and of the mean training
    feature (engine/memory_recall.py), from the checkpoint's per-epoch history."""
    header = ["category", "memory", "after epoch 1", "after the last epoch", "zero vector",
              "mean training feature", "last / mean"]
    lines = ["<table>", _header_row(header)]
    for c in run.categories:
        epochs = [e for e in c.history if any(k.startswith("recall_error_") for k in e)]
        if not epochs:
            why = ("no memory" if c.meta and not _has_memory(c.meta)
                   else "not measured (no held-out normal images, or trained before this)")
            lines.append(f"<tr><td>{escape(c.category)}</td>"
                         f'<td colspan="6" class="note">{why}</td></tr>')
            continue
        first, last = epochs[0], epochs[-1]
        for site in MEMORY_SITES:
            if f"recall_error_{site}" not in last:
                continue
            ratio = last[f"recall_error_{site}"] / last[f"recall_mean_{site}"]
            values = [first[f"recall_error_{site}"], last[f"recall_error_{site}"],
                      last[f"recall_zero_{site}"], last[f"recall_mean_{site}"]]
            lines.append(f"<tr><td>{escape(c.category)}</td><td>{site}</td>"
                         + "".join(f"<td>{v:.4g}</td>" for v in values)
                         + f'<td data-category="{escape(c.category)}" '
                           f'data-metric="recall_ratio_{site}">{ratio:.2f}</td></tr>')
    lines.append("</table>")
    lines.append('<p class="note">Squared distance between held-out normal teacher features '
                 "and what the memory rebuilds from them (Eq. 10), averaged over positions. "
                 "A ratio near 1 means the memory recalls no more than the average normal "
                 "feature of its stage.</p>")
    return "\n".join(lines)


def _has_memory(meta: dict[str, Any]) -> bool:
    memory = meta.get("config", {}).get("memory", {})
    return bool(memory.get("enabled", True)) and any(memory.get("items", [1]))


def _count(flags: np.ndarray) -> str:
    if not flags.size:
        return "-"
    return f"{int(flags.sum())} of {flags.size} ({100 * flags.mean():.1f} %)"


def _paper_cell(value: float | None, mark: str = "") -> str:
    return f"<td>{'' if value is None else f'{value:.1f}{mark}'}</td>"


def _trials_table(rows: list[dict[str, Any]]) -> str:
    params = sorted({k for row in rows for k in row if k.startswith("param.")})
    header = ["category", "trial", *(p.removeprefix("param.") for p in params), "epochs",
              "selection", "test I-AUROC", ""]
    lines = ['<div class="wide"><table>', _header_row(header)]
    for row in rows:
        notes = " ".join(filter(None, ("selected" if row["selected"] else "",
                                       "default" if row["is_default"] else "")))
        values = [row["category"], row["trial_id"], *(_short(row.get(p)) for p in params),
                  str(row["epochs"]),
                  f"{row['selection_metric']} {percent(row['selection_value'])}",
                  percent(row["test_image_auroc"]), notes]
        lines.append("<tr>" + "".join(f"<td>{escape(str(v))}</td>" for v in values) + "</tr>")
    lines.append("</table></div>")
    lines.append('<p class="note">Test metrics exist for the selected and the default trial '
                 "only: selection never looks at the test split.</p>")
    return "\n".join(lines)


def _short(value: object) -> str:
    if value is None:  # a category a stopped search did not finish has no parameters
        return ""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _category_section(c: CategoryResult, figures: dict[str, str]) -> str:
    parts = [f'<h2 id="{escape(c.category)}">{escape(c.benchmark)} / {escape(c.category)}</h2>']
    if c.meta:
        parts.append(f"<p>Checkpoint of epoch {c.meta['epoch']}: "
                     f"<code>{escape(c.checkpoint_uri)}</code></p>")
    else:
        parts.append(f'<p class="note">No checkpoint ({escape(c.status)}).</p>')
    titles = {"curves": "ROC and PRO curves", "losses": "Training losses per epoch",
              "examples": "Examples: ground truth and anomaly map"}
    for kind, title in titles.items():
        if kind in figures:
            parts.append(f"<h3>{title}</h3>\n"
                         f'<img src="{escape(figures[kind])}" alt="{escape(c.category)} {kind}">')
    if c.meta and c.record is None:
        parts.append('<p class="note">This checkpoint has no evaluation record (trained by an '
                     "older memkd-ray): no curves or examples.</p>")
    return "\n".join(parts)


def _run_section(run: RunData) -> str:
    metas = [c for c in run.categories if c.meta]
    if not metas:
        return '<p class="note">No checkpoints.</p>'
    first = metas[0].meta
    teacher = first["teacher"]
    lines = [
        '<table class="info">',
        f"<tr><td>run</td><td><code>{escape(run.run_uri)}</code></td></tr>",
        f"<tr><td>teacher</td><td>{escape(teacher['name'])} "
        f"(weights {escape(str(teacher['weights']))})</td></tr>",
        f"<tr><td>trained by</td><td>memkd-ray {escape(first['package_version'])}</td></tr>",
    ]
    for c in metas:
        lines.append(f"<tr><td>checkpoint {escape(c.category)}</td>"
                     f"<td><code>{escape(c.checkpoint_uri)}</code></td></tr>")
    lines.append("</table>")
    note = ("the selected trial of each category differs only in the searched keys (Trials)"
            if run.kind == "tune" else "the same for every category")
    lines.append(f"<h3>Configuration of {escape(metas[0].category)} ({note})</h3>")
    lines.append(f"<pre>{escape(yaml.safe_dump(first['config'], sort_keys=False))}</pre>")
    return "\n".join(lines)

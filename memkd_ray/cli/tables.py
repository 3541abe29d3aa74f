"""Tables and one-line summaries the commands print (percent with one decimal, the paper's
units)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from memkd_ray.metrics import METRIC_LABELS, nan_mean, percent

if TYPE_CHECKING:
    from memkd_ray.storage.registry import Promotion


def format_tune_table(rows: list[dict]) -> str:
    """One line per trial: its searched values, its selection score, and for the selected
    trial of each category its test metrics (percent, one decimal)."""
    params = sorted({k for row in rows for k in row if k.startswith("param.")})
    header = ["category", "trial", *(p.removeprefix("param.") for p in params), "epochs",
              "selection", "test I-AUROC", "test AU-PRO", ""]
    lines = [header]
    for row in rows:
        lines.append([row["category"], row["trial_id"],
                      *(_short(row.get(p)) for p in params), str(row["epochs"]),
                      percent(row["selection_value"]),
                      percent(row["test_image_auroc"]), percent(row["test_pixel_aupro"]),
                      " ".join(filter(None, (
                          f"selected on {row['selected_on']}" if row["selected"] else "",
                          "default" if row["is_default"] else "")))])
    return render_table(lines)


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def format_promotion(promotion: Promotion) -> str:
    """What a registry offer did, in one line."""
    c = promotion.candidate
    where = f"{c['benchmark']}/{c['category']}"
    if promotion.promoted:
        return (f"registry: {where} <- run {c['run_id']} "
                f"(I-AUROC {percent(c['metrics']['image_auroc'])})")
    best = promotion.best or {}
    return (f"registry: {where} keeps run {best.get('run_id', '?')} "
            f"(I-AUROC {percent(best.get('metrics', {}).get('image_auroc', math.nan))}); "
            f"run {c['run_id']} not better")


def format_models_table(cards: list[dict]) -> str:
    """One line per registered model: metrics in percent, source run, age, size."""
    now = datetime.now(timezone.utc)
    lines = [["benchmark", "category", *METRIC_LABELS.values(), "run", "age",
              "size"]]
    for card in cards:
        promoted = datetime.fromisoformat(card["promoted_at"])
        age_h = (now - promoted).total_seconds() / 3600
        lines.append([card["benchmark"], card["category"],
                      *(percent(card["metrics"][key]) for key in METRIC_LABELS),
                      card["run_id"], f"{age_h:.1f}h" if age_h < 48 else f"{age_h / 24:.0f}d",
                      f"{card['size_bytes'] / 2**20:.1f} MiB"])
    return render_table(lines)


DECISION_LABELS = {"normal_flag_rate": "normal flagged", "defect_catch_rate": "caught"}


def format_results_table(rows: list[dict]) -> str:
    """Per-category metrics in percent with one decimal (the paper's units), plus the mean;
    and, at each category's decision threshold, the test normals flagged and defects caught
    (runs from before decisions have no such columns)."""
    labels = {**METRIC_LABELS, **DECISION_LABELS}
    header = ["category", *labels.values(), "status"]
    lines = [[row["category"], *(percent(row.get(key, math.nan)) for key in labels),
              row.get("status", "ok")] for row in rows]
    done = [row for row in rows if row.get("status", "ok") == "ok"]
    if len(done) > 1:
        means = [percent(nan_mean([row.get(key, math.nan) for row in done])) for key in labels]
        lines.append(["mean", *means, f"{len(done)} ok"])
    return render_table([header, *lines])


def render_table(lines: list[list[str]]) -> str:
    """Columns padded to width: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(*lines, strict=True)]
    return "\n".join("  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
                     for cells in lines)

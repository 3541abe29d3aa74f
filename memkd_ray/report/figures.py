"""The report's PNGs, drawn with matplotlib's object API (no pyplot state, any thread)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from memkd_ray.eval_record import EvalRecord
from memkd_ray.metrics import PRO_FPR_LIMIT

DPI = 100
LOSS_TERMS = (("loss", "L (Eq. 11)"), ("kd", "L_KD (Eq. 1-2)"), ("nm", "L_NM (Eq. 10)"),
              ("orth", "L_Orth (Eq. 7)"))
ROLE_TITLES = {"worst_normal": "worst-scored normal", "best_defective": "best-scored defective",
               "worst_defective": "worst-scored defective"}


def curves_figure(record: EvalRecord, metrics: dict[str, float], path: Path) -> Path:
    """Image ROC, pixel ROC and the PRO curve up to the FPR limit that AU-PRO integrates."""
    panels = (("image_roc", "Image ROC", "image_auroc", 1.0, "TPR"),
              ("pixel_roc", "Pixel ROC", "pixel_auroc", 1.0, "TPR"),
              ("pro", f"PRO (FPR ≤ {PRO_FPR_LIMIT})", "pixel_aupro", PRO_FPR_LIMIT,
               "per-region overlap"))
    figure = Figure(figsize=(12, 3.8), dpi=DPI, layout="constrained")
    for axes, (name, title, metric, x_max, y_label) in zip(figure.subplots(1, 3), panels,
                                                           strict=True):
        axes.set(title=title, xlabel="FPR", ylabel=y_label, xlim=(0, x_max), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        if name not in record.curves:
            axes.text(0.5, 0.5, "undefined for this test split", ha="center",
                      transform=axes.transAxes)
            continue
        x, y = record.curves[name]
        area = metrics.get(metric, math.nan)
        axes.plot(x, y, color="tab:blue", label=f"area {100 * area:.1f}")
        if name != "pro":
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
        axes.legend(loc="lower right")
    figure.savefig(path)
    return path


def loss_figure(history: list[dict[str, float]], path: Path) -> Path:
    """One panel per loss term against the epoch: the terms differ by orders of magnitude."""
    figure = Figure(figsize=(12, 3.2), dpi=DPI, layout="constrained")
    epochs = [row["epoch"] for row in history]
    for axes, (key, title) in zip(figure.subplots(1, len(LOSS_TERMS)), LOSS_TERMS, strict=True):
        values = [row.get(key, math.nan) for row in history]
        axes.set(title=title, xlabel="epoch")
        axes.grid(alpha=0.3)
        if values and all(v == 0 for v in values):
            axes.text(0.5, 0.5, "off (weight 0 or no memory)", ha="center",
                      transform=axes.transAxes)
        axes.plot(epochs, values, marker="o", markersize=3)
    figure.savefig(path)
    return path


def examples_figure(record: EvalRecord, path: Path) -> Path:
    """Per example: the image, its ground truth, and the anomaly map over it on the
    category's common colour scale (the lowest to the highest map value of its test set)."""
    roles = list(record.examples)
    scores = {row["example"]: row for row in record.images if row["example"]}
    figure = Figure(figsize=(9, 3.1 * len(roles)), dpi=DPI, layout="constrained")
    grid = np.atleast_2d(figure.subplots(len(roles), 3))
    low, high = record.map_range
    for axes_row, role in zip(grid, roles, strict=True):
        example, row = record.examples[role], scores[role]
        axes_row[0].imshow(example["image"])
        axes_row[0].set_title(f"{ROLE_TITLES[role]}\n{row['id']}", fontsize=9)
        axes_row[1].imshow(example["mask"], cmap="gray", vmin=0, vmax=1)
        axes_row[1].set_title("ground truth", fontsize=9)
        axes_row[2].imshow(example["image"])
        heat = axes_row[2].imshow(example["map"], cmap="jet", alpha=0.5, vmin=low, vmax=high)
        axes_row[2].set_title(f"anomaly map, score {row['score']:.3f}", fontsize=9)
        for axes in axes_row:
            axes.set_axis_off()
        figure.colorbar(heat, ax=axes_row[2], fraction=0.046)
    figure.savefig(path)
    return path

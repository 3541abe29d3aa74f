"""The five metrics of the paper (Sec. 5.2), as fractions in [0, 1].

Image AUROC/AP over all test images, pixel AUROC/AP over all test pixels (normal images
included), and AU-PRO up to a false-positive rate of 0.3 computed as the official MVTec AD
evaluation does (global over the test set, exact thresholds), not RD's 200-threshold variant.
"""

from __future__ import annotations

import math
from bisect import bisect_left

import numpy as np
from scipy.ndimage import label as label_regions
from sklearn.metrics import auc, average_precision_score, roc_curve

from memkd_ray.config import MEMORY_SITES

METRIC_KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
# The paper's column names (Table 1), for tables printed in its units.
METRIC_LABELS = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "pixel_auroc": "P-AUROC",
                 "pixel_ap": "P-AP", "pixel_aupro": "AU-PRO"}
PRO_FPR_LIMIT = 0.3

# How well each NR Memory recalls normal features it never trained on (engine/memory_recall.py):
# per memory site, the Eq. 10 error of its recall on held-out normal images, and the same
# error for two recalls that learn nothing, a zero vector and the stage's mean training
# feature. NaN where a run has no memory there or held out no image.
RECALL_KINDS = ("recall_error", "recall_zero", "recall_mean")
RECALL_KEYS = tuple(f"{kind}_{site}" for site in MEMORY_SITES for kind in RECALL_KINDS)


Curve = tuple[np.ndarray, np.ndarray]


def compute_metrics(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None
) -> dict[str, float]:
    """maps: (N, H, W) float; masks: (N, H, W) binary; labels: (N,) 0/1; scores default to
    the maximum of each map."""
    return metrics_and_curves(maps, masks, labels, scores)[0]


def metrics_and_curves(
    maps: np.ndarray, masks: np.ndarray, labels: np.ndarray, scores: np.ndarray | None = None
) -> tuple[dict[str, float], dict[str, Curve]]:
    """The five metrics and the curves three of them are areas of: `image_roc` and
    `pixel_roc` (FPR, TPR) and `pro` (FPR, per-region overlap), each only where the test split
    defines it. The curves cost nothing extra: the areas are computed from them."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    labels = np.asarray(labels).astype(int)
    if scores is None:
        scores = maps.reshape(len(maps), -1).max(axis=1)
    curves: dict[str, Curve] = {}
    if _both_classes(labels):
        curves["image_roc"] = roc_curve(labels, scores)[:2]
    if _both_classes(masks):
        curves["pixel_roc"] = roc_curve(masks.ravel(), maps.ravel())[:2]
        curves["pro"] = pro_curve(maps, masks)
    nan = float("nan")
    result = {
        # The area under roc_curve's points is exactly what roc_auc_score computes.
        "image_auroc": auc(*curves["image_roc"]) if "image_roc" in curves else nan,
        "image_ap": _safe(average_precision_score, labels, scores),
        "pixel_auroc": auc(*curves["pixel_roc"]) if "pixel_roc" in curves else nan,
        "pixel_ap": _safe(average_precision_score, masks.ravel(), maps.ravel()),
        "pixel_aupro": _pro_area(*curves["pro"], PRO_FPR_LIMIT) if "pro" in curves else nan,
    }
    return {k: float(v) for k, v in result.items()}, curves


def _both_classes(truth: np.ndarray) -> bool:
    return 0 < np.sum(truth) < truth.size


def _safe(metric, truth: np.ndarray, score: np.ndarray) -> float:
    # Undefined (nan) rather than an exception when a split holds a single class.
    return float(metric(truth, score)) if _both_classes(truth) else float("nan")


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False-positive rate and per-region overlap at every distinct score, descending.

    Every 8-connected ground-truth region of the test set counts equally; each of its pixels
    adds 1/|region| to the overlap sum when the threshold passes its score, and each normal
    pixel adds 1 to the false positives. Returns (fpr, pro) starting at (0, 0).
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    fp_step = np.zeros(maps.shape, dtype=np.float64)
    pro_step = np.zeros(maps.shape, dtype=np.float64)
    regions = 0
    connectivity = np.ones((3, 3), dtype=int)
    for i, mask in enumerate(masks):
        labelled, count = label_regions(mask, structure=connectivity)
        regions += count
        fp_step[i][labelled == 0] = 1.0
        if count:
            sizes = np.bincount(labelled.ravel())
            inside = labelled > 0
            pro_step[i][inside] = 1.0 / sizes[labelled[inside]]
    normal_pixels = fp_step.sum()
    order = np.argsort(maps.ravel(), kind="stable")[::-1]
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order]) / normal_pixels
    pro = np.cumsum(pro_step.ravel()[order]) / regions
    # Tied scores form one threshold: keep only the last position of each run of equal scores.
    keep = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.concatenate([[0.0], np.clip(fpr[keep], None, 1.0)])
    pro = np.concatenate([[0.0], np.clip(pro[keep], None, 1.0)])
    return fpr, pro


def area_under_curve(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area for x in [0, x_max], with y linearly interpolated at x_max."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    area = float(np.sum(0.5 * (y[inside][1:] + y[inside][:-1]) * np.diff(x[inside])))
    if x_max not in x and x[-1] > x_max:
        right = bisect_left(x.tolist(), x_max)
        x0, x1, y0, y1 = x[right - 1], x[right], y[right - 1], y[right]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def au_pro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (1.0 is perfect)."""
    return _pro_area(*pro_curve(maps, masks), fpr_limit)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    return area_under_curve(fpr, pro, fpr_limit) / fpr_limit


def percent(value: float | None) -> str:
    """A metric in the paper's units: percent with one decimal; `n/a` where undefined."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def nan_mean(values: list[float]) -> float:
    """Mean of the defined values (a category without pixel masks has no pixel metrics)."""
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")

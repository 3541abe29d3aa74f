"""Anomalous or not: a category's threshold and score normalisation, made from normal images
the model did not train on.

Torch-free: checkpoints, registry cards, ONNX exports, `predict` and `serve` share it.

The threshold is the one-sided normal prediction bound: if the held-out normal scores are n
draws from a normal distribution with unknown mean and spread, a new normal image's score
exceeds

    threshold = mean + s * t_{n-1}(1 - target_fpr) * sqrt(1 + 1/n)

with probability `target_fpr` (s the sample standard deviation, t Student's quantile). It needs
no defective image and no more held-out images than a training split can spare: 1 % from 8
images is a statement about the fitted tail, where an empirical quantile would need hundreds.
Student's t and the sqrt(1 + 1/n) widen the bound for the uncertainty of mean and s estimated
from a few images. The normalised score is the logistic of (score - threshold) / s: 0.5 at the
threshold, monotone in the score, the same formula wherever it is applied.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from memkd_ray.errors import CheckpointError

PREDICTION_BOUND = "normal-prediction-bound"
USER_THRESHOLD = "user"
METHODS = (PREDICTION_BOUND, USER_THRESHOLD)
DECISION_RATE_KEYS = ("normal_flag_rate", "defect_catch_rate")
NO_DECISION_NOTE = ("this model carries no decision (trained before calibrated thresholds, or "
                    "with decision.holdout_fraction 0): raw scores only")


@dataclass(frozen=True)
class Decision:
    threshold: float
    """Scores above it are anomalous."""
    scale: float | None
    """Spread of the held-out normal scores: the logistic's scale; None for a user threshold
    on a model without calibration (no normalised score then)."""
    method: str = PREDICTION_BOUND
    target_fpr: float | None = None
    held_out_images: int = 0
    held_out_mean: float | None = None

    def normalized(self, scores: np.ndarray) -> np.ndarray | None:
        """Scores mapped to (0, 1), 0.5 at the threshold; None without a scale."""
        if self.scale is None:
            return None
        z = (np.asarray(scores, np.float64) - self.threshold) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def anomalous(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores, np.float64) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_threshold(self, threshold: float) -> Decision:
        """A user's threshold in place of the calibrated one (the spread kept)."""
        return Decision(threshold, self.scale, USER_THRESHOLD, None, 0, self.held_out_mean)


def calibrate(normal_scores: Sequence[float], target_fpr: float) -> Decision:
    """The prediction-bound decision (module doc) of held-out normal image scores."""
    from scipy.stats import t as student_t

    scores = np.asarray(normal_scores, np.float64)
    n = len(scores)
    if n < 2 or not np.isfinite(scores).all():
        raise ValueError(f"a decision needs at least 2 finite normal scores, got {n}")
    mean, spread = float(scores.mean()), float(scores.std(ddof=1))
    # Identical scores (a constant model) still need a positive scale for the logistic.
    spread = max(spread, 1e-6 * max(1.0, abs(mean)))
    factor = float(student_t.ppf(1.0 - target_fpr, n - 1)) * math.sqrt(1.0 + 1.0 / n)
    return Decision(mean + factor * spread, spread, PREDICTION_BOUND, target_fpr, n, mean)


def decide(scores: Sequence[float], decision: Decision | None) -> list[dict[str, Any]]:
    """Per image: raw score, normalised score and `anomalous` (both None without a decision)."""
    raw = np.asarray(scores, np.float64)
    if decision is None:
        return [{"score": float(s), "normalized_score": None, "anomalous": None} for s in raw]
    normalized = decision.normalized(raw)
    flags = decision.anomalous(raw)
    return [{"score": float(s),
             "normalized_score": None if normalized is None else float(normalized[i]),
             "anomalous": bool(flags[i])} for i, s in enumerate(raw)]


def decision_rates(labels: np.ndarray, scores: np.ndarray,
                   decision: Decision) -> dict[str, float]:
    """At the decision's threshold: the share of normal images flagged (the realised false-
    positive rate) and of defective images caught; NaN where a split has no such image."""
    labels, flags = np.asarray(labels), decision.anomalous(scores)

    def share(mask: np.ndarray) -> float:
        return float(flags[mask].mean()) if mask.any() else math.nan

    return dict(zip(DECISION_RATE_KEYS, (share(labels == 0), share(labels == 1)), strict=True))


def parse_decision(value: Any, where: str) -> Decision | None:
    """A stored decision (checkpoint.json, a registry card, model.json); None stays None.
    CheckpointError names the file when it is malformed: a made-up threshold is worse than
    none."""
    if value is None:
        return None

    def number(key: str, optional: bool = False) -> float | None:
        item = value.get(key)
        if item is None and optional:
            return None
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise CheckpointError(f"{where}: decision.{key} is not a finite number")
        return float(item)

    if not isinstance(value, dict) or value.get("method") not in METHODS:
        raise CheckpointError(f"{where}: decision is not an object with a method of "
                              f"{', '.join(METHODS)}")
    scale = number("scale", optional=True)
    if scale is not None and scale <= 0:
        raise CheckpointError(f"{where}: decision.scale must be positive")
    held_out = value.get("held_out_images", 0)
    if isinstance(held_out, bool) or not isinstance(held_out, int) or held_out < 0:
        raise CheckpointError(f"{where}: decision.held_out_images is not a count")
    return Decision(number("threshold"), scale, value["method"],
                    number("target_fpr", optional=True), held_out,
                    number("held_out_mean", optional=True))

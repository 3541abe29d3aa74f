"""What `predict` writes, whichever runtime scored the images: overlays and `scores.json`.

Torch-free, so that the ONNX Runtime scorer (deploy.runtime) shares it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from memkd_ray.data.sample import Sample, validate_samples
from memkd_ray.decision import Decision, decide

SCORES_FILE = "scores.json"


def prediction_samples(paths: Sequence[Path]) -> list[Sample]:
    """The images to score, each once (a path given twice is scored once), every one fully
    decoded here so that a bad file fails before any model runs."""
    samples = [Sample(Path(p), 0, "unknown") for p in dict.fromkeys(map(str, paths))]
    validate_samples(samples, decode=True)
    return samples


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp for values in [0, 1]; returns uint8 (..., 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    ramp = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    position = v * (len(ramp) - 1)
    low = np.floor(position).astype(int).clip(0, len(ramp) - 2)
    frac = position - low
    colours = ramp[low[..., 0]] * (1 - frac) + ramp[low[..., 0] + 1] * frac
    return colours.astype(np.uint8)


def write_predictions(
    samples: Sequence[Sample], images: np.ndarray, maps: np.ndarray, scores: Sequence[float],
    out: str | Path, decision: Decision | None,
) -> dict[str, dict[str, Any]]:
    """Write `NNNN_<stem>.png` overlays (NNNN = position in `samples`, so equal file names from
    different folders never collide) and `scores.json`; returns {path: {score,
    normalized_score, anomalous}} (the last two null for a model without a decision).

    `images` are uint8 (N, S, S, 3) and `maps` float (N, S, S). Overlays share one colour
    scale (the lowest to the highest map value over all given images), so brighter means
    more anomalous across the whole set. `out` is created only here: a prediction that
    failed earlier leaves nothing behind.
    """
    low, high = float(maps.min()), float(maps.max())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (sample, image, amap) in enumerate(zip(samples, images, maps, strict=True)):
        heat = heat_colours((amap - low) / max(high - low, 1e-12))
        blended = (0.55 * image + 0.45 * heat).astype(np.uint8)
        Image.fromarray(blended).save(out / f"{index:04d}_{sample.image_path.stem}.png")
    result = {str(s.image_path): answer
              for s, answer in zip(samples, decide(scores, decision), strict=True)}
    (out / SCORES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result

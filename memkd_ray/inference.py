"""Evaluation exports and prediction for trained checkpoints."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memkd_ray.data.sample import Sample
from memkd_ray.engine import Evaluation, predict_maps
from memkd_ray.model import MemKD

INDEX_FILE = "index.csv"


def save_maps(evaluation: Evaluation, samples: Sequence[Sample], out: str | Path) -> Path:
    """Per test image `<id>.npz` (map float32, mask uint8, at the metric resolution) and
    `index.csv` (id,label,defect,path): enough to recompute every metric independently."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / INDEX_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "defect", "path"])
        for sample, amap, mask in zip(samples, evaluation.maps, evaluation.masks, strict=True):
            np.savez_compressed(out / f"{sample.id}.npz", map=amap.astype(np.float32),
                                mask=mask.astype(np.uint8))
            writer.writerow([sample.id, sample.label, sample.defect, str(sample.image_path)])
    return out


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A blue-cyan-yellow-red ramp for values in [0, 1]; returns uint8 (..., 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    ramp = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    position = v * (len(ramp) - 1)
    low = np.floor(position).astype(int).clip(0, len(ramp) - 2)
    frac = position - low
    colours = ramp[low[..., 0]] * (1 - frac) + ramp[low[..., 0] + 1] * frac
    return colours.astype(np.uint8)


def predict_images(
    model: MemKD, paths: Sequence[Path], size: int, sigma: float, out: str | Path,
    device: torch.device, batch_size: int = 16,
) -> dict[str, float]:
    """Write `NNNN_<stem>.png` overlays (NNNN = position in `paths`, so equal file names from
    different folders never collide) and `scores.json`; returns {path: image score}.

    Overlays share one colour scale (the lowest to the highest map value over all given
    images), so brighter means more anomalous across the whole set.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = [Sample(Path(p), 0, "unknown") for p in paths]
    images = [s.load_image(size) for s in samples]
    maps, scores = [], []
    for start in range(0, len(images), batch_size):
        chunk = np.stack(images[start : start + batch_size])
        batch = torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div(255).to(device)
        batch_maps, batch_scores = predict_maps(model, batch, size, sigma)
        maps.append(batch_maps.cpu().numpy())
        scores.extend(batch_scores.cpu().tolist())
    all_maps = np.concatenate(maps)
    low, high = float(all_maps.min()), float(all_maps.max())
    for index, (sample, image, amap) in enumerate(zip(samples, images, all_maps, strict=True)):
        heat = heat_colours((amap - low) / max(high - low, 1e-12))
        blended = (0.55 * image + 0.45 * heat).astype(np.uint8)
        Image.fromarray(blended).save(out / f"{index:04d}_{sample.image_path.stem}.png")
    result = {str(s.image_path): float(v) for s, v in zip(samples, scores, strict=True)}
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

"""Evaluation exports and prediction for trained checkpoints."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memkd_ray.config import MemKDConfig
from memkd_ray.data.datasets import DecodedImages, to_float
from memkd_ray.data.sample import Sample, validate_samples
from memkd_ray.engine import Evaluation, image_loader, predict_maps, resolve_precision
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
    model: MemKD, paths: Sequence[Path], cfg: MemKDConfig, out: str | Path, device: torch.device,
) -> dict[str, float]:
    """Write `NNNN_<stem>.png` overlays (NNNN = position in `paths`, so equal file names from
    different folders never collide) and `scores.json`; returns {path: image score}.

    Overlays share one colour scale (the lowest to the highest map value over all given
    images), so brighter means more anomalous across the whole set. Images are decoded by
    `train.loader_workers` processes and predicted in batches of `eval.batch_size` under
    `eval.precision`, with the map settings of `cfg` (the checkpoint's).
    """
    # An image given twice is scored once; every file is checked before the model runs.
    samples = [Sample(Path(p), 0, "unknown") for p in dict.fromkeys(map(str, paths))]
    validate_samples(samples, decode=True)
    loader = image_loader(DecodedImages(samples, cfg.data.image_size), cfg.eval.batch_size,
                          cfg.train.loader_workers, device)
    dtype = resolve_precision(cfg.eval.precision, device)
    images, maps, scores = [], [], []
    for batch in loader:
        # uint8 crosses to the device (a quarter of the bytes) and becomes float there.
        pixels = to_float(batch.to(device, non_blocking=True))
        batch_maps, batch_scores = predict_maps(model, pixels, cfg, dtype)
        images.append(batch)
        maps.append(batch_maps)
        scores.append(batch_scores)
    # One transfer for the whole set: the device is not waited on between batches.
    all_maps = torch.cat(maps).cpu().numpy()
    all_scores = torch.cat(scores).cpu().tolist()
    all_images = torch.cat(images).permute(0, 2, 3, 1).numpy()
    low, high = float(all_maps.min()), float(all_maps.max())
    out = Path(out)  # created only now: a failed prediction leaves nothing behind
    out.mkdir(parents=True, exist_ok=True)
    for index, (sample, image, amap) in enumerate(zip(samples, all_images, all_maps,
                                                      strict=True)):
        heat = heat_colours((amap - low) / max(high - low, 1e-12))
        blended = (0.55 * image + 0.45 * heat).astype(np.uint8)
        Image.fromarray(blended).save(out / f"{index:04d}_{sample.image_path.stem}.png")
    result = {str(s.image_path): v for s, v in zip(samples, all_scores, strict=True)}
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    return result

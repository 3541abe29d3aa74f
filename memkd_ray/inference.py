"""Evaluation exports and prediction for trained checkpoints."""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memkd_ray.config import MemKDConfig
from memkd_ray.data.datasets import DecodedImages, to_float
from memkd_ray.data.sample import Sample
from memkd_ray.decision import Decision
from memkd_ray.engine import Evaluation, image_loader, predict_maps, resolve_precision
from memkd_ray.model import MemKD
from memkd_ray.predictions import prediction_samples, write_predictions

INDEX_FILE = "index.csv"


def save_maps(evaluation: Evaluation, samples: Sequence[Sample], out: str | Path) -> Path:
    """Per test image `<id>.npz` (map float32, mask uint8, at the metric resolution) and
    `index.csv` (id,label,defect,path): enough to recompute every metric independently.

    Ids are the image's position and a plain form of its name (`0007_scratch_003`), so that
    `003.png` and `003.jpg`, or names that are not valid UTF-8, each keep their own file. The
    files are staged beside `out` and moved in only once all are written.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with open(staging / INDEX_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "label", "defect", "path"])
            for index, (sample, amap, mask) in enumerate(
                    zip(samples, evaluation.maps, evaluation.masks, strict=True)):
                name = re.sub(r"[^A-Za-z0-9._-]", "_", sample.id)
                file_id = f"{index:04d}_{name}"
                np.savez_compressed(staging / f"{file_id}.npz", map=amap.astype(np.float32),
                                    mask=mask.astype(np.uint8))
                writer.writerow([file_id, sample.label, _text(sample.defect),
                                 _text(str(sample.image_path))])
        out.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir(), key=lambda p: p.name == INDEX_FILE):
            os.replace(file, out / file.name)  # the index last: it lists what is there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _text(name: str) -> str:
    """A file or folder name as UTF-8 text; bytes that are not UTF-8 as `\\xNN` escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def predict_images(
    model: MemKD, paths: Sequence[Path], cfg: MemKDConfig, out: str | Path, device: torch.device,
    decision: Decision | None,
) -> dict[str, dict[str, Any]]:
    """Score images with a torch model and write what `predictions.write_predictions` does;
    returns {path: score and decision}.

    Images are decoded by `train.loader_workers` processes and predicted in batches of
    `eval.batch_size` under `eval.precision`, with the map settings of `cfg` (the checkpoint's).
    """
    samples = prediction_samples(paths)
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
    return write_predictions(samples, torch.cat(images).permute(0, 2, 3, 1).numpy(),
                             torch.cat(maps).cpu().numpy(), torch.cat(scores).cpu().tolist(),
                             out, decision)

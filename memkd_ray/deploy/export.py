"""ONNX export of a checkpoint: one graph from images to anomaly map and score, checked by
ONNX Runtime against torch before anything is written."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from memkd_ray import __version__
from memkd_ray.checkpoint import load_model
from memkd_ray.checkpoint_format import META_FILE, checkpoint_decision
from memkd_ray.decision import USER_THRESHOLD, Decision
from memkd_ray.deploy.runtime import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAMES,
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    cpu_session,
    sidecar_of,
    to_pixels,
)
from memkd_ray.errors import UserInputError, VerificationError
from memkd_ray.files import sha256_file
from memkd_ray.model import AnomalyScorer, create_scorer
from memkd_ray.predictions import prediction_samples

log = logging.getLogger(__name__)
DEFAULT_OPSET = 18
# torch's exporter writes opset 18 and later; ONNX Runtime 1.16+ and TensorRT 10 run it.
MIN_OPSET = 18
PARITY_TOLERANCE = 1e-4
"""Largest accepted |ONNX Runtime - torch| of any map pixel or score (absolute)."""


@dataclass
class Parity:
    """How far ONNX Runtime's outputs are from torch's on the check images."""

    images: int
    max_map_difference: float
    max_score_difference: float

    @property
    def passed(self) -> bool:
        return max(self.max_map_difference, self.max_score_difference) <= PARITY_TOLERANCE


def reference_photographs(size: int) -> np.ndarray:
    """Three real photographs at the model's size, uint8 (3, S, S, 3): scikit-learn's
    flower.jpg (always installed with this package) whole, and its left and right squares.
    The check runs on real images because random noise drives the networks into ranges a
    deployed model never sees."""
    from sklearn.datasets import load_sample_image

    photo = load_sample_image("flower.jpg")
    side = min(photo.shape[:2])
    views = [photo, photo[:side, :side], photo[:side, -side:]]
    return np.stack([np.array(Image.fromarray(v).resize((size, size), Image.BILINEAR))
                     for v in views])


def check_images(paths: list[Path], size: int) -> np.ndarray:
    """The given images (decoded as `predict` decodes them) after the reference photographs."""
    return np.stack([*reference_photographs(size),
                     *(sample.load_image(size) for sample in prediction_samples(paths))])


def export_graph(scorer: AnomalyScorer, path: Path, opset: int, batch: int | None) -> None:
    """Write the scorer as one self-contained ONNX file (weights inside, no external data).

    `batch` None exports a dynamic batch dimension; an int fixes it, which some runtimes
    (TensorRT engines, NPUs) want."""
    size = scorer.image_size
    example = torch.rand(batch or 2, 3, size, size)
    dynamic = {INPUT_NAME: {0: torch.export.Dim("batch", min=1)}} if batch is None else None
    # The exporter prints its progress on stdout, which `export` keeps for its own result.
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(scorer, (example,), str(path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=opset,
                          dynamic_shapes=dynamic, external_data=False, dynamo=True)


@torch.no_grad()
def measure_parity(
    scorer: AnomalyScorer, path: Path, images: np.ndarray, batch: int | None,
) -> Parity:
    """Maps and scores of ONNX Runtime (CPU) against torch (float32, CPU) on `images`.

    A dynamic graph runs the whole set as one batch and the first image alone, so both a batch
    of one and a larger one are checked; a fixed graph runs batches of its size."""
    session = cpu_session(path)
    pixels = to_pixels(images)
    if batch is None:
        batches = [pixels, pixels[:1]]
    else:
        repeats = -(-max(len(pixels), batch) // len(pixels))
        tiled = np.concatenate([pixels] * repeats)
        batches = [tiled[i:i + batch] for i in range(0, len(tiled) - batch + 1, batch)]
    map_diff = score_diff = 0.0
    for chunk in batches:
        maps, scores = scorer(torch.from_numpy(chunk))
        onnx_maps, onnx_scores = session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
        map_diff = max(map_diff, float(np.abs(onnx_maps - maps.numpy()).max()))
        score_diff = max(score_diff, float(np.abs(onnx_scores - scores.numpy()).max()))
    return Parity(len(images), map_diff, score_diff)


def export_onnx(
    checkpoint_dir: Path,
    out: Path,
    source: str,
    opset: int = DEFAULT_OPSET,
    batch: int | None = None,
    check_image_paths: list[Path] | None = None,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Export the checkpoint in `checkpoint_dir` to `out/model.onnx` and `out/model.json`;
    returns the sidecar. `source` is the reference the user gave (recorded, not opened).

    The graph is checked with ONNX Runtime on real images first: beyond PARITY_TOLERANCE
    it raises VerificationError and writes nothing. An existing export in `out` is replaced
    file by file, the model first: a reader between the two sees a sha256 mismatch, never a
    wrong model."""
    import onnx

    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise UserInputError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to "
                             f"{onnx.defs.onnx_opset_version()}")
    if threshold is not None and not math.isfinite(threshold):
        raise UserInputError(f"--threshold {threshold}: must be a finite number")
    if batch is not None and batch < 1:
        raise UserInputError(f"--batch {batch}: must be a positive number or 'dynamic'")
    model, checkpoint = load_model(checkpoint_dir, "cpu")
    cfg = checkpoint.config
    scorer = create_scorer(model, cfg).eval()
    images = check_images(check_image_paths or [], cfg.data.image_size)
    with tempfile.TemporaryDirectory(prefix="memkd-ray-export-") as staging:
        staged = Path(staging) / ONNX_FILE
        log.info("exporting %s (opset %d, batch %s) ...", source, opset, batch or "dynamic")
        export_graph(scorer, staged, opset, batch)
        parity = measure_parity(scorer, staged, images, batch)
        log.info("ONNX Runtime vs torch on %d real images: max |map difference| %.2e, "
                 "max |score difference| %.2e (tolerance %.0e)", parity.images,
                 parity.max_map_difference, parity.max_score_difference, PARITY_TOLERANCE)
        if not parity.passed:
            raise VerificationError(
                f"{source}: ONNX Runtime differs from torch by up to "
                f"{max(parity.max_map_difference, parity.max_score_difference):.2e} "
                f"(tolerance {PARITY_TOLERANCE:.0e}); nothing written")
        sidecar = describe_export(checkpoint, scorer, staged, source, opset, batch, parity,
                                  threshold)
        sidecar_of(staged).write_text(json.dumps(sidecar, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for staged_file in (staged, sidecar_of(staged)):
            _install(staged_file, out / staged_file.name)
    return sidecar


def describe_export(
    checkpoint: Any, scorer: AnomalyScorer, model_path: Path, source: str, opset: int,
    batch: int | None, parity: Parity, threshold: float | None,
) -> dict[str, Any]:
    """The sidecar: what a line PC needs to feed the graph, and where the graph came from."""
    cfg, meta = checkpoint.config, checkpoint.meta
    size = scorer.image_size
    return {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "model": {"file": model_path.name, "sha256": sha256_file(model_path), "opset": opset,
                  "batch": batch or "dynamic"},
        "input": {
            "name": INPUT_NAME, "size": size, "shape": ["N", 3, size, size],
            "dtype": "float32", "layout": "NCHW, RGB, values in [0, 1]",
            "resize": f"bilinear to {size}x{size} (PIL), no crop, aspect ratio not kept",
        },
        "normalisation": {"mean": meta["teacher"]["mean"], "std": meta["teacher"]["std"],
                          "in_graph": True},
        "outputs": {
            "anomaly_map": {"shape": ["N", size, size], "dtype": "float32",
                            "gaussian_sigma": scorer.gaussian_sigma,
                            "normal_map_subtracted": cfg.eval.normal_map != "none"},
            "score": {"shape": ["N"], "dtype": "float32", "score_top_k": scorer.score_top_k},
        },
        "decision": _decision(checkpoint, threshold),
        "source": {
            "checkpoint": source,
            "checkpoint_json_sha256": sha256_file(checkpoint.directory / META_FILE),
            "weights_sha256": meta["sha256"],
            "benchmark": cfg.data.benchmark,
            "category": meta.get("category"),
            "epoch": meta["epoch"],
            "metrics": meta["metrics"],
            "teacher": meta["teacher"]["name"],
        },
        "parity": {"runtime": "onnxruntime CPU", "images": parity.images,
                   "max_map_difference": parity.max_map_difference,
                   "max_score_difference": parity.max_score_difference,
                   "tolerance": PARITY_TOLERANCE},
        "package_version": __version__,
        "torch_version": torch.__version__,
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _decision(checkpoint: Any, threshold: float | None) -> dict[str, Any] | None:
    """The checkpoint's decision, or the user's `--threshold` in its place (the calibrated
    spread kept for the normalised score)."""
    decision = checkpoint_decision(checkpoint.meta, str(checkpoint.directory / META_FILE))
    if threshold is None:
        return None if decision is None else decision.to_dict()
    if decision is None:
        return Decision(threshold, None, USER_THRESHOLD).to_dict()
    return decision.with_threshold(threshold).to_dict()


def _install(source: Path, target: Path) -> None:
    """Copy next to `target`, then rename over it: `target` is whole or absent, never partial."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)

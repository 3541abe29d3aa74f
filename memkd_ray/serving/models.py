"""A registered checkpoint made ready to score requests: torch or ONNX Runtime. No Ray here.

Both backends score exactly as `predict` does for the same checkpoint: the torch backend runs
the same `predict_maps`, the ONNX backend an export checked against torch to 1e-4
(deploy/export.py), made once per checkpoint and kept in the local cache.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memkd_ray.checkpoint_format import META_FILE
from memkd_ray.errors import UserInputError

log = logging.getLogger(__name__)
BACKENDS = ("onnx", "torch")


@dataclass
class ServedModel:
    """Scores uint8 RGB images (N, S, S, 3) at the model's size: maps (N, S, S), scores (N,)."""

    image_size: int
    backend: str
    scorer: Any

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.scorer(images)


def load_served_model(checkpoint_dir: Path, backend: str, cache: Path,
                      threads: int = 0) -> ServedModel:
    """The checkpoint in `checkpoint_dir` (verified by its reader) behind `backend`, with
    `threads` intra-op threads per call (0: the runtime's default)."""
    if backend == "torch":
        return _torch_model(checkpoint_dir, threads)
    if backend == "onnx":
        return _onnx_model(checkpoint_dir, cache, threads)
    raise UserInputError(f"--backend {backend}: not one of {', '.join(BACKENDS)}")


def _torch_model(checkpoint_dir: Path, threads: int) -> ServedModel:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from memkd_ray.checkpoint import load_model
    from memkd_ray.data.datasets import to_float
    from memkd_ray.engine import predict_maps, resolve_precision

    model, checkpoint = load_model(checkpoint_dir, "cpu")
    cfg = checkpoint.config
    precision = resolve_precision(cfg.eval.precision, torch.device("cpu"))

    def score(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = to_float(torch.from_numpy(images).permute(0, 3, 1, 2))
        maps, scores = predict_maps(model, pixels, cfg, precision)
        return maps.numpy(), scores.numpy()

    return ServedModel(cfg.data.image_size, "torch", score)


def _onnx_model(checkpoint_dir: Path, cache: Path, threads: int) -> ServedModel:
    from memkd_ray.deploy.runtime import OnnxScorer

    scorer = OnnxScorer.open(onnx_export(checkpoint_dir, cache), threads)
    return ServedModel(scorer.image_size, "onnx", scorer.score)


# torch's ONNX exporter is not thread-safe: two exports at once in one process fail.
_export_lock = threading.Lock()


def onnx_export(checkpoint_dir: Path, cache: Path) -> Path:
    """The export folder of a checkpoint: made once per checkpoint.json (which holds the
    weights' sha256) and kept in `cache` across restarts; one export at a time in this process
    (a request and the start-up preparation may ask together)."""
    from memkd_ray.deploy.runtime import ONNX_FILE

    key = hashlib.sha256((checkpoint_dir / META_FILE).read_bytes()).hexdigest()
    export_dir = cache / "onnx" / key
    with _export_lock:
        if not (export_dir / ONNX_FILE).is_file():
            from memkd_ray.deploy.export import export_onnx

            log.info("exporting %s to ONNX (once per checkpoint) ...", checkpoint_dir)
            export_onnx(checkpoint_dir, export_dir, source=str(checkpoint_dir))
    return export_dir

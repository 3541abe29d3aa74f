"""Scoring images with an exported model and ONNX Runtime alone: this module imports no torch.

An export is `model.onnx` (images in [0, 1], N x 3 x S x S, to `anomaly_map` N x S x S and
`score` N) and `model.json` beside it (how to feed it, where it came from, its sha256).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memkd_ray.decision import USER_THRESHOLD, Decision, parse_decision
from memkd_ray.errors import CheckpointError, UserInputError
from memkd_ray.files import sha256_file
from memkd_ray.predictions import prediction_samples, write_predictions

ONNX_FILE = "model.onnx"
SIDECAR_FORMAT = "memkd-ray-onnx"
SIDECAR_VERSION = 2
"""2 added `decision` (decision.py) in place of version 1's bare `score_threshold`."""
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
# Images per ONNX Runtime call for a dynamic-batch export. On CPU batching does not pay: per
# image, batch 8 took 1.2-1.3x the time of batch 1 (benchmarks/onnx_latency.py, README).
DYNAMIC_BATCH = 1


def is_onnx_export(reference: str) -> bool:
    """True for a `.onnx` file or a folder holding `model.onnx` (an export folder)."""
    path = Path(reference)
    return path.suffix == ".onnx" or (path / ONNX_FILE).is_file()


def sidecar_of(model_path: Path) -> Path:
    """`model.json` beside `model.onnx` (any `<name>.onnx` has `<name>.json`)."""
    return model_path.with_suffix(".json")


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 RGB (N, S, S, 3) to the model's input: float32 (N, 3, S, S) in [0, 1], the same
    values torch's `to_float` gives."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255


@dataclass
class OnnxScorer:
    """An export opened for scoring: its sidecar read, its sha256 checked, a CPU session."""

    model_path: Path
    sidecar: dict[str, Any]
    session: Any

    @classmethod
    def open(cls, reference: str | Path, threads: int = 0) -> OnnxScorer:
        path = Path(reference)
        model_path = path / ONNX_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise CheckpointError(f"{model_path}: not found")
        sidecar = read_sidecar(sidecar_of(model_path))
        actual = sha256_file(model_path)
        if actual != sidecar["model"]["sha256"]:
            raise CheckpointError(
                f"{model_path}: sha256 {actual[:12]}... does not match "
                f"{sidecar_of(model_path).name} {sidecar['model']['sha256'][:12]}... "
                "(tampered, truncated or another export)")
        session = cpu_session(model_path, threads)
        shape = session.get_inputs()[0].shape  # [batch or its name, 3, size, size]
        batch = sidecar["model"]["batch"]
        if (shape[2:] != [sidecar["input"]["size"]] * 2
                or (shape[0] if isinstance(shape[0], int) else "dynamic") != batch):
            raise CheckpointError(
                f"{sidecar_of(model_path)}: says input size {sidecar['input']['size']} and "
                f"batch {batch}; the graph takes {shape} (an edited description)")
        return cls(model_path, sidecar, session)

    @property
    def image_size(self) -> int:
        return int(self.sidecar["input"]["size"])

    @property
    def decision(self) -> Decision | None:
        return sidecar_decision(self.sidecar, str(sidecar_of(self.model_path)))

    @property
    def batch(self) -> int | None:
        """The graph's fixed batch size, None when it takes any."""
        batch = self.sidecar["model"]["batch"]
        return None if batch == "dynamic" else int(batch)

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps (N, S, S) and scores (N,) of uint8 RGB images (N, S, S, 3).

        A fixed-batch graph gets full batches: the last one is padded with copies of its last
        image, whose outputs are dropped."""
        step = self.batch or DYNAMIC_BATCH
        maps, scores = [], []
        for start in range(0, len(images), step):
            chunk = to_pixels(images[start:start + step])
            count = len(chunk)
            if self.batch and count < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - count, 0)])
            batch_maps, batch_scores = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk})
            maps.append(batch_maps[:count])
            scores.append(batch_scores[:count])
        return np.concatenate(maps), np.concatenate(scores)


def cpu_session(model_path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on CPU, the runtime the export was checked against; `threads`
    intra-op threads (0: ONNX Runtime's default, one per physical core)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserInputError("scoring an ONNX export needs onnxruntime: "
                             "pip install 'memkd-ray[export]' (or onnxruntime)") from None
    try:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        return onnxruntime.InferenceSession(str(model_path), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own types: InvalidProtobuf, Fail, ...
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{model_path}: ONNX Runtime cannot load it ({reason})") from None


def read_sidecar(path: Path) -> dict[str, Any]:
    """The export's `model.json`, schema-checked; CheckpointError names what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the export's description, written beside "
                              "the .onnx file by memkd-ray export)")
    try:
        sidecar = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not valid JSON") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{path}: not a memkd-ray export description")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > SIDECAR_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not one this memkd-ray "
                              f"reads (1..{SIDECAR_VERSION})")
    model, size = sidecar.get("model"), sidecar.get("input", {}).get("size")
    if (not isinstance(model, dict) or not isinstance(model.get("sha256"), str)
            or not (model.get("batch") == "dynamic" or isinstance(model.get("batch"), int))
            or not isinstance(size, int) or size < 1):
        raise CheckpointError(f"{path}: fields model.sha256, model.batch or input.size "
                              "missing or malformed")
    sidecar_decision(sidecar, str(path))
    return sidecar


def sidecar_decision(sidecar: dict[str, Any], where: str) -> Decision | None:
    """The export's decision: version 2's `decision`, or version 1's `score_threshold` (a
    user's threshold, no normalisation); None when it has neither."""
    if sidecar["format_version"] < 2:
        threshold = sidecar.get("score_threshold")
        return None if threshold is None else parse_decision(
            {"method": USER_THRESHOLD, "threshold": threshold}, where)
    return parse_decision(sidecar.get("decision"), where)


def predict_with_onnx(
    scorer: OnnxScorer, paths: Sequence[Path], out: str | Path,
) -> dict[str, dict[str, Any]]:
    """`memkd-ray predict` with an export: the same overlays and `scores.json` as the torch
    path, computed by ONNX Runtime on CPU; returns {path: score and decision}."""
    samples = prediction_samples(paths)
    images = np.stack([sample.load_image(scorer.image_size) for sample in samples])
    maps, scores = scorer.score(images)
    return write_predictions(samples, images, maps, scores.tolist(), out, scorer.decision)

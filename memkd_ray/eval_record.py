"""The test evaluation of a checkpoint, kept beside it so that a report needs no data or GPU.

`<checkpoint>/evaluation/` holds:

    images.parquet        one row per test image: id, label, defect, path, score, example
    curves.parquet        image ROC, pixel ROC and PRO curve points (curve, x, y), thinned
    examples.safetensors  image, ground truth and anomaly map of the worst-scored normal and
                          the best- and worst-scored defective test image

Plain numpy, Parquet and safetensors: written by a training worker, read by `report`, and
never unpickled.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from memkd_ray.data.sample import Sample

if TYPE_CHECKING:  # the record itself needs no torch
    from memkd_ray.engine import Evaluation

RECORD_DIR = "evaluation"
IMAGES_FILE = "images.parquet"
CURVES_FILE = "curves.parquet"
EXAMPLES_FILE = "examples.safetensors"
RECORD_FILES = (IMAGES_FILE, CURVES_FILE, EXAMPLES_FILE)
# worst_normal: the normal image scored most anomalous (the likeliest false alarm);
# best/worst_defective: the defective images scored most and least anomalous.
EXAMPLE_ROLES = ("worst_normal", "best_defective", "worst_defective")
CURVES = ("image_roc", "pixel_roc", "pro")
# Enough points to draw a curve exactly at report resolution; a pixel ROC has millions.
CURVE_POINTS = 1000


@dataclass
class EvalRecord:
    images: list[dict]
    curves: dict[str, tuple[np.ndarray, np.ndarray]]
    """curve name -> (x, y): (FPR, TPR) for the ROCs, (FPR, per-region overlap) for PRO."""
    examples: dict[str, dict[str, np.ndarray]]
    """role -> {"image": uint8 (H, W, 3), "mask": uint8 (H, W), "map": float32 (H, W)}"""
    map_range: tuple[float, float]
    """Lowest and highest anomaly-map value over the whole test set: one colour scale for all
    overlays of the category."""


def select_examples(labels: np.ndarray, scores: np.ndarray) -> dict[str, int]:
    """Index of the test image of each example role (roles without images are left out)."""
    normal = np.flatnonzero(labels == 0)
    defective = np.flatnonzero(labels == 1)
    chosen = {}
    if normal.size:
        chosen["worst_normal"] = int(normal[np.argmax(scores[normal])])
    if defective.size:
        chosen["best_defective"] = int(defective[np.argmax(scores[defective])])
        chosen["worst_defective"] = int(defective[np.argmin(scores[defective])])
    return chosen


def thin_curve(x: np.ndarray, y: np.ndarray, points: int = CURVE_POINTS
               ) -> tuple[np.ndarray, np.ndarray]:
    """At most about 2 x `points` points of a monotone curve, evenly spaced along x and along
    y (a steep rise near FPR 0 keeps its shape), always keeping both ends."""
    if len(x) <= 2 * points:
        return x, y
    grid = np.linspace(0.0, 1.0, points)
    keep = np.concatenate([
        np.searchsorted(x, grid * x[-1]), np.searchsorted(y, grid * y[-1]), [0, len(x) - 1],
    ])
    keep = np.unique(np.clip(keep, 0, len(x) - 1))
    return x[keep], y[keep]


def encode_eval_record(
    samples: Sequence[Sample], evaluation: Evaluation, image_size: int
) -> dict[str, bytes]:
    """The record's files as bytes, by file name (RECORD_FILES), for any storage to write."""
    labels, scores, maps = evaluation.labels, evaluation.scores, evaluation.maps
    chosen = select_examples(labels, scores)
    role_of = {index: role for role, index in chosen.items()}
    images = pa.table({
        "id": [s.id for s in samples],
        "label": pa.array(labels, pa.int64()),
        "defect": [s.defect for s in samples],
        "path": [str(s.image_path) for s in samples],
        "score": pa.array(scores, pa.float64()),
        "example": [role_of.get(i, "") for i in range(len(samples))],
    })
    names, xs, ys = [], [], []
    for name, (x, y) in evaluation.curves.items():
        x, y = thin_curve(np.asarray(x, np.float64), np.asarray(y, np.float64))
        names += [name] * len(x)
        xs.append(x)
        ys.append(y)
    curves = pa.table({
        "curve": pa.array(names, pa.string()),
        "x": pa.array(np.concatenate(xs) if xs else [], pa.float64()),
        "y": pa.array(np.concatenate(ys) if ys else [], pa.float64()),
    })
    tensors = {}
    for role, index in chosen.items():
        tensors[f"{role}.image"] = samples[index].load_image(image_size)
        tensors[f"{role}.mask"] = np.ascontiguousarray(evaluation.masks[index], dtype=np.uint8)
        tensors[f"{role}.map"] = np.ascontiguousarray(maps[index], dtype=np.float32)
    metadata = {"map_low": repr(float(maps.min())), "map_high": repr(float(maps.max()))}
    return {
        IMAGES_FILE: _parquet_bytes(images),
        CURVES_FILE: _parquet_bytes(curves),
        EXAMPLES_FILE: save_tensors(tensors, metadata=metadata),
    }


def decode_eval_record(files: dict[str, bytes]) -> EvalRecord:
    """Parse the bytes `encode_eval_record` produced."""
    # No thread pool: see storage.layout.parquet_rows.
    curves_table = pq.read_table(io.BytesIO(files[CURVES_FILE]), use_threads=False).to_pydict()
    names = np.array(curves_table["curve"], dtype=object)
    xs, ys = np.array(curves_table["x"]), np.array(curves_table["y"])
    curves = {name: (xs[names == name], ys[names == name]) for name in CURVES
              if (names == name).any()}
    tensors = load_tensors(files[EXAMPLES_FILE])
    examples: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        role, part = key.split(".", 1)
        examples.setdefault(role, {})[part] = value
    metadata = _safetensors_metadata(files[EXAMPLES_FILE])
    return EvalRecord(
        images=pq.read_table(io.BytesIO(files[IMAGES_FILE]), use_threads=False).to_pylist(),
        curves=curves,
        examples={role: examples[role] for role in EXAMPLE_ROLES if role in examples},
        map_range=(float(metadata["map_low"]), float(metadata["map_high"])),
    )


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # safetensors reads metadata from files only; the format is an 8-byte little-endian
    # header length followed by the JSON header.
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})

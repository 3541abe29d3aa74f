"""Anomaly maps and the five metrics of a category, and the normal-map calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from memkd_ray.config import MemKDConfig
from memkd_ray.data.datasets import DecodedImages, TestImages, to_float
from memkd_ray.data.sample import Sample
from memkd_ray.decision import Decision, calibrate
from memkd_ray.engine.devices import autocast, resolve_precision
from memkd_ray.engine.features import TrainingFeatures
from memkd_ray.metrics import Curve, metrics_and_curves
from memkd_ray.model import MemKD, create_scorer


@dataclass
class Evaluation:
    """Per-image anomaly maps and masks at the metric resolution, and the five metrics."""

    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    metrics: dict[str, float]
    curves: dict[str, Curve] = field(default_factory=dict)
    """The ROC and PRO curves behind the metrics (metrics.metrics_and_curves)."""


@torch.no_grad()
def predict_maps(
    model: MemKD, images: torch.Tensor, cfg: MemKDConfig, precision: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 anomaly maps (B, size, size) and image scores (B,) for images in [0, 1], on
    the images' device; the networks run under autocast to `precision`. The model's normal
    map (zeros unless calibrated) is subtracted before the scores (`eval.score_top_k`) are
    taken."""
    model.eval()
    # The map and score run in float32 whatever the autocast (model.anomaly_map.in_float32).
    with autocast(images.device, precision):
        return create_scorer(model, cfg)(images)


@torch.no_grad()
def calibrate_normal_map(model: MemKD, features: TrainingFeatures, cfg: MemKDConfig) -> None:
    """With `eval.normal_map: mean`, set the model's normal map to the mean anomaly map of the
    training images (their cached teacher features, so only the student runs).

    A pixel's map value on normal images depends on where it is: the student reproduces the
    teacher less well at the image border (zero padding) and on the busy parts of a scene,
    and there the maximum of a normal image's map sits. Subtracting the normal mean makes the
    map say how much worse than usual a pixel is, which is what a defect is.
    """
    model.normal_map_mean.zero_()
    if cfg.eval.normal_map == "none":
        return
    model.eval()
    precision = resolve_precision(cfg.eval.precision, features.device)
    scorer = create_scorer(model, cfg)
    total = torch.zeros_like(model.normal_map_mean)
    for start in range(0, len(features), cfg.eval.batch_size):
        indices = torch.arange(start, min(start + cfg.eval.batch_size, len(features)))
        teacher_features = features(indices)
        with autocast(features.device, precision):
            student_features = model.student_forward(teacher_features)
        total += scorer.raw_map(student_features, teacher_features[:3]).sum(dim=0)
    model.normal_map_mean.copy_(total / len(features))


def calibrate_decision(
    model: MemKD, held_out: list[Sample], cfg: MemKDConfig, device: torch.device
) -> Decision:
    """The decision threshold and normalisation (memkd_ray/decision.py) of the images held out
    from training, scored exactly as `predict` scores (after the normal-map calibration)."""
    loader = image_loader(DecodedImages(held_out, cfg.data.image_size), cfg.eval.batch_size,
                          cfg.train.loader_workers, device)
    precision = resolve_precision(cfg.eval.precision, device)
    scores = [predict_maps(model, to_float(batch.to(device)), cfg, precision)[1].cpu()
              for batch in loader]
    return calibrate(torch.cat(scores).double().numpy(), cfg.decision.target_fpr)


def evaluate(
    model: MemKD, samples: list[Sample], cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on a category's test samples."""
    images, labels = labelled_test_images(samples, cfg.data.image_size)
    return evaluate_dataset(model, images, labels, cfg, device)


def labelled_test_images(
    samples: list[Sample], image_size: int
) -> tuple[Dataset, np.ndarray]:
    """Test samples as evaluate_dataset reads them: (image, mask) pairs and the labels."""
    return TestImages(samples, image_size), np.array([s.label for s in samples], np.int64)


def evaluate_dataset(
    model: MemKD, dataset: Dataset, labels: np.ndarray, cfg: MemKDConfig, device: torch.device
) -> Evaluation:
    """Maps and the five metrics on any dataset yielding (image in [0, 1], mask), predicted
    in batches of `eval.batch_size` under `eval.precision`."""
    loader = image_loader(dataset, cfg.eval.batch_size, cfg.train.loader_workers, device)
    precision = resolve_precision(cfg.eval.precision, device)
    maps, masks, scores = [], [], []
    for images, batch_masks in loader:
        batch_maps, batch_scores = predict_maps(model, images.to(device, non_blocking=True),
                                                cfg, precision)
        # Left on the device and fetched once: no wait for the GPU between batches.
        maps.append(batch_maps)
        scores.append(batch_scores)
        masks.append(batch_masks)
    result = Evaluation(
        maps=torch.cat(maps).cpu().numpy(),
        masks=torch.cat(masks).numpy().astype(np.uint8),
        labels=labels,
        scores=torch.cat(scores).cpu().numpy(),
        metrics={},
    )
    result.metrics, result.curves = metrics_and_curves(result.maps, result.masks,
                                                       result.labels, result.scores)
    return result


def image_loader(
    dataset: Dataset, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """Batches of decoded images: `workers` processes decode, and batches bound for a GPU
    land in pinned memory so their copies can run asynchronously."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      pin_memory=device.type == "cuda")



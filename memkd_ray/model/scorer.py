"""MemKD's whole inference path as one module: images to anomaly maps and image scores."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memkd_ray.model.anomaly_map import anomaly_map, image_scores
from memkd_ray.model.memkd import MemKD


class AnomalyScorer(nn.Module):
    """Images in [0, 1] (B, 3, S, S) to float32 anomaly maps (B, S, S) and scores (B,).

    `predict`, evaluation and the ONNX export all run this module, so an exported graph
    computes what `memkd-ray predict` computes: teacher normalisation, both networks, the
    memories, Eq. 3-4's map with its up-sampling and Gaussian filter, the normal map of
    calibration and the score.
    """

    def __init__(
        self,
        model: MemKD,
        gaussian_sigma: float = 4.0,
        stage_weights: Sequence[float] | None = None,
        score_top_k: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.gaussian_sigma = gaussian_sigma
        self.stage_weights = list(stage_weights) if stage_weights is not None else None
        self.score_top_k = score_top_k

    @property
    def image_size(self) -> int:
        return self.model.normal_map_mean.shape[-1]

    def raw_map(
        self, student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """Eq. 3-4's map at the image size, before the normal map is subtracted."""
        return anomaly_map(student_features, teacher_features, self.image_size,
                           self.gaussian_sigma, self.stage_weights)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_features, student_features = self.model(images)
        maps = self.raw_map(student_features, teacher_features) - self.model.normal_map_mean
        return maps, image_scores(maps, self.score_top_k)

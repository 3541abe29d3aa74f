"""What the NR Memories remember: their values' start, and their recall of unseen normals.

The values learn normal features through the normality memorization loss (Eq. 10) alone. To
see whether they do, `RecallProbe` measures the Eq. 10 error of each memory's recall on normal
images held out from training, next to two recalls that learn nothing: a zero vector (the
features' mean squared norm) and the stage's mean training feature. A memory whose error is not
well below the mean's recalls no more than the average normal feature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memkd_ray.engine.features import TrainingFeatures
from memkd_ray.model import NEL_TEACHER_STAGE, MemKD
from memkd_ray.model.losses import normality_memorization_loss

INIT_IMAGES = 16
"""Training images whose features the `features` value initialisation draws from."""


def initialise_memory_values(model: MemKD, features: TrainingFeatures, seed: int) -> None:
    """`memory.value_init: features`: every memory's values set to teacher features of random
    positions of random training images, at the stage it rebuilds (the same on every worker
    of a category, which all hold the same features and seed)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randperm(len(features), generator=generator)[:INIT_IMAGES]
    stages = features(images)
    for site, memory in model.memories.items():
        memory.initialise_values(stages[NEL_TEACHER_STAGE[site]], generator)


@dataclass(frozen=True)
class RecallProbe:
    held_out: dict[str, torch.Tensor]
    """Per memory site, the float32 teacher features of the held-out images at the stage
    that memory rebuilds, (N, C, H, W)."""
    baselines: dict[str, float]
    """`recall_zero_<site>` and `recall_mean_<site>`: fixed for the run."""

    @classmethod
    def build(cls, model: MemKD, features: TrainingFeatures,
              held_out: TrainingFeatures) -> RecallProbe:
        """The probe of `model`'s memories on the held-out images (`held_out`, cached), with
        the mean training feature per stage taken over every training image and position."""
        stages = {NEL_TEACHER_STAGE[site]: site for site in model.memories}
        sums: dict[int, torch.Tensor] = {}
        for start in range(0, len(features), 32):
            chunk = features(torch.arange(start, min(start + 32, len(features))))
            for stage in stages:
                total = chunk[stage].float().sum(dim=(0, 2, 3))
                sums[stage] = sums[stage] + total if stage in sums else total
        unseen = held_out(torch.arange(len(held_out)))
        probe, baselines = {}, {}
        for stage, site in stages.items():
            target = unseen[stage].float()
            positions = len(features) * target.shape[2] * target.shape[3]
            mean = (sums[stage] / positions).view(1, -1, 1, 1)
            probe[site] = target
            baselines[f"recall_zero_{site}"] = float(target.pow(2).sum(dim=1).mean())
            baselines[f"recall_mean_{site}"] = float((target - mean).pow(2).sum(dim=1).mean())
        return cls(probe, baselines)

    @torch.no_grad()
    def measure(self, model: MemKD) -> dict[str, float]:
        """`recall_error_<site>` (Eq. 10 on the held-out images) next to the baselines."""
        errors = {f"recall_error_{site}": float(normality_memorization_loss(
            model.memories[site], features)) for site, features in self.held_out.items()}
        return {**errors, **self.baselines}

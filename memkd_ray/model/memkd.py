"""MemKD (Fig. 3): frozen teacher, RD student, NR Memories between decoder stages, NEL losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memkd_ray.config import MEMORY_SITES
from memkd_ray.model.losses import (
    distillation_loss,
    normality_memorization_loss,
    pairwise_orthogonal_loss,
)
from memkd_ray.model.memory import NormalityRecallMemory
from memkd_ray.model.student import ReverseDistillationStudent
from memkd_ray.model.teacher import Teacher

# Index of the teacher stage whose shape each memory carries, i.e. its NEL target (Eq. 10):
# the bottleneck embedding is stage-4-shaped, decoder stage 1 gives stage 3, stage 2 gives 2.
NEL_TEACHER_STAGE = {"bottleneck": 3, "decoder1": 2, "decoder2": 1}


class MemKD(nn.Module):
    def __init__(
        self,
        teacher: Teacher,
        memory_items: Sequence[int] = (50, 50, 50),
        temperature: float = 1.0,
        bottleneck_blocks: int = 3,
        decoder_blocks: Sequence[int] = (3, 4, 6),
        width_ratio: float = 0.5,
        map_size: int = 256,
    ) -> None:
        """`memory_items` all zero gives the Reverse Distillation baseline."""
        super().__init__()
        self.teacher = teacher
        # The mean anomaly map of normal images (engine.calibrate_normal_map), subtracted from
        # every map; zeros (no calibration) until set. Saved with the weights.
        self.register_buffer("normal_map_mean", torch.zeros(map_size, map_size))
        channels = teacher.channels
        self.memories = nn.ModuleDict(
            {
                site: NormalityRecallMemory(channels[NEL_TEACHER_STAGE[site]], items, temperature)
                for site, items in zip(MEMORY_SITES, memory_items, strict=True)
                if items > 0
            }
        )
        self.student = ReverseDistillationStudent(
            channels,
            bottleneck_blocks=bottleneck_blocks,
            decoder_blocks=decoder_blocks,
            width_ratio=width_ratio,
            doubled_inputs=[site in self.memories for site in MEMORY_SITES],
        )

    def student_forward(self, teacher_features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student features matching teacher stages 1-3, shallow first.

        Each memory recalls F_R from the query F_S, and cat(F_S, F_R) enters the next decoder
        stage; the distillation target is the pre-concatenation F_S.
        """
        x = self.student.bottleneck(teacher_features)
        outputs = []
        for site, stage in zip(MEMORY_SITES, self.student.decoder, strict=True):
            if site in self.memories:
                # The recall is computed in float32; the concatenation keeps the stage's dtype
                # (bfloat16 under autocast, where the next convolution would cast it anyway).
                x = torch.cat([x, self.memories[site](x).to(x.dtype)], dim=1)
            x = stage(x)
            outputs.append(x)
        return outputs[::-1]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher stages 1-3, student features 1-3) for images in [0, 1]."""
        teacher_features = self.teacher(images)
        return teacher_features[:3], self.student_forward(teacher_features)

    def losses(
        self,
        teacher_features: Sequence[torch.Tensor],
        exemplar_features: Sequence[torch.Tensor] | None,
        lambda_nm: float,
        lambda_orth: float,
        orth_mode: str = "abs",
    ) -> dict[str, torch.Tensor]:
        """Eq. 11: L = L_KD + lambda1 L_NM + lambda2 L_Orth, summed over the memories.

        `teacher_features` holds all four stages of the batch; `exemplar_features` those of the
        N normal exemplars (unused when L_NM is off).
        """
        student_features = self.student_forward(teacher_features)
        kd = distillation_loss(student_features, teacher_features[:3])
        nm = kd.new_zeros(())
        orth = kd.new_zeros(())
        for site, memory in self.memories.items():
            if lambda_nm > 0 and exemplar_features is not None:
                target = exemplar_features[NEL_TEACHER_STAGE[site]]
                nm = nm + normality_memorization_loss(memory, target)
            if lambda_orth > 0:
                orth = orth + pairwise_orthogonal_loss(memory.keys, memory.values, orth_mode)
        return {"loss": kd + lambda_nm * nm + lambda_orth * orth, "kd": kd, "nm": nm, "orth": orth}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Student and memory tensors; the frozen teacher is rebuilt from its weights id."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.trainable_state_dict()
        # Checkpoints from before the calibration existed hold no normal map: none is applied.
        missing = sorted(set(expected) - set(state) - {"normal_map_mean"})
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"checkpoint does not fit the model: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        self.load_state_dict(state, strict=False)

    def needs_exemplars(self, lambda_nm: float) -> bool:
        return lambda_nm > 0 and len(self.memories) > 0

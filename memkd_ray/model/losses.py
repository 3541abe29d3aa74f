"""MemKD's loss terms: L_KD (Eq. 1-2), L_NM (Eq. 10), L_Orth (Eq. 7)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from memkd_ray.model.memory import NormalityRecallMemory
from memkd_ray.model.precision import in_float32


@in_float32
def distillation_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Eq. 1-2: per stage, 1 - cosine of the flattened C*H*W maps, batch mean, summed."""
    total = student_features[0].new_zeros(())
    for student, teacher in zip(student_features, teacher_features, strict=True):
        cosine = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1)
        total = total + (1 - cosine).mean()
    return total


@in_float32
def normality_memorization_loss(
    memory: NormalityRecallMemory, exemplar_features: torch.Tensor
) -> torch.Tensor:
    """Eq. 10: squared L2 distance between exemplar teacher features and their reconstruction
    from the memory values, averaged over exemplars and positions."""
    reconstructed = memory.reconstruct(exemplar_features)
    return (exemplar_features - reconstructed).pow(2).sum(dim=1).mean()


@in_float32
def pairwise_orthogonal_loss(
    keys: torch.Tensor, values: torch.Tensor, mode: str = "abs"
) -> torch.Tensor:
    """Eq. 7: mean over all (key, value) pairs of their cosine similarity.

    As printed (`signed`) the minimum is cos = -1, i.e. anti-parallel keys and values, not the
    independence the paper asks for; `abs` penalises |cos| so the minimum is orthogonality.
    """
    cosine = F.normalize(keys, dim=-1) @ F.normalize(values, dim=-1).t()
    if mode == "abs":
        cosine = cosine.abs()
    elif mode != "signed":
        raise ValueError(f"unknown orthogonality mode {mode!r}")
    return cosine.mean()

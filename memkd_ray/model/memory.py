"""Normality Recall Memory (MemKD Sec. 4.1): L learnable key/value pairs addressed by cosine."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from memkd_ray.model.precision import in_float32


@in_float32
def cosine_attention(
    features: torch.Tensor, addresses: torch.Tensor, contents: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per position, a softmax over L of cosine(feature, address) / T, then a weighted sum of
    the contents (Eq. 5-6 with addresses = keys; Eq. 8-9 with addresses = values).

    features: (B, C, H, W); addresses, contents: (L, C). Returns float32 (B, C, H, W).
    """
    b, c, h, w = features.shape
    queries = F.normalize(features.flatten(2).transpose(1, 2), dim=-1)  # (B, HW, C)
    similarity = queries @ F.normalize(addresses, dim=-1).t()  # (B, HW, L)
    weights = torch.softmax(similarity / temperature, dim=-1)
    recalled = weights @ contents  # (B, HW, C)
    return recalled.transpose(1, 2).reshape(b, c, h, w)


class NormalityRecallMemory(nn.Module):
    """Keys address the memory, values store normal features (Fig. 4a)."""

    def __init__(self, channels: int, items: int, temperature: float = 1.0) -> None:
        super().__init__()
        if items < 1:
            raise ValueError("a memory needs at least one item")
        self.temperature = temperature
        # Unit-variance random init: keys only matter through their direction, and values are
        # pulled towards the teacher features of their stage by the normality memorization loss.
        self.keys = nn.Parameter(torch.randn(items, channels))
        self.values = nn.Parameter(torch.randn(items, channels))

    @torch.no_grad()
    def initialise_values(self, features: torch.Tensor, generator: torch.Generator) -> None:
        """Set each value to the feature vector of a random position of a random image of
        `features` (N, C, H, W): the memory starts at the scale and among the directions of
        the normal features it is to remember (Eq. 10), not at unit scale."""
        vectors = features.detach().float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        picked = torch.randperm(len(vectors), generator=generator)[: len(self.values)]
        if len(picked) < len(self.values):  # fewer positions than items: some repeat
            picked = picked[torch.arange(len(self.values)) % len(picked)]
        self.values.copy_(vectors[picked.to(vectors.device)].to(self.values.device))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """F_R: the normal information recalled for each position of the student query."""
        return cosine_attention(query, self.keys, self.values, self.temperature)

    def reconstruct(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """Eq. 8-9: rebuild normal exemplar features from the values, addressed by the values."""
        return cosine_attention(teacher_features, self.values, self.values, self.temperature)

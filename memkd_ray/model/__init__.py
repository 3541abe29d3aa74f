"""Pure-torch MemKD: teacher, student, NR Memory, losses, anomaly maps (no Ray, no storage)."""

from __future__ import annotations

from memkd_ray.config import MemKDConfig
from memkd_ray.model.anomaly_map import anomaly_map, gaussian_filter, image_scores
from memkd_ray.model.memkd import MEMORY_SITES, NEL_TEACHER_STAGE, MemKD
from memkd_ray.model.memory import NormalityRecallMemory
from memkd_ray.model.scorer import AnomalyScorer
from memkd_ray.model.teacher import Teacher

__all__ = [
    "MEMORY_SITES",
    "NEL_TEACHER_STAGE",
    "AnomalyScorer",
    "MemKD",
    "NormalityRecallMemory",
    "Teacher",
    "anomaly_map",
    "create_memkd",
    "create_scorer",
    "create_teacher",
    "gaussian_filter",
    "image_scores",
]


def create_teacher(cfg: MemKDConfig) -> Teacher:
    t = cfg.teacher
    return Teacher(
        t.name,
        t.weights,
        mean=tuple(t.mean) if t.mean else None,
        std=tuple(t.std) if t.std else None,
    )


def create_memkd(cfg: MemKDConfig, teacher: Teacher | None = None) -> MemKD:
    """Build MemKD (or the RD baseline when `memory.enabled` is false) from a config."""
    items = cfg.memory.items if cfg.memory.enabled else [0, 0, 0]
    return MemKD(
        teacher if teacher is not None else create_teacher(cfg),
        memory_items=items,
        temperature=cfg.memory.temperature,
        bottleneck_blocks=cfg.student.bottleneck_blocks,
        decoder_blocks=cfg.student.decoder_blocks,
        width_ratio=cfg.student.width_ratio,
        map_size=cfg.data.image_size,
    )


def create_scorer(model: MemKD, cfg: MemKDConfig) -> AnomalyScorer:
    """The inference module of `model` with the map and score settings of `cfg.eval`."""
    return AnomalyScorer(model, gaussian_sigma=cfg.eval.gaussian_sigma,
                         stage_weights=cfg.eval.stage_weights, score_top_k=cfg.eval.score_top_k)

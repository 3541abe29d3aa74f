"""Typed configuration: the schema with every paper default (schema.py), and YAML loading,
overrides and validation (loading.py)."""

from memkd_ray.config.loading import from_dict, get_dotted, load_config, set_dotted, validate
from memkd_ray.config.schema import (
    AUGMENTATIONS,
    MEMORY_SITES,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LossConfig,
    MemKDConfig,
    MemoryConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    TuneConfig,
)

__all__ = [
    "AUGMENTATIONS", "MEMORY_SITES", "DataConfig", "DistributedConfig", "EvalConfig",
    "LossConfig", "MemKDConfig", "MemoryConfig", "StudentConfig", "TeacherConfig", "TrainConfig",
    "TuneConfig",
    "from_dict", "get_dotted", "load_config", "set_dotted", "validate",
]

"""Search spaces as data: `dotted.config.key: {distribution: arguments}` (configs/tune/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import tune

from memkd_ray.config import MemKDConfig, from_dict, get_dotted, set_dotted, validate
from memkd_ray.config.loading import read_yaml
from memkd_ray.errors import ConfigError

DISTRIBUTIONS = {
    "choice": lambda args: tune.choice(list(args)),
    "loguniform": lambda args: tune.loguniform(*args),
    "uniform": lambda args: tune.uniform(*args),
    "randint": lambda args: tune.randint(*args),
}


def load_search_space(path: str) -> dict[str, dict[str, list]]:
    """`dotted.config.key: {distribution: arguments}`; list items by index (`memory.items.0`).

    Every key is checked against the config by applying one value of its range.
    """
    space = read_yaml(Path(path), "search space file") or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: must map config keys to distributions")
    probe = {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise ConfigError(f"{path}: {key} needs one of {', '.join(DISTRIBUTIONS)}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{path}: {key}.{kind} needs a list of arguments")
        probe[key] = args[0]
    apply_params(MemKDConfig(), probe)
    return space


def param_space(space: dict[str, dict[str, list]]) -> dict[str, Any]:
    """The space as Ray Tune samples it."""
    return {key: DISTRIBUTIONS[kind](args)
            for key, spec in space.items() for kind, args in spec.items()}


def apply_params(cfg: MemKDConfig, params: dict[str, Any]) -> MemKDConfig:
    """A copy of cfg with dotted keys set (numeric parts index lists), validated."""
    raw = cfg.to_dict()
    for key, value in params.items():
        set_dotted(raw, key, value)
    return validate(from_dict(raw))


def configured_values(cfg: MemKDConfig, space: dict[str, Any]) -> dict[str, Any]:
    """The configured values of the searched keys: trial 0 of every search, the baseline the
    selected configuration is compared with."""
    raw = cfg.to_dict()
    return {key: get_dotted(raw, key) for key in space}

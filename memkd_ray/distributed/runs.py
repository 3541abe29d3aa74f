"""What `train` and `tune` share around the cluster work: the checks before anything starts,
the saved request that `--resume` reads back, and the one factory of a category's trainer."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from memkd_ray.config import MemKDConfig
from memkd_ray.data import read_configured_category, resolve_categories
from memkd_ray.distributed.cluster import worker_resources
from memkd_ray.errors import DataError, UserInputError
from memkd_ray.model.teacher import check_teacher
from memkd_ray.storage import Storage, plain_name

log = logging.getLogger(__name__)


def check_workers(cfg: MemKDConfig) -> None:
    """The workers of a category split each global batch evenly: any other split would make
    the batch (and so BatchNorm's statistics and the steps per epoch) depend on their number.
    A device forced by `train.device` must be one Ray gives the workers."""
    workers, batch = cfg.distributed.workers_per_category, cfg.train.batch_size
    if batch % workers:
        raise UserInputError(f"distributed.workers_per_category {workers} must divide "
                             f"train.batch_size {batch}")
    device, gpus = cfg.train.device, cfg.distributed.gpus_per_worker
    if device.startswith("cuda") and not gpus:
        raise UserInputError(f"train.device {device} needs distributed.gpus_per_worker > 0: "
                             "Ray shows a worker only the GPUs it asked for")
    if device == "cpu" and gpus:
        raise UserInputError("train.device cpu with distributed.gpus_per_worker > 0 would hold "
                             "GPUs that no worker uses")


def preflight(cfg: MemKDConfig, categories: list[str], with_test: bool = True
              ) -> tuple[MemKDConfig, list[str], dict[str, str]]:
    """The checks before Ray starts: the teacher, the worker split, the names, and every
    category's data where this machine sees it (`with_test=False`: the training split only,
    for a search that must not look at the test split).

    Returns the config with an absolute data root (workers may start elsewhere), the
    categories, and the broken ones with their one-line reasons; all broken is an error.
    """
    if not cfg.data.root:
        raise UserInputError("data.root is not set (pass --data-root)")
    check_teacher(cfg.teacher.name, cfg.teacher.weights)  # here, not in every worker
    check_workers(cfg)
    for name in [*categories, *cfg.data.categories]:
        plain_name("category", name)
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        if categories == ["all"] and not cfg.data.categories:
            raise DataError(f"{root}: data root not found")
        log.info("%s is not visible here: the workers read it on their nodes", root)
        return cfg, categories if categories != ["all"] else cfg.data.categories, {}
    cfg = replace(cfg, data=replace(cfg.data, root=str(root.resolve())))
    names = resolve_categories(cfg.data.benchmark, root, categories, cfg.data.categories)
    for name in names:  # they become storage paths: runs/<id>/<benchmark>/<category>, ...
        plain_name("category", name)
    broken = {}
    for name in names:
        try:
            read_configured_category(cfg.data, name, with_test=with_test, decode=True)
        except DataError as exc:
            broken[name] = str(exc)
    if len(broken) == len(names):
        raise DataError(broken[names[0]])
    return cfg, names, broken


def save_request(storage: Storage, path: str, request: dict[str, Any]) -> None:
    """The run's request (config, categories, options), for `--resume`."""
    storage.write_bytes(path, json.dumps(request).encode())


def saved_request(storage: Storage, path: str, run_id: str, command: str) -> dict[str, Any]:
    """A request saved by `save_request`, its category names checked again (they become
    storage paths)."""
    if not storage.exists(path):
        raise UserInputError(f"--resume {run_id}: no such {command} run in {storage.uri}")
    try:
        request = json.loads(storage.read_bytes(path))
        names = request["categories"] if isinstance(request["config"], dict) else None
    except (ValueError, KeyError, TypeError):
        names = None
    if not isinstance(names, list):
        raise UserInputError(f"--resume {run_id}: {storage.uri_for(path)} is damaged (not the "
                             f"request a {command} run saved)")
    for category in names:
        plain_name("category", str(category))
    return request


def category_trainer(
    train_loop: Callable[[dict[str, Any]], Any], loop_config: dict[str, Any],
    cfg: MemKDConfig, name: str, storage_path: str, filesystem: pafs.FileSystem,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    """A category's worker group as Ray Train runs it, for `train` and every `tune` trial
(a filesystem, not a Storage: it is pickled, and a Storage may hold a client).

    With `distributed.placement_timeout_s`, running out of the worker-group start timeout
    fails the category instead of retrying (no controller retries).
    """
    d = cfg.distributed
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), **loop_config},
        scaling_config=ScalingConfig(num_workers=d.workers_per_category,
                                     use_gpu=d.gpus_per_worker > 0,
                                     resources_per_worker=worker_resources(d)),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=list(callbacks),
            failure_config=FailureConfig(
                max_failures=d.max_failures,
                controller_failure_limit=0 if d.placement_timeout_s else -1),
            checkpoint_config=CheckpointConfig(num_to_keep=d.checkpoints_to_keep),
        ),
    )

"""Ray Tune over MemKD's knobs, one search per category, each trial a Ray Train run.

A trial is a function trainable that builds the category's `TorchTrainer` around the same
`train_loop_per_worker` as `train` (so a trial may use several workers) and forwards every
epoch's report to Tune (`TuneReportCallback`); its Train run is named after the trial, so a
restored trial resumes its Train run from storage. ASHA stops weak trials early.

Selection does not look at the test split: trials score a validation split built from training
images only (data/validation.py) and never list the test split; the best trial's checkpoint is
evaluated on the test split once, after selection. `select_on="test"` exists for comparisons
and is recorded in every row it produces.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.train
import yaml
from ray import tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from memkd_ray.checkpoint import load_model
from memkd_ray.config import MemKDConfig, from_dict, validate
from memkd_ray.data import read_configured_category
from memkd_ray.distributed.launcher import (
    check_worker_split,
    concurrent_categories,
    connect,
    worker_group_configs,
)
from memkd_ray.distributed.train_loop import train_loop_per_worker
from memkd_ray.engine import epoch_bound, evaluate
from memkd_ray.errors import ConfigError, UserInputError
from memkd_ray.eval_record import RECORD_DIR, encode_eval_record
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.model.teacher import check_teacher
from memkd_ray.storage.layout import RunLayout
from memkd_ray.storage.registry import fetch_checkpoint
from memkd_ray.storage.uri import Storage, open_storage, plain_name

SPEC_FILE = "tune_spec.json"
RESULTS_FILE = "tune_results.parquet"
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
    try:
        with open(path) as handle:
            space = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: search space file not found") from None
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


def apply_params(cfg: MemKDConfig, params: dict[str, Any]) -> MemKDConfig:
    """A copy of cfg with dotted keys set (numeric parts index lists), validated."""
    raw = cfg.to_dict()
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node: Any = raw
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if isinstance(node, list):
                node[int(leaf)] = value
            elif leaf in node:
                node[leaf] = value
            else:
                raise KeyError(leaf)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ConfigError(f"search space key {key}: not a config key") from None
    return validate(from_dict(raw))


class SearchInterrupted(RuntimeError):
    """A search stopped before all its trials ended; `--resume` continues it."""


@dataclass
class TuneSummary:
    run_id: str
    results_uri: str
    rows: list[dict]

    @property
    def selected(self) -> list[dict]:
        return [row for row in self.rows if row["selected"]]


def run_trial(trial: dict[str, Any], spec: dict[str, Any], category: str,
              storage_path: str, filesystem: Any) -> None:
    """One trial: the category's Ray Train run with this trial's parameters."""
    cfg = apply_params(from_dict(spec["config"]), trial["memkd"])
    scaling, failure = worker_group_configs(cfg)
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "category": category,
                           "selection": spec["select_on"]},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=[TuneReportCallback()],
            failure_config=failure,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.distributed.checkpoints_to_keep),
        ),
    ).fit()


# Where progress lines go. Tune pickles its callbacks into the experiment state and restores
# them on resume, so the callback looks the sink up here instead of holding one.
_progress_sink: list[Callable[[str], None]] = [print]


class _Progress(tune.Callback):
    def __init__(self, category: str, metric: str) -> None:
        self.category, self.metric = category, metric

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(self.metric, math.nan)
        _progress_sink[0](f"{self.category} trial {trial.trial_id} epoch {result.get('epoch')}: "
                          f"loss {result.get('loss', math.nan):.4f} {self.metric} {score:.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        _progress_sink[0](f"{self.category} trial {trial.trial_id} finished")


def tune_benchmark(
    cfg: MemKDConfig | None,
    categories: list[str],
    storage_uri: str,
    space: dict[str, dict[str, list]] | None = None,
    samples: int = 8,
    scheduler: str = "asha",
    search: str = "random",
    max_concurrent: int = 0,
    select_on: str = "validation",
    address: str | None = None,
    resume_run: str | None = None,
    on_message: Callable[[str], None] | None = None,
    on_selected: Callable[[dict[str, dict]], None] | None = None,
) -> TuneSummary:
    """Search every category in turn; write tune_results.parquet; return its rows.

    With `resume_run`, the run's saved request is reloaded and each category's search restored
    from storage: finished trials are not repeated. `on_selected` sees the selected trials
    before the test split is first read.
    """
    say = on_message or print
    _progress_sink[0] = say
    storage = open_storage(storage_uri)
    storage.check_writable()
    if resume_run:
        layout = RunLayout(storage, resume_run)
        spec = json.loads(storage.read_bytes(f"{layout.run_dir}/{SPEC_FILE}"))
        for category in spec["categories"]:  # a saved request is read back: checked again
            plain_name("category", category)
    else:
        if select_on not in ("validation", "test"):
            raise UserInputError(f"--select-on {select_on}: validation or test")
        if cfg is None or space is None:
            raise UserInputError("a new search needs a config and a search space")
        if not cfg.data.root:
            raise UserInputError("data.root is not set (pass --data-root)")
        check_teacher(cfg.teacher.name, cfg.teacher.weights)
        check_worker_split(cfg)
        names = categories
        if categories == ["all"]:
            names = cfg.data.categories or _discover(cfg)
        for category in names:  # they become storage paths: checked before any is written
            plain_name("category", category)
        spec = {"config": cfg.to_dict(), "categories": names, "space": space,
                "samples": samples, "scheduler": scheduler, "search": search,
                "max_concurrent": max_concurrent, "select_on": select_on}
    connect(address, storage)
    if not resume_run:
        layout = RunLayout.create(storage)
        storage.write_bytes(f"{layout.run_dir}/{SPEC_FILE}", json.dumps(spec).encode())
    base = from_dict(spec["config"])
    say(f"tune run {layout.run_id}: {len(spec['categories'])} categories x {spec['samples']} "
        f"trials, selecting on {spec['select_on']}")
    # A local cluster that cannot hold one trial's worker group fails here, not by waiting.
    limit = spec["max_concurrent"] or concurrent_categories(base, joined=address is not None)
    rows: list[dict] = []
    for index, category in enumerate(spec["categories"]):
        try:
            rows += _search_category(spec, base, category, layout, storage, limit,
                                     bool(resume_run))
        except SearchInterrupted:
            # What a stopped search leaves: the trials of every finished category, and one
            # `interrupted` row per category not finished (its trials continue on --resume).
            metric = _selection_metric(spec)
            rows += [_row({}, {}, "interrupted", spec, base, name, layout, storage, metric)
                     for name in spec["categories"][index:]]
            _write_results(storage, layout, rows)
            raise
    selected = {row["category"]: row for row in rows if row["selected"]}
    if on_selected is not None:
        on_selected(selected)
    # Test metrics only now, for the selected trial and, for comparison, the default one.
    for row in rows:
        if row["checkpoint_uri"] and (row["selected"] or row["is_default"]):
            row.update(_test_metrics(row, base, storage))
    for row in selected.values():
        say(f"{row['category']}: selected trial {row['trial_id']} "
            f"({row['selection_metric']} {row['selection_value']:.3f}), "
            f"test I-AUROC {row['test_image_auroc']:.3f}")
    return TuneSummary(layout.run_id, _write_results(storage, layout, rows), rows)


def _write_results(storage: Storage, layout: RunLayout, rows: list[dict]) -> str:
    """tune_results.parquet (one atomic write); returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    path = f"{layout.run_dir}/{RESULTS_FILE}"
    storage.write_bytes(path, buffer.getvalue())
    return storage.uri_for(path)


def _selection_metric(spec: dict[str, Any]) -> str:
    return "val_image_auroc" if spec["select_on"] == "validation" else "image_auroc"


def _discover(cfg: MemKDConfig) -> list[str]:
    from memkd_ray.data import resolve_categories

    return resolve_categories(cfg.data.benchmark, cfg.data.root, ["all"], [])


def _search_category(spec: dict[str, Any], base: MemKDConfig, category: str, layout: RunLayout,
                     storage: Storage, limit: int, resume: bool) -> list[dict]:
    metric = _selection_metric(spec)
    experiment_root = layout.benchmark_dir(base.data.benchmark)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, category=category,
                             storage_path=f"{experiment_root}/{category}-train",
                             filesystem=storage.filesystem),
        {"CPU": 0.01},  # the trial only waits on its Train run, which holds the real resources
    )
    path = f"{experiment_root}/{category}"
    _keep_credentials_out_of_trial_runtime_env()
    if resume and tune.Tuner.can_restore(path, storage_filesystem=storage.filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage.filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"memkd": {k: DISTRIBUTIONS[next(iter(v))](next(iter(v.values())))
                                   for k, v in spec["space"].items()}},
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=spec["samples"],
                scheduler=_scheduler(spec["scheduler"], epoch_bound(base)),
                search_alg=_search_algorithm(spec["search"], limit, base.train.seed,
                                             [{"memkd": _defaults(base, spec["space"])}]),
            ),
            run_config=tune.RunConfig(name=category, storage_path=experiment_root,
                                      storage_filesystem=storage.filesystem, verbose=0,
                                      callbacks=[_Progress(category, metric)]),
        )
    with _sigterm_stops_the_search():
        grid = tuner.fit()
    ended = grid.num_terminated + grid.num_errors
    if len(grid) < spec["samples"] or ended < len(grid):
        # Tune stops gracefully on SIGINT/SIGUSR1 and returns the trials so far (the random
        # generator creates trials lazily, so later ones may not exist yet): selecting
        # from a partial search would be wrong, so stop here; the state is in storage.
        raise SearchInterrupted(f"search of {category} interrupted; continue it with: "
                                f"memkd-ray tune --resume {layout.run_id} --storage "
                                f"{storage.uri}")
    rows = [_trial_row(result, spec, base, category, layout, storage, metric) for result in grid]
    mark_selected(rows)
    return rows


@contextmanager
def _sigterm_stops_the_search() -> Iterator[None]:
    """Ray Tune saves its state and stops on SIGINT or SIGUSR1 (main thread only); SIGTERM
    (`kill`, a batch scheduler, Kubernetes) is made to do the same instead of killing the
    driver with the search state unsaved."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM,
                             lambda signum, frame: os.kill(os.getpid(), signal.SIGUSR1))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def mark_selected(rows: list[dict]) -> None:
    """Mark the best trial that ended well with a checkpoint: a trial that failed after
    reporting one is not a result (its last report may be from a broken state)."""
    candidates = [r for r in rows if r["checkpoint_uri"] and r["status"] == "ok"]
    if candidates:
        best = max(candidates, key=lambda r: (_finite(r["selection_value"]),
                                              _finite(r["selection_tiebreak"])))
        best["selected"] = True


def _keep_credentials_out_of_trial_runtime_env() -> None:
    """Ray Tune copies the driver's AWS key variables into every trainable's `runtime_env`
    (`ray.tune.execution.class_cache`), which Ray keeps and its runtime-env agent logs in clear
    text. Every process here finds credentials itself (storage/uri.py), so they are dropped."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}


def _trial_row(result: Any, spec: dict[str, Any], base: MemKDConfig, category: str,
               layout: RunLayout, storage: Storage, metric: str) -> dict:
    return _row(result.metrics or {}, (result.config or {}).get("memkd", {}),
                "error" if result.error else "ok", spec, base, category, layout, storage, metric)


def _row(metrics: dict[str, Any], params: dict[str, Any], status: str, spec: dict[str, Any],
         base: MemKDConfig, category: str, layout: RunLayout, storage: Storage, metric: str
         ) -> dict:
    """One row of tune_results.parquet: a trial's last report, or (no metrics, no params) an
    unfinished category; every row has the same columns."""
    prefix = "val_" if spec["select_on"] == "validation" else ""
    checkpoint = metrics.get("checkpoint_path")
    row = {
        "run_id": layout.run_id, "benchmark": base.data.benchmark, "category": category,
        "trial_id": metrics.get("trial_id", ""), "status": status,
        "epochs": int(metrics.get("epoch", 0)), "selected_on": spec["select_on"],
        "selection_metric": metric, "selection_value": float(metrics.get(metric, math.nan)),
        "selection_tiebreak": float(metrics.get(f"{prefix}pixel_auroc", math.nan)),
        **{f"param.{k}": params.get(k) for k in spec["space"]},
        **{f"{prefix or 'test_'}{k}": float(metrics.get(f"{prefix}{k}", math.nan))
           for k in METRIC_KEYS},
        "checkpoint_uri": storage.uri_for(checkpoint) if checkpoint else "",
        "selected": False,
        "is_default": params == _defaults(base, spec["space"]),
    }
    if prefix:  # test metrics exist only for the selected trial, computed after selection
        row.update({f"test_{k}": math.nan for k in METRIC_KEYS})
    return row


def _test_metrics(row: dict, base: MemKDConfig, storage: Storage) -> dict[str, float]:
    """The one test evaluation of a trial's checkpoint, on this run's data root; its record
    (eval_record.py) goes beside the checkpoint for the report."""
    model, checkpoint = load_model(fetch_checkpoint(row["checkpoint_uri"], storage.uri))
    cfg = checkpoint.config
    data = read_configured_category(base.data, row["category"])
    evaluation = evaluate(model, data.test, cfg, next(model.parameters()).device)
    record = encode_eval_record(data.test, evaluation, cfg.data.image_size)
    base_path = storage.path_of(row["checkpoint_uri"])
    for name, data_bytes in record.items():
        storage.write_bytes(f"{base_path}/{RECORD_DIR}/{name}", data_bytes)
    return {f"test_{k}": v for k, v in evaluation.metrics.items()}


def _scheduler(name: str, epochs: int) -> Any:
    if name == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=2)
    if name == "fifo":
        return FIFOScheduler()
    raise UserInputError(f"--scheduler {name}: asha or fifo")


def _defaults(cfg: MemKDConfig, space: dict[str, Any]) -> dict[str, Any]:
    """The configured values of the searched keys: trial 0 of every search, the baseline the
    selected configuration is compared with."""
    values = {}
    for key in space:
        node: Any = cfg.to_dict()
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        values[key] = node
    return values


def _search_algorithm(
    name: str, max_concurrent: int, seed: int, first: list[dict[str, Any]]
) -> Any:
    if name == "random":
        # max_concurrent must go to the generator itself: TuneConfig's is ignored with it.
        return BasicVariantGenerator(points_to_evaluate=first, max_concurrent=max_concurrent,
                                     random_state=seed)
    if name == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=first, seed=seed),
                                      max_concurrent=max_concurrent)
        except ImportError:
            raise UserInputError("--search optuna needs optuna: pip install "
                                 "'memkd-ray[optuna]'") from None
    raise UserInputError(f"--search {name}: random or optuna")


def _finite(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value

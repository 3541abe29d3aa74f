"""`memkd-ray tune`: Ray Tune over MemKD's knobs, one search per category, each trial a Ray
Train run.

A trial is a function trainable that builds the category's trainer around the same worker loop
as `train` (so a trial may use several workers) and forwards every epoch's report to Tune
(`TuneReportCallback`); its Train run is named after the trial, so a restored trial resumes its
Train run from storage. ASHA stops weak trials early.

Selection does not look at the test split: trials score a validation split built from training
images only (data/validation.py) and never list the test split; the best trial's checkpoint is
evaluated on the test split once, after selection. `select_on="test"` exists for comparisons
and is recorded in every row it produces.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

from memkd_ray.checkpoint import load_model
from memkd_ray.config import MemKDConfig, from_dict
from memkd_ray.data import read_configured_category
from memkd_ray.distributed.cluster import concurrent_categories, connect
from memkd_ray.distributed.ray_compat import (
    keep_credentials_out_of_trials,
    sigterm_stops_tune,
    worker_group_start_timeout,
)
from memkd_ray.distributed.runs import category_trainer, preflight, save_request, saved_request
from memkd_ray.distributed.search_space import apply_params, configured_values, param_space
from memkd_ray.distributed.worker import TrainLoop, train_loop_per_worker
from memkd_ray.engine import epoch_bound, evaluate
from memkd_ray.errors import DataError, UserInputError
from memkd_ray.eval_record import RECORD_DIR, encode_eval_record
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.storage import Storage, open_storage
from memkd_ray.storage.layout import RunLayout, tune_results_schema, write_table
from memkd_ray.storage.registry import fetch_checkpoint


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


def run_trial(trial: dict[str, Any], spec: dict[str, Any], category: str, storage_path: str,
              filesystem: Any, train_loop: TrainLoop) -> None:
    """One trial: the category's Ray Train run with this trial's parameters."""
    cfg = apply_params(from_dict(spec["config"]), trial["memkd"])
    trainer = category_trainer(
        train_loop, {"category": category, "selection": spec["select_on"]}, cfg,
        tune.get_context().get_trial_id(), storage_path, filesystem,
        callbacks=[TuneReportCallback()])
    with worker_group_start_timeout(cfg.distributed.placement_timeout_s):
        trainer.fit()


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
    train_loop: TrainLoop = train_loop_per_worker,
) -> TuneSummary:
    """Search every category in turn; write tune_results.parquet; return its rows.

    With `resume_run`, the run's saved request is reloaded and each category's search restored
    from storage: finished trials are not repeated. `train_loop` is what every trial's workers
    run (as for `train_benchmark`).
    """
    say = _progress_sink[0] = on_message or print
    storage = open_storage(storage_uri)
    storage.check_writable()
    if resume_run:
        layout = RunLayout(storage, resume_run)
        spec = saved_request(storage, layout.tune_spec_path, resume_run, "tune")
    else:
        spec = _new_request(cfg, categories, space, samples, scheduler, search,
                            max_concurrent, select_on)
    connect(address, storage)
    if not resume_run:
        layout = RunLayout.create(storage)
        save_request(storage, layout.tune_spec_path, spec)
    base = from_dict(spec["config"])
    say(f"tune run {layout.run_id}: {len(spec['categories'])} categories x {spec['samples']} "
        f"trials, selecting on {spec['select_on']}")
    # A local cluster that cannot hold one trial's worker group fails here, not by waiting.
    limit = spec["max_concurrent"] or concurrent_categories(base.distributed,
                                                            joined=address is not None)
    rows = _search_all(spec, base, layout, limit, bool(resume_run), train_loop)
    # Test metrics only now, for the selected trial and, for comparison, the default one.
    for row in rows:
        if row["checkpoint_uri"] and (row["selected"] or row["is_default"]):
            row.update(_test_metrics(row, base, storage))
    for row in rows:
        if row["selected"]:
            say(f"{row['category']}: selected trial {row['trial_id']} "
                f"({row['selection_metric']} {row['selection_value']:.3f}), "
                f"test I-AUROC {row['test_image_auroc']:.3f}")
    return TuneSummary(layout.run_id, _write_rows(spec, layout, rows), rows)


def _new_request(cfg: MemKDConfig | None, categories: list[str], space: dict | None,
                 samples: int, scheduler: str, search: str, max_concurrent: int,
                 select_on: str) -> dict[str, Any]:
    """A new search's request, checked as `train` checks its own (the training split only)."""
    if select_on not in ("validation", "test"):
        raise UserInputError(f"--select-on {select_on}: validation or test")
    if cfg is None or space is None:
        raise UserInputError("a new search needs a config and a search space")
    if samples < 1:
        raise UserInputError(f"--samples {samples}: must be at least 1")
    if max_concurrent < 0:
        raise UserInputError(f"--max-concurrent {max_concurrent}: must be 0 (what the cluster "
                             "holds) or more")
    _scheduler(scheduler, 1)
    _search_algorithm(search, 1, 0, [])
    cfg, names, broken = preflight(cfg, categories, with_test=False)
    if broken:
        raise DataError(next(iter(broken.values())))
    return {"config": cfg.to_dict(), "categories": names, "space": space, "samples": samples,
            "scheduler": scheduler, "search": search, "max_concurrent": max_concurrent,
            "select_on": select_on}


def _search_all(spec: dict[str, Any], base: MemKDConfig, layout: RunLayout, limit: int,
                resume: bool, train_loop: TrainLoop) -> list[dict]:
    """Every category's search in turn. A stopped search writes what it has (the trials of
    every finished category, one `interrupted` row per category not finished, whose trials
    continue on --resume) and raises SearchInterrupted."""
    rows: list[dict] = []
    keep_credentials_out_of_trials()
    with sigterm_stops_tune():
        for index, category in enumerate(spec["categories"]):
            try:
                rows += _search_category(spec, base, category, layout, limit, resume,
                                         train_loop)
            except SearchInterrupted:
                rows += [_row({}, {}, "interrupted", spec, base, name, layout)
                         for name in spec["categories"][index:]]
                _write_rows(spec, layout, rows)
                raise
    return rows


def _write_rows(spec: dict[str, Any], layout: RunLayout, rows: list[dict]) -> str:
    schema = tune_results_schema(list(spec["space"]), spec["select_on"] == "validation")
    return write_table(layout.storage, layout.tune_results_path, rows, schema)


def _selection_metric(spec: dict[str, Any]) -> str:
    return "val_image_auroc" if spec["select_on"] == "validation" else "image_auroc"


def _search_category(spec: dict[str, Any], base: MemKDConfig, category: str,
                     layout: RunLayout, limit: int, resume: bool,
                     train_loop: TrainLoop) -> list[dict]:
    metric = _selection_metric(spec)
    experiment_root = layout.benchmark_dir(base.data.benchmark)
    filesystem = layout.storage.filesystem
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec, category=category,
                             storage_path=layout.trials_dir(base.data.benchmark, category),
                             filesystem=filesystem, train_loop=train_loop),
        {"CPU": 0.01},  # the trial only waits on its Train run, which holds the real resources
    )
    path = layout.category_dir(base.data.benchmark, category)
    if resume and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        defaults = [{"memkd": configured_values(base, spec["space"])}]
        tuner = tune.Tuner(
            trainable,
            param_space={"memkd": param_space(spec["space"])},
            tune_config=tune.TuneConfig(
                metric=metric, mode="max", num_samples=spec["samples"],
                scheduler=_scheduler(spec["scheduler"], epoch_bound(base)),
                search_alg=_search_algorithm(spec["search"], limit, base.train.seed, defaults),
            ),
            run_config=tune.RunConfig(name=category, storage_path=experiment_root,
                                      storage_filesystem=filesystem, verbose=0,
                                      callbacks=[_Progress(category, metric)]),
        )
    grid = tuner.fit()
    if len(grid) < spec["samples"] or grid.num_terminated + grid.num_errors < len(grid):
        # Tune stops gracefully on SIGINT/SIGUSR1 and returns the trials so far (the random
        # generator creates trials lazily, so later ones may not exist yet): selecting
        # from a partial search would be wrong, so stop here; the state is in storage.
        raise SearchInterrupted(f"search of {category} interrupted; continue it with: "
                                f"memkd-ray tune --resume {layout.run_id} --storage "
                                f"{layout.storage.uri}")
    rows = [_row(result.metrics or {}, (result.config or {}).get("memkd", {}),
                 "error" if result.error else "ok", spec, base, category, layout)
            for result in grid]
    mark_selected(rows)
    return rows


def mark_selected(rows: list[dict]) -> None:
    """Mark the best trial that ended well with a checkpoint: a trial that failed after
    reporting one is not a result (its last report may be from a broken state)."""
    candidates = [r for r in rows if r["checkpoint_uri"] and r["status"] == "ok"]
    if candidates:
        best = max(candidates, key=lambda r: (_finite(r["selection_value"]),
                                              _finite(r["selection_tiebreak"])))
        best["selected"] = True


def _row(metrics: dict[str, Any], params: dict[str, Any], status: str, spec: dict[str, Any],
         base: MemKDConfig, category: str, layout: RunLayout) -> dict:
    """One row of tune_results.parquet: a trial's last report, or (no metrics, no params) an
    unfinished category; every row has the same columns (layout.tune_results_schema)."""
    prefix = "val_" if spec["select_on"] == "validation" else ""
    metric = _selection_metric(spec)
    checkpoint = metrics.get("checkpoint_path")
    return {
        "run_id": layout.run_id, "benchmark": base.data.benchmark, "category": category,
        "trial_id": metrics.get("trial_id", ""), "status": status,
        "epochs": int(metrics.get("epoch", 0)), "selected_on": spec["select_on"],
        "selection_metric": metric, "selection_value": float(metrics.get(metric, math.nan)),
        "selection_tiebreak": float(metrics.get(f"{prefix}pixel_auroc", math.nan)),
        **{f"param.{k}": params.get(k) for k in spec["space"]},
        **{f"{prefix or 'test_'}{k}": float(metrics.get(f"{prefix}{k}", math.nan))
           for k in METRIC_KEYS},
        # Selecting on validation, test metrics exist only for the selected and the default
        # trial, computed after selection (_test_metrics).
        **({f"test_{k}": math.nan for k in METRIC_KEYS} if prefix else {}),
        "checkpoint_uri": layout.storage.uri_for(checkpoint) if checkpoint else "",
        "selected": False,
        "is_default": params == configured_values(base, spec["space"]),
    }


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

"""Everything a report shows, read from storage: results rows, checkpoint metadata (config,
teacher, version, loss history) and the test evaluation records (eval_record.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from memkd_ray.checkpoint_format import META_FILE, parse_checkpoint_meta
from memkd_ray.errors import UserInputError
from memkd_ray.eval_record import RECORD_DIR, RECORD_FILES, EvalRecord, decode_eval_record
from memkd_ray.metrics import METRIC_KEYS
from memkd_ray.storage import Storage
from memkd_ray.storage.layout import RunLayout, read_table


@dataclass
class CategoryResult:
    benchmark: str
    category: str
    status: str
    """`ok`, or why the category has no result (its training failed)."""
    metrics: dict[str, float]
    """The five test metrics as fractions, exactly as in the run's results Parquet."""
    checkpoint_uri: str
    meta: dict[str, Any] | None
    """checkpoint.json of the category's final (train) or selected (tune) checkpoint."""
    record: EvalRecord | None

    @property
    def history(self) -> list[dict[str, float]]:
        return ((self.meta or {}).get("training_state") or {}).get("history", [])


@dataclass
class RunData:
    run_id: str
    kind: str
    """`train` (results.parquet) or `tune` (tune_results.parquet)."""
    run_uri: str
    results_uri: str
    rows: list[dict[str, Any]]
    """The results Parquet's rows as stored (all trials of a search)."""
    categories: list[CategoryResult]


def read_run(storage: Storage, run_id: str) -> RunData:
    """The run's results and, per category, its checkpoint's metadata and evaluation record.

    UserInputError when the run does not exist; a category whose checkpoint has no evaluation
    record (written before records existed) is shown without curves and examples.
    """
    layout = RunLayout(storage, run_id)
    train_path, tune_path = layout.results_path, layout.tune_results_path
    if storage.exists(train_path):
        kind, path = "train", train_path
    elif storage.exists(tune_path):
        kind, path = "tune", tune_path
    else:
        names = " or ".join(p.rsplit("/", 1)[1] for p in (train_path, tune_path))
        raise UserInputError(f"run {run_id}: no {names} under {storage.uri}")
    rows = read_table(storage, path)
    if kind == "train":
        shown = [(row, {key: row[key] for key in METRIC_KEYS}) for row in rows]
    else:  # the selected trial of each category, with its one test evaluation, and the
        # categories a stopped search did not finish
        shown = [(row, {key: row[f"test_{key}"] for key in METRIC_KEYS})
                 for row in rows if row["selected"] or row["status"] == "interrupted"]
    categories = [_category(storage, row, metrics) for row, metrics in shown]
    return RunData(run_id, kind, storage.uri_for(layout.run_dir), storage.uri_for(path), rows,
                   categories)


def _category(storage: Storage, row: dict[str, Any], metrics: dict[str, float]
              ) -> CategoryResult:
    uri = row.get("checkpoint_uri") or ""
    meta = record = None
    if uri:
        base = storage.path_of(uri)
        meta = parse_checkpoint_meta(storage.read_bytes(f"{base}/{META_FILE}"), uri)
        files = [f"{base}/{RECORD_DIR}/{name}" for name in RECORD_FILES]
        if all(storage.exists(path) for path in files):
            record = decode_eval_record({name: storage.read_bytes(path)
                                         for name, path in zip(RECORD_FILES, files, strict=True)})
    status = row.get("status", "ok")
    if status != "ok" and row.get("error"):
        status = f"{status}: {row['error']}"
    return CategoryResult(row["benchmark"], row["category"], status, metrics, uri, meta, record)


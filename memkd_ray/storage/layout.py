"""The storage layout, identical under every backend, and the one schema of each results table.

    <root>/runs/<run_id>/<benchmark>/<category>/...   Ray Train run dirs and checkpoints
    <root>/runs/<run_id>/train_spec.json | tune_spec.json   the request, for --resume
    <root>/runs/<run_id>/results.parquet              train: one row per category
    <root>/runs/<run_id>/tune_results.parquet         tune: one row per trial
    <root>/runs/<run_id>/report/                      the run report
    <root>/registry/<benchmark>/<category>/best.json          pointer + model card
    <root>/registry/<benchmark>/<category>/claims/<id>.json   one per promotion, immutable
    <root>/registry/<benchmark>/<category>/history.parquet    every promotion, oldest first

Every file name of the store is here; other modules ask a layout for paths.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import secrets
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from memkd_ray.checkpoint_format import META_FILE, STATE_FILE, WEIGHTS_FILE, parse_checkpoint_meta
from memkd_ray.decision import DECISION_RATE_KEYS
from memkd_ray.errors import CheckpointError
from memkd_ray.metrics import METRIC_KEYS, RECALL_KEYS
from memkd_ray.storage.base import NAME, Storage, StorageError, plain_name

RESULTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("benchmark", pa.string()), ("category", pa.string()),
    ("config_hash", pa.string()), ("status", pa.string()), ("error", pa.string()),
    *((key, pa.float64()) for key in (*METRIC_KEYS, *DECISION_RATE_KEYS, *RECALL_KEYS)),
    ("epochs", pa.int64()), ("workers", pa.int64()), ("wall_seconds", pa.float64()),
    ("checkpoint_uri", pa.string()),
])
"""results.parquet: `status` is ok, failed (with `error`) or interrupted. The decision rates
(decision.py) are NaN for a model without a decision, the memory recall errors (metrics.py) where
a site has no memory or no image was held out; runs from before them lack those columns."""


HISTORY_SCHEMA = pa.schema([
    ("promoted_at", pa.string()), ("claim", pa.string()), ("run_id", pa.string()),
    ("checkpoint_uri", pa.string()), ("sha256", pa.string()), ("forced", pa.bool_()),
    *((key, pa.float64()) for key in METRIC_KEYS),
])
"""A registry entry's history.parquet: one row per promotion, oldest first."""


def tune_results_schema(params: list[str], validation: bool) -> pa.Schema:
    """tune_results.parquet: a search's fixed columns, `param.<key>` per searched key (typed by
    its values), validation metrics when selecting on validation, and test metrics."""
    fixed = [("run_id", pa.string()), ("benchmark", pa.string()), ("category", pa.string()),
             ("trial_id", pa.string()), ("status", pa.string()), ("epochs", pa.int64()),
             ("selected_on", pa.string()), ("selection_metric", pa.string()),
             ("selection_value", pa.float64()), ("selection_tiebreak", pa.float64())]
    prefixes = ["val_", "test_"] if validation else ["test_"]
    return pa.schema([*fixed, *((f"param.{key}", pa.null()) for key in params),
                      *((f"{prefix}{key}", pa.float64()) for prefix in prefixes
                        for key in METRIC_KEYS),
                      ("checkpoint_uri", pa.string()), ("selected", pa.bool_()),
                      ("is_default", pa.bool_())])


def results_row(run_id: str, benchmark: str, category: str, config_hash: str,
                status: str, **values: Any) -> dict[str, Any]:
    """A results.parquet row; what `values` leaves out is empty (no metrics, no checkpoint)."""
    empty = {"error": "",
             **dict.fromkeys((*METRIC_KEYS, *DECISION_RATE_KEYS, *RECALL_KEYS), math.nan),
             "epochs": 0, "workers": 0, "wall_seconds": 0.0, "checkpoint_uri": ""}
    unknown = set(values) - set(empty)
    if unknown:
        raise ValueError(f"not a results column: {sorted(unknown)[0]}")
    return {"run_id": run_id, "benchmark": benchmark, "category": category,
            "config_hash": config_hash, "status": status, **empty, **values}


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and two runs never share one."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def runs_dir(storage: Storage) -> str:
    """`<root>/runs`, where every run has its directory."""
    return storage.path("runs")


class RunLayout:
    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.run_id = plain_name("run id", run_id)
        self.run_dir = f"{runs_dir(storage)}/{run_id}"
        self.train_spec_path = f"{self.run_dir}/train_spec.json"
        self.tune_spec_path = f"{self.run_dir}/tune_spec.json"
        self.results_path = f"{self.run_dir}/results.parquet"
        self.tune_results_path = f"{self.run_dir}/tune_results.parquet"
        self.report_dir = f"{self.run_dir}/report"

    @classmethod
    def create(cls, storage: Storage) -> RunLayout:
        """A fresh run id whose directory does not exist yet (runs never overwrite)."""
        for _ in range(5):
            layout = cls(storage, new_run_id())
            if not storage.exists(layout.run_dir):
                return layout
        raise StorageError(f"{storage.uri}: could not find an unused run id")

    def benchmark_dir(self, benchmark: str) -> str:
        """Where Ray Train puts one run directory per category (`RunConfig.storage_path`)."""
        return f"{self.run_dir}/{plain_name('benchmark', benchmark)}"

    def category_dir(self, benchmark: str, category: str) -> str:
        """A category's Ray Train run (its checkpoints), or under `tune` its search."""
        return f"{self.benchmark_dir(benchmark)}/{plain_name('category', category)}"

    def trials_dir(self, benchmark: str, category: str) -> str:
        """Under `tune`, where the Ray Train runs of a category's trials go."""
        return f"{self.category_dir(benchmark, category)}-train"


CHECKPOINT_DIR = re.compile(r"checkpoint_epoch_(\d{4,})")


def checkpoint_dir_name(epoch: int) -> str:
    """The directory of a category's checkpoint after `epoch` in its Train run directory."""
    return f"checkpoint_epoch_{epoch:04d}"


def newest_complete_checkpoint(filesystem: pafs.FileSystem, run_dir: str) -> str | None:
    """The newest checkpoint in a category's Train run directory whose files all match the
    sha256s of its checkpoint.json: an upload a killed run never registered with Ray counts,
    a partial one does not."""
    selector = pafs.FileSelector(run_dir, allow_not_found=True)
    found = sorted(((int(match[1]), info.path) for info in filesystem.get_file_info(selector)
                    if info.type == pafs.FileType.Directory
                    and (match := CHECKPOINT_DIR.fullmatch(info.base_name))), reverse=True)
    for epoch, path in found:
        if _complete(filesystem, path, epoch):
            return path
    return None


def _complete(filesystem: pafs.FileSystem, path: str, epoch: int) -> bool:
    def digest(name: str) -> str:
        sha = hashlib.sha256()
        with filesystem.open_input_stream(f"{path}/{name}") as stream:
            while chunk := stream.read(1 << 20):
                sha.update(chunk)
        return sha.hexdigest()

    try:
        with filesystem.open_input_stream(f"{path}/{META_FILE}") as stream:
            meta = parse_checkpoint_meta(stream.read(), f"{path}/{META_FILE}")
        state = meta.get("training_state") or {}
        return (meta["epoch"] == epoch and digest(WEIGHTS_FILE) == meta["sha256"]
                and isinstance(state, dict) and digest(STATE_FILE) == state.get("sha256"))
    except (OSError, CheckpointError):
        return False


def registry_dir(storage: Storage, benchmark: str | None = None) -> str:
    """`<root>/registry[/<benchmark>]` (the name checked: none leads elsewhere)."""
    return storage.path("registry", *([benchmark] if benchmark else []))


class RegistryLayout:
    """One category's registry entry: `best.json` (the pointer and model card), `claims/`
    (one immutable record per promotion) and `history.parquet` (every promotion)."""

    BEST_FILE = "best.json"

    def __init__(self, storage: Storage, benchmark: str, category: str) -> None:
        self.dir = f"{registry_dir(storage, benchmark)}/{plain_name('category', category)}"
        self.best_path = f"{self.dir}/{self.BEST_FILE}"
        self.claims_dir = f"{self.dir}/claims"
        self.history_path = f"{self.dir}/history.parquet"


POINTERS = ("checkpoint_uri",)
"""Columns that point at objects of the store: kept relative to its root (Storage.reference)
and resolved, checked to stay under it, when read (Storage.resolve)."""


def write_table(storage: Storage, path: str, rows: list[dict[str, Any]],
                schema: pa.Schema) -> str:
    """Rows as one Parquet object of `schema`, written atomically; returns its URI. Columns
    typed null in `schema` take the type of their values."""
    columns = {field.name: [row.get(field.name) for row in rows] for field in schema}
    for name in POINTERS:
        if name in columns:
            columns[name] = [storage.reference(uri) if uri else uri for uri in columns[name]]
    table = pa.table({name: pa.array(values, type=None if schema.field(name).type == pa.null()
                                     else schema.field(name).type)
                      for name, values in columns.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(path, buffer.getvalue())
    return storage.uri_for(path)


def parquet_rows(data: bytes) -> list[dict[str, Any]]:
    """The rows of Parquet bytes. Read without Arrow's thread pool: these tables are small,
    and a process that read one through the pool aborted at exit in about a third of the
    runs ("terminate called without an active exception", pyarrow 26)."""
    return pq.read_table(io.BytesIO(data), use_threads=False).to_pylist()


def read_table(storage: Storage, path: str) -> list[dict[str, Any]]:
    """The rows of a table written by `write_table`, its pointers as URIs in this store."""
    where = storage.uri_for(path)
    try:
        rows = parquet_rows(storage.read_bytes(path))
    except (pa.ArrowException, OSError) as exc:
        raise StorageError(f"{where}: unreadable table ({str(exc).splitlines()[0][:200]})"
                           ) from None
    for row in rows:
        for name in POINTERS:
            if row.get(name):
                row[name] = storage.resolve(row[name], where)
    return rows


def write_results(layout: RunLayout, rows: list[dict[str, Any]]) -> str:
    """results.parquet, atomically; returns its URI."""
    return write_table(layout.storage, layout.results_path, rows, RESULTS_SCHEMA)


def read_results(layout: RunLayout) -> list[dict[str, Any]]:
    return read_table(layout.storage, layout.results_path)


def list_runs(storage: Storage) -> list[tuple[str, list[dict]]]:
    """(run id, results rows) of every run that has a results.parquet, oldest first."""
    layouts = [RunLayout(storage, run_id) for run_id in storage.children(runs_dir(storage))
               if NAME.fullmatch(run_id)]  # not a stray file beside the runs
    return [(layout.run_id, read_results(layout)) for layout in layouts
            if storage.exists(layout.results_path)]

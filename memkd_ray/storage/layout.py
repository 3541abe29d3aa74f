"""The storage layout of DESIGN.md 6, identical under `file://` and `s3://`.

    <root>/runs/<run_id>/<benchmark>/<category>/...   Ray Train run dirs and checkpoints
    <root>/runs/<run_id>/results.parquet              one row per category
"""

from __future__ import annotations

import io
import secrets
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from memkd_ray.storage.uri import NAME, Storage, StorageError, plain_name

RESULTS_FILE = "results.parquet"


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and two runs never share one."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class RunLayout:
    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self.run_id = plain_name("run id", run_id)
        self.run_dir = storage.path("runs", run_id)

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

    @property
    def results_path(self) -> str:
        return f"{self.run_dir}/{RESULTS_FILE}"


def write_results(layout: RunLayout, rows: list[dict]) -> str:
    """Write results.parquet atomically; returns its URI."""
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    layout.storage.write_bytes(layout.results_path, buffer.getvalue())
    return layout.storage.uri_for(layout.results_path)


def read_results(layout: RunLayout) -> list[dict]:
    data = layout.storage.read_bytes(layout.results_path)
    return pq.read_table(io.BytesIO(data)).to_pylist()


def list_runs(storage: Storage) -> list[tuple[str, list[dict]]]:
    """(run id, results rows) of every run that has a results.parquet, oldest first."""
    layouts = [RunLayout(storage, run_id) for run_id in storage.children(storage.path("runs"))
               if NAME.fullmatch(run_id)]  # not a stray file beside the runs
    return [(layout.run_id, read_results(layout)) for layout in layouts
            if storage.exists(layout.results_path)]

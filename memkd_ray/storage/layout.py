"""The storage layout of DESIGN.md 6 on a local directory (the embedded default).

    <root>/runs/<run_id>/<benchmark>/<category>/checkpoint/   model + checkpoint.json
    <root>/runs/<run_id>/results.parquet                      one row per category
"""

from __future__ import annotations

import os
import secrets
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from memkd_ray.errors import UserInputError

RESULTS_FILE = "results.parquet"


def local_root(uri: str) -> Path:
    """A `file://` URI or plain path as a directory path."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserInputError(f"--storage {uri}: {scheme}:// storage is not supported yet; "
                             "use a local directory or file:// URI")
    return Path(uri)


def new_run_id() -> str:
    """UTC time plus a random suffix: sortable, and two runs never share one."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


class RunLayout:
    def __init__(self, root: str | Path, run_id: str) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.run_dir = self.root / "runs" / run_id

    @classmethod
    def create(cls, root: str | Path) -> RunLayout:
        """A new run directory; fails rather than reuse an existing one."""
        layout = cls(root, new_run_id())
        layout.run_dir.mkdir(parents=True, exist_ok=False)
        return layout

    def checkpoint_dir(self, benchmark: str, category: str) -> Path:
        return self.run_dir / benchmark / category / "checkpoint"

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_FILE


def write_parquet_atomic(rows: list[dict], path: Path) -> Path:
    """Write rows as Parquet via a temporary file and a rename, so readers never see half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(pa.Table.from_pylist(rows), staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def read_results(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()

"""The run report (`memkd-ray report RUN_ID`): an HTML page and PNGs, built from storage.

Everything comes from what the run left in storage (results Parquet, checkpoint.json, the
evaluation records beside the checkpoints), so a report needs neither the data nor a GPU.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from memkd_ray import __version__
from memkd_ray.report.figures import curves_figure, examples_figure, loss_figure
from memkd_ray.report.page import render_page
from memkd_ray.report.paper import paper_results
from memkd_ray.report.run_data import RunData, read_run
from memkd_ray.storage import Storage
from memkd_ray.storage.layout import RunLayout

PAGE_FILE = "index.html"


def render_report(run: RunData, directory: Path) -> Path:
    """Write the PNGs, then the page that shows them, into `directory`; returns the page."""
    figures: dict[str, dict[str, str]] = {}
    for c in run.categories:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", c.category)
        names = {}
        if c.record is not None:
            names["curves"] = curves_figure(c.record, c.metrics,
                                            directory / f"{stem}_curves.png").name
        if c.history:
            names["losses"] = loss_figure(c.history, directory / f"{stem}_losses.png").name
        if c.record is not None and c.record.examples:
            names["examples"] = examples_figure(c.record, directory / f"{stem}_examples.png").name
        figures[c.category] = names
    benchmarks = {c.benchmark for c in run.categories}
    paper = paper_results(benchmarks.pop()) if len(benchmarks) == 1 else None
    page = directory / PAGE_FILE
    page.write_text(render_page(run, figures, paper, __version__), encoding="utf-8")
    return page


def write_report(storage: Storage, run_id: str, out: str | Path | None = None) -> str:
    """Build the report of `run_id`; into `out` (a local directory) or, by default, into the
    run's `report/` folder in storage. Returns where the page is (path or URI).

    The page is written last, so it never refers to a PNG that is not there yet.
    """
    run = read_run(storage, run_id)
    with tempfile.TemporaryDirectory(prefix="memkd-report-") as scratch:
        page = render_report(run, Path(scratch))
        files = sorted(Path(scratch).iterdir(), key=lambda p: p == page)
        if out is not None:
            target = Path(out)
            target.mkdir(parents=True, exist_ok=True)
            for file in files:
                shutil.copyfile(file, target / file.name)
            return str((target / PAGE_FILE).resolve())
        remote = RunLayout(storage, run_id).report_dir
        for file in files:
            storage.write_bytes(f"{remote}/{file.name}", file.read_bytes())
        return storage.uri_for(f"{remote}/{PAGE_FILE}")

"""The run report: evaluation records, the paper's numbers, and the HTML of a real run."""

from __future__ import annotations

import html
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from memkd_ray.cli import main
from memkd_ray.data.sample import Sample
from memkd_ray.engine import Evaluation
from memkd_ray.eval_record import (
    RECORD_FILES,
    decode_eval_record,
    encode_eval_record,
    thin_curve,
)
from memkd_ray.metrics import (
    METRIC_KEYS,
    area_under_curve,
    au_pro,
    metrics_and_curves,
    percent,
)
from memkd_ray.report.page import render_page
from memkd_ray.report.paper import _all_results, paper_results
from memkd_ray.report.run_data import CategoryResult, RunData


class PageParser(HTMLParser):
    """Collects what a page refers to and the named metric cells of its tables."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self.text: list[str] = []
        self._cell: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.references += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "td" and "data-metric" in named:
            self._cell = (named["data-category"], named["data-metric"])
            self.cells[self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self.cells[self._cell] += data.strip()


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _toy_evaluation(tmp_path: Path):
    """Six 16x16 test images: three normal, three defective with one square each."""
    rng = np.random.default_rng(0)
    samples, maps, masks = [], [], []
    for i, label in enumerate([0, 0, 0, 1, 1, 1]):
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, label, "good" if label == 0 else "hole"))
        amap = rng.random((16, 16)).astype(np.float32)
        mask = np.zeros((16, 16), np.uint8)
        if label:
            mask[4:8, 4:8] = 1
            amap[4:8, 4:8] += 0.3 * i  # defective images get brighter squares
        maps.append(amap)
        masks.append(mask)
    maps, masks = np.stack(maps), np.stack(masks)
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = maps.reshape(6, -1).max(1)
    return samples, maps, masks, labels, scores


def test_eval_record_round_trip_keeps_curves_examples_and_scores(tmp_path):
    samples, maps, masks, labels, scores = _toy_evaluation(tmp_path)
    metrics, curves = metrics_and_curves(maps, masks, labels, scores)
    evaluation = Evaluation(maps, masks, labels, scores, metrics, curves)
    files = encode_eval_record(samples, evaluation, image_size=16)
    record = decode_eval_record(files)

    assert [row["score"] for row in record.images] == pytest.approx(scores.tolist())
    roles = {row["example"]: row["id"] for row in record.images if row["example"]}
    normal_worst = int(np.argmax(scores[:3]))
    assert roles == {"worst_normal": samples[normal_worst].id,
                     "best_defective": samples[3 + int(np.argmax(scores[3:]))].id,
                     "worst_defective": samples[3 + int(np.argmin(scores[3:]))].id}
    example = record.examples["worst_normal"]
    assert np.array_equal(example["map"], maps[normal_worst])
    assert np.array_equal(example["image"], samples[normal_worst].load_image(16))
    assert record.map_range == (float(maps.min()), float(maps.max()))

    # The stored curves integrate to the metrics computed independently.
    fpr, tpr = record.curves["image_roc"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores))
    fpr, tpr = record.curves["pixel_roc"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    fpr, pro = record.curves["pro"]
    assert area_under_curve(fpr, pro, 0.3) / 0.3 == pytest.approx(au_pro(maps, masks), abs=1e-9)


def test_thinned_curves_keep_their_ends_and_area():
    x = np.sort(np.random.default_rng(1).random(100_000)) ** 3
    y = np.sqrt(np.linspace(0, 1, len(x)))
    tx, ty = thin_curve(x, y, points=500)
    assert len(tx) <= 1002 and (tx[0], tx[-1], ty[-1]) == (x[0], x[-1], y[-1])
    assert np.all(np.diff(tx) >= 0)
    assert np.trapezoid(ty, tx) == pytest.approx(np.trapezoid(y, x), abs=2e-3)


def test_paper_tables_agree_with_their_printed_means():
    # An independent check of the transcription: Table 2's per-category values average to
    # the means it prints (to its rounding), and every Table 1 mean row has all five metrics.
    for name, results in _all_results().items():
        for method in ("MemKD", "RD"):
            if results.categories:
                values = [results.category(c, method, "image_auroc") for c in results.categories]
                assert len(values) == results.category_count
                assert np.mean(values) == pytest.approx(results.mean[method]["image_auroc"],
                                                        abs=0.06), (name, method)
            else:
                assert set(results.mean[method]) == set(METRIC_KEYS), name
    assert paper_results("mvtec").mean["MemKD"]["image_auroc"] == 99.6
    assert paper_results("synthetic") is None


def test_paper_numbers_sit_beside_ours_for_a_paper_benchmark():
    categories = [
        CategoryResult("mvtec3d", name, "ok", dict.fromkeys(METRIC_KEYS, value), "", None, None)
        for name, value in (("bagel", 0.95), ("rope", 0.9))
    ]
    run = RunData("r1", "train", "file:///s/runs/r1", "file:///s/runs/r1/results.parquet", [],
                  categories)
    page = render_page(run, {}, paper_results("mvtec3d"), "1.0")
    assert "<td>99.1</td><td>98.7</td>" in page  # bagel: MemKD and RD, Table 2(a)
    assert "<td>99.8</td><td>99.3</td>" in page  # rope
    assert "MemKD, paper Table 2(a)" in page and "<td>90.0</td>" in page
    assert "covers the categories above" in page  # 2 of the paper's 10
    assert "not this page's AU-PRO" not in page  # Table 2 has no PRO column


def test_paper_pro_is_marked_as_a_different_metric():
    categories = [CategoryResult("mvtec", "bottle", "ok", dict.fromkeys(METRIC_KEYS, 0.9), "",
                                 None, None)]
    run = RunData("r1", "train", "file:///s/runs/r1", "file:///s/runs/r1/results.parquet", [],
                  categories)
    page = render_page(run, {}, paper_results("mvtec"), "1.0")
    # Table 1(a)'s P-PRO (MemKD 94.5, RD 93.9) carries the mark, our AU-PRO cell does not.
    assert "<td>94.5\u2020</td>" in page and "<td>93.9\u2020</td>" in page
    assert '<td data-category="bottle" data-metric="pixel_aupro">90.0</td>' in page
    assert "\u2020 The paper's P-PRO is not this page's AU-PRO" in html.unescape(page)


def test_report_of_a_training_run(trained_run, tmp_path, capsys):
    run_dir, result = trained_run
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    # `train` wrote the report into the run's folder in storage and said where.
    page = run_dir / "report" / "index.html"
    assert f"report: {page.as_uri()}" in result.stdout

    parsed = parse_page(page)
    assert parsed.references, "the report shows no figures"
    for reference in parsed.references:
        assert "://" not in reference and not reference.startswith("/"), reference
        target = page.parent / reference
        assert target.is_file() and target.read_bytes().startswith(b"\x89PNG"), reference
    # Three figures per category: curves, losses, examples.
    assert len(parsed.references) == 3 * len(rows)

    # The table is results.parquet in percent with one decimal, mean included.
    for row in rows:
        for key in METRIC_KEYS:
            assert parsed.cells[(row["category"], key)] == percent(row[key])
    for key in METRIC_KEYS:
        assert parsed.cells[("mean", key)] == percent(float(np.mean([r[key] for r in rows])))
    text = " ".join(parsed.text)
    assert "efficientnet_lite0" in text and rows[0]["checkpoint_uri"] in text

    # The command writes the same page into a local directory on request.
    assert main(["report", run_dir.name, "--storage", str(run_dir.parents[1]),
                 "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'out' / 'index.html'}"
    assert (tmp_path / "out" / "index.html").read_text() == page.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in page.parent.iterdir())


def test_report_of_an_unknown_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", "20990101-000000-abcdef", "--storage", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("memkd-ray: error: run 20990101-000000-abcdef: no results.parquet")
    assert "\n" not in error and not any(tmp_path.iterdir())


def test_record_metrics_match_the_checkpoint(trained_run):
    # The evaluation record beside each checkpoint holds the scores its metrics came from.
    run_dir, _ = trained_run
    for row in pq.read_table(run_dir / "results.parquet").to_pylist():
        directory = run_dir.parents[1] / row["checkpoint_uri"] / "evaluation"
        record = decode_eval_record({n: (directory / n).read_bytes() for n in RECORD_FILES})
        labels = np.array([r["label"] for r in record.images])
        scores = np.array([r["score"] for r in record.images])
        assert roc_auc_score(labels, scores) == pytest.approx(row["image_auroc"])
        assert not math.isnan(row["pixel_aupro"])

"""Calibrated decisions: the threshold's statistics, the held-out split, and the threshold a
trained run records, re-derived here from its held-out images."""

import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import norm

from memkd_ray.checkpoint import load_model
from memkd_ray.cli import main
from memkd_ray.data import read_category
from memkd_ray.data.validation import hold_out_normals
from memkd_ray.decision import (
    PREDICTION_BOUND,
    Decision,
    calibrate,
    decide,
    decision_rates,
    parse_decision,
)
from memkd_ray.engine import predict_maps
from memkd_ray.errors import CheckpointError


@pytest.mark.parametrize("n", [5, 30])
def test_the_bound_flags_the_target_share_of_new_normal_images(n):
    """A prediction bound is exact on normal scores: averaged over many held-out sets of n,
    the chance that a new normal image scores above the threshold is the target (here read
    off the normal CDF for each fitted threshold, 8000 sets)."""
    rng = np.random.default_rng(0)
    mean, spread, target = 3.0, 0.4, 0.01
    exceed = [1 - norm.cdf(calibrate(rng.normal(mean, spread, n), target).threshold,
                           mean, spread) for _ in range(8000)]
    assert abs(np.mean(exceed) - target) < 0.0015
    # A plug-in quantile (mean + z s) flags well over the target from few images.
    plug_in = [1 - norm.cdf(x.mean() + norm.ppf(1 - target) * x.std(ddof=1), mean, spread)
               for x in (rng.normal(mean, spread, n) for _ in range(8000))]
    assert np.mean(plug_in) > 1.3 * target


def test_threshold_by_hand_and_the_normalised_score():
    scores = [1.0, 2.0, 3.0, 4.0, 5.0]
    decision = calibrate(scores, 0.05)
    # mean 3, s = sqrt(2.5), t_{4, 0.95} = 2.131847, sqrt(1 + 1/5)
    assert decision.threshold == pytest.approx(3 + math.sqrt(2.5) * 2.131847 * math.sqrt(1.2),
                                               rel=1e-6)
    assert decision.scale == pytest.approx(math.sqrt(2.5))
    assert (decision.method, decision.held_out_images, decision.target_fpr) == (
        PREDICTION_BOUND, 5, 0.05)
    t = decision.threshold
    answers = decide([t - 1, t, t + 1e-9, t + 1], decision)
    assert [a["anomalous"] for a in answers] == [False, False, True, True]
    assert answers[1]["normalized_score"] == pytest.approx(0.5)
    normalized = [a["normalized_score"] for a in answers]
    assert normalized == sorted(normalized) and 0 < normalized[0] < 0.5 < normalized[-1] < 1
    assert decide([1.0], None) == [{"score": 1.0, "normalized_score": None, "anomalous": None}]
    # Identical scores still give a usable logistic.
    assert calibrate([2.0] * 6, 0.01).scale > 0


def test_decision_rates_count_each_split():
    decision = Decision(threshold=0.5, scale=0.1)
    rates = decision_rates(np.array([0, 0, 0, 0, 1, 1]),
                           np.array([0.1, 0.6, 0.2, 0.3, 0.9, 0.4]), decision)
    assert rates == {"normal_flag_rate": 0.25, "defect_catch_rate": 0.5}
    assert math.isnan(decision_rates(np.array([1]), np.array([1.0]), decision)[
        "normal_flag_rate"])


@pytest.mark.parametrize("stored, reason", [
    ({"method": "magic", "threshold": 1.0}, "method"),
    ({"method": "user", "threshold": float("nan")}, "threshold"),
    ({"method": "user", "threshold": True}, "threshold"),
    ({"method": "user", "threshold": 1.0, "scale": -1.0}, "scale"),
    ({"method": "user", "threshold": 1.0, "held_out_images": -3}, "held_out_images"),
    ([1, 2], "method"),
])
def test_a_malformed_stored_decision_is_refused(stored, reason):
    with pytest.raises(CheckpointError, match=reason):
        parse_decision(stored, "checkpoint.json")


def test_stored_decisions_round_trip():
    decision = calibrate([0.2, 0.3, 0.25, 0.31, 0.22], 0.01)
    assert parse_decision(json.loads(json.dumps(decision.to_dict())), "x") == decision
    assert parse_decision(None, "x") is None


def test_the_held_out_split_is_seeded_disjoint_and_refuses_to_starve_training(synth_root):
    train = read_category("synthetic", synth_root, "stripes").train
    kept, held = hold_out_normals(train, seed=0, fraction=0.1, min_count=5)
    assert (len(kept), len(held)) == (54, 6)
    assert not {s.image_path for s in kept} & {s.image_path for s in held}
    assert hold_out_normals(train, 0, 0.1, 5) == (kept, held)
    assert hold_out_normals(train, 1, 0.1, 5)[1] != held
    assert hold_out_normals(train[:9], 0, 0.1, 5) == (train[:9], [])
    assert hold_out_normals(train, 0, 0.0, 5) == (train, [])


def test_a_trained_run_records_the_threshold_of_its_held_out_images(trained_run, synth_root,
                                                                  tmp_path, capsys):
    """Re-derived independently: the held-out images scored by the final model, the bound
    computed here by its formula, equal to what checkpoint.json, results.parquet, the
    registry card and `predict` carry."""
    from scipy.stats import t as student_t

    run_dir, _ = trained_run
    checkpoint = run_dir / "synthetic" / "stripes" / "checkpoint_epoch_0006"
    model, loaded = load_model(checkpoint)
    meta, cfg = loaded.meta, loaded.config
    stored = parse_decision(meta["decision"], "checkpoint.json")
    _, held = hold_out_normals(read_category("synthetic", synth_root, "stripes").train,
                               cfg.train.seed, cfg.decision.holdout_fraction,
                               cfg.decision.min_holdout)
    pixels = torch.from_numpy(np.stack([s.load_image(128) for s in held])).permute(0, 3, 1, 2)
    scores = predict_maps(model, pixels.float() / 255, cfg)[1].double().numpy()
    n = len(scores)
    expected = scores.mean() + scores.std(ddof=1) * student_t.ppf(0.99, n - 1) * math.sqrt(
        1 + 1 / n)
    assert stored.held_out_images == n == 6 and stored.target_fpr == 0.01
    assert stored.threshold == pytest.approx(expected, rel=1e-5)

    rows = {r["category"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    assert rows["stripes"]["normal_flag_rate"] == meta["metrics"]["normal_flag_rate"]
    assert 0 <= rows["stripes"]["normal_flag_rate"] <= 0.2
    assert rows["stripes"]["defect_catch_rate"] > 0.5
    card = json.loads((run_dir.parent.parent / "registry" / "synthetic" / "stripes"
                       / "best.json").read_text())
    assert card["decision"] == meta["decision"]

    images = [synth_root / "stripes" / "test" / "good" / "003.png",
              synth_root / "stripes" / "test" / "hole" / "003.png"]
    assert main(["-q", "predict", "--checkpoint", str(checkpoint), *map(str, images),
                 "--out", str(tmp_path / "pred")]) == 0
    answers = json.loads(capsys.readouterr().out)
    for answer in answers.values():
        assert answer["anomalous"] == (answer["score"] > stored.threshold)
        assert answer["normalized_score"] == pytest.approx(
            1 / (1 + math.exp(-(answer["score"] - stored.threshold) / stored.scale)))
    assert answers[str(images[1])]["anomalous"]


def test_a_model_from_before_decisions_answers_without_one(trained_run, synth_root, tmp_path,
                                                           capsys):
    run_dir, _ = trained_run
    old = tmp_path / "old"
    shutil.copytree(run_dir / "synthetic" / "stripes" / "checkpoint_epoch_0006", old)
    meta = json.loads((old / "checkpoint.json").read_text())
    del meta["decision"]
    (old / "checkpoint.json").write_text(json.dumps(meta))
    image = synth_root / "stripes" / "test" / "hole" / "003.png"
    assert main(["-q", "predict", "--checkpoint", str(old), str(image),
                 "--out", str(tmp_path / "pred")]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out)[str(image)]
    assert answer["normalized_score"] is None and answer["anomalous"] is None
    assert answer["score"] > 0 and "carries no decision" in err

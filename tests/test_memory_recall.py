"""What the NR Memories recall: the Eq. 10 probe on held-out normals and its two baselines,
the `features` value initialisation and the memories' own learning rate, checked against
numbers computed here independently (NumPy)."""

import numpy as np
import pytest
import torch

from memkd_ray.data import read_category
from memkd_ray.data.datasets import load_training_images
from memkd_ray.engine import TrainingFeatures, make_optimizer
from memkd_ray.engine.driver import fit, format_epoch
from memkd_ray.engine.memory_recall import RecallProbe, initialise_memory_values
from memkd_ray.engine.optimization import learning_rate, start_epoch
from memkd_ray.model import NEL_TEACHER_STAGE, NormalityRecallMemory, create_memkd
from tests.conftest import fast_config


class StageFeatures:
    """TrainingFeatures' interface over fixed tensors: stage k of image i is stages[k][i]."""

    def __init__(self, stages: list[torch.Tensor]) -> None:
        self.stages = stages

    def __len__(self) -> int:
        return len(self.stages[0])

    def __call__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [stage[indices] for stage in self.stages]


def _numpy_recall_error(features: np.ndarray, values: np.ndarray, temperature: float) -> float:
    """Eq. 8-10 written out: per position, softmax over cosine(feature, value) / T, the
    weighted sum of values, and the squared distance to the feature."""
    f = features.transpose(0, 2, 3, 1).reshape(-1, features.shape[1])
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (
        values / np.linalg.norm(values, axis=1, keepdims=True)).T
    w = np.exp(cos / temperature - (cos / temperature).max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return float(((f - w @ values) ** 2).sum(axis=1).mean())


def _model_with_stages():
    """A MemKD with one memory (20 items, at the bottleneck) and made-up four-stage features
    of 6 training and 3 held-out images, 2x3 positions each."""
    cfg = fast_config("memory.items=[20,0,0]", "memory.temperature=0.5")
    model = create_memkd(cfg)
    stage = NEL_TEACHER_STAGE["bottleneck"]
    c = model.memories["bottleneck"].values.shape[1]
    generator = torch.Generator().manual_seed(3)

    def stages(n: int) -> list[torch.Tensor]:
        out = [torch.zeros(n, 1, 1, 1) for _ in range(4)]
        out[stage] = 3.0 + 2.0 * torch.randn(n, c, 2, 3, generator=generator)
        return out

    return model, StageFeatures(stages(6)), StageFeatures(stages(3)), stage


def test_probe_measures_eq10_and_its_baselines_as_computed_by_hand():
    model, train, held_out, stage = _model_with_stages()
    probe = RecallProbe.build(model, train, held_out)
    measured = probe.measure(model)
    assert set(measured) == {"recall_error_bottleneck", "recall_zero_bottleneck",
                             "recall_mean_bottleneck"}
    unseen = held_out.stages[stage].double().numpy()
    mean = train.stages[stage].double().numpy().mean(axis=(0, 2, 3))
    assert measured["recall_zero_bottleneck"] == pytest.approx(
        (unseen ** 2).sum(axis=1).mean(), rel=1e-5)
    assert measured["recall_mean_bottleneck"] == pytest.approx(
        ((unseen - mean[None, :, None, None]) ** 2).sum(axis=1).mean(), rel=1e-5)
    values = model.memories["bottleneck"].values.detach().double().numpy()
    assert measured["recall_error_bottleneck"] == pytest.approx(
        _numpy_recall_error(unseen, values, 0.5), rel=1e-5)


def test_a_memory_holding_the_unseen_features_beats_the_mean_and_random_values_do_not():
    model, train, held_out, stage = _model_with_stages()
    memory = model.memories["bottleneck"]
    probe = RecallProbe.build(model, train, held_out)
    # Paper-style unit-normal values at temperature 0.5: a blur of random directions, no
    # better than the stage's mean feature.
    random = probe.measure(model)
    assert random["recall_error_bottleneck"] > random["recall_mean_bottleneck"]
    # Values that are the 18 held-out feature vectors themselves, addressed sharply.
    memory.temperature = 0.01
    memory.initialise_values(held_out.stages[stage], torch.Generator().manual_seed(0))
    remembered = probe.measure(model)
    assert remembered["recall_error_bottleneck"] < 0.7 * remembered["recall_mean_bottleneck"]


def test_features_initialisation_takes_feature_vectors_at_the_memorys_stage():
    model, train, _, stage = _model_with_stages()
    initialise_memory_values(model, train, seed=0)
    values = model.memories["bottleneck"].values.detach()
    vectors = train.stages[stage].permute(0, 2, 3, 1).reshape(-1, values.shape[1])
    for value in values:  # each value is one training position's feature vector
        assert torch.isclose(vectors, value).all(dim=1).any()
    assert len({tuple(v.tolist()) for v in values}) == len(values)
    # Seeded: the same values again; fewer positions than items repeat them.
    again, _, _, _ = _model_with_stages()
    initialise_memory_values(again, train, seed=0)
    assert torch.equal(again.memories["bottleneck"].values, values)
    few = NormalityRecallMemory(values.shape[1], 7)
    few.initialise_values(train.stages[stage][:1, :, :1, :2], torch.Generator())
    assert len({tuple(v.tolist()) for v in few.values.detach()}) == 2


def test_memories_learn_at_their_own_rate_under_the_schedule():
    cfg = fast_config("memory.lr_scale=10", "train.lr_schedule=cosine", "train.epochs=4")
    model = create_memkd(cfg)
    optimizer = make_optimizer(model, cfg)
    student, memory = optimizer.param_groups
    assert {id(p) for p in memory["params"]} == {id(p) for p in model.memories.parameters()}
    assert len(student["params"]) + len(memory["params"]) == len(
        [p for p in model.parameters() if p.requires_grad])
    start_epoch(optimizer, cfg, 2)
    assert student["lr"] == pytest.approx(learning_rate(cfg, 2))
    assert memory["lr"] == pytest.approx(10 * learning_rate(cfg, 2))
    # The paper's single group when the scale is 1.
    assert len(make_optimizer(model, fast_config()).param_groups) == 1


def test_training_logs_the_recall_every_epoch_and_the_features_start_helps(synth_root):
    data = read_category("synthetic", synth_root, "stripes")
    runs = {}
    for init in ("random", "features"):
        cfg = fast_config("train.epochs=2", f"memory.value_init={init}",
                          "memory.temperature=0.1")
        runs[init] = fit(cfg, data, torch.device("cpu")).state.history
    for history in runs.values():
        assert len(history) == 2
        for epoch in history:
            for site in ("bottleneck", "decoder1", "decoder2"):
                assert 0 < epoch[f"recall_error_{site}"] < float("inf")
                assert epoch[f"recall_mean_{site}"] < epoch[f"recall_zero_{site}"]
        assert "recall/mean" in format_epoch("stripes", history[-1])
    # Values started among the normal features, addressed at T = 0.1, recall unseen normals
    # better than their mean from the first epoch on; unit-normal values do not.
    for site in ("bottleneck", "decoder1", "decoder2"):
        started = runs["features"][-1]
        assert started[f"recall_error_{site}"] < 0.7 * started[f"recall_mean_{site}"], site
        unit = runs["random"][-1]
        assert unit[f"recall_error_{site}"] > unit[f"recall_mean_{site}"], site


def test_no_probe_without_memories_or_held_out_images(synth_root):
    data = read_category("synthetic", synth_root, "stripes")
    rd = fit(fast_config("train.epochs=1", "memory.enabled=false"), data, torch.device("cpu"))
    unheld = fit(fast_config("train.epochs=1", "decision.holdout_fraction=0"), data,
                 torch.device("cpu"))
    for training in (rd, unheld):
        assert not any(k.startswith("recall_") for k in training.state.history[-1])


def test_probe_reads_real_teacher_features(synth_root):
    cfg = fast_config()
    model = create_memkd(cfg)
    images = load_training_images(read_category("synthetic", synth_root, "stripes").train, 128)
    features = TrainingFeatures(model.teacher, images[:6], torch.device("cpu"), True)
    held_out = TrainingFeatures(model.teacher, images[6:9], torch.device("cpu"), True)
    measured = RecallProbe.build(model, features, held_out).measure(model)
    for site in ("bottleneck", "decoder1", "decoder2"):
        target = held_out.cached[NEL_TEACHER_STAGE[site]].double()
        assert measured[f"recall_zero_{site}"] == pytest.approx(
            float(target.pow(2).sum(dim=1).mean()), rel=1e-5)


def test_a_trained_run_carries_the_recall_to_its_table_log_and_report(trained_run):
    """`memkd-ray train` as users run it: the recall of the last epoch in results.parquet,
    equal to the checkpoint's history, on the console every epoch, and in the report."""
    import json
    import re

    import pyarrow.parquet as pq

    run_dir, result = trained_run
    rows = {r["category"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    meta = json.loads((run_dir / "synthetic" / "stripes" / "checkpoint_epoch_0006"
                       / "checkpoint.json").read_text())
    last = meta["training_state"]["history"][-1]
    for site in ("bottleneck", "decoder1", "decoder2"):
        for kind in ("error", "zero", "mean"):
            key = f"recall_{kind}_{site}"
            assert rows["stripes"][key] == pytest.approx(last[key], rel=1e-12)
    assert len(re.findall(r"stripes epoch \d+: .* recall/mean [\d.]+\|[\d.]+\|[\d.]+",
                          result.stderr)) == 6
    page = (run_dir / "report" / "index.html").read_text()
    ratio = re.search(r'data-category="stripes" data-metric="recall_ratio_bottleneck">'
                      r"([\d.]+)<", page)
    assert float(ratio.group(1)) == pytest.approx(
        last["recall_error_bottleneck"] / last["recall_mean_bottleneck"], abs=0.005)

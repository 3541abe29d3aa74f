import numpy as np
import pytest

from memkd_ray.metrics import METRIC_KEYS, au_pro, compute_metrics, pro_curve


def _blob_masks(rng: np.random.Generator, n: int, size: int, side: int = 10) -> np.ndarray:
    """Half normal images, half with one rectangle of side 3..side."""
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for mask in masks[n // 2 :]:
        y, x = rng.integers(2, size - side - 2, size=2)
        h, w = rng.integers(3, side, size=2)
        mask[y : y + h, x : x + w] = 1
    return masks


def test_perfect_maps_score_one_everywhere():
    rng = np.random.default_rng(0)
    masks = _blob_masks(rng, 10, 32)
    maps = masks + 0.01 * rng.random(masks.shape)
    labels = masks.reshape(10, -1).max(1)
    metrics = compute_metrics(maps, masks, labels)
    assert set(metrics) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(1.0), key


def test_random_maps_give_the_chance_level_of_each_metric():
    rng = np.random.default_rng(1)
    masks = _blob_masks(rng, 200, 48, side=18)
    maps = rng.random(masks.shape)
    # With scores independent of the truth PRO(t) ~ FPR(t): area 0.3^2 / 2, normalised 0.15.
    assert au_pro(maps, masks) == pytest.approx(0.15, abs=0.01)
    metrics = compute_metrics(maps, masks, masks.reshape(200, -1).max(1))
    assert metrics["pixel_auroc"] == pytest.approx(0.5, abs=0.01)
    assert metrics["pixel_ap"] == pytest.approx(masks.mean(), abs=0.01)


def test_au_pro_hand_computed_two_regions_with_ties():
    # Region A (2 px, top left) and region B (1 px at row 1, col 3); 9 normal pixels.
    mask = np.array([[1, 1, 0, 0],
                     [0, 0, 0, 1],
                     [0, 0, 0, 0]])
    scores = np.array([[0.9, 0.5, 0.3, 0.1],
                       [0.1, 0.1, 0.1, 0.1],
                       [0.1, 0.1, 0.1, 0.5]])
    # Thresholds (ties form one step):
    #   0.9: FPR 0,   PRO mean(1/2, 0)   = 0.25
    #   0.5: FPR 1/9, PRO mean(1,   0)   = 0.5    (A's second pixel ties a normal pixel)
    #   0.3: FPR 2/9, PRO 0.5
    #   0.1: FPR 1,   PRO 1                        (B ties seven normal pixels)
    fpr, pro = pro_curve(scores[None], mask[None])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 9, 2 / 9, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.5, 0.5, 1])
    # Area to FPR 0.3: 0.5 (0.25 + 0.5) / 9 + 0.5 / 9 + trapezoid from 2/9 to 0.3 with PRO
    # interpolated there: 0.5 + 0.5 (0.3 - 2/9) / (1 - 2/9) = 0.55.
    area = 0.375 / 9 + 0.5 / 9 + 0.5 * (0.5 + 0.55) * (0.3 - 2 / 9)
    assert au_pro(scores[None], mask[None]) == pytest.approx(area / 0.3, abs=1e-12)
    assert area / 0.3 == pytest.approx(0.4601852, abs=1e-7)


def test_regions_are_eight_connected_and_global_over_images():
    diagonal = np.array([[1, 0], [0, 1]])  # one region under 8-connectivity
    normal = np.zeros((2, 2))
    scores = np.array([[[0.9, 0.0], [0.0, 0.1]], [[0.5, 0.5], [0.5, 0.5]]])
    fpr, pro = pro_curve(scores, np.stack([diagonal, normal]))
    # 0.9: half of the single region; 0.5: the normal image's 4 + 0 px of 6 normal pixels.
    np.testing.assert_allclose(pro[:3], [0, 0.5, 0.5])
    np.testing.assert_allclose(fpr[:3], [0, 0, 4 / 6])


def test_single_class_splits_are_nan_not_errors():
    maps = np.random.default_rng(0).random((3, 8, 8))
    metrics = compute_metrics(maps, np.zeros((3, 8, 8)), np.zeros(3))
    assert all(np.isnan(v) for v in metrics.values())

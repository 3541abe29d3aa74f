"""Loss terms, NR Memory addressing and anomaly maps against hand or independent references."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from memkd_ray.model import NormalityRecallMemory, anomaly_map, gaussian_filter, image_scores
from memkd_ray.model.losses import (
    distillation_loss,
    normality_memorization_loss,
    pairwise_orthogonal_loss,
)
from memkd_ray.model.memory import cosine_attention


def test_cosine_attention_matches_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 2, 2, generator=gen)
    keys, values = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    out = cosine_attention(features, keys, values, temperature=0.5)
    f, k, v = features.numpy(), keys.numpy(), values.numpy()
    for b in range(2):
        for y in range(2):
            for x in range(2):
                q = f[b, :, y, x]
                cos = np.array([q @ kk / np.linalg.norm(q) / np.linalg.norm(kk) for kk in k])
                w = np.exp(cos / 0.5) / np.exp(cos / 0.5).sum()  # Eq. 5 with temperature
                np.testing.assert_allclose(out[b, :, y, x].numpy(), w @ v, rtol=1e-5, atol=1e-6)


def test_memory_recall_uses_keys_and_reconstruction_uses_values():
    memory = NormalityRecallMemory(channels=2, items=2)
    with torch.no_grad():
        memory.keys.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        memory.values.copy_(torch.tensor([[0.0, 5.0], [7.0, 0.0]]))
    memory.temperature = 1e-3  # nearly hard addressing makes the expected output obvious
    query = torch.tensor([1.0, 0.1]).view(1, 2, 1, 1)
    # Closest key is k0, so v0 is recalled (Eq. 5-6)...
    torch.testing.assert_close(memory(query).flatten(), torch.tensor([0.0, 5.0]))
    # ...while Eq. 8-9 address by the values: v1 = (7, 0) is the closest value.
    torch.testing.assert_close(memory.reconstruct(query).flatten(), torch.tensor([7.0, 0.0]))


def test_pairwise_orthogonal_loss_by_hand():
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    values = torch.tensor([[3.0, 0.0], [-1.0, 0.0]])
    # cos(k, v) = [[1, -1], [0, 0]]: signed mean 0 (Eq. 7), |cos| mean 0.5.
    assert pairwise_orthogonal_loss(keys, values, "signed").item() == pytest.approx(0.0)
    assert pairwise_orthogonal_loss(keys, values, "abs").item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pairwise_orthogonal_loss(keys, values, "cosine")


def test_normality_memorization_loss_by_hand():
    memory = NormalityRecallMemory(channels=2, items=1)
    with torch.no_grad():
        memory.values.copy_(torch.tensor([[1.0, 1.0]]))  # one item: every position recalls it
    exemplars = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(2, 2, 1, 1)
    # Squared distances to (1, 1): 0 + 1 = 1 and 4 + 1 = 5; mean over exemplars = 3 (Eq. 10).
    assert normality_memorization_loss(memory, exemplars).item() == pytest.approx(3.0)


def test_distillation_loss_by_hand():
    teacher = [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)]
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    # Opposite maps: 1 - cos = 2 per stage, summed over two stages (Eq. 1-2).
    assert distillation_loss([-t for t in teacher], teacher).item() == pytest.approx(4.0)


@pytest.mark.parametrize(("shape", "sigma"), [((3, 40, 40), 4.0), ((1, 9, 23), 4.0),
                                              ((2, 64, 64), 1.5)])
def test_gaussian_filter_equals_scipy(shape, sigma):
    maps = np.random.default_rng(1).random(shape).astype(np.float64)
    ours = gaussian_filter(torch.from_numpy(maps), sigma).numpy()
    for i in range(shape[0]):
        np.testing.assert_allclose(ours[i], ndimage.gaussian_filter(maps[i], sigma), atol=1e-12)


def test_anomaly_map_matches_numpy_scipy_reference():
    rng = np.random.default_rng(2)
    teacher = [rng.standard_normal((2, 5, 8, 8)), rng.standard_normal((2, 7, 4, 4))]
    student = [rng.standard_normal((2, 5, 8, 8)), rng.standard_normal((2, 7, 4, 4))]
    ours = anomaly_map([torch.from_numpy(s) for s in student],
                       [torch.from_numpy(t) for t in teacher], size=32, sigma=4.0).numpy()
    for b in range(2):
        total = np.zeros((32, 32))
        for s, t in zip(student, teacher, strict=True):
            cos = (s[b] * t[b]).sum(0) / np.linalg.norm(s[b], axis=0) / np.linalg.norm(t[b], axis=0)
            # scipy's order-1 zoom maps corner pixels onto corners: bilinear, align_corners.
            total += ndimage.zoom(1 - cos, 32 / cos.shape[0], order=1)
        np.testing.assert_allclose(ours[b], ndimage.gaussian_filter(total, 4.0), atol=1e-9)
    np.testing.assert_allclose(image_scores(torch.from_numpy(ours)).numpy(),
                               ours.reshape(2, -1).max(1))


def test_image_score_is_the_mean_of_the_top_k_map_values():
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image_scores(maps), maps.flatten(1).max(dim=1).values)
    by_hand = np.sort(maps.flatten(1).numpy(), axis=1)[:, -10:].mean(axis=1)
    np.testing.assert_allclose(image_scores(maps, top_k=10).numpy(), by_hand, rtol=1e-6)
    assert torch.allclose(image_scores(maps, top_k=10_000), maps.mean(dim=(1, 2)))  # capped

"""Synthetic generator, MVTec-layout reader and its errors."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memkd_ray.cli import main
from memkd_ray.data import read_category, resolve_categories
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.errors import DataError
from tests.conftest import CONFIGS


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_synthetic_benchmark_is_deterministic_and_seeded(tmp_path: Path):
    a = generate_benchmark(tmp_path / "a", categories=1, seed=3, size=64, train=4, test_good=2,
                           defective_per_type=2)
    generate_benchmark(tmp_path / "b", categories=1, seed=3, size=64, train=4, test_good=2,
                       defective_per_type=2)
    generate_benchmark(tmp_path / "c", categories=1, seed=4, size=64, train=4, test_good=2,
                       defective_per_type=2)
    assert a == ["stripes"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_reader_counts_labels_and_masks(synth_root: Path):
    data = read_category("synthetic", synth_root, "mesh")
    assert data.counts() == {"train": 60, "test_good": 20, "test_hole": 10, "test_missing": 10,
                             "test_scratch": 10}
    assert resolve_categories("synthetic", synth_root, ["all"], []) == ["mesh", "stripes"]
    defective = [s for s in data.test if s.label == 1]
    assert all(s.mask_path.name == f"{s.image_path.stem}_mask.png" for s in defective)
    assert all(s.mask_path.parent.name == s.defect for s in defective)
    for sample in defective[:5]:
        mask = sample.load_mask(128)
        assert set(np.unique(mask)) == {0, 1}
        assert 20 < mask.sum() < 128 * 128 // 4
    normal = next(s for s in data.test if s.label == 0)
    assert normal.load_mask(128).sum() == 0


def test_grayscale_images_load_as_rgb(synth_root: Path):
    sample = read_category("synthetic", synth_root, "mesh").train[0]
    assert Image.open(sample.image_path).mode == "L"
    image = sample.load_image(64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])


@pytest.fixture
def broken_root(synth_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bench"
    shutil.copytree(synth_root / "stripes", root / "stripes")
    return root


def test_missing_category_names_the_path_and_known_categories(broken_root: Path):
    with pytest.raises(DataError, match=r"bench/bottle: category 'bottle' not found.*stripes"):
        read_category("mvtec", broken_root, "bottle")


def test_empty_train_split(broken_root: Path):
    for path in (broken_root / "stripes" / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"train/good: no training images"):
        read_category("mvtec", broken_root, "stripes")


def test_unreadable_image(broken_root: Path):
    bad = broken_root / "stripes" / "test" / "good" / "003.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"test/good/003.png: unreadable image"):
        read_category("mvtec", broken_root, "stripes")


def test_mask_size_mismatch_and_missing_mask(broken_root: Path):
    mask = broken_root / "stripes" / "ground_truth" / "hole" / "004_mask.png"
    Image.new("L", (64, 64)).save(mask)
    with pytest.raises(DataError, match=r"hole/004_mask.png: mask is 64x64 but its image"):
        read_category("mvtec", broken_root, "stripes")
    mask.unlink()
    with pytest.raises(DataError, match=r"004_mask.png: ground-truth mask of .* not found"):
        read_category("mvtec", broken_root, "stripes")


def test_cli_bad_data_exits_2_with_one_line(broken_root: Path, tmp_path: Path, capsys):
    (broken_root / "stripes" / "test" / "good" / "001.png").write_bytes(b"")
    store = tmp_path / "store"
    code = main(["-q", "train", "--config", str(CONFIGS / "demo.yaml"),
                 "--data-root", str(broken_root), "--category", "stripes", "--storage", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "001.png: unreadable image" in err[0]
    assert not store.exists()  # nothing written half-way


def test_cli_synth_refuses_non_empty_out(tmp_path: Path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["-q", "data", "synth", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_data_check_prints_counts_and_fails_with_2(synth_root: Path, broken_root: Path,
                                                       capsys):
    assert main(["data", "check", "--config", str(CONFIGS / "demo.yaml"),
                 "--data-root", str(synth_root)]) == 0
    out = capsys.readouterr().out
    assert "mesh" in out and "hole=10 missing=10 scratch=10" in out
    assert "total       120         40              60" in out
    (broken_root / "stripes" / "ground_truth" / "hole" / "001_mask.png").unlink()
    assert main(["data", "check", "--config", str(CONFIGS / "demo.yaml"),
                 "--data-root", str(broken_root)]) == 2
    assert "hole/001_mask.png: ground-truth mask" in capsys.readouterr().err

"""Synthetic generator, MVTec-layout reader and its errors."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memkd_ray.cli import main
from memkd_ray.data import read_category, resolve_categories
from memkd_ray.data.sample import Sample
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.errors import DataError, UserInputError
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


def _photo_tree_digest(root: Path) -> str:
    return _digest(root) + hashlib.sha256((root / "sources.json").read_bytes()).hexdigest()


def test_photo_benchmark_is_deterministic_reads_back_and_keeps_train_and_test_apart(
        tmp_path: Path):
    from memkd_ray.data.photos import DEVELOPMENT_SOURCES, generate_photo_benchmark

    small = {"size": 64, "train": 3, "test_good": 2, "defective_per_type": 1}
    sources = (DEVELOPMENT_SOURCES[0], DEVELOPMENT_SOURCES[-1])  # a texture and the scene
    names = generate_photo_benchmark(tmp_path / "a", sources, seed=1, **small)
    generate_photo_benchmark(tmp_path / "b", sources, seed=1, **small)
    generate_photo_benchmark(tmp_path / "c", sources, seed=2, **small)
    assert names == ["moon", "motorcycle"]
    assert _photo_tree_digest(tmp_path / "a") == _photo_tree_digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert not list(tmp_path.glob(".*partial*"))  # the staging directories were renamed
    data = read_category("photos", tmp_path / "a", "moon")
    assert data.counts() == {"train": 3, "test_good": 2, "test_hole": 1, "test_patch": 1,
                             "test_scratch": 1, "test_stain": 1}
    assert Image.open(data.train[0].image_path).mode == "L"  # moon is a grayscale photo
    for sample in data.test:
        assert (sample.load_mask().sum() > 0) == (sample.label == 1)


def test_photo_texture_train_and_test_regions_are_disjoint():
    from memkd_ray.data.photos import DEVELOPMENT_SOURCES, read_photo, texture_split

    for source in DEVELOPMENT_SOURCES:
        if source.kind != "texture":
            continue
        photo = read_photo(source.path)
        (l1, t1, r1, b1), (l2, t2, r2, b2) = texture_split(source, photo)
        overlap = max(0, min(r1, r2) - max(l1, l2)) * max(0, min(b1, b2) - max(t1, t2))
        assert overlap == 0, source.name
        side = round(source.crop * min(photo.size))
        for box in ((l1, t1, r1, b1), (l2, t2, r2, b2)):
            assert min(box[2] - box[0], box[3] - box[1]) >= side, source.name


@pytest.mark.parametrize("defect", ["scratch", "stain", "patch", "hole"])
def test_photo_defect_masks_cover_exactly_what_changed(defect: str):
    from scipy import ndimage

    from memkd_ray.data.photo_defects import paint_defect
    from memkd_ray.data.photos import DEVELOPMENT_SOURCES, read_photo

    photo = read_photo(DEVELOPMENT_SOURCES[3].path)  # fundus: colour, textured
    donor = read_photo("package:skimage.data/astronaut.png")
    rng = np.random.default_rng(0)
    for _ in range(5):
        normal = photo.crop((500, 500, 756, 756))
        damaged, mask = paint_defect(rng, normal, defect, donor)
        change = np.abs(np.asarray(damaged, float) - np.asarray(normal, float)).max(axis=2)
        assert mask.dtype == np.uint8 and 8 <= mask.sum() < 0.1 * mask.size
        # Inside the mask the defect shows; outside a 4-pixel ring of anti-aliasing and soft
        # edges (a stain's blur), nothing changed beyond rounding.
        assert np.median(change[mask == 1]) > 10
        assert change[~ndimage.binary_dilation(mask, iterations=4)].max() <= 2


def test_photo_generator_refuses_held_back_photos_and_bad_output(tmp_path: Path, capsys):
    from memkd_ray.data.photos import PhotoSource, generate_photo_benchmark

    with pytest.raises(UserInputError, match="held back"):
        generate_photo_benchmark(tmp_path / "x",
                                 (PhotoSource("b", "package:skimage.data/brick.png"),))
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("")
    assert main(["data", "photos", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert main(["data", "photos", "--out", str(tmp_path / "y"), "--source",
                 f"mine={tmp_path / 'missing.png'}"]) == 2
    assert "photo not found" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path: Path):
    values = np.array([[0, 257 * 100], [40000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = Sample(path, 0, "good").load_image()
    assert rgb.shape == (2, 2, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    # PIL's own convert("RGB") would make every value above 255 white.
    assert rgb[..., 0].tolist() == [[0, 100], [round(40000 / 257), 255]]


def test_confirmation_photos_are_new_kinds_from_no_development_or_reserved_photo(tmp_path):
    from memkd_ray.data.photos import (
        CONFIRMATION_SOURCES,
        DEVELOPMENT_SOURCES,
        DONOR_SOURCES,
        RESERVED,
        generate_photo_benchmark,
    )

    used = {s.path for s in DEVELOPMENT_SOURCES} | set(DONOR_SOURCES)
    for source in CONFIRMATION_SOURCES:
        assert source.path not in used
        assert not any(name in source.path for name in RESERVED)
    small = {"size": 64, "train": 3, "test_good": 2, "defective_per_type": 1}
    names = generate_photo_benchmark(tmp_path / "c", CONFIRMATION_SOURCES, seed=0, **small)
    assert names == ["cells", "cameraman"]
    for name in names:
        data = read_category("photos", tmp_path / "c", name)
        assert data.counts()["train"] == 3 and sum(s.label for s in data.test) == 4

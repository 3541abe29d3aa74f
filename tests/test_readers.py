"""Benchmark readers on miniature fake trees: VisA, MVTec 3D-AD, Eyecandies, folder, data check."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memkd_ray.config import load_config
from memkd_ray.data import check_benchmark, read_category, reader_options, resolve_categories
from memkd_ray.data.sample import Sample
from memkd_ray.errors import ConfigError, DataError
from memkd_ray.metrics import compute_metrics
from tests.conftest import CONFIGS

W, H = 20, 16  # non-square on purpose: readers must not assume square images


def _image(path: Path, mode: str = "RGB", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, (W, H), colour).save(path)
    return path


def _mask(path: Path, value: int = 255, box: tuple[int, int, int, int] = (2, 3, 6, 8)) -> Path:
    """An L mask holding `value` inside box (x0, y0, x1, y1), zero elsewhere."""
    pixels = np.zeros((H, W), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)
    return path


def _palette_mask(path: Path, class_id: int, box: tuple[int, int, int, int]) -> Path:
    """A palette PNG whose palette maps every index to black: only the indices mark defects."""
    pixels = np.zeros((H, W), dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = class_id
    mask = Image.fromarray(pixels, "P")
    mask.putpalette([0, 0, 0] * 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    mask.save(path)
    return path


def _box_mask(box: tuple[int, int, int, int]) -> np.ndarray:
    expected = np.zeros((H, W), dtype=np.uint8)
    x0, y0, x1, y1 = box
    expected[y0:y1, x0:x1] = 1
    return expected


# ---------------------------------------------------------------------------------------- VisA

VISA_BOX = (4, 2, 9, 7)


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "VisA"
    rows = ["object,split,label,image,mask"]
    for category in ("candle", "pcb1"):
        images = root / category / "Data" / "Images"
        for i in range(5):
            name = f"{category}/Data/Images/Normal/{i:04d}.JPG"
            _image(root / name, mode="L" if i == 0 else "RGB", value=40 + i)
            rows.append(f"{category},{'train' if i < 3 else 'test'},normal,{name},")
        for i in range(2):
            _image(images / "Anomaly" / f"{i:03d}.JPG", value=200)
            _mask(root / category / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", 3, VISA_BOX)
            rows.append(f"{category},test,anomaly,{category}/Data/Images/Anomaly/{i:03d}.JPG,"
                        f"{category}/Data/Masks/Anomaly/{i:03d}.png")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_reads_the_split_csv_in_place(visa_root: Path):
    data = read_category("visa", visa_root, "candle")
    assert data.counts() == {"train": 3, "test_good": 2, "test_anomaly": 2}
    assert resolve_categories("visa", visa_root, ["all"], []) == ["candle", "pcb1"]
    assert all(s.label == 0 and s.mask_path is None for s in data.train)
    anomalous = [s for s in data.test if s.label == 1]
    assert all(s.defect == "anomaly" and s.mask_path.stem == s.image_path.stem for s in anomalous)
    assert all("Masks/Anomaly" in s.mask_path.as_posix() for s in anomalous)
    # Class id 3 binarises to 1 exactly on the annotated pixels.
    assert np.array_equal(anomalous[0].load_mask(), _box_mask(VISA_BOX))
    assert set(np.unique(anomalous[0].load_mask(8))) == {0, 1}
    assert all(s.load_mask().sum() == 0 for s in data.test if s.label == 0)
    grey = data.train[0]
    assert Image.open(grey.image_path).mode == "L" and grey.load_image(8).shape == (8, 8, 3)


def _csv_line(root: Path, needle: str) -> int:
    lines = (root / "split_csv" / "1cls.csv").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if needle in line)


def test_visa_row_pointing_at_a_missing_image_names_the_file_and_line(visa_root: Path):
    (visa_root / "candle/Data/Images/Normal/0001.JPG").unlink()
    line = _csv_line(visa_root, "Normal/0001.JPG")
    with pytest.raises(DataError, match=rf"Normal/0001.JPG: image listed in .*1cls.csv line {line} "
                                        r"not found"):
        read_category("visa", visa_root, "candle")


def test_visa_missing_mask_names_the_file_and_line(visa_root: Path):
    (visa_root / "candle/Data/Masks/Anomaly/001.png").unlink()
    line = _csv_line(visa_root, "Masks/Anomaly/001.png")
    with pytest.raises(DataError, match=rf"Anomaly/001.png: mask listed in .* line {line} "
                                        r"not found"):
        read_category("visa", visa_root, "candle")


def test_visa_missing_csv_and_unknown_category(visa_root: Path):
    with pytest.raises(DataError, match=r"VisA/split_csv/1cls.csv: category 'bottle' not listed "
                                        r"\(found: candle, pcb1\)"):
        read_category("visa", visa_root, "bottle")
    (visa_root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"1cls.csv: VisA split file not found"):
        read_category("visa", visa_root, "candle")


def test_visa_anomalous_row_without_mask(visa_root: Path):
    csv = visa_root / "split_csv" / "1cls.csv"
    csv.write_text(csv.read_text().replace(",candle/Data/Masks/Anomaly/000.png", ","))
    with pytest.raises(DataError, match=r"1cls.csv line \d+: mask field is empty"):
        read_category("visa", visa_root, "candle")


# --------------------------------------------------------------------------------- MVTec 3D-AD

@pytest.fixture
def mvtec3d_root(tmp_path: Path) -> Path:
    root = tmp_path / "mvtec3d"
    base = root / "bagel"
    for i in range(4):
        _image(base / "train" / "good" / "rgb" / f"{i:03d}.png", value=10 * i)
        (base / "train" / "good" / "xyz").mkdir(parents=True, exist_ok=True)
        (base / "train" / "good" / "xyz" / f"{i:03d}.tiff").write_bytes(b"not read")
    _image(base / "validation" / "good" / "rgb" / "000.png")
    for i in range(2):
        _image(base / "test" / "good" / "rgb" / f"{i:03d}.png", mode="L")
        _mask(base / "test" / "good" / "gt" / f"{i:03d}.png", 0)
    for defect, count in (("crack", 2), ("hole", 1)):
        for i in range(count):
            _image(base / "test" / defect / "rgb" / f"{i:03d}.png", value=99)
            _mask(base / "test" / defect / "gt" / f"{i:03d}.png", 255, (i, i, i + 5, i + 5))
    return root


def test_mvtec3d_reads_rgb_and_pairs_gt(mvtec3d_root: Path):
    data = read_category("mvtec3d", mvtec3d_root, "bagel")
    assert data.counts() == {"train": 4, "test_good": 2, "test_crack": 2, "test_hole": 1}
    assert all(s.image_path.parent.name == "rgb" for s in [*data.train, *data.test])
    assert all(s.mask_path is None for s in data.test if s.label == 0)
    crack = [s for s in data.test if s.defect == "crack"]
    assert [s.mask_path.relative_to(mvtec3d_root).as_posix() for s in crack] == [
        "bagel/test/crack/gt/000.png", "bagel/test/crack/gt/001.png"]
    assert np.array_equal(crack[1].load_mask(), _box_mask((1, 1, 6, 6)))
    assert resolve_categories("mvtec3d", mvtec3d_root, ["all"], []) == ["bagel"]


def test_mvtec3d_errors(mvtec3d_root: Path):
    (mvtec3d_root / "bagel/test/hole/gt/000.png").unlink()
    with pytest.raises(DataError, match=r"hole/gt/000.png: ground-truth mask of .*000.png not "
                                        r"found"):
        read_category("mvtec3d", mvtec3d_root, "bagel")
    shutil.rmtree(mvtec3d_root / "bagel/test")
    with pytest.raises(DataError, match=r"bagel/test: test directory not found"):
        read_category("mvtec3d", mvtec3d_root, "bagel")
    shutil.rmtree(mvtec3d_root / "bagel/train/good/rgb")
    with pytest.raises(DataError, match=r"train/good/rgb: training directory not found"):
        read_category("mvtec3d", mvtec3d_root, "bagel")
    with pytest.raises(DataError, match=r"mvtec3d/tire: category 'tire' not found"):
        read_category("mvtec3d", mvtec3d_root, "tire")


# ---------------------------------------------------------------------------------- Eyecandies

EYE_BOX = (5, 5, 12, 10)


def _eyecandies_sample(data: Path, index: int, anomalous: int | None) -> None:
    for light in range(6):
        _image(data / f"{index:03d}_image_{light}.png", mode="L" if light == 5 else "RGB",
               value=20 * light + index)
    if anomalous is not None:
        (data / f"{index:03d}_metadata.yaml").write_text(f"anomalous: {anomalous}\n")
    _palette_mask(data / f"{index:03d}_mask.png", 7 * (anomalous or 0), EYE_BOX)


@pytest.fixture
def eyecandies_root(tmp_path: Path) -> Path:
    root = tmp_path / "eyecandies"
    base = root / "CandyCane"
    for i in range(3):
        _eyecandies_sample(base / "train" / "data", i, None)
    _eyecandies_sample(base / "val" / "data", 0, 0)
    for i, anomalous in enumerate((0, 1, 0, 1, 1)):
        _eyecandies_sample(base / "test_public" / "data", i, anomalous)
    return root


def test_eyecandies_labels_from_metadata_and_light_choice(eyecandies_root: Path):
    data = read_category("eyecandies", eyecandies_root, "CandyCane")
    assert data.counts() == {"train": 3, "test_good": 2, "test_anomaly": 3}
    assert [s.label for s in data.test] == [0, 1, 0, 1, 1]
    assert all(s.image_path.name.endswith("_image_0.png") for s in [*data.train, *data.test])
    anomalous = [s for s in data.test if s.label == 1]
    assert all(s.mask_path.name == s.image_path.name.replace("image_0", "mask")
               for s in anomalous)
    # Palette mask whose colours are all black: the class index marks the defect.
    assert np.array_equal(anomalous[0].load_mask(), _box_mask(EYE_BOX))

    light5 = read_category("eyecandies", eyecandies_root, "CandyCane", light=5)
    assert all(s.image_path.name.endswith("_image_5.png") for s in light5.test)
    assert light5.test[0].load_image(8).shape == (8, 8, 3)  # grayscale render becomes RGB


def test_reader_options_come_from_the_config():
    cfg = load_config(CONFIGS / "eyecandies.yaml", ["data.eyecandies_light=5"])
    assert reader_options(cfg.data) == {"light": 5}
    folder = load_config(CONFIGS / "folder.yaml", ["data.folder_test_fraction=0.5"])
    assert reader_options(folder.data) == {"test_fraction": 0.5}
    assert reader_options(load_config(CONFIGS / "mvtec.yaml").data) == {}


def test_eyecandies_errors(eyecandies_root: Path):
    data = eyecandies_root / "CandyCane" / "test_public" / "data"
    (data / "003_mask.png").unlink()
    with pytest.raises(DataError, match=r"003_mask.png: ground-truth mask of .*003_image_0.png"):
        read_category("eyecandies", eyecandies_root, "CandyCane")
    (data / "002_metadata.yaml").write_text("anomalous: maybe\n")
    with pytest.raises(DataError, match=r"002_metadata.yaml: no `anomalous: 0\|1` field"):
        read_category("eyecandies", eyecandies_root, "CandyCane")
    (data / "000_metadata.yaml").unlink()
    with pytest.raises(DataError, match=r"000_metadata.yaml: metadata file not found"):
        read_category("eyecandies", eyecandies_root, "CandyCane")
    shutil.rmtree(data)
    with pytest.raises(DataError, match=r"test_public/data: test_public split directory not "
                                        r"found"):
        read_category("eyecandies", eyecandies_root, "CandyCane")
    with pytest.raises(DataError, match=r"eyecandies/Lollipop: category 'Lollipop' not found "
                                        r"\(found: CandyCane\)"):
        read_category("eyecandies", eyecandies_root, "Lollipop")


# -------------------------------------------------------------------------------------- folder

@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    root = tmp_path / "mine"
    for i in range(10):
        _image(root / "widget" / "good" / f"g{i}.png", mode="L" if i == 0 else "RGB", value=i)
    for name in ("b0", "b1", "b2"):
        _image(root / "widget" / "bad" / f"{name}.jpg", value=250)
    _mask(root / "widget" / "masks" / "b0_mask.png", 255, (0, 0, 4, 4))
    _mask(root / "widget" / "masks" / "b1.png", 1, (3, 3, 8, 8))
    return root


def test_folder_seeded_split_and_optional_masks(folder_root: Path):
    data = read_category("folder", folder_root, "widget")
    assert data.counts() == {"train": 8, "test_good": 2, "test_bad": 3}
    again = read_category("folder", folder_root, "widget")
    assert [s.image_path for s in again.test] == [s.image_path for s in data.test]
    held_out = {s.image_path for s in data.test if s.label == 0}
    assert held_out.isdisjoint(s.image_path for s in data.train)
    masks = {s.image_path.stem: s.mask_path for s in data.test if s.label == 1}
    assert masks["b0"].name == "b0_mask.png" and masks["b1"].name == "b1.png"
    assert masks["b2"] is None
    half = read_category("folder", folder_root, "widget", test_fraction=0.5)
    assert half.counts()["train"] == 5 and half.counts()["test_good"] == 5


def test_anomalous_image_without_mask_counts_as_normal_pixels(folder_root: Path):
    """No crash: image metrics use every image, pixel metrics see the unmasked one as normal."""
    test = read_category("folder", folder_root, "widget").test
    masks = np.stack([s.load_mask(8) for s in test])
    labels = np.array([s.label for s in test])
    maps = masks.astype(float)  # perfect on the masked defects ...
    unmasked_defect = [s.label == 1 and s.mask_path is None for s in test]
    maps[unmasked_defect] = 1.0  # ... and as high on the whole image without a mask
    metrics = compute_metrics(maps, masks, labels)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] < 1.0  # the unmasked defect's pixels count as false positives
    unmasked = [Sample(s.image_path, s.label, s.defect) for s in test]
    no_masks = compute_metrics(maps, np.stack([s.load_mask(8) for s in unmasked]), labels)
    assert np.isnan(no_masks["pixel_auroc"]) and np.isnan(no_masks["pixel_aupro"])


def test_folder_errors(folder_root: Path):
    with pytest.raises(DataError, match=r"widget/good: 10 normal images leave none for training"):
        read_category("folder", folder_root, "widget", test_fraction=0.95)
    shutil.rmtree(folder_root / "widget" / "bad")
    with pytest.raises(DataError, match=r"widget/bad: anomalous directory not found"):
        read_category("folder", folder_root, "widget")
    with pytest.raises(DataError, match=r"mine/gadget: category 'gadget' not found"):
        read_category("folder", folder_root, "gadget")


# ---------------------------------------------------------------------------------- data check

def test_check_benchmark_tabulates_every_category(visa_root: Path):
    table = check_benchmark("visa", visa_root, None).splitlines()
    assert table[0] == f"visa at {visa_root}: 2 categories"
    assert re.split(r"\s{2,}", table[1]) == ["category", "train", "test good", "test defective",
                                             "defect types"]
    assert table[2].split() == ["candle", "3", "2", "2", "anomaly=2"]
    assert table[3].split() == ["pcb1", "3", "2", "2", "anomaly=2"]
    assert table[4].split() == ["total", "6", "4", "4"]
    assert len(table) == 5


def test_check_benchmark_options_configured_list_and_unmasked_note(folder_root: Path,
                                                                    mvtec3d_root: Path):
    table = check_benchmark("folder", folder_root, ["widget"], test_fraction=0.5)
    assert table.splitlines()[2].split() == ["widget", "5", "5", "3", "bad=3"]
    assert table.splitlines()[-1] == ("note: 1 defective test images have no mask; pixel metrics "
                                      "count their pixels as normal")
    assert "crack=2 hole=1" in check_benchmark("mvtec3d", mvtec3d_root, ["bagel"])


def test_check_benchmark_raises_on_the_first_problem(eyecandies_root: Path):
    (eyecandies_root / "CandyCane" / "test_public" / "data" / "001_image_0.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"001_image_0.png: unreadable image"):
        check_benchmark("eyecandies", eyecandies_root, None)
    with pytest.raises(DataError, match=r"nowhere: data root not found"):
        check_benchmark("eyecandies", eyecandies_root / "nowhere", None)


# ------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize(
    ("name", "benchmark", "categories"),
    [
        ("mvtec", "mvtec", 15),
        ("visa", "visa", 12),
        ("mpdd", "mpdd", 6),
        ("mvtec3d", "mvtec3d", 10),
        ("eyecandies", "eyecandies", 10),
        ("folder", "folder", 0),
    ],
)
def test_benchmark_configs_load_with_their_categories(name, benchmark, categories):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.benchmark == benchmark
    assert len(cfg.data.categories) == len(set(cfg.data.categories)) == categories
    assert cfg.data.image_size == 256  # the paper uses 256 px for every benchmark


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.eyecandies_light=6", "data.eyecandies_light"),
     ("data.folder_test_fraction=1.0", "data.folder_test_fraction"),
     ("data.folder_test_fraction=0", "data.folder_test_fraction")],
)
def test_reader_option_ranges_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])

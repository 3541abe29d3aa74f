"""Fuzzing the bad-input contract: random and mutated configs, checkpoint.json files and image
headers fed to the commands. Whatever they get, they end with exit 0, or exit 2 and one line
on stderr: never a traceback. Bounded by a fixed number of examples per test."""

from __future__ import annotations

import copy
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memkd_ray.checkpoint import save_checkpoint
from memkd_ray.cli import main
from memkd_ray.config import MemKDConfig
from memkd_ray.data.synthetic import generate_benchmark
from memkd_ray.model import create_memkd
from tests.conftest import CONFIGS, fast_config

EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
# Every dotted key of the config, and values of every kind YAML can give.
KEYS = [f"{section}.{key}" for section, fields in MemKDConfig().to_dict().items()
        for key in fields]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(-3, 300), max_size=5), st.dictionaries(st.text(max_size=4),
                                                                st.integers(), max_size=2))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    generate_benchmark(root, categories=1, size=64, train=6, test_good=2, defective_per_type=1)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = fast_config("data.image_size=64")
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt", create_memkd(cfg), cfg, 1)


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(["-q", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (0, 2), (code, argv, err[-3:])
    if code == 2:
        assert len(err) == 1 and err[0].startswith("memkd-ray: error: "), (argv, err)
    return code, err


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_mutated_configs_are_accepted_or_refused_in_one_line(changes, tiny_root, tmp_path,
                                                              capsys):
    raw = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    for key, value in changes.items():
        section, name = key.split(".")
        if not isinstance(raw.get(section), dict):
            raw[section] = {}
        raw[section][name] = value
    config = tmp_path / "fuzz.yaml"
    config.write_text(yaml.safe_dump(raw))
    _run(["data", "check", "--config", str(config), "--data-root", str(tiny_root)], capsys)


@FUZZ
@given(text=st.text(max_size=200))
def test_arbitrary_yaml_text_is_accepted_or_refused_in_one_line(text, tiny_root, tmp_path,
                                                                capsys):
    config = tmp_path / "fuzz.yaml"
    config.write_text(text, encoding="utf-8")
    _run(["data", "check", "--config", str(config), "--data-root", str(tiny_root)], capsys)


def _mutate(meta: dict, path: list[str], value: object) -> dict:
    """`meta` with the field at `path` replaced by `value`, or deleted (value ...)."""
    mutated = copy.deepcopy(meta)
    node = mutated
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, dict):
        if value is Ellipsis:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return mutated


FIELDS = [["format_version"], ["config"], ["epoch"], ["metrics"], ["teacher"],
          ["teacher", "weights"], ["teacher", "weights_sha256"], ["teacher", "mean"],
          ["sha256"], ["package_version"], ["category"], ["config", "data"],
          ["config", "data", "image_size"], ["config", "memory", "items"],
          ["config", "teacher", "name"], ["config", "eval", "score_top_k"],
          ["config", "student", "decoder_blocks"]]


@FUZZ
@given(path=st.sampled_from(FIELDS), value=st.one_of(st.just(Ellipsis), VALUES))
def test_mutated_checkpoint_json_is_refused_in_one_line(path, value, checkpoint, tiny_root,
                                                        tmp_path, capsys):
    copy_dir = tmp_path / "ckpt"
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(checkpoint, copy_dir)
    meta = json.loads((copy_dir / "checkpoint.json").read_text())
    (copy_dir / "checkpoint.json").write_text(json.dumps(_mutate(meta, path, value)))
    image = tiny_root / "stripes" / "test" / "good" / "000.png"
    out = tmp_path / "pred"
    shutil.rmtree(out, ignore_errors=True)
    code, _ = _run(["predict", "--checkpoint", str(copy_dir), str(image), "--out", str(out)],
                   capsys)
    assert code == 0 or not out.exists()


def _png(width: int, height: int, depth: int, colour: int, body: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    chunk = b"IHDR" + header
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + body)


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1),
       depth=st.sampled_from([1, 2, 4, 8, 16, 3, 0]), colour=st.sampled_from([0, 2, 3, 4, 6, 7]),
       body=st.binary(max_size=64),
       magic=st.sampled_from(["png", "jpeg", "tiff", "bmp", "none"]))
def test_mutated_image_headers_are_refused_in_one_line(width, height, depth, colour, body,
                                                       magic, checkpoint, tmp_path, capsys):
    data = {"png": _png(width, height, depth, colour, body),
            "jpeg": b"\xff\xd8\xff\xe0" + body, "tiff": b"II*\x00" + body,
            "bmp": b"BM" + struct.pack("<IHHIIii", 54, 0, 0, 54, 40, width % 2**31,
                                       height % 2**31) + body,
            "none": body}[magic]
    image = tmp_path / "fuzz.png"
    image.write_bytes(data)
    out = tmp_path / "pred"
    shutil.rmtree(out, ignore_errors=True)
    _run(["predict", "--checkpoint", str(checkpoint), str(image), "--out", str(out)], capsys)

"""Image index (name resolution, escapes) and the RGB loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqadapt.data.images import ImageIndex, load_image
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQADataError


def _png(path: Path, mode: str = "RGB", colour: object = (10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 6), colour).save(path)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    _png(images / "train2014" / "COCO_train2014_000000068857.jpg")
    _png(images / "val" / "COCO_val2014_000000000042.jpg")
    _png(images / "00000002007.png")
    _png(images / "17.png")
    _png(images / "sub" / "x.png")
    secret = _png(tmp_path / "outside" / "secret.png")
    (images / "link.png").symlink_to(secret)
    (images / "inside_link.png").symlink_to(images / "17.png")
    return images


def test_coco_and_plain_ids(root: Path) -> None:
    index = ImageIndex(root)
    assert index.resolve("68857") == root / "train2014" / "COCO_train2014_000000068857.jpg"
    assert index.resolve("42") == root / "val" / "COCO_val2014_000000000042.jpg"
    assert index.resolve("17") == root / "17.png"
    assert index.resolve("5") is None
    with pytest.raises(VQADataError, match=r"COCO_train2014_000000000005\.jpg") as info:
        index.resolve_strict("5", row=3)
    assert info.value.row == 3 and info.value.field == "image"


def test_relative_names(root: Path) -> None:
    index = ImageIndex(root)
    assert index.resolve("sub/x.png") == root / "sub" / "x.png"
    assert index.resolve("00000002007.png") == root / "00000002007.png"
    assert index.resolve("inside_link.png") == root / "inside_link.png"
    assert index.resolve("sub/missing.png") is None


@pytest.mark.parametrize(
    "ref", ["../../etc/passwd", "../outside/secret.png", "/etc/passwd", "link.png"]
)
def test_escapes_are_refused(root: Path, ref: str) -> None:
    index = ImageIndex(root)
    assert index.resolve(ref) is None
    with pytest.raises(VQADataError, match=r"outside|escapes") as info:
        index.resolve_strict(ref)
    assert repr(ref) in str(info.value)


def test_scans_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = ImageIndex(root)
    calls = []
    monkeypatch.setattr("os.scandir", lambda *a: calls.append(a))
    assert index.resolve("17") is not None and index.resolve("sub/x.png") is not None
    assert calls == []


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(VQADataError, match="not found") as info:
        ImageIndex(tmp_path / "nope")
    assert info.value.file == str(tmp_path / "nope")


def test_coverage(root: Path) -> None:
    records = [
        VQARecord("1", "q", ("a",), "17"),
        VQARecord("2", "q", ("a",), "17"),
        VQARecord("3", "q", ("a",), "999"),
        VQARecord("4", "q", ("a",), None),
    ]
    assert ImageIndex(root).coverage(records) == (1, ["999"])


# ---------------------------------------------------------------------------- loader


@pytest.mark.parametrize(
    ("mode", "colour"),
    [("L", 128), ("RGBA", (255, 0, 0, 255)), ("CMYK", (0, 255, 255, 0)), ("P", 3), ("1", 1)],
)
def test_modes_become_rgb(tmp_path: Path, mode: str, colour: object) -> None:
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (8, 6), colour).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (8, 6)


def test_transparent_becomes_white(tmp_path: Path) -> None:
    path = _png(tmp_path / "t.png", "RGBA", (0, 0, 0, 0))
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (156, 156, 156)


def test_resize(tmp_path: Path) -> None:
    assert load_image(_png(tmp_path / "x.png"), size=16).size == (16, 16)


def test_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        good
    )
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path, message in [
        (empty, "empty"),
        (text, "cannot read"),
        (truncated, "cannot read"),
        (tmp_path / "missing.png", "not found"),
    ]:
        with pytest.raises(VQADataError, match=message) as info:
            load_image(path)
        assert info.value.file == str(path)


def test_decompression_bomb_guard_stays_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(VQADataError, match="too large"):
        load_image(path)

"""The synthetic shapes data set: determinism, format, balance, geometry."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.images import ImageIndex, load_image
from vqadapt.data.synth import (
    COLOURS,
    LOCATION_MARGIN,
    LOCATIONS,
    SHAPES,
    ShapeObject,
    candidate_questions,
    generate,
    patch_labels,
    render_scene,
)
from vqadapt.errors import VQAConfigError

N = 1500


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(out, n=N, seed=7)


def test_loader_reads_it_and_counts_match(generated: tuple[Path, dict]) -> None:
    out, summary = generated
    train = load_vivqa_csv(out / "train.csv")
    test = load_vivqa_csv(out / "test.csv")
    assert len(train) + len(test) == N == summary["n"]
    assert (len(train), len(test)) == (summary["train"], summary["test"])
    assert sum(summary["per_type"].values()) == N
    assert abs(len(test) / N - 0.2) < 0.05
    assert not {r.image for r in train} & {r.image for r in test}
    assert len({r.image for r in train + test}) == summary["images"]
    assert ImageIndex(out / "images").coverage(train + test) == (summary["images"], [])
    assert "seed 7" in (out / "README.md").read_text(encoding="utf-8")
    records = train + test
    assert all(unicodedata.is_normalized("NFC", r.question + r.answer) for r in records)
    per_image = Counter(r.image for r in records)
    assert max(per_image.values()) <= 3
    assert sum(per_image.values()) / len(per_image) >= 1.8


def test_deterministic(generated: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = generated
    generate(tmp_path, n=N, seed=7)
    for name in ("train.csv", "test.csv", "README.md", "images/0.png", "images/25.png"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other"
    generate(other, n=100, seed=8)
    assert (other / "train.csv").read_bytes() != (out / "train.csv").read_bytes()


def test_answers_balanced_and_need_the_image(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    records = load_vivqa_csv(out / "train.csv") + load_vivqa_csv(out / "test.csv")
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_type[r.qtype][r.answer] += 1
        by_question[r.question][r.answer] += 1
    assert set(by_type) == {"object", "number", "colour", "location"}
    for qtype, counts in by_type.items():
        assert counts.most_common(1)[0][1] / counts.total() < 0.4, qtype
    assert set(by_type["object"]) == set(SHAPES)
    assert set(by_type["colour"]) == {f"màu {c}" for c in COLOURS}
    assert set(by_type["number"]) == {"một", "hai", "ba", "bốn", "năm"}
    assert set(by_type["location"]) == set(LOCATIONS)
    common = sorted(by_question.items(), key=lambda kv: -kv[1].total())[:15]
    for question, counts in common:
        assert len(counts) >= 3, question
        assert counts.most_common(1)[0][1] / counts.total() < 0.6, question
    # Knowing the exact question string beats knowing only its type by little.
    question_oracle = sum(c.most_common(1)[0][1] for c in by_question.values())
    type_majority = sum(c.most_common(1)[0][1] for c in by_type.values())
    assert question_oracle / len(records) < type_majority / len(records) + 0.15


def test_images_are_rgb_and_sized(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    image = load_image(out / "images" / "0.png")
    assert image.size == (112, 112) and image.mode == "RGB"


def test_render_scene_geometry() -> None:
    rng = random.Random(0)
    for _ in range(50):
        image, objects = render_scene(rng, size=112)
        assert image.size == (112, 112) and 1 <= len(objects) <= 5
        for i, a in enumerate(objects):
            assert a.shape in SHAPES and a.colour in COLOURS
            assert 0 < a.cx < 1 and 0 < a.cy < 1 and 0 < a.radius < 0.5
            assert 0 <= a.bbox[0] < a.bbox[2] < 112 and 0 <= a.bbox[1] < a.bbox[3] < 112
            for b in objects[i + 1 :]:
                apart_x = a.bbox[2] < b.bbox[0] or b.bbox[2] < a.bbox[0]
                apart_y = a.bbox[3] < b.bbox[1] or b.bbox[3] < a.bbox[1]
                assert apart_x or apart_y


def test_object_colours_drawn() -> None:
    image, objects = render_scene(random.Random(3), size=112, n_objects=(3, 3))
    for obj in objects:
        if obj.shape != "hình tam giác":  # a triangle's centroid sits below cy
            pixel = image.getpixel((round(obj.cx * 112), round(obj.cy * 112)))
            assert max(pixel) - min(pixel) > 80, (obj, pixel)  # saturated, not background


def test_patch_labels() -> None:
    rng = random.Random(1)
    _, objects = render_scene(rng, size=112, n_objects=(4, 4))
    labels = patch_labels(objects, size=112, patch=14)
    assert len(labels["shape"]) == 8 and all(len(row) == 8 for row in labels["shape"])
    for obj in objects:
        row, col = int(obj.cy * 8), int(obj.cx * 8)
        assert labels["shape"][row][col] == SHAPES.index(obj.shape) + 1
        assert labels["colour"][row][col] == COLOURS.index(obj.colour) + 1
    assert sum(v == 0 for row in labels["shape"] for v in row) > 20  # mostly background
    with pytest.raises(VQAConfigError):
        patch_labels(objects, size=112, patch=15)


def _matching(objects: list[ShapeObject], question: str) -> list[ShapeObject]:
    """The objects a question refers to (by the shape and colour names it mentions)."""
    shape = next((s for s in SHAPES if s in question), None)
    colour = next((c for c in COLOURS if f"màu {c} " in question + " "), None)
    return [o for o in objects if shape in (None, o.shape) and colour in (None, o.colour)]


def test_candidates_only_ask_answerable_questions() -> None:
    rng = random.Random(2)
    numbers = ["không", "một", "hai", "ba", "bốn", "năm"]
    for _ in range(300):
        _, objects = render_scene(rng)
        candidates = candidate_questions(objects)
        for question, answer in candidates["object"]:
            (obj,) = _matching(objects, question)
            assert answer == obj.shape
        for question, answer in candidates["colour"]:
            (obj,) = _matching(objects, question)
            assert answer == f"màu {obj.colour}"
        for question, answer in candidates["location"]:
            (obj,) = _matching(objects, question)
            assert answer == LOCATIONS[min(int(obj.cx * 3), 2)]
            assert min(abs(obj.cx - 1 / 3), abs(obj.cx - 2 / 3)) >= LOCATION_MARGIN
        for question, answer in candidates["number"]:
            assert answer == numbers[len(_matching(objects, question))]
            assert answer != "không"

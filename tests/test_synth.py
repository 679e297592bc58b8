"""The synthetic shapes benchmark: determinism, format, balance, geometry, fills and the
control subsets."""

from __future__ import annotations

import random
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from vqadapt.data.check import check_dataset
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.images import ImageIndex, load_image
from vqadapt.data.synth import (
    BLIND_WORDS,
    COLOUR_RGB,
    COLOURS,
    KINDS,
    LOCATION_MARGIN,
    LOCATIONS,
    MAX_OBJECTS,
    SHAPES,
    TWINS,
    ShapeObject,
    candidate_questions,
    generate,
    patch_labels,
    pretraining_texts,
    read_subsets,
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
    # ids count on across the files: the data check has no shared ids to warn about
    assert [r.id for r in train + test] == [str(i) for i in range(N)]
    report = check_dataset(out / "train.csv", out / "test.csv", image_root=out / "images")
    assert report.ok and not report.warnings, report.problems
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


def test_extra_test_questions_leave_the_first_n_as_they_were(
    generated: tuple[Path, dict], tmp_path: Path
) -> None:
    """More test questions for the same training set: the first n questions keep their
    images, split and ids byte for byte; the extra ones are all test, on new images."""
    out, summary = generated
    more = generate(tmp_path, n=N, seed=7, extra_test=400)
    assert (more["n"], more["extra_test"]) == (N, 400)
    assert (more["train"], more["test"]) == (summary["train"], summary["test"] + 400)
    assert (tmp_path / "train.csv").read_bytes() == (out / "train.csv").read_bytes()
    old_test = (out / "test.csv").read_text(encoding="utf-8").splitlines()
    new_test = (tmp_path / "test.csv").read_text(encoding="utf-8").splitlines()
    assert new_test[: len(old_test)] == old_test and len(new_test) == len(old_test) + 400
    old_subsets = (out / "subsets.csv").read_text(encoding="utf-8").splitlines()
    assert (tmp_path / "subsets.csv").read_text(encoding="utf-8").splitlines()[
        : len(old_subsets)
    ] == old_subsets
    for image in range(summary["images"]):
        assert (tmp_path / f"images/{image}.png").read_bytes() == (
            out / f"images/{image}.png"
        ).read_bytes()
    extra = load_vivqa_csv(tmp_path / "test.csv")[summary["test"] :]
    assert {int(r.image) for r in extra} == set(range(summary["images"], more["images"]))
    assert more["test_images"] == summary["test_images"] + more["images"] - summary["images"]
    assert sum(more["test_subsets"].values()) == more["test"]
    assert all(more["test_subsets"][s] > summary["test_subsets"][s] for s in more["test_subsets"])
    assert "the last 400 on images drawn after the first" in (tmp_path / "README.md").read_text(
        encoding="utf-8"
    )
    with pytest.raises(VQAConfigError, match="extra_test"):
        generate(tmp_path / "bad", n=N, extra_test=-1)


def _kinds(out: Path) -> dict[tuple[str, str], dict[str, str]]:
    subsets = read_subsets(out / "subsets.csv")
    return {(split, qid): row for split, rows in subsets.items() for qid, row in rows.items()}


def test_answers_balanced_and_need_the_image(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    kinds = _kinds(out)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    by_question: dict[str, Counter[str]] = defaultdict(Counter)
    total = 0
    for split in ("train", "test"):
        for r in load_vivqa_csv(out / f"{split}.csv"):
            by_kind[kinds[split, r.id]["kind"]][r.answer] += 1
            by_question[r.question][r.answer] += 1
            total += 1
    assert set(by_kind) == set(KINDS)
    for kind, counts in by_kind.items():
        assert counts.most_common(1)[0][1] / counts.total() < 0.6, kind
    assert set(by_kind["object"]) == set(SHAPES)
    assert set(by_kind["colour"]) == set(by_kind["tint"]) == {f"màu {c}" for c in COLOURS}
    assert set(by_kind["number"]) == {"một", "hai", "ba", "bốn"}
    assert set(by_kind["location"]) == set(LOCATIONS)
    assert set(by_kind["exists"]) == {"có", "không"}
    assert set(by_kind["name"]) == set(SHAPES)
    assert set(by_kind["instruct"]) == set(SHAPES) | {"một", "hai", "ba", "bốn"}
    common = sorted(by_question.items(), key=lambda kv: -kv[1].total())[:15]
    for question, counts in common:
        assert len(counts) >= 2, question
        # Counting instructions are asked about images whose shapes are all alike, most of
        # them single shapes (SINGLE_OBJECT_SHARE): "một" is their most common answer (78% in
        # this set), a prior every strategy can learn from the image as well.
        limit = 0.8 if question.startswith("hãy đếm") else 0.6
        assert counts.most_common(1)[0][1] / counts.total() < limit, question
    # Knowing the exact question string beats knowing only its kind by little.
    question_oracle = sum(c.most_common(1)[0][1] for c in by_question.values())
    kind_majority = sum(c.most_common(1)[0][1] for c in by_kind.values())
    assert question_oracle / total < kind_majority / total + 0.15


def test_instructions_differ_only_in_the_blind_words_and_are_a_coin_flip(
    generated: tuple[Path, dict],
) -> None:
    """The frozen text encoder cannot tell "count" from "name" (the text shift); which one is
    asked is a coin flip (``generate``), not a choice by the image."""
    out, _ = generated
    kinds = _kinds(out)
    instructions = [
        r
        for split in ("train", "test")
        for r in load_vivqa_csv(out / f"{split}.csv")
        if kinds[split, r.id]["kind"] == "instruct"
    ]
    counting = ["đếm" in r.question.split() for r in instructions]
    assert 0.35 < sum(counting) / len(counting) < 0.65
    for r in instructions:
        words = r.question.split()
        assert words[1:3] in (["đếm", "số"], ["gọi", "tên"])
        assert set(words[1:3]) <= set(BLIND_WORDS)
        other = ["gọi", "tên"] if words[1] == "đếm" else ["đếm", "số"]
        assert " ".join([words[0], *other, *words[3:]]) in pretraining_texts()


def test_subsets_label_every_question(generated: tuple[Path, dict]) -> None:
    out, summary = generated
    kinds = _kinds(out)
    shares: Counter[str] = Counter()
    for split in ("train", "test"):
        records = load_vivqa_csv(out / f"{split}.csv")
        assert {qid for s, qid in kinds if s == split} == {r.id for r in records}
        for r in records:
            row = kinds[split, r.id]
            twin = any(f"màu {c} " in f"{r.question} {r.answer} " for c in TWINS)
            blind = any(word in r.question.split() for word in BLIND_WORDS)
            assert row["names_twin"] == str(int(twin))
            assert row["blind_words"] == str(int(blind))
            expected = "vision_shift" if twin else "text_shift" if blind else "in_domain"
            assert row["subset"] == expected
            if split == "test":
                shares[row["subset"]] += 1
    assert shares == Counter(summary["test_subsets"])
    assert min(shares.values()) >= 0.1 * sum(shares.values())  # every subset has questions


def test_pretraining_text_covers_every_question(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    texts = set(pretraining_texts())
    for split in ("train", "test"):
        for r in load_vivqa_csv(out / f"{split}.csv"):
            assert r.question in texts and r.answer in texts


def test_images_are_rgb_and_sized(generated: tuple[Path, dict]) -> None:
    out, _ = generated
    image = load_image(out / "images" / "0.png")
    assert image.size == (112, 112) and image.mode == "RGB"


def test_render_scene_geometry() -> None:
    rng = random.Random(0)
    for _ in range(50):
        image, objects = render_scene(rng, size=112)
        assert image.size == (112, 112) and 1 <= len(objects) <= MAX_OBJECTS
        for i, a in enumerate(objects):
            assert a.shape in SHAPES and a.colour in COLOURS
            assert 0 < a.cx < 1 and 0 < a.cy < 1 and 0 < a.radius < 0.5
            assert 0 <= a.bbox[0] < a.bbox[2] < 112 and 0 <= a.bbox[1] < a.bbox[3] < 112
            for b in objects[i + 1 :]:
                apart_x = a.bbox[2] < b.bbox[0] or b.bbox[2] < a.bbox[0]
                apart_y = a.bbox[3] < b.bbox[1] or b.bbox[3] < a.bbox[1]
                assert apart_x or apart_y


def test_palette_is_one_brightness_and_one_saturation() -> None:
    """What the vision tower's blind spot relies on (``blindspots.vision_blind_spot``): one
    brightness, one saturation, and twins that differ only on the blue-yellow axis."""
    for r, g, b in COLOUR_RGB.values():
        assert r + g + b == 384
        assert r * r + g * g + b * b - r * g - r * b - g * b == 14_400
    for colour, twin in TWINS.items():
        (r, g, b), (r2, g2, b2) = COLOUR_RGB[colour], COLOUR_RGB[twin]
        assert (r, g, b) == (r2, b2, g2) and g != b  # same red-cyan axis, b mirrored
        assert TWINS[twin] == colour
    image, _ = render_scene(random.Random(0))
    corner = image.getpixel((0, 0))
    assert corner[0] == corner[1] == corner[2]  # a grey background


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
    numbers = ["không", "một", "hai", "ba", "bốn"]
    for _ in range(300):
        _, objects = render_scene(rng)
        candidates = candidate_questions(objects)
        for q in candidates["object"]:
            (obj,) = _matching(objects, q.question)
            twin = obj.colour in TWINS
            assert q.answer == obj.shape
            assert q.subset == ("vision_shift" if twin else "in_domain")
        for q in candidates["colour"]:
            (obj,) = _matching(objects, q.question)
            assert q.answer == f"màu {obj.colour}"
            assert q.subset == ("vision_shift" if obj.colour in TWINS else "in_domain")
        for q in candidates["exists"]:
            shape = next(s for s in SHAPES if s in q.question)
            present = any(o.shape == shape for o in objects)
            assert q.answer == ("có" if present else "không")
            assert q.subset == "in_domain"
        assert len(candidates["exists"]) == 2 * len(SHAPES)
        for q in candidates["location"]:
            (obj,) = _matching(objects, q.question)
            assert q.answer == LOCATIONS[min(int(obj.cx * 3), 2)]
            assert min(abs(obj.cx - 1 / 3), abs(obj.cx - 2 / 3)) >= LOCATION_MARGIN
        for q in candidates["number"]:
            assert q.answer == numbers[len(_matching(objects, q.question))]
            assert q.answer != "không"
            twin = any(f"màu {c} " in q.question + " " for c in TWINS)
            assert q.subset == ("vision_shift" if twin else "in_domain")
        shapes = {o.shape for o in objects}
        # "what shape is in the image?" and its instructions: only when every shape is alike
        for q in candidates["name"] + candidates["instruct"]:
            assert len(shapes) == 1
            counting = "đếm" in q.question.split()
            assert q.answer == (numbers[len(objects)] if counting else objects[0].shape)
            assert q.subset == ("text_shift" if q.kind == "instruct" else "in_domain")
        if len(shapes) == 1:
            assert len(candidates["instruct"]) == 4 and len(candidates["name"]) == 2
        colours = {o.colour for o in objects}
        # "what colour is the shape?": only when every shape has the same colour
        assert len(candidates["tint"]) == (2 if len(colours) == 1 else 0)
        for q in candidates["tint"]:
            assert q.answer == f"màu {objects[0].colour}"
            assert q.subset == ("vision_shift" if objects[0].colour in TWINS else "in_domain")

"""The embedded default data set: synthetic Vietnamese "shapes" VQA in ViVQA format.

Each image shows 1-5 non-overlapping coloured shapes on a light, slightly noisy background.
Questions cover the four ViVQA types with several phrasings each; a question is only asked
when its referent is unique in the image and its answer is unambiguous (locations keep a
margin from the thirds' borders). Among the valid questions of a type, the generator prefers
answers it has produced least so far, so answers are roughly balanced within each type and
the question alone says little about the answer.

Answer vocabulary: shapes (``SHAPES``), ``"màu <colour>"`` (``COLOURS``), number words
``"một"`` .. ``"năm"``, and the locations ``"bên trái"``, ``"ở giữa"``, ``"bên phải"``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vqadapt.data.records import QUESTION_TYPES
from vqadapt.errors import VQAConfigError

SHAPES = ["hình tròn", "hình vuông", "hình tam giác", "hình thoi"]
"""Shape names; patch label ``i + 1`` is ``SHAPES[i]`` (0 = background)."""

COLOURS = ["đỏ", "xanh lá", "xanh dương", "vàng", "tím", "cam"]
"""Colour names; patch label ``i + 1`` is ``COLOURS[i]`` (0 = background)."""

COLOUR_RGB = {
    "đỏ": (215, 35, 35),
    "xanh lá": (30, 160, 60),
    "xanh dương": (35, 75, 215),
    "vàng": (235, 205, 20),
    "tím": (140, 50, 185),
    "cam": (245, 125, 15),
}
NUMBER_WORDS = ["không", "một", "hai", "ba", "bốn", "năm"]
LOCATIONS = ["bên trái", "ở giữa", "bên phải"]

RADIUS_RANGE = (0.085, 0.13)
"""Object radius (half the bounding box of a circle) as a fraction of the image size."""
LOCATION_MARGIN = 0.06
"""How far (fraction of the width) an object's centre must be from a thirds border."""

OBJECT_TEMPLATES = [
    "hình màu {colour} là hình gì",
    "hình có màu {colour} là hình gì",
    "vật màu {colour} có hình dạng gì",
    "hình dạng của vật màu {colour} là gì",
]
NUMBER_SHAPE_TEMPLATES = ["có bao nhiêu {shape}", "trong ảnh có mấy {shape}"]
NUMBER_COLOUR_TEMPLATES = ["có bao nhiêu hình màu {colour}", "có mấy hình màu {colour}"]
NUMBER_TOTAL_TEMPLATES = ["có tất cả bao nhiêu hình", "trong ảnh có bao nhiêu hình"]
COLOUR_TEMPLATES = ["{shape} có màu gì", "màu của {shape} là gì", "{shape} trong ảnh màu gì"]
LOCATION_TEMPLATES = [
    "{referent} nằm ở đâu",
    "{referent} ở vị trí nào",
    "{referent} nằm ở phía nào của bức ảnh",
]
TYPE_CODE = {name: code for code, name in QUESTION_TYPES.items()}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``cx``, ``cy``, ``radius`` are fractions of the image size and
    ``bbox`` is ``(x0, y0, x1, y1)`` in pixels (inclusive)."""

    shape: str
    colour: str
    cx: float
    cy: float
    radius: float
    bbox: tuple[int, int, int, int]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Pixel outline of a shape (None for a circle); all fit inside the box cx±r, cy±r."""
    if shape == "hình vuông":
        s = 0.82 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "hình tam giác":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    if shape == "hình thoi":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    return None


def _draw(draw: ImageDraw.ImageDraw, obj: ShapeObject, size: int, fill: object) -> None:
    cx, cy, r = obj.cx * size, obj.cy * size, obj.radius * size
    points = _polygon(obj.shape, cx, cy, r)
    if points is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(points, fill=fill)


def _place(
    rng: random.Random, size: int, shapes: list[str], colours: list[str]
) -> list[ShapeObject]:
    """Place shapes at random with bounding boxes at least 3 px apart (fewer if no room)."""
    objects: list[ShapeObject] = []
    gap = 3
    for shape, colour in zip(shapes, colours, strict=True):
        for _ in range(200):
            r = rng.uniform(*RADIUS_RANGE) * size
            cx = rng.uniform(r + 2, size - r - 2)
            cy = rng.uniform(r + 2, size - r - 2)
            box = (math.floor(cx - r), math.floor(cy - r), math.ceil(cx + r), math.ceil(cy + r))
            if all(
                box[0] > o.bbox[2] + gap
                or o.bbox[0] > box[2] + gap
                or box[1] > o.bbox[3] + gap
                or o.bbox[1] > box[3] + gap
                for o in objects
            ):
                objects.append(ShapeObject(shape, colour, cx / size, cy / size, r / size, box))
                break
    return objects


def _background(rng: random.Random, size: int) -> Image.Image:
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    base = np.array([rng.randint(232, 248) for _ in range(3)], dtype=np.int16)
    pixels = base + noise_rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _scene(
    rng: random.Random, size: int, shapes: list[str], colours: list[str]
) -> tuple[Image.Image, list[ShapeObject]]:
    objects = _place(rng, size, shapes, colours)
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw(draw, obj, size, COLOUR_RGB[obj.colour])
    return image, objects


def render_scene(
    rng: random.Random, size: int = 112, n_objects: tuple[int, int] = (1, 5)
) -> tuple[Image.Image, list[ShapeObject]]:
    """Draw ``n_objects`` (inclusive range) random shapes in random colours, no overlaps.

    Deterministic given the state of ``rng``. If a shape finds no free spot after 200 tries
    it is dropped, so crowded small images may hold fewer objects (never zero).
    """
    low, high = n_objects
    if not 1 <= low <= high:
        raise VQAConfigError(
            f"n_objects must be (low, high) with 1 <= low <= high, got {n_objects}"
        )
    count = rng.randint(low, high)
    shapes = [rng.choice(SHAPES) for _ in range(count)]
    colours = [rng.choice(COLOURS) for _ in range(count)]
    return _scene(rng, size, shapes, colours)


def patch_labels(
    objects: list[ShapeObject], size: int, patch: int, min_cover: float = 0.15
) -> dict[str, list[list[int]]]:
    """Per-patch labels on a ``size // patch`` square grid: ``{"shape": rows, "colour": rows}``.

    A patch gets the shape index + 1 (``SHAPES``) and colour index + 1 (``COLOURS``) of the
    object covering most of its pixels, if that object covers at least ``min_cover`` of the
    patch; otherwise 0 (background).
    """
    if patch <= 0 or size % patch:
        raise VQAConfigError(f"patch ({patch}) must divide the image size ({size})")
    id_map = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(id_map)
    for number, obj in enumerate(objects, start=1):
        _draw(draw, obj, size, number)
    grid = size // patch
    ids = np.asarray(id_map).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3)
    ids = ids.reshape(grid, grid, patch * patch)
    shape_rows = [[0] * grid for _ in range(grid)]
    colour_rows = [[0] * grid for _ in range(grid)]
    for i in range(grid):
        for j in range(grid):
            counts = np.bincount(ids[i, j], minlength=len(objects) + 1)
            counts[0] = 0
            best = int(counts.argmax())
            if best and counts[best] >= min_cover * patch * patch:
                obj = objects[best - 1]
                shape_rows[i][j] = SHAPES.index(obj.shape) + 1
                colour_rows[i][j] = COLOURS.index(obj.colour) + 1
    return {"shape": shape_rows, "colour": colour_rows}


# --------------------------------------------------------------------------- questions


def _location(cx: float) -> str | None:
    """Horizontal third of a centre, or None when it is too close to a border."""
    for index in range(3):
        if index / 3 + LOCATION_MARGIN <= cx <= (index + 1) / 3 - LOCATION_MARGIN:
            return LOCATIONS[index]
    if cx < 1 / 3 - LOCATION_MARGIN:
        return LOCATIONS[0]
    if cx > 2 / 3 + LOCATION_MARGIN:
        return LOCATIONS[2]
    return None


def candidate_questions(objects: list[ShapeObject]) -> dict[str, list[tuple[str, str]]]:
    """Every valid ``(question, answer)`` for a scene, by type name (template per slot)."""
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    pairs = Counter((o.shape, o.colour) for o in objects)
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in QUESTION_TYPES.values()}
    for colour, count in colours.items():
        if count == 1:
            shape = next(o.shape for o in objects if o.colour == colour)
            out["object"] += [(t.format(colour=colour), shape) for t in OBJECT_TEMPLATES]
    for shape, count in shapes.items():
        out["number"] += [
            (t.format(shape=shape), NUMBER_WORDS[count]) for t in NUMBER_SHAPE_TEMPLATES
        ]
    for colour, count in colours.items():
        out["number"] += [
            (t.format(colour=colour), NUMBER_WORDS[count]) for t in NUMBER_COLOUR_TEMPLATES
        ]
    out["number"] += [(t, NUMBER_WORDS[len(objects)]) for t in NUMBER_TOTAL_TEMPLATES]
    for shape, count in shapes.items():
        if count == 1:
            colour = next(o.colour for o in objects if o.shape == shape)
            out["colour"] += [(t.format(shape=shape), f"màu {colour}") for t in COLOUR_TEMPLATES]
    for obj in objects:
        where = _location(obj.cx)
        if where is None:
            continue
        referents = []
        if shapes[obj.shape] == 1:
            referents.append(obj.shape)
        if pairs[(obj.shape, obj.colour)] == 1:
            referents.append(f"{obj.shape} màu {obj.colour}")
        out["location"] += [
            (t.format(referent=ref), where) for ref in referents for t in LOCATION_TEMPLATES
        ]
    return out


def _share(counts: Counter[str], answer: str) -> float:
    return counts[answer] / (1 + counts.total())


def _pick(
    rng: random.Random,
    candidates: list[tuple[str, str]],
    type_counts: Counter[str],
    question_counts: dict[str, Counter[str]],
) -> tuple[str, str]:
    """The candidate whose answer is rarest so far, both within its type and for its exact
    question string (sum of the two shares; random among ties)."""

    def score(candidate: tuple[str, str]) -> float:
        question, answer = candidate
        return _share(type_counts, answer) + _share(question_counts[question], answer)

    best = min(score(c) for c in candidates)
    return rng.choice([c for c in candidates if score(c) == best])


def _palette(rng: random.Random) -> tuple[list[str], list[str]]:
    """Shapes and colours to draw from: half the scenes use only 1-2 of each, so that counts
    of one shape or colour up to five occur as often as small ones."""
    if rng.random() < 0.5:
        return list(SHAPES), list(COLOURS)
    return rng.sample(SHAPES, rng.choice((1, 2))), rng.sample(COLOURS, rng.choice((1, 2)))


# ---------------------------------------------------------------------------- writing


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_bytes(rows: list[tuple[str, str, int, int]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", "question", "answer", "img_id", "type"])
    for index, (question, answer, img_id, code) in enumerate(rows):
        writer.writerow([index, question, answer, img_id, code])
    return buffer.getvalue().encode("utf-8")


def _readme(summary: dict) -> str:
    per_type = ", ".join(f"{name} {count}" for name, count in summary["per_type"].items())
    return f"""# Synthetic Vietnamese shapes VQA

Generated by `vqadapt.data.synth.generate` (seed {summary["seed"]}, {summary["size"]} px images).
Same seed and settings give byte-identical CSV files.

- `train.csv`: {summary["train"]} questions on {summary["train_images"]} images
- `test.csv`: {summary["test"]} questions on {summary["test_images"]} images (split by image)
- `images/<img_id>.png`: {summary["images"]} images
- questions per type: {per_type}
- distinct answers: {summary["answers"]}

Format: ViVQA CSV (header `,question,answer,img_id,type`; type 0 object, 1 number,
2 colour, 3 location). Each image shows 1-5 non-overlapping shapes
({", ".join(SHAPES)}) in colours ({", ".join(COLOURS)}) on a light noisy background.
Questions are asked only about unique referents with unambiguous answers; answers are
balanced within each type so that the question alone does not give the answer away.
"""


def generate(
    out_dir: str | Path,
    n: int = 10000,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int = 112,
) -> dict:
    """Write ``n`` synthetic questions (2-3 per image) as ViVQA CSVs plus PNG images.

    Creates ``out_dir/train.csv``, ``out_dir/test.csv``, ``out_dir/images/<img_id>.png``
    (img_id = 0, 1, ...) and ``out_dir/README.md``; every file is written atomically. About
    ``test_fraction`` of the images (and their questions) go to test. Returns a summary:
    ``n``, ``train``, ``test``, ``images``, ``train_images``, ``test_images``, ``per_type``,
    ``answers`` (distinct), ``seed``, ``size``, ``seconds``.
    """
    if n < 2:
        raise VQAConfigError(f"n must be at least 2, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise VQAConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if size < 48:
        raise VQAConfigError(f"size must be at least 48 px for shapes to stay legible, got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    answer_counts: dict[str, Counter[str]] = {name: Counter() for name in QUESTION_TYPES.values()}
    question_counts: dict[str, Counter[str]] = defaultdict(Counter)
    type_counts: Counter[str] = Counter()
    per_image: list[list[tuple[str, str, int, int]]] = []

    produced = 0
    while produced < n:
        img_id = len(per_image)
        shapes, colours = _palette(rng)
        count = rng.randint(1, 5)
        image, objects = _scene(
            rng,
            size,
            [rng.choice(shapes) for _ in range(count)],
            [rng.choice(colours) for _ in range(count)],
        )
        candidates = candidate_questions(objects)
        available = [name for name, c in candidates.items() if c]
        # Rarest types first keeps the four types roughly equally frequent.
        rng.shuffle(available)
        available.sort(key=lambda name: type_counts[name])
        wanted = min(rng.choice((2, 3)), len(available), n - produced)
        rows = []
        for name in available[:wanted]:
            question, answer = _pick(rng, candidates[name], answer_counts[name], question_counts)
            answer_counts[name][answer] += 1
            question_counts[question][answer] += 1
            type_counts[name] += 1
            rows.append((question, answer, img_id, TYPE_CODE[name]))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        _write_atomic(image_dir / f"{img_id}.png", buffer.getvalue())
        per_image.append(rows)
        produced += len(rows)

    image_ids = list(range(len(per_image)))
    random.Random(seed + 1).shuffle(image_ids)
    n_test_images = min(max(1, round(test_fraction * len(image_ids))), len(image_ids) - 1)
    test_ids = set(image_ids[:n_test_images])
    train_rows = [row for i, rows in enumerate(per_image) if i not in test_ids for row in rows]
    test_rows = [row for i, rows in enumerate(per_image) if i in test_ids for row in rows]
    _write_atomic(out_dir / "train.csv", _csv_bytes(train_rows))
    _write_atomic(out_dir / "test.csv", _csv_bytes(test_rows))

    summary = {
        "n": produced,
        "train": len(train_rows),
        "test": len(test_rows),
        "images": len(per_image),
        "train_images": len(per_image) - n_test_images,
        "test_images": n_test_images,
        "per_type": {name: type_counts[name] for name in QUESTION_TYPES.values()},
        "answers": len({a for counts in answer_counts.values() for a in counts}),
        "seed": seed,
        "size": size,
    }
    _write_atomic(out_dir / "README.md", _readme(summary).encode("utf-8"))
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary

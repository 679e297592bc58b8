"""The embedded default data set: synthetic Vietnamese "shapes" VQA in ViVQA format, built as
a benchmark of positive controls for the adaptation strategies.

Each image shows 1-4 non-overlapping shapes on a light, slightly noisy background
(``SINGLE_OBJECT_SHARE`` of them a single shape), each in one of six colours. A question is only
asked when its referent is unique in the image and its answer is unambiguous (locations keep a
margin from the thirds' borders). Among the valid questions of a kind, the generator prefers
answers it has produced least so far, so answers are roughly balanced within each kind and the
question alone says little about the answer.

Two shifts are built in, each a positive control for one tower (README: the embedded
benchmark). Each tiny backbone is pretrained without something that some questions need: it
reaches the tower's input, but none of its frozen layers reads it and its output does not carry
it (``blindspots``):

- **Text shift** (``text_shift``): instructions, "hãy đếm số hình trong ảnh" (count the shapes
  in the image) and "hãy gọi tên hình trong ảnh" (name the shape in the image), asked about
  images whose shapes are all alike (``instruct``). The frozen text encoder cannot tell
  ``BLIND_WORDS`` apart, so the two instructions read the same to it, and which one is asked is
  a coin flip that the image does not give away; an adapted encoder (unfrozen layers, LoRA) can
  learn to read them. The same two requests asked as questions ("trong ảnh có bao nhiêu hình",
  "hình trong ảnh là hình gì") are in the in-domain part, so what adaptation has to learn is
  the new wording, not the task.
- **Vision shift** (``vision_shift``): questions that name or answer one of ``TWINS``, four
  of the six colours ("what colour is the circle?" -> "màu vàng", "how many purple shapes?").
  The tiny vision tower sees brightness and the red-cyan colour axis but not the blue-yellow
  one, so yellow and purple look the same to it, and so do green and blue
  (``COLOUR_RGB``); colour-only filters feed dimensions none of its layers reads. Red and cyan
  it tells apart, so the decoder learns to name colours from in-domain questions, and what
  vision LoRA has to learn is to read the missing axis.

Every other question (``in_domain``) is answerable through both frozen towers. ``subsets.csv``
beside the CSVs names each question's kind and subset, so that a report can test each control
on its own questions (README: what the quick study measured).

Answer vocabulary: shapes (``SHAPES``), ``"màu <colour>"`` (``COLOURS``), number words
``"một"`` .. ``"bốn"``, the locations ``"bên trái"``, ``"ở giữa"``, ``"bên phải"``, and
``"có"`` / ``"không"``.
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

from vqadapt.errors import VQAConfigError

SHAPES = ["hình tròn", "hình vuông", "hình tam giác", "hình thoi"]
"""Shape names; patch label ``i + 1`` is ``SHAPES[i]`` (0 = background)."""

COLOURS = ["đỏ", "xanh lơ", "vàng", "tím", "xanh lá", "xanh dương"]
"""Colour names; patch label ``i + 1`` is ``COLOURS[i]`` (0 = background)."""

COLOUR_RGB = {
    "đỏ": (208, 88, 88),
    "xanh lơ": (48, 168, 168),
    "vàng": (168, 168, 48),
    "tím": (168, 48, 168),
    "xanh lá": (88, 208, 88),
    "xanh dương": (88, 88, 208),
}
"""Six hues of one brightness and one saturation, exactly: R + G + B = 384 and
R² + G² + B² - RG - RB - GB = 14,400 (the squared length of the opponent-colour vector) for
each, at hue angles 0, 180, ±60 and ±120 degrees. ``TWINS`` differ only in the sign of the
blue-yellow axis b = (G - B)·√3/2 (their G and B swapped); the red-cyan axis
a = R - (G + B)/2 and the brightness are the same. A tower that sees brightness and a only
(``blindspots.vision_blind_spot``) tells red, cyan and the two pairs apart, not a twin from its
twin."""
TWINS = {"vàng": "tím", "tím": "vàng", "xanh lá": "xanh dương", "xanh dương": "xanh lá"}
"""The colours the embedded benchmark's frozen vision tower confuses, each with its twin."""
SEEN_COLOUR = {"đỏ": 1, "xanh lơ": 2, "vàng": 3, "tím": 3, "xanh lá": 4, "xanh dương": 4}
"""What the frozen vision tower can tell apart: a class per colour, twins sharing one."""
NUMBER_WORDS = ["không", "một", "hai", "ba", "bốn", "năm"]
LOCATIONS = ["bên trái", "ở giữa", "bên phải"]

RADIUS_RANGE = (0.1, 0.15)
"""Object radius (half the bounding box of a circle) as a fraction of the image size."""
MAX_OBJECTS = 4
LOCATION_MARGIN = 0.06
"""How far (fraction of the width) an object's centre must be from a thirds border."""

BLIND_WORDS = ("đếm", "số", "gọi", "tên")
"""The words the embedded benchmark's frozen text encoder cannot tell apart: "hãy đếm số ..."
(count ...) and "hãy gọi tên ..." (name ...) read the same to it (the ``instruct`` kind)."""
KINDS = ("object", "number", "colour", "location", "exists", "name", "instruct", "tint")
"""Question kinds: the ViVQA types; "is there a circle?" (filed as object); "what shape is in
the image?" about images of one shape (``name``); the same two requests as instructions, count
or name (``instruct``, the text shift); "what colour is the shape?" about images whose
shapes are all one colour (``tint``: a colour question that needs no binding)."""
TYPE_CODE = {
    "object": 0,
    "number": 1,
    "colour": 2,
    "location": 3,
    "exists": 0,
    "name": 0,
    "tint": 2,
}
"""ViVQA type per kind; an ``instruct`` question takes its answer's (number or object)."""
KIND_WEIGHT = {"instruct": 3.0, "tint": 6.0}
"""How much more often than the others a kind is asked where it can be (default 1): the
controls' subsets get enough test questions for their tests' power."""
YES_NO = ("có", "không")
SINGLE_OBJECT_SHARE = 0.6
"""Share of images with one shape (a colour question about them needs no binding)."""
SUBSETS = ("in_domain", "text_shift", "vision_shift")

TEMPLATES = {
    "object": [
        "hình màu {colour} là hình gì",
        "hình có màu {colour} là hình gì",
        "vật màu {colour} có hình dạng gì",
        "hình dạng của vật màu {colour} là gì",
    ],
    "number_shape": ["có bao nhiêu {shape}", "trong ảnh có mấy {shape}"],
    "number_colour": ["có bao nhiêu hình màu {colour}", "có mấy hình màu {colour}"],
    "number_total": ["có tất cả bao nhiêu hình", "trong ảnh có bao nhiêu hình"],
    "colour": ["{shape} có màu gì", "màu của {shape} là gì", "{shape} trong ảnh màu gì"],
    "location": [
        "{referent} nằm ở đâu",
        "{referent} ở vị trí nào",
        "{referent} nằm ở phía nào của bức ảnh",
    ],
    "exists": ["có {shape} nào không", "trong ảnh có {shape} không"],
    "name": ["hình trong ảnh là hình gì", "các hình trong ảnh là hình gì"],
    "instruct_count": ["hãy đếm số hình trong ảnh", "hãy đếm số vật trong ảnh"],
    "instruct_name": ["hãy gọi tên hình trong ảnh", "hãy gọi tên vật trong ảnh"],
    "tint": ["hình trong ảnh có màu gì", "vật trong ảnh màu gì"],
}
"""``instruct_count`` and ``instruct_name`` differ only in ``BLIND_WORDS``, word for word."""


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


@dataclass(frozen=True)
class Question:
    """One candidate question: its text, answer and kind."""

    question: str
    answer: str
    kind: str

    @property
    def names_twin(self) -> bool:
        """Whether the question or its answer names one of ``TWINS``."""
        text = f"{self.question} {self.answer} "
        return any(f"màu {colour} " in text for colour in TWINS)

    @property
    def blind_words(self) -> bool:
        """Whether the question holds ``BLIND_WORDS`` (an ``instruct`` question)."""
        return self.kind == "instruct"

    @property
    def counts(self) -> bool:
        """Whether the answer is a number (an ``instruct`` question: the counting one)."""
        return self.answer in NUMBER_WORDS

    @property
    def type_code(self) -> int:
        """The ViVQA type (0 object, 1 number, 2 colour, 3 location)."""
        if self.kind == "instruct":
            return 1 if self.counts else 0
        return TYPE_CODE[self.kind]

    @property
    def subset(self) -> str:
        """The positive-control subset (see the module doc)."""
        if self.names_twin:
            return "vision_shift"
        return "text_shift" if self.blind_words else "in_domain"


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
    # Grey (no colour of its own: the colour-blind tower's colour filters see only the shapes).
    base = np.full(3, rng.randint(232, 248), dtype=np.int16)
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
    rng: random.Random, size: int = 112, n_objects: tuple[int, int] = (1, MAX_OBJECTS)
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


def _referents(objects: list[ShapeObject], obj: ShapeObject) -> list[str]:
    """Unique ways to name ``obj``: by its shape, or by its shape and colour."""
    shapes = Counter(o.shape for o in objects)
    pairs = Counter((o.shape, o.colour) for o in objects)
    out = []
    if shapes[obj.shape] == 1:
        out.append(obj.shape)
    if pairs[(obj.shape, obj.colour)] == 1:
        out.append(f"{obj.shape} màu {obj.colour}")
    return out


def candidate_questions(objects: list[ShapeObject]) -> dict[str, list[Question]]:
    """Every valid question about a scene, by kind (one per template and slot)."""
    shapes = Counter(o.shape for o in objects)
    colours = Counter(o.colour for o in objects)
    out: dict[str, list[Question]] = {kind: [] for kind in KINDS}

    def add(kind: str, key: str, answer: str, **slots: str) -> None:
        out[kind] += [Question(t.format(**slots), answer, kind) for t in TEMPLATES[key]]

    for colour, count in colours.items():
        if count == 1:
            add(
                "object",
                "object",
                next(o.shape for o in objects if o.colour == colour),
                colour=colour,
            )
    for shape, count in shapes.items():
        add("number", "number_shape", NUMBER_WORDS[count], shape=shape)
    for colour, count in colours.items():
        add("number", "number_colour", NUMBER_WORDS[count], colour=colour)
    add("number", "number_total", NUMBER_WORDS[len(objects)])
    for shape, count in shapes.items():
        if count == 1:
            obj = next(o for o in objects if o.shape == shape)
            add("colour", "colour", f"màu {obj.colour}", shape=shape)
    for obj in objects:
        where = _location(obj.cx)
        for referent in _referents(objects, obj) if where is not None else []:
            add("location", "location", where, referent=referent)
    for shape in SHAPES:
        add("exists", "exists", YES_NO[0] if shape in shapes else YES_NO[1], shape=shape)
    if len(shapes) == 1:  # every shape alike: "what shape is in the image?" has one answer
        (shape,) = shapes
        add("name", "name", shape)
        add("instruct", "instruct_name", shape)
        add("instruct", "instruct_count", NUMBER_WORDS[len(objects)])
    if len(colours) == 1:  # every shape the same colour
        (colour,) = colours
        add("tint", "tint", f"màu {colour}")
    return out


def pretraining_texts() -> list[str]:
    """Every question template with every slot value, and every answer: the tiny text
    model's pretraining text (what its tokenizer and denoising see)."""
    referents = list(SHAPES) + [f"{s} màu {c}" for s in SHAPES for c in COLOURS]
    slots = {
        "object": [{"colour": c} for c in COLOURS],
        "number_shape": [{"shape": s} for s in SHAPES],
        "number_colour": [{"colour": c} for c in COLOURS],
        "number_total": [{}],
        "colour": [{"shape": s} for s in SHAPES],
        "location": [{"referent": r} for r in referents],
        "exists": [{"shape": s} for s in SHAPES],
        "name": [{}],
        "instruct_count": [{}],
        "instruct_name": [{}],
        "tint": [{}],
    }
    texts = [
        template.format(**values)
        for key, templates in TEMPLATES.items()
        for template in templates
        for values in slots[key]
    ]
    answers = [*SHAPES, *(f"màu {c}" for c in COLOURS), *NUMBER_WORDS[1:], *LOCATIONS]
    return texts + answers + list(YES_NO)


def _share(counts: Counter[str], answer: str) -> float:
    return counts[answer] / (1 + counts.total())


def _pick(
    rng: random.Random,
    candidates: list[Question],
    kind_counts: Counter[str],
    question_counts: dict[str, Counter[str]],
) -> Question:
    """The candidate whose answer is rarest so far, both within its kind and for its exact
    question string (sum of the two shares; random among ties)."""

    def score(candidate: Question) -> float:
        return _share(kind_counts, candidate.answer) + _share(
            question_counts[candidate.question], candidate.answer
        )

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


def _csv_bytes(rows: list[tuple[Question, int]], first_id: int = 0) -> bytes:
    """ViVQA CSV; ids count on from ``first_id``, so that the test file's ids follow the
    training file's and no id names two questions (the data check warns about shared ids)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["", "question", "answer", "img_id", "type"])
    for index, (q, img_id) in enumerate(rows, start=first_id):
        writer.writerow([index, q.question, q.answer, img_id, q.type_code])
    return buffer.getvalue().encode("utf-8")


def _subsets_bytes(splits: dict[str, list[tuple[Question, int]]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", "id", "kind", "names_twin", "blind_words", "subset"])
    first_id = 0
    for split, rows in splits.items():
        for index, (q, _) in enumerate(rows, start=first_id):
            writer.writerow([split, index, q.kind, int(q.names_twin), int(q.blind_words), q.subset])
        first_id += len(rows)  # the ids of _csv_bytes: each split counts on from the last
    return buffer.getvalue().encode("utf-8")


def read_subsets(path: str | Path) -> dict[str, dict[str, dict[str, str]]]:
    """``subsets.csv`` as ``{split: {question id: {"kind", "needs_colour", "names_blind_shape",
    "subset"}}}``."""
    out: dict[str, dict[str, dict[str, str]]] = defaultdict(dict)
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            split, qid = row.pop("split"), row.pop("id")
            out[split][qid] = row
    return dict(out)


def _readme(summary: dict) -> str:
    per_kind = ", ".join(f"{name} {count}" for name, count in summary["per_kind"].items())
    per_subset = ", ".join(f"{name} {count}" for name, count in summary["test_subsets"].items())
    extra = (
        f"; the last {summary['extra_test']} on images drawn after the first {summary['n']} "
        "questions' images, all for testing"
        if summary.get("extra_test")
        else ""
    )
    return f"""# Synthetic Vietnamese shapes VQA

Generated by `vqadapt.data.synth.generate` (seed {summary["seed"]}, {summary["size"]} px images).
Same seed and settings give byte-identical files.

- `train.csv`: {summary["train"]} questions on {summary["train_images"]} images
- `test.csv`: {summary["test"]} questions on {summary["test_images"]} images (split by image{extra})
- `images/<img_id>.png`: {summary["images"]} images
- `subsets.csv`: each question's kind, whether it or its answer names a colour the frozen
  vision tower confuses with its twin ({", ".join(TWINS)}), whether it holds one of
  {", ".join(BLIND_WORDS)} (an instruction: "hãy đếm số ...", "hãy gọi tên ..."), and its
  control subset (vision_shift: a twin colour; text_shift: an instruction; in_domain: the rest)
- questions per kind: {per_kind}
- test questions per control subset: {per_subset}
- distinct answers: {summary["answers"]}

Format: ViVQA CSV (header `,question,answer,img_id,type`; type 0 object, 1 number,
2 colour, 3 location). Each image shows 1-{MAX_OBJECTS} non-overlapping shapes
({", ".join(SHAPES)}) in colours ({", ".join(COLOURS)}) on a light noisy background. Questions are asked only about unique
referents with unambiguous answers; answers are balanced within each kind so that the
question alone does not give the answer away.
"""


def generate(
    out_dir: str | Path,
    n: int = 10000,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int = 112,
    extra_test: int = 0,
) -> dict:
    """Write ``n`` synthetic questions (2-3 per image) as ViVQA CSVs plus PNG images.

    Creates ``out_dir/train.csv``, ``out_dir/test.csv``, ``out_dir/subsets.csv``,
    ``out_dir/images/<img_id>.png`` (img_id = 0, 1, ...) and ``out_dir/README.md``; every
    file is written atomically. About ``test_fraction`` of the images (and their questions)
    go to test. ``extra_test`` more questions, on images drawn after the first ``n``
    questions' ones, all go to test: the first ``n`` questions, their images, their split and
    their ids are those of ``extra_test=0`` exactly (a larger test set for the same training
    set). Returns a summary: ``n``, ``train``, ``test``, ``extra_test``, ``images``,
    ``train_images``, ``test_images``, ``per_type``, ``per_kind``, ``test_subsets``,
    ``answers`` (distinct), ``seed``, ``size``, ``seconds``.
    """
    if n < 2:
        raise VQAConfigError(f"n must be at least 2, got {n}")
    if extra_test < 0:
        raise VQAConfigError(f"extra_test must be 0 or more, got {extra_test}")
    if not 0.0 < test_fraction < 1.0:
        raise VQAConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if size < 48:
        raise VQAConfigError(f"size must be at least 48 px for shapes to stay legible, got {size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    answer_counts: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    question_counts: dict[str, Counter[str]] = defaultdict(Counter)
    kind_counts: Counter[str] = Counter()
    per_image: list[list[tuple[Question, int]]] = []

    produced = 0
    base_images = None
    while produced < n + extra_test:
        if produced >= n and base_images is None:
            base_images = len(per_image)  # the images of the first n questions
        target = n if base_images is None else n + extra_test
        img_id = len(per_image)
        shapes, colours = _palette(rng)
        count = 1 if rng.random() < SINGLE_OBJECT_SHARE else rng.randint(2, MAX_OBJECTS)
        image, objects = _scene(
            rng,
            size,
            [rng.choice(shapes) for _ in range(count)],
            [rng.choice(colours) for _ in range(count)],
        )
        candidates = candidate_questions(objects)
        available = [kind for kind in KINDS if candidates[kind]]
        # Rarest kinds first keeps the kinds about equally frequent.
        rng.shuffle(available)
        available.sort(key=lambda kind: kind_counts[kind] / KIND_WEIGHT.get(kind, 1.0))
        wanted = min(rng.choice((2, 3)), len(available), target - produced)
        rows = []
        for kind in available[:wanted]:
            options = candidates[kind]
            if kind == "instruct":
                # Count or name by a coin flip, never by the image: the image must not tell
                # which of the two (indistinguishable to the frozen encoder) was asked.
                counting = rng.random() < 0.5
                options = [q for q in options if q.counts == counting]
            question = _pick(rng, options, answer_counts[kind], question_counts)
            answer_counts[kind][question.answer] += 1
            question_counts[question.question][question.answer] += 1
            kind_counts[kind] += 1
            rows.append((question, img_id))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        _write_atomic(image_dir / f"{img_id}.png", buffer.getvalue())
        per_image.append(rows)
        produced += len(rows)

    if base_images is None:
        base_images = len(per_image)
    image_ids = list(range(base_images))
    random.Random(seed + 1).shuffle(image_ids)
    drawn_for_test = min(max(1, round(test_fraction * len(image_ids))), len(image_ids) - 1)
    test_ids = set(image_ids[:drawn_for_test]) | set(range(base_images, len(per_image)))
    train_rows = [row for i, rows in enumerate(per_image) if i not in test_ids for row in rows]
    test_rows = [row for i, rows in enumerate(per_image) if i in test_ids for row in rows]
    _write_atomic(out_dir / "train.csv", _csv_bytes(train_rows))
    _write_atomic(out_dir / "test.csv", _csv_bytes(test_rows, first_id=len(train_rows)))
    _write_atomic(out_dir / "subsets.csv", _subsets_bytes({"train": train_rows, "test": test_rows}))

    all_rows = train_rows + test_rows
    type_names = {0: "object", 1: "number", 2: "colour", 3: "location"}
    summary = {
        "n": n,
        "train": len(train_rows),
        "test": len(test_rows),
        "extra_test": extra_test,
        "images": len(per_image),
        "train_images": len(per_image) - len(test_ids),
        "test_images": len(test_ids),
        "per_type": dict(Counter(type_names[q.type_code] for q, _ in all_rows)),
        "per_kind": {kind: kind_counts[kind] for kind in KINDS},
        "test_subsets": {s: sum(q.subset == s for q, _ in test_rows) for s in SUBSETS},
        "answers": len({a for counts in answer_counts.values() for a in counts}),
        "seed": seed,
        "size": size,
    }
    _write_atomic(out_dir / "README.md", _readme(summary).encode("utf-8"))
    summary["seconds"] = round(time.perf_counter() - start, 3)
    return summary

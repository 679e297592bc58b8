"""Check a whole data set before training and report every problem at once.

The loaders in :mod:`vqadapt.data.formats` stop at the first bad row, which is right for
training but slow for fixing a file: one run per problem. :func:`check_file` runs the same
parsers (:mod:`vqadapt.data.parse`) with a collector that keeps every problem, so a file
without errors yields exactly the records ``load_records`` returns, and a loader's error is
the first error the check lists. Beyond the parsers, :func:`check_file` warns about
questions the pipeline will truncate, and :func:`check_dataset` about ids shared between
files; it also opens every referenced image once, validates the answer weights, and returns
a :class:`CheckReport`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from vqadapt.config import ON_BAD_IMAGE
from vqadapt.data.formats import parse_file
from vqadapt.data.images import REFUSED_REASONS, ImageIndex
from vqadapt.data.parse.problems import ERROR, WARNING, Collector, Problem, Row
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.weights import load_answer_weights

LONG_QUESTION_CHARS = 500
"""Without a tokenizer, questions longer than this (characters) get a warning."""
THUMBNAIL = 64
"""JPEGs are decoded at reduced scale (>= this size): every byte is still read, 8x faster."""


@dataclasses.dataclass
class CheckReport:
    """Everything :func:`check_dataset` found; ``ok`` when there is no error."""

    problems: list[Problem] = dataclasses.field(default_factory=list)
    counts: dict = dataclasses.field(default_factory=dict)
    skipped_images: list[str] = dataclasses.field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, max_per_kind: int = 20) -> str:
        """Readable report: totals, then problems grouped by severity and kind."""
        errors, warns = self.errors, self.warnings
        verdict = "OK" if self.ok else "FAILED"
        lines = [f"data check {verdict}: {len(errors)} error(s), {len(warns)} warning(s)"]
        for title, group in (("errors", errors), ("warnings", warns)):
            if not group:
                continue
            lines.append(f"{title}:")
            by_kind: dict[str, list[Problem]] = {}
            for problem in group:
                by_kind.setdefault(problem.kind or problem.message, []).append(problem)
            for kind, items in by_kind.items():
                lines.append(f"  {kind} ({len(items)}):")
                lines += [f"    {p}" for p in items[:max_per_kind]]
                if len(items) > max_per_kind:
                    lines.append(f"    ... and {len(items) - max_per_kind} more")
        lines += _format_counts(self.counts, self.skipped_images)
        return "\n".join(lines)


def _format_counts(counts: dict, skipped: list[str]) -> list[str]:
    lines = []
    if counts.get("records"):
        lines.append(
            "records: " + ", ".join(f"{file} {n}" for file, n in counts["records"].items())
        )
    images = counts.get("images")
    if images:
        lines.append(
            f"images: {images['referenced']} referenced, {images['readable']} readable, "
            f"{images['bad']} bad, {len(skipped)} skipped"
        )
    if counts.get("modes"):
        lines.append(
            "image modes: " + ", ".join(f"{m} {n}" for m, n in sorted(counts["modes"].items()))
        )
    return lines


# ---------------------------------------------------------------------------- files


def _check_question_lengths(
    rows: list[tuple[Row, VQARecord]],
    out: Collector,
    max_question_tokens: int | None,
    tokenizer: Any,
) -> None:
    """Warn about questions the pipeline will truncate (or, without a limit, very long ones)."""
    if not rows:
        return
    if max_question_tokens is None:
        for row, record in rows:
            if len(record.question) > LONG_QUESTION_CHARS:
                out.warning(
                    "long question",
                    f"question is {len(record.question)} characters long (over "
                    f"{LONG_QUESTION_CHARS}); it will probably be truncated (give a tokenizer "
                    "and max_question_tokens to know)",
                    row,
                    "question",
                )
        return
    if tokenizer is None:
        # Every whitespace word is at least one subword token.
        lengths = [len(record.question.split()) for _, record in rows]
        unit = "words, so at least as many tokens"
    else:
        questions = [record.question for _, record in rows]
        try:
            # The same call as data.pipeline.encode_split, so the counts agree.
            lengths = [
                len(ids) for ids in tokenizer(questions, add_special_tokens=True)["input_ids"]
            ]
        except Exception as err:  # any tokenizer failure would also stop training
            out.error(
                "tokenizer", f"the tokenizer failed on the questions: {err}", None, "question"
            )
            return
        unit = "tokens"
    for (row, _), length in zip(rows, lengths, strict=True):
        if length > max_question_tokens:
            out.warning(
                "long question",
                f"question has {length} {unit}; will be truncated to {max_question_tokens} tokens",
                row,
                "question",
            )


def check_file(
    path: str | Path,
    fmt: str = "auto",
    language: str | None = None,
    max_question_tokens: int | None = None,
    tokenizer: Any = None,
) -> tuple[list[VQARecord], list[Problem]]:
    """Read one annotation file tolerantly: (its valid records, every problem found).

    Never raises for bad data. A structural problem (missing or misspelled columns or keys,
    unreadable file, invalid JSON document) is one file-level error and stops the file;
    otherwise every row is checked field by field and rows with an error are left out.
    ``fmt`` and ``language`` are those of :func:`vqadapt.data.formats.load_records`;
    ``tokenizer`` (a Hugging Face tokenizer) and ``max_question_tokens`` say which
    questions the pipeline will truncate.
    """
    out = Collector(path)
    rows = parse_file(path, fmt, language, out)
    _check_question_lengths(rows, out, max_question_tokens, tokenizer)
    return [record for _, record in rows], out.problems


# --------------------------------------------------------------------------- images


def _inspect_image(path: Path) -> tuple[str | None, str, str, str]:
    """(mode, kind, why it cannot be loaded, warning): empty strings when all is well.

    Opens the file twice, as PIL requires after ``verify()``: once to verify the
    structure and checksums, once to decode the pixels (a truncated JPEG passes verify).
    """
    try:
        if path.stat().st_size == 0:
            return None, "empty image file", "empty image file (0 bytes)", ""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                mode, (width, height) = image.mode, image.size
                image.verify()
            with Image.open(path) as image:
                image.draft(None, (THUMBNAIL, THUMBNAIL))
                image.load()
                ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        return None, "image too large", f"image too large (decompression-bomb guard): {err}", ""
    except UnidentifiedImageError:
        return None, "not an image", "not an image: PIL cannot identify the file's format", ""
    except Exception as err:  # decoders raise many types on corrupt bytes, not only OSError
        return None, "unreadable image", f"cannot read image (corrupt or truncated): {err}", ""
    if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
        return (
            mode,
            "",
            "",
            (
                f"very large image ({width} x {height} = {width * height} pixels, over PIL's "
                f"limit of {Image.MAX_IMAGE_PIXELS}): it loads, but slowly and with much memory"
            ),
        )
    return mode, "", "", ""


def _used_by(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5])
    more = f" and {len(ids) - 5} more" if len(ids) > 5 else ""
    return f"used by {len(ids)} question(s): ids {shown}{more}"


def check_images(
    records: Iterable[VQARecord],
    image_root: str | Path,
    on_bad_image: str = "error",
    counts: dict | None = None,
) -> tuple[list[Problem], list[str]]:
    """Resolve and open every distinct referenced image once: (problems, skipped refs).

    Missing files, references that escape the root (refused, never opened), empty,
    truncated, corrupt and non-image files, and images over PIL's decompression-bomb limit
    are errors; with ``on_bad_image="skip"`` they are warnings and their references are
    returned so the caller can drop those questions. Images just over PIL's warning limit
    get a warning. Any mode (grayscale, CMYK, RGBA, 16-bit) is fine: it is counted in
    ``counts["modes"]`` when a ``counts`` dict is given (it also gets ``counts["images"]``).
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise VQAConfigError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
    bad_severity = ERROR if on_bad_image == "error" else WARNING
    skip_note = "; its questions are skipped" if on_bad_image == "skip" else ""
    users: dict[str, list[str]] = {}
    for record in records:
        if record.image is not None:
            users.setdefault(record.image, []).append(record.id)
    root = Path(image_root)
    problems: list[Problem] = []
    try:
        index = ImageIndex(root)
    except VQADataError as err:
        return [Problem(str(root), None, None, err.message, ERROR, "image root")], []
    except OSError as err:
        message = f"cannot scan the image root: {err}"
        return [Problem(str(root), None, None, message, ERROR, "image root")], []

    refs_by_path: dict[Path, list[str]] = {}
    skipped: list[str] = []
    for ref in sorted(users):
        path, reason = index.lookup(ref)
        if path is None:
            kind = "image reference refused" if reason in REFUSED_REASONS else "image missing"
            message = f"{reason}: {ref!r} ({_used_by(users[ref])}){skip_note}"
            problems.append(Problem(str(root), None, "image", message, bad_severity, kind))
            skipped.append(ref)
        else:
            refs_by_path.setdefault(path, []).append(ref)

    modes: Counter[str] = Counter()
    readable = 0
    for path, refs in refs_by_path.items():
        mode, kind, failure, warning = _inspect_image(path)
        ids = [i for ref in refs for i in users[ref]]
        named = ", ".join(repr(ref) for ref in refs)
        if failure:
            message = f"{failure} (image {named}, {_used_by(ids)}){skip_note}"
            problems.append(Problem(str(path), None, None, message, bad_severity, kind))
            skipped += refs
            continue
        readable += 1
        modes[mode or "?"] += 1
        if warning:
            message = f"{warning} (image {named}, {_used_by(ids)})"
            problems.append(Problem(str(path), None, None, message, WARNING, "very large image"))
    if counts is not None:
        counts["images"] = {
            "referenced": len(users),
            "readable": readable,
            "bad": len(problems) - sum(p.kind == "very large image" for p in problems),
            "skipped_questions": sum(len(users[ref]) for ref in skipped)
            if on_bad_image == "skip"
            else 0,
        }
        counts["modes"] = dict(sorted(modes.items()))
    return problems, sorted(skipped) if on_bad_image == "skip" else []


# -------------------------------------------------------------------------- data set


def _shared_ids(files: list[tuple[str, list[VQARecord]]]) -> list[Problem]:
    problems = []
    for i, (first, first_records) in enumerate(files):
        first_ids = {r.id for r in first_records}
        for second, second_records in files[i + 1 :]:
            shared = sorted(first_ids & {r.id for r in second_records}, key=lambda i: (len(i), i))
            if shared:
                examples = ", ".join(repr(s) for s in shared[:5])
                problems.append(
                    Problem(
                        second,
                        None,
                        "id",
                        f"{len(shared)} id(s) also used in {first} (e.g. {examples}); "
                        "predictions and reports keyed by id alone will mix the files",
                        WARNING,
                        "id in several files",
                    )
                )
    return problems


def _check_answer_weights(path: str | Path, train: Sequence[VQARecord]) -> list[Problem]:
    try:
        _, report = load_answer_weights(path, [r.answer for r in train])
    except VQADataError as err:
        file = err.file or str(path)
        return [Problem(file, err.row, err.field, err.message, ERROR, "answer weights")]
    if not report["uncovered_answers"]:
        return []
    total = report["covered"] + report["uncovered_answers"]
    examples = ", ".join(repr(a) for a in report["examples"][:5])
    message = (
        f"{report['uncovered_answers']} of {total} distinct training answers "
        f"({report['uncovered_samples']} samples) have no weight and get 1.0 (e.g. {examples})"
    )
    return [Problem(str(path), None, None, message, WARNING, "answer weights coverage")]


def check_dataset(
    train_file: str | Path,
    test_file: str | Path | None = None,
    val_file: str | Path | None = None,
    image_root: str | Path | None = None,
    fmt: str = "auto",
    language: str | None = None,
    on_bad_image: str = "error",
    tokenizer: Any = None,
    max_question_tokens: int | None = None,
    answer_weights: str | Path | None = None,
) -> CheckReport:
    """Check every given file, the images they use, and the answer weights, in one go.

    Arguments mean what they mean for training (``DataConfig``); ``answer_weights`` is
    the path of an ``answer_weights.json``. Ids shared between the files are a warning.
    """
    problems: list[Problem] = []
    files: list[tuple[str, list[VQARecord]]] = []
    train: list[VQARecord] = []
    for name, path in (("train", train_file), ("val", val_file), ("test", test_file)):
        if path is None:
            continue
        records, found = check_file(path, fmt, language, max_question_tokens, tokenizer)
        problems += found
        files.append((str(path), records))
        if name == "train":
            train = records
    problems += _shared_ids(files)
    counts: dict = {"records": {file: len(records) for file, records in files}}
    skipped: list[str] = []
    if image_root is not None:
        every_record = [r for _, records in files for r in records]
        found, skipped = check_images(every_record, image_root, on_bad_image, counts)
        problems += found
    if answer_weights is not None:
        problems += _check_answer_weights(answer_weights, train)
    kinds = Counter(f"{p.severity}: {p.kind}" for p in problems)
    counts["errors"] = sum(p.severity == ERROR for p in problems)
    counts["warnings"] = len(problems) - counts["errors"]
    counts["kinds"] = dict(sorted(kinds.items()))
    return CheckReport(problems, counts, skipped)

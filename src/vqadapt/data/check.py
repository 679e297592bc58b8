"""Check a whole data set before training and report every problem at once.

The loaders in :mod:`vqadapt.data.formats` stop at the first bad row, which is right for
training but slow for fixing a file: one run per problem. :func:`check_dataset` reads the
annotation files tolerantly, opens every referenced image once, validates the answer
weights, and returns a :class:`CheckReport` with all problems, each naming the file, the
row and the field like :class:`vqadapt.errors.VQADataError` does. Rows are numbered as
the loaders number them (CSV data rows from 1, JSONL lines from 1, JSON annotation
indices from 0). A file without errors yields exactly the records ``load_records`` returns.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from vqadapt.data.formats import (
    _BY_EXTENSION,
    FORMATS,
    VIVQA_COLUMNS,
    _check_header,
    _jsonl_type,
    annotation_items,
)
from vqadapt.data.images import REFUSED_REASONS, ImageIndex
from vqadapt.data.records import QUESTION_TYPES, VQARecord
from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.text import nfc, normalize
from vqadapt.weights import load_answer_weights

ERROR, WARNING = "error", "warning"
LONG_QUESTION_CHARS = 500
"""Without a tokenizer, questions longer than this (characters) get a warning."""
MISSING_MARKERS = ("nan", "<na>")
"""Cell texts (lowercased) that are a missing value written out by pandas, not data."""
THUMBNAIL = 64
"""JPEGs are decoded at reduced scale (>= this size): every byte is still read, 8x faster."""
ON_BAD_IMAGE = ("error", "skip")

_Row = int | str | None


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: where (file, row, field), what (message), and how bad (severity).

    ``kind`` is a short label (``"empty answer"``) used to group and count problems.
    """

    file: str
    row: _Row
    field: str | None
    message: str
    severity: str
    kind: str = ""

    def __post_init__(self) -> None:
        if self.severity not in (ERROR, WARNING):
            raise ValueError(f"severity must be {ERROR!r} or {WARNING!r}, got {self.severity!r}")

    def __str__(self) -> str:
        where = [self.file] if self.file else []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


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


# ------------------------------------------------------------------------------ helpers


def _printable(text: str) -> str:
    """Escape lone surrogates (undecodable bytes) so the text can be printed as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _problem(
    file: str | Path, row: _Row, field: str | None, message: str, severity: str, kind: str
) -> Problem:
    """A Problem whose texts are printable even when they quote undecodable bytes."""
    row = _printable(row) if isinstance(row, str) else row
    field = _printable(field) if field is not None else None
    return Problem(_printable(str(file)), row, field, _printable(message), severity, kind)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


class _Collector:
    """Problems found in one file, plus what it knows about undecodable bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[Problem] = []
        self.bad_bytes_at: tuple[int, int] | None = None  # (line, byte) of the first one
        self.bad_bytes_reported = False
        self.errors = 0  # counted as they come: rows compare it before and after their checks

    def add(self, severity: str, kind: str, message: str, row: _Row, field: str | None) -> None:
        self.problems.append(_problem(self.path, row, field, message, severity, kind))
        self.errors += severity == ERROR

    def error(self, kind: str, message: str, row: _Row = None, field: str | None = None) -> None:
        self.add(ERROR, kind, message, row, field)

    def warning(self, kind: str, message: str, row: _Row = None, field: str | None = None) -> None:
        self.add(WARNING, kind, message, row, field)

    def from_error(self, kind: str, err: VQADataError) -> None:
        self.error(kind, err.message, err.row, err.field)

    def bad_unicode(self, text: str, row: _Row, field: str | None) -> bool:
        """Record undecodable bytes / lone surrogates in ``text``; True when there were any."""
        char = next((c for c in text if "\ud800" <= c <= "\udfff"), None)
        if char is None:
            return False
        if self.bad_bytes_at is not None and "\udc80" <= char <= "\udcff":
            self.bad_bytes_reported = True
            self.error(
                "not UTF-8",
                f"not valid UTF-8: byte 0x{ord(char) - 0xDC00:02x} (the file is probably in "
                "another encoding such as Latin-1 or Windows-1258; re-save it as UTF-8)",
                row,
                field,
            )
        else:
            self.error("invalid Unicode", f"invalid Unicode: lone surrogate {char!r}", row, field)
        return True


def _did_you_mean(missing: Iterable[str], found: Iterable[str]) -> str:
    candidates = {name.strip().lower(): name for name in found if isinstance(name, str)}
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
        if close:
            hints.append(f"{candidates[close[0]]!r} for {name!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _missing_hint(text: str) -> str:
    if not text or text.lower() in MISSING_MARKERS:
        return " (a missing value)"
    if re.fullmatch(r"\d+\.0", text):
        return " (written as a float: pandas does this to a column with missing values)"
    return ""


def _text(value: Any, out: _Collector, row: _Row, field: str) -> str | None:
    """The NFC text of a required text field, or None after recording why it is bad."""
    if isinstance(value, float) and math.isnan(value):
        out.error("missing value (NaN)", "missing value (NaN)", row, field)
        return None
    if not isinstance(value, str):
        out.error("not text", f"expected text, got {_short(value)}", row, field)
        return None
    if out.bad_unicode(value, row, field):
        return None
    stripped = value.strip()
    text = nfc(stripped)
    if not text:
        out.error(f"empty {field}", f"empty {field}", row, field)
        return None
    if text.lower() in MISSING_MARKERS:
        out.error(
            "missing value (NaN)",
            f"{stripped!r} is a missing value written as text (pandas writes NaN this way); "
            "fill it in or drop the row",
            row,
            field,
        )
        return None
    if text != stripped:
        out.warning("not NFC", "not NFC; normalised on load", row, field)
    return text


def _answer(value: Any, out: _Collector, row: _Row, field: str) -> str | None:
    text = _text(value, out, row, field)
    if text is not None and not normalize(text):
        out.error(
            "answer without letters or digits",
            f"answer {text!r} is only punctuation and whitespace (it normalises to '')",
            row,
            field,
        )
        return None
    return text


def _scan_unicode(obj: dict, out: _Collector, row: _Row, skip: Iterable[str]) -> bool:
    """Check keys and nested string values outside ``skip``; True when any were bad."""
    bad = False
    for key, value in obj.items():
        if key in skip:
            continue
        bad = out.bad_unicode(key, row, None) or bad
        stack = [value]  # a loop, not recursion: JSON may nest as deep as the parser allows
        while stack:
            item = stack.pop()
            if isinstance(item, str):
                bad = out.bad_unicode(item, row, key) or bad
            elif isinstance(item, list):
                stack += item
            elif isinstance(item, dict):
                stack += [*item.keys(), *item.values()]
    return bad


def _duplicate(
    record_id: str, seen: dict[str, _Row], out: _Collector, row: _Row, field: str = "id"
) -> bool:
    if record_id in seen:
        out.error(
            "duplicate id",
            f"duplicate id {record_id!r} (first used on row {seen[record_id]})",
            row,
            field,
        )
        return True
    seen[record_id] = row
    return False


# --------------------------------------------------------------------------- reading


def _read(path: Path, out: _Collector) -> str | None:
    """The file's text (BOM dropped, bad bytes kept as lone surrogates), or None."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        out.error("cannot read file", "file not found")
        return None
    except IsADirectoryError:
        out.error("cannot read file", "expected a file, found a directory")
        return None
    except OSError as err:
        out.error("cannot read file", f"cannot read file: {err.strerror}")
        return None
    if not data.strip():
        out.error("empty file", "empty file")
        return None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        out.error(
            "not UTF-8",
            "the file is UTF-16 (it starts with a UTF-16 byte order mark); re-save it as UTF-8",
        )
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        out.bad_bytes_at = (data[: err.start].count(b"\n") + 1, data[err.start])
    # Keep going: each undecodable byte becomes one lone surrogate that the field checks
    # find, so every bad row is named, not only the first.
    return data.decode("utf-8-sig", "surrogateescape")


def _resolve_format(path: Path, fmt: str, language: str | None, out: _Collector) -> str | None:
    if fmt == "auto":
        fmt = _BY_EXTENSION.get(path.suffix.lower(), "")
        if not fmt:
            out.error(
                "unknown format",
                f"unknown file extension {path.suffix!r}; expected one of "
                f"{sorted(_BY_EXTENSION)} or pass a format ({', '.join(FORMATS)})",
            )
            return None
    elif fmt not in FORMATS:
        out.error("unknown format", f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
        return None
    if language is not None and fmt != "json":
        out.error(
            "language filter",
            f"a language filter only applies to JSON files, not {fmt}",
            field="language",
        )
        return None
    return fmt


# ------------------------------------------------------------------------------- CSV


def _csv_rows(text: str, out: _Collector) -> list[tuple[int, list[str]]]:
    """Non-blank rows numbered like the loader (header = 0); malformed ones are reported."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows, number = [], -1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return rows
        except csv.Error as err:
            number += 1
            out.error("malformed CSV", f"malformed CSV: {err}", row=number)
            continue
        if row and any(cell.strip() for cell in row):
            number += 1
            rows.append((number, row))


def _csv_record(
    row: list[str],
    number: int,
    names: list[str],
    index_pos: int | None,
    out: _Collector,
    seen: dict[str, _Row],
) -> VQARecord | None:
    """One data row checked field by field; the record when every field is good."""
    if len(row) != len(names):
        out.error(
            "field count",
            f"expected {len(names)} fields like the header, found {len(row)}",
            number,
        )
        return None
    errors_before = out.errors
    columns = {name: pos for pos, name in enumerate(names)}
    bad_cells = set()
    for pos, cell in enumerate(row):
        if names[pos] not in ("question", "answer"):
            field = "id" if pos == index_pos else names[pos] or f"column {pos + 1}"
            if out.bad_unicode(cell, number, field):
                bad_cells.add(pos)
    if index_pos is None:
        record_id = str(number - 1)
    else:
        record_id = row[index_pos].strip()
        if not record_id:
            out.error("empty id", "empty index value", number, "id")
    if record_id and index_pos not in bad_cells:
        _duplicate(record_id, seen, out, number)
    question = _text(row[columns["question"]], out, number, "question")
    answer = _answer(row[columns["answer"]], out, number, "answer")
    img_id = row[columns["img_id"]].strip()
    if columns["img_id"] not in bad_cells and not (img_id.isascii() and img_id.isdigit()):
        out.error(
            "bad img_id",
            f"img_id must be a non-negative integer, got {img_id!r}{_missing_hint(img_id)}",
            number,
            "img_id",
        )
    type_text = row[columns["type"]].strip()
    code = int(type_text) if type_text.isascii() and type_text.isdigit() else None
    if columns["type"] not in bad_cells and code not in QUESTION_TYPES:
        codes = ", ".join(f"{c} ({name})" for c, name in QUESTION_TYPES.items())
        out.error(
            "unknown type code",
            f"unknown type code {type_text!r}{_missing_hint(type_text)}; expected one of {codes}",
            number,
            "type",
        )
    if out.errors > errors_before or question is None or answer is None:
        return None
    assert code is not None
    return VQARecord(record_id, question, (answer,), img_id, QUESTION_TYPES[code])


def _parse_csv(text: str, out: _Collector, language: str | None) -> list[tuple[_Row, VQARecord]]:
    rows = _csv_rows(text, out)
    if not rows:
        out.error("empty file", "empty file")
        return []
    header = rows[0][1]
    try:
        index_pos = _check_header(header, out.path)
    except VQADataError as err:
        missing = [col for col in VIVQA_COLUMNS if col not in [n.strip() for n in header]]
        out.error("columns", err.message + _did_you_mean(missing, header), None, err.field)
        return []
    if len(rows) == 1:
        out.error("header only", "no data rows (the file has a header only)")
    names = [name.strip() for name in header]
    seen: dict[str, _Row] = {}
    records = []
    for number, row in rows[1:]:
        record = _csv_record(row, number, names, index_pos, out, seen)
        if record is not None:
            records.append((number, record))
    return records


# ------------------------------------------------------------------------------ JSON


def _keys_missing_everywhere(
    objects: Sequence[dict], required: Sequence[str | tuple[str, ...]], out: _Collector, what: str
) -> bool:
    """File-level error for each required key (or alternatives) that no object has."""
    if not objects:
        return False
    found: Counter[str] = Counter(k for obj in objects for k in obj if isinstance(k, str))
    stop = False
    for names in required:
        names = (names,) if isinstance(names, str) else names
        if not any(name in found for name in names):
            stop = True
            wanted = " or ".join(repr(n) for n in names)
            out.error(
                "columns",
                f"no {what} has the key {wanted}{_did_you_mean(names, found)}; "
                f"keys found: {sorted(found)[:12]}",
                field=names[0],
            )
    return stop


def _image_table(images: Any, out: _Collector) -> tuple[dict[str, str], set[str]] | None:
    """({image id: filename}, ids whose entry is bad) from either JSON form, or None."""
    table: dict[str, str] = {}
    bad: set[str] = set()
    entries: list[tuple[str, Any, str]] = []  # (image id, filename, where)
    if isinstance(images, list):
        seen: set[str] = set()
        for index, entry in enumerate(images):
            where = f"images[{index}]"
            if not isinstance(entry, dict) or "id" not in entry or "filename" not in entry:
                out.error("bad image entry", "image entries need 'id' and 'filename'", where)
                continue
            key = str(entry["id"])
            if key in seen:
                out.error("duplicate id", f"duplicate image id {key}", where, "id")
                continue
            seen.add(key)
            entries.append((key, entry["filename"], where))
    elif isinstance(images, dict):
        for key, value in images.items():
            filename = value.get("filename") if isinstance(value, dict) else value
            entries.append((str(key), filename, f"images[{key}]"))
    else:
        out.error("columns", "'images' must be a list or an object", field="images")
        return None
    for key, filename, where in entries:
        text = _text(filename, out, where, "filename")
        if text is None:
            bad.add(key)
        else:
            table[key] = text
    return table, bad


def _json_record(
    ann: Any,
    default_id: str,
    row: _Row,
    images: tuple[dict[str, str], set[str]],
    out: _Collector,
    seen: dict[str, _Row],
) -> VQARecord | None:
    if not isinstance(ann, dict):
        out.error("not an object", "annotation must be an object", row)
        return None
    errors_before = out.errors
    _scan_unicode(ann, out, row, skip=("question", "answer"))
    _duplicate(str(ann["id"]) if "id" in ann else default_id, seen, out, row)
    for key in ("question", "answer", "image_id"):
        if key not in ann:
            out.error("missing field", f"missing field {key!r}", row, key)
    question = _text(ann["question"], out, row, "question") if "question" in ann else None
    answers: list[str | None] = []
    raw = ann.get("answer")
    if isinstance(raw, list):
        if not raw:
            out.error("empty answer", "empty answer list", row, "answer")
        answers = [_answer(a, out, row, "answer") for a in raw]
    elif "answer" in ann:
        answers = [_answer(raw, out, row, "answer")]
    table, bad_images = images
    image_key = str(ann.get("image_id"))
    if "image_id" in ann and image_key not in table and image_key not in bad_images:
        out.error(
            "image_id not listed",
            f"image_id {_short(ann['image_id'])} is not listed in 'images'",
            row,
            "image_id",
        )
    qtype = ann.get("question_type")
    if qtype is not None and not isinstance(qtype, str):
        out.error("not text", f"expected text, got {_short(qtype)}", row, "question_type")
    if out.errors > errors_before or question is None or image_key not in table:
        return None
    record_id = str(ann["id"]) if "id" in ann else default_id
    texts = tuple(a for a in answers if a is not None)
    return VQARecord(record_id, question, texts, table[image_key], qtype)


def _load_json(text: str, out: _Collector) -> tuple[bool, Any]:
    """(parsed, the document)."""
    try:
        return True, json.loads(text)
    except json.JSONDecodeError as err:
        out.error("not JSON", f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}")
    except (ValueError, RecursionError) as err:  # huge integers, deep nesting
        out.error("not JSON", f"cannot parse JSON: {err}")
    return False, None


def _parse_json(text: str, out: _Collector, language: str | None) -> list[tuple[_Row, VQARecord]]:
    parsed, data = _load_json(text, out)
    if not parsed:
        return []
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        found = sorted(k for k in data if isinstance(k, str)) if isinstance(data, dict) else None
        missing = [
            k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data
        ]
        shown = found if found is not None else type(data).__name__
        out.error(
            "columns",
            f"expected an object with 'images' and 'annotations', found {_short(shown, 120)}"
            + _did_you_mean(missing, found or []),
            field="annotations",
        )
        return []
    images = _image_table(data["images"], out)
    items = annotation_items(data["annotations"])
    if items is None:
        out.error("columns", "'annotations' must be a list or an object", field="annotations")
        return []
    if not items:
        out.error("columns", "no annotations", field="annotations")
        return []
    objects = [ann for _, _, ann in items if isinstance(ann, dict)]
    if _keys_missing_everywhere(objects, ("question", "answer", "image_id"), out, "annotation"):
        return []
    if language is not None and not any("language" in ann for ann in objects):
        out.error(
            "language filter",
            f"a language filter ({language!r}) was given but no annotation has a 'language' field",
            field="language",
        )
        return []
    if images is None:
        return []
    seen: dict[str, _Row] = {}
    valid, kept = 0, []
    for default_id, row, ann in items:
        record = _json_record(ann, default_id, row, images, out, seen)
        if record is None:
            continue
        valid += 1
        if language is None or ann.get("language") == language:
            kept.append((row, record))
    if valid and not kept:
        languages = sorted({str(ann.get("language")) for ann in objects})
        out.error(
            "language filter",
            f"no annotation has language {language!r} (found {languages})",
            field="language",
        )
    return kept


# ----------------------------------------------------------------------------- JSONL


def _jsonl_record(obj: dict, line: int, out: _Collector, seen: dict[str, _Row]) -> VQARecord | None:
    errors_before = out.errors
    _scan_unicode(obj, out, line, skip=("question", "answer", "answers", "image"))
    _duplicate(str(obj["id"]) if obj.get("id") is not None else str(line), seen, out, line)
    question = None
    if "question" not in obj:
        out.error("missing field", "missing field", line, "question")
    else:
        question = _text(obj["question"], out, line, "question")
    answers: list[str | None] = []
    if ("answer" in obj) == ("answers" in obj):
        out.error(
            "missing field",
            "give exactly one of 'answer' (text) or 'answers' (list)",
            line,
            "answer",
        )
    elif "answers" in obj:
        raw = obj["answers"]
        if not isinstance(raw, list) or not raw:
            out.error("empty answers", "'answers' must be a non-empty list", line, "answers")
        else:
            answers = [_answer(a, out, line, "answers") for a in raw]
    else:
        answers = [_answer(obj["answer"], out, line, "answer")]
    image = obj.get("image")
    if "image" not in obj:
        out.error("missing field", "missing field", line, "image")
    elif isinstance(image, int) and not isinstance(image, bool):
        image = str(image)
    elif image is not None:
        image = _text(image, out, line, "image")
    qtype = None
    try:
        qtype = _jsonl_type(obj.get("type"), out.path, line)
    except VQADataError as err:
        out.from_error("unknown type code", err)
    if out.errors > errors_before or question is None:
        return None
    record_id = str(obj["id"]) if obj.get("id") is not None else str(line)
    texts = tuple(a for a in answers if a is not None)
    return VQARecord(record_id, question, texts, image, qtype)


def _parse_jsonl(text: str, out: _Collector, language: str | None) -> list[tuple[_Row, VQARecord]]:
    objects: list[tuple[int, dict]] = []
    # splitlines() as the loader does, so line numbers agree with its errors.
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if not out.bad_unicode(line, line_number, None):
                out.error(
                    "not JSON", f"not valid JSON: {err.msg} at column {err.colno}", line_number
                )
            continue
        except (ValueError, RecursionError) as err:
            out.error("not JSON", f"cannot parse JSON: {err}", line_number)
            continue
        if not isinstance(obj, dict):
            out.error(
                "not an object",
                f"each line must be a JSON object, found {type(obj).__name__}",
                line_number,
            )
            continue
        objects.append((line_number, obj))
    if not objects and not out.problems:
        out.error("empty file", "no records (only blank lines)")
    required = ("question", ("answer", "answers"), "image")
    if _keys_missing_everywhere([o for _, o in objects], required, out, "line"):
        return []
    seen: dict[str, _Row] = {}
    records = []
    for line_number, obj in objects:
        record = _jsonl_record(obj, line_number, out, seen)
        if record is not None:
            records.append((line_number, record))
    return records


# ---------------------------------------------------------------------------- files

_PARSERS: dict[str, Callable[[str, _Collector, str | None], list[tuple[_Row, VQARecord]]]] = {
    "vivqa_csv": _parse_csv,
    "json": _parse_json,
    "jsonl": _parse_jsonl,
}


def _check_question_lengths(
    rows: list[tuple[_Row, VQARecord]],
    out: _Collector,
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
    path = Path(path)
    out = _Collector(path)
    rows: list[tuple[_Row, VQARecord]] = []
    fmt_name = _resolve_format(path, fmt, language, out)
    text = _read(path, out) if fmt_name is not None else None
    if fmt_name is not None and text is not None:
        rows = _PARSERS[fmt_name](text, out, language)
    if out.bad_bytes_at is not None and not out.bad_bytes_reported:
        line, byte = out.bad_bytes_at
        out.error(
            "not UTF-8",
            f"not valid UTF-8: byte 0x{byte:02x} on line {line} (re-save the file as UTF-8)",
        )
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
        return [_problem(root, None, None, err.message, ERROR, "image root")], []
    except OSError as err:
        message = f"cannot scan the image root: {err}"
        return [_problem(root, None, None, message, ERROR, "image root")], []

    refs_by_path: dict[Path, list[str]] = {}
    skipped: list[str] = []
    for ref in sorted(users):
        path, reason = index.lookup(ref)
        if path is None:
            kind = "image reference refused" if reason in REFUSED_REASONS else "image missing"
            message = f"{reason}: {ref!r} ({_used_by(users[ref])}){skip_note}"
            problems.append(_problem(root, None, "image", message, bad_severity, kind))
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
            problems.append(_problem(path, None, None, message, bad_severity, kind))
            skipped += refs
            continue
        readable += 1
        modes[mode or "?"] += 1
        if warning:
            message = f"{warning} (image {named}, {_used_by(ids)})"
            problems.append(_problem(path, None, None, message, WARNING, "very large image"))
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

"""Loaders for the annotation formats: ViVQA CSV, EVJVQA / OpenViVQA JSON, and JSONL.

Every loader returns ``list[VQARecord]`` with NFC text and raises
:class:`vqadapt.errors.VQADataError` naming the file, the row and the field for bad input.
Row numbers: CSV data rows counted from 1 (the header is not a row, blank lines are
skipped); JSONL physical line numbers from 1; JSON the annotation's list index (from 0) or
its key in the dict-keyed form.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vqadapt.data.records import QUESTION_TYPES, VQARecord
from vqadapt.errors import VQADataError
from vqadapt.text import nfc

VIVQA_COLUMNS = ("question", "answer", "img_id", "type")
"""Required ViVQA columns; an unnamed index column may come first."""

INDEX_COLUMN_NAMES = ("", "id", "index", "Unnamed: 0")
FORMATS = ("vivqa_csv", "json", "jsonl")
_TYPE_CODES = ", ".join(f"{code} ({name})" for code, name in QUESTION_TYPES.items())
_OTHER_DELIMITERS = {";": "';'", "\t": "a tab", "|": "'|'"}


def _read_text(path: Path, *, line_is_row_offset: int | None) -> str:
    """Read UTF-8 (BOM accepted); on bad bytes name the row via ``line - offset``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VQADataError("file not found", file=path) from None
    except IsADirectoryError:
        raise VQADataError("expected a file, found a directory", file=path) from None
    except OSError as err:
        raise VQADataError(f"cannot read file: {err.strerror}", file=path) from None
    if not data.strip():
        raise VQADataError("empty file", file=path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        row = None
        if line_is_row_offset is not None and line - line_is_row_offset >= 1:
            row = line - line_is_row_offset
        raise VQADataError(
            f"not valid UTF-8: byte 0x{data[err.start]:02x} on line {line} "
            "(re-save the file as UTF-8)",
            file=path,
            row=row,
        ) from None


def _text_field(value: Any, *, file: Path, row: int | str | None, field: str) -> str:
    if not isinstance(value, str):
        raise VQADataError(f"expected text, got {value!r}", file=file, row=row, field=field)
    text = nfc(value.strip())
    if not text:
        raise VQADataError(f"empty {field}", file=file, row=row, field=field)
    return text


# ----------------------------------------------------------------------------- ViVQA CSV


def _check_header(header: list[str], path: Path) -> int | None:
    """Validate the header; return the index column position (0) or None."""
    names = [name.strip() for name in header]
    missing = [col for col in VIVQA_COLUMNS if col not in names]
    if not missing:
        duplicated = sorted({n for n in names if names.count(n) > 1 and n in VIVQA_COLUMNS})
        if duplicated:
            raise VQADataError(
                f"column(s) {duplicated} appear more than once", file=path, field=duplicated[0]
            )
        return 0 if names[0] in INDEX_COLUMN_NAMES else None
    joined = ",".join(header)
    for delimiter, described in _OTHER_DELIMITERS.items():
        if delimiter in joined and len(header) < len(VIVQA_COLUMNS):
            raise VQADataError(
                f"the header {joined!r} looks like it uses {described} as the delimiter; "
                "ViVQA CSV files use ',' (expected header ',question,answer,img_id,type')",
                file=path,
                row=None,
                field=missing[0],
            )
    raise VQADataError(
        f"missing column(s) {missing}; expected columns {list(VIVQA_COLUMNS)} after an "
        f"optional unnamed index column, found {names}",
        file=path,
        field=missing[0],
    )


def load_vivqa_csv(path: str | Path) -> list[VQARecord]:
    """Load a ViVQA CSV (header ``,question,answer,img_id,type``).

    Rows in errors are data rows counted from 1: the header is not a row and blank lines are
    skipped. ``id`` is the index column value, or the 0-based data row position when the
    file has no index column (the same ids pandas would write). ``image`` is the ``img_id``
    text, ``qtype`` the type name from :data:`QUESTION_TYPES`.
    """
    path = Path(path)
    text = _read_text(path, line_is_row_offset=1)
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = _csv_rows(reader, path)
    first = next(rows, None)
    if first is None:
        raise VQADataError("empty file", file=path)
    header = first[1]
    index_pos = _check_header(header, path)
    columns = {name.strip(): pos for pos, name in enumerate(header)}

    records: list[VQARecord] = []
    seen_ids: dict[str, int] = {}
    for row_number, row in rows:
        if len(row) != len(header):
            raise VQADataError(
                f"expected {len(header)} fields like the header, found {len(row)}",
                file=path,
                row=row_number,
            )
        if index_pos is not None:
            record_id = row[index_pos].strip()
            if not record_id:
                raise VQADataError("empty index value", file=path, row=row_number, field="id")
        else:
            record_id = str(row_number - 1)
        if record_id in seen_ids:
            raise VQADataError(
                f"duplicate id {record_id!r} (first used on row {seen_ids[record_id]})",
                file=path,
                row=row_number,
                field="id",
            )
        seen_ids[record_id] = row_number
        question = _text_field(
            row[columns["question"]], file=path, row=row_number, field="question"
        )
        answer = _text_field(row[columns["answer"]], file=path, row=row_number, field="answer")
        img_id = row[columns["img_id"]].strip()
        if not img_id.isascii() or not img_id.isdigit():
            raise VQADataError(
                f"img_id must be a non-negative integer, got {img_id!r}",
                file=path,
                row=row_number,
                field="img_id",
            )
        type_text = row[columns["type"]].strip()
        code = int(type_text) if type_text.isascii() and type_text.isdigit() else None
        if code not in QUESTION_TYPES:
            raise VQADataError(
                f"unknown type code {type_text!r}; expected one of {_TYPE_CODES}",
                file=path,
                row=row_number,
                field="type",
            )
        records.append(VQARecord(record_id, question, (answer,), img_id, QUESTION_TYPES[code]))
    if not records:
        raise VQADataError("no data rows (the file has a header only)", file=path)
    return records


def _csv_rows(reader: Any, path: Path) -> Iterator[tuple[int, list[str]]]:
    """Non-blank CSV rows with their data-row number (header = 0), wrapping csv errors."""
    number = -1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise VQADataError(f"malformed CSV: {err}", file=path, row=number + 1) from None
        if not row or all(not cell.strip() for cell in row):
            continue
        number += 1
        yield number, row


# ------------------------------------------------------------------ EVJVQA / OpenViVQA JSON


def _image_table(images: Any, path: Path) -> dict[str, str]:
    """``{str(image id): filename}`` from the list form or the dict-keyed form."""
    table: dict[str, str] = {}
    if isinstance(images, list):
        for index, entry in enumerate(images):
            if not isinstance(entry, dict) or "id" not in entry or "filename" not in entry:
                raise VQADataError(
                    "image entries need 'id' and 'filename'", file=path, row=index, field="images"
                )
            key, filename = str(entry["id"]), entry["filename"]
            if key in table:
                raise VQADataError(f"duplicate image id {key}", file=path, row=index, field="id")
            table[key] = _text_field(filename, file=path, row=index, field="filename")
    elif isinstance(images, dict):
        for key, value in images.items():
            filename = value.get("filename") if isinstance(value, dict) else value
            table[str(key)] = _text_field(filename, file=path, row=None, field=f"images[{key}]")
    else:
        raise VQADataError("'images' must be a list or an object", file=path, field="images")
    return table


def _annotation_record(
    ann: Any, default_id: str, row: int | str, images: dict[str, str], path: Path
) -> VQARecord:
    if not isinstance(ann, dict):
        raise VQADataError("annotation must be an object", file=path, row=row)
    for key in ("question", "answer", "image_id"):
        if key not in ann:
            raise VQADataError(f"missing field {key!r}", file=path, row=row, field=key)
    question = _text_field(ann["question"], file=path, row=row, field="question")
    raw_answer = ann["answer"]
    if isinstance(raw_answer, list):
        if not raw_answer:
            raise VQADataError("empty answer list", file=path, row=row, field="answer")
        answers = tuple(_text_field(a, file=path, row=row, field="answer") for a in raw_answer)
    else:
        answers = (_text_field(raw_answer, file=path, row=row, field="answer"),)
    image_key = str(ann["image_id"])
    if image_key not in images:
        raise VQADataError(
            f"image_id {ann['image_id']!r} is not listed in 'images'",
            file=path,
            row=row,
            field="image_id",
        )
    qtype = ann.get("question_type")
    if qtype is not None and not isinstance(qtype, str):
        raise VQADataError(
            f"expected text, got {qtype!r}", file=path, row=row, field="question_type"
        )
    record_id = str(ann["id"]) if "id" in ann else default_id
    return VQARecord(record_id, question, answers, images[image_key], qtype)


def annotation_items(annotations: Any) -> list[tuple[str, int | str, Any]] | None:
    """(id, row, annotation) of the list form (row = index) or the dict-keyed form (row = key,
    an int when numeric); None when ``annotations`` is neither a list nor an object."""
    if isinstance(annotations, list):
        return [(str(i), i, ann) for i, ann in enumerate(annotations)]
    if isinstance(annotations, dict):
        return [
            (str(k), int(k) if str(k).isascii() and str(k).isdigit() else str(k), a)
            for k, a in annotations.items()
        ]
    return None


def load_vqa_json(path: str | Path, language: str | None = None) -> list[VQARecord]:
    """Load EVJVQA / OpenViVQA JSON (list form or dict-keyed form).

    ``image`` is the image's filename (looked up via ``image_id``), ``qtype`` the
    annotation's ``question_type`` (or None). ``language`` keeps annotations whose
    ``language`` field equals it. Error rows are the annotation's list index (from 0) or,
    in the dict-keyed form, its key when that is an integer (else the key is in the field).
    """
    path = Path(path)
    text = _read_text(path, line_is_row_offset=None)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise VQADataError(
            f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", file=path
        ) from None
    except (ValueError, RecursionError) as err:  # integers over 4300 digits, deep nesting
        raise VQADataError(f"cannot parse JSON: {err}", file=path) from None
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise VQADataError(
            f"expected an object with 'images' and 'annotations', found {found}",
            file=path,
            field="annotations",
        )
    images = _image_table(data["images"], path)
    items = annotation_items(data["annotations"])
    if items is None:
        raise VQADataError(
            "'annotations' must be a list or an object", file=path, field="annotations"
        )
    if not items:
        raise VQADataError("no annotations", file=path, field="annotations")
    if language is not None and not any(
        isinstance(ann, dict) and "language" in ann for _, _, ann in items
    ):
        raise VQADataError(
            f"a language filter ({language!r}) was given but no annotation has a 'language' field",
            file=path,
            field="language",
        )

    records: list[VQARecord] = []
    seen_ids: dict[str, int | str] = {}
    languages: set[str] = set()
    for default_id, row, ann in items:
        record = _annotation_record(ann, default_id, row, images, path)
        if record.id in seen_ids:
            raise VQADataError(
                f"duplicate annotation id {record.id!r} (first at {seen_ids[record.id]})",
                file=path,
                row=row,
                field="id",
            )
        seen_ids[record.id] = row
        if language is not None:
            languages.add(str(ann.get("language")))
            if ann.get("language") != language:
                continue
        records.append(record)
    if not records:
        raise VQADataError(
            f"no annotation has language {language!r} (found {sorted(languages)})",
            file=path,
            field="language",
        )
    return records


# ----------------------------------------------------------------------------------- JSONL


def _jsonl_type(value: Any, path: Path, line: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in QUESTION_TYPES:
        return QUESTION_TYPES[value]
    if isinstance(value, str) and value.strip() in QUESTION_TYPES.values():
        return value.strip()
    raise VQADataError(
        f"unknown type {value!r}; expected a code or name: {_TYPE_CODES}",
        file=path,
        row=line,
        field="type",
    )


def load_jsonl(path: str | Path) -> list[VQARecord]:
    """Load JSON Lines: one object per line with ``question``, ``answer`` (text) or
    ``answers`` (list), ``image`` (text, integer id or null), optional ``type`` (code or
    name) and ``id`` (default: the line number). Blank lines are skipped; rows in errors are
    line numbers from 1.
    """
    path = Path(path)
    text = _read_text(path, line_is_row_offset=0)
    records: list[VQARecord] = []
    seen_ids: dict[str, int] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise VQADataError(
                f"not valid JSON: {err.msg} at column {err.colno}", file=path, row=line_number
            ) from None
        except (ValueError, RecursionError) as err:  # integers over 4300 digits, deep nesting
            raise VQADataError(f"cannot parse JSON: {err}", file=path, row=line_number) from None
        if not isinstance(obj, dict):
            raise VQADataError(
                f"each line must be a JSON object, found {type(obj).__name__}",
                file=path,
                row=line_number,
            )
        if "question" not in obj:
            raise VQADataError("missing field", file=path, row=line_number, field="question")
        question = _text_field(obj["question"], file=path, row=line_number, field="question")
        if ("answer" in obj) == ("answers" in obj):
            raise VQADataError(
                "give exactly one of 'answer' (text) or 'answers' (list)",
                file=path,
                row=line_number,
                field="answer",
            )
        if "answers" in obj:
            raw = obj["answers"]
            if not isinstance(raw, list) or not raw:
                raise VQADataError(
                    "'answers' must be a non-empty list",
                    file=path,
                    row=line_number,
                    field="answers",
                )
            answers = tuple(
                _text_field(a, file=path, row=line_number, field="answers") for a in raw
            )
        else:
            answers = (_text_field(obj["answer"], file=path, row=line_number, field="answer"),)
        if "image" not in obj:
            raise VQADataError("missing field", file=path, row=line_number, field="image")
        image = obj["image"]
        if isinstance(image, int) and not isinstance(image, bool):
            image = str(image)
        elif image is not None:
            image = _text_field(image, file=path, row=line_number, field="image")
        record_id = str(obj["id"]) if obj.get("id") is not None else str(line_number)
        if record_id in seen_ids:
            raise VQADataError(
                f"duplicate id {record_id!r} (first on line {seen_ids[record_id]})",
                file=path,
                row=line_number,
                field="id",
            )
        seen_ids[record_id] = line_number
        qtype = _jsonl_type(obj.get("type"), path, line_number)
        records.append(VQARecord(record_id, question, answers, image, qtype))
    if not records:
        raise VQADataError("no records (only blank lines)", file=path)
    return records


# -------------------------------------------------------------------------------- dispatch

_BY_EXTENSION = {".csv": "vivqa_csv", ".json": "json", ".jsonl": "jsonl"}


def load_records(
    path: str | Path, fmt: str = "auto", language: str | None = None
) -> list[VQARecord]:
    """Load any supported file: ``fmt`` is ``"auto"`` (by extension: .csv, .json, .jsonl) or
    one of ``"vivqa_csv"``, ``"json"``, ``"jsonl"``. ``language`` applies to JSON only.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = _BY_EXTENSION.get(path.suffix.lower(), "")
        if not fmt:
            raise VQADataError(
                f"unknown file extension {path.suffix!r}; expected one of "
                f"{sorted(_BY_EXTENSION)} or pass a format ({', '.join(FORMATS)})",
                file=path,
            )
    elif fmt not in FORMATS:
        raise VQADataError(f"unknown format {fmt!r}; expected 'auto' or one of {FORMATS}")
    if not path.exists():
        raise VQADataError("file not found", file=path)
    if fmt == "json":
        return load_vqa_json(path, language=language)
    if language is not None:
        raise VQADataError(
            f"a language filter only applies to JSON files, not {fmt}", file=path, field="language"
        )
    return load_vivqa_csv(path) if fmt == "vivqa_csv" else load_jsonl(path)

"""JSON Lines: one object per line with ``question``, ``answer`` (text) or ``answers`` (list),
``image`` (text, integer id or null), optional ``type`` (code or name) and ``id`` (default: the
line number). Blank lines are skipped; rows are line numbers from 1 (``str.splitlines``).
"""

from __future__ import annotations

import json
from typing import Any

from vqadapt.data.parse.fields import (
    answer_field,
    first_use,
    keys_missing_everywhere,
    scan_unicode,
    short,
    text_field,
)
from vqadapt.data.parse.problems import Collector, Row
from vqadapt.data.records import QUESTION_TYPES, VQARecord

LINE_TO_ROW = 0
"""Rows are lines."""

_TYPE_CODES = ", ".join(f"{code} ({name})" for code, name in QUESTION_TYPES.items())


def parse(text: str, out: Collector) -> list[tuple[Row, VQARecord]]:
    """(line, record) for each line without an error; problems go to ``out``.

    A required key that no line has (misspelled, most likely) is one file-level error and
    keeps no record (lines that are not JSON objects are still named); otherwise every line
    is checked field by field.
    """
    # Parse every line first: a key that no line has is one problem, reported before the rows.
    lines = [
        (number, line, _load(line))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    if not lines:
        out.error("empty file", "no records (only blank lines)")
    required = ("question", ("answer", "answers"), "image")
    objects = [obj for _, _, obj in lines if isinstance(obj, dict)]
    stop = keys_missing_everywhere(objects, required, out, "line")
    seen: dict[str, Row] = {}
    records: list[tuple[Row, VQARecord]] = []
    for line_number, line, obj in lines:  # in line order, so a loader raises the first
        if not isinstance(obj, dict):
            _bad_line(obj, line, line_number, out)
        elif not stop and (record := _record(obj, line_number, out, seen)) is not None:
            records.append((line_number, record))
    return records


def _load(line: str) -> Any:
    """The line's JSON value, or the exception that parsing it raised."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as err:  # integers over 4300 digits, deep nesting
        return err


def _bad_line(value: Any, line: str, line_number: int, out: Collector) -> None:
    """Report a line that is not a JSON object (``value``: what :func:`_load` returned)."""
    if isinstance(value, json.JSONDecodeError):
        if not out.bad_unicode(line, line_number, None):
            message = f"not valid JSON: {value.msg} at column {value.colno}"
            out.error("not JSON", message, line_number)
    elif isinstance(value, (ValueError, RecursionError)):
        out.error("not JSON", f"cannot parse JSON: {value}", line_number)
    else:
        message = f"each line must be a JSON object, found {type(value).__name__}"
        out.error("not an object", message, line_number)


def _record(obj: dict, line: int, out: Collector, seen: dict[str, Row]) -> VQARecord | None:
    """One line's object checked field by field; the record when every field is good."""
    errors_before = out.errors
    scan_unicode(obj, out, line, skip=("question", "answer", "answers", "image"))
    question = None
    if "question" not in obj:
        out.error("missing field", "missing field", line, "question")
    else:
        question = text_field(obj["question"], out, line, "question")
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
            answers = [answer_field(a, out, line, "answers") for a in raw]
    else:
        answers = [answer_field(obj["answer"], out, line, "answer")]
    image = obj.get("image")
    if "image" not in obj:
        out.error("missing field", "missing field", line, "image")
    elif isinstance(image, int) and not isinstance(image, bool):
        image = str(image)
    elif image is not None:
        image = text_field(image, out, line, "image")
    record_id = str(obj["id"]) if obj.get("id") is not None else str(line)
    first_use(record_id, seen, out, line)
    qtype = _qtype(obj.get("type"), out, line)
    if out.errors > errors_before or question is None:
        return None
    texts = tuple(a for a in answers if a is not None)
    return VQARecord(record_id, question, texts, image, qtype)


def _qtype(value: Any, out: Collector, line: int) -> str | None:
    """The type name of a code or name; None when absent or after reporting it unknown."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value in QUESTION_TYPES:
        return QUESTION_TYPES[value]
    if isinstance(value, str) and value.strip() in QUESTION_TYPES.values():
        return value.strip()
    out.error(
        "unknown type code",
        f"unknown type {short(value)}; expected a code or name: {_TYPE_CODES}",
        line,
        "type",
    )
    return None

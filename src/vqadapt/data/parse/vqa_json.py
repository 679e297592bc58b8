"""EVJVQA / OpenViVQA JSON: ``{"images": [...], "annotations": [...]}`` or the dict-keyed form.

``image`` is the image's filename (looked up via ``image_id``), ``qtype`` the annotation's
``question_type`` (or None). Rows are the annotation's list index (from 0) or, in the
dict-keyed form, its key (an int when numeric); image entries are rows ``"images[i]"``.
"""

from __future__ import annotations

import json
from typing import Any

from vqadapt.data.parse.fields import (
    answer_field,
    did_you_mean,
    first_use,
    keys_missing_everywhere,
    scan_unicode,
    short,
    text_field,
)
from vqadapt.data.parse.problems import Collector, Row
from vqadapt.data.records import VQARecord

LINE_TO_ROW = None
"""Lines are not rows: undecodable bytes are named by line only."""

_ImageTable = tuple[dict[str, str], set[str]]


def parse(text: str, out: Collector, language: str | None) -> list[tuple[Row, VQARecord]]:
    """(row, record) for each annotation without an error that passes the ``language``
    filter (its ``language`` field equals it); problems go to ``out``.

    A structural problem (not JSON, no ``images`` / ``annotations``, a required key that no
    annotation has, a language filter that cannot apply) is one file-level error and stops
    the file; otherwise every annotation is checked field by field.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        out.error("not JSON", f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}")
        return []
    except (ValueError, RecursionError) as err:  # integers over 4300 digits, deep nesting
        out.error("not JSON", f"cannot parse JSON: {err}")
        return []
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        found = sorted(k for k in data if isinstance(k, str)) if isinstance(data, dict) else None
        missing = [
            k for k in ("images", "annotations") if not isinstance(data, dict) or k not in data
        ]
        shown = found if found is not None else type(data).__name__
        out.error(
            "columns",
            f"expected an object with 'images' and 'annotations', found {short(shown, 120)}"
            + did_you_mean(missing, found or []),
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
    if keys_missing_everywhere(objects, ("question", "answer", "image_id"), out, "annotation"):
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
    seen: dict[str, Row] = {}
    valid, kept = 0, []
    for default_id, row, ann in items:
        record = _record(ann, default_id, row, images, out, seen)
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


def annotation_items(annotations: Any) -> list[tuple[str, Row, Any]] | None:
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


def _image_table(images: Any, out: Collector) -> _ImageTable | None:
    """({image id: filename}, ids whose entry is bad) from either form, or None."""
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
        text = text_field(filename, out, where, "filename")
        if text is None:
            bad.add(key)
        else:
            table[key] = text
    return table, bad


def _record(
    ann: Any,
    default_id: str,
    row: Row,
    images: _ImageTable,
    out: Collector,
    seen: dict[str, Row],
) -> VQARecord | None:
    """One annotation checked field by field; the record when every field is good."""
    if not isinstance(ann, dict):
        out.error("not an object", "annotation must be an object", row)
        return None
    errors_before = out.errors
    scan_unicode(ann, out, row, skip=("question", "answer"))
    for key in ("question", "answer", "image_id"):
        if key not in ann:
            out.error("missing field", f"missing field {key!r}", row, key)
    question = text_field(ann["question"], out, row, "question") if "question" in ann else None
    answers: list[str | None] = []
    raw = ann.get("answer")
    if isinstance(raw, list):
        if not raw:
            out.error("empty answer", "empty answer list", row, "answer")
        answers = [answer_field(a, out, row, "answer") for a in raw]
    elif "answer" in ann:
        answers = [answer_field(raw, out, row, "answer")]
    table, bad_images = images
    image_key = str(ann.get("image_id"))
    if "image_id" in ann and image_key not in table and image_key not in bad_images:
        out.error(
            "image_id not listed",
            f"image_id {short(ann['image_id'])} is not listed in 'images'",
            row,
            "image_id",
        )
    qtype = ann.get("question_type")
    if qtype is not None and not isinstance(qtype, str):
        out.error("not text", f"expected text, got {short(qtype)}", row, "question_type")
    record_id = str(ann["id"]) if "id" in ann else default_id
    first_use(record_id, seen, out, row, what="annotation id")
    if out.errors > errors_before or question is None or image_key not in table:
        return None
    texts = tuple(a for a in answers if a is not None)
    return VQARecord(record_id, question, texts, table[image_key], qtype)

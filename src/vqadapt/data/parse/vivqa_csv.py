"""ViVQA CSV: header ``,question,answer,img_id,type`` (an unnamed index column first).

Rows are data rows counted from 1: the header is not a row and blank lines are skipped. ``id``
is the index column value, or the 0-based data row position when the file has no index column
(the same ids pandas would write). ``image`` is the ``img_id`` text, ``qtype`` the type name
from :data:`~vqadapt.data.records.QUESTION_TYPES`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from vqadapt.data.parse.fields import (
    answer_field,
    did_you_mean,
    first_use,
    missing_hint,
    text_field,
)
from vqadapt.data.parse.problems import Collector, Row
from vqadapt.data.records import QUESTION_TYPES, VQARecord

VIVQA_COLUMNS = ("question", "answer", "img_id", "type")
"""Required ViVQA columns; an unnamed index column may come first."""

INDEX_COLUMN_NAMES = ("", "id", "index", "Unnamed: 0")
LINE_TO_ROW = 1
"""Data row = line - 1 (the header line), for bytes the loader cannot decode; exact unless
blank lines or quoted line breaks come before."""

_TYPE_CODES = ", ".join(f"{code} ({name})" for code, name in QUESTION_TYPES.items())
_OTHER_DELIMITERS = {";": "';'", "\t": "a tab", "|": "'|'"}


def parse(text: str, out: Collector) -> list[tuple[Row, VQARecord]]:
    """(row, record) for each data row without an error; problems go to ``out``.

    A bad header (missing, misspelled or repeated columns, another delimiter) is one
    file-level error and stops the file; otherwise every row is checked field by field.
    """
    rows = _rows(text, out)
    first = next(rows, None)
    if first is None:
        out.error("empty file", "empty file")
        return []
    header = first[1]
    if header is None or not _header_ok(header, out):
        return []
    names = [name.strip() for name in header]
    index_pos = 0 if names[0] in INDEX_COLUMN_NAMES else None
    seen: dict[str, Row] = {}
    records: list[tuple[Row, VQARecord]] = []
    data_rows = 0
    for number, row in rows:
        data_rows += 1
        record = _record(row, number, names, index_pos, out, seen) if row is not None else None
        if record is not None:
            records.append((number, record))
    if not data_rows:
        out.error("header only", "no data rows (the file has a header only)")
    return records


def _rows(text: str, out: Collector) -> Iterator[tuple[int, list[str] | None]]:
    """Non-blank rows with their data-row number (header = 0); None for a malformed row,
    reported here."""
    reader = csv.reader(io.StringIO(text, newline=""))
    number = -1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            number += 1
            out.error("malformed CSV", f"malformed CSV: {err}", row=number)
            yield number, None
            continue
        if row and any(cell.strip() for cell in row):
            number += 1
            yield number, row


def _header_ok(header: list[str], out: Collector) -> bool:
    """Report a header without exactly one of each required column; True when it is good."""
    names = [name.strip() for name in header]
    missing = [col for col in VIVQA_COLUMNS if col not in names]
    if not missing:
        duplicated = sorted({n for n in names if names.count(n) > 1 and n in VIVQA_COLUMNS})
        if duplicated:
            message = f"column(s) {duplicated} appear more than once"
            out.error("columns", message, field=duplicated[0])
        return not duplicated
    hint = did_you_mean(missing, header)
    joined = ",".join(header)
    for delimiter, described in _OTHER_DELIMITERS.items():
        if delimiter in joined and len(header) < len(VIVQA_COLUMNS):
            message = (
                f"the header {joined!r} looks like it uses {described} as the delimiter; "
                "ViVQA CSV files use ',' (expected header ',question,answer,img_id,type')"
            )
            out.error("columns", message + hint, field=missing[0])
            return False
    message = (
        f"missing column(s) {missing}; expected columns {list(VIVQA_COLUMNS)} after an "
        f"optional unnamed index column, found {names}"
    )
    out.error("columns", message + hint, field=missing[0])
    return False


def _record(
    row: list[str],
    number: int,
    names: list[str],
    index_pos: int | None,
    out: Collector,
    seen: dict[str, Row],
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
        if names[pos] not in ("question", "answer"):  # those two get the text rules below
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
        first_use(record_id, seen, out, number)
    question = text_field(row[columns["question"]], out, number, "question")
    answer = answer_field(row[columns["answer"]], out, number, "answer")
    img_id = row[columns["img_id"]].strip()
    if columns["img_id"] not in bad_cells and not (img_id.isascii() and img_id.isdigit()):
        out.error(
            "bad img_id",
            f"img_id must be a non-negative integer, got {img_id!r}{missing_hint(img_id)}",
            number,
            "img_id",
        )
    type_text = row[columns["type"]].strip()
    code = int(type_text) if type_text.isascii() and type_text.isdigit() else None
    if columns["type"] not in bad_cells and code not in QUESTION_TYPES:
        out.error(
            "unknown type code",
            f"unknown type code {type_text!r}{missing_hint(type_text)}; "
            f"expected one of {_TYPE_CODES}",
            number,
            "type",
        )
    if out.errors > errors_before or question is None or answer is None or code is None:
        return None
    return VQARecord(record_id, question, (answer,), img_id, QUESTION_TYPES[code])

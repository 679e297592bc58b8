"""Loaders for the annotation formats: ViVQA CSV, EVJVQA / OpenViVQA JSON, and JSONL.

Every loader returns ``list[VQARecord]`` with NFC text and raises
:class:`vqadapt.errors.VQADataError` at the first problem, naming the file, the row and the
field. The parsing itself is in :mod:`vqadapt.data.parse` (one module per format), which the
data check (:mod:`vqadapt.data.check`) runs too, collecting every problem instead.
"""

from __future__ import annotations

from pathlib import Path

from vqadapt.config import FILE_FORMATS
from vqadapt.data.parse import jsonl, vivqa_csv, vqa_json
from vqadapt.data.parse.fields import read_text
from vqadapt.data.parse.problems import Collector, Row
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQADataError

FORMATS = FILE_FORMATS
BY_EXTENSION = {".csv": "vivqa_csv", ".json": "json", ".jsonl": "jsonl"}
_PARSERS = {"vivqa_csv": vivqa_csv, "json": vqa_json, "jsonl": jsonl}


def parse_file(
    path: str | Path, fmt: str, language: str | None, out: Collector
) -> list[tuple[Row, VQARecord]]:
    """(row, record) for each good row of any supported file; problems go to ``out``.

    ``fmt`` and ``language`` are those of :func:`load_records`. With a collecting ``out`` it
    never raises for bad data; a problem that stops the file (unknown format, unreadable
    file, bad header or document) leaves no records.
    """
    path = Path(path)
    fmt_name = _resolve_format(path, fmt, language, out)
    if fmt_name is None:
        return []
    parser = _PARSERS[fmt_name]
    text = read_text(path, out, parser.LINE_TO_ROW)
    if text is None:
        return []
    rows = vqa_json.parse(text, out, language) if parser is vqa_json else parser.parse(text, out)
    if out.bad_bytes is not None and not out.bad_bytes_reported:
        out.undecodable()  # in a part of the file no field rule reads
    return rows


def _resolve_format(path: Path, fmt: str, language: str | None, out: Collector) -> str | None:
    if fmt == "auto":
        fmt = BY_EXTENSION.get(path.suffix.lower(), "")
        if not fmt:
            out.error(
                "unknown format",
                f"unknown file extension {path.suffix!r}; expected one of "
                f"{sorted(BY_EXTENSION)} or pass a format ({', '.join(FORMATS)})",
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


def load_records(
    path: str | Path, fmt: str = "auto", language: str | None = None
) -> list[VQARecord]:
    """Load any supported file: ``fmt`` is ``"auto"`` (by extension: .csv, .json, .jsonl) or
    one of ``"vivqa_csv"``, ``"json"``, ``"jsonl"``. ``language`` applies to JSON only.
    """
    rows = parse_file(path, fmt, language, Collector(path, raise_first=True))
    if not rows:  # every parser reports a file without records; this is a safety net
        raise VQADataError("no records", file=path)
    return [record for _, record in rows]


def load_vivqa_csv(path: str | Path) -> list[VQARecord]:
    """Load a ViVQA CSV (see :mod:`vqadapt.data.parse.vivqa_csv`), whatever its extension."""
    return load_records(path, "vivqa_csv")


def load_vqa_json(path: str | Path, language: str | None = None) -> list[VQARecord]:
    """Load EVJVQA / OpenViVQA JSON (see :mod:`vqadapt.data.parse.vqa_json`); ``language``
    keeps the annotations whose ``language`` field equals it."""
    return load_records(path, "json", language)


def load_jsonl(path: str | Path) -> list[VQARecord]:
    """Load JSON Lines (see :mod:`vqadapt.data.parse.jsonl`)."""
    return load_records(path, "jsonl")

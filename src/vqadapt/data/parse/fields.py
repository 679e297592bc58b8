"""Rules every format shares: reading the bytes, text fields, answers, ids, key hints."""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vqadapt.data.parse.problems import Collector, Row
from vqadapt.text import nfc, normalize

MISSING_MARKERS = ("nan", "<na>")
"""Cell texts (lowercased) that are a missing value written out by pandas, not data."""


def read_text(path: Path, out: Collector, line_to_row: int | None) -> str | None:
    """The file's text (BOM dropped), or None after reporting why there is none.

    Undecodable bytes: a loader stops at the first, naming its line (and the row
    ``line - line_to_row`` when the format numbers rows by lines); the check keeps each one as
    a lone surrogate that the field rules find, so every bad row is named, not only the first.
    """
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
        line = data[: err.start].count(b"\n") + 1
        row = line - line_to_row if line_to_row is not None else None
        out.bad_bytes = (line, data[err.start], row if row is None or row >= 1 else None)
    if out.raise_first:
        out.undecodable()
    return data.decode("utf-8-sig", "surrogateescape")


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def did_you_mean(missing: Iterable[str], found: Iterable[str]) -> str:
    """`` (did you mean 'questoin' for 'question'?)`` for close names, else ``""``."""
    candidates = {name.strip().lower(): name for name in found if isinstance(name, str)}
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
        if close:
            hints.append(f"{candidates[close[0]]!r} for {name!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def missing_hint(text: str) -> str:
    """Why a cell that should hold an integer might not: pandas' ways of writing a gap."""
    if not text or text.lower() in MISSING_MARKERS:
        return " (a missing value)"
    if re.fullmatch(r"\d+\.0", text):
        return " (written as a float: pandas does this to a column with missing values)"
    return ""


def text_field(value: Any, out: Collector, row: Row, field: str) -> str | None:
    """The NFC text of a required text field, or None after reporting why it is bad."""
    if isinstance(value, float) and math.isnan(value):
        out.error("missing value (NaN)", "missing value (NaN)", row, field)
        return None
    if not isinstance(value, str):
        out.error("not text", f"expected text, got {short(value)}", row, field)
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


def answer_field(value: Any, out: Collector, row: Row, field: str) -> str | None:
    """A text field that must keep something after answer normalisation (EM and F1 compare
    normalised answers, so ``"?!"`` would match an empty prediction)."""
    text = text_field(value, out, row, field)
    if text is not None and not normalize(text):
        out.error(
            "answer without letters or digits",
            f"answer {text!r} is only punctuation and whitespace (it normalises to '')",
            row,
            field,
        )
        return None
    return text


def scan_unicode(obj: dict, out: Collector, row: Row, skip: Iterable[str]) -> bool:
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


def first_use(
    record_id: str, seen: dict[str, Row], out: Collector, row: Row, what: str = "id"
) -> None:
    """Report ``record_id`` when an earlier row used it; else remember this row."""
    if record_id in seen:
        out.error(
            "duplicate id",
            f"duplicate {what} {record_id!r} (first used on row {seen[record_id]})",
            row,
            "id",
        )
    else:
        seen[record_id] = row


def keys_missing_everywhere(
    objects: Sequence[dict], required: Sequence[str | tuple[str, ...]], out: Collector, what: str
) -> bool:
    """One file-level error for each required key (or alternatives) that no object has: a
    misspelled key is one problem, not one per row. True when any was missing."""
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
                f"no {what} has the key {wanted}{did_you_mean(names, found)}; "
                f"keys found: {sorted(found)[:12]}",
                field=names[0],
            )
    return stop

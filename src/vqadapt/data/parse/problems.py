"""What a parser reports (a :class:`Problem`) and what becomes of it (a :class:`Collector`)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from vqadapt.errors import VQADataError

ERROR, WARNING = "error", "warning"

_SURROGATE = re.compile("[\ud800-\udfff]")

Row = int | str | None
"""CSV data rows and JSONL lines from 1, JSON annotation indices from 0 or their dict keys;
``"images[3]"`` for a JSON image entry; None for the whole file."""


def printable(text: str) -> str:
    """Escape lone surrogates (undecodable bytes) so the text can be printed as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: where (file, row, field), what (message), and how bad (severity).

    ``kind`` is a short label (``"empty answer"``) used to group and count problems. Texts
    that quote undecodable bytes are escaped, so every problem can be printed.
    """

    file: str
    row: Row
    field: str | None
    message: str
    severity: str
    kind: str = ""

    def __post_init__(self) -> None:
        if self.severity not in (ERROR, WARNING):
            raise ValueError(f"severity must be {ERROR!r} or {WARNING!r}, got {self.severity!r}")
        for name in ("file", "row", "field", "message"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, printable(value))

    def __str__(self) -> str:
        return str(self.as_error())

    def as_error(self) -> VQADataError:
        """The same problem as the exception a loader raises (their texts read alike)."""
        return VQADataError(self.message, file=self.file or None, row=self.row, field=self.field)


class Collector:
    """Where a parser sends the problems of one file.

    With ``raise_first`` (the loaders) the first error is raised as ``VQADataError`` and
    warnings are kept; otherwise (the data check) every problem is kept in ``problems``.
    It also remembers the first undecodable byte, which the policies treat differently: a
    loader stops there (:func:`~vqadapt.data.parse.fields.read_text`), the check reads on and
    names every field that holds one.
    """

    def __init__(self, path: str | Path, *, raise_first: bool = False) -> None:
        self.path = Path(path)
        self.raise_first = raise_first
        self.problems: list[Problem] = []
        self.errors = 0  # counted as they come: rows compare it before and after their checks
        self.bad_bytes: tuple[int, int, Row] | None = None  # (line, byte, row) of the first
        self.bad_bytes_reported = False

    def add(self, severity: str, kind: str, message: str, row: Row, field: str | None) -> None:
        problem = Problem(str(self.path), row, field, message, severity, kind)
        if self.raise_first and severity == ERROR:
            raise problem.as_error() from None  # it says all; a decoder's traceback would not
        self.problems.append(problem)
        self.errors += severity == ERROR

    def error(self, kind: str, message: str, row: Row = None, field: str | None = None) -> None:
        self.add(ERROR, kind, message, row, field)

    def warning(self, kind: str, message: str, row: Row = None, field: str | None = None) -> None:
        self.add(WARNING, kind, message, row, field)

    def bad_unicode(self, text: str, row: Row, field: str | None) -> bool:
        """Record undecodable bytes / lone surrogates in ``text``; True when there were any."""
        found = _SURROGATE.search(text)
        if found is None:
            return False
        char = found.group()
        if self.bad_bytes is not None and "\udc80" <= char <= "\udcff":
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

    def undecodable(self) -> None:
        """Report the first undecodable byte by its line (a loader's error; the check's when no
        field it reads held one)."""
        assert self.bad_bytes is not None
        line, byte, row = self.bad_bytes
        self.bad_bytes_reported = True
        self.error(
            "not UTF-8",
            f"not valid UTF-8: byte 0x{byte:02x} on line {line} (re-save the file as UTF-8)",
            row,
        )

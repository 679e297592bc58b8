"""The one error type users see for bad input: it names the file, the row and the field."""

from __future__ import annotations

from pathlib import Path


class VQADataError(ValueError):
    """Bad input data or settings, with where it was found.

    ``str(err)`` reads like ``train.csv, row 12, field 'answer': empty answer``.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        row: int | str | None = None,
        field: str | None = None,
    ) -> None:
        self.file = str(file) if file is not None else None
        self.row = row
        self.field = field
        self.message = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class VQAConfigError(ValueError):
    """Contradictory or impossible settings, raised before any model loads."""


class VQATrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or gradients); the last good checkpoint is intact."""

"""The errors users see: each names the file, row, field, flag or value at fault.

Every error vqadapt raises for bad input, impossible settings or a run that cannot go on is a
``VQAError``; the command line prints its message and exits with its ``exit_code``, never a
traceback (``cli.main``).
"""

from __future__ import annotations

from pathlib import Path


class VQAError(Exception):
    """Base of every error meant for the user (not a bug): the CLI prints it, no traceback."""

    exit_code = 2


class VQADataError(VQAError, ValueError):
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


class VQAConfigError(VQAError, ValueError):
    """Contradictory or impossible settings, raised before any model loads."""


class VQABusyError(VQAConfigError):
    """Another live process holds the folder (its lock): nothing was changed.

    A distinct exit code, so that the ablation runner leaves a cell that another process is
    training alone instead of recording it as failed."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class VQATrainingError(VQAError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, disk full); the last complete
    checkpoint is intact."""

    exit_code = 3

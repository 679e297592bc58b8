"""Atomic writes: a reader never sees a half-written file (temp file + fsync + rename).

Every file gets the mode a plain ``open`` would give it (0666 less the umask): the temporary
file ``mkstemp`` makes is private (0600), and would otherwise make a run's atomically written
files unreadable to the group that can read its appended ones.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read without changing it where the OS tells (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file here."""
    return 0o666 & ~_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:  # name the file the user knows, not the temporary one
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> Path:
    text = json.dumps(value, ensure_ascii=False, indent=2, sort_keys=False) + "\n"
    return atomic_write_text(path, text)


def append_jsonl(path: str | Path, value: dict[str, Any]) -> None:
    """Append one line; a torn last line (killed mid-write) is skipped by ``read_jsonl``."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(value, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    path = Path(path)
    if not path.exists():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows

"""Folders written whole or not at all, and one writer per folder.

``swap_in`` is the one way a finished folder replaces another (checkpoints, runs replaced with
``--overwrite``, exports): it is built beside its place as ``.NAME.writing-<ns>``, the old one
is renamed aside to ``.NAME.old-<ns>``, the new one renamed into place, and the old one removed.
A kill at any point leaves either folder complete, and ``recover_swap`` (run by the next writer,
under the lock) puts things right: a missing folder gets its moved-aside copy back, leftovers are
removed.

``FolderLock`` is an OS lock (``flock``) on ``.NAME.lock`` beside the folder, held for as long
as a process writes the folder. The lock file lives beside the folder, not in it, so it stays
the same file when the folder is swapped. The OS releases the lock when its process dies (even
by ``kill -9``), so a lock is never stale; the file's text (pid, command, time) only serves the
refusal message, and a torn or foreign text changes nothing but that message. The last holder
removes the file, so no lock file outlives its run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vqadapt.errors import VQABusyError, VQAConfigError
from vqadapt.io import file_mode

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


# -- one writer -----------------------------------------------------------------------------
def lock_path(folder: str | Path) -> Path:
    """``.NAME.lock`` beside ``folder``, symlinks and ``..`` resolved, so that every spelling
    of the same folder meets the same lock."""
    real = Path(folder).resolve()
    return real.parent / f".{real.name}.lock"


class FolderLock:
    """An exclusive, non-blocking OS lock on one folder (see the module docstring).

    ``acquire`` raises ``VQABusyError`` naming the holder when a live process holds it.
    """

    def __init__(self, folder: str | Path, what: str = "folder") -> None:
        """``what`` names the folder's kind in the refusal (run, study, export)."""
        self.folder = Path(folder)
        self.path = lock_path(self.folder)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock_file(self.path)
            if not _try_lock(fd):
                holder = _read_holder(fd)
                os.close(fd)
                raise VQABusyError(
                    f"the {self.what} {self.folder} is in use by another process ({holder}): "
                    f"wait for it to finish or stop it. The lock is the OS's ({self.path}); it "
                    "ends with its process."
                )
            if _same_file(fd, self.path):
                break
            os.close(fd)  # released and removed by its last holder meanwhile: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock (a process that opened the removed file notices
        it is no longer the one at the path and opens the new one)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if _same_file(fd, self.path):
            with contextlib.suppress(OSError):
                self.path.unlink()
        _unlock(fd)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock (``pid ...``), or None when no live process does."""
    path = lock_path(folder)
    if not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read_holder(fd)
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    """The lock file, created if missing; never through a symlink, never a folder."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as err:
        raise VQAConfigError(
            f"cannot open the lock file {path} ({err.strerror}): it should be a plain file "
            "that vqadapt creates and removes; if it is something else, remove it"
        ) from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: lock the first byte
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder_text() -> str:
    command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    return f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command[:200]}\n"


def _read_holder(fd: int) -> str:
    """The holder's line, or a plain description when the file holds nothing readable."""
    try:
        text = os.pread(fd, 400, 0).decode("utf-8", errors="replace").strip()
    except OSError:
        text = ""
    line = text.splitlines()[0] if text else ""
    return line if line.startswith("pid ") else "a process that left no details"


# -- whole folders --------------------------------------------------------------------------
def staging_path(dest: str | Path) -> Path:
    """Where a new ``dest`` is built, beside it (same file system, so the rename is atomic)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.writing-{time.time_ns()}")


@contextlib.contextmanager
def staged(dest: str | Path) -> Iterator[Path]:
    """A fresh staging folder for ``dest``; removed if the block fails (``swap_in`` it inside
    the block to keep it)."""
    tmp = staging_path(dest)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(built: str | Path, dest: str | Path) -> Path:
    """Replace ``dest`` (if any) by the finished folder ``built``, so that some complete
    folder always exists: the old one is renamed aside first, removed last. Its files get the
    mode a plain ``open`` gives (``io.file_mode``)."""
    built, dest = Path(built), Path(dest)
    mode = file_mode()  # some writers (safetensors) make private files: one mode for all
    for path in built.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
    old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
    if dest.exists() or dest.is_symlink():
        dest.rename(old)
    built.rename(dest)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return dest


def recover_swap(dest: str | Path) -> Path:
    """Repair what a kill during ``staged`` / ``swap_in`` can leave, and return ``dest``.

    A kill between the two renames leaves no ``dest`` but a complete ``.NAME.old-*`` beside
    it: that one is put back. Half-written ``.NAME.writing-*`` folders are removed. Call it
    only while holding the folder's lock (the holder's own staging folder would go too).
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return dest
    for partial in dest.parent.glob(f".{dest.name}.writing-*"):
        shutil.rmtree(partial, ignore_errors=True)
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"))
    if not dest.exists() and olds:
        olds[-1].rename(dest)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (symlinks and ``..`` resolved)."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents

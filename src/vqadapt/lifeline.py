"""A child process that dies with its parent: the ablation runner's cells.

A runner killed with ``kill -9`` cannot stop its children, and an orphaned cell would go on
training while a rerun of the study starts the same cell again. The runner passes its pid in
``$VQADAPT_PARENT_PID``; the child then asks Linux to send it SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``), and elsewhere watches its parent from a thread (the portable
fallback: a process whose parent died is adopted by another, so ``getppid`` changes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

PARENT_ENV = "VQADAPT_PARENT_PID"
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5


def die_with_parent_from_env() -> None:
    """Follow ``$VQADAPT_PARENT_PID`` (set by the ablation runner for its cells), if present;
    the variable is removed so that no process this one starts inherits it."""
    value = os.environ.pop(PARENT_ENV, None)
    if value and value.isdigit():
        die_with_parent(int(value))


def die_with_parent(parent_pid: int) -> None:
    """End this process (SIGKILL) as soon as ``parent_pid``, its parent, is gone."""
    if sys.platform.startswith("linux") and _set_parent_death_signal():
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            _die()
        return
    if os.getppid() != parent_pid:
        _die()
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="lifeline").start()


def _set_parent_death_signal() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_SECONDS)
    _die()


def _die() -> None:
    with contextlib.suppress(OSError):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    os._exit(137)

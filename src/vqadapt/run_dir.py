"""A run directory: locked, claimed once its settings are checked, then status, metrics and
checkpoints.

Layout (``--output_dir``)::

    vqadapt_run.json         the marker: this folder is a vqadapt run (written first)
    config.yaml              resolved settings (enough to rebuild the model)
    status.json              running / success / failed (with the error and what was kept)
    metrics.jsonl            one line per epoch
    plan.txt                 the coverage table (what trains, per tower and layer)
    summary.json             best epoch, final metrics, parameter counts, wall time, code version
    predictions_val.jsonl    validation predictions of the best checkpoint
    predictions_test.jsonl   test predictions of the best checkpoint
    eval_<split>.json, eval_<split>_predictions.jsonl    written by ``vqadapt eval``
    best/  last/             checkpoints of trained weights only (see checkpoint.py)
    tensorboard/             TensorBoard event files

    ../.NAME.lock            the OS lock of the folder (folders.py), held while a process writes

A folder is a run only if it holds the marker: a folder that merely holds a ``config.yaml`` is
not one, and vqadapt never writes into (or replaces) a non-empty folder that is not a run.
Claiming writes nothing: the folder is made the run's (``begin``) only after the settings, the
data and the backbones were checked, so a run that fails validation leaves the folder as it
was. ``--overwrite`` builds the new run beside the old one and swaps it in; files in the old
folder that are not a run's own (a study's ``cell.yaml`` and ``train.log``, a user's notes) are
carried over, never deleted.

Only the main process writes; the other processes of a launch hold a read-only view.
"""

from __future__ import annotations

import errno
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import vqadapt
from vqadapt.config import RunConfig
from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.folders import FolderLock, is_inside, recover_swap, staged, swap_in
from vqadapt.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

MARKER = "vqadapt_run.json"
RUN_FILES = frozenset(
    {
        MARKER,
        "config.yaml",
        "status.json",
        "metrics.jsonl",
        "plan.txt",
        "summary.json",
        "predictions_val.jsonl",
        "predictions_test.jsonl",
        "best",
        "last",
        "tensorboard",
    }
)
"""A run's own files; ``eval_*`` files and checkpoint leftovers (``.best.*``, ``.last.*``)
are its own too (``is_run_file``)."""

# Settings that may differ when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = {
    "output_dir",  # a run moved or copied elsewhere resumes there
    "resume",
    "overwrite",
    "progress",
    "epochs",
    "eval_batch_size",
    "device",
    "speed_paths",
    "compile",
    "ddp_timeout",
    "log_every",
}
# May change together on resume when their product (the effective batch) stays: what an
# out-of-memory error tells the user to do.
BATCH_SHAPE = ("batch_size", "gradient_accumulation_steps")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from one of the run's files, or ``VQADataError`` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise VQADataError(f"damaged or unreadable ({err})", file=path) from None
    if not isinstance(value, dict):
        raise VQADataError("damaged: expected a JSON object", file=path)
    return value


def is_run_file(name: str) -> bool:
    """Whether a name in a run folder is one of the run's own files."""
    return (
        name in RUN_FILES
        or name.startswith(("eval_", ".best.", ".last."))
        or name.endswith(".tmp")  # an atomic write torn by a kill
    )


def is_run(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def enclosing_run(path: str | Path) -> Path | None:
    """The run folder ``path`` lies in (strictly below it), if any."""
    path = Path(path).resolve()
    return next((parent for parent in path.parents if is_run(parent)), None)


def settings_diff(saved: RunConfig, current: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs and matters for a resume."""
    old, new = saved.to_dict(), current.to_dict()
    diffs = [
        f"{key}: {old[section].get(key)!r} -> {value!r}"
        for section, values in new.items()
        for key, value in values.items()
        if key not in RESUMABLE_CHANGES and old[section].get(key) != value
    ]
    batch = [d for d in diffs if d.split(":")[0] in BATCH_SHAPE]
    if batch and _effective_batch(old["train"]) == _effective_batch(new["train"]):
        diffs = [d for d in diffs if d not in batch]
    return diffs


def _effective_batch(train: dict[str, Any]) -> Any:
    try:
        return train["batch_size"] * train["gradient_accumulation_steps"]
    except (KeyError, TypeError):
        return None


def check_output_dir(config: RunConfig) -> None:
    """Refuse an ``--output_dir`` that is a file, lies inside another run, or overlaps an
    input (data files, image root, answer weights, local backbone folders)."""
    out = Path(config.train.output_dir)
    if out.exists() and not out.is_dir():
        raise VQAConfigError(f"--output_dir {out} is a file, not a folder")
    outer = enclosing_run(out)
    if outer is not None:
        raise VQAConfigError(
            f"--output_dir {out} lies inside the run {outer}: a run is replaced whole, so a "
            "folder inside it would be lost; choose a folder outside any run"
        )
    d, m = config.data, config.model
    inputs = {
        "--train_file": d.train_file,
        "--test_file": d.test_file,
        "--val_file": d.val_file,
        "--image_root": d.image_root,
        "--answer_weights": config.train.answer_weights,
        "--vision_model": m.vision_model,
        "--text_model": m.text_model,
    }
    refuse_overlap("--output_dir", out, inputs)


def refuse_overlap(flag: str, out: Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder that is, holds, or lies inside one of ``inputs`` (flag ->
    path; only paths that exist count, so hub ids never match)."""
    for name, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        if is_inside(out, value):
            raise VQAConfigError(
                f"{flag} {out} lies inside the input {name} {value}: outputs never go among "
                "the inputs; choose another folder"
            )
        if is_inside(value, out):
            raise VQAConfigError(
                f"{flag} {out} holds the input {name} {value}: choose a folder that holds no input"
            )


class RunDirectory:
    """One run's folder. ``writer`` is False in every process but the main one."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.lock = FolderLock(self.path, "run")
        self._replace = False  # --overwrite of an existing run: build beside, swap in
        self._resuming = False

    # -- claiming -------------------------------------------------------------------------
    def claim(self, config: RunConfig) -> bool:
        """Lock the folder and decide how this run uses it (main process only); returns
        whether it resumes. Nothing is written here (see ``begin``).

        A folder holding a run is refused unless ``--resume`` (same settings) or
        ``--overwrite`` says what to do with it; a non-empty folder that is not a run is
        always refused."""
        out = self.path
        check_output_dir(config)
        self.lock.acquire()
        try:
            recover_swap(out)  # a kill while an earlier --overwrite swapped folders
            state = folder_state(out)
            t = config.train
            if state == "foreign":
                raise VQAConfigError(foreign_message(out, "--output_dir"))
            if t.resume:
                if state != "run":
                    raise VQAConfigError(
                        f"--resume: {out} holds no run to continue "
                        f"({'it does not exist' if not out.exists() else 'nothing was trained there'})"
                        "; start it without --resume"
                    )
                saved = RunConfig.load(out / "config.yaml", complete=True)
                diffs = settings_diff(saved, config)
                if diffs:
                    raise VQAConfigError(
                        f"{out} holds a run with other settings; differences: {'; '.join(diffs)}"
                    )
                self._resuming = True
                return True
            if state == "run":
                if not t.overwrite:
                    raise VQAConfigError(
                        f"{out} already holds a run: pass --resume to continue it or "
                        "--overwrite to replace it"
                    )
                self._replace = True
            return False
        except BaseException:
            self.release()
            raise

    def begin(self, config: RunConfig, plan: str) -> None:
        """Make the folder this run's, now that its settings, data and backbones were
        checked: the marker, the settings, the plan and a "running" status. A folder holding
        no run is written in place; an old run (``--overwrite``) is replaced whole by a new
        folder built beside it, carrying over the files that are not the run's own."""
        if not self.writer:
            return
        if self._replace:
            with staged(self.path) as tmp:
                self._write_start(tmp, config, plan)
                for entry in sorted(self.path.iterdir()):
                    if not is_run_file(entry.name):
                        entry.rename(tmp / entry.name)
                swap_in(tmp, self.path)
            self._replace = False
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_start(self.path, config, plan)

    def _write_start(self, folder: Path, config: RunConfig, plan: str) -> None:
        if not (folder / MARKER).is_file():
            atomic_write_json(
                folder / MARKER,
                {"vqadapt_run": 1, "created": now(), "vqadapt_version": vqadapt.__version__},
            )
        config.save(folder / "config.yaml")
        atomic_write_text(folder / "plan.txt", plan)
        atomic_write_json(
            folder / "status.json",
            {"status": "running", "error": None, "started": now(), "finished": None},
        )

    def release(self) -> None:
        """Let go of the folder's lock (the OS also does when the process ends)."""
        self.lock.release()

    @staticmethod
    def reserve(path: str | Path) -> Path:
        """Make ``path`` an empty run folder (the marker only) for a run to come: a study does
        this for a cell before it writes the cell's own files into it."""
        path = Path(path)
        if folder_state(path) == "foreign":
            raise VQAConfigError(foreign_message(path, "the cell folder"))
        path.mkdir(parents=True, exist_ok=True)
        if not is_run(path):
            atomic_write_json(path / MARKER, {"vqadapt_run": 1, "created": now()})
        return path

    # -- status ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Whether the run has a readable summary (a damaged one is rewritten on resume)."""
        try:
            read_json(self.path / "summary.json")
        except VQADataError:
            return False
        return True

    def summary(self) -> dict[str, Any]:
        return read_json(self.path / "summary.json")

    def _update_status(self, **values: Any) -> bool:
        """Merge ``values`` into status.json; False when it could not be written (a full
        disk): the caller says so instead of hiding the first error behind a second one."""
        if not self.writer or not is_run(self.path):
            return False
        status_file = self.path / "status.json"
        try:
            old = read_json(status_file)
        except VQADataError:
            old = {}
        try:
            atomic_write_json(status_file, {**old, **values, "finished": now()})
        except OSError:
            return False
        return True

    def failed(self, err: BaseException, kept: str | None = None) -> bool:
        values = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        if kept is not None:
            values["kept"] = kept
        return self._update_status(**values)

    def succeeded(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)
        self._update_status(status="success")

    def kept(self, checkpoint_epoch: int) -> str:
        """What a failure leaves, in words (``checkpoint_epoch``: the epoch of ``last/``)."""
        if checkpoint_epoch <= 0:
            return f"no epoch had finished, so {self.path} holds no checkpoint yet"
        return (
            f"kept: the checkpoint of epoch {checkpoint_epoch} in {self.last} (intact, "
            f"resumable), the best one so far in {self.best}, the metrics up to epoch "
            f"{checkpoint_epoch}"
        )

    # -- files ----------------------------------------------------------------------------
    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def last(self) -> Path:
        return self.path / "last"

    def file(self, name: str) -> Path:
        return self.path / name

    def recover_checkpoints(self) -> None:
        """Repair what a kill during a checkpoint swap left behind (main process)."""
        if self.writer:
            recover_swap(self.last)
            recover_swap(self.best)

    def write_text(self, name: str, text: str) -> None:
        if self.writer:
            atomic_write_text(self.path / name, text)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / "metrics.jsonl")

    def append_metrics(self, record: dict[str, Any]) -> None:
        if self.writer:
            append_jsonl(self.path / "metrics.jsonl", record)

    def trim_metrics(self, epoch: int) -> None:
        """Keep the metrics of epochs up to ``epoch`` (the checkpoint's): a kill between a
        metrics line and its checkpoint leaves a line that the resumed run recomputes."""
        if not self.writer:
            return
        path = self.path / "metrics.jsonl"
        if epoch == 0:
            path.unlink(missing_ok=True)
            return
        kept = [row for row in read_jsonl(path) if _epoch_of(row) <= epoch]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _epoch_of(row: dict[str, Any]) -> float:
    epoch = row.get("epoch")
    return epoch if isinstance(epoch, int) else float("inf")  # unreadable rows are dropped


def folder_state(path: Path) -> str:
    """``new`` (missing or empty), ``reserved`` (a run folder where nothing trained yet),
    ``run``, or ``foreign`` (holds files, but is no vqadapt run)."""
    if not path.exists():
        return "new"
    if not path.is_dir():
        return "foreign"
    if is_run(path):
        return "run" if (path / "config.yaml").exists() else "reserved"
    return "foreign" if any(path.iterdir()) else "new"


def foreign_message(path: Path, what: str) -> str:
    names = sorted(entry.name for entry in path.iterdir())[:4] if path.is_dir() else []
    legacy = ""
    if (path / "config.yaml").is_file() and (path / "status.json").is_file():
        legacy = (
            f" If it is a run made before vqadapt marked its runs, mark it by creating "
            f"{path / MARKER} (any content) and try again."
        )
    shown = f" ({', '.join(names)}{', ...' if len(names) == 4 else ''})" if names else ""
    return (
        f"{what} {path} is not a vqadapt run: it holds files{shown} but no {MARKER}. vqadapt "
        f"neither writes into nor replaces such a folder; choose a new or empty folder. "
        f"Nothing was changed.{legacy}"
    )


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)

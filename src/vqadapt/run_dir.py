"""A run directory: claimed once, then its status, metrics and checkpoints.

Layout (``--output_dir``)::

    config.yaml              resolved settings (enough to rebuild the model)
    status.json              running / success / failed
    metrics.jsonl            one line per epoch
    plan.txt                 the coverage table (what trains, per tower and layer)
    summary.json             best epoch, final metrics, parameter counts, wall time, code version
    predictions_val.jsonl    validation predictions of the best checkpoint
    predictions_test.jsonl   test predictions of the best checkpoint
    best/  last/             checkpoints of trained weights only (see checkpoint.py)
    tensorboard/             TensorBoard event files

Only the main process writes; the other processes of a launch hold a read-only view.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vqadapt.checkpoint import recover_checkpoint
from vqadapt.config import RunConfig
from vqadapt.errors import VQAConfigError
from vqadapt.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

# Settings that may differ when a run is resumed: they do not change what is trained.
RESUMABLE_CHANGES = {
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


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def settings_diff(saved: RunConfig, current: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs and matters for a resume."""
    old, new = saved.to_dict(), current.to_dict()
    return [
        f"{key}: {old[section].get(key)!r} -> {value!r}"
        for section, values in new.items()
        for key, value in values.items()
        if key not in RESUMABLE_CHANGES and old[section].get(key) != value
    ]


class RunDirectory:
    """One run's folder. ``writer`` is False in every process but the main one."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer

    # -- claiming -------------------------------------------------------------------------
    def claim(self, config: RunConfig) -> bool:
        """Make the folder this run's (main process only). Returns whether it resumes.

        A folder holding another run is refused unless ``--resume`` (same settings) or
        ``--overwrite`` says what to do with it."""
        out = self.path
        if not (out / "config.yaml").exists():
            out.mkdir(parents=True, exist_ok=True)
            return False
        if config.train.overwrite:
            shutil.rmtree(out)
            out.mkdir(parents=True)
            return False
        if not config.train.resume:
            raise VQAConfigError(
                f"{out} already holds a run: pass --resume to continue it or --overwrite to "
                "replace it"
            )
        diffs = settings_diff(RunConfig.load(out / "config.yaml"), config)
        if diffs:
            raise VQAConfigError(
                f"{out} holds a run with other settings; differences: {'; '.join(diffs)}"
            )
        return True

    def start(self, config: RunConfig) -> None:
        """Write the settings and a "running" status."""
        if self.writer:
            config.save(self.path / "config.yaml")
            atomic_write_json(
                self.path / "status.json",
                {"status": "running", "error": None, "started": now(), "finished": None},
            )

    # -- status ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return (self.path / "summary.json").exists()

    def summary(self) -> dict[str, Any]:
        return read_json(self.path / "summary.json")

    def _update_status(self, **values: Any) -> None:
        if self.writer:
            status_file = self.path / "status.json"
            old = read_json(status_file) if status_file.is_file() else {}
            atomic_write_json(status_file, {**old, **values, "finished": now()})

    def failed(self, err: BaseException) -> None:
        self._update_status(status="failed", error=f"{type(err).__name__}: {err}")

    def succeeded(self, summary: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_json(self.path / "summary.json", summary)
        self._update_status(status="success")

    # -- files ----------------------------------------------------------------------------
    @property
    def best(self) -> Path:
        return self.path / "best"

    @property
    def last(self) -> Path:
        return self.path / "last"

    def recover_checkpoints(self) -> None:
        """Repair what a kill during a checkpoint swap left behind (main process)."""
        if self.writer:
            recover_checkpoint(self.last)
            recover_checkpoint(self.best)

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
        kept = [row for row in read_jsonl(path) if row["epoch"] <= epoch]
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

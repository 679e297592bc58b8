"""What a run shows while it trains: its progress bars and its trackers (TensorBoard, wandb,
MLflow through accelerate's tracking API, ``--report_to``); the main process only."""

from __future__ import annotations

import contextlib
from typing import Any

from vqadapt.config import RunConfig
from vqadapt.run_dir import RunDirectory
from vqadapt.runtime import Runtime


def start_trackers(runtime: Runtime, config: RunConfig, run: RunDirectory, plan) -> None:
    """Start ``--report_to``'s trackers (accelerate's tracking API; the main process only)
    with the run's settings and parameter counts as their configuration."""
    if not runtime.accelerator.log_with:
        return
    values: dict[str, Any] = {}
    for section in config.to_dict().values():
        values.update({key: "null" if v is None else v for key, v in section.items()})
    values.update(trainable_params=plan.trainable, total_params=plan.total)
    runtime.accelerator.init_trackers(
        "vqadapt",
        config=values,
        init_kwargs={
            "wandb": {"name": run.path.name, "dir": str(run.path)},
            "mlflow": {"run_name": run.path.name},
        },
    )


def finish_trackers(runtime: Runtime) -> None:
    """Close the trackers of a run that ends early (their files complete, wandb synced)."""
    for tracker in runtime.accelerator.trackers:
        tracker.finish()
    runtime.accelerator.trackers = []


@contextlib.contextmanager
def library_progress_bars(enabled: bool):
    """transformers' and the hub's progress bars ("Loading weights") on or off for a block
    (``--no_progress`` turns every bar off, not only vqadapt's)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    if enabled == before:
        yield
        return
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def progress(items, description: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, dynamic_ncols=True, total=total)

"""Per-question losses of a finished cell's final model, for the overfitting claims.

A study measures overfitting as the **generalisation gap** of the model training ended with
(the ``last/`` checkpoint): its mean loss on held-out test questions minus its mean loss on
questions it trained on. Kept per question (``question_losses.json`` in the cell), two
cells' gaps can be compared with a paired bootstrap over questions, which a single seed
already allows (the epoch of overfitting onset needs several seeds to compare).

Losses are the per-question mean token cross-entropy in eval mode, unweighted: the same
quantity as the validation loss of ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from vqadapt.data.splits import sample_positions
from vqadapt.io import atomic_write_json

LOSSES_FILE = "question_losses.json"
MAX_TRAIN_QUESTIONS = 2000
"""Training questions scored: a fixed random sample of the cell's training split (a file
sorted by question type would give its first questions one type)."""


def per_question_losses(model, collator, positions: Sequence[int], batch_size: int) -> list[float]:
    """Per-sample mean token cross-entropy of the questions at ``positions`` of a split."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(positions), batch_size):
            batch = collator(list(positions[start : start + batch_size]))
            batch = {key: value.to(device) for key, value in batch.items()}
            out += model(batch, return_losses=True).float().tolist()
    return out


def write_question_losses(
    run_dir: str | Path, checkpoint: str = "last", max_train: int = MAX_TRAIN_QUESTIONS
) -> Path:
    """Score ``checkpoint`` of a finished run on its test split and on up to ``max_train``
    of its training questions; write ``question_losses.json`` (keyed by question id)."""
    from vqadapt.build import build_data
    from vqadapt.inference import load_run

    started = time.perf_counter()
    run_dir = Path(run_dir)
    run = load_run(run_dir, checkpoint=checkpoint, merge=True)
    data = build_data(
        run.config, run.model, run.tokenizer, run.preprocessing, run.backbones, log=lambda _: None
    )
    batch_size = run.config.train.eval_batch_size
    record: dict = {"checkpoint": checkpoint}
    for split, limit in (("test", None), ("train", max_train)):
        records = getattr(data.splits, split)
        positions = sample_positions(len(records), len(records) if limit is None else limit)
        losses = per_question_losses(run.model, data.collators[split], positions, batch_size)
        record[split] = {
            records[i].id: round(loss, 6) for i, loss in zip(positions, losses, strict=True)
        }
    last = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    record["epochs_run"] = last.get("epochs_run")
    record["seconds"] = round(time.perf_counter() - started, 1)
    path = run_dir / LOSSES_FILE
    atomic_write_json(path, record)
    return path

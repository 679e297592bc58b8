"""Evaluation: losses, generation, metrics and prediction files, on the model's device."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from vqadapt.data.records import VQARecord
from vqadapt.errors import VQATrainingError
from vqadapt.io import atomic_write
from vqadapt.metrics import breakdown, exact_match, f1, f1_set, score_predictions
from vqadapt.runtime import Runtime
from vqadapt.text import normalize


def model_runtime(model) -> Runtime:
    """fp32 on the model's own device: for callers that give no runtime."""
    return Runtime(next(model.parameters()).device, "no")


class AnswerTrie:
    """Prefix trie over the token ids of the training answers (for constrained decoding)."""

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int) -> None:
        self.root: dict = {}
        self.eos_id = eos_id
        for seq in sequences:
            node = self.root
            for token in seq:
                node = node.setdefault(int(token), {})

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        node = self.root
        for token in prefix:
            node = node.get(int(token))
            if node is None:
                return [self.eos_id]
        return list(node) or [self.eos_id]


@torch.no_grad()
def predict(
    model,
    collator,
    n: int,
    tokenizer,
    batch_size: int,
    max_new_tokens: int,
    num_beams: int = 1,
    trie: AnswerTrie | None = None,
    indices: Sequence[int] | None = None,
    runtime: Runtime | None = None,
) -> list[str]:
    """Greedy / beam answers of samples ``indices`` (default: all ``n``), in that order."""
    runtime = runtime or model_runtime(model)
    model.eval()
    outputs: list[str] = []
    kwargs = {"num_beams": num_beams, "do_sample": False}
    if trie is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda _, ids: trie.allowed(ids.tolist()[1:])
    order = list(range(n)) if indices is None else list(indices)
    for batch in _batches(collator, order, batch_size, runtime):
        with runtime.autocast():
            generated = model.generate(batch, max_new_tokens=max_new_tokens, **kwargs)
        outputs += [
            text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)
        ]
    return outputs


@torch.no_grad()
def summed_loss(
    model, collator, indices: Sequence[int], batch_size: int, runtime: Runtime | None = None
) -> float:
    """Sum of the per-sample losses of ``indices`` (unweighted; summed on the device, read
    once)."""
    runtime = runtime or model_runtime(model)
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=runtime.device)
    order = list(indices)
    for batch in _batches(collator, order, batch_size, runtime):
        with runtime.autocast():
            total += model(batch, return_losses=True).float().sum().double()
    return float(total)


def _batches(collator, order: list[int], batch_size: int, runtime: Runtime) -> Iterator[dict]:
    """The batches of ``order`` on the runtime's device: prepared ahead by the collator's
    loader (images decoded, cached rows read, in its workers), each through ``runtime.move``."""
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in collator.loader(chunks, device=runtime.device):
        yield runtime.move(batch)


def mean_loss(model, collator, n: int, batch_size: int, runtime: Runtime | None = None) -> float:
    """Unweighted mean per-sample loss (comparable across answer-weight settings)."""
    return summed_loss(model, collator, range(n), batch_size, runtime) / max(n, 1)


def process_share(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of ``indices`` (the shares of all ranks, in rank
    order, are ``indices`` again: nothing dropped, nothing duplicated)."""
    start = len(indices) * rank // world
    return indices[start : len(indices) * (rank + 1) // world]


def gather_objects(items: list[Any], runtime: Runtime) -> list[Any]:
    """The lists of all processes, concatenated in rank order (``gather_for_metrics``)."""
    if runtime.world == 1:
        return list(items)
    return list(runtime.accelerator.gather_for_metrics(items, use_gather_object=True))


def evaluate_split(
    model, data, split, tokenizer, config, train_counts, trie, runtime: Runtime | None = None
) -> dict[str, Any]:
    """Loss, predictions and scores of a split. With several processes each one evaluates
    its contiguous share and the shares are gathered in rank order (every sample once)."""
    runtime = runtime or model_runtime(model)
    collator = data.collators[split]
    n = len(data.encoded[split])
    t = config.train
    share = process_share(list(range(n)), runtime.rank, runtime.world)
    loss_sum = summed_loss(model, collator, share, t.eval_batch_size, runtime)
    predictions = predict(
        model,
        collator,
        n,
        tokenizer,
        t.eval_batch_size,
        config.data.max_answer_tokens,
        t.num_beams,
        trie,
        indices=share,
        runtime=runtime,
    )
    if runtime.world > 1:
        loss_sum = sum(gather_objects([loss_sum], runtime))
        predictions = gather_objects(predictions, runtime)
    if len(predictions) != n:
        raise VQATrainingError(f"{split}: gathered {len(predictions)} predictions for {n} samples")
    loss = loss_sum / max(n, 1)
    result = score(getattr(data.splits, split), predictions, train_counts)
    return {"loss": loss, **result, "predictions": predictions}


def without_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "predictions"}


def answer_counts(records: Sequence[VQARecord]) -> Counter[str]:
    return Counter(normalize(r.answer) for r in records)


def score(records: Sequence[VQARecord], predictions: Sequence[str], train_counts=None) -> dict:
    references = [list(r.answers) for r in records]
    result = dict(score_predictions(predictions, references))
    parts = breakdown(predictions, references, [r.qtype for r in records], train_counts)
    result["per_type"] = parts["by_type"]
    result["per_frequency"] = parts["by_frequency"]
    return result


def write_predictions(
    path: str | Path, records: Sequence[VQARecord], predictions: Sequence[str]
) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record, prediction in zip(records, predictions, strict=True):
                refs = list(record.answers)
                row = {
                    "id": record.id,
                    "question": record.question,
                    "image": record.image,
                    "prediction": prediction,
                    "answers": refs,
                    "type": record.qtype,
                    "em": exact_match(prediction, refs),
                    "f1": f1(prediction, refs),
                    "f1_set": f1_set(prediction, refs),
                }
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    atomic_write(path, write)

"""Generation, losses, metrics and prediction files."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from vqadapt.data.records import VQARecord
from vqadapt.io import atomic_write
from vqadapt.metrics import breakdown, exact_match, f1, f1_set, score_predictions
from vqadapt.text import normalize


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
) -> list[str]:
    """Greedy / beam answers of samples ``indices`` (default: all ``n``), in that order."""
    model.eval()
    outputs: list[str] = []
    kwargs = {"num_beams": num_beams, "do_sample": False}
    if trie is not None:
        kwargs["prefix_allowed_tokens_fn"] = lambda _, ids: trie.allowed(ids.tolist()[1:])
    order = list(range(n)) if indices is None else list(indices)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in collator.loader(chunks, device=_device_of(model)):
        generated = model.generate(batch, max_new_tokens=max_new_tokens, **kwargs)
        outputs += [
            text.strip() for text in tokenizer.batch_decode(generated, skip_special_tokens=True)
        ]
    return outputs


@torch.no_grad()
def summed_loss(model, collator, indices: Sequence[int], batch_size: int) -> float:
    """Sum of the per-sample losses of ``indices`` (unweighted)."""
    model.eval()
    total = 0.0
    order = list(indices)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in collator.loader(chunks, device=_device_of(model)):
        total += model(batch, return_losses=True).sum().item()
    return total


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def mean_loss(model, collator, n: int, batch_size: int) -> float:
    """Unweighted mean per-sample loss (comparable across answer-weight settings)."""
    return summed_loss(model, collator, range(n), batch_size) / max(n, 1)


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

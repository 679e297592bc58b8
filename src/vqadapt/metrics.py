"""Answer metrics for Vietnamese VQA: exact match, SQuAD token F1 and EVJVQA set F1.

All metrics compare :func:`vqadapt.text.normalize` forms (NFC, lowercase, Unicode punctuation
removed, whitespace collapsed), so ``"Màu đỏ."`` written with decomposed diacritics matches
``"màu đỏ"``. Tokens are whitespace-separated Vietnamese syllables; no word segmentation.
With several references a prediction gets the best score over them (SQuAD convention).

Empty answers (nothing left after normalisation): every metric here scores 1.0 when
prediction and reference are both empty and 0.0 when exactly one is empty. This matches the
SQuAD v2.0 evaluation script and the EVJVQA scorer; the SQuAD v1.1 script instead returns
F1 = 0 for two empty strings (its ``if num_same == 0: return 0`` fires first), while its
exact match gives 1.

Breakdowns by answer frequency use the training answer counts: the *head* is the smallest
set of most frequent training answers (ties broken alphabetically) that together cover at
least ``head_fraction`` of the training samples, the *tail* is every other training answer,
and *unseen* holds test samples whose (first, normalised) reference never occurs in training.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from vqadapt.errors import VQADataError
from vqadapt.text import normalize

References = str | Sequence[str]


def _as_list(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise VQADataError("a sample has no reference answers", field="references")
    return refs


def exact_match(prediction: str, references: References) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    pred = normalize(prediction)
    return float(any(pred == normalize(ref) for ref in _as_list(references)))


def _token_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, references: References) -> float:
    """SQuAD token F1 over syllables, best over references.

    Source: the SQuAD v1.1 evaluation script (``evaluate-v1.1.py``, ``f1_score``): tokens are
    counted as a multiset (``Counter(pred) & Counter(ref)``), precision = common / len(pred),
    recall = common / len(ref), F1 their harmonic mean. Our normalisation replaces SQuAD's
    English one (no article removal). Empty handling follows SQuAD v2.0: both empty -> 1.0,
    one empty -> 0.0 (v1.1 would give 0.0 for both empty).
    """
    pred_tokens = normalize(prediction).split()
    return max(_token_f1(pred_tokens, normalize(ref).split()) for ref in _as_list(references))


def _set_f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    pred_set, ref_set = set(pred_tokens), set(ref_tokens)
    common = len(pred_set & ref_set)
    if common == 0:
        return 0.0
    precision = common / len(pred_set)
    recall = common / len(ref_set)
    return 2 * precision * recall / (precision + recall)


def f1_set(prediction: str, references: References) -> float:
    """EVJVQA (VLSP 2022) set-based token F1, best over references.

    Source: the EVJVQA challenge scorer (class ``F1`` in the organisers' evaluation code,
    github.com/phanxuanphucnd/EVJVQA ``scratch/src/evaluate/eval.py``): precision =
    |set(pred) ∩ set(ref)| / |set(pred)|, recall = |set(pred) ∩ set(ref)| / |set(ref)|, F1
    their harmonic mean, so repeated syllables count once. Empty: "if either the prediction
    or the truth is no-answer then f1 = 1 if they agree, 0 otherwise". Differences: that
    scorer strips only ASCII punctuation and splits Japanese into characters; we use
    :func:`normalize` and whitespace syllables (Vietnamese only).
    """
    pred_tokens = normalize(prediction).split()
    return max(_set_f1(pred_tokens, normalize(ref).split()) for ref in _as_list(references))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _check_lengths(predictions: Sequence[str], references: Sequence[References]) -> None:
    if len(predictions) != len(references):
        raise VQADataError(
            f"got {len(predictions)} predictions for {len(references)} references",
            field="predictions",
        )


def score_predictions(
    predictions: Sequence[str], references: Sequence[References]
) -> dict[str, float | int]:
    """Mean ``em``, ``f1``, ``f1_set`` over samples, plus ``n``; means are 0.0 when n == 0."""
    _check_lengths(predictions, references)
    em_scores = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
    f1_scores = [f1(p, r) for p, r in zip(predictions, references, strict=True)]
    set_scores = [f1_set(p, r) for p, r in zip(predictions, references, strict=True)]
    return {
        "em": _mean(em_scores),
        "f1": _mean(f1_scores),
        "f1_set": _mean(set_scores),
        "n": len(predictions),
    }


def head_answers(train_answer_counts: Mapping[str, int], head_fraction: float = 0.5) -> set[str]:
    """Normalised training answers that form the head (see the module docstring)."""
    if not 0.0 < head_fraction <= 1.0:
        raise VQADataError(f"head_fraction must be in (0, 1], got {head_fraction}")
    counts: Counter[str] = Counter()
    for answer, count in train_answer_counts.items():
        counts[normalize(answer)] += count
    total = sum(counts.values())
    head: set[str] = set()
    covered = 0
    for answer, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= head_fraction * total:
            break
        head.add(answer)
        covered += count
    return head


def breakdown(
    predictions: Sequence[str],
    references: Sequence[References],
    qtypes: Sequence[str | None],
    train_answer_counts: Mapping[str, int] | None = None,
    head_fraction: float = 0.5,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Scores per question type and, given training answer counts, per frequency bucket.

    Returns ``{"by_type": {qtype: {em, f1, f1_set, n}}, "by_frequency": {"head", "tail",
    "unseen"}}``; a ``None`` type is reported as ``"unknown"``; ``by_frequency`` is empty
    without ``train_answer_counts``. A sample's bucket follows its first reference.
    """
    _check_lengths(predictions, references)
    if len(qtypes) != len(predictions):
        raise VQADataError(
            f"got {len(qtypes)} question types for {len(predictions)} predictions",
            field="qtypes",
        )
    groups: dict[str, list[int]] = {}
    for i, qtype in enumerate(qtypes):
        groups.setdefault(qtype if qtype is not None else "unknown", []).append(i)

    buckets: dict[str, list[int]] = {}
    if train_answer_counts is not None:
        head = head_answers(train_answer_counts, head_fraction)
        seen = {normalize(a) for a, c in train_answer_counts.items() if c > 0}
        buckets = {"head": [], "tail": [], "unseen": []}
        for i, refs in enumerate(references):
            answer = normalize(_as_list(refs)[0])
            bucket = "head" if answer in head else "tail" if answer in seen else "unseen"
            buckets[bucket].append(i)

    def score(indices: list[int]) -> dict[str, float | int]:
        return score_predictions(
            [predictions[i] for i in indices], [references[i] for i in indices]
        )

    return {
        "by_type": {name: score(idx) for name, idx in sorted(groups.items())},
        "by_frequency": {name: score(idx) for name, idx in buckets.items()},
    }

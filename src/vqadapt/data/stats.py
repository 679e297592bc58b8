"""Summary statistics of a loaded data set, as a dict and as readable text."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from vqadapt.data.images import ImageIndex
from vqadapt.data.records import VQARecord
from vqadapt.text import normalize

TOP_ANSWERS = 20


def _lengths(texts: list[str]) -> dict:
    """Mean, max and histogram of lengths in syllables (whitespace tokens)."""
    lengths = [len(t.split()) for t in texts]
    histogram = Counter(lengths)
    return {
        "mean": sum(lengths) / len(lengths) if lengths else 0.0,
        "max": max(lengths, default=0),
        "histogram": {str(k): histogram[k] for k in sorted(histogram)},
    }


def dataset_stats(records: Sequence[VQARecord], image_index: ImageIndex | None = None) -> dict:
    """Counts, per-type counts, answer vocabulary and top answers, lengths, image coverage.

    Answers are counted by their normalised first (training target) answer; lengths are
    in syllables. ``images_found`` / ``images_missing`` (distinct references) and
    ``missing_examples`` appear only when an ``image_index`` is given.
    """
    answers = [normalize(r.answer) for r in records]
    answer_counts = Counter(answers)
    per_type = Counter(r.qtype if r.qtype is not None else "unknown" for r in records)
    stats: dict = {
        "count": len(records),
        "per_type": dict(sorted(per_type.items())),
        "answer_vocab": len(answer_counts),
        "top_answers": [[a, n] for a, n in answer_counts.most_common(TOP_ANSWERS)],
        "answer_syllables": _lengths(answers),
        "question_syllables": _lengths([r.question for r in records]),
        "images": len({r.image for r in records if r.image is not None}),
    }
    if image_index is not None:
        found, missing = image_index.coverage(records)
        stats["images_found"] = found
        stats["images_missing"] = len(missing)
        stats["missing_examples"] = missing[:10]
    return stats


def format_stats(stats: dict) -> str:
    """A readable multi-line summary of :func:`dataset_stats` output."""
    answer_len = stats["answer_syllables"]
    question_len = stats["question_syllables"]
    lines = [
        f"records:            {stats['count']}",
        "per type:           "
        + ", ".join(f"{name} {count}" for name, count in stats["per_type"].items()),
        f"answer vocabulary:  {stats['answer_vocab']}",
        f"answer syllables:   mean {answer_len['mean']:.2f}, max {answer_len['max']}, "
        + "histogram "
        + " ".join(f"{k}:{v}" for k, v in answer_len["histogram"].items()),
        f"question syllables: mean {question_len['mean']:.2f}, max {question_len['max']}",
        f"images referenced:  {stats['images']}",
    ]
    if "images_found" in stats:
        lines.append(f"images found:       {stats['images_found']}")
        lines.append(f"images missing:     {stats['images_missing']}")
        if stats["missing_examples"]:
            lines.append("  e.g. " + ", ".join(stats["missing_examples"]))
    lines.append(f"top {len(stats['top_answers'])} answers:")
    width = max((len(a) for a, _ in stats["top_answers"]), default=0)
    lines += [f"  {a:<{width}}  {n}" for a, n in stats["top_answers"]]
    return "\n".join(lines)

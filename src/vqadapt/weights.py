"""Per-answer loss weights against the long tail of VQA answers.

For a training set of N samples where answer ``a`` (after :func:`vqadapt.text.normalize`)
occurs ``n_a`` times, the raw weight is

- ``"inverse"``:          w_a = 1 / n_a
- ``"sqrt_inverse"``:     w_a = 1 / sqrt(n_a)
- ``"effective_number"``: w_a = (1 - beta) / (1 - beta ** n_a), the inverse "effective number
  of samples" of Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
  CVPR 2019 (beta = 0 gives equal weights; beta -> 1 approaches 1 / n_a).

The weights are then rescaled so that the mean weight over training *samples* is 1,
i.e. sum_a n_a w_a = N: the loss keeps its scale and the learning rate needs no retuning.

``clip=(low, high)`` bounds the weights after that rescaling. Clipping alone would move the
mean, so we pick one scale factor s by bisection such that w'_a = min(max(s * w_a, low), high)
has sample-weighted mean 1 (to 1e-12). Every weight then lies inside the bounds and the mean
is still 1; this needs low <= 1 <= high. Without clipping the mean is 1 up to float rounding.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.text import normalize

SCHEMES = ("inverse", "sqrt_inverse", "effective_number")


def _raw_weight(count: int, scheme: str, beta: float) -> float:
    if scheme == "inverse":
        return 1.0 / count
    if scheme == "sqrt_inverse":
        return 1.0 / math.sqrt(count)
    return (1.0 - beta) / (1.0 - beta**count) if beta > 0 else 1.0


def _sample_mean(weights: Mapping[str, float], counts: Mapping[str, int]) -> float:
    total = sum(counts.values())
    return sum(counts[a] * weights[a] for a in counts) / total


def _clip_to_unit_mean(
    weights: dict[str, float], counts: Mapping[str, int], low: float, high: float
) -> dict[str, float]:
    def clipped(scale: float) -> dict[str, float]:
        return {a: min(max(scale * w, low), high) for a, w in weights.items()}

    # The clipped mean grows monotonically with the scale: bracket 1, then bisect.
    lo_scale, hi_scale = 0.0, 1.0
    while _sample_mean(clipped(hi_scale), counts) < 1.0 and hi_scale < 1e300:
        hi_scale *= 2.0
    for _ in range(200):
        mid = (lo_scale + hi_scale) / 2
        if _sample_mean(clipped(mid), counts) < 1.0:
            lo_scale = mid
        else:
            hi_scale = mid
        if hi_scale - lo_scale <= 1e-15 * hi_scale:
            break
    return clipped(hi_scale)


def compute_answer_weights(
    answers: Sequence[str],
    scheme: str = "inverse",
    beta: float = 0.999,
    clip: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Weight per normalised answer from the training answers (one entry per sample).

    See the module docstring for the formulas, the unit-mean rescaling and ``clip``.
    """
    if scheme not in SCHEMES:
        raise VQAConfigError(f"unknown weighting scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme == "effective_number" and not 0.0 <= beta < 1.0:
        raise VQAConfigError(f"beta must be in [0, 1), got {beta}")
    if clip is not None:
        low, high = clip
        if not (0.0 <= low <= 1.0 <= high) or not math.isfinite(high):
            raise VQAConfigError(
                f"clip must satisfy 0 <= low <= 1 <= high (finite) so that the mean weight "
                f"can stay 1; got {clip}"
            )
    counts = Counter(normalize(a) for a in answers)
    if not counts:
        raise VQADataError("no training answers to compute weights from", field="answer")
    raw = {a: _raw_weight(n, scheme, beta) for a, n in counts.items()}
    mean = _sample_mean(raw, counts)
    weights = {a: w / mean for a, w in raw.items()}
    if clip is not None:
        weights = _clip_to_unit_mean(weights, counts, clip[0], clip[1])
    return dict(sorted(weights.items()))


def save_answer_weights(weights: Mapping[str, float], path: str | Path) -> None:
    """Write weights as a JSON object (sorted keys, UTF-8 text), atomically."""
    path = Path(path)
    text = json.dumps(dict(weights), sort_keys=True, ensure_ascii=False, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_answer_weights(
    path: str | Path, train_answers: Sequence[str] | None = None
) -> tuple[dict[str, float], dict]:
    """Read a weights file and report which training answers it does not cover.

    Keys are normalised on load. Answers the file does not cover get weight 1.0 (see
    :func:`weight_for`). The report is ``{"covered", "uncovered_answers",
    "uncovered_samples", "examples"}`` counted over distinct normalised ``train_answers``
    (all zero when none are given); ``examples`` lists up to 10 uncovered answers, most
    frequent first.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise VQADataError("answer weights file not found", file=path) from None
    except (OSError, UnicodeDecodeError) as err:
        raise VQADataError(f"cannot read answer weights: {err}", file=path) from None
    try:
        # NaN / Infinity literals parse to floats here and are rejected below with their key.
        data = json.loads(text, parse_constant=float)
    except json.JSONDecodeError as err:
        raise VQADataError(
            f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", file=path
        ) from None
    if not isinstance(data, dict):
        raise VQADataError(
            f"expected a JSON object {{answer: weight}}, found {type(data).__name__}", file=path
        )
    weights: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise VQADataError(f"weight must be a number, got {value!r}", file=path, field=key)
        if not math.isfinite(value):
            raise VQADataError(f"weight must be finite, got {value}", file=path, field=key)
        if value < 0:
            raise VQADataError(f"weight must be >= 0, got {value}", file=path, field=key)
        norm_key = normalize(key)
        if norm_key in weights:
            raise VQADataError(
                f"two keys normalise to the same answer {norm_key!r}", file=path, field=key
            )
        weights[norm_key] = float(value)

    report: dict = {"covered": 0, "uncovered_answers": 0, "uncovered_samples": 0, "examples": []}
    if train_answers is not None:
        counts = Counter(normalize(a) for a in train_answers)
        uncovered = sorted(
            ((a, n) for a, n in counts.items() if a not in weights), key=lambda x: (-x[1], x[0])
        )
        report = {
            "covered": len(counts) - len(uncovered),
            "uncovered_answers": len(uncovered),
            "uncovered_samples": sum(n for _, n in uncovered),
            "examples": [a for a, _ in uncovered[:10]],
        }
    return weights, report


def weight_for(weights: Mapping[str, float], answer: str) -> float:
    """Weight of ``answer`` (normalised); 1.0 for answers the table does not cover."""
    return weights.get(normalize(answer), 1.0)

"""Per-answer loss weights: formulas, unit mean, clipping, file round trip, bad files."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.text import normalize
from vqadapt.weights import (
    compute_answer_weights,
    load_answer_weights,
    save_answer_weights,
    weight_for,
)

ANSWERS = ["hai"] * 6 + ["màu đỏ"] * 3 + ["Màu Đỏ."] + ["con mèo"] * 1 + ["ba"] * 2
# normalised counts: hai 6, màu đỏ 4, ba 2, con mèo 1 (N = 13)


def _sample_mean(weights: dict[str, float]) -> float:
    counts = Counter(normalize(a) for a in ANSWERS)
    return sum(counts[a] * weights[a] for a in counts) / counts.total()


def test_inverse_formula_and_unit_mean() -> None:
    weights = compute_answer_weights(ANSWERS, "inverse")
    assert set(weights) == {"hai", "màu đỏ", "ba", "con mèo"}
    # raw 1/n: sample mean = 4 classes / 13 samples, so w = (1/n) * 13/4
    assert weights["hai"] == pytest.approx(13 / 4 / 6)
    assert weights["con mèo"] == pytest.approx(13 / 4)
    assert _sample_mean(weights) == pytest.approx(1.0, abs=1e-12)


def test_sqrt_inverse_and_effective_number() -> None:
    sqrt_w = compute_answer_weights(ANSWERS, "sqrt_inverse")
    assert sqrt_w["con mèo"] / sqrt_w["hai"] == pytest.approx(math.sqrt(6))
    assert _sample_mean(sqrt_w) == pytest.approx(1.0, abs=1e-12)
    beta = 0.9
    eff = compute_answer_weights(ANSWERS, "effective_number", beta=beta)
    ratio = (1 - beta**6) / (1 - beta**1)  # (1-b)/(1-b^1) over (1-b)/(1-b^6)
    assert eff["con mèo"] / eff["hai"] == pytest.approx(ratio)
    assert _sample_mean(eff) == pytest.approx(1.0, abs=1e-12)
    flat = compute_answer_weights(ANSWERS, "effective_number", beta=0.0)
    assert all(w == pytest.approx(1.0) for w in flat.values())


def test_clip_keeps_bounds_and_unit_mean() -> None:
    weights = compute_answer_weights(ANSWERS, "inverse", clip=(0.7, 2.0))
    assert all(0.7 - 1e-12 <= w <= 2.0 + 1e-12 for w in weights.values())
    assert weights["con mèo"] == pytest.approx(2.0)
    assert _sample_mean(weights) == pytest.approx(1.0, abs=1e-9)
    loose = compute_answer_weights(ANSWERS, "inverse", clip=(0.0, 100.0))
    assert loose == pytest.approx(compute_answer_weights(ANSWERS, "inverse"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "log"},
        {"scheme": "effective_number", "beta": 1.0},
        {"clip": (1.5, 3.0)},
        {"clip": (0.1, 0.9)},
    ],
)
def test_bad_settings(kwargs: dict) -> None:
    with pytest.raises(VQAConfigError):
        compute_answer_weights(ANSWERS, **kwargs)


def test_round_trip_and_report(tmp_path: Path) -> None:
    weights = compute_answer_weights(ANSWERS, "sqrt_inverse")
    path = tmp_path / "w" / "answer_weights.json"
    save_answer_weights(weights, path)
    text = path.read_text(encoding="utf-8")
    assert "màu đỏ" in text  # ensure_ascii=False
    assert list(json.loads(text)) == sorted(weights)
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    loaded, report = load_answer_weights(path, [*ANSWERS, "xe đạp", "xe đạp", "bàn"])
    assert loaded == pytest.approx(weights)
    assert report == {
        "covered": 4,
        "uncovered_answers": 2,
        "uncovered_samples": 3,
        "examples": ["xe đạp", "bàn"],
    }
    assert weight_for(loaded, "Xe đạp!") == 1.0
    assert weight_for(loaded, "MÀU ĐỎ") == pytest.approx(weights["màu đỏ"])
    _, empty_report = load_answer_weights(path)
    assert empty_report["uncovered_answers"] == 0


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('{"hai": "x"}', "hai", "number"),
        ('{"hai": true}', "hai", "number"),
        ('{"hai": -1}', "hai", ">= 0"),
        ('{"hai": NaN}', "hai", "finite"),
        ('{"hai": Infinity}', "hai", "finite"),
        ('{"hai": 1e999}', "hai", "finite"),
        ('{"màu đỏ": 1, "Màu Đỏ": 2}', "Màu Đỏ", "same answer"),
        ("[1, 2]", None, "JSON object"),
        ('{"hai": 1', None, "not valid JSON"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, field: str | None, message: str) -> None:
    path = tmp_path / "w.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(VQADataError, match=message) as info:
        load_answer_weights(path)
    assert info.value.file == str(path) and info.value.field == field


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VQADataError, match="not found"):
        load_answer_weights(tmp_path / "nope.json")

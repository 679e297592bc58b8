"""Metrics on hand-computed cases plus a few properties."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vqadapt.metrics import breakdown, exact_match, f1, f1_set, head_answers, score_predictions
from vqadapt.text import nfc, normalize

NFD_RED = unicodedata.normalize("NFD", "màu đỏ")


def test_normalize() -> None:
    assert NFD_RED != "màu đỏ" and normalize(NFD_RED) == "màu đỏ"
    assert normalize("  Màu   ĐỎ!! ") == "màu đỏ"
    assert normalize("bàn chải đánh răng.") == "bàn chải đánh răng"
    assert normalize("a,b«c»—d…") == "a b c d"
    assert normalize("năm") != normalize("nam")  # diacritics are kept
    assert nfc(NFD_RED) == "màu đỏ"


def test_exact_match() -> None:
    assert exact_match(NFD_RED, "màu đỏ") == 1.0
    assert exact_match("bàn chải đánh răng.", "bàn chải đánh răng") == 1.0
    assert exact_match("Màu Đỏ", ["màu xanh", "màu đỏ"]) == 1.0
    assert exact_match("màu đỏ", "màu đỏ tươi") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "a") == 0.0


def test_f1_hand_computed() -> None:
    # pred "màu xanh lá" vs ref "màu xanh dương": common {màu, xanh} = 2; p = r = 2/3.
    assert f1("màu xanh lá", "màu xanh dương") == pytest.approx(2 / 3)
    # pred "hai con mèo" vs ref "hai": common 1; p = 1/3, r = 1 -> 2 * (1/3) / (4/3) = 0.5.
    assert f1("hai con mèo", "hai") == pytest.approx(0.5)
    # best over references
    assert f1("hai con mèo", ["ba", "con mèo"]) == pytest.approx(0.8)
    assert f1("ba", "hai") == 0.0
    assert f1(NFD_RED + ".", "màu đỏ") == 1.0


def test_f1_multiset_vs_set() -> None:
    # multiset: pred [a, a, b] vs ref [a, b]: common 2, p = 2/3, r = 1 -> 0.8
    assert f1("rất rất đẹp", "rất đẹp") == pytest.approx(0.8)
    # set: {rất, đẹp} vs {rất, đẹp} -> 1.0
    assert f1_set("rất rất đẹp", "rất đẹp") == 1.0
    # set: {màu, xanh, lá} vs {màu, xanh, dương}: 2/3 and 2/3
    assert f1_set("màu xanh lá", "màu xanh dương") == pytest.approx(2 / 3)
    # set: pred {một, con, chó} ref {hai, con, chó, đen}: p = 2/3, r = 2/4 -> 4/7
    assert f1_set("một con chó", "hai con chó đen") == pytest.approx(4 / 7)


def test_empty_answers() -> None:
    for metric in (f1, f1_set):
        assert metric("", "") == 1.0
        assert metric("...", "") == 1.0  # punctuation only normalises to empty
        assert metric("", "màu đỏ") == 0.0
        assert metric("màu đỏ", "") == 0.0
    with pytest.raises(ValueError):
        f1("a", [])


def test_score_predictions() -> None:
    scores = score_predictions(["màu đỏ", "hai con mèo", "x"], [["màu đỏ"], ["hai"], "y"])
    assert scores["n"] == 3
    assert scores["em"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores["f1_set"] == pytest.approx((1 + 0.5 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        score_predictions(["a", "b"], [["a"]])
    assert score_predictions([], [])["n"] == 0


def test_head_answers_and_breakdown() -> None:
    train = {"hai": 5, "màu trắng": 3, "con mèo": 1, "Màu Trắng.": 1}
    # normalised counts: hai 5, màu trắng 4, con mèo 1 (total 10): head covers >= 50% -> {hai}
    assert head_answers(train, 0.5) == {"hai"}
    assert head_answers(train, 0.6) == {"hai", "màu trắng"}
    predictions = ["hai", "ba", "màu trắng", "con chó", "xe buýt"]
    references = [["hai"], ["hai"], ["màu trắng"], ["con mèo"], ["xe đạp"]]
    qtypes = ["number", "number", "colour", "object", None]
    result = breakdown(predictions, references, qtypes, train)
    assert result["by_type"]["number"] == {"em": 0.5, "f1": 0.5, "f1_set": 0.5, "n": 2}
    assert result["by_type"]["unknown"]["n"] == 1
    freq = result["by_frequency"]
    assert (freq["head"]["n"], freq["tail"]["n"], freq["unseen"]["n"]) == (2, 2, 1)
    assert freq["head"]["em"] == 0.5 and freq["tail"]["em"] == 0.5
    assert freq["tail"]["f1"] == pytest.approx((1 + 0.5) / 2)
    assert freq["unseen"]["f1"] == pytest.approx(0.5)
    assert breakdown(predictions, references, qtypes)["by_frequency"] == {}


# ---------------------------------------------------------------------- properties

vietnamese = st.text(
    alphabet=st.sampled_from(
        list("aăâbcdđeêghiklmnoôơpqrstuưvxyàáảãạằắẳẵặầấẩẫậđéèẹếềệ .,?!-\u0301\u0300")
    ),
    max_size=20,
)


@given(st.text(max_size=30))
def test_normalize_idempotent(text: str) -> None:
    assert normalize(normalize(text)) == normalize(text)


@given(vietnamese, st.lists(vietnamese, min_size=1, max_size=3))
def test_metrics_in_unit_interval(prediction: str, references: list[str]) -> None:
    for metric in (exact_match, f1, f1_set):
        assert 0.0 <= metric(prediction, references) <= 1.0


@given(vietnamese, vietnamese)
def test_f1_symmetric(a: str, b: str) -> None:
    assert f1(a, b) == pytest.approx(f1(b, a))
    assert f1_set(a, b) == pytest.approx(f1_set(b, a))


@given(st.text(max_size=20).filter(lambda t: normalize(t) != ""))
def test_exact_match_reflexive(text: str) -> None:
    assert exact_match(text, text) == 1.0
    assert exact_match(unicodedata.normalize("NFD", text), text) == 1.0

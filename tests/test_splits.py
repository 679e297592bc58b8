"""Grouped train / validation split, and the fixed samples of max_train/eval_samples."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from vqadapt.config import DataConfig
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.pipeline import load_splits
from vqadapt.data.records import VQARecord
from vqadapt.data.splits import sample_records, split_by_image
from vqadapt.errors import VQAConfigError, VQADataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _records(n_images: int = 50, per_image: int = 3) -> list[VQARecord]:
    return [
        VQARecord(f"{i}-{j}", "q", ("a",), str(i), "object")
        for i in range(n_images)
        for j in range(per_image)
    ]


def test_no_image_on_both_sides_real_data() -> None:
    records = load_vivqa_csv(SHARED / "vivqa" / "train.csv")
    train, val = split_by_image(records, val_fraction=0.1, seed=0)
    assert len(train) + len(val) == len(records)
    assert not {r.image for r in train} & {r.image for r in val}
    assert abs(len(val) / len(records) - 0.1) < 0.01


def test_deterministic_and_order_independent() -> None:
    records = _records()
    train, val = split_by_image(records, 0.2, seed=3)
    assert (train, val) == split_by_image(records, 0.2, seed=3)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert {r.id for r in split_by_image(shuffled, 0.2, seed=3)[1]} == {r.id for r in val}
    assert {r.id for r in split_by_image(records, 0.2, seed=4)[1]} != {r.id for r in val}
    assert len(val) == 30
    assert train == [r for r in records if r not in val]  # input order kept


def test_records_without_image_are_their_own_group() -> None:
    records = [VQARecord(str(i), "q", ("a",), None) for i in range(10)]
    train, val = split_by_image(records, 0.3, seed=0)
    assert len(val) == 3 and len(train) == 7


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_validated(fraction: float) -> None:
    with pytest.raises(VQAConfigError, match="val_fraction"):
        split_by_image(_records(), fraction)


def test_needs_two_images() -> None:
    with pytest.raises(VQADataError, match="at least 2 images"):
        split_by_image(_records(n_images=1), 0.5)


def test_both_sides_non_empty() -> None:
    train, val = split_by_image(_records(n_images=2), 0.01)
    assert train and val
    train, val = split_by_image(_records(n_images=2), 0.99)
    assert train and val


def _shares(records: list[VQARecord]) -> dict[str | None, float]:
    counts = Counter(r.qtype for r in records)
    return {qtype: count / len(records) for qtype, count in counts.items()}


def test_a_sample_is_fixed_nested_and_in_input_order() -> None:
    records = _records(n_images=100, per_image=2)
    small, large = sample_records(records, 20), sample_records(records, 80)
    assert small == sample_records(records, 20)  # the same questions every time
    assert len(small) == 20 and len(large) == 80
    assert set(small) < set(large)  # a smaller sample is part of a larger one
    positions = {r.id: i for i, r in enumerate(records)}
    assert [positions[r.id] for r in large] == sorted(positions[r.id] for r in large)
    assert small != records[:20]  # drawn from the whole list, not its head
    assert max(positions[r.id] for r in small) > 100
    assert sample_records(records, 10**6) == records


def test_max_samples_give_every_question_type_its_share_of_a_sorted_file() -> None:
    """ViVQA's files are sorted by question type: their first tenth is colour questions only.
    ``max_train_samples`` / ``max_eval_samples`` sample instead, so a data-efficiency curve or
    a capped evaluation sees every type in about its share."""
    train_file = SHARED / "vivqa" / "train.csv"
    test_file = SHARED / "vivqa" / "test.csv"
    records = load_vivqa_csv(train_file)
    assert set(_shares(records[:1200])) == {"colour"}  # what keeping the head gave
    full = load_splits(DataConfig(train_file=str(train_file), test_file=str(test_file)))
    data = DataConfig(
        train_file=str(train_file), test_file=str(test_file),
        max_train_samples=1200, max_eval_samples=300,
    )  # fmt: skip
    splits = load_splits(data)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1200, 300, 300)
    assert set(splits.train) <= set(full.train) and set(splits.test) <= set(full.test)
    for part, whole in ((splits.train, full.train), (splits.test, full.test)):
        expected = _shares(whole)
        assert set(_shares(part)) == set(expected)
        for qtype, share in _shares(part).items():
            assert share == pytest.approx(expected[qtype], abs=0.08), qtype

"""Grouped train / validation split."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.records import VQARecord
from vqadapt.data.splits import split_by_image
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

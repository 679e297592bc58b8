"""Train / validation splits grouped by image, so no image is seen on both sides."""

from __future__ import annotations

import random
from collections.abc import Sequence

from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError


def _group_key(record: VQARecord) -> str:
    return f"image:{record.image}" if record.image is not None else f"record:{record.id}"


def split_by_image(
    records: Sequence[VQARecord], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[VQARecord], list[VQARecord]]:
    """Split into (train, val) with every image on one side only.

    Images (records without one form a group of their own) are shuffled by ``seed`` and
    moved to val until val holds about ``val_fraction`` of the records, stopping at the
    image that brings it closest. Both sides keep the input order. The split depends only
    on the set of records, not their order. Both sides are non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise VQAConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    sizes: dict[str, int] = {}
    for record in records:
        key = _group_key(record)
        sizes[key] = sizes.get(key, 0) + 1
    if len(sizes) < 2:
        raise VQADataError(
            f"cannot split {len(records)} records on {len(sizes)} image(s) by image: "
            "need at least 2 images"
        )
    keys = sorted(sizes)
    random.Random(seed).shuffle(keys)
    target = val_fraction * len(records)
    val_keys: set[str] = set()
    val_count = 0
    for key in keys[:-1]:  # leave at least one image for training
        if val_keys and abs(val_count + sizes[key] - target) >= abs(val_count - target):
            break
        val_keys.add(key)
        val_count += sizes[key]
    train = [r for r in records if _group_key(r) not in val_keys]
    val = [r for r in records if _group_key(r) in val_keys]
    return train, val

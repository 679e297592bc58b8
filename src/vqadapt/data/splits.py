"""Train / validation splits grouped by image, so no image is seen on both sides, and the
fixed samples that ``max_train_samples`` / ``max_eval_samples`` keep."""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Sequence

from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError

IMAGE_ID = re.compile(r"(?:coco_(?:train|val)2014_)?0*(\d+)(?:\.(?:jpg|jpeg|png))?")


def same_image_key(ref: str) -> str:
    """One key for every way a file's references can be spelt (``7``, ``7.png``,
    ``./sub/7.png``, ``COCO_train2014_000000000007.jpg``, NFD, backslashes, case): its
    normalised base name, or its number. Two files of one name in different folders share a
    key too: grouping them costs a little balance, never a leak."""
    name = unicodedata.normalize("NFC", ref.strip().replace("\\", "/")).rsplit("/", 1)[-1]
    name = name.lower()
    match = IMAGE_ID.fullmatch(name)
    return f"id:{int(match[1])}" if match else f"name:{name}"


def _group_keys(records: Sequence[VQARecord]) -> list[str]:
    """Each record's group: its image's (however spelt; named by the first spelling in sorted
    order, so that data spelt one way splits as it always did) or its own."""
    names: dict[str, str] = {}
    for record in records:
        if record.image is not None:
            key = same_image_key(record.image)
            name = f"image:{record.image}"
            names[key] = min(names.get(key, name), name)
    return [
        names[same_image_key(r.image)] if r.image is not None else f"record:{r.id}" for r in records
    ]


def split_by_image(
    records: Sequence[VQARecord], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[VQARecord], list[VQARecord]]:
    """Split into (train, val) with every image on one side only, however its references
    are spelt (``same_image_key``).

    Images (records without one form a group of their own) are shuffled by ``seed`` and
    moved to val until val holds about ``val_fraction`` of the records, stopping at the
    image that brings it closest. Both sides keep the input order. The split depends only
    on the set of records, not their order. Both sides are non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise VQAConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = _group_keys(records)
    sizes: dict[str, int] = {}
    for key in groups:
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
    train = [r for r, key in zip(records, groups, strict=True) if key not in val_keys]
    val = [r for r, key in zip(records, groups, strict=True) if key in val_keys]
    return train, val


SAMPLE_SEED = 0  # the evaluation samples, and the default training sample


def sample_positions(total: int, count: int, seed: int = SAMPLE_SEED) -> list[int]:
    """``count`` of the positions ``0 .. total - 1`` drawn uniformly at random (all of them
    when there are no more), in increasing order. The draw is the first ``count`` of one
    shuffle fixed by ``seed``, so it is the same for every run with that seed, and a smaller
    count keeps a subset of a larger one's positions."""
    if count >= total:
        return list(range(total))
    positions = list(range(total))
    random.Random(seed).shuffle(positions)
    return sorted(positions[:count])


def sample_records(
    records: Sequence[VQARecord], count: int, seed: int = SAMPLE_SEED
) -> list[VQARecord]:
    """``count`` records drawn uniformly at random, in input order (``sample_positions``): the
    same for every run with that ``seed``, and a smaller count keeps a subset of a larger one's
    records (a data-efficiency curve adds questions; it never swaps them). A data file sorted
    by question type (ViVQA's are) gives every type its share, not the first types only."""
    return [records[i] for i in sample_positions(len(records), count, seed)]

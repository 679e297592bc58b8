"""A process that builds a sharded cache, for the tests of ``shards.py`` that need real
processes: a build killed part-way, and ranks of a gloo process group building disjoint shards.

    python tests/shard_worker.py --folder DIR [--slow 0.2] [--rank R --world W --port P]

The rows are a function of the item only (``expected_rows``), so any reader can check them.
Prints one line ``RESULT {json}``: the items this process computed and what it read back.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vqadapt.shard_reader import RowReader
from vqadapt.shards import ShardSpec, build

ITEMS = 40
PER_SHARD = 4
ROW_SHAPE = (3, 5)


def spec(folder: Path, dtype: torch.dtype = torch.float16) -> ShardSpec:
    """Items with 1-3 rows each (variable lengths, like text prefixes)."""
    lengths = np.array([1 + i % 3 for i in range(ITEMS)])
    return ShardSpec(folder, "test-key", lengths, ROW_SHAPE, dtype, PER_SHARD, label="test")


def expected_rows(item: int, length: int) -> torch.Tensor:
    base = torch.arange(length * 15, dtype=torch.float32).view(length, *ROW_SHAPE)
    return base / 16 + item / 4  # exact in fp16 (multiples of 1/16 below 16)


def compute_rows(layout: ShardSpec, asked: list[int], slow: float = 0.0):
    """A ``Compute``: rows of the items, two items per block; records what was asked."""

    def compute(items: list[int]):
        asked.extend(items)
        for start in range(0, len(items), 2):
            chunk = items[start : start + 2]
            if slow:
                time.sleep(slow)
            yield torch.cat([expected_rows(i, int(layout.lengths[i])) for i in chunk])

    return compute


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    barrier = lambda: None  # noqa: E731
    if args.world > 1:
        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{args.port}",
            rank=args.rank,
            world_size=args.world,
        )
        barrier = dist.barrier
    layout = spec(Path(args.folder))
    asked: list[int] = []
    report = build(
        layout,
        compute_rows(layout, asked, args.slow),
        rank=args.rank,
        world=args.world,
        barrier=barrier,
        log=lambda _: None,
    )
    reader = RowReader(layout)
    items = list(range(ITEMS))
    padded = reader.read_padded(items)
    correct = all(
        torch.equal(padded[i, : layout.lengths[i]].float(), expected_rows(i, layout.lengths[i]))
        for i in items
    )
    print("RESULT " + json.dumps({"built": report.built, "asked": asked, "correct": correct}))
    if args.world > 1:
        barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under ``accelerate launch`` (two CPU processes joined by gloo): every process builds its
share of a run's feature-cache shards and then reads them all.

    accelerate launch --multi_gpu --num_processes 2 tests/cache_ranks.py FLAGS_JSON VISION TEXT OUT

Writes ``OUT/rank-<rank>.json`` per process (a file each: the two processes' printed lines
would interleave): its rank and the sums of the caches it read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from vqadapt.build import Backbones, build_data, build_model
from vqadapt.config import parse_run_config
from vqadapt.io import atomic_write_json
from vqadapt.runtime import Runtime

SHARD_ITEMS = 16


def main() -> None:
    flags, vision, text, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    accelerator = Accelerator(cpu=True)
    config = parse_run_config(flags)
    backbones = Backbones(vision, text, None)
    model, _, tokenizer, preprocessing = build_model(config, backbones)
    data = build_data(
        config,
        model,
        tokenizer,
        preprocessing,
        backbones,
        log=lambda _: None,
        runtime=Runtime(accelerator.device, "no", accelerator),
        shard_items=SHARD_ITEMS,
    )
    # Every process reads every item of every cache (a shard another process built included).
    sums = {}
    for reader in data.features.readers():
        rows = reader.read_padded(list(range(len(reader))))
        sums[reader.spec.folder.name] = float(rows.float().sum())
    accelerator.wait_for_everyone()
    result = {"rank": accelerator.process_index, "sums": sums}
    atomic_write_json(Path(out) / f"rank-{accelerator.process_index}.json", result)
    accelerator.end_training()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()

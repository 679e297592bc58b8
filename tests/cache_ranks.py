"""Run under ``accelerate launch`` (two CPU processes joined by gloo): every process builds its
share of a run's feature-cache shards and then reads them all.

    accelerate launch --multi_gpu --num_processes 2 tests/cache_ranks.py FLAGS_JSON VISION TEXT

Prints ``RESULT {json}`` per process: its rank and the cache folders it read.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator

from vqadapt.build import Backbones, build_data, build_model
from vqadapt.config import parse_run_config

SHARD_ITEMS = 16


def main() -> None:
    flags, vision, text = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
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
        device=accelerator.device,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        barrier=accelerator.wait_for_everyone,
        shard_items=SHARD_ITEMS,
    )
    # Every process reads every item of every cache (a shard another process built included).
    sums = {}
    for reader in data.features.readers():
        rows = reader.read_padded(list(range(len(reader))))
        sums[reader.spec.folder.name] = float(rows.float().sum())
    accelerator.wait_for_everyone()
    result = {"rank": accelerator.process_index, "sums": sums}
    print("RESULT " + json.dumps(result), flush=True)
    accelerator.end_training()
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()

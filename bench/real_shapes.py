"""`vqadapt train` end to end at real shapes: data, caching, steps and evaluation, timed.

    python bench/real_shapes.py --data DIR --tiny_text DIR [--batch_size 128] [--out ...]

Builds random-init backbone folders at the real shapes (DINOv2-base, 224 px crops; an MBart
shaped like BARTpho-syllable, with the tiny tokenizer: token ids stay below the real vocabulary
size), then runs ``vqadapt train`` on a synthetic set, frozen baseline with the feature cache on
and off, 2 epochs, and reads each epoch's training-only samples/s from ``metrics.jsonl``. The
second epoch (no cache build, no first-step warm-up) is the end-to-end figure; the GPU issue
asks it to reach 80% of the in-memory step's samples/s (``gpu_check.py``'s cached row at the
same batch size), which ``--in_memory`` compares when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_check import REAL, TINY  # this script's folder is on sys.path when it runs
from vqadapt.io import atomic_write_json
from vqadapt.tiny import image_processor_config

DINOV2_BASE_PREPROCESSING = {"resize": 256, "crop": 224}


def build_backbones(out: Path, tiny_text: Path, shapes: dict = REAL) -> dict[str, Path]:
    """Random-init folders at the real shapes (skipped when present)."""
    import torch
    from transformers import (
        AutoConfig,
        Dinov2Config,
        Dinov2Model,
        MBartConfig,
        MBartForConditionalGeneration,
    )

    paths = {"vision": out / "vision", "text": out / "text"}
    if all((path / "config.json").is_file() for path in paths.values()):
        return paths
    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(patch_size=14, **shapes["vision"]))
    vision.save_pretrained(paths["vision"])
    size = shapes["vision"]["image_size"]
    processor = image_processor_config(size)
    if shapes is REAL:  # DINOv2's own: resize to 256, centre crop 224
        processor["size"] = {"shortest_edge": DINOV2_BASE_PREPROCESSING["resize"]}
    atomic_write_json(paths["vision"] / "preprocessor_config.json", processor)
    tiny = AutoConfig.from_pretrained(tiny_text)
    special = {
        key: getattr(tiny, key)
        for key in (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "decoder_start_token_id",
            "forced_eos_token_id",
        )
    }
    text_shape = dict(shapes["text"])
    text_shape["vocab_size"] = max(text_shape["vocab_size"], tiny.vocab_size)
    text = MBartForConditionalGeneration(MBartConfig(**text_shape, **special))
    text.save_pretrained(paths["text"])
    for name in os.listdir(tiny_text):
        if name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(Path(tiny_text) / name, paths["text"] / name)
    return paths


def train(data: Path, backbones: dict[str, Path], run: Path, batch_size: int, extra: list[str]):
    command = [sys.executable, "-m", "vqadapt", "train"]
    command += ["--train_file", str(data / "train.csv"), "--test_file", str(data / "test.csv")]
    command += ["--image_root", str(data / "images")]
    command += ["--vision_model", str(backbones["vision"]), "--text_model", str(backbones["text"])]
    command += ["--output_dir", str(run), "--overwrite", "--no_progress", "--epochs", "2"]
    command += ["--batch_size", str(batch_size), "--eval_batch_size", str(2 * batch_size)]
    command += ["--max_train_samples", "3000", "--max_eval_samples", "300", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    n_train = summary["data"]["train"]
    return {
        "wall_seconds": wall,
        "epochs": [
            {
                "epoch": row["epoch"],
                "train_samples_per_s": n_train / row["train_seconds"],
                "epoch_seconds": row["seconds"],
                "peak_gpu_memory_mib": row.get("peak_gpu_memory_mib"),
            }
            for row in rows
        ],
        "device": summary.get("device"),
        "test_em": summary["test"]["em"] if summary.get("test") else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a synthetic set (vqadapt data synth)")
    parser.add_argument("--tiny_text", required=True, help="the tiny text backbone (tokenizer)")
    parser.add_argument("--work", default="bench/results/real_shapes")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--in_memory", help="gpu_check.py's JSON, for the 80% comparison")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default="bench/results/real_shapes.json")
    args = parser.parse_args()
    work = Path(args.work)
    shapes = TINY if args.tiny else REAL
    backbones = build_backbones(work / "backbones", Path(args.tiny_text), shapes)
    results = {}
    for name, extra in (("cached", ["--cache"]), ("uncached", ["--no_cache"])):
        results[name] = train(Path(args.data), backbones, work / name, args.batch_size, extra)
        last = results[name]["epochs"][-1]
        print(
            f"{name:<10} epoch {last['epoch']}: {last['train_samples_per_s']:.0f} samples/s "
            f"(training only), wall {results[name]['wall_seconds']:.0f} s",
            flush=True,
        )
    if args.in_memory and Path(args.in_memory).is_file():
        rows = json.loads(Path(args.in_memory).read_text())["rows"]
        for name in ("cached", "uncached"):
            step = next(
                (
                    r["samples_per_s"]
                    for r in rows
                    if r["strategy"] == "baseline"
                    and r["loop"] == name
                    and r["batch_size"] == args.batch_size
                ),
                None,
            )
            if step:
                share = results[name]["epochs"][-1]["train_samples_per_s"] / step
                results[name]["share_of_in_memory_step"] = share
                print(
                    f"{name}: {100 * share:.0f}% of the in-memory step ({step:.0f}/s; target 80%)"
                )
    print(f"written: {atomic_write_json(args.out, results)}")


if __name__ == "__main__":
    main()

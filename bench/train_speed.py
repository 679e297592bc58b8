"""Training and evaluation speed per strategy, frozen-prefix caching on vs off, in one run.

    python bench/train_speed.py [--rounds 10 --steps 8] [--ablation] [--out bench/results/train_speed.json]

Each strategy runs in its own process (its peak memory, max RSS, is its own), where the cached
and the uncached path train the same model on the same batches in alternating timed rounds.
Printed and written as JSON: training samples/s with and without the cache and their ratio (the
median of the per-round ratios), the FLOP ratio (the speed-up if both paths ran at the same
FLOP/s), the one-off cost of building the cache, evaluation (loss) samples/s, peak memory,
achieved FLOP/s of both steps against this machine's fp32 matmul peak (measured in the same
run), the optimizer state size (trainable parameters only). ``--ablation``
also times the whole quick ablation with and without caching (about 25 minutes more;
``--ablation_jobs 1 2`` times a pair of studies training one cell at a time and a pair
training two at once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vqadapt.io import atomic_write_json

STRATEGIES = {
    "baseline": [],
    "unfreeze3": ["--unfreeze_encoder_layers", "3"],
    "lora_r8": ["--use_text_lora", "--text_lora_r", "8"],
    "lora_r16": ["--use_text_lora", "--text_lora_r", "16"],
    "lora_r32": ["--use_text_lora", "--text_lora_r", "32"],
    "vision_text_lora": ["--use_vision_lora", "--use_text_lora", "--text_lora_r", "16"],
}
TARGETS = {
    "baseline": 5.0,
    "unfreeze3": 2.5,
    "lora_r8": 1.5,
    "lora_r16": 1.5,
    "lora_r32": 1.5,
    "vision_text_lora": 1.0,
}


def matmul_peak(size: int = 1024, repeats: int = 20) -> float:
    """fp32 FLOP/s of a square matmul with this process's torch threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def measure(strategy: str, rounds: int, steps: int, batch_size: int) -> dict:
    """One strategy, cache on and off, in one process (runs inside a child process).

    The two paths train the same model on the same batches, timed in alternating rounds of
    ``steps`` steps (the order flips every round): a slow spell of this shared machine hits
    both, and the speed-up is the median of the per-round ratios.
    """
    import statistics

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vqadapt.build import build_data, build_model, resolve_backbones
    from vqadapt.config import parse_run_config
    from vqadapt.evaluate import mean_loss
    from vqadapt.losses import weighted_loss
    from vqadapt.train import epoch_batches, make_optimizer

    argv = [
        *STRATEGIES[strategy],
        "--batch_size",
        str(batch_size),
        "--max_train_samples",
        "4000",
        "--max_eval_samples",
        "800",
        "--output_dir",
        tempfile.mkdtemp(),
    ]
    configs = {True: parse_run_config(argv), False: parse_run_config([*argv, "--no_cache"])}
    quiet = lambda _: None  # noqa: E731
    backbones = resolve_backbones(configs[True], quiet)
    model, plan, tokenizer, preprocessing = build_model(configs[True], backbones)
    data, setup_seconds = {}, {}
    for cache, config in configs.items():
        # With the cache on, this includes building it (or reading it when a run made it).
        started = time.perf_counter()
        data[cache] = build_data(config, model, tokenizer, preprocessing, backbones, log=quiet)
        setup_seconds[cache] = time.perf_counter() - started
    optimizer = make_optimizer(model, 1e-3, 1e-3, 0.01)
    batches = epoch_batches(len(data[True].encoded["train"]), batch_size, 0, 1)

    def step(batch: dict) -> None:
        loss = weighted_loss(model(batch, return_losses=True), batch["weights"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def train_on(cache: bool, chunk: list[list[int]]) -> None:
        """Train on ``chunk`` as the loop does: batches from the data loader (images decoded,
        cached rows read, by its workers)."""
        for batch in data[cache].loader("train", chunk):
            step(batch)

    model.train()
    flops = {}
    for cache in (True, False):
        train_on(cache, batches[:3])
        with FlopCounterMode(display=False) as counter:
            step(data[cache].collators["train"](batches[3]))
        flops[cache] = counter.get_total_flops()
    speeds: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(rounds):
        first = 4 + (round_ * steps) % (len(batches) - 4 - steps)
        chunk = batches[first : first + steps]
        for cache in (True, False) if round_ % 2 == 0 else (False, True):
            started = time.perf_counter()
            train_on(cache, chunk)
            speeds[cache].append(len(chunk) * batch_size / (time.perf_counter() - started))
    ratios = [on / off for on, off in zip(speeds[True], speeds[False], strict=True)]
    model.eval()
    eval_n = min(800, len(data[True].encoded["val"]))
    eval_speed = {}
    for cache in (True, False):
        started = time.perf_counter()
        mean_loss(model, data[cache].collators["val"], eval_n, 128)
        eval_speed[cache] = eval_n / (time.perf_counter() - started)
    optimizer_state = sum(
        t.numel()
        for s in optimizer.state.values()
        for t in s.values()
        if torch.is_tensor(t) and t.ndim
    )
    paths = {}
    for cache, name in ((True, "cached"), (False, "uncached")):
        samples_per_s = statistics.median(speeds[cache])
        paths[name] = {
            "train_samples_per_s": samples_per_s,
            "train_samples_per_s_rounds": speeds[cache],
            "eval_samples_per_s": eval_speed[cache],
            "flops_per_step": flops[cache],
            "achieved_flops_per_s": flops[cache] * samples_per_s / batch_size,
            "setup_seconds": setup_seconds[cache],
        }
    return {
        "strategy": strategy,
        **paths,
        "speedup": statistics.median(ratios),
        "speedup_rounds": ratios,
        "flop_ratio": flops[False] / flops[True],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_params": plan.trainable,
        "optimizer_state_numel": optimizer_state,
        "torch_threads": torch.get_num_threads(),
    }


def child(args) -> None:
    result = measure(args.strategy, args.rounds, args.steps, args.batch_size)
    print("RESULT " + json.dumps(result))


def time_ablation(cache: bool, jobs: int = 1) -> float:
    """Wall time of ``vqadapt ablate --quick --jobs N``. It runs on a fresh cache folder that
    shares only the embedded data and backbones, so the cached study pays for building its
    feature caches."""
    from vqadapt.embedded import cache_root

    out = tempfile.mkdtemp(prefix="bench-ablation-")
    fresh = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    for shared in ("data", "backbones"):
        (fresh / shared).symlink_to((cache_root() / shared).resolve(), target_is_directory=True)
    command = [sys.executable, "-m", "vqadapt", "ablate", "--quick", "--out", out]
    command += ["--jobs", str(jobs)]
    if not cache:
        command += ["--set", "cache=false"]
    started = time.perf_counter()
    env = {**os.environ, "VQADAPT_CACHE": str(fresh)}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per path")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument(
        "--ablation", action="store_true", help="also time the quick ablation twice"
    )
    parser.add_argument(
        "--ablation_jobs",
        type=int,
        nargs="+",
        default=[1],
        help="cells the timed studies train at once (several values: a pair of studies each)",
    )
    parser.add_argument("--out", default="bench/results/train_speed.json")
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.strategy:
        child(args)
        return

    from vqadapt import embedded

    embedded.ensure_synthetic()
    embedded.ensure_tiny_backbones()
    peak = matmul_peak()
    rows = []
    for strategy in STRATEGIES:
        command = [sys.executable, __file__, "--strategy", strategy]
        command += ["--steps", str(args.steps), "--rounds", str(args.rounds)]
        command += ["--batch_size", str(args.batch_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        line = next(line for line in output.splitlines() if line.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT ") :]))
        print(f"  measured {strategy}", flush=True)
    print(f"\nmatmul peak (fp32, {rows[0]['torch_threads']} threads): {peak / 1e9:.0f} GFLOP/s\n")
    header = (
        f"{'strategy':<18}{'cached/s':>10}{'plain/s':>10}{'speed-up':>10}{'target':>8}"
        f"{'FLOP ratio':>11}{'eval c/p /s':>14}{'peak MB':>9}{'% peak c/p':>12}"
    )
    print(header)
    for row in rows:
        on, off = row["cached"], row["uncached"]
        row["target"] = TARGETS[row["strategy"]]
        row["meets_target"] = row["speedup"] >= row["target"]
        print(
            f"{row['strategy']:<18}{on['train_samples_per_s']:>10.0f}"
            f"{off['train_samples_per_s']:>10.0f}{row['speedup']:>9.2f}x{row['target']:>7.1f}x"
            f"{row['flop_ratio']:>10.2f}x"
            f"{on['eval_samples_per_s']:>8.0f}/{off['eval_samples_per_s']:<5.0f}"
            f"{row['peak_rss_mb']:>9.0f}"
            f"{100 * on['achieved_flops_per_s'] / peak:>6.0f}/{100 * off['achieved_flops_per_s'] / peak:.0f}%"
        )
    result = {"machine": {"cpus": os.cpu_count(), "matmul_peak_flops": peak}, "strategies": rows}
    if args.ablation:
        result["quick_ablation"] = []
        for jobs in args.ablation_jobs:
            cached, plain = time_ablation(True, jobs), time_ablation(False, jobs)
            result["quick_ablation"].append(
                {"jobs": jobs, "cached_s": cached, "uncached_s": plain, "speedup": plain / cached}
            )
            print(
                f"\nquick ablation (--jobs {jobs}): {cached:.0f} s cached, {plain:.0f} s uncached:"
                f" {plain / cached:.2f}x",
                flush=True,
            )
    print(f"\nwritten: {atomic_write_json(args.out, result)}")


if __name__ == "__main__":
    main()

"""Training speed at real shapes: vqadapt, cached and uncached, beside the plain loop.

    python bench/gpu_check.py [--batch_sizes 32 128] [--steps 10] [--out bench/results/gpu_check.json]
    python bench/gpu_check.py --tiny --device cpu --steps 1 --batch_sizes 4   # a smoke run

Random-init towers built from config at the shapes of the real backbones (nothing downloaded):
DINOv2-base (hidden 768, 12 layers, 224 px: 257 tokens) and an MBart shaped like
BARTpho-syllable (d_model 1024, 12 + 12 layers, 16 heads, FFN 4096, vocab 40,030); 20-token
questions, 6-token answers, bf16 autocast. For each seed strategy and batch size, one row each:

- ``plain``: ``plain_loop.py``, a peer's loop (library modules, frozen towers every step);
- ``uncached``: vqadapt's training step (the device's speed paths, fused AdamW, the step that
  never reads the device) with the frozen towers run every step;
- ``cached``: the same step on the frozen outputs a resident 16-bit feature cache hands over.

Samples/s, model FLOPs per step (torch's FLOP counter: each loop's own work), MFU against the
GPU's dense bf16 peak (the datasheet figure for known GPUs, else a bf16 matmul measured here),
peak memory. Then, at the largest batch, each CUDA speed path turned off in turn (so that the
device profile in ``vqadapt.speed`` is chosen by measurement). The ratios against the plain
loop are the GPU issue's targets; this script measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import torch

from train_speed import STRATEGIES  # this script's folder is on sys.path when it runs
from vqadapt import speed
from vqadapt.io import atomic_write_json

# Dense bf16 tensor-core peaks (TFLOP/s) from the datasheets (SXM parts).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}
REAL = {
    "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224),
    "text": dict(
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        encoder_attention_heads=16,
        decoder_attention_heads=16,
        encoder_ffn_dim=4096,
        decoder_ffn_dim=4096,
        vocab_size=40030,
        max_position_embeddings=1026,
    ),
    "question_tokens": 20,
    "answer_tokens": 6,
}
TINY = {
    "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56),
    "text": dict(
        d_model=32,
        encoder_layers=4,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=300,
        max_position_embeddings=64,
    ),
    "question_tokens": 8,
    "answer_tokens": 3,
}
# The GPU issue's targets: vqadapt's samples/s over the plain loop's (cached rows), and the
# MFU of the uncached text LoRA step.
TARGETS = {"baseline": 5.0, "unfreeze3": 2.5, "lora_r16": 3.0, "vision_text_lora": 1.5}
UNCACHED_LORA_MFU_TARGET = 0.35


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: datasheet dense bf16 {tflops:.0f} TFLOP/s"
    size = 8192 if device.type == "cuda" else 512
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize(device)
    measured = 2 * size**3 * 10 / (time.perf_counter() - started)
    return measured, f"{device}: measured bf16 matmul {measured / 1e12:.2f} TFLOP/s"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shapes: dict, strategy: str, device: torch.device):
    """Random-init towers at ``shapes`` on ``device``, adapted as ``strategy`` says."""
    from transformers import Dinov2Config, Dinov2Model, MBartConfig, MBartForConditionalGeneration

    from vqadapt.adapt import apply_adaptation
    from vqadapt.config import parse_run_config
    from vqadapt.model import VQAModel

    torch.manual_seed(0)
    with torch.device(device):  # initialised where they run: no host copy of 500M weights
        vision = Dinov2Model(Dinov2Config(patch_size=14, **shapes["vision"]))
        text = MBartForConditionalGeneration(MBartConfig(**shapes["text"]))
        model = VQAModel(vision, text, dropout=0.1)
    plan = apply_adaptation(model, parse_run_config(STRATEGIES[strategy]).adapt)
    return model.to(device), plan


def make_batch(model, shapes: dict, batch_size: int, device: torch.device) -> dict:
    vocab = shapes["text"]["vocab_size"]
    size = shapes["vision"]["image_size"]
    question, answer = shapes["question_tokens"], shapes["answer_tokens"]
    generator = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(4, vocab, (batch_size, answer), generator=generator)
    start = torch.full((batch_size, 1), model.decoder_start_token_id)
    batch = {
        "input_ids": torch.randint(4, vocab, (batch_size, question), generator=generator),
        "attention_mask": torch.ones(batch_size, question, dtype=torch.long),
        "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),
        "labels": labels,
        "weights": torch.ones(batch_size),
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator),
    }
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def cached_batch(model, batch: dict) -> dict:
    """What the feature caches hand the step: the frozen outputs, stored in 16 bits and
    resident on the device."""
    batch = dict(batch)
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
        if model.vision_frozen:
            features = model.encode_image(batch.pop("pixel_values"))
            batch["vision_features"] = features.to(torch.bfloat16)
        if model.text_cache_layers:
            prefix = model.encode_text_prefix(batch["input_ids"], batch["attention_mask"])
            batch["text_prefix"] = prefix.to(torch.bfloat16)
    return batch


class _SingleProcess:
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction):
        return tensor.clone()


def vqadapt_step(model, paths: speed.SpeedPaths, pad_id: int):
    """vqadapt's training step (train.train_epoch's, without the data loader)."""
    from vqadapt.loop import GradientMeter, OptimizerStep, global_weighted_loss, make_optimizer

    speed.install(model, paths)
    optimizer = make_optimizer(model, 1e-4, 3e-5, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = OptimizerStep(model, optimizer, scheduler, GradientMeter(model), 1.0)

    def run(batch: dict) -> None:
        batch = speed.round_lengths(batch, paths.length_multiple, pad_id)
        with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
            per_sample = model(batch, return_losses=True)
        loss, value = global_weighted_loss(per_sample, batch["weights"], _SingleProcess())
        loss.backward()
        step(value)

    return run, optimizer


def plain_step_of(model):
    from plain_loop import plain_optimizer, plain_step

    speed.install(model, speed.SpeedPaths.library())
    optimizer = plain_optimizer(model)
    return (lambda batch: plain_step(model, optimizer, batch)), optimizer


def time_steps(run, batch: dict, steps: int, device: torch.device, peak: float) -> dict:
    """Samples/s over ``steps`` timed steps (after 3 warm-up steps), FLOPs of one step, MFU,
    peak memory."""
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(3):
        run(batch)
    with FlopCounterMode(display=False) as counter:
        run(batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        run(batch)
    synchronize(device)
    seconds = time.perf_counter() - started
    flops = counter.get_total_flops()
    size = len(batch["input_ids"])
    return {
        "samples_per_s": steps * size / seconds,
        "flops_per_step": flops,
        "mfu": flops * steps / seconds / peak,
        "peak_memory_gb": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
    }


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_strategy(strategy, shapes, batch_sizes, steps, device, peak) -> list[dict]:
    model, plan = build(shapes, strategy, device)
    model.train()
    pad_id = model.text.config.pad_token_id
    profile = speed.SpeedPaths.for_device(device)
    rows = []
    for batch_size in batch_sizes:
        batch = make_batch(model, shapes, batch_size, device)
        loops = ["plain", "uncached"]
        if strategy != "vision_text_lora":  # nothing frozen to cache there
            loops.append("cached")
        for name in loops:
            if name == "plain":
                run, optimizer = plain_step_of(model)
            else:
                run, optimizer = vqadapt_step(model, profile, pad_id)
            inputs = cached_batch(model, batch) if name == "cached" else batch
            row = time_steps(run, inputs, steps, device, peak)
            row.update(strategy=strategy, loop=name, batch_size=batch_size)
            row.update(trainable_params=plan.trainable, total_params=plan.total)
            rows.append(row)
            _print_row(row)
            del run, optimizer, inputs
            model.zero_grad(set_to_none=True)
            release(device)
    del model
    release(device)
    return rows


def measure_paths(shapes, batch_size, steps, device, peak) -> list[dict]:
    """Each path of the device's profile turned off in turn, and the library path, on the
    cached baseline (launch-bound) and the uncached text LoRA (compute-bound)."""
    profile = speed.SpeedPaths.for_device(device)
    switches = [f.name for f in dataclasses.fields(profile) if getattr(profile, f.name) is True]
    variants = {"profile": profile, "library": speed.SpeedPaths.library()}
    for name in switches:
        variants[f"no {name}"] = dataclasses.replace(profile, **{name: False})
    if profile.key_multiple > 1:
        variants["key_multiple=1"] = dataclasses.replace(profile, key_multiple=1)
    if profile.length_multiple > 1:
        variants["length_multiple=1"] = dataclasses.replace(profile, length_multiple=1)
    rows = []
    for strategy, cached in (("baseline", True), ("lora_r16", False)):
        model, _ = build(shapes, strategy, device)
        model.train()
        batch = make_batch(model, shapes, batch_size, device)
        if cached:
            batch = cached_batch(model, batch)
        for name, paths in variants.items():
            run, optimizer = vqadapt_step(model, paths, model.text.config.pad_token_id)
            row = time_steps(run, batch, steps, device, peak)
            row.update(strategy=strategy, cached=cached, variant=name, batch_size=batch_size)
            rows.append(row)
            print(
                f"  {strategy:<10}{'cached' if cached else 'uncached':<10}{name:<32}"
                f"{row['samples_per_s']:>10.0f}/s{100 * row['mfu']:>7.1f}% MFU",
                flush=True,
            )
            del run, optimizer
            model.zero_grad(set_to_none=True)
            release(device)
        del model, batch
        release(device)
    return rows


def _print_row(row: dict) -> None:
    memory = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
    print(
        f"{row['strategy']:<18}{row['loop']:<10}{row['batch_size']:>6}{row['samples_per_s']:>11.0f}"
        f"{row['flops_per_step'] / 1e12:>12.3f}{100 * row['mfu']:>7.1f}%{memory:>9}",
        flush=True,
    )


def summarise(rows: list[dict]) -> list[dict]:
    """vqadapt over the plain loop per strategy and batch, against the targets."""
    table = {(r["strategy"], r["loop"], r["batch_size"]): r for r in rows}
    out = []
    for strategy, loop, batch_size in table:
        if loop == "plain":
            continue
        plain = table[(strategy, "plain", batch_size)]
        ratio = table[(strategy, loop, batch_size)]["samples_per_s"] / plain["samples_per_s"]
        target = (
            TARGETS.get(strategy) if loop == "cached" or strategy == "vision_text_lora" else None
        )
        out.append(
            {"strategy": strategy, "loop": loop, "batch_size": batch_size, "vs_plain": ratio}
            | ({"target": target, "meets": ratio >= target} if target else {})
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--no_paths", action="store_true", help="skip the speed-path A/B")
    parser.add_argument("--paths_only", action="store_true", help="only the speed-path A/B")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default="bench/results/gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        from vqadapt.runtime import allow_tf32

        allow_tf32()
    shapes = TINY if args.tiny else REAL
    peak, peak_source = peak_flops(device)
    print(f"peak: {peak_source}", flush=True)
    print(
        f"{'strategy':<18}{'loop':<10}{'batch':>6}{'samples/s':>11}{'TFLOP/step':>12}"
        f"{'MFU':>8}{'peak GB':>9}",
        flush=True,
    )
    rows = []
    for strategy in [] if args.paths_only else args.strategies:
        rows += measure_strategy(strategy, shapes, args.batch_sizes, args.steps, device, peak)
    summary = summarise(rows)
    print("\nvqadapt / plain loop:")
    for item in summary:
        target = f"  target {item['target']:.1f}x" if "target" in item else ""
        print(
            f"  {item['strategy']:<18}{item['loop']:<10}batch {item['batch_size']:<5}"
            f"{item['vs_plain']:>6.2f}x{target}",
            flush=True,
        )
    lora = [r for r in rows if r["strategy"] == "lora_r16" and r["loop"] == "uncached"]
    if lora:
        best = max(r["mfu"] for r in lora)
        print(
            f"  uncached text LoRA r16 MFU {100 * best:.1f}% (target {UNCACHED_LORA_MFU_TARGET:.0%})"
        )
    paths = []
    if not args.no_paths:
        print(f"\nspeed paths at batch {max(args.batch_sizes)}:", flush=True)
        paths = measure_paths(shapes, max(args.batch_sizes), args.steps, device, peak)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "peak_flops": peak,
        "peak_source": peak_source,
        "shapes": "tiny" if args.tiny else "real",
        "rows": rows,
        "vs_plain": summary,
        "speed_paths": paths,
    }
    print(f"written: {atomic_write_json(args.out, result)}")


if __name__ == "__main__":
    main()

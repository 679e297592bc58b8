"""GPU training speed at real model sizes: samples/s, peak memory and MFU per strategy.

    python bench/gpu_speed.py [--batch_size 32] [--steps 20] [--out bench/results/gpu_speed.json]
    python bench/gpu_speed.py --tiny --device cpu --steps 2      # a smoke run without a GPU

Random-init towers built from config at the shapes of the real backbones (nothing downloaded):
DINOv2-base (hidden 768, 12 layers, 224 px: 257 tokens) and an MBart shaped like
BARTpho-syllable (d_model 1024, 12 + 12 layers, 16 heads, FFN 4096, vocab 40,030), 20-token
questions and 6-token answers, bf16 autocast, AdamW. For each of the six seed strategies, with
the frozen-prefix cache on (features computed once, as the training cache provides them) and off:
training samples/s, peak GPU memory, model FLOPs per step (torch's FLOP counter) and MFU, the
achieved FLOP/s against the GPU's dense bf16 peak (the datasheet figure for known GPUs, else a
large bf16 matmul measured in the same run).
"""

from __future__ import annotations

import argparse
import time

import torch

# The six seed strategies as the CPU benchmark's flags: one list for both benchmarks (this
# script's folder is on sys.path when it runs).
from train_speed import STRATEGIES
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


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DATASHEET_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name}: datasheet dense bf16 {tflops:.0f} TFLOP/s"
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    synchronize(device)
    measured = 2 * size**3 * 10 / (time.perf_counter() - started)
    return measured, f"{device}: measured bf16 matmul {measured / 1e12:.1f} TFLOP/s"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(shapes: dict, strategy: str, device: torch.device):
    from transformers import Dinov2Config, Dinov2Model, MBartConfig, MBartForConditionalGeneration

    from vqadapt.adapt import apply_adaptation
    from vqadapt.config import parse_run_config
    from vqadapt.model import VQAModel

    torch.manual_seed(0)
    vision = Dinov2Model(Dinov2Config(patch_size=14, **shapes["vision"]))
    text = MBartForConditionalGeneration(MBartConfig(**shapes["text"]))
    model = VQAModel(vision, text, dropout=0.1)
    plan = apply_adaptation(model, parse_run_config(STRATEGIES[strategy]).adapt)
    return model.to(device), plan


def make_batch(model, shapes: dict, batch_size: int, cache: bool, device: torch.device) -> dict:
    vocab = shapes["text"]["vocab_size"]
    size = shapes["vision"]["image_size"]
    question, answer = shapes["question_tokens"], shapes["answer_tokens"]
    labels = torch.randint(4, vocab, (batch_size, answer), device=device)
    start = torch.full((batch_size, 1), model.decoder_start_token_id, device=device)
    batch = {
        "input_ids": torch.randint(4, vocab, (batch_size, question), device=device),
        "attention_mask": torch.ones(batch_size, question, dtype=torch.long, device=device),
        "decoder_input_ids": torch.cat([start, labels[:, :-1]], dim=1),
        "labels": labels,
        "pixel_values": torch.randn(batch_size, 3, size, size, device=device),
    }
    if cache:  # what the feature caches hand the model: frozen outputs, computed once
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            if model.vision_frozen:
                batch["vision_features"] = model.encode_image(batch.pop("pixel_values")).float()
            if model.text_cache_layers:
                prefix = model.encode_text_prefix(batch["input_ids"], batch["attention_mask"])
                batch["text_prefix"] = prefix.float()
    return batch


def measure(shapes, strategy, cache, batch_size, steps, device, peak) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from vqadapt.train import make_optimizer

    model, plan = build(shapes, strategy, device)
    model.train()
    optimizer = make_optimizer(model, 1e-4, 1e-4, 0.01)
    batch = make_batch(model, shapes, batch_size, cache, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(batch, return_losses=True).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    flops = counter.get_total_flops()
    result = {
        "strategy": strategy,
        "cache": cache,
        "samples_per_s": steps * batch_size / seconds,
        "flops_per_step": flops,
        "mfu": flops * steps / seconds / peak,
        "peak_memory_gb": (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        ),
        "trainable_params": plan.trainable,
        "total_params": plan.total,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--out", default="bench/results/gpu_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    shapes = TINY if args.tiny else REAL
    peak, peak_source = peak_flops(device)
    print(f"peak: {peak_source}", flush=True)
    rows = []
    header = (
        f"{'strategy':<18}{'cache':>6}{'samples/s':>11}{'TFLOP/step':>12}{'MFU':>7}{'peak GB':>9}"
    )
    print(header, flush=True)
    for strategy in STRATEGIES:
        for cache in (True, False):
            if cache and strategy == "vision_text_lora":
                continue  # nothing frozen to cache: the same step as uncached
            row = measure(shapes, strategy, cache, args.batch_size, args.steps, device, peak)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the measured model is gone: start the next clean
            memory = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
            print(
                f"{strategy:<18}{'on' if cache else 'off':>6}{row['samples_per_s']:>11.1f}"
                f"{row['flops_per_step'] / 1e12:>12.2f}{100 * row['mfu']:>6.1f}%{memory:>9}",
                flush=True,
            )
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "peak_flops": peak,
        "peak_source": peak_source,
        "batch_size": args.batch_size,
        "shapes": "tiny" if args.tiny else "real",
        "rows": rows,
    }
    print(f"written: {atomic_write_json(args.out, result)}")


if __name__ == "__main__":
    main()

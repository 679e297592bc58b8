"""Activation memory with and without gradient checkpointing, measured beside the plan's estimate.

    python bench/checkpointing_memory.py [--batch_size 64] [--out bench/results/checkpointing.json]
    python bench/checkpointing_memory.py --tiny --device cpu --batch_size 4   # a smoke run

Random-init towers at the real backbones' shapes (``gpu_check.REAL``: DINOv2-base, a
BARTpho-shaped MBart), bf16 autocast on CUDA. For each strategy, one forward and backward pass
with and without ``--gradient_checkpointing`` in every tower:

- on CUDA, the peak memory allocated during the pass above what was allocated before it,
  less the gradients it creates (the activations' peak);
- on a CPU, the bytes of the tensors autograd saves in the forward pass (no recompute peak);

next to ``memory.activation_bytes`` for the same shapes (what ``vqadapt plan`` reports). It
measures; it asserts nothing (``tests/test_menu.py`` checks the estimate on the tiny models).
"""

from __future__ import annotations

import argparse
import gc

import torch

from gpu_check import REAL, TINY, make_batch  # this script's folder is on sys.path when it runs
from vqadapt import menu, speed
from vqadapt.io import atomic_write_json

STRATEGIES = {
    "baseline": [],
    "lora_r16": ["--use_text_lora", "--text_lora_r", "16"],
    "vision_text_lora": ["--use_vision_lora", "--use_text_lora", "--text_lora_r", "16"],
    "decoder_lora": ["--text_decoder", "lora", "--decoder_lora_targets", "all-linear"],
    "vision_last2": ["--vision_encoder", "last_n:2", "--use_text_lora"],
}


def build(shapes: dict, flags: list[str], checkpointed: bool, device: torch.device):
    from transformers import Dinov2Config, Dinov2Model, MBartConfig, MBartForConditionalGeneration

    from vqadapt.adapt import apply_adaptation
    from vqadapt.config import parse_run_config
    from vqadapt.memory import ActivationShapes, activation_bytes
    from vqadapt.model import VQAModel

    torch.manual_seed(0)
    with torch.device(device):
        vision = Dinov2Model(Dinov2Config(patch_size=14, **shapes["vision"]))
        text = MBartForConditionalGeneration(MBartConfig(**shapes["text"]))
        model = VQAModel(vision, text, dropout=0.1)
    if checkpointed:
        model.set_gradient_checkpointing(menu.CHECKPOINTABLE)
    apply_adaptation(model, parse_run_config(flags).adapt)
    speed.install(model, speed.SpeedPaths.for_device(device))
    return model.to(device), activation_bytes, ActivationShapes


def measure(model, batch: dict, device: torch.device) -> float:
    """MiB of activations for one forward and backward pass (see the module docstring)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast:
            loss = model(batch, return_losses=True).mean()
        loss.backward()
        torch.cuda.synchronize(device)
        grads = sum(
            p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
        )
        peak = torch.cuda.max_memory_allocated(device) - before - grads
        model.zero_grad(set_to_none=True)
        return peak / 2**20
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        model(batch, return_losses=True).mean()
    return sum(storages.values()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="bench/results/checkpointing.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    shapes = TINY if args.tiny else REAL
    precision = "bf16" if device.type == "cuda" else "no"
    rows = []
    for strategy, flags in STRATEGIES.items():
        for checkpointed in (False, True):
            model, activation_bytes, activation_shapes = build(shapes, flags, checkpointed, device)
            batch = make_batch(model, shapes, args.batch_size, device)
            image_tokens = (shapes["vision"]["image_size"] // 14) ** 2 + 1
            estimate = activation_bytes(
                model,
                activation_shapes(
                    args.batch_size, shapes["question_tokens"], shapes["answer_tokens"],
                    image_tokens, precision,
                ),
            )  # fmt: skip
            kept = sum((a.checkpointed if checkpointed else a.plain) for a in estimate.values())
            if checkpointed and device.type == "cuda":  # the recompute peak is measured there
                kept += max(a.recompute for a in estimate.values())
            measured = measure(model, batch, device)
            row = {
                "strategy": strategy,
                "checkpointed": checkpointed,
                "batch_size": args.batch_size,
                "measured_mib": round(measured, 1),
                "estimated_mib": round(kept / 2**20, 1),
            }
            rows.append(row)
            print(
                f"{strategy:<18} {'checkpointed' if checkpointed else 'plain':<13} "
                f"measured {measured:>10.1f} MiB  estimate {kept / 2**20:>10.1f} MiB",
                flush=True,
            )
            del model, batch
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    atomic_write_json(args.out, {"device": str(device), "rows": rows})


if __name__ == "__main__":
    main()

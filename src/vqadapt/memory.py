"""Training memory, estimated per tower: fp32 weights, gradients and AdamW state (exact) and the
activations autograd keeps for one batch, with and without gradient checkpointing (MiB).

What ``vqadapt plan`` prints and every run summary holds; ``tests/test_menu.py`` measures the
activation estimate against the tensors autograd saves, ``bench/checkpointing_memory.py`` on a
GPU at real shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from vqadapt import menu
from vqadapt.model import VQAModel
from vqadapt.towers import TrainingMap

if TYPE_CHECKING:
    from vqadapt.adapt import AdaptationPlan

BYTES_PER_FP32 = 4
MIB = 2**20


@dataclass(frozen=True)
class ActivationShapes:
    """The sizes the activation estimate assumes: ``batch`` questions of ``question_tokens``
    tokens (the truncation limit: an upper bound), answers of ``answer_tokens`` decoder
    positions, ``image_tokens`` vision tokens per image, activations in ``precision``."""

    batch: int = 32
    question_tokens: int = 48
    answer_tokens: int = 16
    image_tokens: int = 0
    precision: str = "no"  # "no" (fp32), "bf16" or "fp16"

    @property
    def bytes_per_value(self) -> int:
        return BYTES_PER_FP32 if self.precision == "no" else 2

    @classmethod
    def for_model(
        cls,
        model: VQAModel,
        batch: int = 32,
        question_tokens: int = 48,
        answer_tokens: int = 16,
        image_size: int | None = None,
        precision: str = "no",
    ) -> ActivationShapes:
        """Shapes for ``model``: its vision tokens from ``image_size`` (the preprocessing's
        crop; default the vision config's) and its patch size (CLS and registers included)."""
        tokens = 0
        if model.vision is not None:
            config = model.vision.config
            size = image_size or config.image_size
            tokens = (size // config.patch_size) ** 2 + 1
            tokens += getattr(config, "num_register_tokens", 0) or 0
        return cls(batch, question_tokens, answer_tokens, tokens, precision)


_KEY_SIDE = re.compile(r".*(encoder_attn|EncDecAttention)\.(k_proj|v_proj|k|v)$")


def _heads(config, tower: str) -> int:
    names = {
        "vision": ("num_attention_heads",),
        "text_encoder": ("encoder_attention_heads", "num_heads"),
        "text_decoder": ("decoder_attention_heads", "num_heads"),
    }[tower]
    return next(getattr(config, n) for n in names if getattr(config, n, None))


def _layer_values(
    layer: nn.Module, tower: str, heads: int, d: int, queries: int, keys: int
) -> tuple[int, int]:
    """(values autograd keeps for one layer, values it keeps when the layer is checkpointed:
    its input), per sample. Per query token: norm inputs and residuals (4 d), the attention's
    q, k, v, output and projection input (4-6 a), the feed-forward's hidden before and after
    its activation (2 f), the attention probabilities (heads x keys); a decoder layer adds
    cross-attention (its keys and values per key token). LoRA adds the dropped-out input and
    the rank-r product of every adapted module."""
    linears = {
        n.removesuffix(".base_layer"): m
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and ".lora_" not in n
    }
    width = max(m.out_features for m in linears.values())  # the feed-forward's hidden size
    attention = next(
        m.out_features for n, m in linears.items() if n.rsplit(".", 1)[-1] in ("q_proj", "q")
    )
    if tower == "text_decoder":
        values = queries * (6 * d + 6 * attention + 2 * width) + 2 * attention * keys
        values += heads * queries * (queries + keys)
    else:
        values = queries * (4 * d + 4 * attention + 2 * width) + heads * queries * queries
    for name, module in layer.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        tokens = keys if tower == "text_decoder" and _KEY_SIDE.match(name) else queries
        for adapter, down in module.lora_A.items():
            dropped = isinstance(module.lora_dropout[adapter], nn.Dropout)
            values += tokens * ((down.in_features if dropped else 0) + down.out_features)
    return values, queries * d


@dataclass(frozen=True)
class ActivationBytes:
    """One tower's activation estimate for a batch, in bytes: what autograd keeps without
    gradient checkpointing, what it keeps with it (each layer's input), and what one layer
    holds again while the backward pass recomputes it (the largest layer)."""

    plain: float
    checkpointed: float
    recompute: float


def activation_bytes(model: VQAModel, shapes: ActivationShapes) -> dict[str, ActivationBytes]:
    """The activations autograd keeps for one batch of ``shapes``, per tower (an estimate).

    Kept for every layer the backward pass goes through: in an encoder from its first layer
    with anything trainable (all of them when its embeddings train) to the last; in the
    decoder every layer when anything upstream trains (each layer's cross-attention reads the
    encoder states), else from its first trainable layer; the projector's when it or the
    vision tower trains; the LM head's logits always (in fp32, for the loss). The per-layer
    counts are ``_layer_values``'s (padding to the speed paths' key and grid multiples not
    counted); ``tests/test_menu.py`` measures them against the tensors autograd saves on the
    tiny models (within 0.6-1.5x), ``bench/checkpointing_memory.py`` on a GPU at real shapes.
    """
    b, per_value = shapes.batch, shapes.bytes_per_value
    training = TrainingMap.of(model)
    trains = training.towers
    first = {
        tower: training.first_trained_layer(tower, len(model.tower_layers(tower) or ()))
        for tower in ("vision", "text_encoder", "text_decoder")
    }
    if trains["vision"] or trains["projector"] or trains["text_encoder"]:
        first["text_decoder"] = 1
    text = model.text.config
    d = text.d_model
    sizes = {
        "vision": (shapes.image_tokens, shapes.image_tokens),
        "text_encoder": (shapes.question_tokens, shapes.question_tokens),
        "text_decoder": (shapes.answer_tokens, shapes.question_tokens + shapes.image_tokens),
    }
    out = {}
    for tower in ("vision", "text_encoder", "text_decoder"):
        layers = model.tower_layers(tower)
        start = first[tower]
        if layers is None or start is None:
            out[tower] = ActivationBytes(0.0, 0.0, 0.0)
            continue
        config = model.vision.config if tower == "vision" else text
        width = config.hidden_size if tower == "vision" else d
        queries, keys = sizes[tower]
        heads = _heads(config, tower)
        # A layer with nothing trainable runs in eval mode, and checkpointing (transformers'
        # rule, which the speed paths follow) recomputes layers in training mode only.
        frozen = {id(module) for module in model.frozen_modules}
        whole_tower_frozen = tower == "text_decoder" and id(model.text.get_decoder()) in frozen
        costs, recomputed = [], []
        for layer in list(layers)[start - 1 :]:
            full, inputs = _layer_values(layer, tower, heads, width, queries, keys)
            in_training = not whole_tower_frozen and id(layer) not in frozen
            costs.append((full, inputs if in_training else full))
            recomputed.append(full if in_training else 0)
        # around the layers: the embeddings' and the final norm's outputs; a checkpointed
        # decoder also keeps the encoder states its layers read (one tensor for all of them)
        around = 2 * queries * width
        states = keys * width if tower == "text_decoder" else 0
        out[tower] = ActivationBytes(
            b * (sum(full for full, _ in costs) + around) * per_value,
            b * (sum(kept for _, kept in costs) + around + states) * per_value,
            b * max(recomputed) * per_value,
        )
    projector = 0.0
    if model.projector is not None and (trains["vision"] or trains["projector"]):
        vision_width = model.vision.config.hidden_size
        projector = b * shapes.image_tokens * (2 * vision_width + 2 * d) * per_value
    out["projector"] = ActivationBytes(projector, projector, 0.0)
    head = b * shapes.answer_tokens * 2 * text.vocab_size * BYTES_PER_FP32
    out["lm_head"] = ActivationBytes(head, head, 0.0)
    return out


def estimate_memory(
    model: VQAModel, plan: AdaptationPlan, shapes: ActivationShapes
) -> dict[str, Any]:
    """Training memory in MiB: fp32 weights, gradients and AdamW state (exact), and the
    activations of one batch of ``shapes`` (``activation_bytes``), with the towers in
    ``model.checkpointed`` checkpointed, and for comparison with none and with every tower
    checkpointed. Checkpointed towers keep each layer's input, and one layer's activations
    exist again while the backward pass recomputes it (the largest such layer is added)."""
    per_tower = activation_bytes(model, shapes)

    def activations(towers: tuple[str, ...]) -> tuple[dict[str, float], float]:
        kept = {
            tower: (a.checkpointed if tower in towers else a.plain) / MIB
            for tower, a in per_tower.items()
        }
        peak = max((per_tower[t].recompute for t in towers if t in per_tower), default=0.0)
        return kept, sum(kept.values()) + peak / MIB

    in_effect, total_activations = activations(model.checkpointed)
    _, none = activations(())
    _, every = activations(menu.CHECKPOINTABLE)
    static = (
        plan.total * BYTES_PER_FP32 + plan.trainable * BYTES_PER_FP32 + plan.optimizer_state_bytes
    ) / MIB
    return {
        "batch_size": shapes.batch,
        "question_tokens": shapes.question_tokens,
        "answer_tokens": shapes.answer_tokens,
        "image_tokens": shapes.image_tokens,
        "activation_precision": {"no": "fp32"}.get(shapes.precision, shapes.precision),
        "weights": round(plan.total * BYTES_PER_FP32 / MIB, 1),
        "gradients": round(plan.trainable * BYTES_PER_FP32 / MIB, 1),
        "optimizer": round(plan.optimizer_state_bytes / MIB, 1),
        "activations": round(total_activations, 1),
        "activations_per_tower": {k: round(v, 1) for k, v in in_effect.items()},
        "activations_without_checkpointing": round(none, 1),
        "activations_with_checkpointing": round(every, 1),
        "checkpointed": list(model.checkpointed),
        "total": round(static + total_activations, 1),
    }


def format_memory(plan: AdaptationPlan) -> list[str]:
    """The memory lines of the plan (MiB, 2^20 bytes)."""
    mem = plan.memory_estimate_mib
    if not mem:
        return []
    shape = (
        f"batch {mem['batch_size']}, {mem['question_tokens']} question / "
        f"{mem['answer_tokens']} answer / {mem['image_tokens']} image tokens"
    )
    towers = ", ".join(f"{k} {v:,.1f}" for k, v in mem["activations_per_tower"].items() if v)
    checkpointed = ", ".join(mem["checkpointed"]) or "none"
    lines = [
        f"memory estimate (MiB; weights, gradients and AdamW state fp32, activations "
        f"{mem['activation_precision']} at {shape}):",
        f"  weights {mem['weights']:,.1f} + gradients {mem['gradients']:,.1f} + AdamW state "
        f"{mem['optimizer']:,.1f} ({plan.optimizer_state_bytes:,} bytes) + activations "
        f"{mem['activations']:,.1f} = {mem['total']:,.1f} MiB",
        f"  activations per tower: {towers or 'none'} (gradient checkpointing: {checkpointed})",
        f"  activations without gradient checkpointing {mem['activations_without_checkpointing']:,.1f}"
        f" MiB, with it in every tower {mem['activations_with_checkpointing']:,.1f} MiB",
    ]
    return lines

"""The one place that decides what trains, and the coverage plan that reports it.

``apply_adaptation`` injects LoRA (through peft, once, before any optimizer exists), sets every
``requires_grad`` flag and returns an ``AdaptationPlan``: trainable / total parameters per
tower and per layer, which layers are adapted and how, the LoRA modules matched.

Rules:
- the decoder side of the text model and the projector always train fully;
- ``unfreeze_encoder_layers = N``: the last N text-encoder layers train fully (and, when N > 0,
  the encoder's final layer norm, which sits after them); the rest of the encoder is frozen;
- text LoRA: adapters on the chosen projections of **every** text-encoder layer, nowhere else;
- vision LoRA: adapters on every vision-encoder layer; without it the vision tower is frozen;
- embeddings of the encoder are never trained (the decoder has its own copy, see
  ``model.untie_decoder_embeddings``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from vqadapt.backbones import TowerLayout, get_submodule, resolve_targets
from vqadapt.config import AdaptConfig
from vqadapt.errors import VQAConfigError
from vqadapt.model import VQAModel

TOWERS = ("vision", "projector", "text_encoder", "text_decoder")
BYTES_PER_FP32 = 4


@dataclass
class LayerRow:
    tower: str
    layer: int  # 1-based
    mode: str  # "full", "lora", "full+lora" or "frozen"
    trainable: int
    total: int


@dataclass
class AdaptationPlan:
    """What trains, in numbers; written into every run summary."""

    strategy: str
    trainable: int
    total: int
    per_tower: dict[str, dict[str, int]]
    layers: list[LayerRow]
    lora_modules: dict[str, list[str]]
    text_encoder_layers_adapted: list[int]
    text_encoder_layers_total: int
    coverage: str
    text_cache_layers: int
    vision_frozen: bool
    memory_estimate_mb: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(row) for row in self.layers]
        return out


def parameter_towers(model: VQAModel) -> dict[str, str]:
    """Tower of every parameter, by tensor identity for the text encoder.

    Identity matters: the encoder's input embedding is also reachable as ``text.model.shared``
    (the name PyTorch reports for it), which a name prefix would file under the decoder.
    """
    encoder_ids = {id(p) for p in model.text_encoder.parameters()}
    towers = {}
    for name, param in model.named_parameters():
        if name.startswith("vision."):
            towers[name] = "vision"
        elif name.startswith("projector."):
            towers[name] = "projector"
        elif id(param) in encoder_ids:
            towers[name] = "text_encoder"
        else:
            towers[name] = "text_decoder"
    return towers


def layer_of(model: VQAModel, name: str) -> tuple[str, int] | None:
    """(tower, 1-based layer index) for parameters inside an encoder layer."""
    text_layers = f"text.{model.text_layout.layers_path}."
    if name.startswith(text_layers):
        return "text_encoder", int(name[len(text_layers) :].split(".", 1)[0]) + 1
    if model.vision_layout is not None:
        vision_layers = f"vision.{model.vision_layout.layers_path}."
        if name.startswith(vision_layers):
            return "vision", int(name[len(vision_layers) :].split(".", 1)[0]) + 1
    return None


def _inject_lora(
    tower: nn.Module, layout: TowerLayout, requested: str, r: int, alpha: float, dropout: float
) -> None:
    """peft LoRA on the chosen projections of every encoder layer of one tower (adapter
    "default", kept in ``tower.peft_config`` for saving in peft's own format)."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = get_submodule(tower, layout.layers_path)
    targets = resolve_targets(requested, layout, layers[0])
    names = "|".join(map(re.escape, targets))
    pattern = rf"{re.escape(layout.layers_path)}\.\d+\.(.*\.)?({names})"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern)
    inject_adapter_in_model(config, tower, adapter_name="default")
    tower.peft_config = {"default": config}


def describe_strategy(adapt: AdaptConfig, blind: bool) -> str:
    parts = []
    if adapt.unfreeze_encoder_layers:
        parts.append(f"unfreeze last {adapt.unfreeze_encoder_layers} text-encoder layers")
    if adapt.use_text_lora:
        parts.append(f"text LoRA r={adapt.text_lora_r} alpha={adapt.text_lora_alpha:g}")
    if adapt.use_vision_lora:
        parts.append(f"vision LoRA r={adapt.vision_lora_r} alpha={adapt.vision_lora_alpha:g}")
    if not parts:
        parts.append("frozen encoders (baseline)")
    if blind:
        parts.append("blind (question only)")
    return " + ".join(parts)


def apply_adaptation(model: VQAModel, adapt: AdaptConfig, blind: bool = False) -> AdaptationPlan:
    """Inject LoRA, set ``requires_grad`` everywhere, and describe the result."""
    num_text_layers = model.text_layout.num_layers
    unfreeze = adapt.unfreeze_encoder_layers
    if not 0 <= unfreeze <= num_text_layers:
        raise VQAConfigError(
            f"--unfreeze_encoder_layers {unfreeze} is out of range: the text encoder has "
            f"{num_text_layers} layers"
        )
    if adapt.use_text_lora:
        _inject_lora(
            model.text,
            model.text_layout,
            adapt.text_lora_targets,
            adapt.text_lora_r,
            adapt.text_lora_alpha,
            adapt.text_lora_dropout,
        )
    if adapt.use_vision_lora:
        if model.vision is None:
            raise VQAConfigError("--use_vision_lora needs a vision tower, but the model is blind")
        _inject_lora(
            model.vision,
            model.vision_layout,
            adapt.vision_lora_targets,
            adapt.vision_lora_r,
            adapt.vision_lora_alpha,
            adapt.vision_lora_dropout,
        )

    first_unfrozen = num_text_layers - unfreeze  # 0-based index of the first fully trained layer
    towers = parameter_towers(model)
    encoder_embedding = model.text_encoder.get_input_embeddings().weight
    for name, param in model.named_parameters():
        tower = towers[name]
        is_lora = ".lora_" in name
        if tower in ("projector", "text_decoder") or is_lora:
            train = True
        elif tower == "text_encoder":
            where = layer_of(model, name)
            if where is not None:
                train = where[1] - 1 >= first_unfrozen
            else:  # embeddings never train; the final norm trains with the last layers
                is_embedding = param is encoder_embedding or "embed" in name
                train = unfreeze > 0 and not is_embedding
        else:
            train = False
        param.requires_grad_(train)

    model.text_cache_layers = 0 if adapt.use_text_lora else first_unfrozen
    model.vision_frozen = not adapt.use_vision_lora
    plan = count_plan(model, describe_strategy(adapt, blind))
    return plan


def count_plan(model: VQAModel, strategy: str) -> AdaptationPlan:
    """Count trainable / total parameters per tower and per encoder layer."""
    per_tower = {tower: {"trainable": 0, "total": 0} for tower in TOWERS}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    towers = parameter_towers(model)
    for name, param in model.named_parameters():
        tower = towers[name]
        n = param.numel()
        per_tower[tower]["total"] += n
        if param.requires_grad:
            per_tower[tower]["trainable"] += n
        where = layer_of(model, name)
        if where is None:
            continue
        row = rows.setdefault(where, {"trainable": 0, "total": 0, "base": False, "lora": False})
        row["total"] += n
        if param.requires_grad:
            row["trainable"] += n
            row["lora" if ".lora_" in name else "base"] = True
    modes = {(True, True): "full+lora", (True, False): "full", (False, True): "lora"}
    layers = [
        LayerRow(
            tower,
            index,
            modes.get((row["base"], row["lora"]), "frozen"),
            row["trainable"],
            row["total"],
        )
        for (tower, index), row in sorted(rows.items())
    ]
    total_layers = model.text_layout.num_layers
    adapted = [row.layer for row in layers if row.tower == "text_encoder" and row.mode != "frozen"]
    from peft.tuners.lora import LoraLayer

    lora = {
        "text": [f"text.{n}" for n, m in model.text.named_modules() if isinstance(m, LoraLayer)],
        "vision": [
            f"vision.{n}" for n, m in model.vision.named_modules() if isinstance(m, LoraLayer)
        ]
        if model.vision is not None
        else [],
    }
    trainable = sum(t["trainable"] for t in per_tower.values())
    total = sum(t["total"] for t in per_tower.values())
    return AdaptationPlan(
        strategy=strategy,
        trainable=trainable,
        total=total,
        per_tower=per_tower,
        layers=layers,
        lora_modules=lora,
        text_encoder_layers_adapted=adapted,
        text_encoder_layers_total=total_layers,
        coverage=coverage_text(adapted, total_layers, bool(lora["text"])),
        text_cache_layers=model.text_cache_layers,
        vision_frozen=model.vision_frozen,
        memory_estimate_mb=estimate_memory(total, trainable),
    )


def coverage_text(adapted: list[int], total_layers: int, lora: bool) -> str:
    """``"layers 10-12 only (25% of encoder)"`` / ``"all 12 layers (LoRA)"`` / ``"none (frozen)"``."""
    if not adapted:
        return "none (frozen)"
    share = 100 * len(adapted) / total_layers
    how = " (LoRA)" if lora else ""
    if len(adapted) == total_layers:
        return f"all {total_layers} layers{how}"
    span = f"{adapted[0]}-{adapted[-1]}" if len(adapted) > 1 else f"{adapted[0]}"
    return f"layers {span} only ({share:.0f}% of encoder){how}"


def estimate_memory(total: int, trainable: int) -> dict[str, float]:
    """A coarse fp32 estimate (MB): weights, gradients and AdamW's two moments.

    Activations depend on batch and sequence sizes and are not included.
    """
    mb = 1024 * 1024
    weights = total * BYTES_PER_FP32 / mb
    grads = trainable * BYTES_PER_FP32 / mb
    adam = 2 * trainable * BYTES_PER_FP32 / mb
    return {
        "weights": round(weights, 1),
        "gradients": round(grads, 1),
        "optimizer": round(adam, 1),
        "total_without_activations": round(weights + grads + adam, 1),
    }


def lora_parameter_count(model: VQAModel, tower: str, targets: str, r: int) -> int:
    """Exact LoRA parameter count for rank r on every layer of a tower (no injection needed)."""
    layout = model.text_layout if tower == "text" else model.vision_layout
    module = model.text if tower == "text" else model.vision
    if layout is None or module is None:
        return 0
    layers = model.text_encoder_layers() if tower == "text" else model.vision_layers()
    names = resolve_targets(targets, layout, layers[0])
    total = 0
    for layer in layers:
        for name, sub in layer.named_modules():
            if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in names:
                total += r * (sub.in_features + sub.out_features)
    return total


def format_plan(plan: AdaptationPlan, per_layer: bool = True) -> str:
    """The coverage table printed by ``vqadapt plan`` (one fixed format)."""
    lines = [f"strategy: {plan.strategy}", ""]
    lines.append(f"{'tower':<14}{'trainable':>14}{'total':>14}{'share':>9}")
    for tower, counts in plan.per_tower.items():
        if counts["total"] == 0:
            continue
        share = 100 * counts["trainable"] / counts["total"]
        lines.append(f"{tower:<14}{counts['trainable']:>14,}{counts['total']:>14,}{share:>8.2f}%")
    share = 100 * plan.trainable / max(plan.total, 1)
    lines.append(f"{'all':<14}{plan.trainable:>14,}{plan.total:>14,}{share:>8.2f}%")
    lines.append("")
    lines.append(f"text-encoder coverage: {plan.coverage}")
    if per_layer:
        lines.append("")
        lines.append(f"{'tower':<14}{'layer':>6}  {'mode':<10}{'trainable':>12}{'total':>12}")
        for row in plan.layers:
            lines.append(
                f"{row.tower:<14}{row.layer:>6}  {row.mode:<10}{row.trainable:>12,}{row.total:>12,}"
            )
    for tower, modules in plan.lora_modules.items():
        if modules:
            lines.append("")
            lines.append(f"{tower} LoRA modules matched: {len(modules)} (e.g. {modules[0]})")
    mem = plan.memory_estimate_mb
    lines.append("")
    lines.append(
        f"memory estimate (fp32, no activations): weights {mem['weights']} MB + gradients "
        f"{mem['gradients']} MB + AdamW {mem['optimizer']} MB = {mem['total_without_activations']} MB"
    )
    return "\n".join(lines)

"""The one place that decides what trains, and the coverage plan that reports it.

``apply_adaptation`` turns each tower's choice (``vqadapt.menu``: frozen, full, last_n:N, lora,
last_n:N+lora; the seed's flags map onto them) into peft LoRA adapters (injected once, before
any optimizer exists) and ``requires_grad`` flags, and returns an ``AdaptationPlan``: trainable
/ total parameters per tower and per layer, which layers are adapted and how, the LoRA modules
matched, the optimizer state in bytes and a memory estimate with activations.

Rules, the same in every tower:
- ``full``: every parameter of the tower, embeddings included (not those vqadapt never runs:
  a vision family's ``unused``, e.g. DINOv2's masked-image token);
- ``last_n:N``: the last N layers and what runs after them (the final norm), nothing before;
- ``lora``: adapters on the targets of the chosen layers (or on the projector's linear
  layers), every base weight frozen; with ``last_n:N`` the last N layers also train fully;
- ``frozen``: nothing.

The text decoder's input embedding is its own copy of the shared matrix, tied to the LM head
(``model.untie_decoder_embeddings``): both train with ``--text_decoder full`` only. The
encoder's embedding trains with ``--text_encoder full`` only.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from vqadapt import menu
from vqadapt.backbones import resolve_targets
from vqadapt.config import AdaptConfig
from vqadapt.errors import VQAConfigError
from vqadapt.memory import BYTES_PER_FP32, ActivationShapes, estimate_memory, format_memory
from vqadapt.menu import TOWERS, LoraSpec, TowerChoice
from vqadapt.model import VQAModel
from vqadapt.towers import (
    TrainingMap,
    before_layer_params,
    is_before_layers,
    layer_of,
    lora_modules,
    parameter_towers,
    tower_exists,
    tower_layout,
)

# Where each tower's LoRA adapter lives: (folder under a checkpoint's or export's adapters/,
# attribute of VQAModel it is injected into, peft adapter name). The text encoder and decoder
# share the text model, so the decoder's adapter has a name of its own; keys are relative to
# the attribute, so that PeftModel.from_pretrained loads each folder onto that tower alone.
ADAPTER_SITES = {
    "vision": ("vision", "vision", "default"),
    "projector": ("projector", "projector", "default"),
    "text_encoder": ("text", "text", "default"),
    "text_decoder": ("decoder", "text", "text_decoder"),
}
VARIANT_NAMES = {"lora": "LoRA", "dora": "DoRA", "rslora": "rsLoRA", "pissa": "PiSSA"}
TOWER_NAMES = {
    "vision": "vision encoder",
    "projector": "projector",
    "text_encoder": "text encoder",
    "text_decoder": "text decoder",
}


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
    choices: dict[str, str] = field(default_factory=dict)  # tower -> its choice, as spelled
    lora: dict[str, dict[str, Any]] = field(default_factory=dict)  # tower -> its LoRA settings
    optimizer_state_bytes: int = 0  # AdamW's state, exact
    memory_estimate_mib: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(row) for row in self.layers]
        return out


# -- LoRA -----------------------------------------------------------------------------------
def lora_config(spec: LoraSpec, targets: tuple[str, ...], layers_path: str | None):
    """A peft ``LoraConfig`` for ``spec`` on ``targets`` of the layers ``spec.layers`` (a
    regex over module names relative to the tower's root; the projector has no layers)."""
    from peft import LoraConfig

    names = "|".join(map(re.escape, targets))
    if layers_path is None:
        pattern = rf"({names})"
    else:
        indices = r"\d+"
        if spec.layers is not None:
            indices = "(?:" + "|".join(str(i - 1) for i in spec.layers) + ")"
        pattern = rf"{re.escape(layers_path)}\.{indices}\.(.*\.)?({names})"
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=pattern,
        use_dora=spec.variant == "dora",
        use_rslora=spec.variant == "rslora",
        init_lora_weights="pissa" if spec.variant == "pissa" else True,
    )


def _lora_targets(model: VQAModel, tower: str, spec: LoraSpec) -> tuple[str, ...]:
    layers = model.tower_layers(tower)
    sample = layers[0] if layers is not None else model.projector
    return resolve_targets(spec.targets, tower_layout(model, tower), sample)


def inject_lora(model: VQAModel, tower: str, spec: LoraSpec) -> None:
    """peft LoRA adapters on one tower (adapter ``ADAPTER_SITES[tower]``, its config kept in
    the root module's ``peft_config`` for saving in peft's own format)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    _, attribute, adapter = ADAPTER_SITES[tower]
    root = getattr(model, attribute)
    layout = tower_layout(model, tower)
    config = lora_config(spec, _lora_targets(model, tower, spec), layout and layout.layers_path)
    with warnings.catch_warnings():
        # a second adapter in the text model (encoder and decoder) is intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, root, adapter_name=adapter)
    root.peft_config = {**getattr(root, "peft_config", {}), adapter: config}
    # peft activates the new adapter everywhere in the root, which would switch off the other
    # tower's adapter: each LoRA layer keeps its own (every layer holds one).
    for module in root.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(list(module.lora_A.keys()))


def check_choices(model: VQAModel, adapt: AdaptConfig, choices: dict[str, TowerChoice]) -> None:
    """Every choice fits the model: a tower that exists, ``last_n`` and LoRA layers within its
    depth, LoRA targets that name linear layers."""
    for tower, choice in choices.items():
        flag = f"--{menu.TOWER_FLAGS[tower]} {choice}"
        if not tower_exists(model, tower):
            if tower == "projector" and choice.full:
                continue
            if not choice.frozen:
                if tower == "vision" and adapt.vision_encoder is None:
                    flag = "--use_vision_lora"
                raise VQAConfigError(f"{flag} needs a vision tower, but the model is blind")
            continue
        layers = model.tower_layers(tower)
        depth = len(layers) if layers is not None else 0
        if not 0 <= choice.last_n <= depth:
            if tower == "text_encoder" and adapt.text_encoder is None:
                flag = f"--unfreeze_encoder_layers {adapt.unfreeze_encoder_layers}"
            raise VQAConfigError(
                f"{flag} is out of range: the {TOWER_NAMES[tower]} has {depth} layers"
            )
        if choice.lora:
            spec = menu.lora_spec(adapt, tower)
            if spec.layers is not None and spec.layers[-1] > depth:
                prefix = menu.LORA_PREFIXES[tower]
                raise VQAConfigError(
                    f"--{prefix}_lora_layers {getattr(adapt, f'{prefix}_lora_layers')}: the "
                    f"{TOWER_NAMES[tower]} has {depth} layers"
                )
            _lora_targets(model, tower, spec)


# -- the decision ---------------------------------------------------------------------------
def describe_strategy(adapt: AdaptConfig, blind: bool) -> str:
    """One line: what trains, in the seed's words where the seed had them."""
    choices = menu.resolve(adapt)
    words = {"vision": "vision", "projector": "projector", "text_encoder": "text",
             "text_decoder": "decoder"}  # fmt: skip
    parts = []
    for tower in ("text_encoder", "vision", "projector", "text_decoder"):
        choice = choices[tower]
        if tower in ("projector", "text_decoder") and choice.full:
            continue  # the default
        if choice.full:
            parts.append(f"full {tower.replace('_', ' ')}")
        elif choice.frozen:
            if tower in ("projector", "text_decoder"):
                parts.append(f"frozen {words[tower]}")
            continue
        if choice.last_n:
            layers = "text-encoder" if tower == "text_encoder" else words[tower]
            parts.append(f"unfreeze last {choice.last_n} {layers} layers")
        if choice.lora:
            spec = menu.lora_spec(adapt, tower)
            text = f"{words[tower]} {VARIANT_NAMES[spec.variant]} r={spec.r} alpha={spec.alpha:g}"
            if spec.targets != "auto":
                text += f" on {spec.targets}"
            if spec.layers is not None:
                text += f" (layers {','.join(map(str, spec.layers))})"
            parts.append(text)
    if not [p for p in parts if not p.startswith(("frozen projector", "frozen decoder"))]:
        parts.insert(0, "frozen encoders (baseline)")
    if blind:
        parts.append("blind (question only)")
    return " + ".join(parts)


def apply_adaptation(
    model: VQAModel,
    adapt: AdaptConfig,
    blind: bool = False,
    shapes: ActivationShapes | None = None,
) -> AdaptationPlan:
    """Inject LoRA, set ``requires_grad`` everywhere, and describe the result (``shapes``: the
    sizes the activation estimate assumes; default: ``ActivationShapes.for_model``)."""
    choices = menu.resolve(adapt)
    check_choices(model, adapt, choices)
    specs = {tower: menu.lora_spec(adapt, tower) for tower, c in choices.items() if c.lora}
    for tower, spec in specs.items():
        inject_lora(model, tower, spec)

    towers = parameter_towers(model)
    before = before_layer_params(model)
    depth = {tower: len(model.tower_layers(tower) or ()) for tower in TOWERS}
    unused = ()
    if model.vision_family is not None:
        unused = tuple(f"vision.{path}" for path in model.vision_family.unused)
    for name, param in model.named_parameters():
        tower = towers[name]
        choice = choices[tower]
        where = layer_of(model, name)
        if name.startswith(unused):
            train = False
        elif ".lora_" in name or choice.full:
            train = True
        elif where is not None:
            train = where[1] > depth[tower] - choice.last_n
        elif is_before_layers(tower, name, param, before):
            train = False
        else:  # what runs after the layers (a final norm) trains with the last layers
            train = choice.last_n > 0
        param.requires_grad_(train)

    _set_model_flags(model)
    if any(spec.variant == "pissa" for spec in specs.values()):
        model.rewritten_weights = rewritten_weights(model)
    plan = count_plan(model, describe_strategy(adapt, blind), shapes)
    plan.choices = {tower: str(choice) for tower, choice in choices.items()}
    plan.lora = {tower: asdict(spec) for tower, spec in specs.items()}
    return plan


def rewritten_weights(model: VQAModel) -> list[str]:
    """Frozen base weights that the LoRA initialisation rewrote (PiSSA keeps the residual
    W - B A in the base layer): checkpoints hold them, since the pretrained tower does not."""
    from peft.tuners.lora import LoraLayer

    names = []
    for attribute in ("vision", "projector", "text"):
        root = getattr(model, attribute)
        if root is None:
            continue
        configs = getattr(root, "peft_config", {})
        for module_name, module in root.named_modules():
            if isinstance(module, LoraLayer) and any(
                configs[a].init_lora_weights == "pissa" for a in module.lora_A if a in configs
            ):
                names.append(f"{attribute}.{module_name}.base_layer.weight")
    return names


def _set_model_flags(model: VQAModel) -> None:
    """What the caches and ``VQAModel.train`` need to know: the leading text-encoder layers
    and vision parts with nothing trainable, and every other module that has none."""
    training = TrainingMap.of(model)
    trains, layer_trains = training.towers, training.layers
    num_text = model.text_layout.num_layers
    first = training.first_trained_layer("text_encoder", num_text)
    model.text_cache_layers = num_text if first is None else first - 1
    model.vision_frozen = not trains["vision"]
    model.vision_embeddings_frozen = not training.before_layers["vision"]
    frozen: list[nn.Module] = []
    if model.projector is not None and not trains["projector"]:
        frozen.append(model.projector)
    if not trains["text_decoder"]:
        frozen.append(model.text.get_decoder())
    for tower in ("vision", "text_encoder", "text_decoder"):
        layers = model.tower_layers(tower)
        if layers is None or not trains[tower]:
            continue
        frozen += [layer for i, layer in enumerate(layers) if not layer_trains.get((tower, i + 1))]
    model.frozen_modules = frozen


# -- counting -------------------------------------------------------------------------------


def count_plan(
    model: VQAModel, strategy: str, shapes: ActivationShapes | None = None
) -> AdaptationPlan:
    """Count trainable / total parameters per tower and per layer, the optimizer state and
    the memory estimate."""
    per_tower = {tower: {"trainable": 0, "total": 0} for tower in TOWERS}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    towers = parameter_towers(model)
    trainable_tensors = 0
    for name, param in model.named_parameters():
        tower = towers[name]
        n = param.numel()
        per_tower[tower]["total"] += n
        if param.requires_grad:
            per_tower[tower]["trainable"] += n
            trainable_tensors += 1
        where = layer_of(model, name)
        if where is None:
            continue
        row = rows.setdefault(where, {"trainable": 0, "total": 0, "base": False, "lora": False})
        row["total"] += n
        if param.requires_grad:
            row["trainable"] += n
            row["lora" if ".lora_" in name else "base"] = True
    modes = {(True, True): "full+lora", (True, False): "full", (False, True): "lora"}
    order = {tower: i for i, tower in enumerate(TOWERS)}
    layers = [
        LayerRow(
            tower,
            index,
            modes.get((row["base"], row["lora"]), "frozen"),
            row["trainable"],
            row["total"],
        )
        for (tower, index), row in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))
    ]
    total_layers = model.text_layout.num_layers
    adapted = [row.layer for row in layers if row.tower == "text_encoder" and row.mode != "frozen"]
    lora = lora_modules(model)
    trainable = sum(t["trainable"] for t in per_tower.values())
    total = sum(t["total"] for t in per_tower.values())
    # AdamW keeps two moments per trainable value and a float32 step count per tensor.
    optimizer_bytes = 2 * BYTES_PER_FP32 * trainable + BYTES_PER_FP32 * trainable_tensors
    plan = AdaptationPlan(
        strategy=strategy,
        trainable=trainable,
        total=total,
        per_tower=per_tower,
        layers=layers,
        lora_modules=lora,
        text_encoder_layers_adapted=adapted,
        text_encoder_layers_total=total_layers,
        coverage=coverage_text(adapted, total_layers, bool(lora["text_encoder"])),
        text_cache_layers=model.text_cache_layers,
        vision_frozen=model.vision_frozen,
        optimizer_state_bytes=optimizer_bytes,
    )
    plan.memory_estimate_mib = estimate_memory(
        model, plan, shapes or ActivationShapes.for_model(model)
    )
    return plan


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


def lora_parameter_count(
    model: VQAModel,
    tower: str,
    targets: str,
    r: int,
    layers: tuple[int, ...] | None = None,
    variant: str = "lora",
) -> int:
    """Exact LoRA parameter count for rank r on the chosen layers of a tower (no injection
    needed): r (in + out) per adapted linear layer, plus out for DoRA's magnitude vector.
    ``tower``: "text" (the text encoder, as in the seed), "vision", "decoder" or "projector"."""
    tower = {"text": "text_encoder", "decoder": "text_decoder"}.get(tower, tower)
    if not tower_exists(model, tower):
        return 0
    stack = model.tower_layers(tower)
    chosen = [model.projector] if stack is None else list(stack)
    if layers is not None:
        chosen = [chosen[i - 1] for i in layers]
    names = resolve_targets(targets, tower_layout(model, tower), chosen[0])
    total = 0
    for layer in chosen:
        for name, sub in layer.named_modules():
            name = name.removesuffix(".base_layer")  # a model that holds LoRA already
            if (
                isinstance(sub, nn.Linear)
                and ".lora_" not in name
                and name.rsplit(".", 1)[-1] in names
            ):
                total += r * (sub.in_features + sub.out_features)
                total += sub.out_features if variant == "dora" else 0
    return total


# -- the printed plan -----------------------------------------------------------------------
def format_plan(plan: AdaptationPlan, per_layer: bool = True) -> str:
    """The coverage table printed by ``vqadapt plan`` (one fixed format)."""
    lines = [f"strategy: {plan.strategy}", ""]
    if plan.choices:
        lines.append(
            "towers: " + ", ".join(f"{tower} {choice}" for tower, choice in plan.choices.items())
        )
        lines.append("")
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
    lines += ["", *format_memory(plan)]
    return "\n".join(lines)

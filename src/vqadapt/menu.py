"""The adaptation menu: one grammar for what each of the four towers does.

The towers are the vision encoder, the projector, the text encoder and the text decoder. Each
gets one choice, in the same grammar:

| choice | what trains |
|---|---|
| ``frozen`` | nothing |
| ``full`` | every parameter of the tower, its embeddings included |
| ``last_n:N`` | the last N layers and what runs after them (the final norm); embeddings and the earlier layers stay frozen |
| ``lora`` | peft LoRA adapters on the ``*_lora_targets`` of the layers in ``*_lora_layers``; every base weight frozen |
| ``last_n:N+lora`` | both: adapters on the chosen layers, the last N layers fully |

The projector (two linear layers, no layer stack) takes ``frozen``, ``full`` or ``lora``.

The seed's flags are this grammar's first spelling and keep working: ``--unfreeze_encoder_layers
N`` is ``--text_encoder last_n:N``, ``--use_text_lora`` is ``--text_encoder lora`` (both together:
``last_n:N+lora``), ``--use_vision_lora`` is ``--vision_encoder lora``. A tower choice given
next to a seed flag that says something else is refused, never silently preferred.

No torch here: ``vqadapt.config`` checks every choice at construction, and ``vqadapt train
--help`` must not wait for torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vqadapt.errors import VQAConfigError

TOWERS = ("vision", "projector", "text_encoder", "text_decoder")
# The flag that sets each tower's choice, and the prefix of its LoRA settings (the seed's
# ``text_lora_*`` and ``vision_lora_*``, and the new towers').
TOWER_FLAGS = {
    "vision": "vision_encoder",
    "projector": "projector",
    "text_encoder": "text_encoder",
    "text_decoder": "text_decoder",
}
LORA_PREFIXES = {
    "vision": "vision",
    "projector": "projector",
    "text_encoder": "text",
    "text_decoder": "decoder",
}
TRACKERS = ("tensorboard", "wandb", "mlflow")
# Towers whose layers can recompute their activations in the backward pass.
CHECKPOINTABLE = ("vision", "text_encoder", "text_decoder")
ALL_LINEAR = "all-linear"

_LAST_N = re.compile(r"last_n:(\d+)")


@dataclass(frozen=True)
class TowerChoice:
    """What trains in one tower: everything (``full``), the last ``last_n`` layers, LoRA
    adapters (``lora``), or a mix of the last two; nothing when all are off."""

    full: bool = False
    last_n: int = 0
    lora: bool = False

    @property
    def frozen(self) -> bool:
        return not (self.full or self.last_n or self.lora)

    def __str__(self) -> str:
        if self.full:
            return "full"
        parts = ([f"last_n:{self.last_n}"] if self.last_n else []) + (["lora"] if self.lora else [])
        return "+".join(parts) or "frozen"


FROZEN = TowerChoice()
FULL = TowerChoice(full=True)


def parse_choice(text: str, tower: str) -> TowerChoice:
    """A tower choice from its text (``frozen``, ``full``, ``last_n:N``, ``lora``,
    ``last_n:N+lora``); a ``VQAConfigError`` naming the flag otherwise."""
    flag = f"--{TOWER_FLAGS[tower]}"
    grammar = "frozen, full, last_n:N, lora or last_n:N+lora"
    if tower == "projector":
        grammar = "frozen, full or lora (the projector has no layer stack for last_n)"
    parts = [part.strip() for part in text.strip().split("+")]
    last_n, lora, words = 0, False, set()
    for part in parts:
        match = _LAST_N.fullmatch(part)
        if match and tower != "projector":
            last_n = int(match[1])
            if last_n < 1:
                raise VQAConfigError(f"{flag} {text!r}: last_n needs N >= 1 (frozen trains none)")
            words.add("last_n")
        elif part == "lora":
            lora = True
            words.add("lora")
        elif part in ("frozen", "full") and len(parts) == 1:
            return FULL if part == "full" else FROZEN
        else:
            raise VQAConfigError(f"{flag} must be one of {grammar} (got {text!r})")
    if len(words) != len(parts):
        raise VQAConfigError(f"{flag} {text!r} names a part twice")
    return TowerChoice(last_n=last_n, lora=lora)


def parse_layers(text: str, flag: str) -> tuple[int, ...] | None:
    """``all`` (None) or 1-based layer numbers and ranges (``10-12``, ``1,3,5-6``), sorted."""
    if text.strip() == "all":
        return None
    numbers: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise VQAConfigError(
                f"--{flag} must be 'all' or 1-based layer numbers and ranges such as 10-12 or "
                f"1,3,5-6 (got {text!r})"
            )
        first, last = int(match[1]), int(match[2] or match[1])
        if first < 1 or last < first:
            raise VQAConfigError(f"--{flag}: {item!r} is not a range of layers counted from 1")
        numbers.update(range(first, last + 1))
    return tuple(sorted(numbers))


def seed_choices(adapt: Any) -> dict[str, TowerChoice]:
    """What the seed's flags say, for the two encoders they cover."""
    return {
        "vision": TowerChoice(lora=True) if adapt.use_vision_lora else FROZEN,
        "text_encoder": TowerChoice(last_n=adapt.unfreeze_encoder_layers, lora=adapt.use_text_lora),
    }


def resolve(adapt: Any) -> dict[str, TowerChoice]:
    """Every tower's choice, from the tower flags and the seed's flags (an ``AdaptConfig``).

    A tower flag left unset (null) takes the seed flags' meaning; a tower flag given beside a
    seed flag that asks for something else is an error."""
    seeds = seed_choices(adapt)
    seed_flags = {
        "vision": "--use_vision_lora",
        "text_encoder": "--unfreeze_encoder_layers / --use_text_lora",
    }
    out = {}
    for tower in TOWERS:
        text = getattr(adapt, TOWER_FLAGS[tower])
        seed = seeds.get(tower)
        if text is None:
            out[tower] = seed if seed is not None else FULL
            continue
        choice = parse_choice(text, tower)
        if seed is not None and not seed.frozen and seed != choice:
            raise VQAConfigError(
                f"--{TOWER_FLAGS[tower]} {text} contradicts {seed_flags[tower]} (which say "
                f"{seed}): give one of them"
            )
        out[tower] = choice
    return out


@dataclass(frozen=True)
class LoraSpec:
    """One tower's LoRA settings."""

    r: int
    alpha: float
    dropout: float
    targets: str  # "auto", "all-linear" or comma-separated names
    layers: tuple[int, ...] | None  # 1-based; None: every layer
    variant: str  # lora, dora, rslora or pissa (config.LORA_VARIANTS)

    @property
    def scaling(self) -> float:
        """What peft multiplies B A by: alpha / r, or alpha / sqrt(r) for rsLoRA."""
        return self.alpha / (self.r**0.5 if self.variant == "rslora" else self.r)


def lora_spec(adapt: Any, tower: str) -> LoraSpec:
    """The LoRA settings of ``tower`` (its ``<prefix>_lora_*`` fields and ``lora_variant``)."""
    prefix = LORA_PREFIXES[tower]

    def value(name: str) -> Any:
        return getattr(adapt, f"{prefix}_lora_{name}")

    layers = (
        None if tower == "projector" else parse_layers(value("layers"), f"{prefix}_lora_layers")
    )
    return LoraSpec(
        r=value("r"),
        alpha=value("alpha"),
        dropout=value("dropout"),
        targets=value("targets").strip(),
        layers=layers,
        variant=adapt.lora_variant,
    )


def parse_names(text: str, allowed: tuple[str, ...], flag: str, none_ok: bool = False) -> tuple:
    """A comma-separated subset of ``allowed`` (``all``: every one; ``none``: empty when
    ``none_ok``), in ``allowed``'s order."""
    words = [word.strip() for word in text.split(",") if word.strip()]
    if words == ["all"]:
        return allowed
    if none_ok and words == ["none"]:
        return ()
    unknown = [word for word in words if word not in allowed]
    if unknown or not words:
        also = ", none" if none_ok else ""
        raise VQAConfigError(
            f"--{flag} must be all{also} or a comma-separated list of {', '.join(allowed)} "
            f"(got {text!r})"
        )
    return tuple(name for name in allowed if name in words)

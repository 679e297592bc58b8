"""Where things are in a ``VQAModel``: the tower and layer of every parameter, and where
something trains (per tower, per layer, before the layers).

Read by the one function that decides what trains (``adapt``), by the memory estimate
(``memory``) and by the loop's per-tower gradient norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from vqadapt.backbones import TowerLayout
from vqadapt.menu import TOWERS
from vqadapt.model import VQAModel


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


def _layer_prefixes(model: VQAModel) -> list[tuple[str, str]]:
    prefixes = [
        ("text_encoder", f"text.{model.text_layout.layers_path}."),
        ("text_decoder", f"text.{model.text_family.decoder_layers_path}."),
    ]
    if model.vision_layout is not None:
        prefixes.append(("vision", f"vision.{model.vision_layout.layers_path}."))
    return prefixes


def layer_of(model: VQAModel, name: str) -> tuple[str, int] | None:
    """(tower, 1-based layer index) for parameters inside a layer of a layer stack."""
    for tower, prefix in _layer_prefixes(model):
        if name.startswith(prefix):
            return tower, int(name[len(prefix) :].split(".", 1)[0]) + 1
    return None


def before_layer_params(model: VQAModel) -> dict[str, Any]:
    """What runs before each tower's layers (its embeddings): frozen unless ``full``."""
    head = model.text.get_output_embeddings()
    return {
        "text_encoder": {id(model.text_encoder.get_input_embeddings().weight)},
        "text_decoder": {
            id(model.text.get_decoder().get_input_embeddings().weight),
            *([id(head.weight)] if head is not None else []),
        },
        "vision": tuple(f"vision.{path}." for path in model.vision_family.before_layers)
        if model.vision_family is not None
        else (),
    }


def is_before_layers(tower: str, name: str, param: nn.Parameter, before: dict) -> bool:
    if tower == "vision":
        return name.startswith(before["vision"])
    if tower in ("text_encoder", "text_decoder"):
        return id(param) in before[tower] or "embed" in name
    return False


def tower_layout(model: VQAModel, tower: str) -> TowerLayout | None:
    return {
        "vision": model.vision_layout,
        "text_encoder": model.text_layout,
        "text_decoder": model.decoder_layout,
        "projector": None,
    }[tower]


def tower_exists(model: VQAModel, tower: str) -> bool:
    return tower not in ("vision", "projector") or model.vision is not None


@dataclass
class TrainingMap:
    """Where something trains: per tower, per (tower, 1-based layer), and before the layers."""

    towers: dict[str, bool]
    layers: dict[tuple[str, int], bool]
    before_layers: dict[str, bool]

    @classmethod
    def of(cls, model: VQAModel) -> TrainingMap:
        towers_of = parameter_towers(model)
        before = before_layer_params(model)
        out = cls({t: False for t in TOWERS}, {}, {t: False for t in TOWERS})
        for name, param in model.named_parameters():
            tower, trains = towers_of[name], param.requires_grad
            out.towers[tower] |= trains
            where = layer_of(model, name)
            if where is not None:
                out.layers[where] = out.layers.get(where, False) or trains
            elif is_before_layers(tower, name, param, before):
                out.before_layers[tower] |= trains
        return out

    def first_trained_layer(self, tower: str, depth: int) -> int | None:
        """The first layer (1-based) the backward pass goes through in a tower trained on its
        own: 1 when its embeddings train, else its first layer with anything trainable."""
        if not self.towers[tower]:
            return None
        if self.before_layers[tower]:
            return 1
        return next((i for i in range(1, depth + 1) if self.layers.get((tower, i))), None)


def lora_modules(model: VQAModel) -> dict[str, list[str]]:
    """The LoRA-wrapped modules of each tower, by name."""
    out: dict[str, list[str]] = {tower: [] for tower in TOWERS}
    towers = parameter_towers(model)
    for name in towers:
        if ".lora_" in name:
            module = name.split(".lora_", 1)[0]
            if module not in out[towers[name]]:
                out[towers[name]].append(module)
    return out

"""Load the pretrained towers by hub id or local folder, and know each family's layout.

Later code (LoRA targets, "unfreeze the last N layers", per-layer reports, prefix caching)
asks this module for a family's encoder layer list and attention projection names instead of
hard-coding them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vqadapt.errors import VQAConfigError

# Attention projection names by convention, tried in this order on the first encoder layer.
PROJECTION_NAME_SETS: tuple[tuple[str, str, str], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # MBart, BART, BARTpho, DINOv2 (transformers 5), CLIP, SigLIP
    ("q", "k", "v"),  # T5, mT5, ViT5
    ("query", "key", "value"),  # older ViT / DINOv2 checkpoints
)

# Where each family keeps its encoder layers (attribute paths from the loaded model).
TEXT_ENCODER_LAYERS = {
    "mbart": "model.encoder.layers",
    "bart": "model.encoder.layers",
    "t5": "encoder.block",
    "mt5": "encoder.block",
}
VISION_ENCODER_LAYERS = {
    "dinov2": "encoder.layer",
    "dinov2_with_registers": "encoder.layer",
    "vit": "encoder.layer",
    "clip_vision_model": "encoder.layers",
    "siglip_vision_model": "encoder.layers",
}


@dataclass(frozen=True)
class TowerLayout:
    """Names inside one loaded tower, relative to the tower module."""

    family: str
    layers_path: str
    num_layers: int
    projections: tuple[str, ...]

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


def get_submodule(module: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def find_projections(layer: nn.Module) -> tuple[str, ...]:
    """The q/k/v projection names this layer uses (first matching convention)."""
    leaf_names = {
        name.rsplit(".", 1)[-1] for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)
    }
    for names in PROJECTION_NAME_SETS:
        if set(names) <= leaf_names:
            return names
    raise VQAConfigError(
        f"could not find attention projections in {type(layer).__name__}; "
        f"linear layers present: {sorted(leaf_names)}"
    )


def _layout(model: nn.Module, table: dict[str, str], what: str) -> TowerLayout:
    family = model.config.model_type
    if family not in table:
        raise VQAConfigError(
            f"{what} model family {family!r} is not supported; use one of {sorted(table)}"
        )
    layers = get_submodule(model, table[family])
    return TowerLayout(family, table[family], len(layers), find_projections(layers[0]))


def text_layout(model: nn.Module) -> TowerLayout:
    return _layout(model, TEXT_ENCODER_LAYERS, "text")


def vision_layout(model: nn.Module) -> TowerLayout:
    return _layout(model, VISION_ENCODER_LAYERS, "vision")


def resolve_targets(requested: str, layout: TowerLayout, layer: nn.Module) -> tuple[str, ...]:
    """Turn ``--*_lora_targets`` ("auto" or "a,b,c") into projection names that exist."""
    if requested.strip() == "auto":
        return layout.projections
    names = tuple(name.strip() for name in requested.split(",") if name.strip())
    present = {
        name.rsplit(".", 1)[-1] for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)
    }
    missing = [name for name in names if name not in present]
    if not names or missing:
        raise VQAConfigError(
            f"LoRA target(s) {missing or requested!r} match no linear layer of a {layout.family} "
            f"encoder layer; available: {', '.join(sorted(present))}"
        )
    return names


def check_source(name_or_path: str, what: str) -> None:
    """Fail early, with a useful message, on a path that is not a model folder."""
    path = Path(name_or_path)
    # A hub id is "name" or "org/name"; anything else (or anything on disk) is a local folder.
    looks_local = (
        path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    )
    if looks_local:
        if not path.exists():
            raise VQAConfigError(f"{what} folder not found: {path}")
        if not (path / "config.json").is_file():
            raise VQAConfigError(
                f"{path} is not a {what} folder: it has no config.json "
                "(expected a folder written by save_pretrained)"
            )


def _offline_hint(name: str, what: str, err: Exception) -> VQAConfigError:
    return VQAConfigError(
        f"could not load {what} {name!r}: {err}\n"
        "If this machine has no network, download the model elsewhere "
        f"(`huggingface-cli download {name} --local-dir DIR`) and pass the local folder, "
        "or set HF_HOME to a cache that holds it (HF_HUB_OFFLINE=1)."
    )


def load_vision(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The vision encoder alone (a CLIP/SigLIP checkpoint gives its vision tower)."""
    from transformers import AutoConfig, AutoModel

    check_source(name_or_path, "vision model")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if config.model_type in ("clip", "siglip"):
            from transformers import CLIPVisionModel, SiglipVisionModel

            klass = CLIPVisionModel if config.model_type == "clip" else SiglipVisionModel
            return klass.from_pretrained(name_or_path)
        return AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _offline_hint(name_or_path, "vision model", err) from err


def load_text(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The seq2seq text model with its LM head."""
    from transformers import AutoModelForSeq2SeqLM

    check_source(name_or_path, "text model")
    try:
        return AutoModelForSeq2SeqLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _offline_hint(name_or_path, "text model", err) from err


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise _offline_hint(name_or_path, "tokenizer", err) from err


@dataclass(frozen=True)
class ImagePreprocessing:
    """Resize (shortest edge), centre crop and normalise, read from the model's image processor.

    Done by hand (PIL + torch): crops are decoded as uint8 in worker processes and normalised
    where the tower runs.
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def normalise(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> float, normalised (on the pixels' device)."""
        mean = torch.tensor(self.mean, device=pixels_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels_uint8.device).view(1, 3, 1, 1)
        return (pixels_uint8.float() / 255.0 - mean) / std

    def to_dict(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def load_image_preprocessing(name_or_path: str) -> ImagePreprocessing:
    """Read size, crop and normalisation from ``preprocessor_config.json``."""
    from transformers.utils import cached_file

    try:
        config_file = cached_file(name_or_path, "preprocessor_config.json")
    except OSError as err:
        raise _offline_hint(name_or_path, "image processor", err) from err
    values = json.loads(Path(config_file).read_text(encoding="utf-8"))
    size = values.get("size", 224)
    if isinstance(size, dict):
        resize = size.get("shortest_edge") or size.get("height") or 224
    else:
        resize = int(size)
    crop = values.get("crop_size", resize) if values.get("do_center_crop", True) else resize
    if isinstance(crop, dict):
        crop = crop.get("height", resize)
    return ImagePreprocessing(
        resize=int(resize),
        crop=int(crop),
        mean=tuple(values.get("image_mean", (0.485, 0.456, 0.406))),
        std=tuple(values.get("image_std", (0.229, 0.224, 0.225))),
    )

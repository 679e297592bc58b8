"""Load the pretrained towers by hub id or local folder, and know each family's layout.

Later code (LoRA targets, "unfreeze the last N layers", per-layer reports, prefix caching)
asks for a tower's layout (its family's layer list and attention projection names, from
``families.py``) instead of hard-coding them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vqadapt.errors import VQAConfigError
from vqadapt.families import get_submodule, text_family, vision_family

__all__ = ["TowerLayout", "decoder_layout", "get_submodule", "text_layout", "vision_layout"]


@dataclass(frozen=True)
class TowerLayout:
    """Names inside one loaded tower, relative to the tower module (from its family)."""

    family: str
    layers_path: str
    num_layers: int
    projections: tuple[str, ...]

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_path}.{index}."


def linear_names(layer: nn.Module) -> set[str]:
    """Leaf names of the linear layers inside one layer (a LoRA-wrapped one by its own name)."""
    return {
        name.removesuffix(".base_layer").rsplit(".", 1)[-1]
        for name, mod in layer.named_modules()
        if isinstance(mod, nn.Linear) and ".lora_" not in name
    }


def _layout(model: nn.Module, family) -> TowerLayout:
    layers = get_submodule(model, family.layers_path)
    present = linear_names(layers[0])
    if not set(family.projections) <= present:
        raise VQAConfigError(
            f"a {model.config.model_type} encoder layer has no {'/'.join(family.projections)} projections; "
            f"linear layers present: {sorted(present)}"
        )
    return TowerLayout(
        model.config.model_type, family.layers_path, len(layers), tuple(family.projections)
    )


def text_layout(model: nn.Module) -> TowerLayout:
    return _layout(model, text_family(model))


def decoder_layout(model: nn.Module) -> TowerLayout:
    """The decoder's layers: the family's ``decoder_layers_path``, the same projection names
    (they name self- and cross-attention alike)."""
    family = text_family(model)
    layers = get_submodule(model, family.decoder_layers_path)
    return TowerLayout(
        model.config.model_type, family.decoder_layers_path, len(layers), tuple(family.projections)
    )


def vision_layout(model: nn.Module) -> TowerLayout:
    return _layout(model, vision_family(model))


def resolve_targets(
    requested: str, layout: TowerLayout | None, layer: nn.Module
) -> tuple[str, ...]:
    """Turn ``--*_lora_targets`` ("auto", "all-linear" or "a,b,c") into names of linear layers
    that exist in ``layer`` (one layer of the stack, or the projector); ``layout`` None: "auto"
    is every linear layer too (the projector)."""
    present = linear_names(layer)
    if requested.strip() == "all-linear" or (requested.strip() == "auto" and layout is None):
        return tuple(sorted(present))
    if requested.strip() == "auto":
        return layout.projections
    names = tuple(name.strip() for name in requested.split(",") if name.strip())
    missing = [name for name in names if name not in present]
    if not names or missing:
        raise VQAConfigError(
            f"LoRA target(s) {missing or requested!r} match no linear layer of "
            f"{f'a {layout.family} layer' if layout else 'the projector'}; available: "
            f"{', '.join(sorted(present))}"
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


@contextlib.contextmanager
def loading(name_or_path: str, what: str) -> Iterator[None]:
    """One message for whatever loading a tower, tokenizer or image processor raises: code
    that needs ``--trust_remote_code``, a damaged local folder, a hub id out of reach."""
    try:
        yield
    except VQAConfigError:
        raise
    except Exception as err:
        text = str(err)
        if "trust_remote_code" in text or "custom code" in text:
            raise VQAConfigError(
                f"the {what} {name_or_path} comes with code of its own (an auto_map or a custom "
                "model type): vqadapt runs such code only when --trust_remote_code is given on "
                "the command line, never because a stored setting (a run's config.yaml) says "
                "so. Nothing of it was run."
            ) from None
        if Path(name_or_path).exists():
            first = text.strip().splitlines()[0][:300] if text.strip() else type(err).__name__
            raise VQAConfigError(
                f"could not load the {what} from {name_or_path}: its files are damaged or "
                f"not a model folder ({type(err).__name__}: {first})"
            ) from None
        if isinstance(err, OSError):
            raise _offline_hint(name_or_path, what, err) from None
        raise VQAConfigError(f"could not load the {what} {name_or_path!r}: {err}") from None


def load_config(name_or_path: str, what: str, trust_remote_code: bool = False):
    """A tower's ``config.json`` (no weights), with ``loading``'s messages."""
    from transformers import AutoConfig

    check_source(name_or_path, what)
    with loading(name_or_path, what):
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def load_vision(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The vision encoder alone (a CLIP/SigLIP checkpoint gives its vision tower)."""
    from transformers import AutoModel

    config = load_config(name_or_path, "vision model", trust_remote_code)
    with loading(name_or_path, "vision model"):
        if config.model_type in ("clip", "siglip"):
            from transformers import CLIPVisionModel, SiglipVisionModel

            klass = CLIPVisionModel if config.model_type == "clip" else SiglipVisionModel
            return klass.from_pretrained(name_or_path)
        return AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def load_text(name_or_path: str, trust_remote_code: bool = False) -> nn.Module:
    """The seq2seq text model with its LM head."""
    from transformers import AutoModelForSeq2SeqLM

    check_source(name_or_path, "text model")
    with loading(name_or_path, "text model"):
        return AutoModelForSeq2SeqLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with loading(name_or_path, "tokenizer"):
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


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

    with loading(name_or_path, "image processor"):
        config_file = cached_file(name_or_path, "preprocessor_config.json")
        values = json.loads(Path(config_file).read_text(encoding="utf-8"))
        if not isinstance(values, dict):
            raise ValueError("preprocessor_config.json is not a JSON object")
        return _preprocessing(values)


def _preprocessing(values: dict) -> ImagePreprocessing:
    size = values.get("size", 224)
    if isinstance(size, dict):
        resize = size.get("shortest_edge") or size.get("height") or 224
    else:
        resize = int(size)
    crop = values.get("crop_size", resize) if values.get("do_center_crop", True) else resize
    if isinstance(crop, dict):
        crop = crop.get("height", resize)
    mean = tuple(float(v) for v in values.get("image_mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in values.get("image_std", (0.229, 0.224, 0.225)))
    if int(resize) <= 0 or int(crop) <= 0 or len(mean) != 3 or len(std) != 3 or 0 in std:
        raise ValueError(f"impossible preprocessing: size {resize}, crop {crop}, std {std}")
    return ImagePreprocessing(resize=int(resize), crop=int(crop), mean=mean, std=std)

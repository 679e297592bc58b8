"""Checkpoints hold only what trained: peft adapters in peft's own format + other trained modules.

Layout of ``best/`` and ``last/``::

    trained.safetensors          decoder side, projector, unfrozen encoder layers (no frozen weight)
    adapters/text/               adapter_config.json + adapter_model.safetensors (peft format,
    adapters/vision/             loadable with PeftModel.from_pretrained on the tower alone)
    training_state.pt            optimizer, scheduler, RNG and loop state (last/ only; tensors and
                                 plain containers only, loaded with weights_only=True)

A checkpoint folder is written beside its final place and renamed into it, so a run directory
never holds a half-written checkpoint.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vqadapt.model import VQAModel

TRAINED_FILE = "trained.safetensors"
STATE_FILE = "training_state.pt"


def trained_state(model: VQAModel) -> dict[str, torch.Tensor]:
    """Trained parameters outside LoRA adapters (names as in ``model.named_parameters()``)."""
    return {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and ".lora_" not in name
    }


def _towers_with_lora(model: VQAModel) -> dict[str, torch.nn.Module]:
    towers = {"text": model.text, "vision": model.vision}
    return {
        name: tower
        for name, tower in towers.items()
        if tower is not None and hasattr(tower, "peft_config")
    }


def save_checkpoint(
    model: VQAModel,
    folder: str | Path,
    training_state: dict[str, Any] | None = None,
    base_models: dict[str, str] | None = None,
) -> Path:
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.writing-{time.time_ns()}")
    tmp.mkdir(parents=True)
    save_file(trained_state(model), str(tmp / TRAINED_FILE))
    for name, tower in _towers_with_lora(model).items():
        adapter_dir = tmp / "adapters" / name
        adapter_dir.mkdir(parents=True)
        config = tower.peft_config["default"]
        config.base_model_name_or_path = (base_models or {}).get(name)
        config.save_pretrained(str(adapter_dir))
        state = get_peft_model_state_dict(tower, adapter_name="default")
        state = {
            f"base_model.model.{key}": value.detach().cpu().contiguous()
            for key, value in state.items()
        }
        save_file(state, str(adapter_dir / "adapter_model.safetensors"))
    if training_state is not None:
        torch.save(training_state, tmp / STATE_FILE)
    # Swap in: the old folder is moved aside first, so some complete checkpoint always exists.
    old = folder.with_name(f".{folder.name}.old-{time.time_ns()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_checkpoint(folder: str | Path) -> Path:
    """Repair what a kill during ``save_checkpoint`` can leave, and return ``folder``.

    A kill between its two renames leaves no ``folder`` but a complete ``.NAME.old-*`` beside
    it: that one is put back. Half-written ``.NAME.writing-*`` folders are removed.
    """
    folder = Path(folder)
    for partial in folder.parent.glob(f".{folder.name}.writing-*"):
        shutil.rmtree(partial, ignore_errors=True)
    olds = sorted(folder.parent.glob(f".{folder.name}.old-*"))
    if not folder.exists() and olds:
        olds[-1].rename(folder)
        olds = olds[:-1]
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(model: VQAModel, folder: str | Path) -> None:
    """Load trained weights into a model built (and adapted) with the same settings."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    state = load_file(str(folder / TRAINED_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise ValueError(f"{folder / TRAINED_FILE}: weights for unknown parameters {unknown[:5]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    for name, tower in _towers_with_lora(model).items():
        path = folder / "adapters" / name / "adapter_model.safetensors"
        adapter = load_file(str(path))
        adapter = {key.removeprefix("base_model.model."): value for key, value in adapter.items()}
        result = set_peft_model_state_dict(tower, adapter, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{path}: unexpected adapter weights {result.unexpected_keys[:5]}")


def load_training_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)

"""Checkpoints hold only what trained: peft adapters in peft's own format + other trained modules.

Layout of ``best/`` and ``last/``::

    trained.safetensors          decoder side, projector, unfrozen encoder layers (no frozen weight)
    adapters/text/               adapter_config.json + adapter_model.safetensors (peft format,
    adapters/vision/             loadable with PeftModel.from_pretrained on the tower alone)
    training_state.pt            optimizer, scheduler, RNG and loop state (last/ only; tensors and
                                 plain containers only, loaded with weights_only=True)

A checkpoint folder is written beside its final place and swapped into it (``folders.swap_in``),
so a run directory never holds a half-written checkpoint. A damaged checkpoint file (truncated,
zeroed, replaced) is reported as ``VQADataError`` naming the file, never loaded.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqadapt.errors import VQADataError, VQATrainingError
from vqadapt.folders import recover_swap, staged, swap_in
from vqadapt.model import VQAModel

TRAINED_FILE = "trained.safetensors"
STATE_FILE = "training_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"


def trained_state(
    model: VQAModel, full_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Trained parameters outside LoRA adapters (names as in ``model.named_parameters()``).

    ``full_state``: the model's whole state dict as gathered by ``accelerator.get_state_dict``
    (under sharded training the parameters themselves hold only this process's shard).
    """
    return {
        name: (param if full_state is None else full_state[name]).detach().cpu().clone()
        for name, param in model.named_parameters()
        if param.requires_grad and ".lora_" not in name
    }


def towers_with_lora(model: VQAModel) -> dict[str, torch.nn.Module]:
    towers = {"text": model.text, "vision": model.vision}
    return {
        name: tower
        for name, tower in towers.items()
        if tower is not None and hasattr(tower, "peft_config")
    }


def save_adapter(
    tower: torch.nn.Module,
    folder: Path,
    base_model: str | None,
    tower_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """One tower's LoRA adapter in peft's own format (``PeftModel.from_pretrained`` loads it);
    ``tower_state``: the tower's gathered state dict, if not its own parameters."""
    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True)
    config = tower.peft_config["default"]
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(tower, state_dict=tower_state, adapter_name="default")
    _refuse_partitioned(state)
    state = {
        f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()
    }
    save_file(state, str(folder / ADAPTER_FILE))


def load_adapter(tower: torch.nn.Module, folder: Path) -> None:
    """Load an adapter saved by ``save_adapter`` into a tower that already holds LoRA layers."""
    from peft import set_peft_model_state_dict

    path = folder / ADAPTER_FILE
    with damaged_file(path):
        adapter = load_file(str(path))
    adapter = {key.removeprefix("base_model.model."): value for key, value in adapter.items()}
    result = set_peft_model_state_dict(tower, adapter, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise VQADataError(f"unexpected adapter weights {result.unexpected_keys[:5]}", file=path)
    missing = [key for key in getattr(result, "missing_keys", ()) if ".lora_" in key]
    if missing:
        raise VQADataError(f"adapter weights missing for {missing[:5]}", file=path)


def _refuse_partitioned(state: dict[str, torch.Tensor]) -> None:
    """Never write an empty checkpoint: under DeepSpeed ZeRO-3 (or FSDP without a full state
    dict) each process holds 0-element placeholders instead of the parameters."""
    empty = [name for name, value in state.items() if value.numel() == 0]
    if empty:
        raise VQATrainingError(
            f"refusing to save a checkpoint with {len(empty)} empty tensors (e.g. {empty[0]}): "
            "the parameters are partitioned across processes (DeepSpeed ZeRO-3?). Use DDP or "
            "ZeRO-2 (configs/accelerate/): the towers trained here fit on one device"
        )


def save_checkpoint(
    model: VQAModel,
    folder: str | Path,
    training_state: dict[str, Any] | None = None,
    base_models: dict[str, str] | None = None,
    full_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``folder`` whole or not at all (see the module docstring for its layout)."""
    folder = Path(folder)
    trained = trained_state(model, full_state)
    _refuse_partitioned(trained)
    with staged(folder) as tmp:
        save_file(trained, str(tmp / TRAINED_FILE))
        for name, tower in towers_with_lora(model).items():
            tower_state = None
            if full_state is not None:
                prefix = f"{name}."
                tower_state = {
                    key[len(prefix) :]: value
                    for key, value in full_state.items()
                    if key.startswith(prefix)
                }
            save_adapter(tower, tmp / "adapters" / name, (base_models or {}).get(name), tower_state)
        if training_state is not None:
            torch.save(training_state, tmp / STATE_FILE)
        swap_in(tmp, folder)  # the old one is moved aside first: some complete one always exists
    return folder


def recover_checkpoint(folder: str | Path) -> Path:
    """Repair what a kill during ``save_checkpoint`` can leave (see ``folders.recover_swap``)."""
    return recover_swap(folder)


@contextlib.contextmanager
def damaged_file(path: Path) -> Iterator[None]:
    """Turn the errors of reading a truncated, zeroed or foreign checkpoint file into one
    message naming it (weights are never read from such a file)."""
    try:
        yield
    except FileNotFoundError:
        raise VQADataError("checkpoint file missing", file=path) from None
    except pickle.UnpicklingError:
        raise VQADataError(
            "refused: it holds objects other than tensors and plain containers, and loading "
            "them could run code (a damaged or foreign file; never loaded)",
            file=path,
        ) from None
    except (SafetensorError, OSError, EOFError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VQADataError(
            f"damaged checkpoint file, not loaded ({first[:300]})", file=path
        ) from None


def load_checkpoint(model: VQAModel, folder: str | Path) -> None:
    """Load trained weights into a model built (and adapted) with the same settings, on
    whatever device the model is (the files hold CPU tensors)."""
    folder = Path(folder)
    with damaged_file(folder / TRAINED_FILE):
        state = load_file(str(folder / TRAINED_FILE))
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise VQADataError(
            f"weights for parameters this model does not have {unknown[:5]} (a checkpoint of "
            "other settings?)",
            file=folder / TRAINED_FILE,
        )
    wrong = [n for n, v in state.items() if v.shape != params[n].shape]
    if wrong:
        raise VQADataError(
            f"weights of the wrong shape for {wrong[:5]} (a checkpoint of other settings?)",
            file=folder / TRAINED_FILE,
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    for name, tower in towers_with_lora(model).items():
        load_adapter(tower, folder / "adapters" / name)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler, RNG and loop state, onto the CPU whatever device wrote them (the
    optimizer's ``load_state_dict`` then moves its state to the parameters' device)."""
    path = Path(folder) / STATE_FILE
    with damaged_file(path):
        state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "loop"} <= set(state):
        raise VQADataError("damaged checkpoint file: not a training state", file=path)
    return state

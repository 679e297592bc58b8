"""Checkpoints hold only what trained: peft adapters in peft's own format + other trained modules.

Layout of ``best/`` and ``last/``::

    trained.safetensors          what trains outside LoRA (decoder side, projector, unfrozen
                                 layers: no frozen weight), and the frozen base weights a PiSSA
                                 initialisation rewrote (the pretrained tower does not hold them)
    adapters/text/               adapter_config.json + adapter_model.safetensors (peft format,
    adapters/vision/             loadable with PeftModel.from_pretrained on the tower alone:
    adapters/decoder/            text encoder, vision encoder, text decoder (keys relative to
    adapters/projector/          the text model) and projector; one folder per tower with LoRA)
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

from vqadapt.adapt import ADAPTER_SITES
from vqadapt.errors import VQADataError, VQATrainingError
from vqadapt.folders import recover_swap, staged, swap_in
from vqadapt.model import VQAModel

TRAINED_FILE = "trained.safetensors"
STATE_FILE = "training_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"


def trained_state(
    model: VQAModel, full_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Trained parameters outside LoRA adapters (names as in ``model.named_parameters()``),
    and the frozen weights the LoRA initialisation rewrote (``model.rewritten_weights``).

    ``full_state``: the model's whole state dict as gathered by ``accelerator.get_state_dict``
    (under sharded training the parameters themselves hold only this process's shard).
    """
    rewritten = set(model.rewritten_weights)
    return {
        name: (param if full_state is None else full_state[name]).detach().cpu().clone()
        for name, param in model.named_parameters()
        if (param.requires_grad and ".lora_" not in name) or name in rewritten
    }


def lora_sites(model: VQAModel) -> dict[str, tuple[str, torch.nn.Module, str]]:
    """The towers with LoRA: adapter folder -> (attribute of the model, module, peft adapter
    name), in ``ADAPTER_SITES``'s order."""
    out = {}
    for folder, attribute, adapter in ADAPTER_SITES.values():
        module = getattr(model, attribute)
        if module is not None and adapter in getattr(module, "peft_config", {}):
            out[folder] = (attribute, module, adapter)
    return out


def save_adapter(
    tower: torch.nn.Module,
    folder: Path,
    base_model: str | None,
    tower_state: dict[str, torch.Tensor] | None = None,
    adapter: str = "default",
    base_rewritten: bool = False,
) -> None:
    """One tower's LoRA adapter in peft's own format (``PeftModel.from_pretrained`` loads it);
    ``tower_state``: the tower's gathered state dict, if not its own parameters.

    ``base_rewritten``: the base weights saved beside the adapter already hold what the
    adapter's initialisation made of them (an export of a PiSSA run holds the residual): its
    config then says ``init_lora_weights: true``, so that loading it initialises nothing."""
    import copy

    from peft import get_peft_model_state_dict

    folder.mkdir(parents=True)
    config = copy.copy(tower.peft_config[adapter])
    config.base_model_name_or_path = base_model
    if base_rewritten and isinstance(config.init_lora_weights, str):
        config.init_lora_weights = True
    config.save_pretrained(str(folder))
    state = get_peft_model_state_dict(tower, state_dict=tower_state, adapter_name=adapter)
    _refuse_partitioned(state)
    state = {
        f"base_model.model.{key}": value.detach().cpu().contiguous() for key, value in state.items()
    }
    save_file(state, str(folder / ADAPTER_FILE))


def load_adapter(tower: torch.nn.Module, folder: Path, adapter: str = "default") -> None:
    """Load an adapter saved by ``save_adapter`` into a tower that already holds LoRA layers
    (as ``adapter``: the tower may hold another adapter, the text model's other tower's)."""
    from peft import set_peft_model_state_dict

    path = folder / ADAPTER_FILE
    with damaged_file(path):
        weights = load_file(str(path))
    weights = {key.removeprefix("base_model.model."): value for key, value in weights.items()}
    result = set_peft_model_state_dict(tower, weights, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise VQADataError(f"unexpected adapter weights {result.unexpected_keys[:5]}", file=path)
    missing = [
        key
        for key in getattr(result, "missing_keys", ())
        if ".lora_" in key and f".{adapter}." in f"{key}."
    ]
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
        for folder_name, (attribute, tower, adapter) in lora_sites(model).items():
            tower_state = None
            if full_state is not None:
                prefix = f"{attribute}."
                tower_state = {
                    key[len(prefix) :]: value
                    for key, value in full_state.items()
                    if key.startswith(prefix)
                }
            base = (base_models or {}).get(attribute)
            save_adapter(tower, tmp / "adapters" / folder_name, base, tower_state, adapter)
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
    for folder_name, (_, tower, adapter) in lora_sites(model).items():
        load_adapter(tower, folder / "adapters" / folder_name, adapter)


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """Optimizer, scheduler, RNG and loop state, onto the CPU whatever device wrote them (the
    optimizer's ``load_state_dict`` then moves its state to the parameters' device)."""
    path = Path(folder) / STATE_FILE
    with damaged_file(path):
        state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "loop"} <= set(state):
        raise VQADataError("damaged checkpoint file: not a training state", file=path)
    return state

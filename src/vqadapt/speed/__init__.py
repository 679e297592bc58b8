"""Speed paths: faster ways to compute exactly what the library computes, chosen per device.

``vqadapt.model`` is the library's forward. The paths below compute the same function (each has
an equality test against the library, values and gradients) with less work, and one installer,
``install``, puts them onto a model: runner objects and module subclasses swapped in, no
module-level switches. Which paths a device gets is decided here only (``PROFILES``):

| path | what it saves | host sync | CPU | CUDA |
|---|---|---|---|---|
| ``packed_encoder`` | encoder layers on real tokens only (``packed.py``) | yes (``nonzero``) | on | off |
| ``lean_decoder`` | the decoder's per-call masks, cache objects, records (``decoder.py``) | no | on | on |
| ``absorbed_cross_attention`` | the key / value projection of every encoder state (``cross_attention.py``) | no | on | on |
| ``head_on_labels`` | the LM head at unlabelled positions | yes (boolean index) | on | off |
| ``fast_dropout`` | PyTorch's serial CPU ``bernoulli_`` (``dropout.py``) | no | on | off (CPU only) |
| ``key_multiple`` | slow CPU softmax rows (16 keys) / tensor-core alignment (8) | no | 16 | 8 |
| ``length_multiple`` | recompiles and odd shapes: question and answer lengths rounded up | no | 1 | 8 |

The CPU profile is the one measured in ``bench/train_speed.py``. On CUDA a path that syncs the
host with the device in every step is never on (the step must not wait for the GPU); the CUDA
column's other choices are FLOP and kernel-count reductions, not yet measured on a GPU:
``bench/gpu_check.sh`` times each of them on and off so that the profile can be set by
measurement. ``--speed_paths library`` runs the library path everywhere; ``--speed_paths
lean_decoder,key_multiple=8`` picks paths by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vqadapt.errors import VQAConfigError
from vqadapt.families import (
    ABSORBED_CROSS_ATTENTION,
    HEAD_ON_LABELS,
    LEAN_DECODER,
    PACKED_ENCODER,
)


@dataclass(frozen=True)
class SpeedPaths:
    """Which speed paths to use (see the module's table)."""

    packed_encoder: bool = False
    lean_decoder: bool = False
    absorbed_cross_attention: bool = False
    head_on_labels: bool = False
    fast_dropout: bool = False
    key_multiple: int = 1
    length_multiple: int = 1

    @classmethod
    def library(cls) -> SpeedPaths:
        return cls()

    @classmethod
    def for_device(cls, device: torch.device | str) -> SpeedPaths:
        return PROFILES.get(torch.device(device).type, LIBRARY)

    @classmethod
    def parse(cls, spec: str, device: torch.device | str) -> SpeedPaths:
        """``auto`` (the device's profile), ``library`` (none), or a comma-separated list of
        path names and ``key_multiple=N`` / ``length_multiple=N``."""
        spec = spec.strip()
        if spec == "auto":
            return cls.for_device(device)
        if spec in ("library", "none", ""):
            return cls.library()
        switches = {f.name for f in dataclasses.fields(cls) if f.type in (bool, "bool")}
        values: dict[str, object] = {}
        for item in (part.strip() for part in spec.split(",") if part.strip()):
            name, _, number = item.partition("=")
            if name in switches and not number:
                values[name] = True
            elif name in ("key_multiple", "length_multiple") and number.isdigit() and number != "0":
                values[name] = int(number)
            else:
                known = ", ".join(sorted(switches)) + ", key_multiple=N, length_multiple=N"
                raise VQAConfigError(
                    f"--speed_paths: unknown item {item!r}; use auto, library or a list of: {known}"
                )
        return cls(**values)

    def describe(self) -> str:
        on = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is True]
        sizes = [f"{name}={getattr(self, name)}" for name in ("key_multiple", "length_multiple")]
        return ", ".join(on + [s for s in sizes if not s.endswith("=1")]) or "library"


LIBRARY = SpeedPaths()
PROFILES: dict[str, SpeedPaths] = {
    "cpu": SpeedPaths(
        packed_encoder=True,
        lean_decoder=True,
        absorbed_cross_attention=True,
        head_on_labels=True,
        fast_dropout=True,
        key_multiple=16,
    ),
    "cuda": SpeedPaths(
        lean_decoder=True, absorbed_cross_attention=True, key_multiple=8, length_multiple=8
    ),
}


def install(model, paths: SpeedPaths) -> SpeedPaths:
    """Put ``paths`` onto ``model`` (and take off those not asked for); returns what was
    installed: the paths asked for that the model's text family supports. Call it after the
    adaptation (LoRA layers bring dropout modules of their own)."""
    from vqadapt.model import LibraryEncoder, TeacherForcing
    from vqadapt.speed import cross_attention
    from vqadapt.speed import dropout as fast
    from vqadapt.speed.decoder import FastTeacherForcing
    from vqadapt.speed.packed import PackedEncoder

    family = model.text_family

    def wanted(name: str) -> bool:
        return bool(getattr(paths, name)) and name in family.speed_paths

    drop = fast.dropout if paths.fast_dropout else F.dropout
    packed, lean, head = wanted(PACKED_ENCODER), wanted(LEAN_DECODER), wanted(HEAD_ON_LABELS)
    model.encoder_runner = PackedEncoder(family, drop) if packed else LibraryEncoder(family)
    model.teacher_forcing = (
        FastTeacherForcing(family, lean, head, drop) if lean or head else TeacherForcing(family)
    )
    absorbed = wanted(ABSORBED_CROSS_ATTENTION)
    if family.cross_attention is not None:
        cross_attention.install(model.text, family.cross_attention, absorbed)
    fast.use_fast_dropout(model, paths.fast_dropout)
    model.key_multiple = paths.key_multiple
    installed = SpeedPaths(
        packed_encoder=packed,
        lean_decoder=lean,
        absorbed_cross_attention=absorbed,
        head_on_labels=head,
        fast_dropout=paths.fast_dropout,
        key_multiple=paths.key_multiple,
        length_multiple=paths.length_multiple,
    )
    model.speed_paths = installed
    return installed


def round_lengths(batch: dict[str, torch.Tensor], multiple: int, pad_id: int) -> dict:
    """Pad a batch's question and answer lengths up to a multiple (static shape buckets):
    questions with ``pad_id`` (mask 0, cached prefix rows 0), answers with ``pad_id`` inputs and
    ignored labels. The losses and predictions do not change."""
    if multiple <= 1:
        return batch
    out = dict(batch)
    fills = {
        "input_ids": pad_id,
        "attention_mask": 0,
        "text_prefix": 0.0,
        "decoder_input_ids": pad_id,
        "labels": -100,
        "decoder_attention_mask": 0,
    }
    for key, fill in fills.items():
        value = batch.get(key)
        if value is None:
            continue
        extra = -value.shape[1] % multiple
        if extra:
            pad = (0, 0, 0, extra) if value.dim() == 3 else (0, extra)
            out[key] = F.pad(value, pad, value=fill)
    return out

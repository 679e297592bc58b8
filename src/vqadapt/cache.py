"""Never recompute what is frozen: vision features per image, the frozen text-encoder prefix per question.

A frozen tower gives the same output every epoch, so it runs once (in eval mode, no dropout)
and its output is stored under the cache folder in a safetensors file. The file name is a hash
of everything the output depends on: the tower's weights, the number of frozen layers, the
preprocessing and the exact inputs. The file also records that key and a checksum of its data:
a file whose key or checksum does not match (a different model, or a torn / corrupt file) is
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vqadapt.io import atomic_write

FORMAT_VERSION = "1"


def weights_digest(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (names, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_key(**parts: object) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def load_cached(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors, or None when absent, stale or corrupt."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if meta.get("key") != key or meta.get("version") != FORMAT_VERSION:
        return None
    try:
        sums = json.loads(meta.get("checksums", "{}"))
    except json.JSONDecodeError:
        return None
    if set(sums) != set(tensors) or any(_checksum(tensors[n]) != sums[n] for n in tensors):
        return None
    return tensors


def save_cached(path: Path, key: str, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    meta = {
        "key": key,
        "version": FORMAT_VERSION,
        "checksums": json.dumps({name: _checksum(t) for name, t in tensors.items()}),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def cached_or_compute(
    path: Path, key: str, compute: Callable[[], dict[str, torch.Tensor]], log: Callable[[str], None]
) -> dict[str, torch.Tensor]:
    found = load_cached(path, key)
    if found is not None:
        log(f"cache hit: {path.name}")
        return found
    if path.exists():
        log(f"cache {path.name} is stale or corrupt: rebuilding it")
    tensors = compute()
    save_cached(path, key, tensors)
    return tensors


@torch.no_grad()
def vision_features(
    model,
    pixels: torch.Tensor,
    preprocessing,
    runtime=None,
    batch_size: int = 64,
    embeddings_only=False,
) -> torch.Tensor:
    """Frozen vision tokens for every image (eval mode, on the runtime's device and under its
    precision); with ``embeddings_only``, the frozen patch + position embeddings the trainable
    layers start from (vision LoRA)."""
    from vqadapt.evaluate import model_runtime

    runtime = runtime or model_runtime(model)
    was_training = model.training
    model.eval()
    run = model.embed_image if embeddings_only else model.encode_image
    chunks = []
    for start in range(0, len(pixels), batch_size):
        chunk = runtime.move({"pixels": pixels[start : start + batch_size]})["pixels"]
        with runtime.autocast():
            chunks.append(run(preprocessing.normalise(chunk)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks) if chunks else torch.zeros(0)


@torch.no_grad()
def text_prefix_states(
    model, input_ids: Sequence[torch.Tensor], pad_id: int, runtime=None, batch_size: int = 256
) -> list[torch.Tensor]:
    """Hidden states after the frozen text-encoder prefix, one (length, d) tensor per question
    (computed on the runtime's device, under its precision)."""
    from torch.nn.utils.rnn import pad_sequence

    from vqadapt.evaluate import model_runtime

    runtime = runtime or model_runtime(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for start in range(0, len(input_ids), batch_size):
        ids = list(input_ids[start : start + batch_size])
        batch = pad_sequence(ids, batch_first=True, padding_value=pad_id)
        moved = runtime.move({"ids": batch, "mask": (batch != pad_id).long()})
        with runtime.autocast():
            states = model.encode_text_prefix(moved["ids"], moved["mask"]).float().cpu()
        out += [states[i, : len(ids[i])].clone() for i in range(len(ids))]
    model.train(was_training)
    return out


def pack(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Variable-length (length, d) tensors -> one flat tensor plus offsets."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    flat = torch.cat(sequences) if sequences else torch.zeros(0, 0)
    return {"flat": flat, "lengths": lengths}


def unpack(tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.split(tensors["flat"], tensors["lengths"].tolist()))

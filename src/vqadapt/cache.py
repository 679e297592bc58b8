"""Never recompute what is frozen: vision features per image, the frozen text-encoder prefix per
question, the frozen patch embeddings per image (vision LoRA).

A frozen tower gives the same output every epoch, so it runs once, in eval mode, on the run's
device under its compute precision, in large batches fed by an image stream
(``data.stream``), and its output is stored as a sharded cache (``shards.py``) under
``$VQADAPT_CACHE/features/``. The folder name is a hash of everything the output depends on:
the tower's weights, the number of frozen layers, the preprocessing, the exact inputs, the
storage dtype, the device type and the compute dtype. Runs and ablation cells with the same
frozen tower and preprocessing share it.

Storage is 16-bit (half of fp32's bytes, two per value):

- **fp16** when the towers compute in fp32 or fp16: 11 significant bits, 8 times finer than
  bf16's 8, so the cached path stays close to the uncached one (rounding error <= 2^-11
  relative). A finite value beyond fp16's range (65,504) would become inf: the build detects
  it, leaves a marker, and stores that cache in bf16 instead (same range as fp32).
- **bf16** when the towers compute in bf16: their outputs are bf16 already, so storing them
  in bf16 loses nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vqadapt.data.stream import HOST_HOLD_BYTES, image_stream, is_accelerator, prepare_crop
from vqadapt.runtime import Runtime
from vqadapt.shard_reader import RowReader
from vqadapt.shards import (
    BuildReport,
    ShardSpec,
    build,
    check_disk,
    dtype_name,
    fp16_overflowed,
    items_per_shard,
    missing_shards,
)

FORMAT_VERSION = "2"
# Items per forward when building: large on an accelerator (it wants large batches), smaller
# on the host, where a larger batch is no faster and its activations only raise peak memory.
VISION_BATCH, HOST_VISION_BATCH = 256, 64
TEXT_BATCH, HOST_TEXT_BATCH = 512, 128
RESIDENT_FRACTION = 0.4  # of the device's free memory that caches may take to stay on it

Log = Callable[[str], None]


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


def storage_dtype(compute_dtype: torch.dtype | None) -> torch.dtype:
    """bf16 when the towers compute in bf16 (lossless), else fp16 (finer; see the module doc)."""
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float16


def ids_digest(input_ids: Sequence[torch.Tensor]) -> str:
    """Hash of a list of token-id sequences (lengths and values)."""
    digest = hashlib.sha256()
    for ids in input_ids:
        array = ids.to(torch.int64).numpy()
        digest.update(len(array).to_bytes(4, "little"))
        digest.update(array.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def _frozen_eval(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# -- what runs: the frozen towers over item lists --------------------------------------------
def vision_compute(
    model,
    paths: Sequence[Path],
    preprocessing,
    runtime: Runtime,
    *,
    embeddings_only: bool = False,
    batch_size: int = VISION_BATCH,
    workers: int | None = None,
) -> Callable[[list[int]], Iterator[torch.Tensor]]:
    """``compute(slots)``: the frozen vision tokens of those images (with ``embeddings_only``,
    the frozen patch + position embeddings the trainable layers start from), in order."""
    run = model.embed_image if embeddings_only else model.encode_image

    def compute(slots: list[int]) -> Iterator[torch.Tensor]:
        stream = image_stream(
            paths,
            preprocessing,
            slots,
            batch_size=batch_size,
            device=runtime.device,
            workers=workers,
        )
        with _frozen_eval(model), torch.no_grad(), runtime.autocast():
            for pixels in stream:
                pixels = runtime.move({"pixels": pixels})["pixels"]
                yield run(preprocessing.normalise(pixels))

    return compute


def text_prefix_compute(
    model,
    input_ids: Sequence[torch.Tensor],
    pad_id: int,
    runtime: Runtime,
    *,
    batch_size: int = TEXT_BATCH,
) -> Callable[[list[int]], Iterator[torch.Tensor]]:
    """``compute(questions)``: the hidden states after the frozen text-encoder prefix, one row
    per real token, the questions one after the other."""

    def compute(questions: list[int]) -> Iterator[torch.Tensor]:
        with _frozen_eval(model), torch.no_grad(), runtime.autocast():
            for start in range(0, len(questions), batch_size):
                ids = [input_ids[i] for i in questions[start : start + batch_size]]
                batch = pad_sequence(ids, batch_first=True, padding_value=pad_id)
                moved = runtime.move({"ids": batch, "mask": (batch != pad_id).long()})
                states = model.encode_text_prefix(moved["ids"], moved["mask"])
                yield torch.cat([states[k, : len(ids[k])] for k in range(len(ids))])

    return compute


# -- which caches a run needs ----------------------------------------------------------------
@dataclass
class CacheJob:
    """One cache to make valid on disk: its layout, how to compute its rows, and its layout
    under another storage dtype (the fp16 -> bf16 fallback)."""

    name: str
    spec: ShardSpec
    compute: Callable[[list[int]], Iterator[torch.Tensor]]
    respec: Callable[[torch.dtype], ShardSpec]


def _spec_maker(
    folder: Path,
    kind: str,
    label: str,
    lengths: np.ndarray,
    row_shape: tuple[int, ...],
    key_parts: dict,
    shard_items: int | None,
) -> Callable[[torch.dtype], ShardSpec]:
    row_bytes_per_item = (
        float(np.mean(lengths)) * int(np.prod(row_shape)) * 2 if len(lengths) else 1
    )
    per_shard = shard_items or items_per_shard(row_bytes_per_item)

    def make(dtype: torch.dtype) -> ShardSpec:
        key = cache_key(**key_parts, storage=dtype_name(dtype), version=FORMAT_VERSION)
        return ShardSpec(
            folder / f"{kind}-{key}-n{per_shard}",
            key,
            lengths,
            row_shape,
            dtype,
            per_shard,
            label=f"{label} [{dtype_name(dtype)}]",
        )

    return make


def _job(name: str, make: Callable[[torch.dtype], ShardSpec], compute, dtype) -> CacheJob:
    spec = make(dtype)
    if dtype == torch.float16 and fp16_overflowed(spec.folder):
        spec = make(torch.bfloat16)  # an earlier build found values beyond fp16's range
    return CacheJob(name, spec, compute, make)


def vision_job(
    model,
    paths: Sequence[Path],
    preprocessing,
    runtime: Runtime,
    folder: Path,
    *,
    embeddings_only: bool = False,
    batch_size: int = VISION_BATCH,
    shard_items: int | None = None,
    workers: int | None = None,
) -> CacheJob:
    compute = vision_compute(
        model,
        paths,
        preprocessing,
        runtime,
        embeddings_only=embeddings_only,
        batch_size=batch_size,
        workers=workers,
    )
    # The shape of a row, from one image (a probe: nothing is written before the disk check).
    probe = torch.from_numpy(prepare_crop(paths[0], preprocessing)).permute(2, 0, 1)[None]
    with _frozen_eval(model), torch.no_grad(), runtime.autocast():
        run = model.embed_image if embeddings_only else model.encode_image
        row_shape = tuple(
            run(preprocessing.normalise(runtime.move({"pixels": probe})["pixels"])).shape[1:]
        )
    tower = model.vision.embeddings if embeddings_only else model.vision
    kind = "vision-embeddings" if embeddings_only else "vision"
    key_parts = {
        "kind": kind,
        "weights": weights_digest(tower),
        "preprocessing": preprocessing.to_dict(),
        "inputs": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths],
        "device": runtime.device.type,
        "compute": dtype_name(runtime.compute_dtype or torch.float32),
    }
    label = "vision embeddings" if embeddings_only else "vision features"
    lengths = np.ones(len(paths), dtype=np.int64)
    make = _spec_maker(folder, kind, label, lengths, row_shape, key_parts, shard_items)
    dtype = storage_dtype(runtime.compute_dtype)
    return _job(kind.replace("-", "_"), make, compute, dtype)


def text_prefix_job(
    model,
    split: str,
    input_ids: Sequence[torch.Tensor],
    pad_id: int,
    runtime: Runtime,
    folder: Path,
    *,
    encoder_digest: str,
    batch_size: int = TEXT_BATCH,
    shard_items: int | None = None,
) -> CacheJob:
    compute = text_prefix_compute(model, input_ids, pad_id, runtime, batch_size=batch_size)
    first = runtime.move({"ids": input_ids[0][None]})["ids"]
    with _frozen_eval(model), torch.no_grad(), runtime.autocast():
        row_shape = tuple(model.encode_text_prefix(first, torch.ones_like(first)).shape[2:])
    key_parts = {
        "kind": "text_prefix",
        "weights": encoder_digest,
        "layers": model.text_cache_layers,
        "inputs": ids_digest(input_ids),
        "device": runtime.device.type,
        "compute": dtype_name(runtime.compute_dtype or torch.float32),
    }
    lengths = np.array([len(ids) for ids in input_ids], dtype=np.int64)
    label = f"text prefix ({split})"
    make = _spec_maker(folder, "text", label, lengths, row_shape, key_parts, shard_items)
    return _job(f"text_prefix:{split}", make, compute, storage_dtype(runtime.compute_dtype))


def plan_caches(
    model,
    tokenizer,
    preprocessing,
    image_paths: Sequence[Path],
    encoded: dict,
    runtime: Runtime,
    folder: Path,
    log: Log,
    *,
    shard_items: int | None = None,
    vision_batch: int | None = None,
    text_batch: int | None = None,
    workers: int | None = None,
) -> list[CacheJob]:
    """The caches this model's frozen parts allow (see ``model.text_cache_layers``)."""
    on_accelerator = is_accelerator(runtime.device)
    vision_batch = vision_batch or (VISION_BATCH if on_accelerator else HOST_VISION_BATCH)
    text_batch = text_batch or (TEXT_BATCH if on_accelerator else HOST_TEXT_BATCH)
    jobs = []
    if (
        model.vision is not None
        and image_paths
        and (model.vision_frozen or (model.vision_splittable and model.vision_embeddings_frozen))
    ):
        embeddings_only = not model.vision_frozen
        if embeddings_only:
            log(f"vision layers train: caching the patch embeddings of {len(image_paths)} images")
        else:
            log(f"vision tower frozen: caching features of {len(image_paths)} images")
        jobs.append(
            vision_job(
                model,
                image_paths,
                preprocessing,
                runtime,
                folder,
                embeddings_only=embeddings_only,
                batch_size=vision_batch,
                shard_items=shard_items,
                workers=workers,
            )
        )
    layers = model.text_cache_layers
    if layers > 0:
        encoder_digest = weights_digest(model.text_encoder)
        for split, enc in encoded.items():
            if len(enc):
                jobs.append(
                    text_prefix_job(
                        model,
                        split,
                        enc.input_ids,
                        tokenizer.pad_token_id,
                        runtime,
                        folder,
                        encoder_digest=encoder_digest,
                        batch_size=text_batch,
                        shard_items=shard_items,
                    )
                )
        log(
            f"text encoder: first {layers} of {model.text_layout.num_layers} layers frozen, "
            "their output cached"
        )
    return jobs


def make_caches(jobs: list[CacheJob], runtime: Runtime, log: Log) -> dict[str, RowReader]:
    """Make every job's cache valid on disk (every process calls this: a collective) and open
    them. The disk each needs is printed, and checked, before anything is built."""
    if not jobs:
        return {}
    check_disk([(job.spec, missing_shards(job.spec)) for job in jobs], log)
    runtime.wait()  # every process has checked before any writes

    def build_job(job: CacheJob) -> BuildReport:
        return build(
            job.spec,
            job.compute,
            rank=runtime.rank,
            world=runtime.world,
            barrier=runtime.wait,
            log=log,
        )

    readers = {}
    for job in jobs:
        if build_job(job).overflowed:
            job.spec = job.respec(torch.bfloat16)
            check_disk([(job.spec, missing_shards(job.spec))], log)
            runtime.wait()
            build_job(job)
        readers[job.name] = RowReader(job.spec)
    return readers


def keep_on_device(
    readers: Sequence[RowReader], device: torch.device, log: Log, resident: bool | None = None
) -> bool:
    """Hold the caches on ``device`` when they fit in ``RESIDENT_FRACTION`` of its free memory
    (``resident`` forces the choice): a cached step then gathers its rows there and never waits
    on the host. On the host's own device they are held in RAM only when they fit in
    ``HOST_HOLD_BYTES`` (a fixed bound), else read from disk per batch (memory bounded by the
    batch)."""
    if not readers:
        return False
    total = sum(reader.spec.total_bytes() for reader in readers)
    if resident is None:
        resident = total <= HOST_HOLD_BYTES
        if is_accelerator(device):
            free, _ = torch.accelerator.get_memory_info(device)
            resident = total <= RESIDENT_FRACTION * free
            if not resident:
                log(
                    f"feature caches ({total / 1e9:.2f} GB) do not fit in "
                    f"{RESIDENT_FRACTION:.0%} of the device's free memory: read from disk"
                )
    if resident:
        for reader in readers:
            reader.keep_on(device, staging_pinned=is_accelerator(device))
        log(f"feature caches held on {device} ({total / 1e6:,.1f} MB)")
    return resident

"""Images as a stream: decoded, resized and cropped in worker processes, never all in RAM.

A torch ``DataLoader`` runs the decoding (PIL) in ``workers`` processes ahead of the consumer
(``prefetch`` batches each) and, when the consumer is an accelerator, copies each batch into
pinned memory, from which the copy to the device does not block.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vqadapt.backbones import ImagePreprocessing
from vqadapt.data.images import load_image

MAX_WORKERS = 8
PREFETCH = 2  # batches each worker prepares ahead
# Decoded crops, and feature caches, this small are held in RAM (crops decoded once, in the
# workers; caches read once): a fixed bound whatever the set's size, so memory still does not
# grow with the data, and small sets (the embedded default: 176 MB of crops, 91 MB of caches)
# skip a decode or a read per batch. Larger ones stream from disk.
HOST_HOLD_BYTES = 256 << 20


def prepare_crop(path: Path, preprocessing: ImagePreprocessing) -> np.ndarray:
    """(crop, crop, 3) uint8: the image resized on its shortest edge, centre-cropped."""
    from PIL import Image

    prep = preprocessing
    image = load_image(path)
    width, height = image.size
    scale = prep.resize / min(width, height)
    size = (max(prep.crop, round(width * scale)), max(prep.crop, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - prep.crop) // 2, (size[1] - prep.crop) // 2
    image = image.crop((left, top, left + prep.crop, top + prep.crop))
    return np.array(image, dtype=np.uint8)  # writable (torch.from_numpy warns otherwise)


def crops_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """(B, 3, crop, crop) uint8 from (crop, crop, 3) arrays."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class CropDataset(Dataset):
    """Item ``k``: the (3, crop, crop) uint8 crop of image ``paths[slots[k]]``."""

    def __init__(
        self, paths: Sequence[Path], preprocessing: ImagePreprocessing, slots: Sequence[int]
    ) -> None:
        self.paths, self.preprocessing, self.slots = paths, preprocessing, list(slots)

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, k: int) -> torch.Tensor:
        array = prepare_crop(self.paths[self.slots[k]], self.preprocessing)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def default_workers(decodes_images: bool) -> int:
    """Worker processes for a stream: none when nothing is decoded (reading cached rows is a
    few ``pread`` calls per batch), else one per spare core, at most ``MAX_WORKERS``."""
    if not decodes_images:
        return 0
    return max(0, min(MAX_WORKERS, usable_cpus() - 1))


def is_accelerator(device: torch.device | None) -> bool:
    """Whether ``device`` is this machine's accelerator (host batches are then pinned)."""
    if device is None or not torch.accelerator.is_available():
        return False
    accelerator = torch.accelerator.current_accelerator()
    return accelerator is not None and device.type == accelerator.type


def image_stream(
    paths: Sequence[Path],
    preprocessing: ImagePreprocessing,
    slots: Sequence[int],
    *,
    batch_size: int,
    device: torch.device | None,
    workers: int | None = None,
) -> DataLoader:
    """(B, 3, crop, crop) uint8 batches of the images ``slots``, in order."""
    workers = default_workers(True) if workers is None else workers
    return DataLoader(
        CropDataset(paths, preprocessing, slots),
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=is_accelerator(device),
        prefetch_factor=PREFETCH if workers else None,
        generator=own_generator(),
    )


def own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from its generator each time it is iterated:
    from torch's global one by default, which would shift the training's dropout masks (and
    differ between cached and uncached runs). Nothing random happens in our workers."""
    return torch.Generator().manual_seed(0)

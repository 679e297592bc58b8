"""Rows of a built shard cache (``shards.py``), read from disk by item with ``pread``, or
gathered from one tensor held on a device.

Never memory-mapped: the pages of a mapped file that a process touches count in its resident
set, so an epoch over a mapped cache would grow RSS to the cache's size; bytes read with
``pread`` land in the kernel's page cache, which is not the process's.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from vqadapt.errors import VQATrainingError
from vqadapt.shards import ShardSpec, read_header

OPEN_FILES = 128  # shard files a reader keeps open


class RowReader:
    """Rows of a built cache, read from disk by item; or, after ``keep_on(device)``, gathered
    from one tensor held on that device.

    Picklable (open files are dropped), so DataLoader workers can read too: ``pread`` takes
    explicit offsets, so processes share nothing.
    """

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec
        self.resident: torch.Tensor | None = None  # (total rows, *row_shape) on a device
        self._files: OrderedDict[int, tuple[int, int]] = OrderedDict()  # shard -> (fd, start)
        self._starts: dict[int, int] = {}  # shard -> where its data begins (header read once)

    def __len__(self) -> int:
        return self.spec.n_items

    @property
    def fixed_length(self) -> bool:
        return bool((self.spec.lengths == 1).all())

    def lengths(self, items: Sequence[int]) -> list[int]:
        return [int(self.spec.lengths[i]) for i in items]

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "resident": None, "_files": OrderedDict(), "_starts": {}}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit, when os may be gone
            self.close()

    def close(self) -> None:
        """Close the open shard files (reads reopen them)."""
        for fd, _ in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()

    def _open(self, shard: int) -> tuple[int, int]:
        found = self._files.get(shard)
        if found is not None:
            self._files.move_to_end(shard)
            return found
        data_start = self._starts.get(shard)
        if data_start is None:
            header = read_header(self.spec.path(shard))
            if header is None:
                raise VQATrainingError(
                    f"{self.spec.label}: shard {self.spec.path(shard)} is unreadable"
                )
            data_start = self._starts[shard] = header.data_start
        fd = os.open(self.spec.path(shard), os.O_RDONLY)
        self._files[shard] = (fd, data_start)
        if len(self._files) > OPEN_FILES:
            old_fd, _ = self._files.popitem(last=False)[1]
            os.close(old_fd)
        return fd, data_start

    def _read_into(self, item: int, out: np.ndarray) -> None:
        """Item ``item``'s bytes into ``out`` (a writable uint8 view of exactly that size)."""
        spec = self.spec
        shard = item // spec.items_per_shard
        fd, data_start = self._open(shard)
        first_row = int(spec.offsets[shard * spec.items_per_shard])
        offset = data_start + (int(spec.offsets[item]) - first_row) * spec.row_bytes
        done = 0
        view = memoryview(out)
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count <= 0:
                raise VQATrainingError(f"{spec.label}: shard {spec.path(shard)} is truncated")
            done += count

    def read_padded(self, items: Sequence[int]) -> torch.Tensor:
        """(B, longest, *row_shape) in the storage dtype, zeros after each item's rows, read
        from disk (a host tensor)."""
        lengths = self.lengths(items)
        longest = max(lengths, default=0)
        out = torch.zeros(len(items), longest, *self.spec.row_shape, dtype=self.spec.dtype)
        if not out.numel():
            return out
        raw = out.view(len(items), -1).view(torch.uint8).numpy()
        row_bytes = self.spec.row_bytes
        for position, (item, length) in enumerate(zip(items, lengths, strict=True)):
            if length:
                self._read_into(item, raw[position, : length * row_bytes])
        return out

    def gather_padded(self, items: Sequence[int]) -> torch.Tensor:
        """The same from the device-held tensor (no host sync: indices are built on the host
        and copied without blocking)."""
        assert self.resident is not None
        lengths = self.lengths(items)
        longest = max(lengths, default=0)
        starts = torch.tensor([int(self.spec.offsets[i]) for i in items], dtype=torch.long)
        steps = torch.arange(longest)
        valid = steps[None, :] < torch.tensor(lengths)[:, None]
        rows = torch.where(valid, starts[:, None] + steps[None, :], 0)
        all_valid = bool(valid.all())  # on the host: no device sync
        device = self.resident.device
        gathered = self.resident[rows.to(device, non_blocking=True)]
        if all_valid:
            return gathered
        valid = valid.to(device, non_blocking=True)
        shape = (*valid.shape, *([1] * len(self.spec.row_shape)))
        return gathered.masked_fill(~valid.view(shape), 0)

    def keep_on(self, device: torch.device, staging_pinned: bool = False) -> None:
        """Load the whole cache into one tensor on ``device``, a shard at a time through one
        staging buffer (pinned when ``staging_pinned``: the copies then do not block)."""
        spec = self.spec
        total = int(spec.offsets[-1])
        resident = torch.empty(total, *spec.row_shape, dtype=spec.dtype, device=device)
        for shard in range(spec.n_shards):
            start, stop = spec.shard_rows(shard)
            staging = torch.empty(stop - start, *spec.row_shape, dtype=spec.dtype)
            if staging_pinned:
                staging = staging.pin_memory()
            raw = staging.view(stop - start, -1).view(torch.uint8).numpy().reshape(-1)
            fd, data_start = self._open(shard)
            view, done = memoryview(raw), 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], data_start + done)
                if count <= 0:
                    raise VQATrainingError(f"{spec.label}: shard {spec.path(shard)} is truncated")
                done += count
            resident[start:stop].copy_(staging, non_blocking=staging_pinned)
        if staging_pinned and torch.accelerator.is_available():
            torch.accelerator.synchronize()  # the staging buffers are freed on return
        self.resident = resident

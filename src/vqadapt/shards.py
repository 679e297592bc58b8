"""Sharded, compact, checksummed tensor caches on disk, read by row.

A cache holds ``n`` items in order; item ``i`` is a block of ``lengths[i]`` rows of shape
``row_shape`` (vision features: one (tokens, hidden) row per image; a text prefix: one (d,) row
per token). Items are stored ``items_per_shard`` at a time, each shard one safetensors file with
one tensor, ``data``, and in its metadata the cache key, the shard's index, the sha256 of its
data and the rank that built it.

- **Read by row** (``shard_reader.RowReader``) **with** ``os.preadv`` into a buffer the caller owns, never memory-mapped: the
  pages of a mapped file that a process touches count in its resident set (RSS), so an epoch
  over a mapped cache grows RSS to the cache's size; bytes read with ``pread`` land in the
  kernel's page cache, which the kernel evicts under pressure and which is not the process's.
- **Built per shard, each written atomically** (temporary file + rename): a killed build keeps
  its finished shards and a rerun builds only the missing ones; a shard whose checksum, key or
  size does not match is rebuilt alone.
- **Several builders**: rank ``r`` of ``world`` owns the shards ``i % world == r`` and builds
  those; a lock file per shard (``flock``) keeps two processes that build the same cache
  without knowing of each other (two ablation cells, or ranks on machines that do not share
  the folder) from building one shard twice. After the caller's barrier every process checks
  that every shard is there, and builds what it cannot find (a folder not shared between
  machines).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vqadapt.errors import VQAConfigError, VQATrainingError
from vqadapt.io import atomic_write_json

FORMAT_VERSION = "2"
SHARD_TARGET_BYTES = 64 << 20  # items per shard: about this many bytes, within the bounds below
MIN_ITEMS_PER_SHARD = 16
MAX_ITEMS_PER_SHARD = 4096
HEADER_ALLOWANCE = 4096  # bytes of safetensors header per shard, for the disk estimate
LOCK_GROUP = 32  # shards locked and built together (bounds the open lock files)
FP16_OVERFLOW_MARKER = "fp16-overflow.json"
FP16_MAX = torch.finfo(torch.float16).max
_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.uint8: "U8",
}

Log = Callable[[str], None]
Barrier = Callable[[], None]


def _no_barrier() -> None:
    return None


def items_per_shard(row_bytes_per_item: float) -> int:
    """A fixed number of items per shard, about ``SHARD_TARGET_BYTES`` each."""
    wanted = int(SHARD_TARGET_BYTES // max(row_bytes_per_item, 1))
    return max(MIN_ITEMS_PER_SHARD, min(MAX_ITEMS_PER_SHARD, wanted))


@dataclass(frozen=True)
class ShardSpec:
    """Where a cache lives and what it holds; every shard's place and size follow from it."""

    folder: Path
    key: str
    lengths: np.ndarray  # (n,) rows per item
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    items_per_shard: int
    label: str = "cache"
    offsets: np.ndarray = field(init=False, repr=False)  # (n + 1,) first row of each item

    def __post_init__(self) -> None:
        lengths = np.asarray(self.lengths, dtype=np.int64)
        object.__setattr__(self, "lengths", lengths)
        object.__setattr__(self, "offsets", np.concatenate([[0], np.cumsum(lengths)]))
        if self.items_per_shard < 1:
            raise ValueError("items_per_shard must be >= 1")

    @property
    def n_items(self) -> int:
        return len(self.lengths)

    @property
    def n_shards(self) -> int:
        return -(-self.n_items // self.items_per_shard)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def values(self) -> int:
        """Cached values in all (what ``bytes per value`` divides by)."""
        return int(self.offsets[-1]) * int(np.prod(self.row_shape, dtype=np.int64))

    def items(self, shard: int) -> range:
        start = shard * self.items_per_shard
        return range(start, min(self.n_items, start + self.items_per_shard))

    def shard_rows(self, shard: int) -> tuple[int, int]:
        items = self.items(shard)
        return int(self.offsets[items.start]), int(self.offsets[items.stop])

    def data_bytes(self, shard: int) -> int:
        start, stop = self.shard_rows(shard)
        return (stop - start) * self.row_bytes

    def total_bytes(self) -> int:
        return int(self.offsets[-1]) * self.row_bytes + self.n_shards * HEADER_ALLOWANCE

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"


# -- one shard on disk -----------------------------------------------------------------------
@dataclass(frozen=True)
class ShardHeader:
    metadata: dict[str, str]
    data_start: int  # byte offset of the data in the file
    data_bytes: int
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path) -> ShardHeader | None:
    """The shard's safetensors header, or None when missing or unreadable."""
    try:
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            if size > 1 << 24:
                return None
            header = json.loads(handle.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None
    try:
        tensor = header["data"]
        begin, end = tensor["data_offsets"]
        return ShardHeader(
            header.get("__metadata__", {}),
            8 + size + int(begin),
            int(end) - int(begin),
            tensor["dtype"],
            tuple(tensor["shape"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def present(spec: ShardSpec, shard: int) -> bool:
    """A cheap check (header and size, no checksum): the shard is there and belongs here."""
    path = spec.path(shard)
    header = read_header(path)
    if header is None:
        return False
    start, stop = spec.shard_rows(shard)
    meta = header.metadata
    return (
        meta.get("key") == spec.key
        and meta.get("version") == FORMAT_VERSION
        and meta.get("shard") == str(shard)
        and header.dtype == _DTYPE_NAMES[spec.dtype]
        and header.shape == (stop - start, *spec.row_shape)
        and header.data_bytes == spec.data_bytes(shard)
        and _file_size(path) == header.data_start + header.data_bytes
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def verify(spec: ShardSpec, shard: int) -> bool:
    """The full check: ``present`` and the data's sha256 equals the one its header records."""
    if not present(spec, shard):
        return False
    header = read_header(spec.path(shard))
    assert header is not None
    digest = hashlib.sha256()
    try:
        with open(spec.path(shard), "rb") as handle:
            handle.seek(header.data_start)
            remaining = header.data_bytes
            while remaining:
                chunk = handle.read(min(remaining, 8 << 20))
                if not chunk:
                    return False
                digest.update(chunk)
                remaining -= len(chunk)
    except OSError:
        return False
    return digest.hexdigest() == header.metadata.get("checksum")


def built_by(spec: ShardSpec, shard: int) -> int | None:
    """The rank that built a shard (from its header), or None."""
    header = read_header(spec.path(shard))
    return int(header.metadata["rank"]) if header and "rank" in header.metadata else None


class ShardWriter:
    """Writes one shard as its rows arrive, hashing them on the way: no shard-sized buffer in
    memory. The safetensors header goes first with a placeholder checksum that is filled in
    at the end; the file is fsynced and renamed into place only when complete (a killed build
    leaves a temporary file, which the next builder of that shard removes under its lock)."""

    def __init__(self, spec: ShardSpec, shard: int, rank: int = 0) -> None:
        self.spec, self.shard = spec, shard
        start, stop = spec.shard_rows(shard)
        self.rows_expected, self.rows_written = stop - start, 0
        meta = {
            "key": spec.key,
            "version": FORMAT_VERSION,
            "shard": str(shard),
            "rank": str(rank),
            "checksum": "0" * 64,
        }
        header = {
            "__metadata__": meta,
            "data": {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": [self.rows_expected, *spec.row_shape],
                "data_offsets": [0, spec.data_bytes(shard)],
            },
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes
        self.checksum_at = 8 + text.index(b'"checksum":"') + len(b'"checksum":"')
        spec.folder.mkdir(parents=True, exist_ok=True)
        final = spec.path(shard)
        fd, name = tempfile.mkstemp(dir=spec.folder, prefix=f".{final.name}.", suffix=".tmp")
        self.tmp = Path(name)
        self.handle = os.fdopen(fd, "wb")
        self.handle.write(struct.pack("<Q", len(text)) + text)
        self.digest = hashlib.sha256()

    def write(self, rows: torch.Tensor) -> None:
        """Append rows (host tensor, storage dtype, shape (k, *row_shape))."""
        raw = rows.contiguous().view(torch.uint8).numpy().reshape(-1).data
        self.handle.write(raw)
        self.digest.update(raw)
        self.rows_written += len(rows)

    def close(self) -> None:
        if self.rows_written != self.rows_expected:
            self.abort()
            raise ValueError(
                f"{self.spec.label}: shard {self.shard} got {self.rows_written} rows, "
                f"expected {self.rows_expected}"
            )
        self.handle.seek(self.checksum_at)
        self.handle.write(self.digest.hexdigest().encode())
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.spec.path(self.shard))

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        self.tmp.unlink(missing_ok=True)


def write_shard(spec: ShardSpec, shard: int, data: torch.Tensor, rank: int = 0) -> None:
    """Write a whole shard at once (its rows in the storage dtype)."""
    writer = ShardWriter(spec, shard, rank)
    try:
        writer.write(data.to(spec.dtype))
    except BaseException:
        writer.abort()
        raise
    writer.close()


class ShardLock:
    """An exclusive ``flock`` on ``<shard>.lock``: one builder per shard at a time."""

    def __init__(self, spec: ShardSpec, shard: int) -> None:
        spec.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(spec.folder / f"shard-{shard:05d}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self, blocking: bool) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


# -- planning: what is missing, and is there room for it -------------------------------------
def missing_shards(spec: ShardSpec) -> list[int]:
    """Shards not on disk (cheap check: corrupt ones are found when their owner verifies)."""
    return [shard for shard in range(spec.n_shards) if not present(spec, shard)]


def free_bytes(folder: Path) -> int:
    """Free space of the file system that holds (or will hold) ``folder``."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def bytes_needed(spec: ShardSpec, missing: Sequence[int]) -> int:
    return sum(spec.data_bytes(shard) + HEADER_ALLOWANCE for shard in missing)


def check_disk(plans: Sequence[tuple[ShardSpec, list[int]]], log: Log) -> None:
    """Print what the caches take on disk and what is left to write; refuse, before any work,
    a disk that cannot hold it (plus one shard, the room to replace a corrupt one)."""
    to_write = 0
    for spec, missing in plans:
        total = spec.total_bytes()
        need = bytes_needed(spec, missing)
        to_write += need
        log(
            f"{spec.label}: {spec.n_items:,} items in {spec.n_shards} shards of "
            f"{spec.items_per_shard}, {human_bytes(total)}; "
            + (f"{len(missing)} to build, {human_bytes(need)}" if missing else "all on disk")
        )
    if not to_write:
        return
    headroom = max(spec.data_bytes(0) + HEADER_ALLOWANCE for spec, _ in plans if spec.n_shards)
    folder = plans[0][0].folder.parent
    free = free_bytes(folder)
    log(
        f"feature caches: {to_write / 1e6:,.1f} MB to write under {folder}, {free / 1e6:,.0f} MB free"
    )
    if free < to_write + headroom:
        raise VQAConfigError(
            f"not enough disk space for the feature caches under {folder}: they need "
            f"{human_bytes(to_write + headroom)} (including one shard of headroom), "
            f"{human_bytes(free)} are free. Free some space, point $VQADAPT_CACHE at a larger "
            "disk, or pass --no_cache"
        )


def human_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:.0f} B"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- building --------------------------------------------------------------------------------
class Fp16Overflow(Exception):
    """A value beyond fp16's range: the cache is stored in bf16 instead."""


def fp16_overflowed(folder: Path) -> bool:
    return (folder / FP16_OVERFLOW_MARKER).is_file()


Compute = Callable[[list[int]], Iterable[torch.Tensor]]
"""``compute(items)`` yields the rows of ``items``, in order, in blocks of any size (rows along
dim 0, on any device, any float dtype)."""


TRIM_EVERY = 4  # blocks between returns of freed heap memory to the OS (see below)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    return None


_MALLOC_TRIM = _libc_malloc_trim()


def return_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc; a no-op elsewhere).

    A build frees a few large buffers per batch; glibc raises its mmap threshold to their size
    after the first free, so later ones come from the heap, where small long-lived allocations
    pin them: measured on the 40,000-question synthetic set, the process's RSS climbed from 450
    to 830-1,100 MB over the vision build (varying from run to run), all of it free memory
    (``malloc_trim`` returned it); trimming every few blocks keeps it flat.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _write_shards(spec: ShardSpec, shards: list[int], compute: Compute, rank: int) -> None:
    """Compute the items of ``shards`` (ascending) in one stream, writing each shard's rows as
    they come: a forward batch may span shards, so batches stay large, and memory holds one
    batch, not one shard."""
    if not shards:
        return
    items = [item for shard in shards for item in spec.items(shard)]
    pending = iter(shards)
    writer: ShardWriter | None = ShardWriter(spec, next(pending), rank)
    try:
        for count, block in enumerate(compute(items), start=1):
            block = _to_storage(block, spec)
            if count % TRIM_EVERY == 0:
                return_free_memory()
            taken = 0
            while taken < len(block):
                if writer is None:
                    raise ValueError(f"{spec.label}: compute yielded more rows than asked")
                rows = min(len(block) - taken, writer.rows_expected - writer.rows_written)
                writer.write(block[taken : taken + rows])
                taken += rows
                if writer.rows_written == writer.rows_expected:
                    writer.close()
                    shard = next(pending, None)
                    writer = None if shard is None else ShardWriter(spec, shard, rank)
        if writer is not None:
            raise ValueError(f"{spec.label}: compute yielded fewer rows than asked")
    finally:
        if writer is not None:
            writer.abort()
        return_free_memory()


def _to_storage(block: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Cast to the storage dtype on the block's device, refusing values that would not survive:
    a finite value beyond fp16's range would silently become inf."""
    stored = block.detach().to(spec.dtype)
    if spec.dtype.is_floating_point and not bool(torch.isfinite(stored).all()):
        if spec.dtype == torch.float16 and bool(torch.isfinite(block).all()):
            raise Fp16Overflow(f"{spec.label}: |value| up to {block.abs().max().item():.4g}")
        raise VQATrainingError(
            f"{spec.label}: the frozen tower produced non-finite values; nothing was cached"
        )
    return stored.cpu().reshape(-1, *spec.row_shape)


def _build_locked(
    spec: ShardSpec, shards: Iterable[int], compute: Compute, rank: int, blocking: bool
) -> tuple[list[int], list[int]]:
    """Verify, and build where needed, ``shards`` under their locks, ``LOCK_GROUP`` at a time.
    Returns (built, skipped because another process holds the lock)."""
    built, busy = [], []
    shards = list(shards)
    for first in range(0, len(shards), LOCK_GROUP):
        locks: list[ShardLock] = []
        todo = []
        try:
            for shard in shards[first : first + LOCK_GROUP]:
                lock = ShardLock(spec, shard)
                if not lock.acquire(blocking):
                    lock.release()
                    busy.append(shard)
                    continue
                # Temporary files are written under the lock: one left now is from a killed build.
                for torn in spec.folder.glob(f".{spec.path(shard).name}.*.tmp"):
                    torn.unlink(missing_ok=True)
                if verify(spec, shard):
                    lock.release()
                    continue
                locks.append(lock)
                todo.append(shard)
            _write_shards(spec, todo, compute, rank)
            built += todo
        finally:
            for lock in locks:
                lock.release()
    return built, busy


@dataclass
class BuildReport:
    built: list[int]
    overflowed: bool = False


def build(
    spec: ShardSpec,
    compute: Compute,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Barrier = _no_barrier,
    log: Log = print,
) -> BuildReport:
    """Make every shard of ``spec`` valid on disk; every process calls it (a collective).

    Each process verifies and builds the shards it owns, then waits at ``barrier``, then builds
    any shard it still cannot find. A value beyond fp16's range stops the build and leaves a
    marker: every process returns ``overflowed`` and the caller builds a bf16 cache instead.
    """
    built: list[int] = []
    overflowed = False
    try:
        mine, busy = _build_locked(
            spec, range(rank, spec.n_shards, world), compute, rank, blocking=False
        )
        built += mine
        built += _build_locked(spec, busy, compute, rank, blocking=True)[0]
    except Fp16Overflow as err:
        overflowed = True
        atomic_write_json(spec.folder / FP16_OVERFLOW_MARKER, {"reason": str(err)})
        log(f"{spec.label}: values beyond fp16's range ({err}): stored in bf16 instead")
    barrier()
    if overflowed or fp16_overflowed(spec.folder):
        return BuildReport(built, overflowed=True)
    left = missing_shards(spec)
    if left:
        try:
            found, busy = _build_locked(spec, left, compute, rank, blocking=False)
            built += found + _build_locked(spec, busy, compute, rank, blocking=True)[0]
        except Fp16Overflow:
            atomic_write_json(spec.folder / FP16_OVERFLOW_MARKER, {"reason": "fill-in"})
            return BuildReport(built, overflowed=True)
    if built:
        log(f"{spec.label}: built shards {_ranges(built)}")
    return BuildReport(sorted(built))


def _ranges(numbers: Sequence[int]) -> str:
    numbers = sorted(numbers)
    parts, start = [], None
    for i, value in enumerate(numbers):
        if start is None:
            start = value
        if i + 1 == len(numbers) or numbers[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)

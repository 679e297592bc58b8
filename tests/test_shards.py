"""The sharded cache store (``shards.py``): layout, checks, resume, repair, disk, ranks, reads."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from shard_worker import ITEMS, PER_SHARD, compute_rows, expected_rows, spec
from vqadapt import shard_reader, shards
from vqadapt.demo.browser import free_port
from vqadapt.errors import VQAConfigError
from vqadapt.shard_reader import RowReader
from vqadapt.shards import (
    ShardSpec,
    build,
    built_by,
    check_disk,
    missing_shards,
    present,
    verify,
)

WORKER = Path(__file__).parent / "shard_worker.py"
N_SHARDS = ITEMS // PER_SHARD


def quiet(_: str) -> None:
    return None


def built_cache(folder: Path, dtype: torch.dtype = torch.float16) -> tuple[ShardSpec, list[int]]:
    layout = spec(folder, dtype)
    asked: list[int] = []
    build(layout, compute_rows(layout, asked), log=quiet)
    return layout, asked


def test_a_cache_reads_back_every_item(tmp_path: Path) -> None:
    layout, asked = built_cache(tmp_path / "c")
    assert asked == list(range(ITEMS)) and layout.n_shards == N_SHARDS
    assert missing_shards(layout) == [] and all(verify(layout, s) for s in range(N_SHARDS))
    reader = RowReader(layout)
    items = [8, 0, 39, 8, 12]  # any order, repeats; lengths 3, 1, 1, 3, 1
    padded = reader.read_padded(items)
    assert padded.dtype == torch.float16 and padded.shape == (5, 3, 3, 5)
    for row, item in enumerate(items):
        length = int(layout.lengths[item])
        assert torch.equal(padded[row, :length].float(), expected_rows(item, length))
        assert not padded[row, length:].any()  # zero padding
    # a second build finds everything valid and computes nothing
    again: list[int] = []
    assert build(layout, compute_rows(layout, again), log=quiet).built == [] and again == []


def test_a_shard_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    """Written by hand as rows arrive, readable by the library (and any safetensors tool)."""
    from safetensors import safe_open

    layout, _ = built_cache(tmp_path / "c")
    with safe_open(str(layout.path(2)), framework="pt") as handle:
        data = handle.get_tensor("data")
        meta = handle.metadata()
    items = layout.items(2)
    expected = torch.cat([expected_rows(i, int(layout.lengths[i])) for i in items])
    assert data.dtype == torch.float16 and torch.equal(data.float(), expected)
    assert meta["key"] == "test-key" and meta["shard"] == "2" and len(meta["checksum"]) == 64


def test_two_bytes_per_value_on_disk(tmp_path: Path) -> None:
    layout, _ = built_cache(tmp_path / "c")
    on_disk = sum(layout.path(s).stat().st_size for s in range(N_SHARDS))
    headers = on_disk - layout.values * 2
    assert 0 < headers <= N_SHARDS * shards.HEADER_ALLOWANCE
    big = ShardSpec(
        tmp_path / "b", "k", np.ones(1000, dtype=np.int64), (257, 768), torch.float16, 162
    )
    assert big.total_bytes() / big.values < 2.001  # real shapes: headers are negligible


def test_the_device_copy_gathers_the_same_rows(tmp_path: Path) -> None:
    layout, _ = built_cache(tmp_path / "c")
    from_disk = RowReader(layout)
    held = RowReader(layout)
    held.keep_on(torch.device("cpu"))
    assert held.resident is not None and held.resident.shape == (int(layout.offsets[-1]), 3, 5)
    items = [3, 3, 38, 1]
    assert torch.equal(held.gather_padded(items), from_disk.read_padded(items))
    meta = RowReader(layout)
    meta.keep_on(torch.device("meta"))  # placement only: no values
    assert meta.gather_padded(items).device.type == "meta"


def test_a_reader_pickles_without_its_open_files(tmp_path: Path) -> None:
    layout, _ = built_cache(tmp_path / "c")
    reader = RowReader(layout)
    before = reader.read_padded([5])
    assert reader._files
    copy = pickle.loads(pickle.dumps(reader))
    assert not copy._files and torch.equal(copy.read_padded([5]), before)


def test_a_reader_keeps_a_bounded_number_of_files_open(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(shard_reader, "OPEN_FILES", 3)
    layout, _ = built_cache(tmp_path / "c")
    reader = RowReader(layout)
    padded = reader.read_padded(list(range(ITEMS)))  # touches all ten shards
    assert len(reader._files) == 3
    assert torch.equal(padded[-1, :1].float(), expected_rows(39, 1))


@pytest.mark.parametrize("how", ["truncate", "flip", "zeros", "delete"])
def test_a_damaged_shard_is_rebuilt_alone(tmp_path: Path, how: str) -> None:
    layout, _ = built_cache(tmp_path / "c")
    stamps = {s: layout.path(s).stat().st_mtime_ns for s in range(N_SHARDS)}
    damaged = 6
    path = layout.path(damaged)
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # the header stays valid: only the checksum can tell
        path.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
        assert present(layout, damaged) and not verify(layout, damaged)
    elif how == "zeros":
        path.write_bytes(b"\0" * len(data))
    else:
        path.unlink()
    assert not verify(layout, damaged)
    asked: list[int] = []
    report = build(layout, compute_rows(layout, asked), log=quiet)
    assert report.built == [damaged] and asked == list(layout.items(damaged))
    assert verify(layout, damaged)
    for shard, stamp in stamps.items():
        if shard != damaged:
            assert layout.path(shard).stat().st_mtime_ns == stamp  # untouched
    padded = RowReader(layout).read_padded([25])
    assert torch.equal(padded[0, :2].float(), expected_rows(25, 2))


def test_a_killed_build_keeps_its_shards_and_a_rerun_builds_only_the_rest(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, str(WORKER), "--folder", str(folder), "--slow", "0.15"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    layout = spec(folder)
    deadline = time.monotonic() + 120
    while len(list(folder.glob("shard-*.safetensors"))) < 3:
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the build never wrote three shards"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kept = [s for s in range(N_SHARDS) if verify(layout, s)]
    assert 3 <= len(kept) < N_SHARDS  # killed part-way, finished shards intact
    asked: list[int] = []
    report = build(layout, compute_rows(layout, asked), log=quiet)
    missing = [s for s in range(N_SHARDS) if s not in kept]
    assert report.built == missing
    assert asked == [item for s in missing for item in layout.items(s)]
    assert not list(folder.glob(".shard-*.tmp"))  # a torn temporary file is cleared
    reader = RowReader(layout)
    for item in range(ITEMS):
        length = int(layout.lengths[item])
        assert torch.equal(reader.read_padded([item])[0].float(), expected_rows(item, length))


def test_a_disk_too_small_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    layout = spec(tmp_path / "c")
    need = sum(layout.data_bytes(s) for s in range(N_SHARDS))
    monkeypatch.setattr(shards, "free_bytes", lambda folder: need // 2)
    logs: list[str] = []
    with pytest.raises(VQAConfigError, match="not enough disk space") as err:
        check_disk([(layout, missing_shards(layout))], logs.append)
    assert "--no_cache" in str(err.value) and "VQADAPT_CACHE" in str(err.value)
    assert any("10 to build" in line for line in logs)  # the need was printed first
    assert not (tmp_path / "c").exists()
    monkeypatch.setattr(shards, "free_bytes", lambda folder: 2 * layout.total_bytes())
    check_disk([(layout, missing_shards(layout))], logs.append)  # enough: no error


def test_an_fp16_overflow_is_stored_in_bf16_not_as_inf(tmp_path: Path) -> None:
    layout = spec(tmp_path / "c")

    def compute(items):
        for item in items:
            rows = expected_rows(item, int(layout.lengths[item]))
            yield rows * (1e6 if item == 21 else 1.0)  # beyond fp16's 65,504

    logs: list[str] = []
    assert build(layout, compute, log=logs.append).overflowed
    assert shards.fp16_overflowed(layout.folder)
    assert any("bf16" in line for line in logs)


def test_non_finite_tower_outputs_are_refused(tmp_path: Path) -> None:
    from vqadapt.errors import VQATrainingError

    layout = spec(tmp_path / "c", torch.bfloat16)

    def compute(items):
        for item in items:
            yield torch.full((int(layout.lengths[item]), 3, 5), float("nan"))

    with pytest.raises(VQATrainingError, match="non-finite"):
        build(layout, compute, log=quiet)
    assert missing_shards(layout) == list(range(N_SHARDS))


def test_a_shard_of_another_cache_is_not_taken(tmp_path: Path) -> None:
    layout, _ = built_cache(tmp_path / "c")
    other = ShardSpec(
        layout.folder, "other-key", layout.lengths, layout.row_shape, layout.dtype, PER_SHARD
    )
    assert missing_shards(other) == list(range(N_SHARDS))


def test_two_processes_build_disjoint_shards_and_both_read_all(tmp_path: Path) -> None:
    folder, port = tmp_path / "c", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), "--folder", str(folder), "--world", "2"]
    children = [
        subprocess.Popen(
            [*command, "--port", str(port), "--rank", str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        line = next(line for line in out.splitlines() if line.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT ") :]))
    built = [set(result["built"]) for result in results]
    assert built[0] | built[1] == set(range(N_SHARDS)) and not built[0] & built[1]
    assert built[0] == set(range(0, N_SHARDS, 2)) and built[1] == set(range(1, N_SHARDS, 2))
    assert all(result["correct"] for result in results)  # each reads every shard
    layout = spec(folder)
    assert [built_by(layout, s) for s in range(N_SHARDS)] == [s % 2 for s in range(N_SHARDS)]


def test_a_locked_shard_is_left_to_its_builder(tmp_path: Path) -> None:
    """Two builders that do not know each other (two ablation cells) never build one shard
    twice: a shard whose lock is held is skipped, then waited for and verified."""
    layout = spec(tmp_path / "c")
    held = shards.ShardLock(layout, 0)
    assert held.acquire(blocking=False)
    seen: list[int] = []

    def compute(items):
        if 0 in items:  # the holder finished meanwhile: write shard 0 and let go
            raise AssertionError("shard 0 is locked by another builder")
        seen.extend(items)
        yield from compute_rows(layout, [])(items)

    import threading

    def finish_shard_zero():
        time.sleep(0.3)
        rows = torch.cat([expected_rows(i, int(layout.lengths[i])) for i in layout.items(0)])
        shards.write_shard(layout, 0, rows.half())
        held.release()

    helper = threading.Thread(target=finish_shard_zero)
    helper.start()
    report = build(layout, compute, log=quiet)
    helper.join()
    assert 0 not in report.built and sorted(report.built) == list(range(1, N_SHARDS))
    assert all(verify(layout, s) for s in range(N_SHARDS))

"""Chaos: a small training and a small study, each killed (SIGKILL) at random points several
times and resumed each time, end with the results of an uninterrupted run.

The kill times are drawn from a seeded generator (printed on failure), so a failing sequence
can be replayed; they spread over start-up, the data check, training, checkpoints and the
final evaluation. Only the process itself is killed (for the study: the runner alone), as a
crash or an out-of-memory kill would: the runner's cells must die with it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vqadapt.folders import lock_holder
from vqadapt.run_dir import is_run

pytestmark = pytest.mark.slow

SEED = 14
KILLS = 4
SMALL = ["--max_train_samples", "32", "--batch_size", "4", "--max_eval_samples", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # as this process (conftest): the same sums


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def assert_same_results(straight: Path, chaotic: Path) -> None:
    a, b = metrics(straight), metrics(chaotic)
    assert [row["epoch"] for row in a] == [row["epoch"] for row in b]
    for row_a, row_b in zip(a, b, strict=True):
        for key in ("train_loss", "val_loss", "val_em", "val_f1"):
            assert row_a[key] == pytest.approx(row_b[key], abs=1e-6), (row_a["epoch"], key)
    summary_a, summary_b = (
        json.loads((r / "summary.json").read_text()) for r in (straight, chaotic)
    )
    for key in ("em", "f1", "loss"):
        assert summary_a["test"][key] == pytest.approx(summary_b["test"][key], abs=1e-6), key
    assert summary_a["best_epoch"] == summary_b["best_epoch"]


def kill_at(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``process`` after ``seconds``; whether it was still running then."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def train_process(env, run: Path) -> subprocess.Popen:
    resume = ["--resume"] if is_run(run) and (run / "config.yaml").exists() else []
    return subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "train", *env.argv(run, *SMALL, "--epochs", "2", *resume)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def timed(process: subprocess.Popen) -> float:
    started = time.monotonic()
    assert process.wait(timeout=600) == 0
    return time.monotonic() - started


def kill_repeatedly(start, rng: random.Random, duration: float, cells: list[Path]) -> list:
    """Start and SIGKILL ``KILLS`` times, each at a random point of the first half of an
    uninterrupted ``duration``; returns (delay, whether it was still running) per kill. After
    each kill no process may still hold a lock on ``cells`` (a study's cells die with it)."""
    kills = []
    for _ in range(KILLS):
        delay = rng.uniform(0.1, 0.5) * duration
        kills.append((round(delay, 2), kill_at(start(), delay)))
        deadline = time.monotonic() + 30
        while any(lock_holder(cell) for cell in cells) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(lock_holder(cell) for cell in cells), f"a process outlived: {kills}"
    assert sum(killed for _, killed in kills) >= 2, f"too few kills landed: {kills}"
    return kills


def test_training_killed_at_random_points_ends_as_an_uninterrupted_run(vqa_env, tmp_path):
    straight, chaotic = tmp_path / "straight", tmp_path / "chaotic"
    duration = timed(train_process(vqa_env, straight))
    kill_repeatedly(
        lambda: train_process(vqa_env, chaotic), random.Random(SEED), duration, [chaotic]
    )
    assert train_process(vqa_env, chaotic).wait(timeout=600) == 0
    assert_same_results(straight, chaotic)


def write_preset(path: Path, env) -> Path:
    base = {
        "train_file": str(env.data / "train.csv"),
        "test_file": str(env.data / "test.csv"),
        "image_root": str(env.data / "images"),
        "vision_model": str(env.vision),
        "text_model": str(env.text),
        "epochs": 2,
        "batch_size": 4,
        "max_train_samples": 32,
        "max_eval_samples": 16,
    }
    experiments = [
        {"name": "baseline", "overrides": {"unfreeze_encoder_layers": 0}},
        {"name": "unfreeze2", "overrides": {"unfreeze_encoder_layers": 2}},
    ]
    preset = {"name": "chaos", "seeds": 1, "base": base, "experiments": experiments}
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    return path


def ablate(preset: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "ablate", "--preset", str(preset), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip


def test_a_study_killed_at_random_points_ends_as_an_uninterrupted_one(vqa_env, tmp_path):
    preset = write_preset(tmp_path / "chaos.yaml", vqa_env)
    straight, chaotic = tmp_path / "straight", tmp_path / "chaotic"
    duration = timed(ablate(preset, straight))
    cells = [chaotic / name / "seed0" for name in ("baseline", "unfreeze2")]
    kill_repeatedly(lambda: ablate(preset, chaotic), random.Random(SEED + 1), duration, cells)
    assert ablate(preset, chaotic).wait(timeout=600) == 0
    for name in ("baseline", "unfreeze2"):
        assert_same_results(straight / name / "seed0", chaotic / name / "seed0")
    timing = ("second", "time", "per_s", "wall")
    straight_rows, chaotic_rows = (results(study) for study in (straight, chaotic))
    assert [row["experiment"] for row in chaotic_rows] == ["baseline", "unfreeze2"]
    for row_a, row_b in zip(straight_rows, chaotic_rows, strict=True):
        for key in row_a:
            if not any(word in key for word in timing):
                assert row_a[key] == row_b[key], (row_a["experiment"], key)


def results(study: Path) -> list[dict[str, str]]:
    import csv

    with open(study / "results.csv", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))

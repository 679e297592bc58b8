"""The ablation runner end to end: presets, resumable cells, failures isolated, report written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vqadapt.ablation.runner import load_preset
from vqadapt.errors import VQAConfigError

pytestmark = pytest.mark.slow


def write_preset(path: Path, env, experiments: list[dict]) -> Path:
    base = {
        "train_file": str(env.data / "train.csv"),
        "test_file": str(env.data / "test.csv"),
        "image_root": str(env.data / "images"),
        "vision_model": str(env.vision),
        "text_model": str(env.text),
        "epochs": 1,
        "batch_size": 16,
        "max_train_samples": 48,
        "max_eval_samples": 16,
    }
    preset = {"name": "tiny", "seeds": 1, "base": base, "experiments": experiments}
    path.write_text(yaml.safe_dump(preset, allow_unicode=True), encoding="utf-8")
    return path


TWO = [
    {"name": "baseline", "overrides": {"unfreeze_encoder_layers": 0}},
    {"name": "unfreeze3", "overrides": {"unfreeze_encoder_layers": 3}},
]


def ablate(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vqadapt", "ablate", *args],
        capture_output=True,
        text=True,
        **kwargs,
    )


def status(cell: Path) -> str | None:
    try:
        return json.loads((cell / "status.json").read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError):
        return None


def test_preset_overrides_are_checked(tmp_path: Path, vqa_env) -> None:
    bad = write_preset(tmp_path / "bad.yaml", vqa_env, [{"name": "x", "overrides": {"lr_typo": 1}}])
    with pytest.raises(VQAConfigError, match="lr_typo"):
        load_preset(str(bad))
    seed = load_preset("seed")
    assert [e.name for e in seed.experiments] == [
        "baseline",
        "unfreeze3",
        "lora_r8",
        "lora_r16",
        "lora_r32",
        "vision_text_lora",
    ]
    quick = load_preset("quick")
    assert quick.seeds == 1 and quick.base["epochs"] >= 1 and len(quick.experiments) == 6


def test_failed_cell_is_recorded_and_the_study_goes_on(tmp_path: Path, vqa_env) -> None:
    experiments = [
        {"name": "broken", "overrides": {"use_text_lora": True, "text_lora_targets": "nope"}},
        TWO[0],
    ]
    preset = write_preset(tmp_path / "p.yaml", vqa_env, experiments)
    out = tmp_path / "study"
    first = ablate("--preset", str(preset), "--out", str(out))
    assert first.returncode == 0, first.stdout + first.stderr
    assert status(out / "broken" / "seed0") == "failed"
    assert "nope" in json.loads((out / "broken" / "seed0" / "status.json").read_text())["error"]
    assert status(out / "baseline" / "seed0") == "success"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "broken" in report
    again = ablate("--preset", str(preset), "--out", str(out))
    assert "failed before, skipped" in again.stdout
    assert "done before, skipped" in again.stdout


def test_killed_study_finishes_without_redoing_finished_cells(tmp_path: Path, vqa_env) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO)
    out = tmp_path / "study"
    process = subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "ablate", "--preset", str(preset), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first, second = out / "baseline" / "seed0", out / "unfreeze3" / "seed0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (status(first) == "success" and status(second)):
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert status(first) == "success", "the first cell should have finished before the kill"
    assert status(second) == "running"
    finished_at = (first / "summary.json").stat().st_mtime_ns

    rerun = ablate("--preset", str(preset), "--out", str(out))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "baseline seed 0: done before, skipped" in rerun.stdout
    assert (first / "summary.json").stat().st_mtime_ns == finished_at
    assert status(second) == "success"
    assert (out / "report.md").is_file() and (out / "results.csv").is_file()
    study = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert [e["name"] for e in study["experiments"]] == ["baseline", "unfreeze3"]


def test_a_study_folder_is_never_reused_for_other_settings(tmp_path: Path, vqa_env) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"experiments": [], "base": {}}), encoding="utf-8")
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO[:1])
    result = ablate("--preset", str(preset), "--out", str(out))
    assert result.returncode == 2
    assert "other settings" in result.stderr

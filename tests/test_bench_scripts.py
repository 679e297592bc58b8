"""The benchmark scripts run (tiny shapes, a few steps): they are measurements, not tests, but
they must not rot between the sessions that have the machines to run them at full size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu"]
    command += ["--steps", "1", "--batch_sizes", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(row["strategy"], row["loop"]) for row in result["rows"]}
    # six strategies: the plain loop, vqadapt uncached and cached (vision + text LoRA: no cache)
    assert len(rows) == 6 * 3 - 1
    for row in result["rows"]:
        assert row["samples_per_s"] > 0 and row["flops_per_step"] > 0
        assert 0 < row["trainable_params"] < row["total_params"]
    flops = {(row["strategy"], row["loop"]): row["flops_per_step"] for row in result["rows"]}
    assert flops[("baseline", "cached")] < flops[("baseline", "uncached")]  # no frozen work
    assert {item["strategy"] for item in result["vs_plain"] if "target" in item} == {
        "baseline",
        "unfreeze3",
        "lora_r16",
        "vision_text_lora",
    }
    variants = {row["variant"] for row in result["speed_paths"]}
    assert {"profile", "library", "no packed_encoder"} <= variants  # the CPU profile's paths


@pytest.mark.slow
def test_checkpointing_memory_script_runs_on_tiny_shapes(tmp_path):
    out = tmp_path / "checkpointing.json"
    command = [sys.executable, str(ROOT / "bench" / "checkpointing_memory.py"), "--tiny"]
    command += ["--device", "cpu", "--batch_size", "4", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 * 2
    by = {(row["strategy"], row["checkpointed"]): row for row in rows}
    for strategy in ("lora_r16", "decoder_lora", "vision_last2"):
        plain, checkpointed = by[(strategy, False)], by[(strategy, True)]
        assert checkpointed["measured_mib"] < plain["measured_mib"]
        assert checkpointed["estimated_mib"] < plain["estimated_mib"]


@pytest.mark.slow
def test_data_scale_script_runs_on_tiny_sets(vqa_env, tmp_path):
    out = tmp_path / "data_scale.json"
    command = [sys.executable, str(ROOT / "bench" / "data_scale.py"), "--sizes", "60", "120"]
    command += ["--eval", "16", "--probe_mb", "4", "--out", str(out)]
    command += ["--backbones", str(vqa_env.vision), str(vqa_env.text)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["VQADAPT_BENCH_RESULTS"] = str(tmp_path / "results")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    small, large = result["rows"]
    assert small["images"] < large["images"] and small["questions"] < large["questions"]
    for row in result["rows"]:
        assert row["peak_rss_mb"] > 0 and row["build_s"] > 0 and row["samples_per_s"] > 0
        assert 2.0 <= row["bytes_per_value"] < 2.05  # 16-bit storage plus headers
    names = [row["dataset"] for row in result["projections"]]
    assert names == ["ViVQA", "OpenViVQA", "COCO-size (VQAv2-like)"]
    coco = result["projections"][-1]
    assert 48 < coco["vision_cache_gb"] < 50  # 123,287 x 257 x 768 x 2 bytes

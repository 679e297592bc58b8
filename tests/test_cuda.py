"""On a CUDA GPU: every strategy trains cached and uncached in bf16, every command runs there,
runs move between GPU and CPU, and the training step never waits for the GPU.

Marked ``cuda``: skipped on machines without CUDA (``conftest.py``); ``bench/gpu_check.sh``
runs them on the device machine (``pytest -m cuda``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vqadapt import speed
from vqadapt.adapt import apply_adaptation
from vqadapt.config import AdaptConfig
from vqadapt.loop import GradientMeter, OptimizerStep, global_weighted_loss, make_optimizer

pytestmark = pytest.mark.cuda

QUIET = lambda _: None  # noqa: E731
STRATEGIES = {
    "baseline": [],
    "unfreeze3": ["--unfreeze_encoder_layers", "3"],
    "text_lora": ["--use_text_lora", "--text_lora_r", "8"],
    "vision_text_lora": ["--use_vision_lora", "--use_text_lora", "--text_lora_r", "8"],
}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cache", ["--cache", "--no_cache"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_trains_on_the_gpu_in_bf16(vqa_env, tmp_path, strategy, cache):
    from vqadapt.train import train

    run = tmp_path / "run"
    flags = [*STRATEGIES[strategy], cache, "--epochs", "2", "--device", "cuda"]
    summary = train(vqa_env.config(run, *flags), log=QUIET)
    assert summary["device"] == {"type": "cuda", "precision": "bf16"}  # auto: bf16 on GPUs
    rows = _metrics(run)
    assert all(torch.isfinite(torch.tensor(row["train_loss"])) for row in rows)
    assert all(row["skipped_steps"] == 0 for row in rows)
    assert summary["test"]["n"] > 0


def test_compiled_training_on_the_gpu(vqa_env, tmp_path):
    from vqadapt.train import train

    run = tmp_path / "run"
    summary = train(vqa_env.config(run, "--compile", "--device", "cuda"), log=QUIET)
    assert summary["test"]["n"] > 0
    assert torch.isfinite(torch.tensor(_metrics(run)[0]["train_loss"]))


def test_cached_and_uncached_agree_on_the_gpu(vqa_env, tmp_path):
    """The cache stores the frozen towers' outputs: the same losses up to bf16 rounding."""
    from vqadapt.train import train

    losses = {}
    for cache in ("--cache", "--no_cache"):
        run = tmp_path / cache
        train(vqa_env.config(run, "--unfreeze_encoder_layers", "3", cache), log=QUIET)
        losses[cache] = _metrics(run)[0]["val_loss"]
    assert losses["--cache"] == pytest.approx(losses["--no_cache"], rel=2e-2)


def test_commands_run_on_the_gpu_and_runs_move_between_devices(vqa_env, tmp_path):
    """Train on the GPU; eval / predict / export there; eval the same run on the CPU; and a
    CPU-trained run evaluates on the GPU (checkpoints load with map_location)."""
    from vqadapt.export import export_run
    from vqadapt.inference import answer_question, evaluate_run, load_run
    from vqadapt.train import train

    gpu_run, cpu_run = tmp_path / "gpu", tmp_path / "cpu"
    lora = ["--use_text_lora", "--text_lora_r", "8", "--use_vision_lora"]
    train(vqa_env.config(gpu_run, *lora, "--device", "cuda"), log=QUIET)
    train(vqa_env.config(cpu_run, *lora, "--device", "cpu"), log=QUIET)
    on_gpu = evaluate_run(gpu_run, "test", log=QUIET, device="cuda", precision="no")
    on_cpu = evaluate_run(gpu_run, "test", log=QUIET, device="cpu")
    assert abs(on_gpu["em"] - on_cpu["em"]) <= 0.05  # fp32 both: kernels differ, not weights
    assert evaluate_run(cpu_run, "test", log=QUIET, device="cuda")["n"] == on_cpu["n"]
    loaded = load_run(gpu_run, device="cuda")
    assert next(loaded.model.parameters()).device.type == "cuda"
    image = next((vqa_env.data / "images").iterdir())
    assert isinstance(answer_question(loaded, "có mấy hình?", image), str)
    report = export_run(gpu_run, tmp_path / "export", questions=8, log=QUIET, device="cuda")
    assert report["status"] == "passed"


def test_a_gpu_run_resumes_like_an_uninterrupted_one(vqa_env, tmp_path):
    """CUDA RNG states are saved per rank: a resumed run continues the same dropout stream
    (up to the nondeterminism of a few CUDA kernels' atomics)."""
    from vqadapt.train import train

    flags = ["--epochs", "2", "--device", "cuda", "--use_text_lora", "--text_lora_r", "8"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(vqa_env.config(whole, *flags), log=QUIET)
    train(vqa_env.config(split, *flags), log=QUIET, stop_after_epoch=1)
    train(vqa_env.config(split, *flags, "--resume"), log=QUIET)
    for a, b in zip(_metrics(whole), _metrics(split), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)


def test_a_study_at_equal_steps_runs_on_the_gpu(vqa_env, tmp_path):
    """``vqadapt ablate`` with a smaller fraction at equal steps: both cells train on the GPU
    (device auto), the smaller one passing twice per epoch over its questions, and each keeps
    its step losses for the stability claim."""
    import subprocess
    import sys

    import yaml

    base = {
        "train_file": str(vqa_env.data / "train.csv"),
        "test_file": str(vqa_env.data / "test.csv"),
        "image_root": str(vqa_env.data / "images"),
        "vision_model": str(vqa_env.vision),
        "text_model": str(vqa_env.text),
        "epochs": 1,
        "batch_size": 16,
        "max_train_samples": 48,
        "max_eval_samples": 16,
    }
    experiments = [{"name": "text_lora", "overrides": {"use_text_lora": True, "text_lora_r": 8}}]
    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump({"name": "gpu", "seeds": 1, "base": base, "experiments": experiments}),
        encoding="utf-8",
    )
    out = tmp_path / "study"
    command = [sys.executable, "-m", "vqadapt", "ablate", "--preset", str(preset), "--out"]
    steps = ["--train_fractions", "0.5", "1", "--fraction_budget", "steps"]
    result = subprocess.run([*command, str(out), *steps], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for cell, repeats in (
        (out / "text_lora" / "seed0", 1),
        (out / "text_lora" / "train0.5" / "seed0", 2),
    ):
        summary = json.loads((cell / "summary.json").read_text(encoding="utf-8"))
        assert summary["device"]["type"] == "cuda"
        assert (
            yaml.safe_load((cell / "config.yaml").read_text())["train"]["epoch_repeats"] == repeats
        )
        assert [len(row["step_losses"]) for row in _metrics(cell)] == [3]  # 48 / 16, 24 x 2 / 16
    assert (out / "report.md").is_file()


@pytest.mark.parametrize("strategy", ["baseline", "unfreeze3", "text_lora", "vision_text_lora"])
def test_the_training_step_never_waits_for_the_gpu(make_tiny_model, make_batch, strategy):
    """torch.cuda's sync debug mode turns every host-device synchronisation into an error."""
    adapt = {
        "baseline": AdaptConfig(),
        "unfreeze3": AdaptConfig(unfreeze_encoder_layers=3),
        "text_lora": AdaptConfig(use_text_lora=True, text_lora_r=4),
        "vision_text_lora": AdaptConfig(use_text_lora=True, use_vision_lora=True),
    }[strategy]

    class SingleProcess:
        num_processes = 1

        @staticmethod
        def reduce(tensor, reduction):
            return tensor.clone()

    model = make_tiny_model(speed="library")
    apply_adaptation(model, adapt)
    speed.install(model, speed.SpeedPaths.for_device("cuda"))
    model.cuda().train()
    optimizer = make_optimizer(model, 1e-3, 3e-4, 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    step = OptimizerStep(model, optimizer, scheduler, GradientMeter(model), 1.0)
    batches = [
        {k: v.cuda() for k, v in make_batch(model, batch_size=4, seed=s).items()} for s in range(3)
    ]

    def one_step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            per_sample = model(batch, return_losses=True)
        loss, value = global_weighted_loss(per_sample, batch["weights"], SingleProcess())
        loss.backward()
        step(value)

    one_step(batches[0])  # first step: lazy state (optimizer moments, index tensors)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            one_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert step.skipped_steps() == 0

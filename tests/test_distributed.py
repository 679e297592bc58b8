"""Two CPU processes through ``accelerate launch`` train the same model as one process.

``accelerate launch --multi_gpu --num_processes 2`` on this machine (no GPU) starts two CPU
processes joined by gloo. With the same global batch and seed, dropout off (each process
draws its own dropout masks), the two-process run must give the metrics of the one-process
run: losses to 1e-4 relative (the all-reduce sums gradients in another order), the same
predictions, and one set of files written by the main process only. The batch size leaves a
last batch of one question, so one process has an empty share of it (it steps on weight 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vqadapt.adapt import apply_adaptation
from vqadapt.checkpoint import save_checkpoint
from vqadapt.config import AdaptConfig
from vqadapt.demo.browser import free_port
from vqadapt.errors import VQATrainingError
from vqadapt.train import process_share

CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"
EPOCHS = 2
FLAGS = [
    "--max_train_samples",
    "61",  # batches of 20, 20, 20 and 1
    "--batch_size",
    "20",
    "--gradient_accumulation_steps",
    "2",
    "--dropout",
    "0",
    "--scheduler",
    "constant",  # the schedule does not depend on --epochs, so a resume can extend a run
    "--warmup_ratio",
    "0",
    "--use_text_lora",
    "--text_lora_r",
    "4",
    "--unfreeze_encoder_layers",
    "0",
]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train_one(argv: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vqadapt", "train", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def _train_two(argv: list[str], config_file: Path | None = None) -> str:
    """``accelerate launch`` two processes: the README's flags, or a shipped config file."""
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--main_process_port", str(free_port())]
    if config_file is None:
        command += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        command += ["--config_file", str(config_file)]
    done = subprocess.run(
        [*command, "-m", "vqadapt", "train", *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_process_share_covers_every_index_once():
    for n in (0, 1, 5, 20):
        for world in (1, 2, 3):
            shares = [process_share(list(range(n)), rank, world) for rank in range(world)]
            assert [i for share in shares for i in share] == list(range(n))
    assert process_share([7], 0, 2) == [] and process_share([7], 1, 2) == [7]


@pytest.mark.parametrize("name", ["cpu-2proc", "ddp", "ddp-2machines", "fsdp", "deepspeed-zero2"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
    expected = {"cpu-2proc": "MULTI_CPU", "ddp": "MULTI_GPU", "ddp-2machines": "MULTI_GPU"}
    expected |= {"fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED"}
    assert str(config.distributed_type).endswith(expected[name])
    assert config.num_processes >= 2
    if name == "ddp-2machines":
        assert config.num_machines == 2 and config.main_process_ip and config.main_process_port


@pytest.mark.parametrize("partitioned", ["lora", "decoder"])
def test_partitioned_parameters_are_never_saved_empty(make_tiny_model, tmp_path, partitioned):
    """DeepSpeed ZeRO-3 leaves 0-element placeholders in each process: saving them would write
    an empty adapter. The checkpoint refuses, and writes nothing."""
    model = make_tiny_model()
    apply_adaptation(model, AdaptConfig(use_text_lora=True, text_lora_r=4))
    marker = ".lora_A." if partitioned == "lora" else "decoder.layers.0.fc1.weight"
    param = next(p for n, p in model.named_parameters() if marker in n)
    param.data = torch.empty(0)
    with pytest.raises(VQATrainingError, match="empty tensors"):
        save_checkpoint(model, tmp_path / "best")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def runs(vqa_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _train_one(vqa_env.argv(root / "one", *FLAGS, "--epochs", str(EPOCHS)))
    # Two processes: one epoch, then resumed to the second. Removing the summary leaves the
    # state of a run interrupted after its last checkpoint (during the final test pass).
    first = _train_two(vqa_env.argv(root / "two", *FLAGS, "--epochs", "1"))
    (root / "two" / "summary.json").unlink()
    resumed = _train_two(
        vqa_env.argv(root / "two", *FLAGS, "--epochs", str(EPOCHS), "--resume"),
        config_file=CONFIGS / "cpu-2proc.yaml",
    )
    return root / "one", root / "two", first + resumed


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(runs):
    one, two, _ = runs
    rows_one, rows_two = _lines(one / "metrics.jsonl"), _lines(two / "metrics.jsonl")
    assert [row["epoch"] for row in rows_two] == list(range(1, EPOCHS + 1))  # no duplicates
    for a, b in zip(rows_one, rows_two, strict=True):
        for key in ("train_loss", "val_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        assert b["val_em"] == a["val_em"] and b["val_f1"] == a["val_f1"]
    predictions_one = _lines(one / "predictions_test.jsonl")
    predictions_two = _lines(two / "predictions_test.jsonl")
    assert len(predictions_two) == 32  # every test question once: none dropped or doubled
    assert [p["id"] for p in predictions_two] == [p["id"] for p in predictions_one]
    assert [p["prediction"] for p in predictions_two] == [p["prediction"] for p in predictions_one]
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert summary_two["test"]["em"] == summary_one["test"]["em"]
    assert summary_two["test"]["loss"] == pytest.approx(summary_one["test"]["loss"], rel=1e-4)
    assert summary_two["best_epoch"] == summary_one["best_epoch"]


@pytest.mark.slow
def test_only_the_main_process_writes_and_speaks(runs):
    _, two, output = runs
    assert output.count("epoch 1: train loss") == 1  # one process logs
    assert output.count("resuming") == 1
    events = list((two / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 2  # one writer per launch (first run + resumed), not per process
    state = json.loads((two / "status.json").read_text())
    assert state["status"] == "success"
    leftovers = [p.name for p in two.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_early_stopping_is_decided_alike_by_both_processes(vqa_env, tmp_path):
    """Validation metrics are gathered before the decision, so both processes stop after the
    same epoch (a process that went on alone would hang at the next collective)."""
    stop = [*FLAGS, "--epochs", "4", "--early_stopping_metric", "val_em"]
    stop += ["--early_stopping_patience", "1"]
    _train_one(vqa_env.argv(tmp_path / "one", *stop))
    _train_two(vqa_env.argv(tmp_path / "two", *stop))
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["stopped_early"] and one["epochs_run"] < 4  # the tiny run's val EM stalls
    assert (two["epochs_run"], two["best_epoch"]) == (one["epochs_run"], one["best_epoch"])
    assert len(_lines(tmp_path / "two" / "metrics.jsonl")) == two["epochs_run"]


@pytest.mark.slow
def test_two_processes_build_disjoint_cache_shards(vqa_env, tmp_path, monkeypatch):
    """Under ``accelerate launch`` each process builds its own shards of every feature cache
    (shard i by process i % 2), in parallel, and then each reads all of them; the rows equal
    a one-process build's up to float rounding (fp16 rounding of nearly equal values)."""
    from vqadapt.build import build_data, build_model
    from vqadapt.shards import built_by

    flags = vqa_env.argv(tmp_path / "unused", "--unfreeze_encoder_layers", "3")
    launcher = Path(sys.executable).parent / "accelerate"
    command = [str(launcher), "launch", "--main_process_port", str(free_port())]
    command += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    script = Path(__file__).parent / "cache_ranks.py"
    results_dir = tmp_path / "results"
    command += [str(script), json.dumps(flags), str(vqa_env.vision), str(vqa_env.text)]
    command += [str(results_dir)]
    two = tmp_path / "two"
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env={**_env(), "VQADAPT_CACHE": str(two)},
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = [json.loads((results_dir / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert [result["rank"] for result in results] == [0, 1]
    assert results[0]["sums"] == results[1]["sums"] and len(results[0]["sums"]) == 4

    monkeypatch.setenv("VQADAPT_CACHE", str(tmp_path / "one"))
    config = vqa_env.config(tmp_path / "unused", "--unfreeze_encoder_layers", "3")
    model, _, tokenizer, preprocessing = build_model(config, vqa_env.backbones())
    one = build_data(
        config,
        model,
        tokenizer,
        preprocessing,
        vqa_env.backbones(),
        log=lambda _: None,
        shard_items=16,
    )
    for reader in one.features.readers():
        spec = reader.spec
        twin = two / "features" / spec.folder.name  # the same key: the same cache
        assert twin.is_dir()
        builders = [built_by(replace(spec, folder=twin), s) for s in range(spec.n_shards)]
        assert builders == [s % 2 for s in range(spec.n_shards)] and spec.n_shards >= 2
        from vqadapt.shard_reader import RowReader

        items = list(range(spec.n_items))
        theirs = RowReader(replace(spec, folder=twin)).read_padded(items).float()
        ours = reader.read_padded(items).float()
        torch.testing.assert_close(theirs, ours, rtol=2**-10, atol=1e-6)

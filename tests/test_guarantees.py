"""Nothing is lost: real kills, torn checkpoints, non-finite losses, safe loading, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vqadapt.backbones import load_text, load_vision
from vqadapt.checkpoint import load_training_state, recover_checkpoint
from vqadapt.errors import VQAConfigError, VQADataError, VQATrainingError
from vqadapt.train import train

QUIET = lambda _: None  # noqa: E731
SMALL = ["--max_train_samples", "48", "--batch_size", "4", "--lr", "1e-2"]


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def same_curves(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for row_a, row_b in zip(a, b, strict=True):
        for key in ("epoch", "train_loss", "val_loss", "val_em"):
            assert row_a[key] == pytest.approx(row_b[key], abs=1e-6), key


@pytest.mark.slow
def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(vqa_env, tmp_path):
    straight = tmp_path / "straight"
    train(vqa_env.config(straight, *SMALL, "--epochs", "3"), log=QUIET)

    killed = tmp_path / "killed"
    argv = vqa_env.argv(killed, *SMALL, "--epochs", "3")
    process = subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "train", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # as this process (conftest): same sums
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (killed / "last" / "training_state.pt").exists() and process.poll() is None:
            break
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    status = json.loads((killed / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "running", "the kill should land before the run finished"
    assert not (killed / "summary.json").exists()

    with pytest.raises(VQAConfigError, match="--resume"):
        train(vqa_env.config(killed, *SMALL, "--epochs", "3"), log=QUIET)
    train(vqa_env.config(killed, *SMALL, "--epochs", "3", "--resume"), log=QUIET)
    same_curves(metrics(straight), metrics(killed))
    test_straight = json.loads((straight / "summary.json").read_text())["test"]["em"]
    assert json.loads((killed / "summary.json").read_text())["test"]["em"] == test_straight


def test_a_kill_between_the_checkpoint_renames_is_recovered(vqa_env, tmp_path):
    run = tmp_path / "run"
    train(vqa_env.config(run, *SMALL, "--epochs", "2"), log=QUIET, stop_after_epoch=1)
    # What save_checkpoint leaves when killed after moving the old folder aside: no last/,
    # the previous complete one as .last.old-*, a half-written .last.writing-*.
    (run / "last").rename(run / ".last.old-1")
    partial = run / ".last.writing-2"
    partial.mkdir()
    (partial / "trained.safetensors").write_bytes(b"torn")
    recover_checkpoint(run / "last")
    assert (run / "last" / "training_state.pt").is_file()
    assert not partial.exists() and not (run / ".last.old-1").exists()

    straight = tmp_path / "straight"
    train(vqa_env.config(straight, *SMALL, "--epochs", "2"), log=QUIET)
    (run / "last").rename(run / ".last.old-1")
    train(vqa_env.config(run, *SMALL, "--epochs", "2", "--resume"), log=QUIET)
    same_curves(metrics(straight), metrics(run))


def nan_on(monkeypatch, poisoned) -> None:
    """Make the training loss of the n-th training batch NaN where ``poisoned(n)``."""
    from vqadapt.model import VQAModel

    real = VQAModel.forward
    seen = {"n": 0}

    def forward(self, batch, return_losses=False, label_smoothing=0.0):
        out = real(self, batch, return_losses, label_smoothing)
        if not (self.training and return_losses):
            return out
        seen["n"] += 1
        return out * float("nan") if poisoned(seen["n"]) else out

    monkeypatch.setattr(VQAModel, "forward", forward)


def nan_after(monkeypatch, calls: int) -> None:
    """Make the training loss NaN from the ``calls``-th batch on."""
    nan_on(monkeypatch, lambda n: n >= calls)


def test_non_finite_loss_stops_with_the_last_good_checkpoint_intact(vqa_env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_after(monkeypatch, calls=12 + 3)  # 12 steps per epoch: NaN during epoch 2
    with pytest.raises(VQATrainingError, match=r"epoch 2, step 15.*last good checkpoint"):
        train(vqa_env.config(run, *SMALL, "--epochs", "2"), log=QUIET)
    state = load_training_state(run / "last")
    assert state["loop"]["epoch"] == 1
    assert json.loads((run / "status.json").read_text())["status"] == "failed"
    for tensor in state["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in tensor.values() if torch.is_tensor(v))


def test_non_finite_steps_can_be_skipped_and_are_counted(vqa_env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    nan_on(monkeypatch, lambda n: n in (2, 5))
    train(vqa_env.config(run, *SMALL, "--epochs", "1", "--on_nonfinite", "skip"), log=QUIET)
    rows = metrics(run)
    assert rows[0]["skipped_steps"] == 2
    assert rows[0]["train_loss"] == rows[0]["train_loss"]  # finite: NaN steps are left out


def test_resuming_with_other_settings_is_refused(vqa_env, tmp_path):
    run = tmp_path / "run"
    train(vqa_env.config(run, *SMALL, "--epochs", "2"), log=QUIET, stop_after_epoch=1)
    with pytest.raises(VQAConfigError, match=r"other settings.*lr"):
        train(vqa_env.config(run, *SMALL, "--epochs", "2", "--resume", "--lr", "0.5"), log=QUIET)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_training_state_is_loaded_without_running_pickled_code(tmp_path):
    (tmp_path / "training_state.pt").write_bytes(pickle.dumps({"loop": Exploit()}))
    with pytest.raises(VQADataError, match=r"refused.*could run code"):
        load_training_state(tmp_path)


def test_missing_or_wrong_backbone_folders_say_what_was_looked_for(tmp_path, monkeypatch):
    with pytest.raises(VQAConfigError, match="folder not found"):
        load_text(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VQAConfigError, match=r"no config\.json"):
        load_vision(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(VQAConfigError, match="local folder"):
        load_text("vinai/bartpho-syllable")


def test_bad_data_is_reported_before_any_model_loads(vqa_env, tmp_path, monkeypatch):
    bad = tmp_path / "train.csv"
    shutil.copy(vqa_env.data / "train.csv", bad)
    text = bad.read_text(encoding="utf-8").splitlines()
    text[3] = text[3].rsplit(",", 1)[0] + ",9"  # unknown type code
    index, _, *rest = text[5].split(",")
    text[5] = ",".join([index, "", *rest])  # empty question
    bad.write_text("\n".join(text) + "\n", encoding="utf-8")

    import vqadapt.build as build

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data check")

    monkeypatch.setattr(build, "load_text", no_model)
    config = vqa_env.config(tmp_path / "run", "--train_file", str(bad))
    with pytest.raises(Exception, match=r"data check found problems") as caught:
        train(config, log=QUIET)
    message = str(caught.value)
    assert "row 3" in message and "'type'" in message
    assert "row 5" in message and "'question'" in message


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--use_text_lora", "--text_lora_targets", "nope"], "match no linear layer"),
        (["--use_vision_lora", "--vision_lora_targets", "qq"], "match no linear layer"),
        (["--unfreeze_encoder_layers", "13"], "out of range"),
    ],
)
def test_impossible_adaptation_fails_before_any_weight_loads(
    vqa_env, tmp_path, monkeypatch, flags, message
):
    import vqadapt.build as build

    def no_model(*args, **kwargs):
        raise AssertionError("weights were loaded before the settings were checked")

    monkeypatch.setattr(build, "load_text", no_model)
    monkeypatch.setattr(build, "load_vision", no_model)
    with pytest.raises(VQAConfigError, match=message):
        build.build_model(vqa_env.config(tmp_path / "run", *flags), vqa_env.backbones())

"""Issue 14's cases, one test each: --overwrite never deletes before it is safe, one writer per
folder, no foreign code from a run folder, and a message instead of every traceback.

(The failure classes, as tables, are in test_failures.py; kills at random points in
test_chaos.py.)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_failures import TINY, copy_run, listing, run_cli
from vqadapt.errors import VQABusyError, VQATrainingError
from vqadapt.folders import FolderLock, lock_holder, lock_path
from vqadapt.io import file_mode
from vqadapt.train import train

QUIET = lambda _: None  # noqa: E731
SMALL = ["--max_train_samples", "48", "--batch_size", "4", "--max_eval_samples", "16"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def finished(vqa_env, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reliability") / "finished"
    train(vqa_env.config(run, *TINY, "--epochs", "1"), log=QUIET)
    return run


def status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text(encoding="utf-8"))


def metrics(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# -- 1. --overwrite never deletes before it is safe -----------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        ["--unfreeze_encoder_layers", "13"],  # the case: a setting the model refuses
        ["--train_file", "/nonexistent/train.csv"],  # data that is not there
        ["--text_model", "/nonexistent/text"],  # a backbone that is not there
    ],
)
def test_overwrite_with_bad_settings_keeps_the_old_run(
    vqa_env, finished, tmp_path, capsys, bad
) -> None:
    run = copy_run(finished, tmp_path)
    before = listing(run)
    result = run_cli(["train", *vqa_env.argv(run, *TINY, "--overwrite", *bad)], capsys)
    assert result.code == 2, result.err
    assert listing(run) == before  # every file of the old run, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging left behind


def test_overwrite_swaps_the_new_run_in_whole(vqa_env, finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path)
    old_plan = (run / "plan.txt").read_text(encoding="utf-8")
    train(vqa_env.config(run, *TINY, "--overwrite", "--unfreeze_encoder_layers", "2"), log=QUIET)
    assert (run / "plan.txt").read_text(encoding="utf-8") != old_plan
    assert (
        yaml.safe_load((run / "config.yaml").read_text())["adapt"]["unfreeze_encoder_layers"] == 2
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_kill_during_the_overwrite_swap_is_repaired(vqa_env, finished, tmp_path) -> None:
    """Killed between the two renames: no run folder, the old one aside as .run.old-*."""
    run = copy_run(finished, tmp_path)
    aside = tmp_path / ".run.old-1"
    run.rename(aside)
    (tmp_path / ".run.writing-2").mkdir()  # the new one, half built
    train(vqa_env.config(run, *TINY, "--resume"), log=QUIET)  # finds its run back
    assert status(run)["status"] == "success"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_folders_that_are_not_runs_are_never_written(vqa_env, tmp_path, capsys) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: project\n", encoding="utf-8")
    (project / "notes.md").write_text("notes", encoding="utf-8")
    before = listing(project)
    for flags in ([], ["--overwrite"], ["--resume"]):
        result = run_cli(["train", *vqa_env.argv(project, *TINY, *flags)], capsys)
        assert result.code == 2 and "is not a vqadapt run" in result.err, result.err
    assert listing(project) == before


def test_resume_into_a_missing_folder_says_so(vqa_env, tmp_path, capsys) -> None:
    result = run_cli(["train", *vqa_env.argv(tmp_path / "nope", *TINY, "--resume")], capsys)
    assert result.code == 2
    assert "--resume" in result.err and "it does not exist" in result.err
    assert not (tmp_path / "nope").exists()


# -- 2. one writer per folder -------------------------------------------------------------------
def test_a_second_writer_is_refused(vqa_env, finished, tmp_path, capsys) -> None:
    run = copy_run(finished, tmp_path)
    before = listing(run)
    with FolderLock(run):  # as another live process would hold it
        result = run_cli(["train", *vqa_env.argv(run, *TINY, "--overwrite")], capsys)
        assert result.code == VQABusyError.exit_code
        assert f"pid {os.getpid()}" in result.err and "in use by another process" in result.err
        evaluated = run_cli(["eval", "--run", run], capsys)  # eval writes into the run too
        assert evaluated.code == VQABusyError.exit_code
    assert listing(run) == before
    assert not lock_path(run).exists()  # the last holder removes the lock file


def test_a_lock_dies_with_its_process(vqa_env, finished, tmp_path) -> None:
    """kill -9 of the holder: the OS releases the lock; its file (and text) stay, harmless."""
    run = copy_run(finished, tmp_path)
    code = (
        "import sys, time; from vqadapt.folders import FolderLock; "
        "lock = FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert holder.stdout.readline().strip() == "held"
    assert lock_holder(run).startswith(f"pid {holder.pid} on ")
    holder.kill()
    holder.wait()
    assert lock_path(run).is_file() and lock_holder(run) is None
    train(vqa_env.config(run, *TINY, "--overwrite"), log=QUIET)
    assert status(run)["status"] == "success"


@pytest.mark.slow
def test_two_overwrites_at_once_never_mix_their_rows(vqa_env, finished, tmp_path) -> None:
    run = copy_run(finished, tmp_path)
    first = subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "train",
         *vqa_env.argv(run, *SMALL, "--epochs", "50", "--overwrite", "--lr", "0.01")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
            (run / "metrics.jsonl").exists() and status(run)["status"] == "running"
        ):
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "vqadapt", "train",
             *vqa_env.argv(run, *SMALL, "--epochs", "3", "--overwrite", "--lr", "0.02")],
            capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
        assert first.poll() is None, "the first training should still be running"
    finally:
        first.kill()
        first.wait()
    assert second.returncode == VQABusyError.exit_code, second.stderr[-2000:]
    assert "in use by another process" in second.stderr and "Traceback" not in second.stderr
    epochs = [row["epoch"] for row in metrics(run)]
    assert epochs == list(range(1, len(epochs) + 1))  # the first run's rows only
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.01


# -- 3. a run folder is data, not code ----------------------------------------------------------
def evil_text_model(source: Path, target: Path, sentinel: Path) -> Path:
    """A copy of a text model whose config asks for code of its own, which would leave a
    file behind if it ever ran."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "evil_mbart"
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSeq2SeqLM": "evil.EvilModel",
    }
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (target / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
        "from transformers import MBartConfig, MBartForConditionalGeneration\n"
        "class EvilConfig(MBartConfig):\n    model_type = 'evil_mbart'\n"
        "class EvilModel(MBartForConditionalGeneration):\n    config_class = EvilConfig\n",
        encoding="utf-8",
    )
    return target


@pytest.fixture
def received_run(vqa_env, finished, tmp_path) -> tuple[Path, Path]:
    """A run folder from someone else: config.yaml says trust_remote_code: true and its
    text model comes with code."""
    run = copy_run(finished, tmp_path)
    sentinel = tmp_path / "PWNED"
    evil = evil_text_model(vqa_env.text, tmp_path / "evil_text", sentinel)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["model"].update(trust_remote_code=True, text_model=str(evil))
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    summary["backbones"]["text"] = str(evil)
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return run, sentinel


def test_a_received_run_never_runs_its_code(vqa_env, received_run, tmp_path, capsys) -> None:
    run, sentinel = received_run
    image = next((vqa_env.data / "images").iterdir())
    commands = [
        ["predict", "--run", run, "--question", "có mấy hình", "--image", image],
        ["eval", "--run", run],
        ["export", "--run", run, "--out", tmp_path / "export"],
    ]
    for argv in commands:
        result = run_cli(argv, capsys)
        assert result.code == 2, (argv[0], result.err)
        assert "--trust_remote_code" in result.err and "Nothing of it was run" in result.err
    resumed = run_cli(["train", *vqa_env.argv(run, *TINY, "--resume")], capsys)
    assert resumed.code == 2 and "trust_remote_code: True -> False" in resumed.err
    assert not sentinel.exists()


@pytest.mark.slow
def test_trust_remote_code_on_the_command_line_is_honoured(vqa_env, received_run, tmp_path):
    run, sentinel = received_run
    image = next((vqa_env.data / "images").iterdir())
    argv = ["predict", "--run", run, "--question", "q", "--image", image, "--trust_remote_code"]
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-m", "vqadapt", *map(str, argv)], capture_output=True, env=env)
    assert sentinel.read_text() == "ran"  # given here, by the user: the code ran


# -- 4. a message for every failure -------------------------------------------------------------
def test_training_without_a_test_file(vqa_env, tmp_path) -> None:
    config = vqa_env.config(tmp_path / "run", *TINY)
    config.data.test_file = None
    summary = train(config, log=QUIET)
    assert summary["status"] == "success" and summary["test"] is None
    assert not (tmp_path / "run" / "predictions_test.jsonl").exists()


def test_skipping_bad_images_that_empties_a_split(vqa_env, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(vqa_env.data, data)
    for image in (data / "images").iterdir():  # every image unreadable
        image.write_bytes(b"not an image")
    argv = vqa_env.argv(tmp_path / "run", *TINY, "--on_bad_image", "skip")
    argv += ["--train_file", data / "train.csv", "--image_root", data / "images"]
    argv += ["--test_file", data / "test.csv"]
    result = run_cli(["train", *argv], capsys)
    assert result.code == 2
    assert "the train split is empty: --on_bad_image skip dropped all" in result.err
    assert "train.csv" in result.err
    assert not (tmp_path / "run").exists()


def out_of_memory_at(monkeypatch, call: int) -> None:
    """The model's training forward raises CUDA's out-of-memory error at the ``call``-th
    batch, as a GPU would (the same exception type, raised on the CPU)."""
    from vqadapt.model import VQAModel

    real, seen = VQAModel.forward, {"n": 0}

    def forward(self, batch, return_losses=False, label_smoothing=0.0):
        if self.training and return_losses:
            seen["n"] += 1
            if seen["n"] == call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(self, batch, return_losses, label_smoothing)

    monkeypatch.setattr(VQAModel, "forward", forward)


def test_out_of_memory_says_what_to_try_and_keeps_the_checkpoint(
    vqa_env, tmp_path, monkeypatch
) -> None:
    run = tmp_path / "run"
    out_of_memory_at(monkeypatch, 12 + 3)  # 12 steps per epoch: during epoch 2
    with pytest.raises(VQATrainingError) as caught:
        train(vqa_env.config(run, *SMALL, "--epochs", "2"), log=QUIET)
    message = str(caught.value)
    assert "out of memory" in message and "training epoch 2" in message
    assert "--batch_size 2 --gradient_accumulation_steps 2" in message
    assert f"checkpoint of epoch 1 in {run / 'last'}" in message
    assert status(run)["status"] == "failed" and "epoch 1" in status(run)["kept"]
    monkeypatch.undo()
    # What the message says to do: the same effective batch, resumed.
    flags = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--resume"]
    summary = train(vqa_env.config(run, *SMALL, "--epochs", "2", *flags), log=QUIET)
    assert summary["status"] == "success"
    assert [row["epoch"] for row in metrics(run)] == [1, 2]


def test_out_of_memory_on_the_command_line_is_a_message(vqa_env, tmp_path, monkeypatch, capsys):
    out_of_memory_at(monkeypatch, 1)
    result = run_cli(["train", *vqa_env.argv(tmp_path / "run", *SMALL)], capsys)
    assert result.code == 3
    assert "error: out of memory on cpu while training epoch 1" in result.err
    assert "no epoch had finished" in result.err


def test_a_full_disk_fails_the_run_and_says_what_was_kept(vqa_env, tmp_path, monkeypatch) -> None:
    import vqadapt.checkpoint as checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):  # the training state of last/, once per epoch
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save)
    run = tmp_path / "run"
    with pytest.raises(VQATrainingError, match="the disk is full") as caught:
        train(vqa_env.config(run, *SMALL, "--epochs", "2"), log=QUIET)
    assert "checkpoint of epoch 1" in str(caught.value)
    recorded = status(run)
    assert recorded["status"] == "failed" and "disk is full" in recorded["error"]
    assert not [p for p in run.iterdir() if ".writing-" in p.name or ".old-" in p.name]
    assert torch.load(run / "last" / "training_state.pt")["loop"]["epoch"] == 1
    monkeypatch.undo()
    train(vqa_env.config(run, *SMALL, "--epochs", "2", "--resume"), log=QUIET)
    assert [row["epoch"] for row in metrics(run)] == [1, 2]


def test_a_full_disk_that_also_blocks_the_status_file_is_said(tmp_path, monkeypatch) -> None:
    import vqadapt.run_dir as run_dir

    run = run_dir.RunDirectory(tmp_path / "run")
    run.path.mkdir()
    (run.path / run_dir.MARKER).write_text("{}", encoding="utf-8")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_dir, "atomic_write_json", full)
    assert run.failed(OSError(errno.ENOSPC, "full"), kept="nothing") is False


def test_predict_with_a_missing_image_reads_nothing_else(finished, capsys, monkeypatch) -> None:
    import vqadapt.data.images as images

    def no_scan(*args, **kwargs):
        raise AssertionError("an image folder was indexed")

    monkeypatch.setattr(images.ImageIndex, "__init__", no_scan)
    for image, why in (("/missing.png", "image not found"), ("/", "image is not a file")):
        argv = ["predict", "--run", finished, "--question", "q", "--image", image]
        result = run_cli(argv, capsys)
        assert result.code == 2
        assert f"{image}: {why}" in result.err


def test_eval_keeps_the_training_predictions_and_takes_max_eval_samples(
    finished, tmp_path, capsys
) -> None:
    run = copy_run(finished, tmp_path)
    trained = (run / "predictions_test.jsonl").read_bytes()
    first = run_cli(["eval", "--run", run, "--max_eval_samples", "4"], capsys)
    assert first.code == 0, first.err
    assert "(n=4)" in first.out
    assert (run / "predictions_test.jsonl").read_bytes() == trained
    assert len((run / "eval_test_predictions.jsonl").read_text().splitlines()) == 4
    second = run_cli(["eval", "--run", run, "--max_eval_samples", "6"], capsys)
    assert "replacing the previous evaluation" in second.out
    assert json.loads((run / "eval_test.json").read_text())["n"] == 6


def test_run_files_have_one_permission_mode(finished) -> None:
    files = [p for p in finished.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode())}
    assert len(files) > 10


def test_no_progress_silences_the_libraries_bars_too(vqa_env, tmp_path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    train(vqa_env.config(tmp_path / "run", *TINY), log=QUIET)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # given back as it was


def test_errors_of_the_machine_are_messages(tmp_path, capsys, monkeypatch) -> None:
    """A read-only output folder: permission denied, named, no traceback."""
    from vqadapt import cli

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "synth"))

    monkeypatch.setattr("vqadapt.data.synth.generate", refuse)
    result = run_cli(["data", "synth", "--out", tmp_path / "synth", "--n", "10"], capsys)
    assert result.code == 2
    assert f"Permission denied ({tmp_path / 'synth'})" in result.err
    assert cli.environment_error(ValueError("a bug")) is None  # a bug keeps its traceback


# -- the ablation runner: cells die with it, a running cell is never started twice ---------------
def write_preset(path: Path, env, epochs: int = 1) -> Path:
    base = {
        "train_file": str(env.data / "train.csv"),
        "test_file": str(env.data / "test.csv"),
        "image_root": str(env.data / "images"),
        "vision_model": str(env.vision),
        "text_model": str(env.text),
        "epochs": epochs,
        "batch_size": 16,
        "max_train_samples": 48,
        "max_eval_samples": 16,
    }
    preset = {"name": "p", "seeds": 1, "base": base, "experiments": [{"name": "a"}]}
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    return path


@pytest.mark.slow
def test_cells_die_with_a_killed_runner(vqa_env, tmp_path) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env, epochs=30)
    out = tmp_path / "study"
    runner = subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "ablate", "--preset", preset, "--out", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
    )  # fmt: skip
    cell = out / "a" / "seed0"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (cell / "metrics.jsonl").exists():
        time.sleep(0.05)
    holder = lock_holder(cell)
    assert holder is not None, "the cell should be training"
    os.kill(runner.pid, signal.SIGKILL)  # the runner alone, as a crash would
    runner.wait()
    deadline = time.monotonic() + 30
    while lock_holder(cell) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock_holder(cell) is None, "the cell outlived its runner"
    assert not alive(int(holder.split()[1]))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.slow
def test_a_rerun_never_starts_a_cell_that_is_still_running(vqa_env, tmp_path) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env)
    out = tmp_path / "study"
    cell = out / "a" / "seed0"
    cell.mkdir(parents=True)
    with FolderLock(cell):  # a cell of an earlier runner, still training
        rerun = subprocess.run(
            [sys.executable, "-m", "vqadapt", "ablate", "--preset", preset, "--out", out],
            capture_output=True, text=True, env=ENV, timeout=300,
        )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"a seed 0: still running in another process (pid {os.getpid()}" in rerun.stdout
    assert not (cell / "config.yaml").exists()


def test_one_runner_per_study(vqa_env, tmp_path, capsys) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env)
    out = tmp_path / "study"
    out.mkdir()
    with FolderLock(out):
        result = run_cli(["ablate", "--preset", preset, "--out", out], capsys)
    assert result.code == VQABusyError.exit_code
    assert "in use by another process" in result.err
    assert list(out.iterdir()) == []

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
import torch
import yaml

from vqadapt.ablation.probe import write_question_losses
from vqadapt.ablation.runner import load_preset
from vqadapt.data.pipeline import load_splits
from vqadapt.data.splits import sample_positions
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
    # The second cell trains long enough to be killed while running: one epoch of 48 questions
    # can go from "running" to "success" between two polls.
    long_second = [
        TWO[0],
        {"name": "unfreeze3", "overrides": {"unfreeze_encoder_layers": 3, "epochs": 30}},
    ]
    preset = write_preset(tmp_path / "p.yaml", vqa_env, long_second)
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
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert status(first) == "success", "the first cell should have finished before the kill"
    assert status(second) == "running"
    finished_at = (first / "summary.json").stat().st_mtime_ns

    # with one training fraction the fraction budget changes nothing: not refused
    rerun = ablate("--preset", str(preset), "--out", str(out), "--fraction_budget", "steps")
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


def test_parallel_jobs_run_cells_at_once_each_on_its_share(tmp_path: Path, vqa_env) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO)
    out = tmp_path / "study"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, whatever machine runs the test
    result = ablate("--preset", str(preset), "--out", str(out), "--jobs", "2", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    cores = len(os.sched_getaffinity(0))
    share = f"OMP_NUM_THREADS={max(1, cores // 2)}"
    # Longest first: unfreezing three layers costs more than the frozen baseline.
    starts = [line for line in result.stdout.splitlines() if ": training (" in line]
    assert [line.split(":")[0] for line in starts] == ["unfreeze3 seed 0", "baseline seed 0"]
    assert all(line.endswith(f"{share}]") for line in starts), starts
    # Both processes were started before either was reaped, so they ran at once. (Their
    # training spans in status.json, to the second, need not overlap: a 48-question epoch can
    # take under a second, and one process may finish importing a second later.)
    lines = result.stdout.splitlines()
    started = [i for i, line in enumerate(lines) if ": training (" in line]
    finished = [i for i, line in enumerate(lines) if ": success in " in line]
    assert len(started) == len(finished) == 2 and max(started) < min(finished), lines
    for name in ("baseline", "unfreeze3"):
        assert status(out / name / "seed0") == "success"
    assert (out / "report.md").is_file()


def test_interrupted_parallel_study_resumes_its_running_cells(tmp_path: Path, vqa_env) -> None:
    """Ctrl-C (SIGINT to the runner) stops the running cells without marking them failed."""
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO)
    out = tmp_path / "study"
    # Cells long enough to be caught running together: the baseline's epochs take a fraction of
    # a second with its features cached, and it must not finish before unfreeze3 has built its
    # own cache and started (12 epochs were not always enough on a busy machine).
    arguments = ["--preset", str(preset), "--out", str(out), "--jobs", "2", "--set", "epochs=40"]
    process = subprocess.Popen(
        [sys.executable, "-m", "vqadapt", "ablate", *arguments],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # A shell's background job (`cmd &` without job control) ignores SIGINT, and Python
        # keeps an ignored SIGINT ignored: restore the default so Ctrl-C reaches the runner
        # however the test suite itself was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    cells = [out / "baseline" / "seed0", out / "unfreeze3" / "seed0"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(status(c) == "running" for c in cells):
        time.sleep(0.05)
    assert [status(c) for c in cells] == ["running", "running"], "never caught both running"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) != 0
    assert [status(c) for c in cells] == ["running", "running"]
    assert not (out / "report.md").exists()

    rerun = ablate(*arguments)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "unfreeze3 seed 0: resuming" in rerun.stdout
    assert [status(c) for c in cells] == ["success", "success"]


def test_job_environments_split_gpus_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from vqadapt.ablation.runner import job_environments

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert job_environments(1) == [{}]
    cores = len(os.sched_getaffinity(0))
    threads = str(max(1, cores // 3))
    assert job_environments(3) == [
        {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": threads},
        {"CUDA_VISIBLE_DEVICES": "5", "OMP_NUM_THREADS": threads},
        {"CUDA_VISIBLE_DEVICES": "3", "OMP_NUM_THREADS": threads},
    ]
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS: all the machine's cores
    assert job_environments(2)[0]["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own setting wins
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert job_environments(2) == [{}, {}]


def test_the_longest_cells_are_expected_to_cost_most() -> None:
    from vqadapt.ablation.runner import cell_config, expected_cost

    seed = load_preset("seed")
    costs = {
        e.name: expected_cost(cell_config(seed, e, 0, Path("unused"), {})) for e in seed.experiments
    }
    assert max(costs, key=costs.get) == "vision_text_lora"
    assert min(costs, key=costs.get) == "baseline"
    assert costs["baseline"] < costs["unfreeze3"] < costs["lora_r16"] == costs["lora_r8"]


def test_jobs_must_be_positive(tmp_path: Path, vqa_env) -> None:
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO[:1])
    result = ablate("--preset", str(preset), "--out", str(tmp_path / "s"), "--jobs", "0")
    assert result.returncode == 2
    assert "--jobs: must be between 1 and 256 (got 0)" in result.stderr
    assert not (tmp_path / "s").exists()


def test_a_steps_budget_repeats_the_smaller_fractions(tmp_path: Path, vqa_env) -> None:
    """``fraction_budget: steps`` gives each smaller fraction the passes per epoch that make
    about as many steps as the largest; ``epochs`` (the default) leaves them at one pass."""
    from vqadapt.ablation.runner import cell_config, fraction_settings

    preset = load_preset(str(write_preset(tmp_path / "p.yaml", vqa_env, TWO[:1])))  # 48 questions
    preset.train_fractions = [0.25, 0.5, 1.0]
    assert preset.fraction_budget == "epochs"
    assert fraction_settings(preset, {}, print) == {
        0.25: {"max_train_samples": 12},
        0.5: {"max_train_samples": 24},
        1.0: {},
    }
    preset.fraction_budget = "steps"
    settings = fraction_settings(preset, {}, print)
    assert settings == {
        0.25: {"max_train_samples": 12, "epoch_repeats": 4},
        0.5: {"max_train_samples": 24, "epoch_repeats": 2},
        1.0: {},
    }
    cell = cell_config(preset, preset.experiments[0], 0, tmp_path / "cell", {}, settings[0.25])
    assert (cell.data.max_train_samples, cell.train.epoch_repeats) == (12, 4)
    # Seed k trains on sample k: the seeds vary a smaller set's questions, the fractions of
    # one seed stay nested, and a preset (or --set) can fix one sample for every seed.
    questions = {}
    for seed in (0, 1):
        for fraction in (0.25, 1.0):
            config = cell_config(
                preset, preset.experiments[0], seed, tmp_path / "c", {}, settings[fraction]
            )
            assert config.data.train_sample_seed == seed
            questions[seed, fraction] = {r.id for r in load_splits(config.data).train}
    assert questions[0, 0.25] < questions[0, 1.0] and questions[1, 0.25] < questions[1, 1.0]
    assert len(questions[0, 0.25]) == len(questions[1, 0.25]) == 12
    assert questions[0, 0.25] != questions[1, 0.25]
    assert questions[0, 1.0] != questions[1, 1.0]  # max_train_samples 48 of more
    fixed = {"train_sample_seed": 3}
    assert (
        cell_config(preset, preset.experiments[0], 1, tmp_path / "c", fixed).data.train_sample_seed
        == 3
    )
    # a base that repeats already: the fractions repeat that many times more
    assert fraction_settings(preset, {"epoch_repeats": 2}, print)[0.5]["epoch_repeats"] == 4
    quick = load_preset("quick")
    assert (quick.train_fractions, quick.fraction_budget) == ([0.1, 1.0], "steps")
    data = yaml.safe_load((tmp_path / "p.yaml").read_text(encoding="utf-8"))
    data["fraction_budget"] = "tokens"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(VQAConfigError, match="fraction_budget must be one of epochs, steps"):
        load_preset(str(tmp_path / "bad.yaml"))


def test_training_fractions_resources_and_question_losses(tmp_path: Path, vqa_env) -> None:
    """--train_fractions adds cells on a share of the training questions (a fixed random
    sample, part of the larger set; here at about equal steps); every cell records its
    process's peak memory and the final model's per-question losses."""
    preset = write_preset(tmp_path / "p.yaml", vqa_env, TWO[:1])
    out = tmp_path / "study"
    fractions = ("--train_fractions", "0.5", "1", "--fraction_budget", "steps")
    result = ablate("--preset", str(preset), "--out", str(out), *fractions)
    assert result.returncode == 0, result.stdout + result.stderr
    main, half = out / "baseline" / "seed0", out / "baseline" / "train0.5" / "seed0"
    assert status(main) == "success" and status(half) == "success"
    sizes = [json.loads((c / "summary.json").read_text())["data"]["train"] for c in (main, half)]
    assert sizes == [48, 24]  # max_train_samples 48, and half of it
    steps = [
        torch.load(c / "last" / "training_state.pt", weights_only=False)["loop"]["step"]
        for c in (main, half)
    ]
    assert steps == [3, 3]  # 48 questions in batches of 16; 24 questions passed twice
    for cell in (main, half):
        resources = json.loads((cell / "resources.json").read_text())
        assert resources["peak_rss_mb"] > 50 and resources["process_seconds"] > 0
        losses = json.loads((cell / "question_losses.json").read_text())
        assert losses["checkpoint"] == "last"
        assert len(losses["test"]) == 16 and 0 < len(losses["train"]) <= 48
        assert all(value > 0 for value in losses["test"].values())
    trained = {
        c: list(json.loads((c / "question_losses.json").read_text())["train"]) for c in (main, half)
    }
    assert len(trained[main]) == 48 and len(trained[half]) == 24
    assert set(trained[half]) < set(trained[main])  # the smaller set is part of the larger
    assert trained[half] != trained[main][:24]  # drawn from all of it, not its first questions
    # Training questions beyond the probe's limit: it scores a fixed random sample of them.
    write_question_losses(main, max_train=10)
    scored = list(json.loads((main / "question_losses.json").read_text())["train"])
    assert scored == [trained[main][i] for i in sample_positions(48, 10)] != trained[main][:10]
    study = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert study["train_fractions"] == [0.5, 1.0] and study["fraction_budget"] == "steps"
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Data efficiency" in report and "| 24 questions | 48 questions |" in report
    assert "trained for about as many steps" in report
    # A study stopped between a cell's training and its probe: the rerun scores the questions
    # of the trained model, without training it again.
    (main / "question_losses.json").unlink()
    metrics = (main / "metrics.jsonl").read_text(encoding="utf-8")
    rerun = ablate("--preset", str(preset), "--out", str(out), *fractions)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "scoring its questions" in rerun.stdout
    assert (main / "question_losses.json").is_file()
    assert (main / "metrics.jsonl").read_text(encoding="utf-8") == metrics
    # A rerun with another largest fraction would mix main studies: refused.
    again = ablate(
        "--preset", str(preset), "--out", str(out), "--train_fractions", "0.5",
        "--fraction_budget", "steps",
    )  # fmt: skip
    assert again.returncode == 2 and "largest training fraction" in again.stderr
    # so would a rerun whose smaller fractions train at equal epochs instead of steps
    other = ablate("--preset", str(preset), "--out", str(out), "--train_fractions", "0.5", "1")
    assert other.returncode == 2 and "train at equal steps" in other.stderr
    # and so would continuing a study made when cells took the first questions
    study.pop("samples")
    (out / "study.json").write_text(json.dumps(study), encoding="utf-8")
    older = ablate("--preset", str(preset), "--out", str(out), *fractions)
    assert older.returncode == 2 and "took the first questions" in older.stderr
    assert "samples" not in json.loads((out / "study.json").read_text(encoding="utf-8"))


def test_a_hand_run_lora_r8_is_the_study_s_lora_r8_cell(tmp_path) -> None:
    """`--use_text_lora --text_lora_r 8` and the seed preset's lora_r8 cell train the same
    LoRA (alpha 2r by default, issue 17): their resolved LoRA settings are equal."""
    from vqadapt import menu
    from vqadapt.ablation.runner import cell_config, load_preset
    from vqadapt.config import parse_run_config

    preset = load_preset("seed")
    for rank in (8, 16, 32):
        experiment = next(e for e in preset.experiments if e.name == f"lora_r{rank}")
        cell = cell_config(preset, experiment, 0, tmp_path / f"r{rank}", {})
        hand = parse_run_config(["--use_text_lora", "--text_lora_r", str(rank)])
        assert menu.lora_spec(cell.adapt, "text_encoder") == menu.lora_spec(
            hand.adapt, "text_encoder"
        )
        assert menu.lora_spec(hand.adapt, "text_encoder").alpha == 2 * rank

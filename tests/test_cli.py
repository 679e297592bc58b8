"""The command line: the seed command lines verbatim, plan, --config, errors, eval, predict, data."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from vqadapt import cli
from vqadapt.adapt import lora_parameter_count
from vqadapt.build import build_model
from vqadapt.config import parse_run_config
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.text import normalize
from vqadapt.tiny import TINY_TEXT, TINY_VISION

SEEDS = [
    "train --unfreeze_encoder_layers 0",
    "train --unfreeze_encoder_layers 3",
    "train --use_text_lora --text_lora_r 8 --unfreeze_encoder_layers 0",
    "train --use_text_lora --text_lora_r 16 --unfreeze_encoder_layers 0",
    "train --use_vision_lora --use_text_lora --text_lora_r 16",
    "train --use_vision_lora --vision_lora_r 8 --vision_lora_alpha 16 --use_text_lora "
    "--text_lora_r 16 --text_lora_alpha 32 --unfreeze_encoder_layers 0 --dropout 0.2 "
    "--weight_decay 0.1 --lr 5e-5 --scheduler cosine --early_stopping_patience 5 "
    "--answer_weights answer_weights.json",
]
SEED_COVERAGE = [
    "none (frozen)",
    "layers 10-12 only (25% of encoder)",
    "all 12 layers (LoRA)",
    "all 12 layers (LoRA)",
    "all 12 layers (LoRA)",
    "all 12 layers (LoRA)",
]
SHARED_VIVQA_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "vivqa" / "train.csv"


def run_cli(argv: list[str]) -> int:
    """``vqadapt ARGV`` in this process; the exit code."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    return 0 if code is None else code


def small_run_flags(out: Path) -> list[str]:
    return [
        "--output_dir",
        str(out),
        "--epochs",
        "1",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "16",
        "--no_progress",
    ]


@pytest.fixture(scope="module")
def cli_run(vqa_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run made through the CLI (high learning rate: varied predictions)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    argv = ["train", *vqa_env.data_flags(), *small_run_flags(out)]
    more = ["--max_train_samples", "64", "--batch_size", "4", "--lr", "3e-3", "--epochs", "2"]
    assert run_cli([*argv, *more]) == 0
    return out


# -- the seed command lines -----------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SEEDS)), ids=[f"seed{i}" for i in range(len(SEEDS))])
def test_seed_command_line(
    vqa_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, index: int
) -> None:
    seed = shlex.split(SEEDS[index])
    if "answer_weights.json" in seed:
        # made by the CLI itself, then passed by the relative name the seed line uses
        weights = tmp_path / "answer_weights.json"
        train_csv = str(vqa_env.data / "train.csv")
        assert run_cli(["answer-weights", "--data", train_csv, "--out", str(weights)]) == 0
        assert "wrote" in capsys.readouterr().out
        monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert run_cli([*seed, *vqa_env.data_flags(), *small_run_flags(out)]) == 0

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "success"
    assert summary["params"]["coverage"] == SEED_COVERAGE[index]
    assert summary["data"]["train"] == 32
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "success"
    vision = summary["params"]["per_tower"]["vision"]
    assert (vision["trainable"] > 0) == ("--use_vision_lora" in seed)
    if "--text_lora_r" in seed:
        r = int(seed[seed.index("--text_lora_r") + 1])
        adapter = json.loads(
            (out / "best" / "adapters" / "text" / "adapter_config.json").read_text(encoding="utf-8")
        )
        assert adapter["r"] == r
    if "--answer_weights" in seed:
        config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
        assert config["train"]["dropout"] == 0.2 and config["train"]["lr"] == 5e-5
        assert config["adapt"]["vision_lora_alpha"] == 16.0
        assert summary["answer_weights"]["covered"] > 0
        assert summary["answer_weights"]["uncovered_answers"] == 0


@pytest.mark.slow
def test_python_dash_m_end_to_end(vqa_env, tmp_path: Path) -> None:
    """The real entry point in a fresh interpreter."""
    out = tmp_path / "run"
    argv = ["train", "--use_text_lora", *vqa_env.data_flags(), *small_run_flags(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VQADAPT_CACHE": str(vqa_env.cache)}
    done = subprocess.run(
        [sys.executable, "-m", "vqadapt", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "text-encoder coverage: all 12 layers (LoRA)" in done.stdout
    assert re.search(r"test: EM \d+\.\d+  F1 \d+\.\d+  \(n=16\)", done.stdout)
    assert (out / "summary.json").is_file()


# -- plan -----------------------------------------------------------------------------------
def test_plan_prints_the_coverage_table(vqa_env, capsys) -> None:
    argv = [*vqa_env.data_flags(), "--unfreeze_encoder_layers", "3"]
    assert run_cli(["plan", *argv]) == 0
    out = capsys.readouterr().out
    assert "strategy: unfreeze last 3 text-encoder layers" in out
    assert "text-encoder coverage: layers 10-12 only (25% of encoder)" in out
    assert re.search(r"^tower\s+trainable\s+total\s+share$", out, re.M)
    rows = re.findall(r"^text_encoder\s+(\d+)\s+(\S+)\s+([\d,]+)\s+([\d,]+)$", out, re.M)
    assert [int(layer) for layer, *_ in rows] == list(range(1, 13))
    assert [mode for _, mode, *_ in rows] == ["frozen"] * 9 + ["full"] * 3
    d, ffn = TINY_TEXT["d_model"], TINY_TEXT["encoder_ffn_dim"]
    layer_params = 4 * (d * d + d) + 4 * d + (d * ffn + ffn) + (ffn * d + d)
    assert {int(total.replace(",", "")) for *_, total in rows} == {layer_params}
    assert [int(t.replace(",", "")) for _, _, t, _ in rows] == [0] * 9 + [layer_params] * 3
    _, plan, _, _ = build_model(parse_run_config(argv), vqa_env.backbones())
    (all_row,) = re.findall(r"^all\s+([\d,]+)\s+([\d,]+)\s+", out, re.M)
    assert [int(v.replace(",", "")) for v in all_row] == [plan.trainable, plan.total]
    assert "memory estimate" in out


def test_plan_rank_table(vqa_env, capsys) -> None:
    argv = [*vqa_env.data_flags(), "--use_text_lora", "--unfreeze_encoder_layers", "2"]
    assert run_cli(["plan", *argv, "--rank_table"]) == 0
    out = capsys.readouterr().out
    table = out.split("exact LoRA parameter counts", 1)[1]
    rows = re.findall(r"^\s*(\d+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", table, re.M)
    assert [int(r) for r, *_ in rows] == [4, 8, 16, 32, 64]
    base, _, _, _ = build_model(parse_run_config(vqa_env.data_flags()), vqa_env.backbones())
    for r, text, vision, decoder in rows:
        r, text, vision, decoder = (int(v.replace(",", "")) for v in (r, text, vision, decoder))
        assert text == lora_parameter_count(base, "text", "auto", r)
        assert vision == lora_parameter_count(base, "vision", "auto", r)
        d, layers = TINY_TEXT["d_model"], TINY_TEXT["encoder_layers"]
        assert text == layers * 3 * r * 2 * d
        dv, vision_layers = TINY_VISION["hidden_size"], TINY_VISION["num_hidden_layers"]
        assert vision == vision_layers * 3 * r * 2 * dv
        # q/k/v of self- and cross-attention in every decoder layer
        assert decoder == TINY_TEXT["decoder_layers"] * 6 * r * 2 * d


def test_config_file_is_layered_under_the_flags(vqa_env, tmp_path: Path, capsys) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {"adapt": {"unfreeze_encoder_layers": 2}, "train": {"lr": 0.5, "epochs": 3}}
            | {"cache": False}
        ),
        encoding="utf-8",
    )
    config = parse_run_config(["--config", str(settings), "--epochs", "5"])
    assert (config.adapt.unfreeze_encoder_layers, config.train.lr, config.train.epochs) == (
        2,
        0.5,
        5,
    )
    assert config.train.cache is False
    assert parse_run_config(["--config", str(settings), "--cache", "true"]).train.cache is True

    base = ["plan", "--config", str(settings), *vqa_env.data_flags()]
    assert run_cli(base) == 0
    assert "coverage: layers 11-12 only (17% of encoder)" in capsys.readouterr().out
    assert run_cli([*base, "--unfreeze_encoder_layers", "3"]) == 0
    assert "coverage: layers 10-12 only (25% of encoder)" in capsys.readouterr().out

    settings.write_text("train:\n  lr: 0.5\n  nope: 1\n", encoding="utf-8")
    assert run_cli(base) == 2
    assert "error:" in capsys.readouterr().err


# -- errors before anything loads -----------------------------------------------------------
@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    import vqadapt.build
    import vqadapt.train

    monkeypatch.setattr(vqadapt.train, "train", forbidden)
    for name in ("build_model", "load_text", "load_vision", "load_tokenizer"):
        monkeypatch.setattr(vqadapt.build, name, forbidden)


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--text_lora_r 0 --use_text_lora", "--text_lora_r must be > 0 (got 0)"),
        ("--batch_size 0", "--batch_size must be > 0 (got 0)"),
        ("--scheduler nope", "--scheduler must be one of cosine, linear, constant (got 'nope')"),
        ("--unfreeze_encoder_layers -2", "--unfreeze_encoder_layers must be >= 0"),
        ("--resume --overwrite", "--resume and --overwrite contradict each other"),
        ("--no_such_flag 3", "unrecognised arguments: --no_such_flag 3"),
        ("--epochs many", "--epochs must be an integer (got 'many')"),
    ],
)
def test_invalid_flags_exit_2_before_any_model_loads(
    vqa_env, tmp_path: Path, capsys, no_model_loads, command: str, flags: str, message: str
) -> None:
    argv = [command, *vqa_env.data_flags(), "--output_dir", str(tmp_path / "run"), *flags.split()]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_unknown_command_exits_2(capsys) -> None:
    assert run_cli(["fly"]) == 2
    assert "error:" in capsys.readouterr().err


def test_train_help(capsys) -> None:
    assert run_cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--unfreeze_encoder_layers", "--use_text_lora", "--text_lora_r", "--no_cache"):
        assert flag in out


def test_layer_count_is_checked_when_the_model_loads(vqa_env, tmp_path: Path, capsys) -> None:
    argv = ["plan", *vqa_env.data_flags(), "--unfreeze_encoder_layers", "13"]
    assert run_cli(argv) == 2
    assert "out of range: the text encoder has 12 layers" in capsys.readouterr().err


# -- eval and predict -----------------------------------------------------------------------
def test_eval_command(cli_run: Path, capsys) -> None:
    summary = json.loads((cli_run / "summary.json").read_text(encoding="utf-8"))
    assert run_cli(["eval", "--run", str(cli_run)]) == 0
    out = capsys.readouterr().out
    match = re.search(
        r"^test: EM (\d+\.\d+)  F1 (\d+\.\d+)  F1\(set\) \d+\.\d+  \(n=16\)", out, re.M
    )
    assert match
    assert float(match[1]) == pytest.approx(100 * summary["test"]["em"], abs=0.006)
    assert float(match[2]) == pytest.approx(100 * summary["test"]["f1"], abs=0.006)
    scores = json.loads((cli_run / "eval_test.json").read_text(encoding="utf-8"))
    assert scores["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)
    assert run_cli(["eval", "--run", str(cli_run), "--split", "val"]) == 0
    assert "val: EM" in capsys.readouterr().out


def test_eval_of_a_missing_run(tmp_path: Path, capsys) -> None:
    assert run_cli(["eval", "--run", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_predict_command(vqa_env, cli_run: Path, capsys) -> None:
    rows = [
        json.loads(line)
        for line in (cli_run / "predictions_test.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert any(row["prediction"] for row in rows)
    for row in rows[:3]:
        image = vqa_env.data / "images" / f"{row['image']}.png"
        argv = ["predict", "--run", str(cli_run), "--image", str(image)]
        assert run_cli([*argv, "--question", row["question"]]) == 0
        assert capsys.readouterr().out.strip() == row["prediction"]


def test_predict_needs_an_image(cli_run: Path, capsys) -> None:
    assert run_cli(["predict", "--run", str(cli_run), "--question", "có mấy hình"]) == 2
    assert "needs --image" in capsys.readouterr().err


# -- data -----------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED_VIVQA_TRAIN.is_file(), reason="no shared ViVQA data here")
def test_data_stats_on_the_shared_vivqa_train(capsys) -> None:
    records = load_vivqa_csv(SHARED_VIVQA_TRAIN)
    assert run_cli(["data", "stats", str(SHARED_VIVQA_TRAIN)]) == 0
    out = capsys.readouterr().out
    assert f"== {SHARED_VIVQA_TRAIN}" in out
    assert re.search(rf"^records:\s+{len(records)}$", out, re.M)
    per_type = Counter(r.qtype for r in records)
    for qtype, count in per_type.items():
        assert f"{qtype} {count}" in out
    vocabulary = len({normalize(r.answer) for r in records})
    assert re.search(rf"^answer vocabulary:\s+{vocabulary}$", out, re.M)
    assert re.search(rf"^images referenced:\s+{len({r.image for r in records})}$", out, re.M)


def test_data_stats_with_images(vqa_env, capsys) -> None:
    argv = ["data", "stats", str(vqa_env.data / "test.csv")]
    assert run_cli([*argv, "--image_root", str(vqa_env.data / "images")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^images missing:\s+0$", out, re.M)

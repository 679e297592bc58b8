"""The data, backbone and answer-weight commands as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vqadapt.cli import main
from vqadapt.train import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    return caught.value.code


def test_data_synth_then_stats_and_check(tmp_path: Path, capsys) -> None:
    out = tmp_path / "synth"
    argv = ["data", "synth", "--out", str(out), "--n", "60", "--seed", "3", "--extra_test", "30"]
    assert run_cli(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["n"], summary["extra_test"], summary["train"] + summary["test"]) == (60, 30, 90)
    assert (out / "train.csv").is_file() and (out / "test.csv").is_file()
    assert any((out / "images").iterdir())
    capsys.readouterr()
    code = run_cli(["data", "stats", str(out / "train.csv"), "--image_root", str(out / "images")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "colour" in printed and "location" in printed
    code = run_cli(
        [
            "data",
            "check",
            "--train_file",
            str(out / "train.csv"),
            "--image_root",
            str(out / "images"),
        ]
    )
    assert code == 0
    assert "data check OK" in capsys.readouterr().out


def test_data_stats_on_the_real_evjvqa_json(capsys) -> None:
    path = SHARED / "evjvqa" / "evjvqa_public_test-lang-qtype-answer.json"
    assert run_cli(["data", "stats", str(path), "--language", "vi"]) == 0
    assert "1678" in capsys.readouterr().out.replace(",", "")


def test_data_check_exits_1_and_lists_every_problem(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "train.csv"
    bad.write_text(
        ",question,answer,img_id,type\n0,,màu đỏ,1,2\n1,hình gì,hình tròn,2,7\n", encoding="utf-8"
    )
    assert run_cli(["data", "check", "--train_file", str(bad)]) == 1
    printed = capsys.readouterr().out
    assert "row 1" in printed and "'question'" in printed
    assert "row 2" in printed and "'type'" in printed


def test_backbones_tiny_builds_loadable_folders(tmp_path: Path, vqa_env, capsys) -> None:
    out = tmp_path / "tiny"
    argv = ["backbones", "tiny", "--out", str(out), "--text_steps", "2", "--vision_steps", "2"]
    assert run_cli([*argv, "--text_encoder_layers", "4"]) == 0
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(out / "text").config.encoder_layers == 4
    assert AutoModel.from_pretrained(out / "vision").config.model_type == "dinov2"
    record = json.loads((out / "text" / "vqadapt_pretraining.json").read_text(encoding="utf-8"))
    assert record["steps"] == 2 and record["note"] == "training-split text only"
    assert all("test" not in Path(source).name for source in record["text_sources"])


def test_bad_images_are_skipped_and_listed_or_stop_training(vqa_env, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(vqa_env.data, data)
    (data / "images" / "0.png").write_bytes(b"not an image")
    flags = ["--train_file", str(data / "train.csv"), "--test_file", str(data / "test.csv")]
    flags += ["--image_root", str(data / "images"), "--max_train_samples", "32"]
    with pytest.raises(Exception, match=r"0\.png"):
        train(vqa_env.config(tmp_path / "strict", *flags), log=lambda _: None)
    summary = train(
        vqa_env.config(tmp_path / "skip", *flags, "--on_bad_image", "skip"), log=lambda _: None
    )
    skipped = summary["skipped_bad_images"]
    assert skipped["images"] == ["0"]
    assert sum(skipped["questions"].values()) >= 1

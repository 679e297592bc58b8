"""vqadapt export: a self-contained folder that loads alone and reproduces its run."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vqadapt import cli, export
from vqadapt.data.images import ImageIndex
from vqadapt.errors import VQAConfigError
from vqadapt.export import check_export, load_exported
from vqadapt.inference import load_run
from vqadapt.io import read_jsonl


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code or 0


@pytest.fixture(scope="module")
def lora_run(vqa_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 1-epoch run with text and vision LoRA, on copies of the backbones (so that the test
    can take them away too); the learning rate is high enough that the adapters matter."""
    root = tmp_path_factory.mktemp("export")
    vision, text = root / "backbones" / "vision", root / "backbones" / "text"
    shutil.copytree(vqa_env.vision, vision)
    shutil.copytree(vqa_env.text, text)
    run = root / "run"
    flags = ["--vision_model", str(vision), "--text_model", str(text)]
    lora = ["--use_text_lora", "--use_vision_lora", "--lr", "1e-2", "--batch_size", "8"]
    assert run_cli(["train", *vqa_env.argv(run, *flags, *lora)]) == 0
    exports = {}
    for name, extra in (("unmerged", []), ("merged", ["--merge"])):
        exports[name] = root / f"export-{name}"
        assert run_cli(["export", "--run", str(run), "--out", str(exports[name]), *extra]) == 0
    return {"root": root, "run": run, "backbones": root / "backbones", **exports}


@contextmanager
def hidden(*paths: Path):
    """Move folders away (the run, the backbones) and put them back afterwards."""
    moved = [(path, path.with_name(path.name + ".hidden")) for path in paths]
    for path, away in moved:
        path.rename(away)
    try:
        yield
    finally:
        for path, away in moved:
            away.rename(path)


def check_report(folder: Path) -> dict:
    return json.loads((folder / "export_check.json").read_text(encoding="utf-8"))


def plain_state(tower: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A tower's weights without LoRA, under the names a plain HF model uses."""
    return {
        name.replace(".base_layer.", "."): value
        for name, value in tower.state_dict().items()
        if ".lora_" not in name
    }


def test_unmerged_export_holds_base_towers_and_peft_adapters(lora_run) -> None:
    out = lora_run["unmerged"]
    for path in (
        "text/config.json",
        "text/model.safetensors",
        "text/tokenizer.json",
        "vision/config.json",
        "vision/model.safetensors",
        "vision/preprocessor_config.json",
        "projector.safetensors",
        "adapters/text/adapter_config.json",
        "adapters/text/adapter_model.safetensors",
        "adapters/vision/adapter_model.safetensors",
    ):
        assert (out / path).is_file(), path
    assert not any(".lora_" in key for key in load_file(str(out / "text/model.safetensors")))
    settings = json.loads((out / "vqadapt_export.json").read_text(encoding="utf-8"))
    assert settings["family"] == {"text": "mbart", "vision": "dinov2"}
    assert settings["blind"] is False and settings["merged"] is False
    assert settings["adapters"] == ["text", "vision"]
    assert settings["decoding"]["max_answer_tokens"] == 16
    assert settings["source"]["run"] == str(lora_run["run"].resolve())
    assert settings["preprocessing"]["crop"] == 112
    report = check_report(out)
    assert report["status"] == "passed" and report["split"] == "test"
    assert report["questions"] == report["identical_predictions"] == 32
    assert report["inputs_identical"]
    # Same weights, same code: the logits are bit-identical.
    assert report["max_abs_logit_diff"] == 0.0


def test_merged_export_folds_lora_into_plain_towers(lora_run) -> None:
    out = lora_run["merged"]
    assert not (out / "adapters").exists()
    settings = json.loads((out / "vqadapt_export.json").read_text(encoding="utf-8"))
    assert settings["merged"] is True and settings["adapters"] == []
    report = check_report(out)
    assert report["status"] == "passed" and report["identical_predictions"] == 32
    assert 0 < report["max_abs_logit_diff"] <= export.MERGED_TOLERANCE
    # The merge moved the adapted weights (so it matters), and only those.
    # q/k/v of every layer: 12 text-encoder layers, 6 vision layers.
    for tower, projections, layers in (
        ("text", ("q_proj.weight", "k_proj.weight", "v_proj.weight"), 12),
        ("vision", ("query.weight", "key.weight", "value.weight"), 6),
    ):
        merged = load_file(str(out / tower / "model.safetensors"))
        base = load_file(str(lora_run["unmerged"] / tower / "model.safetensors"))
        assert merged.keys() == base.keys()
        changed = {key for key in base if not torch.equal(base[key], merged[key])}
        assert len(changed) == 3 * layers
        assert all(key.endswith(projections) for key in changed)


def test_text_model_round_trips_exactly_with_untied_decoder_embedding(lora_run) -> None:
    from transformers import AutoModelForSeq2SeqLM

    folder = lora_run["unmerged"] / "text"
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["tie_word_embeddings"] is False
    text = AutoModelForSeq2SeqLM.from_pretrained(folder)  # a plain HF load
    trained = plain_state(load_run(lora_run["run"], merge=False).model.text)
    loaded = text.state_dict()
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[key], trained[key]) for key in trained)
    encoder = text.get_encoder().embed_tokens.weight
    decoder = text.get_decoder().embed_tokens.weight
    assert not torch.equal(encoder, decoder)  # the decoder's copy trained, the encoder's did not
    assert torch.equal(text.lm_head.weight, decoder)


def test_peft_loads_the_adapters_on_the_plain_towers(lora_run) -> None:
    """Adapters in peft's own format: PeftModel on the exported base tower, merged by peft,
    gives the towers of the --merge export."""
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    for tower, auto in (("text", AutoModelForSeq2SeqLM), ("vision", AutoModel)):
        base = auto.from_pretrained(lora_run["unmerged"] / tower)
        adapted = PeftModel.from_pretrained(base, lora_run["unmerged"] / "adapters" / tower)
        merged_by_peft = adapted.merge_and_unload().state_dict()
        merged = auto.from_pretrained(lora_run["merged"] / tower).state_dict()
        assert merged.keys() == merged_by_peft.keys()
        assert all(torch.equal(merged[key], merged_by_peft[key]) for key in merged)


@pytest.mark.parametrize("family", ["mbart", "t5"])
def test_save_tower_keeps_untied_embeddings(make_tiny_model, tmp_path: Path, family) -> None:
    """The decoder's own embedding copy (``untie_decoder_embeddings``) survives a plain load."""
    from transformers import AutoModelForSeq2SeqLM

    model = make_tiny_model(family, blind=True)
    with torch.no_grad():
        model.text.get_decoder().embed_tokens.weight.add_(1.0)  # as after training
    export._save_tower(model.text, tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).state_dict()
    expected = model.text.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_export_loads_and_answers_without_run_or_backbones(lora_run, vqa_env) -> None:
    from PIL import Image

    index = ImageIndex(vqa_env.data / "images")
    rows = read_jsonl(lora_run["run"] / "predictions_test.jsonl")[:4]
    with hidden(lora_run["run"], lora_run["backbones"]):
        for name in ("unmerged", "merged"):
            exported = load_exported(lora_run[name])
            assert exported.model.vision is not None and exported.preprocessing is not None
            with pytest.raises(VQAConfigError, match="needs an image"):
                exported.answer(rows[0]["question"])
            for row in rows:
                path = index.resolve_strict(row["image"])
                assert exported.answer(row["question"], path) == row["prediction"]
                with Image.open(path) as image:
                    assert exported.answer(row["question"], image) == row["prediction"]


def test_tampered_weights_fail_the_check(lora_run, tmp_path: Path) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(lora_run["unmerged"], folder)
    projector = folder / "projector.safetensors"
    weights = load_file(str(projector))
    weights["fc2.bias"] = weights["fc2.bias"] + 1e-2
    save_file(weights, str(projector))
    report = check_export(folder, lora_run["run"])
    assert report["status"] == "failed"
    assert report["max_abs_logit_diff"] > export.UNMERGED_TOLERANCE
    assert any("logit difference" in problem for problem in report["problems"])
    projector.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match=r"(?i)header|safetensor"):
        load_exported(folder)


def test_a_failed_check_exits_non_zero_and_writes_nothing(
    lora_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    original = export.write_export

    def write_then_tamper(model, run, folder, **kwargs):
        """Favour one token in the exported decoder's output bias: other answers."""
        settings = original(model, run, folder, **kwargs)
        path = folder / "text" / "model.safetensors"
        weights = load_file(str(path))
        token = run.tokenizer("tám", add_special_tokens=False)["input_ids"][0]
        weights["final_logits_bias"][0, token] += 100.0
        save_file(weights, str(path), metadata={"format": "pt"})
        return settings

    monkeypatch.setattr(export, "write_export", write_then_tamper)
    out = tmp_path / "export"
    assert run_cli(["export", "--run", str(lora_run["run"]), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "export check failed: largest logit difference" in captured.err
    assert "32 of 32 predictions differ. Nothing was written to" in captured.err
    report = json.loads(captured.out)
    assert report["status"] == "failed" and report["identical_predictions"] == 0
    assert len(report["differences"]) == 5
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder


def test_export_refuses_to_overwrite(lora_run, capsys) -> None:
    run, out = str(lora_run["run"]), str(lora_run["unmerged"])
    assert run_cli(["export", "--run", run, "--out", out]) == 2
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
    assert run_cli(["export", "--run", run, "--out", run, "--overwrite"]) == 2
    assert "would replace the run directory" in capsys.readouterr().err
    assert run_cli(["export", "--run", run, "--out", out, "--overwrite"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == check_report(lora_run["unmerged"])
    assert printed["status"] == "passed"
    leftovers = [p.name for p in lora_run["root"].iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_blind_export_with_answers_constrained_to_training_ones(vqa_env, tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "export"
    assert run_cli(["train", *vqa_env.argv(run, "--blind", "--constrain_to_train_answers")]) == 0
    assert run_cli(["export", "--run", str(run), "--out", str(out)]) == 0
    assert not (out / "vision").exists() and not (out / "projector.safetensors").exists()
    report = check_report(out)
    assert report["constrained_to_train_answers"] and report["identical_predictions"] == 32
    assert report["max_abs_logit_diff"] == 0.0
    assert len(json.loads((out / "answer_trie.json").read_text(encoding="utf-8"))["sequences"]) > 1
    row = read_jsonl(run / "predictions_test.jsonl")[0]
    with hidden(run):
        exported = load_exported(out)
        assert exported.settings["blind"] is True and exported.model.vision is None
        assert exported.answer(row["question"]) == row["prediction"]

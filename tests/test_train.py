"""The training loop end to end on the session's synthetic set and tiny backbones.

Runs are small (64 training questions, 2 epochs of batch 4) with a high learning rate, so that
predictions are not all empty and comparisons between runs mean something.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vqadapt.train as train_module
from vqadapt.build import build_data
from vqadapt.config import RunConfig
from vqadapt.data.pipeline import load_splits
from vqadapt.errors import VQAConfigError
from vqadapt.evaluate import answer_counts
from vqadapt.inference import load_run
from vqadapt.losses import token_losses, weighted_loss
from vqadapt.text import normalize
from vqadapt.train import evaluate_split, train

TRAIN = ["--epochs", "2", "--batch_size", "4", "--lr", "1e-2"]
SMALL = ["--max_train_samples", "16", "--max_eval_samples", "8", "--batch_size", "8"]
METRIC_KEYS = {
    "epoch",
    "train_loss",
    "train_loss_std",
    "val_loss",
    "val_em",
    "val_f1",
    "val_f1_set",
    "lr",
    "grad_norm",
    "grad_norm_max",
    "grad_norm_layers",
    "skipped_steps",
    "train_seconds",
    "peak_gpu_memory_mib",
    "peak_rss_mib",
    "seconds",
    "samples_per_s",
    "step_losses",
}
LAYER_KEYS = [f"text_encoder.{i}" for i in range(12)]


@dataclass
class Run:
    out: Path
    config: RunConfig
    result: dict
    model: torch.nn.Module
    before: dict[str, torch.Tensor]
    logs: list[str] = field(default_factory=list)

    def metrics(self) -> list[dict]:
        return read_jsonl(self.out / "metrics.jsonl")

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text(encoding="utf-8"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_training(env, out: Path, *extra: str, stop_after_epoch: int | None = None) -> Run:
    """Train, keeping hold of the model the loop trains and of its weights before training."""
    captured: dict = {}
    real_build_model = train_module.build_model

    def build_and_capture(config, backbones, device="cpu"):
        built = real_build_model(config, backbones, device)
        captured["model"] = built[0]
        captured["before"] = {n: p.detach().clone() for n, p in built[0].named_parameters()}
        return built

    config = env.config(out, *extra)
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "build_model", build_and_capture)
        result = train(config, log=logs.append, stop_after_epoch=stop_after_epoch)
    return Run(out, config, result, captured.get("model"), captured.get("before"), logs)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def baseline_run(vqa_env, runs_dir: Path) -> Run:
    return run_training(vqa_env, runs_dir / "baseline", *TRAIN)


@pytest.fixture(scope="module")
def lora_run(vqa_env, runs_dir: Path) -> Run:
    return run_training(vqa_env, runs_dir / "text_lora", *TRAIN, "--use_text_lora")


@pytest.fixture(scope="module")
def unfreeze_run(vqa_env, runs_dir: Path) -> Run:
    return run_training(vqa_env, runs_dir / "unfreeze3", "--unfreeze_encoder_layers", "3")


@pytest.fixture(params=["baseline", "text_lora"])
def finished_run(request) -> Run:
    return request.getfixturevalue(
        {"baseline": "baseline_run", "text_lora": "lora_run"}[request.param]
    )


# -- the run directory ----------------------------------------------------------------------
def test_run_directory_is_complete(finished_run: Run) -> None:
    run, out = finished_run, finished_run.out
    for name in (
        "config.yaml",
        "status.json",
        "metrics.jsonl",
        "summary.json",
        "predictions_val.jsonl",
        "predictions_test.jsonl",
        "plan.txt",
        "best/trained.safetensors",
        "last/trained.safetensors",
        "last/training_state.pt",
    ):
        assert (out / name).is_file(), name
    assert not (out / "best" / "training_state.pt").exists()
    has_lora = run.config.adapt.use_text_lora
    assert (out / "best" / "adapters" / "text").is_dir() == has_lora
    assert (out / "last" / "adapters" / "text").is_dir() == has_lora
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written leftovers

    assert RunConfig.load(out / "config.yaml").to_dict() == run.config.to_dict()
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "success" and status["error"] is None and status["finished"]

    rows = run.metrics()
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert set(row["grad_norm"]) == {"vision", "projector", "text_encoder", "text_decoder"}
        assert list(row["grad_norm_layers"]) == LAYER_KEYS
        assert all(math.isfinite(row[key]) for key in ("train_loss", "val_loss", "lr"))
        assert row["grad_norm_max"] >= max(row["grad_norm"].values())
        # every step's loss, in order: the epoch's mean and std are theirs
        batches = math.ceil(run.summary()["data"]["train"] / run.config.train.batch_size)
        assert len(row["step_losses"]) == batches
        assert row["train_loss"] == pytest.approx(np.mean(row["step_losses"]), abs=1e-6)
        assert row["train_loss_std"] == pytest.approx(np.std(row["step_losses"]), abs=1e-6)
    assert rows[1]["train_loss"] < rows[0]["train_loss"]  # it learns

    summary = run.summary()
    assert summary == run.result
    assert summary["status"] == "success"
    assert summary["epochs_run"] == 2 and not summary["stopped_early"]
    assert summary["best_val_loss"] == min(row["val_loss"] for row in rows)
    assert rows[summary["best_epoch"] - 1]["val_loss"] == summary["best_val_loss"]
    assert summary["params"]["trainable"] == sum(
        p.numel() for p in run.model.parameters() if p.requires_grad
    )
    assert summary["params"]["coverage"] in (run.out / "plan.txt").read_text(encoding="utf-8")
    n_val, n_test = summary["data"]["val"], summary["data"]["test"]
    assert (n_val, n_test, summary["data"]["train"]) == (32, 32, 64)
    assert len(read_jsonl(out / "predictions_val.jsonl")) == n_val
    test_rows = read_jsonl(out / "predictions_test.jsonl")
    assert len(test_rows) == n_test
    assert summary["test"]["em"] == pytest.approx(sum(r["em"] for r in test_rows) / n_test)

    # checkpoints hold what trained, nothing frozen
    trained = {n for n, p in run.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert set(load_file(str(out / "best" / "trained.safetensors"))) == trained


def test_text_lora_adapters_load_with_peft(vqa_env, lora_run: Run) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    folder = lora_run.out / "best" / "adapters" / "text"
    assert {p.name for p in folder.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert not (lora_run.out / "best" / "adapters" / "vision").exists()
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["r"] == 16 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == str(vqa_env.text)

    base = AutoModelForSeq2SeqLM.from_pretrained(str(vqa_env.text))
    peft_model = PeftModel.from_pretrained(base, str(folder))
    loaded = {
        name.removeprefix("base_model.model."): p
        for name, p in peft_model.named_parameters()
        if "lora_" in name
    }
    trained = {
        name.removeprefix("text."): p
        for name, p in lora_run.model.named_parameters()
        if "lora_" in name
    }
    assert len(loaded) == len(trained) == 12 * 3 * 2
    assert set(loaded) == set(trained)
    for name, value in trained.items():
        assert torch.equal(loaded[name], value.detach()), name
    assert any(v.abs().sum() > 0 for n, v in loaded.items() if "lora_B" in n)  # trained


# -- what trains and what does not --------------------------------------------------------
def test_frozen_parameters_are_bit_identical_after_training(finished_run: Run) -> None:
    frozen = [(n, p) for n, p in finished_run.model.named_parameters() if not p.requires_grad]
    assert len(frozen) > 100
    changed = [n for n, p in frozen if not torch.equal(p, finished_run.before[n])]
    assert changed == []
    moved = [
        n
        for n, p in finished_run.model.named_parameters()
        if p.requires_grad and not torch.equal(p, finished_run.before[n])
    ]
    assert "projector.fc1.weight" in moved
    assert "text.model.decoder.embed_tokens.weight" in moved  # = lm_head


@pytest.mark.parametrize(
    "name",
    ["baseline_run", "lora_run"],
)
def test_encoder_input_embedding_is_unchanged_by_training(request, name: str) -> None:
    run: Run = request.getfixturevalue(name)
    embedding = run.model.text.get_encoder().get_input_embeddings().weight
    before = {n for n, p in run.model.named_parameters() if p is embedding}
    assert len(before) == 1
    assert torch.equal(embedding, run.before[before.pop()])


def test_grad_norm_layers_baseline(baseline_run: Run) -> None:
    for row in baseline_run.metrics():
        assert row["grad_norm_layers"] == dict.fromkeys(LAYER_KEYS, 0.0)
        assert row["grad_norm"]["vision"] == 0.0
        assert row["grad_norm"]["text_encoder"] == 0.0
        assert row["grad_norm"]["projector"] > 0 and row["grad_norm"]["text_decoder"] > 0


def test_grad_norm_layers_unfreeze(unfreeze_run: Run) -> None:
    (row,) = unfreeze_run.metrics()
    layers = row["grad_norm_layers"]
    assert [layers[k] for k in LAYER_KEYS[:9]] == [0.0] * 9
    assert all(layers[k] > 0 for k in LAYER_KEYS[9:])
    assert row["grad_norm"]["text_encoder"] >= max(layers.values())


def test_grad_norm_layers_text_lora(lora_run: Run) -> None:
    for row in lora_run.metrics():
        assert all(row["grad_norm_layers"][k] > 0 for k in LAYER_KEYS)
        assert row["grad_norm"]["vision"] == 0.0


# Golden values: the baseline run on the session's backbones (seeded, pretrained for a fixed
# number of steps: the same in every session). They pin the whole path: tokenizer,
# initialisation, batch order, loss, optimiser and schedule. After an intended change there,
# rerun and update them. The run reads its frozen features from the fp16 cache, and the uncached
# run with the frozen outputs rounded to fp16 gives these bit for bit
# (test_cache.rounded_frozen_outputs). Updated for issue 17 (the benchmark's synthetic set v5 and
# tiny backbones v6: twin colours and the tint kind, so another pretraining text and vocabulary),
# and again when max_train_samples / max_eval_samples came to draw a fixed random sample instead
# of the first questions (other questions).
GOLDEN_BASELINE_LOSSES = [
    (2.467769518494606, 1.7862433195114136),  # epoch 1: train_loss, val_loss
    (1.3568746149539948, 1.4914567470550537),  # epoch 2
]
GOLDEN_BASELINE_PARAMS = {"total": 3_023_872, "vision": 880_640, "projector": 33_536}


def test_golden_baseline_run(baseline_run: Run) -> None:
    rows = baseline_run.metrics()
    losses = [(row["train_loss"], row["val_loss"]) for row in rows]
    assert losses[0] == pytest.approx(GOLDEN_BASELINE_LOSSES[0], rel=1e-4)
    assert losses[1] == pytest.approx(GOLDEN_BASELINE_LOSSES[1], rel=1e-3)
    params = baseline_run.summary()["params"]
    assert {
        "total": params["total"],
        "vision": params["per_tower"]["vision"]["total"],
        "projector": params["per_tower"]["projector"]["total"],
    } == GOLDEN_BASELINE_PARAMS


# -- resume ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_continues_exactly(vqa_env, runs_dir: Path, baseline_run: Run) -> None:
    out = runs_dir / "interrupted"
    first = run_training(vqa_env, out, *TRAIN, stop_after_epoch=1)
    assert first.result == {"interrupted_after": 1}
    assert len(first.metrics()) == 1
    assert not (out / "summary.json").exists()
    assert json.loads((out / "status.json").read_text(encoding="utf-8"))["status"] == "running"

    resumed = run_training(vqa_env, out, *TRAIN, "--resume")
    assert any("resuming" in line and "after epoch 1" in line for line in resumed.logs)
    straight, continued = baseline_run.metrics(), resumed.metrics()
    assert [row["epoch"] for row in continued] == [1, 2]
    for a, b in zip(straight, continued, strict=True):
        for key in ("train_loss", "train_loss_std", "val_loss", "val_em", "val_f1", "lr"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), (a["epoch"], key)
    summary = resumed.summary()
    assert summary["test"]["em"] == baseline_run.summary()["test"]["em"]
    assert summary["test"]["loss"] == pytest.approx(
        baseline_run.summary()["test"]["loss"], abs=1e-6
    )
    assert summary["best_epoch"] == baseline_run.summary()["best_epoch"]
    assert read_jsonl(out / "predictions_test.jsonl") == read_jsonl(
        baseline_run.out / "predictions_test.jsonl"
    )


# -- answer weights -------------------------------------------------------------------------
def test_weighted_loss_by_hand() -> None:
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert weighted_loss(losses, torch.tensor([1.0, 1.0, 2.0])).item() == pytest.approx(9 / 4)
    assert weighted_loss(losses, torch.tensor([0.0, 0.0, 5.0])).item() == pytest.approx(3.0)
    assert weighted_loss(losses, torch.full((3,), 7.0)).item() == pytest.approx(2.0)
    assert weighted_loss(losses, torch.ones(3)).item() == pytest.approx(losses.mean().item())


def test_token_losses_by_hand() -> None:
    """Uniform logits over V tokens: every counted token costs log V; -100 is not counted."""
    logits = torch.zeros(2, 3, 5)
    logits[1, 0, 4] = 100.0  # a confident, correct first token
    labels = torch.tensor([[1, 2, -100], [4, 0, 0]])
    per_sample = token_losses(logits, labels)
    assert per_sample[0].item() == pytest.approx(math.log(5))
    assert per_sample[1].item() == pytest.approx(2 * math.log(5) / 3, abs=1e-5)


def most_common_train_answer(config: RunConfig) -> str:
    splits = load_splits(config.data)
    return answer_counts(splits.train).most_common(1)[0][0]


@pytest.mark.slow
def test_answer_weights_change_the_training_loss(
    vqa_env, runs_dir: Path, baseline_run: Run
) -> None:
    answer = most_common_train_answer(baseline_run.config)
    straight = baseline_run.metrics()[0]

    neutral_file = runs_dir / "neutral_weights.json"
    neutral_file.write_text(json.dumps({answer: 1.0}, ensure_ascii=False), encoding="utf-8")
    neutral = run_training(
        vqa_env,
        runs_dir / "neutral",
        *TRAIN,
        "--answer_weights",
        str(neutral_file),
        stop_after_epoch=1,
    )
    assert neutral.metrics()[0]["train_loss"] == pytest.approx(straight["train_loss"], abs=1e-6)

    heavy_file = runs_dir / "heavy_weights.json"
    heavy_file.write_text(json.dumps({answer: 8.0}, ensure_ascii=False), encoding="utf-8")
    heavy = run_training(
        vqa_env,
        runs_dir / "heavy",
        *TRAIN,
        "--answer_weights",
        str(heavy_file),
        stop_after_epoch=1,
    )
    assert any("answer weights: 1 training answers covered" in line for line in heavy.logs)
    assert abs(heavy.metrics()[0]["train_loss"] - straight["train_loss"]) > 1e-3


def test_answer_weights_reach_the_batches(vqa_env, tmp_path: Path) -> None:
    from vqadapt.build import build_model
    from vqadapt.weights import weight_for

    config = vqa_env.config(tmp_path)
    model, _, tokenizer, preprocessing = build_model(config, vqa_env.backbones())
    answer = most_common_train_answer(config)
    table = {answer: 3.0}
    data = build_data(
        config,
        model,
        tokenizer,
        preprocessing,
        vqa_env.backbones(),
        lambda a: weight_for(table, a),
        log=lambda _: None,
    )
    train_records = data.splits.train
    expected = [3.0 if normalize(r.answer) == answer else 1.0 for r in train_records]
    batch = data.collators["train"](list(range(len(train_records))))
    assert batch["weights"].tolist() == expected
    assert Counter(expected)[3.0] >= 2
    assert data.collators["val"]([0, 1])["weights"].tolist() == [1.0, 1.0]  # train only


# -- reload ---------------------------------------------------------------------------------
def test_reloaded_checkpoint_reproduces_the_test_predictions(finished_run: Run) -> None:
    loaded = load_run(finished_run.out)  # as `vqadapt eval` does (LoRA merged, if any)
    data = build_data(
        loaded.config,
        loaded.model,
        loaded.tokenizer,
        loaded.preprocessing,
        loaded.backbones,
        log=lambda _: None,
    )
    result = evaluate_split(
        loaded.model,
        data,
        "test",
        loaded.tokenizer,
        loaded.config,
        answer_counts(data.splits.train),
        None,
    )
    saved = read_jsonl(finished_run.out / "predictions_test.jsonl")
    assert result["predictions"] == [row["prediction"] for row in saved]
    assert result["loss"] == pytest.approx(finished_run.summary()["test"]["loss"], abs=1e-5)


def test_reloaded_checkpoint_has_the_trained_weights(finished_run: Run) -> None:
    """Bit for bit the model the loop trained (and restored to its best epoch at the end)."""
    loaded = load_run(finished_run.out, merge=False)
    trained = dict(finished_run.model.named_parameters())
    reloaded = dict(loaded.model.named_parameters())
    assert set(reloaded) == set(trained)
    for name, param in reloaded.items():
        assert torch.equal(param, trained[name]), name


# -- run directory protection ---------------------------------------------------------------
def test_existing_run_is_protected(vqa_env, baseline_run: Run) -> None:
    out = baseline_run.out
    stamp = (out / "summary.json").stat().st_mtime_ns
    with pytest.raises(VQAConfigError, match=r"already holds a run.*--resume.*--overwrite"):
        train(vqa_env.config(out, *TRAIN), log=lambda _: None)
    assert json.loads((out / "status.json").read_text(encoding="utf-8"))["status"] == "success"

    logs: list[str] = []
    summary = train(vqa_env.config(out, *TRAIN, "--resume"), log=logs.append)
    assert summary == baseline_run.summary()
    assert any("already finished" in line for line in logs)
    assert (out / "summary.json").stat().st_mtime_ns == stamp
    assert len(baseline_run.metrics()) == 2

    with pytest.raises(VQAConfigError, match=r"other settings; differences: lr: 0\.01 -> 0\.5"):
        train(vqa_env.config(out, *TRAIN, "--lr", "0.5", "--resume"), log=lambda _: None)
    with pytest.raises(VQAConfigError, match="contradict"):
        train(vqa_env.config(out, *TRAIN, "--resume", "--overwrite"), log=lambda _: None)


def test_overwrite_retrains(vqa_env, baseline_run: Run, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(baseline_run.out, out)
    (out / "notes.txt").write_text("not the run's", encoding="utf-8")
    (out / "eval_test.json").write_text("{}", encoding="utf-8")
    run = run_training(vqa_env, out, *SMALL, "--overwrite")
    assert not (out / "eval_test.json").exists()  # the old run's files went with it
    assert (out / "notes.txt").read_text(encoding="utf-8") == "not the run's"  # carried over
    assert [row["epoch"] for row in run.metrics()] == [1]
    assert run.summary()["data"]["train"] == 16
    assert run.summary()["status"] == "success"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_validation_leaves_the_folder_alone(vqa_env, tmp_path: Path) -> None:
    out = tmp_path / "failing"
    with pytest.raises(VQAConfigError, match="out of range"):
        train(vqa_env.config(out, "--unfreeze_encoder_layers", "13"), log=lambda _: None)
    assert not out.exists()  # nothing claimed: the corrected retry needs no --overwrite
    run_training(vqa_env, out, *SMALL)
    assert json.loads((out / "status.json").read_text(encoding="utf-8"))["status"] == "success"


def test_refused_call_leaves_an_interrupted_run_alone(vqa_env, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    run_training(vqa_env, out, *SMALL, "--epochs", "2", stop_after_epoch=1)
    with pytest.raises(VQAConfigError, match="already holds a run"):
        train(vqa_env.config(out, *SMALL, "--epochs", "2"), log=lambda _: None)
    status = json.loads((out / "status.json").read_text(encoding="utf-8"))
    assert status["status"] == "running", status


def test_vision_lora_trains_at_the_learning_rate(vqa_env, tmp_path: Path) -> None:
    """Vision LoRA alone trains at lr (adapters start at zero); anything that trains the vision
    tower's own weights at lr * 0.3 (``train.default_vision_lr``)."""
    from vqadapt.config import parse_run_config
    from vqadapt.train import default_vision_lr

    out = tmp_path / "vision_lora"
    run = run_training(vqa_env, out, *SMALL, "--use_vision_lora", "--lr", "1e-3")
    assert any(p.requires_grad for n, p in run.model.named_parameters() if n.startswith("vision."))
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3] * len(groups))
    for vision, expected in [
        ("lora", 1e-3),
        ("full", 3e-4),
        ("last_n:2", 3e-4),
        ("last_n:2+lora", 3e-4),
        ("frozen", 3e-4),
    ]:
        config = parse_run_config(["--vision_encoder", vision, "--lr", "1e-3"])
        assert default_vision_lr(config) == pytest.approx(expected), vision


def test_explicit_vision_learning_rate(vqa_env, tmp_path: Path) -> None:
    out = tmp_path / "vision_lr"
    run_training(vqa_env, out, *SMALL, "--use_vision_lora", "--lr", "1e-3", "--vision_lr", "2e-4")
    state = torch.load(out / "last" / "training_state.pt", weights_only=True)
    rates = sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]})
    assert rates == pytest.approx([2e-4, 1e-3])


def test_length_grouped_batches_cover_every_question_once_with_less_padding() -> None:
    from vqadapt.train import epoch_batches, length_grouped_batches

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 30, (1000,), generator=generator).tolist()

    def padding(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    grouped = length_grouped_batches(lengths, 16, seed=0, epoch=1)
    assert sorted(i for batch in grouped for i in batch) == list(range(1000))
    assert grouped == length_grouped_batches(lengths, 16, seed=0, epoch=1)  # resumable
    assert grouped != length_grouped_batches(lengths, 16, seed=0, epoch=2)
    assert padding(grouped) < 0.2 * padding(epoch_batches(1000, 16, seed=0, epoch=1))


def test_epoch_repeats_pass_several_times_over_the_questions() -> None:
    """An epoch of ``repeats`` passes: each pass shows every question once, the stream is cut
    into batches as one (so 10 passes over 400 questions make 125 batches of 32, as one pass
    over 4,000 does), it depends on (seed, epoch) only, and one pass is the plain shuffle."""
    from vqadapt.train import epoch_batches, length_grouped_batches

    once = epoch_batches(400, 32, seed=0, epoch=1)
    tenfold = epoch_batches(400, 32, seed=0, epoch=1, repeats=10)
    assert len(once) == 13 and len(tenfold) == 125 == len(epoch_batches(4000, 32, 0, 1))
    order = [i for batch in tenfold for i in batch]
    assert [sorted(order[k * 400 : (k + 1) * 400]) for k in range(10)] == [list(range(400))] * 10
    assert order[:400] == [i for batch in once for i in batch]  # its first pass: the shuffle
    assert order[:400] != order[400:800]  # each pass freshly shuffled
    assert tenfold == epoch_batches(400, 32, seed=0, epoch=1, repeats=10)  # resumable
    lengths = [3 + i % 17 for i in range(100)]
    grouped = length_grouped_batches(lengths, 8, seed=0, epoch=1, repeats=3)
    assert sorted(i for batch in grouped for i in batch) == sorted(list(range(100)) * 3)


def test_epoch_repeats_train_as_many_steps_per_epoch(vqa_env, tmp_path: Path) -> None:
    """``--epoch_repeats 3`` on 16 questions in batches of 8: 6 optimizer steps per epoch, and
    the epoch's throughput counts the 48 questions it saw."""
    out = tmp_path / "repeats"
    run = run_training(vqa_env, out, *SMALL, "--epochs", "2", "--epoch_repeats", "3")
    assert run.result["status"] == "success"
    state = torch.load(out / "last" / "training_state.pt", weights_only=False)
    assert state["loop"]["step"] == 2 * 6 and state["loop"]["epoch"] == 2
    assert state["scheduler"]["last_epoch"] == 12
    seen = [row["samples_per_s"] * row["seconds"] for row in run.metrics()]
    assert seen == pytest.approx([48, 48])


def test_group_by_length_trains(vqa_env, tmp_path) -> None:
    config = vqa_env.config(tmp_path / "run", *SMALL, "--group_by_length")
    summary = train(config, log=lambda _: None)
    assert summary["status"] == "success" and math.isfinite(summary["best_val_loss"])

"""Rebuild a trained model from its run directory: evaluate a split, answer one question."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqadapt.build import Backbones, build_data, build_model
from vqadapt.checkpoint import load_checkpoint
from vqadapt.config import RunConfig
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.evaluate import AnswerTrie, answer_counts, evaluate_split, write_predictions
from vqadapt.io import atomic_write_json
from vqadapt.runtime import Runtime, inference_runtime


@dataclass
class LoadedRun:
    config: RunConfig
    model: Any
    tokenizer: Any
    preprocessing: Any
    backbones: Backbones
    run_dir: Path
    runtime: Runtime


def merge_lora(model) -> int:
    """Fold every LoRA adapter into its base weight (inference only: W += scale * B A)."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and not module.merged:
            module.merge()
            merged += 1
    return merged


def load_run(
    run_dir: str | Path,
    checkpoint: str = "best",
    merge: bool = True,
    device: str = "auto",
    precision: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedRun:
    """Rebuild the model of a run from its config and checkpoint, on ``device`` (the best
    available by default, whatever device trained it).

    A run folder is data, not code: its stored ``trust_remote_code`` is ignored, and a
    backbone that needs code of its own loads only with ``trust_remote_code`` given here (by
    the current command line). With ``merge`` (the default) LoRA adapters are folded into the
    weights: the same outputs (checked by a test) without the extra low-rank matmuls.
    ``precision``: the run's setting by default, resolved for this device (``auto`` is fp32
    on a CPU).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise VQAConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    if not (run_dir / checkpoint / "trained.safetensors").is_file():
        raise VQAConfigError(f"{run_dir} has no complete '{checkpoint}' checkpoint")
    config = RunConfig.load(run_dir / "config.yaml", complete=True)
    config.model.trust_remote_code = trust_remote_code
    bases = run_backbones(run_dir)
    if bases is None:
        from vqadapt.build import resolve_backbones

        backbones = resolve_backbones(config, log=lambda _: None)
    else:
        from vqadapt import embedded

        data = (
            embedded.ensure_synthetic(log=lambda _: None)
            if config.data.train_file is None
            else None
        )
        backbones = Backbones(bases["vision"], bases["text"], data)
    runtime = inference_runtime(device, precision or config.train.mixed_precision)
    model, _, tokenizer, preprocessing = build_model(config, backbones, runtime.device)
    load_checkpoint(model, run_dir / checkpoint)
    if merge:
        merge_lora(model)
    model.eval()
    return LoadedRun(config, model, tokenizer, preprocessing, backbones, run_dir, runtime)


def run_backbones(run_dir: Path) -> dict[str, str | None] | None:
    """The backbones the run trained on, from its summary; None when the summary is missing
    or damaged (the settings then say where they are)."""
    from vqadapt.run_dir import read_json

    if not (run_dir / "summary.json").is_file():
        return None
    try:
        bases = read_json(run_dir / "summary.json").get("backbones")
    except VQADataError:
        return None
    if not isinstance(bases, dict) or not isinstance(bases.get("text"), str):
        return None
    vision = bases.get("vision")
    return {"vision": vision if isinstance(vision, str) else None, "text": bases["text"]}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    num_beams: int | None = None,
    log=print,
    merge: bool = True,
    device: str = "auto",
    precision: str | None = None,
    max_eval_samples: int | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Score the best checkpoint on a split; writes ``eval_<split>.json`` and
    ``eval_<split>_predictions.jsonl`` (never the training's own ``predictions_*.jsonl``),
    holding the run's lock while it writes. ``max_eval_samples``: N questions of the split, the
    fixed sample training uses (default: the run's setting)."""
    from vqadapt.folders import FolderLock

    run_dir = Path(run_dir)
    with FolderLock(run_dir, "run"):
        run = load_run(
            run_dir, merge=merge, device=device, precision=precision,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        config = run.config
        if num_beams is not None:
            config.train.num_beams = num_beams
        if max_eval_samples is not None:
            if split == "train":
                config.data.max_train_samples = max_eval_samples
            else:
                config.data.max_eval_samples = max_eval_samples
        data = build_data(
            config, run.model, run.tokenizer, run.preprocessing, run.backbones, log=log,
            runtime=run.runtime,
        )  # fmt: skip
        if split not in data.collators or not len(data.encoded[split]):
            raise VQAConfigError(f"the run has no {split!r} split")
        trie = None
        if config.train.constrain_to_train_answers:
            trie = AnswerTrie(
                [ids.tolist() for ids in data.encoded["train"].label_ids],
                run.tokenizer.eos_token_id,
            )
        result = evaluate_split(
            run.model, data, split, run.tokenizer, config, answer_counts(data.splits.train), trie,
            run.runtime,
        )  # fmt: skip
        scores_file, predictions_file = eval_files(run_dir, split)
        replaced = scores_file.exists()
        write_predictions(predictions_file, getattr(data.splits, split), result["predictions"])
        scores = {key: value for key, value in result.items() if key != "predictions"}
        atomic_write_json(scores_file, scores)
    log(
        f"wrote {scores_file} and {predictions_file}"
        + (" (replacing the previous evaluation)" if replaced else "")
    )
    return scores


def eval_files(run_dir: Path, split: str) -> tuple[Path, Path]:
    """Where ``vqadapt eval`` writes a split's scores and predictions."""
    return run_dir / f"eval_{split}.json", run_dir / f"eval_{split}_predictions.jsonl"


class OneImage:
    """The image index of a single file: ``vqadapt predict --image`` reads that file and
    nothing else (indexing its folder would scan everything under it, ``/`` included)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            what = "is not a file" if path.exists() else "not found"
            raise VQADataError(f"image {what}", file=path)
        self.path = path

    def resolve_strict(self, ref: str, row: int | None = None) -> Path:
        return self.path


def question_batch(
    run: LoadedRun, question: str, image: str | Path | None
) -> dict[str, torch.Tensor]:
    """One question (and its image file) as a model batch, preprocessed as in training."""
    from vqadapt.data.pipeline import Collator, FeatureSources, ImageStore, encode_split

    record = VQARecord("0", question, ("",), Path(image).name if image else None)
    index = OneImage(image) if image and run.model.vision is not None else None
    if run.model.vision is not None and index is None:
        raise VQAConfigError("this model needs --image")
    images = ImageStore(index, run.preprocessing)
    encoded = encode_split([record], run.tokenizer, run.config.data, images.slot)
    collator = Collator(
        "predict",
        encoded,
        run.tokenizer.pad_token_id,
        run.model.decoder_start_token_id,
        images,
        run.preprocessing,
        FeatureSources(),
        run.model.vision is None,
        run.model.speed_paths.length_multiple,
    )
    return run.runtime.move(collator([0]))


@torch.no_grad()
def answer_question(
    run: LoadedRun, question: str, image: str | Path | None, num_beams: int = 1
) -> str:
    batch = question_batch(run, question, image)
    with run.runtime.autocast():
        generated = run.model.generate(
            batch, max_new_tokens=run.config.data.max_answer_tokens, num_beams=num_beams
        )
    return run.tokenizer.batch_decode(generated, skip_special_tokens=True)[0].strip()

"""The training loop, written out: setup, loop, evaluate, save.

Run directory (``--output_dir``)::

    config.yaml              resolved settings (enough to rebuild the model)
    status.json              running / success / failed
    metrics.jsonl            one line per epoch
    plan.txt                 the coverage table (what trains, per tower and layer)
    summary.json             best epoch, final metrics, parameter counts, wall time, code version
    predictions_val.jsonl    validation predictions of the best checkpoint
    predictions_test.jsonl   test predictions of the best checkpoint
    best/  last/             checkpoints of trained weights only (see checkpoint.py)
    tensorboard/             TensorBoard event files
"""

from __future__ import annotations

import math
import random
import shutil
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vqadapt
from vqadapt.adapt import format_plan, layer_of, parameter_towers
from vqadapt.build import build_data, build_model, resolve_backbones
from vqadapt.checkpoint import (
    load_checkpoint,
    load_training_state,
    recover_checkpoint,
    save_checkpoint,
)
from vqadapt.config import RunConfig
from vqadapt.errors import VQAConfigError, VQATrainingError
from vqadapt.evaluate import (
    AnswerTrie,
    answer_counts,
    mean_loss,
    predict,
    score,
    token_losses,
    weighted_loss,
    write_predictions,
)
from vqadapt.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

NO_DECAY_MARKERS = ("norm", "embed", "modality", "lambda1")  # plus every bias / 1-D tensor


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{vqadapt.__version__}+{sha}" if sha else vqadapt.__version__


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def prepare_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """Create / check the run directory. Returns (path, resuming)."""
    out = Path(config.train.output_dir)
    holds_run = (out / "config.yaml").exists()
    if not holds_run:
        out.mkdir(parents=True, exist_ok=True)
        return out, False
    if config.train.overwrite:
        shutil.rmtree(out)
        out.mkdir(parents=True)
        return out, False
    if not config.train.resume:
        raise VQAConfigError(
            f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it"
        )
    saved = RunConfig.load(out / "config.yaml").to_dict()
    current = config.to_dict()
    ignore = {"resume", "overwrite", "progress", "epochs", "eval_batch_size"}
    diffs = [
        f"{key}: {saved[section].get(key)!r} -> {value!r}"
        for section, values in current.items()
        for key, value in values.items()
        if key not in ignore and saved[section].get(key) != value
    ]
    if diffs:
        raise VQAConfigError(
            f"{out} holds a run with other settings; differences: {'; '.join(diffs)}"
        )
    return out, True


def param_groups(model, lr: float, vision_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms and embeddings; the vision LoRA at its own rate."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or any(marker in name for marker in NO_DECAY_MARKERS)
        groups[(no_decay, name.startswith("vision."))].append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": vision_lr if is_vision else lr,
        }
        for (no_decay, is_vision), params in sorted(groups.items())
    ]


class GradientMeter:
    """L2 norm of the gradients per tower and per text-encoder layer, averaged over an epoch."""

    def __init__(self, model) -> None:
        self.entries = []
        towers = parameter_towers(model)
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            where = layer_of(model, name)
            layer = f"text_encoder.{where[1] - 1}" if where and where[0] == "text_encoder" else None
            self.entries.append((param, towers[name], layer))
        self.layers = [f"text_encoder.{i}" for i in range(model.text_layout.num_layers)]
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.max_total = 0.0

    def measure(self) -> float:
        present = [(tower, layer, p.grad) for p, tower, layer in self.entries if p.grad is not None]
        if not present:
            return 0.0
        # One stacked reduction and a single device sync, not one .item() per tensor.
        norms = torch.stack([grad.detach().float().norm() for _, _, grad in present])
        squares: dict[str, float] = defaultdict(float)
        for (tower, layer, _), value in zip(present, norms.double().pow(2).tolist(), strict=True):
            squares[tower] += value
            if layer:
                squares[layer] += value
        total = math.sqrt(sum(v for k, v in squares.items() if "." not in k))
        for key, value in squares.items():
            self.sums[key] += math.sqrt(value)
        self.steps += 1
        self.max_total = max(self.max_total, total)
        return total

    def epoch_record(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        towers = ("vision", "projector", "text_encoder", "text_decoder")
        return {
            "grad_norm": {tower: self.sums.get(tower, 0.0) / steps for tower in towers},
            "grad_norm_max": self.max_total,
            "grad_norm_layers": {layer: self.sums.get(layer, 0.0) / steps for layer in self.layers},
        }


def rng_state() -> dict[str, Any]:
    """Torch and Python RNG state as tensors and strings (loadable with weights_only=True)."""
    return {"torch": torch.get_rng_state(), "python": repr(random.getstate())}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    import ast

    random.setstate(ast.literal_eval(state["python"]))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled batches of one epoch: a function of (seed, epoch) only, so resume is exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train(config: RunConfig, log=print, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train (or resume) one run and return its summary; a failure is recorded in status.json.

    ``stop_after_epoch`` ends the loop early as an interruption would (for tests).
    """
    owned: list[Path] = []  # holds the run directory once this call has claimed it
    try:
        return _train(config, log, stop_after_epoch, owned)
    except Exception as err:
        if owned:
            status_file = owned[0] / "status.json"
            failed = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "finished": now(),
            }
            atomic_write_json(status_file, {**read_json(status_file), **failed})
        raise


def _train(
    config: RunConfig, log, stop_after_epoch: int | None, owned: list[Path]
) -> dict[str, Any]:
    from accelerate import Accelerator
    from transformers import get_scheduler

    from vqadapt.weights import load_answer_weights, weight_for

    config.validate()
    out, resuming = prepare_run_dir(config)
    if resuming and (out / "summary.json").exists():
        log(f"{out} is already finished: nothing to do (use --overwrite to train again)")
        return read_json(out / "summary.json")
    started = time.perf_counter()
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision)
    main = accelerator.is_main_process
    if main:
        config.save(out / "config.yaml")
        atomic_write_json(
            out / "status.json",
            {"status": "running", "error": None, "started": now(), "finished": None},
        )
        owned.append(out)

    # -- setup ---------------------------------------------------------------------------
    from vqadapt import embedded
    from vqadapt.build import validate_data

    embedded_data = embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
    skip_images = validate_data(config, embedded_data, log)
    backbones = resolve_backbones(config, log)
    model, plan, tokenizer, preprocessing = build_model(config, backbones)
    log(format_plan(plan, per_layer=False))
    if main:
        atomic_write_text(out / "plan.txt", format_plan(plan) + "\n")
    answer_weight, weights_report = None, None
    from vqadapt.data.pipeline import load_splits

    splits = load_splits(config.data, backbones.embedded_data, skip_images)
    if config.train.answer_weights:
        table, weights_report = load_answer_weights(
            config.train.answer_weights, [r.answer for r in splits.train]
        )
        answer_weight = lambda answer: weight_for(table, answer)  # noqa: E731
        log(
            f"answer weights: {weights_report['covered']} training answers covered, "
            f"{weights_report['uncovered_answers']} not covered (weight 1)"
        )
    data = build_data(
        config, model, tokenizer, preprocessing, backbones, answer_weight, log, splits
    )
    train_counts = answer_counts(splits.train)
    trie = None
    if config.train.constrain_to_train_answers:
        trie = AnswerTrie(
            [ids.tolist() for ids in data.encoded["train"].label_ids], tokenizer.eos_token_id
        )

    t = config.train
    vision_lr = t.vision_lr if t.vision_lr is not None else t.lr * 0.3
    optimizer = torch.optim.AdamW(param_groups(model, t.lr, vision_lr, t.weight_decay))
    n_train = len(data.encoded["train"])
    steps_per_epoch = math.ceil(math.ceil(n_train / t.batch_size) / t.gradient_accumulation_steps)
    total_steps = steps_per_epoch * t.epochs
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    loop = {"epoch": 0, "best": None, "best_epoch": 0, "bad_epochs": 0, "step": 0}
    if resuming:
        recover_checkpoint(out / "last")
        recover_checkpoint(out / "best")
    if resuming and (out / "last" / "training_state.pt").exists():
        load_checkpoint(raw_model, out / "last")
        state = load_training_state(out / "last")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        loop = {key: state["loop"][key] for key in loop}
        log(f"resuming {out} after epoch {loop['epoch']}")
    elif resuming:
        log(f"{out} has no complete checkpoint yet: starting from the beginning")
    if main and loop["epoch"] == 0:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if main and resuming:
        kept = [row for row in read_jsonl(out / "metrics.jsonl") if row["epoch"] <= loop["epoch"]]
        atomic_write_text(out / "metrics.jsonl", "".join(json_line(row) for row in kept))

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    meter = GradientMeter(raw_model)
    better = (lambda a, b: a < b) if t.early_stopping_metric == "val_loss" else (lambda a, b: a > b)

    # -- loop ----------------------------------------------------------------------------
    for epoch in range(loop["epoch"] + 1, t.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        meter.reset()
        step_losses: list[float] = []
        skipped_steps, nonfinite = 0, False
        batches = epoch_batches(n_train, t.batch_size, t.seed, epoch)
        progress = _progress(batches, f"epoch {epoch}/{t.epochs}", t.progress and main)
        for micro, indices in enumerate(progress):
            batch = data.collators["train"](indices)
            with accelerator.autocast():
                logits = model(batch)
            loss = weighted_loss(
                token_losses(logits, batch["labels"], t.label_smoothing), batch["weights"]
            )
            accelerator.backward(loss / t.gradient_accumulation_steps)
            loss_value = loss.item()
            nonfinite = nonfinite or not math.isfinite(loss_value)
            if math.isfinite(loss_value):
                step_losses.append(loss_value)
            last_micro = micro == len(batches) - 1
            if (micro + 1) % t.gradient_accumulation_steps and not last_micro:
                continue
            grad_norm = meter.measure()
            if nonfinite or not math.isfinite(grad_norm):
                where = f"epoch {epoch}, step {loop['step'] + 1}"
                if t.on_nonfinite == "stop":
                    raise VQATrainingError(
                        f"non-finite loss or gradients at {where}: training stopped. The last "
                        f"good checkpoint is {out / 'last'} (after epoch {loop['epoch']}); lower "
                        "--lr, or pass --on_nonfinite skip to skip such steps"
                    )
                log(f"warning: non-finite loss or gradients at {where}: step skipped")
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                skipped_steps += 1
                nonfinite = False
                continue
            if t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loop["step"] += 1
            if hasattr(progress, "set_postfix"):
                progress.set_postfix(loss=f"{np.mean(step_losses[-20:]):.3f}")
            if writer and loop["step"] % t.log_every == 0:
                writer.add_scalar("train/loss", loss.item(), loop["step"])
                writer.add_scalar("train/grad_norm", grad_norm, loop["step"])
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], loop["step"])

        # -- evaluate --------------------------------------------------------------------
        val = evaluate_split(raw_model, data, "val", tokenizer, config, train_counts, trie)
        record = {
            "epoch": epoch,
            "train_loss": float(np.mean(step_losses)) if step_losses else float("nan"),
            "train_loss_std": float(np.std(step_losses)) if step_losses else float("nan"),
            "val_loss": val["loss"],
            "val_em": val["em"],
            "val_f1": val["f1"],
            "val_f1_set": val["f1_set"],
            "lr": scheduler.get_last_lr()[0],
            **meter.epoch_record(),
            "skipped_steps": skipped_steps,
            "seconds": time.perf_counter() - epoch_start,
            "samples_per_s": n_train / (time.perf_counter() - epoch_start),
        }
        current = val["loss"] if t.early_stopping_metric == "val_loss" else val["em"]
        improved = loop["best"] is None or better(current, loop["best"])
        if improved:
            loop.update(best=current, best_epoch=epoch, bad_epochs=0)
        else:
            loop["bad_epochs"] += 1
        loop["epoch"] = epoch
        log(
            f"epoch {epoch}: train loss {record['train_loss']:.4f}  val loss {val['loss']:.4f}  "
            f"val EM {100 * val['em']:.1f}  F1 {100 * val['f1']:.1f}"
            + ("  (best)" if improved else "")
        )
        if main:
            if improved:
                save_checkpoint(raw_model, out / "best", base_models=_bases(backbones))
                write_predictions(
                    out / "predictions_val.jsonl", data.splits.val, val["predictions"]
                )
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "loop": dict(loop),
            }
            # The metrics line goes first: a kill between the two leaves a line that resume
            # drops (it trims metrics.jsonl to the checkpoint's epoch) and recomputes.
            append_jsonl(out / "metrics.jsonl", record)
            save_checkpoint(
                raw_model, out / "last", training_state=state, base_models=_bases(backbones)
            )
            for key in ("val_loss", "val_em", "val_f1"):
                writer.add_scalar(f"val/{key[4:]}", record[key], epoch)
            writer.add_scalar("train/epoch_loss", record["train_loss"], epoch)
        if t.early_stopping_patience and loop["bad_epochs"] >= t.early_stopping_patience:
            log(
                f"early stopping: no improvement of {t.early_stopping_metric} for {loop['bad_epochs']} epochs"
            )
            break
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            log(f"stopping after epoch {epoch} (interruption requested)")
            return {"interrupted_after": epoch}

    # -- final: best checkpoint on test ----------------------------------------------------
    if writer:
        writer.close()
    load_checkpoint(raw_model, out / "best")
    test = (
        evaluate_split(raw_model, data, "test", tokenizer, config, train_counts, trie)
        if len(data.splits.test)
        else None
    )
    history = read_jsonl(out / "metrics.jsonl")
    summary = {
        "status": "success",
        "strategy": plan.strategy,
        "best_epoch": loop["best_epoch"],
        "best_val_loss": min((row["val_loss"] for row in history), default=None),
        "best_metric": {t.early_stopping_metric: loop["best"]},
        "epochs_run": loop["epoch"],
        "stopped_early": loop["epoch"] < t.epochs,
        "wall_time_s": time.perf_counter() - started,
        "params": {
            "trainable": plan.trainable,
            "total": plan.total,
            "per_tower": plan.per_tower,
            "coverage": plan.coverage,
            "text_encoder_layers_adapted": plan.text_encoder_layers_adapted,
            "text_encoder_layers_total": plan.text_encoder_layers_total,
        },
        "plan": plan.to_dict(),
        "val": _without_predictions(
            evaluate_split(raw_model, data, "val", tokenizer, config, train_counts, trie)
        ),
        "test": _without_predictions(test) if test else None,
        "data": {name: len(getattr(data.splits, name)) for name in ("train", "val", "test")}
        | {"sources": data.splits.sources},
        "answer_weights": weights_report,
        "skipped_bad_images": {"images": skip_images, "questions": data.splits.skipped},
        "backbones": _bases(backbones),
        "code_version": code_version(),
        "finished": now(),
    }
    if main:
        if test:
            write_predictions(out / "predictions_test.jsonl", data.splits.test, test["predictions"])
        atomic_write_json(out / "summary.json", summary)
        status = read_json(out / "status.json")
        atomic_write_json(out / "status.json", {**status, "status": "success", "finished": now()})
    if test:
        log(f"test: EM {100 * test['em']:.1f}  F1 {100 * test['f1']:.1f}  (n={test['n']})")
    return summary


def evaluate_split(model, data, split, tokenizer, config, train_counts, trie) -> dict[str, Any]:
    collator = data.collators[split]
    n = len(data.encoded[split])
    t = config.train
    loss = mean_loss(model, collator, n, t.eval_batch_size)
    predictions = predict(
        model,
        collator,
        n,
        tokenizer,
        t.eval_batch_size,
        config.data.max_answer_tokens,
        t.num_beams,
        trie,
    )
    result = score(getattr(data.splits, split), predictions, train_counts)
    return {"loss": loss, **result, "predictions": predictions}


def _without_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "predictions"}


def _bases(backbones) -> dict[str, str | None]:
    return {"vision": backbones.vision, "text": backbones.text}


def _progress(items, description: str, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, dynamic_ncols=True)


def read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, ensure_ascii=False) + "\n"

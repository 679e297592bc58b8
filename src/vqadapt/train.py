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

import contextlib
import math
import random
import shutil
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass
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
    predict,
    score,
    summed_loss,
    write_predictions,
)
from vqadapt.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

NO_DECAY_MARKERS = ("norm", "embed", "modality", "lambda1")  # plus every bias / 1-D tensor
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --mixed_precision -> autocast


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


def make_optimizer(model, lr: float, vision_lr: float, weight_decay: float):
    """AdamW over the trainable parameters only (frozen ones get no state), fused: one kernel
    over all tensors instead of a few per tensor (same update, the step costs less)."""
    return torch.optim.AdamW(param_groups(model, lr, vision_lr, weight_decay), fused=True)


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
        # One fused reduction over all tensors and a single device sync, not one per tensor.
        norms = torch.stack(torch._foreach_norm([grad.detach() for _, _, grad in present]))
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


def make_accelerator(mixed_precision: str):
    """The Accelerator; several launched processes on a machine without GPUs train on CPU.

    ``accelerate launch --multi_gpu`` on a machine with no accelerator would otherwise give
    processes that each train alone (accelerate falls back to no distribution), duplicating
    the work and racing on the run directory.
    """
    import os

    from accelerate import Accelerator

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    cpu_only = launched > 1 and not torch.accelerator.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu_only)
    if accelerator.num_processes != launched:
        raise VQAConfigError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
            "check the accelerate config (distributed_type, num_processes)"
        )
    return accelerator


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 50
) -> list[list[int]]:
    """Batches of similar lengths (``--group_by_length``), a function of (seed, epoch) only:
    the epoch's shuffled order is cut into windows of ``window`` batches, each window sorted by
    length (longest first) and cut into batches, and the batches are shuffled."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def process_share(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous share of ``indices`` (the shares of all ranks, in rank
    order, are ``indices`` again: nothing dropped, nothing duplicated)."""
    start = len(indices) * rank // world
    return indices[start : len(indices) * (rank + 1) // world]


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
    from transformers import get_scheduler

    config.validate()
    started = time.perf_counter()
    # Under `accelerate launch` every process runs this function. The global batch is
    # --batch_size, split between the processes; only the main process writes files.
    accelerator = make_accelerator(config.train.mixed_precision)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if not main:
        log = lambda _: None  # noqa: E731  (one process speaks)
    out, resuming = Path(config.train.output_dir), False
    if main:  # only the main process may create or clear the run directory
        out, resuming = prepare_run_dir(config)
    if world > 1:
        from accelerate.utils import broadcast_object_list

        resuming = broadcast_object_list([resuming])[0]
    if resuming and (out / "summary.json").exists():
        log(f"{out} is already finished: nothing to do (use --overwrite to train again)")
        accelerator.end_training()
        return read_json(out / "summary.json")
    if main:
        config.save(out / "config.yaml")
        atomic_write_json(
            out / "status.json",
            {"status": "running", "error": None, "started": now(), "finished": None},
        )
        owned.append(out)
    accelerator.wait_for_everyone()

    # -- setup ---------------------------------------------------------------------------
    # The main process builds what is shared on disk (embedded data and backbones, the data
    # check's memo, feature caches) first; the others then find it ready.
    with accelerator.main_process_first():
        setup = _assemble(config, out, main, log)
    backbones, model, plan, tokenizer = setup.backbones, setup.model, setup.plan, setup.tokenizer
    # Every process builds its share of the feature-cache shards on its device, then reads
    # them all (not under main_process_first: the processes build in parallel).
    model.to(accelerator.device)
    setup.data = build_data(
        config,
        model,
        tokenizer,
        setup.preprocessing,
        backbones,
        setup.answer_weight,
        log,
        setup.splits,
        device=accelerator.device,
        compute_dtype=COMPUTE_DTYPES.get(config.train.mixed_precision),
        rank=rank,
        world=world,
        barrier=accelerator.wait_for_everyone,
    )
    splits, data, skip_images = setup.splits, setup.data, setup.skip_images
    weights_report = setup.weights_report
    if rank:  # different dropout masks per process (rank 0 keeps the single-process stream)
        torch.manual_seed(config.train.seed + 1_000_003 * rank)
    train_counts = answer_counts(splits.train)
    trie = None
    if config.train.constrain_to_train_answers:
        trie = AnswerTrie(
            [ids.tolist() for ids in data.encoded["train"].label_ids], tokenizer.eos_token_id
        )

    t = config.train
    vision_lr = t.vision_lr if t.vision_lr is not None else t.lr * 0.3
    optimizer = make_optimizer(model, t.lr, vision_lr, t.weight_decay)
    n_train = len(data.encoded["train"])
    if t.group_by_length:
        encoded = data.encoded["train"]
        pairs = zip(encoded.input_ids, encoded.label_ids, strict=True)
        lengths = [len(question) + len(answer) for question, answer in pairs]
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
    if resuming and main:
        recover_checkpoint(out / "last")
        recover_checkpoint(out / "best")
    accelerator.wait_for_everyone()
    if resuming and (out / "last" / "training_state.pt").exists():
        load_checkpoint(raw_model, out / "last")
        state = load_training_state(out / "last")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state.get("rng_per_rank", [state["rng"]] * world)[rank])
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
        if t.group_by_length:
            batches = length_grouped_batches(lengths, t.batch_size, t.seed, epoch)
        else:
            batches = epoch_batches(n_train, t.batch_size, t.seed, epoch)
        shares = [process_share(indices, rank, world) for indices in batches]
        # A process whose share is empty (a last batch smaller than the number of
        # processes) still runs a step, on weight 0, so that the gradient all-reduce meets.
        stream = data.loader(
            "train",
            [share or indices[:1] for share, indices in zip(shares, batches, strict=True)],
            device=accelerator.device,
        )
        progress = _progress(
            zip(shares, stream, strict=True),
            f"epoch {epoch}/{t.epochs}",
            t.progress and main,
            total=len(batches),
        )
        for micro, (share, batch) in enumerate(progress):
            last_micro = micro == len(batches) - 1
            sync_step = (micro + 1) % t.gradient_accumulation_steps == 0 or last_micro
            if not share:
                batch["weights"] = torch.zeros_like(batch["weights"])
            # Gradients are all-reduced only on the micro-batch that ends an accumulation.
            with contextlib.nullcontext() if sync_step else accelerator.no_sync(model):
                with accelerator.autocast():
                    per_sample = model(batch, return_losses=True, label_smoothing=t.label_smoothing)
                loss, loss_value = global_weighted_loss(per_sample, batch["weights"], accelerator)
                accelerator.backward(loss / t.gradient_accumulation_steps)
            nonfinite = nonfinite or not math.isfinite(loss_value)
            if math.isfinite(loss_value):
                step_losses.append(loss_value)
            if not sync_step:
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
                writer.add_scalar("train/loss", loss_value, loop["step"])
                writer.add_scalar("train/grad_norm", grad_norm, loop["step"])
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], loop["step"])

        # -- evaluate --------------------------------------------------------------------
        val = evaluate_split(
            raw_model, data, "val", tokenizer, config, train_counts, trie, accelerator
        )
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
        rng_per_rank = gather_objects([rng_state()], accelerator)
        # Under several processes the weights to save are gathered by accelerate (whole
        # parameters even where FSDP / ZeRO shard them); a collective: every process calls it.
        full_state = accelerator.get_state_dict(model) if world > 1 else None
        if main:
            if improved:
                save_checkpoint(
                    raw_model, out / "best", base_models=_bases(backbones), full_state=full_state
                )
                write_predictions(
                    out / "predictions_val.jsonl", data.splits.val, val["predictions"]
                )
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "rng_per_rank": rng_per_rank,
                "loop": dict(loop),
            }
            # The metrics line goes first: a kill between the two leaves a line that resume
            # drops (it trims metrics.jsonl to the checkpoint's epoch) and recomputes.
            append_jsonl(out / "metrics.jsonl", record)
            save_checkpoint(
                raw_model,
                out / "last",
                training_state=state,
                base_models=_bases(backbones),
                full_state=full_state,
            )
            for key in ("val_loss", "val_em", "val_f1"):
                writer.add_scalar(f"val/{key[4:]}", record[key], epoch)
            writer.add_scalar("train/epoch_loss", record["train_loss"], epoch)
        accelerator.wait_for_everyone()  # checkpoints are on disk before any process reads them
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
        evaluate_split(raw_model, data, "test", tokenizer, config, train_counts, trie, accelerator)
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
            evaluate_split(
                raw_model, data, "val", tokenizer, config, train_counts, trie, accelerator
            )
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
    accelerator.wait_for_everyone()
    accelerator.end_training()  # ends the process group, if any (a clean exit for gloo / NCCL)
    return summary


@dataclass
class _Setup:
    backbones: Any
    model: Any
    plan: Any
    tokenizer: Any
    splits: Any
    data: Any
    skip_images: list[str]
    weights_report: dict[str, Any] | None
    preprocessing: Any = None
    answer_weight: Any = None


def _assemble(config: RunConfig, out: Path, main: bool, log) -> _Setup:
    """Data check, backbones, model (adapted) and splits (the batches and caches come after,
    built by every process: ``build_data``)."""
    from vqadapt import embedded
    from vqadapt.build import validate_data
    from vqadapt.data.pipeline import load_splits
    from vqadapt.weights import load_answer_weights, weight_for

    embedded_data = embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
    skip_images = validate_data(config, embedded_data, log)
    backbones = resolve_backbones(config, log)
    model, plan, tokenizer, preprocessing = build_model(config, backbones)
    log(format_plan(plan, per_layer=False))
    if main:
        atomic_write_text(out / "plan.txt", format_plan(plan) + "\n")
    answer_weight, weights_report = None, None
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
    return _Setup(
        backbones,
        model,
        plan,
        tokenizer,
        splits,
        None,
        skip_images,
        weights_report,
        preprocessing,
        answer_weight,
    )


def evaluate_split(
    model, data, split, tokenizer, config, train_counts, trie, accelerator=None
) -> dict[str, Any]:
    """Loss, predictions and scores of a split. With several processes each one evaluates
    its contiguous share and the shares are gathered in rank order (every sample once)."""
    collator = data.collators[split]
    n = len(data.encoded[split])
    t = config.train
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    share = process_share(list(range(n)), rank, world)
    loss_sum = summed_loss(model, collator, share, t.eval_batch_size)
    predictions = predict(
        model,
        collator,
        n,
        tokenizer,
        t.eval_batch_size,
        config.data.max_answer_tokens,
        t.num_beams,
        trie,
        indices=share,
    )
    if world > 1:
        loss_sum = sum(gather_objects([loss_sum], accelerator))
        predictions = gather_objects(predictions, accelerator)
    if len(predictions) != n:
        raise VQATrainingError(f"{split}: gathered {len(predictions)} predictions for {n} samples")
    loss = loss_sum / max(n, 1)
    result = score(getattr(data.splits, split), predictions, train_counts)
    return {"loss": loss, **result, "predictions": predictions}


def global_weighted_loss(
    per_sample: torch.Tensor, weights: torch.Tensor, accelerator
) -> tuple[torch.Tensor, float]:
    """The global batch's weighted mean loss, computed from this process's share.

    DDP averages gradients over the processes, so this process's loss is its share of the
    numerator over the *global* weight sum, times the number of processes: the gradient is
    then exactly that of ``weighted_loss`` over the whole batch in one process (with one
    process, the reduction is the identity and this is ``weighted_loss``).
    Returns (loss to backpropagate, global loss value for logging)."""
    numerator = (per_sample * weights).sum()
    totals = accelerator.reduce(torch.stack([numerator.detach(), weights.sum()]), "sum")
    denominator = totals[1].clamp(min=1e-12)
    loss = numerator / denominator * accelerator.num_processes
    return loss, (totals[0] / denominator).item()


def gather_objects(items: list[Any], accelerator) -> list[Any]:
    """The lists of all processes, concatenated in rank order (``gather_for_metrics``)."""
    if accelerator.num_processes == 1:
        return list(items)
    return list(accelerator.gather_for_metrics(items, use_gather_object=True))


def _without_predictions(result: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in result.items() if key != "predictions"}


def _bases(backbones) -> dict[str, str | None]:
    return {"vision": backbones.vision, "text": backbones.text}


def _progress(items, description: str, enabled: bool, total: int | None = None):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, leave=False, dynamic_ncols=True, total=total)


def read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text(encoding="utf-8"))


def json_line(row: dict[str, Any]) -> str:
    import json

    return json.dumps(row, ensure_ascii=False) + "\n"

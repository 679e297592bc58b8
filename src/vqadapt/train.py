"""The training loop, written out: claim the run directory, assemble, fit, evaluate, save.

``train`` reads top to bottom as the sequence of named steps below; the run directory and its
files are ``run_dir.py``'s, the optimizer step, loop state and early stopping ``loop.py``'s,
devices and precision ``runtime.py``'s. Under ``accelerate launch`` every process runs this
function: the global batch is ``--batch_size``, split between the processes, and only the main
process writes files.
"""

from __future__ import annotations

import contextlib
import math
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from transformers import get_scheduler

import vqadapt
from vqadapt import embedded
from vqadapt.adapt import AdaptationPlan, format_plan
from vqadapt.build import (
    Backbones,
    DataBundle,
    build_data,
    build_model,
    resolve_backbones,
    validate_data,
)
from vqadapt.checkpoint import (
    STATE_FILE,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
)
from vqadapt.config import RunConfig
from vqadapt.data.pipeline import load_splits
from vqadapt.errors import VQADataError, VQATrainingError
from vqadapt.evaluate import (
    AnswerTrie,
    answer_counts,
    evaluate_split,
    gather_objects,
    process_share,
    without_predictions,
    write_predictions,
)
from vqadapt.loop import (
    EarlyStopping,
    GradientMeter,
    LoopState,
    LossLog,
    OptimizerStep,
    epoch_batches,
    explain_failure,
    global_weighted_loss,
    length_grouped_batches,
    make_optimizer,
    rng_state,
    set_rng_state,
)
from vqadapt.menu import resolve
from vqadapt.progress import finish_trackers, library_progress_bars, progress, start_trackers
from vqadapt.run_dir import RunDirectory, now
from vqadapt.runtime import Runtime, trackers, training_runtime
from vqadapt.weights import load_answer_weights, weight_for

__all__ = ["epoch_batches", "evaluate_split", "make_optimizer", "process_share", "train"]


def train(config: RunConfig, log=print, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Train (or resume) one run and return its summary; a failure is recorded in status.json.

    The run directory is locked for the whole call and made the run's only once the settings,
    data and backbones passed their checks (``RunDirectory.begin``): a run that fails them
    leaves the folder as it was. ``stop_after_epoch`` ends the loop early as an interruption
    would (for tests).
    """
    config.validate()
    started = time.perf_counter()
    t = config.train
    runtime = training_runtime(
        t.device, t.mixed_precision, t.compile, t.ddp_timeout, trackers(t.report_to, t.output_dir)
    )
    log = log if runtime.is_main else _silent  # one process speaks
    run = RunDirectory(t.output_dir, writer=runtime.is_main)
    try:
        resuming = claim(run, config, runtime)
        if resuming and run.finished:
            log(f"{run.path} is already finished: nothing to do (use --overwrite to train again)")
            runtime.accelerator.end_training()
            return run.summary()
        with library_progress_bars(t.progress and runtime.is_main):
            setup = assemble(config, runtime, log)
        run.begin(config, format_plan(setup.plan) + "\n")
        runtime.wait()
        summary = fit_and_finish(config, run, setup, runtime, resuming, started, log,
                                 stop_after_epoch)  # fmt: skip
    finally:
        run.release()
    runtime.accelerator.end_training()  # ends the process group, if any (clean gloo / NCCL exit)
    return summary


def fit_and_finish(
    config: RunConfig,
    run: RunDirectory,
    setup: Setup,
    runtime: Runtime,
    resuming: bool,
    started: float,
    log,
    stop_after_epoch: int | None,
) -> dict[str, Any]:
    """The epochs, then the test split and the summary; a failure is recorded in status.json
    with what was kept (out of memory and a full disk get their own advice)."""
    t = config.train
    where = {"phase": "setting up training", "checkpoint_epoch": 0}
    try:
        fit = prepare_fit(config, setup, runtime)
        state = restore(run, fit, runtime, resuming, log)
        where["checkpoint_epoch"] = state.epoch
        stopper = EarlyStopping(t.early_stopping_metric, t.early_stopping_patience, state)
        start_trackers(runtime, config, run, setup.plan)
        for epoch in range(state.epoch + 1, t.epochs + 1):
            where["phase"] = f"training epoch {epoch}"
            record = train_epoch(fit, setup, state, epoch, config, runtime, run, log)
            where["phase"] = f"validating epoch {epoch}"
            val = evaluate_split(
                fit.raw_model, setup.data, "val", setup.tokenizer, config,
                setup.train_counts, setup.trie, runtime,
            )  # fmt: skip
            improved = stopper.update(epoch, val)
            record = epoch_record(epoch, record, val, fit)
            log(_epoch_line(record, improved))
            where["phase"] = f"saving epoch {epoch}"
            save_epoch(run, fit, setup, state, record, val, improved, runtime)
            where["checkpoint_epoch"] = epoch
            if stopper.should_stop:
                log(
                    f"early stopping: no improvement of {t.early_stopping_metric} for "
                    f"{state.bad_epochs} epochs"
                )
                break
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                log(f"stopping after epoch {epoch} (interruption requested)")
                finish_trackers(runtime)
                return {"interrupted_after": epoch}
        where["phase"] = "evaluating the best checkpoint"
        return finish(run, fit, setup, state, config, runtime, started, log)
    except Exception as err:
        finish_trackers(runtime)
        kept = run.kept(where["checkpoint_epoch"])
        explained = explain_failure(err, config, runtime, where["phase"], kept)
        recorded = run.failed(explained, kept)
        if explained is err:
            raise
        if run.writer and not recorded:
            explained = VQATrainingError(
                f"{explained} ({run.file('status.json')} could not be updated either)"
            )
        raise explained from err


# -- claim ----------------------------------------------------------------------------------
def claim(run: RunDirectory, config: RunConfig, runtime: Runtime) -> bool:
    """The main process locks and claims the directory (nothing is written yet); every
    process learns whether it resumes."""
    resuming = run.claim(config) if runtime.is_main else False
    if runtime.world > 1:
        resuming = broadcast_object_list([resuming])[0]
    return resuming


# -- assemble -------------------------------------------------------------------------------
@dataclass
class Setup:
    """What a run is made of: towers, the adapted model (on its device), data and caches."""

    backbones: Backbones
    model: Any
    plan: AdaptationPlan
    tokenizer: Any
    data: DataBundle
    skip_images: list[str]
    weights_report: dict[str, Any] | None
    train_counts: Any
    trie: AnswerTrie | None


def assemble(config: RunConfig, runtime: Runtime, log) -> Setup:
    """Data check, backbones, the adapted model moved to its device, then data and caches
    built on that device: everything that can refuse the run, before its folder is touched.
    The main process goes first: it builds what is shared on disk (embedded data and
    backbones, the data check's memo) and the others then find it ready; the feature caches
    are built by all of them together, each its share of the shards."""
    with runtime.main_first():
        embedded_data = (
            embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
        )
        skip_images = validate_data(config, embedded_data, log)
        backbones = resolve_backbones(config, log)
        model, plan, tokenizer, preprocessing = build_model(config, backbones, runtime.device)
        log(format_plan(plan, per_layer=False))
        log(f"device {runtime.device}, precision {runtime.precision}, speed paths: "
            f"{model.speed_paths.describe()}")  # fmt: skip
        splits = load_splits(config.data, backbones.embedded_data, skip_images)
        check_splits(splits, config)
        answer_weight, weights_report = None, None
        if config.train.answer_weights:
            table, weights_report = load_answer_weights(
                config.train.answer_weights, [r.answer for r in splits.train]
            )
            answer_weight = lambda answer: weight_for(table, answer)  # noqa: E731
            log(
                f"answer weights: {weights_report['covered']} training answers covered, "
                f"{weights_report['uncovered_answers']} not covered (weight 1)"
            )
    # Every process builds its share of the feature-cache shards on its own device, then
    # reads them all: outside main_first, so that the processes build in parallel.
    data = build_data(
        config, model, tokenizer, preprocessing, backbones, answer_weight, log, splits,
        runtime=runtime,
    )  # fmt: skip
    trie = None
    if config.train.constrain_to_train_answers:
        trie = AnswerTrie(
            [ids.tolist() for ids in data.encoded["train"].label_ids], tokenizer.eos_token_id
        )
    return Setup(
        backbones, model, plan, tokenizer, data, skip_images, weights_report,
        answer_counts(splits.train), trie,
    )  # fmt: skip


def check_splits(splits, config: RunConfig) -> None:
    """A run needs training and validation questions (the test split may be absent): say
    which split is empty and why, instead of failing deep inside tokenisation."""
    d = config.data
    skipped = splits.skipped or {}
    for name in ("train", "val"):
        if getattr(splits, name):
            continue
        source = (d.val_file if name == "val" else None) or d.train_file or "the embedded set"
        why = (
            f"--on_bad_image skip dropped all {skipped[name]} of its questions (their images "
            "are bad)"
            if skipped.get(name)
            else "it holds no questions"
        )
        raise VQADataError(f"the {name} split is empty: {why}", file=source)


# -- fit: optimizer, schedule, accelerate ----------------------------------------------------
@dataclass
class Fit:
    model: Any  # as prepared by accelerate (DDP-wrapped under several processes)
    raw_model: Any
    optimizer: Any
    scheduler: Any
    step: OptimizerStep
    meter: GradientMeter
    steps_per_epoch: int


def default_vision_lr(config: RunConfig) -> float:
    """The vision tower's rate when ``--vision_lr`` is not given: ``lr`` when only LoRA
    adapters train there (they start at zero and leave the tower's weights alone; at lr * 0.3
    vision LoRA did not learn the embedded benchmark's vision shift within the quick study,
    README), else ``lr * 0.3`` (a vision tower whose own weights train at the text rate
    collapses, FINDINGS.md)."""
    choice = resolve(config.adapt)["vision"]
    adapters_only = choice.lora and not (choice.full or choice.last_n)
    return config.train.lr if adapters_only else config.train.lr * 0.3


def prepare_fit(config: RunConfig, setup: Setup, runtime: Runtime) -> Fit:
    """AdamW (vision LoRA at its own rate), the schedule, and accelerate's wrapping."""
    t = config.train
    accelerator = runtime.accelerator
    if runtime.rank:  # different dropout masks per process (rank 0 keeps the one-process stream)
        torch.manual_seed(t.seed + 1_000_003 * runtime.rank)
    vision_lr = t.vision_lr if t.vision_lr is not None else default_vision_lr(config)
    optimizer = make_optimizer(setup.model, t.lr, vision_lr, t.weight_decay)
    samples_per_epoch = len(setup.data.encoded["train"]) * t.epoch_repeats
    steps_per_epoch = math.ceil(
        math.ceil(samples_per_epoch / t.batch_size) / t.gradient_accumulation_steps
    )
    total_steps = steps_per_epoch * t.epochs
    scheduler = get_scheduler(
        "constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        optimizer,
        num_warmup_steps=int(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer = accelerator.prepare(setup.model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    meter = GradientMeter(raw_model)
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    step = OptimizerStep(
        model, optimizer, scheduler, meter, t.max_grad_norm, t.on_nonfinite,
        scaler=accelerator.scaler, accelerator=accelerator, fallback=sharded,
    )  # fmt: skip
    return Fit(model, raw_model, optimizer, scheduler, step, meter, steps_per_epoch)


# -- restore --------------------------------------------------------------------------------
def restore(run: RunDirectory, fit: Fit, runtime: Runtime, resuming: bool, log) -> LoopState:
    """The loop state to start from: fresh, or the last complete checkpoint's (weights,
    optimizer, schedule, every process's RNG); metrics of later epochs are dropped."""
    state = LoopState()
    if resuming:
        run.recover_checkpoints()
    runtime.wait()
    if resuming and run.last.exists() and not (run.last / STATE_FILE).exists():
        raise VQADataError(
            f"{run.last} holds no {STATE_FILE}: the run cannot resume from it. best/ holds the "
            "best weights so far (vqadapt eval evaluates them); --overwrite starts again"
        )
    if resuming and (run.last / STATE_FILE).exists():
        load_checkpoint(fit.raw_model, run.last)
        saved = load_training_state(run.last)
        fit.optimizer.load_state_dict(saved["optimizer"])
        fit.scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved.get("rng_per_rank", [saved["rng"]] * runtime.world)[runtime.rank])
        state = LoopState.from_dict(saved["loop"])
        fit.step.steps = state.step
        log(f"resuming {run.path} after epoch {state.epoch}")
    elif resuming:
        log(f"{run.path} has no complete checkpoint yet: starting from the beginning")
    run.trim_metrics(state.epoch)
    return state


# -- one epoch ------------------------------------------------------------------------------
def train_epoch(
    fit: Fit,
    setup: Setup,
    state: LoopState,
    epoch: int,
    config: RunConfig,
    runtime: Runtime,
    run: RunDirectory,
    log,
) -> dict[str, Any]:
    """One pass over the training set; returns the epoch's training statistics.

    Nothing in the loop reads a device value except every ``--log_every`` steps (progress,
    the trackers, the non-finite check) and once at the end."""
    t = config.train
    accelerator = runtime.accelerator
    started = time.perf_counter()
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    fit.model.train()
    fit.meter.reset()
    fit.step.reset_epoch()
    losses = LossLog()
    n_train = len(setup.data.encoded["train"])
    if t.group_by_length:
        encoded = setup.data.encoded["train"]
        pairs = zip(encoded.input_ids, encoded.label_ids, strict=True)
        lengths = [len(question) + len(answer) for question, answer in pairs]
        batches = length_grouped_batches(
            lengths, t.batch_size, t.seed, epoch, repeats=t.epoch_repeats
        )
    else:
        batches = epoch_batches(n_train, t.batch_size, t.seed, epoch, t.epoch_repeats)
    shares = [process_share(indices, runtime.rank, runtime.world) for indices in batches]
    # A process whose share is empty (a last batch smaller than the number of processes)
    # still runs a step, on weight 0, so that the gradient all-reduce meets. The loader's
    # workers decode images and read cached rows ahead of the step.
    stream = setup.data.loader(
        "train",
        [share or indices[:1] for share, indices in zip(shares, batches, strict=True)],
        device=runtime.device,
    )
    bar = progress(
        zip(shares, stream, strict=True),
        f"epoch {epoch}/{t.epochs}",
        t.progress and runtime.is_main,
        total=len(batches),
    )
    step_loss = grad_norm = None
    for micro, (share, host_batch) in enumerate(bar):
        sync_step = (micro + 1) % t.gradient_accumulation_steps == 0 or micro == len(batches) - 1
        batch = runtime.move(host_batch)
        if not share:
            batch["weights"] = torch.zeros_like(batch["weights"])
        # Gradients are all-reduced only on the micro-batch that ends an accumulation.
        with contextlib.nullcontext() if sync_step else accelerator.no_sync(fit.model):
            with runtime.autocast():
                per_sample = fit.model(batch, return_losses=True, label_smoothing=t.label_smoothing)
            loss, value = global_weighted_loss(per_sample, batch["weights"], accelerator)
            accelerator.backward(loss / t.gradient_accumulation_steps)
        losses.add(value)
        step_loss = value if step_loss is None else step_loss + value
        if not sync_step:
            continue
        grad_norm = fit.step(step_loss)
        step_loss = None
        state.step += 1
        if state.step % t.log_every == 0:  # the only reads of device values in the loop
            fit.step.check(epoch, str(run.last), state.epoch)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses.recent_mean():.3f}")
            if accelerator.trackers:
                values = {
                    "train/loss": float(value),
                    "train/grad_norm": float(grad_norm),
                    "train/lr": fit.scheduler.get_last_lr()[0],
                }
                accelerator.log(values, step=state.step)
    fit.step.check(epoch, str(run.last), state.epoch)
    mean, std, step_losses = losses.summary()
    return {
        "train_loss": mean,
        "train_loss_std": std,
        "step_losses": step_losses,  # per micro-batch, for stability compared step by step
        **fit.meter.epoch_record(),
        "skipped_steps": fit.step.skipped_steps(),
        "train_seconds": time.perf_counter() - started,  # training only (after the reads above)
        **peak_memory(runtime),
        "started": started,
        "samples": n_train * t.epoch_repeats,  # questions seen this epoch
    }


def peak_memory(runtime: Runtime) -> dict[str, float | None]:
    """The epoch's peak GPU memory allocated (CUDA) and the process's peak RSS (MiB)."""
    gpu = None
    if runtime.device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(runtime.device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_gpu_memory_mib": gpu, "peak_rss_mib": rss}


def epoch_record(epoch: int, train_part: dict[str, Any], val: dict[str, Any], fit: Fit) -> dict:
    """One line of metrics.jsonl; its seconds are the epoch's training and validation."""
    seconds = time.perf_counter() - train_part.pop("started")
    samples_per_s = train_part.pop("samples") / seconds
    step_losses = train_part.pop("step_losses")
    return {
        "epoch": epoch,
        "train_loss": train_part.pop("train_loss"),
        "train_loss_std": train_part.pop("train_loss_std"),
        "val_loss": val["loss"],
        "val_em": val["em"],
        "val_f1": val["f1"],
        "val_f1_set": val["f1_set"],
        "lr": fit.scheduler.get_last_lr()[0],
        **train_part,
        "seconds": seconds,
        "samples_per_s": samples_per_s,
        "step_losses": step_losses,  # last: the one long field of the line
    }


def _epoch_line(record: dict[str, Any], improved: bool) -> str:
    return (
        f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}  val loss "
        f"{record['val_loss']:.4f}  val EM {100 * record['val_em']:.1f}  F1 "
        f"{100 * record['val_f1']:.1f}" + ("  (best)" if improved else "")
    )


# -- save -----------------------------------------------------------------------------------
def save_epoch(
    run: RunDirectory,
    fit: Fit,
    setup: Setup,
    state: LoopState,
    record: dict[str, Any],
    val: dict[str, Any],
    improved: bool,
    runtime: Runtime,
) -> None:
    """The epoch's metrics line, then ``best/`` (if improved) and ``last/`` checkpoints."""
    rng_per_rank = gather_objects([rng_state()], runtime)
    # Under several processes the weights to save are gathered by accelerate (whole
    # parameters even where FSDP / ZeRO shard them); a collective: every process calls it.
    full_state = runtime.accelerator.get_state_dict(fit.model) if runtime.world > 1 else None
    bases = _bases(setup.backbones)
    if runtime.is_main:
        if improved:
            save_checkpoint(fit.raw_model, run.best, base_models=bases, full_state=full_state)
            write_predictions(
                run.file("predictions_val.jsonl"), setup.data.splits.val, val["predictions"]
            )
        training_state = {
            "optimizer": fit.optimizer.state_dict(),
            "scheduler": fit.scheduler.state_dict(),
            "rng": rng_state(),
            "rng_per_rank": rng_per_rank,
            "loop": state.to_dict(),
        }
        # The metrics line goes first: a kill between the two leaves a line that resume
        # drops (it trims metrics.jsonl to the checkpoint's epoch) and recomputes.
        run.append_metrics(record)
        save_checkpoint(
            fit.raw_model, run.last, training_state=training_state, base_models=bases,
            full_state=full_state,
        )  # fmt: skip
        # at the optimizer step, the one axis every tracker shares (wandb wants it rising)
        values = {f"val/{key[4:]}": record[key] for key in ("val_loss", "val_em", "val_f1")}
        values.update({"train/epoch_loss": record["train_loss"], "epoch": record["epoch"]})
        runtime.accelerator.log(values, step=state.step)
    runtime.wait()  # checkpoints are on disk before any process reads them


# -- finish ---------------------------------------------------------------------------------
def finish(
    run: RunDirectory,
    fit: Fit,
    setup: Setup,
    state: LoopState,
    config: RunConfig,
    runtime: Runtime,
    started: float,
    log,
) -> dict[str, Any]:
    """The best checkpoint on the test split, then ``summary.json`` and a "success" status.
    The validation scores are the best epoch's (no second validation pass)."""
    load_checkpoint(fit.raw_model, run.best)
    data, t = setup.data, config.train

    def evaluate(split: str) -> dict[str, Any]:
        return evaluate_split(
            fit.raw_model, data, split, setup.tokenizer, config, setup.train_counts,
            setup.trie, runtime,
        )  # fmt: skip

    test = evaluate("test") if len(data.splits.test) else None
    val = state.best_val or without_predictions(evaluate("val"))  # older checkpoints lack it
    history = run.metrics()
    plan = setup.plan
    summary = {
        "status": "success",
        "strategy": plan.strategy,
        "best_epoch": state.best_epoch,
        "best_val_loss": min((row["val_loss"] for row in history), default=None),
        "best_metric": {t.early_stopping_metric: state.best},
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < t.epochs,
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
        "val": val,
        "test": without_predictions(test) if test else None,
        "data": {name: len(getattr(data.splits, name)) for name in ("train", "val", "test")}
        | {"sources": data.splits.sources},
        "answer_weights": setup.weights_report,
        "skipped_bad_images": {"images": setup.skip_images, "questions": data.splits.skipped},
        "backbones": _bases(setup.backbones),
        "device": {"type": runtime.device.type, "precision": runtime.precision},
        "code_version": code_version(),
        "finished": now(),
    }
    if runtime.is_main and test:
        write_predictions(run.file("predictions_test.jsonl"), data.splits.test, test["predictions"])
    run.succeeded(summary)
    if test:
        log(f"test: EM {100 * test['em']:.1f}  F1 {100 * test['f1']:.1f}  (n={test['n']})")
    runtime.wait()
    return summary


# -- small helpers --------------------------------------------------------------------------
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


def _bases(backbones: Backbones) -> dict[str, str | None]:
    return {"vision": backbones.vision, "text": backbones.text}


def _silent(_: str) -> None:
    pass

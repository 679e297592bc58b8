"""The pieces of the training loop: batches, the optimizer step, loop state, early stopping.

The step never waits for the device. Gradient norms, clipping, the non-finite check and the
loss statistics stay device tensors; the host reads them every ``--log_every`` steps and at the
end of an epoch. (Reading a GPU value, ``.item()``, ``.tolist()``, a boolean index, stalls the
host until the GPU has finished everything queued, so the next step cannot be queued in time.)
A non-finite step never changes the weights: it is skipped on the device (the fused AdamW
kernel reads a ``found_inf`` flag, as PyTorch's loss scaler uses it) and, with
``--on_nonfinite stop``, training stops at the next read with the step's number.
"""

from __future__ import annotations

import ast
import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vqadapt.errors import VQATrainingError
from vqadapt.run_dir import disk_full
from vqadapt.towers import layer_of, parameter_towers

if TYPE_CHECKING:
    from vqadapt.config import RunConfig
    from vqadapt.runtime import Runtime

NO_DECAY_MARKERS = ("norm", "embed", "modality", "lambda1")  # plus every bias / 1-D tensor
TOWERS = ("vision", "projector", "text_encoder", "text_decoder")


# -- batches --------------------------------------------------------------------------------
def epoch_order(n: int, generator: torch.Generator, repeats: int = 1) -> list[int]:
    """``repeats`` shuffled passes over ``n`` questions, one after the other: each pass shows
    every question once (one pass: the plain shuffle of an epoch)."""
    order: list[int] = []
    for _ in range(repeats):
        order += torch.randperm(n, generator=generator).tolist()
    return order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, repeats: int = 1
) -> list[list[int]]:
    """The shuffled batches of one epoch (``repeats`` passes over the training questions, cut
    into batches as one stream): a function of (seed, epoch) only, so resume is exact."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = epoch_order(n, generator, repeats)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(
    lengths: list[int], batch_size: int, seed: int, epoch: int, window: int = 50, repeats: int = 1
) -> list[list[int]]:
    """Batches of similar lengths (``--group_by_length``), a function of (seed, epoch) only:
    the epoch's shuffled order (``repeats`` passes) is cut into windows of ``window`` batches,
    each window sorted by length (longest first) and cut into batches, and the batches are
    shuffled."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = epoch_order(len(lengths), generator, repeats)
    span = window * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


# -- optimizer ------------------------------------------------------------------------------
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
    over all tensors instead of a few per tensor (same update, the step costs less), and the
    only form that can skip a step on a device flag (``found_inf``) without a host sync."""
    return torch.optim.AdamW(param_groups(model, lr, vision_lr, weight_decay), fused=True)


def global_weighted_loss(
    per_sample: torch.Tensor, weights: torch.Tensor, accelerator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's weighted mean loss, computed from this process's share.

    DDP averages gradients over the processes, so this process's loss is its share of the
    numerator over the *global* weight sum, times the number of processes: the gradient is
    then exactly that of ``weighted_loss`` over the whole batch in one process (with one
    process, the reduction is the identity and this is ``weighted_loss``).
    Returns (loss to backpropagate, global loss value, a detached device scalar)."""
    numerator = (per_sample.float() * weights).sum()
    totals = accelerator.reduce(torch.stack([numerator.detach(), weights.sum()]), "sum")
    denominator = totals[1].clamp(min=1e-12)
    loss = numerator / denominator * accelerator.num_processes
    return loss, totals[0] / denominator


class GradientMeter:
    """L2 norm of the gradients per tower and per text-encoder layer, averaged over an epoch.

    All on the device: one fused norm over every gradient, grouped by an index, summed into
    running totals; ``epoch_record`` reads them once."""

    def __init__(self, model) -> None:
        towers = parameter_towers(model)
        self.layers = [f"text_encoder.{i}" for i in range(model.text_layout.num_layers)]
        self.params: list[torch.nn.Parameter] = []
        tower_of, layer_of_param = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            where = layer_of(model, name)
            in_text = where is not None and where[0] == "text_encoder"
            self.params.append(param)
            tower_of.append(TOWERS.index(towers[name]))
            layer_of_param.append(len(TOWERS) + where[1] - 1 if in_text else -1)
        self._towers = torch.tensor(tower_of, dtype=torch.long)
        self._layers = torch.tensor(layer_of_param, dtype=torch.long)
        self._index: dict[tuple[torch.device, tuple[bool, ...]], tuple] = {}
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | None = None  # per group: sum over steps of the group's norm
        self.max_total: torch.Tensor | None = None
        self.steps = 0

    def _indices(self, present: tuple[bool, ...], device: torch.device):
        key = (device, present)
        if key not in self._index:
            keep = torch.tensor(present, dtype=torch.bool)
            towers, layers = self._towers[keep], self._layers[keep]
            in_layer = layers >= 0
            self._index[key] = (
                towers.to(device),
                layers[in_layer].to(device),
                in_layer.nonzero().squeeze(1).to(device),
            )
        return self._index[key]

    def measure(self) -> torch.Tensor:
        """This step's total gradient norm (a device scalar); adds the per-group norms."""
        present = tuple(p.grad is not None for p in self.params)
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        groups = len(TOWERS) + len(self.layers)
        if not grads:
            return torch.zeros(())
        device = grads[0].device
        towers, layers, in_layer = self._indices(present, device)
        squares = torch.stack(torch._foreach_norm(grads)).float().square()
        grouped = squares.new_zeros(groups).index_add_(0, towers, squares)
        grouped.index_add_(0, layers, squares.index_select(0, in_layer))
        total = grouped[: len(TOWERS)].sum().sqrt()
        norms = grouped.sqrt()
        self.sums = norms if self.sums is None else self.sums + norms
        self.max_total = total if self.max_total is None else torch.maximum(self.max_total, total)
        self.steps += 1
        return total

    def epoch_record(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        sums = [0.0] * (len(TOWERS) + len(self.layers))
        if self.sums is not None:
            sums = self.sums.tolist()  # one read per epoch
        towers = dict(zip(TOWERS, sums[: len(TOWERS)], strict=True))
        layers = dict(zip(self.layers, sums[len(TOWERS) :], strict=True))
        return {
            "grad_norm": {tower: value / steps for tower, value in towers.items()},
            "grad_norm_max": float(self.max_total) if self.max_total is not None else 0.0,
            "grad_norm_layers": {layer: value / steps for layer, value in layers.items()},
        }


class OptimizerStep:
    """Clip, step (or skip a non-finite step) and schedule, without reading the device.

    ``scaler``: the fp16 loss scaler, whose inf / NaN steps are its normal way of finding the
    scale (skipped by the scaler, counted, never fatal). Without it a non-finite loss or
    gradient is skipped on the device (``found_inf``) and, under ``stop``, reported by
    ``check``. ``fallback``: under sharded strategies (FSDP, DeepSpeed) clipping and stepping
    go through accelerate, which knows the shards.
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        meter: GradientMeter,
        max_grad_norm: float,
        on_nonfinite: str = "stop",
        scaler=None,
        accelerator=None,
        fallback: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer  # as prepared (an AcceleratedOptimizer or the optimizer)
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)
        self.scheduler = scheduler
        self.meter = meter
        self.max_grad_norm = max_grad_norm
        self.on_nonfinite = on_nonfinite
        self.scaler = scaler
        self.accelerator = accelerator
        self.fallback = fallback
        self.steps = 0  # optimizer steps taken (or skipped) since construction
        self.reset_epoch()

    def reset_epoch(self) -> None:
        self.skipped: torch.Tensor | None = None  # steps skipped this epoch (device scalar)
        self.first_bad: torch.Tensor | None = None  # the first non-finite step (-1: none)

    def __call__(self, loss_value: torch.Tensor) -> torch.Tensor:
        """One optimizer step after the micro-batches' backward passes; ``loss_value`` is the
        step's loss (a device scalar). Returns the total gradient norm (device scalar)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.raw_optimizer)  # measure and clip true gradients
        total = self.meter.measure()
        bad = ~(torch.isfinite(total) & torch.isfinite(loss_value))
        if self.fallback:
            if self.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
        else:
            grads = [p.grad for p in self.meter.params if p.grad is not None]
            if self.max_grad_norm > 0 and grads:
                # torch.nn.utils.clip_grad_norm_'s rule, on the norm measured above
                scale = (self.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
                torch._foreach_mul_(grads, scale.to(grads[0].dtype))
            if self.scaler is not None:
                self.scaler.step(self.raw_optimizer)
                self.scaler.update()
            else:
                self.raw_optimizer.found_inf = bad.float()
                try:
                    self.raw_optimizer.step()
                finally:
                    del self.raw_optimizer.found_inf
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        number = torch.full_like(total, float(self.steps))
        skipped = bad.to(total.dtype)
        self.skipped = skipped if self.skipped is None else self.skipped + skipped
        first = torch.where(bad, number, torch.full_like(total, -1.0))
        if self.first_bad is None:
            self.first_bad = first
        else:
            self.first_bad = torch.where(self.first_bad < 0, first, self.first_bad)
        return total

    def skipped_steps(self) -> int:
        return 0 if self.skipped is None else int(self.skipped)

    def check(self, epoch: int, checkpoint: str, checkpoint_epoch: int) -> None:
        """Under ``stop`` (and no loss scaler), raise if a step since the epoch began was
        non-finite (a host read: call it every few steps, not every step)."""
        if self.on_nonfinite != "stop" or self.scaler is not None or self.first_bad is None:
            return
        first = int(self.first_bad)
        if first < 0:
            return
        raise VQATrainingError(
            f"non-finite loss or gradients at epoch {epoch}, step {first}: training stopped "
            f"(the step was not applied). The last good checkpoint is {checkpoint} (after epoch "
            f"{checkpoint_epoch}); lower --lr, or pass --on_nonfinite skip to skip such steps"
        )


# -- loop state -----------------------------------------------------------------------------
@dataclass
class LoopState:
    """Where the loop stands; saved with every ``last`` checkpoint and restored on resume."""

    epoch: int = 0  # last finished epoch
    step: int = 0  # optimizer steps taken
    best: float | None = None  # best value of the early-stopping metric
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the best
    best_val: dict[str, Any] | None = None  # scores of the best epoch's validation pass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoopState:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


@dataclass
class EarlyStopping:
    """Best-so-far bookkeeping on validation loss (lower is better) or EM (higher)."""

    metric: str  # "val_loss" or "val_em"
    patience: int  # epochs without improvement before stopping (0: never)
    state: LoopState = field(default_factory=LoopState)

    def value(self, val: dict[str, Any]) -> float:
        return val["loss"] if self.metric == "val_loss" else val["em"]

    def update(self, epoch: int, val: dict[str, Any]) -> bool:
        """Record epoch ``epoch``'s validation scores; True when it is the best so far."""
        current = self.value(val)
        best = self.state.best
        improved = best is None or (current < best if self.metric == "val_loss" else current > best)
        if improved:
            scores = {key: value for key, value in val.items() if key != "predictions"}
            self.state.best, self.state.best_epoch, self.state.bad_epochs = current, epoch, 0
            self.state.best_val = scores
        else:
            self.state.bad_epochs += 1
        self.state.epoch = epoch
        return improved

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.state.bad_epochs >= self.patience


# -- RNG ------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), Python RNG state, as tensors and strings (loadable
    with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore ``rng_state``; CUDA states only where this machine has as many GPUs (a run
    resumed on another machine kind continues, with fresh GPU draws)."""
    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


# -- epoch statistics -----------------------------------------------------------------------
class LossLog:
    """The step losses of an epoch, kept on the device and read once at its end."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def add(self, value: torch.Tensor) -> None:
        self.values.append(value.detach().float())

    def recent_mean(self, count: int = 20) -> float:
        """Mean of the last finite values (a host read: for progress, every few steps)."""
        recent = [v for v in torch.stack(self.values[-count:]).tolist() if math.isfinite(v)]
        return float(np.mean(recent)) if recent else float("nan")

    def summary(self) -> tuple[float, float, list[float | None]]:
        """Mean and standard deviation of the epoch's finite step losses, and every step
        loss in order (rounded to 6 decimals; ``None`` for a non-finite one)."""
        if not self.values:
            return float("nan"), float("nan"), []
        every = torch.stack(self.values).tolist()  # the epoch's one read
        steps = [round(v, 6) if math.isfinite(v) else None for v in every]
        finite = [v for v in every if math.isfinite(v)]
        if not finite:
            return float("nan"), float("nan"), steps
        return float(np.mean(finite)), float(np.std(finite)), steps


def explain_failure(
    err: BaseException, config: RunConfig, runtime: Runtime, phase: str, kept: str
) -> BaseException:
    """Out of memory and a full disk as ``VQATrainingError`` saying what to change and what
    was kept; any other error as it is."""
    t = config.train
    if isinstance(err, torch.OutOfMemoryError):
        if phase.startswith(("validating", "evaluating")):
            advice = f"try a smaller --eval_batch_size (now {t.eval_batch_size})"
        elif t.batch_size > 1:
            factor = next(p for p in range(2, t.batch_size + 1) if t.batch_size % p == 0)
            smaller, more = t.batch_size // factor, t.gradient_accumulation_steps * factor
            advice = (
                f"try --batch_size {smaller} --gradient_accumulation_steps {more} (the same "
                f"effective batch of {t.batch_size * t.gradient_accumulation_steps}; --resume "
                "accepts that change)"
            )
        else:
            advice = (
                "the batch size is already 1: train fewer layers (LoRA), use --mixed_precision "
                "bf16, or a device with more memory"
            )
        return VQATrainingError(
            f"out of memory on {runtime.device} while {phase} (--batch_size {t.batch_size}, "
            f"--gradient_accumulation_steps {t.gradient_accumulation_steps}): {advice}. {kept}"
        )
    if disk_full(err):
        return VQATrainingError(
            f"the disk is full (writing {getattr(err, 'filename', None) or 'a run file'} while "
            f"{phase}): no half-written file was left; free some space, then continue with "
            f"--resume. {kept}"
        )
    return err

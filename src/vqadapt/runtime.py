"""Where and in what precision a command computes: the one owner of device and precision.

Every command (train, eval, predict, export, demo, ablate's cells) gets a ``Runtime``: the
device, the mixed precision and, for training, accelerate's ``Accelerator``, which picks the
device of each launched process. Code below the entry points never names "cpu" or "cuda": it
asks the runtime to ``move`` a batch (every batch of every command goes through it) and to
``autocast``.

Defaults: the best available device (a CUDA GPU, else the CPU); ``--mixed_precision auto`` is
bf16 on a GPU that supports it and fp32 elsewhere (fp16 is there for older GPUs, with a loss
scaler); TF32 matmuls are allowed on CUDA (fp32 work, e.g. the projector's LayerNorm inputs,
runs on tensor cores with a 10-bit mantissa, the usual trade in PyTorch training).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from vqadapt.config import PRECISIONS
from vqadapt.errors import VQAConfigError

DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def best_device() -> torch.device:
    """A CUDA GPU when there is one, else the CPU (other accelerators: say --device)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(spec: str) -> torch.device:
    """``auto`` or a torch device string; a device this machine lacks is refused up front."""
    if spec == "auto":
        return best_device()
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise VQAConfigError(f"--device {spec!r} is not a device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VQAConfigError(f"--device {spec}: this machine has no CUDA GPU (use cpu or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise VQAConfigError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible"
        )
    return device


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA GPU that supports it, else no (fp32); fp16 needs a GPU."""
    if spec not in PRECISIONS:
        raise VQAConfigError(f"--mixed_precision must be one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        cuda = device.type == "cuda"
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if spec == "fp16" and device.type == "cpu":
        raise VQAConfigError("--mixed_precision fp16 needs a GPU; on a CPU use bf16 or no")
    return spec


def allow_tf32() -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions (CUDA; a no-op elsewhere)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@dataclass
class Runtime:
    """A command's device and precision (and, when training, its accelerator)."""

    device: torch.device
    precision: str  # "no", "bf16" or "fp16" (resolved, never "auto")
    accelerator: Any | None = None

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The autocast dtype, None for fp32."""
        return DTYPES[self.precision]

    @property
    def is_main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass (training, evaluation and generation alike)."""
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def move(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Every tensor of a batch on the device (asynchronously from pinned memory)."""
        non_blocking = self.device.type == "cuda"
        return {
            key: value.to(self.device, non_blocking=non_blocking)
            if isinstance(value, torch.Tensor)
            else value
            for key, value in batch.items()
        }

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it builds what is shared on disk)."""
        if self.accelerator is None:
            yield
            return
        with self.accelerator.main_process_first():
            yield

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def inference_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """The runtime of one process that evaluates, predicts, exports or serves."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        allow_tf32()
    return Runtime(resolved, resolve_precision(precision, resolved))


def trackers(report_to: str, run_dir: str | os.PathLike) -> list[Any]:
    """accelerate's trackers for ``--report_to`` (its ``log_with``): TensorBoard into
    ``run_dir/tensorboard/``, wandb and mlflow by name. A tracker whose package is missing is
    refused here (accelerate would drop it without a word)."""
    from accelerate.tracking import TensorBoardTracker
    from accelerate.utils import is_mlflow_available, is_wandb_available

    from vqadapt import menu

    available = {"wandb": is_wandb_available, "mlflow": is_mlflow_available}
    out: list[Any] = []
    for name in menu.parse_names(report_to, menu.TRACKERS, "report_to", none_ok=True):
        if name == "tensorboard":
            out.append(TensorBoardTracker("tensorboard", str(run_dir)))  # starts in init_trackers
            continue
        if not available[name]():
            raise VQAConfigError(
                f"--report_to {name} needs the {name} package: pip install 'vqadapt[{name}]' "
                "(or leave it out of --report_to)"
            )
        out.append(name)
    return out


def training_runtime(
    device: str = "auto",
    precision: str = "auto",
    compile_model: bool = False,
    ddp_timeout_s: int = 1800,
    log_with: list[Any] | None = None,
) -> Runtime:
    """accelerate's ``Accelerator`` for this process, as a ``Runtime``.

    Under ``accelerate launch`` each process gets its own GPU; ``--multi_gpu`` on a machine
    without GPUs gives CPU processes (gloo), never processes that each train alone and race on
    the run directory. ``ddp_timeout_s`` bounds how long a process waits at a collective (the
    main process may be building the embedded backbones while the others wait). ``log_with``:
    the run's trackers (``trackers``), started by ``accelerator.init_trackers`` once the run
    directory is claimed.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = resolve_device(device) if device != "auto" else None
    cpu = (wanted is not None and wanted.type == "cpu") or (
        launched > 1 and not torch.accelerator.is_available()
    )
    target = torch.device("cpu") if cpu else (wanted or best_device())
    resolved = resolve_precision(precision, target)
    if AcceleratorState._shared_state:
        # accelerate keeps one precision and compile setting per process; a second run in the
        # same process (a notebook, the tests) may ask for others: forget the first run's
        # (the process group, PartialState's, stays)
        AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=resolved,
        cpu=cpu,
        dynamo_backend="inductor" if compile_model else "no",
        log_with=log_with or None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=ddp_timeout_s))],
    )
    if accelerator.num_processes != launched:
        raise VQAConfigError(
            f"{launched} processes were launched but accelerate sees {accelerator.num_processes}: "
            "check the accelerate config (distributed_type, num_processes)"
        )
    if accelerator.device.type == "cuda":
        allow_tf32()
    return Runtime(accelerator.device, resolved, accelerator)

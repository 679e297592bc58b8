"""One typed config tree: data, backbones, adaptation, training.

The dataclasses below are the single source of truth: ``vqadapt train`` flags are generated
from them by transformers' ``HfArgumentParser`` (so the flag names are the field names, e.g.
``--use_text_lora --text_lora_r 16``), a ``--config FILE.yaml`` is layered under the flags,
and the resolved tree is written into every run directory (``config.yaml``), which is enough
to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vqadapt.errors import VQAConfigError

SCHEDULERS = ("cosine", "linear", "constant")
EARLY_STOPPING_METRICS = ("val_loss", "val_em")


@dataclass
class DataConfig:
    """Where the questions and images come from."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training annotations (ViVQA CSV, EVJVQA JSON or JSONL). "
            "Default: the embedded synthetic set, generated on first use."
        },
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Test annotations (same formats)."}
    )
    val_file: str | None = field(
        default=None,
        metadata={
            "help": "Validation annotations. Default: carved out of train, grouped by image."
        },
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Folder holding the images (searched once)."}
    )
    data_format: str = field(default="auto", metadata={"help": "auto, vivqa_csv, json or jsonl."})
    language: str | None = field(
        default=None, metadata={"help": "Keep only annotations of this language (EVJVQA JSON)."}
    )
    val_fraction: float = field(
        default=0.1, metadata={"help": "Share of train carved out as validation (by image)."}
    )
    max_question_tokens: int = field(
        default=48, metadata={"help": "Questions are truncated to this many tokens (reported)."}
    )
    max_answer_tokens: int = field(
        default=16, metadata={"help": "Answers are truncated to this many tokens (reported)."}
    )
    on_bad_image: str = field(
        default="error",
        metadata={
            "help": "error: stop on a missing/corrupt image; skip: drop its questions "
            "(counted and listed in the run summary)."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training questions (smoke runs)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N validation/test questions."}
    )


@dataclass
class ModelConfig:
    """Which pretrained towers to load and how to fuse them."""

    vision_model: str | None = field(
        default=None,
        metadata={
            "help": "Vision encoder: hub id (facebook/dinov2-base) or local folder. "
            "Default: the embedded tiny DINOv2, built on first use."
        },
    )
    text_model: str | None = field(
        default=None,
        metadata={
            "help": "Seq2seq text model: hub id (vinai/bartpho-syllable, VietAI/vit5-base) "
            "or local folder. Default: the embedded tiny BARTpho-like MBart."
        },
    )
    blind: bool = field(
        default=False,
        metadata={"help": "Question-only model (no vision tower): the language-prior baseline."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the hub (off unless asked)."}
    )


@dataclass
class AdaptConfig:
    """How the pretrained encoders are adapted (the question this tool studies)."""

    unfreeze_encoder_layers: int = field(
        default=0,
        metadata={"help": "The last N text-encoder layers train fully (0: frozen baseline)."},
    )
    use_text_lora: bool = field(
        default=False,
        metadata={"help": "LoRA on the attention projections of every text-encoder layer."},
    )
    text_lora_r: int = field(default=16, metadata={"help": "Text LoRA rank."})
    text_lora_alpha: float = field(default=32.0, metadata={"help": "Text LoRA alpha."})
    text_lora_dropout: float = field(default=0.05, metadata={"help": "Text LoRA dropout."})
    text_lora_targets: str = field(
        default="auto",
        metadata={"help": "Comma-separated projection names, or 'auto' for the family's q/k/v."},
    )
    use_vision_lora: bool = field(
        default=False,
        metadata={
            "help": "LoRA on every vision-encoder layer (otherwise the vision tower is frozen)."
        },
    )
    vision_lora_r: int = field(default=8, metadata={"help": "Vision LoRA rank."})
    vision_lora_alpha: float = field(default=16.0, metadata={"help": "Vision LoRA alpha."})
    vision_lora_dropout: float = field(default=0.05, metadata={"help": "Vision LoRA dropout."})
    vision_lora_targets: str = field(
        default="auto",
        metadata={"help": "Comma-separated projection names, or 'auto' for the family's q/k/v."},
    )


@dataclass
class TrainConfig:
    """The optimisation, the run directory and evaluation settings."""

    output_dir: str = field(default="runs/default", metadata={"help": "Run directory."})
    epochs: int = field(default=8, metadata={"help": "Maximum number of epochs."})
    batch_size: int = field(
        default=32,
        metadata={
            "help": "Questions per micro-batch, over all processes (under accelerate launch "
            "each process takes its share)."
        },
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Length-aware batching: batches of questions of similar length (less "
            "padding). Shuffled windows of 50 batches are sorted by length, then the batches "
            "are shuffled: still random, not iid."
        },
    )
    eval_batch_size: int = field(default=128, metadata={"help": "Questions per evaluation batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per step."}
    )
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (AdamW)."})
    vision_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the vision LoRA (default: lr * 0.3; a vision tower "
            "trained at the text rate collapses, see FINDINGS)."
        },
    )
    weight_decay: float = field(
        default=0.01,
        metadata={"help": "AdamW weight decay (never on biases, norms or LoRA-free embeddings)."},
    )
    dropout: float = field(
        default=0.1, metadata={"help": "Dropout in the trainable parts (projector, decoder)."}
    )
    scheduler: str = field(default="cosine", metadata={"help": "cosine, linear or constant."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps spent warming up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0: off)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label smoothing of the token loss."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of everything (deterministic on CPU)."})
    early_stopping_patience: int = field(
        default=0, metadata={"help": "Stop after N epochs without improvement (0: off)."}
    )
    early_stopping_metric: str = field(
        default="val_loss", metadata={"help": "val_loss (lower is better) or val_em."}
    )
    answer_weights: str | None = field(
        default=None, metadata={"help": "answer_weights.json: per-answer loss weights."}
    )
    num_beams: int = field(default=1, metadata={"help": "Beams at evaluation (1: greedy)."})
    constrain_to_train_answers: bool = field(
        default=False,
        metadata={"help": "Decode only answers seen in training (prefix trie over their tokens)."},
    )
    cache: bool = field(
        default=True,
        metadata={
            "help": "Cache what frozen towers compute (vision features, frozen text-encoder "
            "prefix). --no_cache turns it off."
        },
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A non-finite loss or gradient: stop (last good checkpoint kept) or "
            "skip the step (counted per epoch)."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue the run in output_dir."})
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing run in output_dir."}
    )
    device: str = field(
        default="auto",
        metadata={
            "help": "auto (a CUDA GPU when there is one, else the CPU), cpu or cuda. Under "
            "accelerate launch each process takes its own GPU (CUDA_VISIBLE_DEVICES)."
        },
    )
    mixed_precision: str = field(
        default="auto",
        metadata={
            "help": "auto (bf16 on a GPU that supports it, else fp32), no (fp32), bf16, or "
            "fp16 (GPUs without bf16; with a loss scaler)."
        },
    )
    speed_paths: str = field(
        default="auto",
        metadata={
            "help": "How the model computes: auto (the device's measured profile, see "
            "vqadapt.speed), library (the library's path everywhere), or a comma-separated "
            "list of paths (packed_encoder, lean_decoder, absorbed_cross_attention, "
            "head_on_labels, fast_dropout, key_multiple=N, length_multiple=N)."
        },
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the model for training (inductor)."}
    )
    ddp_timeout: int = field(
        default=1800,
        metadata={"help": "Seconds a process waits at a collective before giving up (DDP)."},
    )
    log_every: int = field(default=20, metadata={"help": "Steps between TensorBoard points."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})


CONFIG_CLASSES = (DataConfig, ModelConfig, AdaptConfig, TrainConfig)
SECTION_NAMES = ("data", "model", "adapt", "train")


@dataclass
class RunConfig:
    """The whole tree of one run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Reject impossible settings before anything loads (layer counts are checked later)."""
        a, t, d = self.adapt, self.train, self.data
        problems: list[str] = []
        if a.unfreeze_encoder_layers < 0:
            problems.append("--unfreeze_encoder_layers must be >= 0")
        for tower, use, r, alpha, drop in (
            ("text", a.use_text_lora, a.text_lora_r, a.text_lora_alpha, a.text_lora_dropout),
            (
                "vision",
                a.use_vision_lora,
                a.vision_lora_r,
                a.vision_lora_alpha,
                a.vision_lora_dropout,
            ),
        ):
            if not use:
                continue
            if r <= 0:
                problems.append(f"--{tower}_lora_r must be > 0 (got {r})")
            if not alpha > 0:
                problems.append(f"--{tower}_lora_alpha must be > 0 (got {alpha})")
            if not 0 <= drop < 1:
                problems.append(f"--{tower}_lora_dropout must be in [0, 1) (got {drop})")
        if self.model.blind and a.use_vision_lora:
            problems.append("--use_vision_lora needs a vision tower, but --blind removes it")
        for name in ("epochs", "batch_size", "eval_batch_size", "gradient_accumulation_steps"):
            if getattr(t, name) <= 0:
                problems.append(f"--{name} must be > 0 (got {getattr(t, name)})")
        if not (t.lr > 0 and math.isfinite(t.lr)):
            problems.append(f"--lr must be a positive number (got {t.lr})")
        if t.vision_lr is not None and not t.vision_lr > 0:
            problems.append(f"--vision_lr must be > 0 (got {t.vision_lr})")
        if t.weight_decay < 0:
            problems.append(f"--weight_decay must be >= 0 (got {t.weight_decay})")
        if not 0 <= t.dropout < 1:
            problems.append(f"--dropout must be in [0, 1) (got {t.dropout})")
        if not 0 <= t.label_smoothing < 1:
            problems.append(f"--label_smoothing must be in [0, 1) (got {t.label_smoothing})")
        if t.scheduler not in SCHEDULERS:
            problems.append(
                f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {t.scheduler!r})"
            )
        if t.early_stopping_metric not in EARLY_STOPPING_METRICS:
            problems.append(
                f"--early_stopping_metric must be one of {', '.join(EARLY_STOPPING_METRICS)}"
            )
        if t.early_stopping_patience < 0:
            problems.append("--early_stopping_patience must be >= 0")
        if not 0 <= t.warmup_ratio < 1:
            problems.append(f"--warmup_ratio must be in [0, 1) (got {t.warmup_ratio})")
        if t.num_beams <= 0:
            problems.append("--num_beams must be > 0")
        if t.on_nonfinite not in ("stop", "skip"):
            problems.append(f"--on_nonfinite must be stop or skip (got {t.on_nonfinite!r})")
        if t.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            problems.append("--mixed_precision must be auto, no, fp16 or bf16")
        if t.device != "auto" and t.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(f"--device must be auto, cpu or cuda (got {t.device!r})")
        if t.device.startswith("cuda:"):
            problems.append(
                f"--device {t.device}: training picks its GPU from CUDA_VISIBLE_DEVICES "
                "(one per process under accelerate launch); pass --device cuda"
            )
        try:
            from vqadapt.speed import SpeedPaths

            SpeedPaths.parse(t.speed_paths, "cpu")
        except VQAConfigError as err:
            problems.append(str(err))
        if t.log_every <= 0:
            problems.append(f"--log_every must be > 0 (got {t.log_every})")
        if t.ddp_timeout <= 0:
            problems.append(f"--ddp_timeout must be > 0 (got {t.ddp_timeout})")
        if t.resume and t.overwrite:
            problems.append("--resume and --overwrite contradict each other")
        if not 0 < d.val_fraction < 1:
            problems.append(f"--val_fraction must be in (0, 1) (got {d.val_fraction})")
        if d.on_bad_image not in ("error", "skip"):
            problems.append(f"--on_bad_image must be error or skip (got {d.on_bad_image!r})")
        if d.data_format not in ("auto", "vivqa_csv", "json", "jsonl"):
            problems.append(
                f"--data_format must be auto, vivqa_csv, json or jsonl (got {d.data_format!r})"
            )
        if problems:
            raise VQAConfigError("invalid settings:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_NAMES}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a sectioned dict (``{"train": {...}}``) or a flat one (``{"lr": ...}``)."""
        sections = {name: {} for name in SECTION_NAMES}
        flat = flatten_config(values)
        owner = field_owner()
        for key, value in flat.items():
            if key not in owner:
                raise VQAConfigError(f"unknown setting {key!r}")
            sections[owner[key]][key] = value
        built = {
            name: klass(**sections[name])
            for name, klass in zip(SECTION_NAMES, CONFIG_CLASSES, strict=True)
        }
        return cls(**built)

    def save(self, path: str | Path) -> None:
        from vqadapt.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(load_yaml(path))


def field_owner() -> dict[str, str]:
    """Map each flag name to its section."""
    return {
        f.name: section
        for section, klass in zip(SECTION_NAMES, CONFIG_CLASSES, strict=True)
        for f in dataclasses.fields(klass)
    }


def flatten_config(values: dict[str, Any]) -> dict[str, Any]:
    """Accept both ``{"train": {"lr": 1}}`` and ``{"lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTION_NAMES and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise VQAConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise VQAConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise VQAConfigError(f"{path}: expected a mapping of settings")
    return values


def parse_run_config(argv: list[str]) -> RunConfig:
    """Parse ``vqadapt train`` style flags (``--config FILE.yaml`` layered under them)."""
    import argparse

    from transformers import HfArgumentParser

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(CONFIG_CLASSES)  # type: ignore[arg-type]
    parser.add_argument("--config", default=None, help="YAML file of settings under the flags.")
    if known.config:
        file_values = flatten_config(load_yaml(known.config))
        owner = field_owner()
        unknown = sorted(set(file_values) - set(owner))
        if unknown:
            raise VQAConfigError(f"{known.config}: unknown settings {', '.join(unknown)}")
        parser.set_defaults(**file_values)
    # The parser hands back the four dataclasses, a namespace holding --config, then leftovers.
    parsed = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    extra = parsed[-1]
    if extra:
        raise VQAConfigError(f"unrecognised arguments: {' '.join(extra)}")
    config = RunConfig(*parsed[: len(CONFIG_CLASSES)])
    config.validate()
    return config

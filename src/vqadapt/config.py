"""One typed config tree: data, backbones, adaptation, training.

The dataclasses below are the single source of truth. Each field declares its type (choices as
``Literal[...]``), its help text and its range; every section checks itself at construction
(``__post_init__``), so a ``RunConfig`` that exists is valid, however it was made: from
``vqadapt train`` flags (``run_config_parser`` generates one flag per field, e.g.
``--use_text_lora --text_lora_r 16``), from a ``--config FILE.yaml`` layered under the flags,
from a run's ``config.yaml`` or from an ablation preset. A wrong value is refused with a
``VQAConfigError`` naming where it came from, the setting, the value and what was expected,
before any data or model loads.

The machinery (ranges, checking a value, making a flag) is in ``vqadapt.fields``. This module
imports no torch or transformers (``vqadapt train --help`` answers at once); the choice lists
other modules need (precisions, data formats, ...) are defined here, once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from vqadapt.errors import VQAConfigError
from vqadapt.fields import (
    FRACTION,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    SEED_RANGE,
    TIMEOUT_RANGE,
    ErrorRaisingParser,
    Setting,
    add_flag,
    option,
    raise_problems,
    settings_of,
    show,
)
from vqadapt.io import atomic_write_text

# -- the choice lists (one definition each; other modules import the tuples) ------------------
FileFormat = Literal["vivqa_csv", "json", "jsonl"]
DataFormat = Literal["auto", FileFormat]
OnBadImage = Literal["error", "skip"]
Scheduler = Literal["cosine", "linear", "constant"]
EarlyStoppingMetric = Literal["val_loss", "val_em"]
OnNonfinite = Literal["stop", "skip"]
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
TrainingDevice = Literal["auto", "cpu", "cuda"]
LoraVariant = Literal["lora", "dora", "rslora", "pissa"]
FractionBudget = Literal["epochs", "steps"]  # an ablation's smaller training fractions

FILE_FORMATS: tuple[str, ...] = get_args(FileFormat)
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
ON_BAD_IMAGE: tuple[str, ...] = get_args(OnBadImage)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
EARLY_STOPPING_METRICS: tuple[str, ...] = get_args(EarlyStoppingMetric)
ON_NONFINITE: tuple[str, ...] = get_args(OnNonfinite)
PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)
LORA_VARIANTS: tuple[str, ...] = get_args(LoraVariant)
FRACTION_BUDGETS: tuple[str, ...] = get_args(FractionBudget)


# -- the tree -----------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where the questions and images come from."""

    train_file: str | None = option(
        None,
        "Training annotations (ViVQA CSV, EVJVQA JSON or JSONL). "
        "Default: the embedded synthetic set, generated on first use.",
    )
    test_file: str | None = option(None, "Test annotations (same formats).")
    val_file: str | None = option(
        None, "Validation annotations. Default: carved out of train, grouped by image."
    )
    image_root: str | None = option(None, "Folder holding the images (searched once).")
    data_format: DataFormat = option(
        "auto", "Annotation format; auto: by extension (.csv ViVQA, .json, .jsonl)."
    )
    language: str | None = option(None, "Keep only annotations of this language (EVJVQA JSON).")
    val_fraction: float = option(
        0.1, "Share of train carved out as validation (by image).", OPEN_FRACTION
    )
    max_question_tokens: int = option(
        48, "Questions are truncated to this many tokens (reported).", POSITIVE
    )
    max_answer_tokens: int = option(
        16, "Answers are truncated to this many tokens (reported).", POSITIVE
    )
    on_bad_image: OnBadImage = option(
        "error",
        "error: stop on a missing/corrupt image; skip: drop its questions "
        "(counted and listed in the run summary).",
    )
    max_train_samples: int | None = option(
        None,
        "Use only N training questions, a fixed random sample (the same for every run; a "
        "smaller N keeps a subset of a larger N's).",
        POSITIVE,
    )
    max_eval_samples: int | None = option(
        None,
        "Use only N validation and N test questions, fixed random samples as for "
        "max_train_samples.",
        POSITIVE,
    )
    train_sample_seed: int = option(
        0,
        "Which fixed random sample max_train_samples draws. The ablation gives seed k sample "
        "k, so its seeds also vary which questions a smaller training set holds.",
        SEED_RANGE,
    )

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class ModelConfig:
    """Which pretrained towers to load and how to fuse them."""

    vision_model: str | None = option(
        None,
        "Vision encoder: hub id (facebook/dinov2-base) or local folder. "
        "Default: the embedded tiny DINOv2, built on first use.",
    )
    text_model: str | None = option(
        None,
        "Seq2seq text model: hub id (vinai/bartpho-syllable, VietAI/vit5-base) "
        "or local folder. Default: the embedded tiny BARTpho-like MBart.",
    )
    blind: bool = option(
        False, "Question-only model (no vision tower): the language-prior baseline."
    )
    trust_remote_code: bool = option(False, "Allow model code from the hub (off unless asked).")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class AdaptConfig:
    """How the pretrained towers are adapted (the question this tool studies).

    One choice per tower (``vqadapt.menu``: frozen, full, last_n:N, lora, last_n:N+lora), each
    tower's LoRA settings, and the seed's flags, which map onto the tower choices. A tower's
    LoRA rank, alpha and dropout are range-checked only when its LoRA is on (a grid may leave
    them at any value in the cells without LoRA)."""

    vision_encoder: str | None = option(
        None,
        "What trains in the vision encoder: frozen, full, last_n:N, lora or last_n:N+lora. "
        "Default: lora with --use_vision_lora, else frozen.",
    )
    projector: str = option(
        "full", "What trains in the vision-to-text projector: frozen, full or lora."
    )
    text_encoder: str | None = option(
        None,
        "What trains in the text encoder: frozen, full, last_n:N, lora or last_n:N+lora. "
        "Default: from the seed's flags (--unfreeze_encoder_layers N: last_n:N, --use_text_lora: "
        "lora; neither: frozen).",
    )
    text_decoder: str = option(
        "full",
        "What trains in the text decoder (with its embedding and the LM head tied to it): full, "
        "frozen, last_n:N, lora or last_n:N+lora.",
    )
    lora_variant: LoraVariant = option(
        "lora",
        "The LoRA of every tower, through peft: lora, dora (weight-decomposed: a magnitude per "
        "output), rslora (scaled by alpha / sqrt(r)) or pissa (initialised from the principal "
        "singular vectors; the base weight keeps the residual).",
    )
    unfreeze_encoder_layers: int = option(
        0,
        "The last N text-encoder layers train fully (0: frozen baseline); --text_encoder last_n:N.",
        NON_NEGATIVE,
    )
    use_text_lora: bool = option(
        False,
        "LoRA on the attention projections of every text-encoder layer; --text_encoder lora.",
    )
    text_lora_r: int = option(16, "Text-encoder LoRA rank.")
    text_lora_alpha: float | None = option(
        None, "Text-encoder LoRA alpha (default: 2 x the rank, a scale of 2 at every rank)."
    )
    text_lora_dropout: float = option(0.05, "Text-encoder LoRA dropout.")
    text_lora_targets: str = option(
        "auto",
        "Text-encoder LoRA targets: 'auto' (the family's q/k/v), 'all-linear' or "
        "comma-separated projection names.",
    )
    text_lora_layers: str = option(
        "all", "Text-encoder layers that get LoRA: all, or 1-based numbers and ranges (10-12)."
    )
    use_vision_lora: bool = option(
        False,
        "LoRA on every vision-encoder layer (otherwise the vision tower is frozen); "
        "--vision_encoder lora.",
    )
    vision_lora_r: int = option(8, "Vision LoRA rank.")
    vision_lora_alpha: float | None = option(
        None, "Vision LoRA alpha (default: 2 x the rank, a scale of 2 at every rank)."
    )
    vision_lora_dropout: float = option(0.05, "Vision LoRA dropout.")
    vision_lora_targets: str = option(
        "auto",
        "Vision LoRA targets: 'auto' (the family's q/k/v), 'all-linear' or comma-separated "
        "projection names.",
    )
    vision_lora_layers: str = option(
        "all", "Vision layers that get LoRA: all, or 1-based numbers and ranges (5-6)."
    )
    projector_lora_r: int = option(8, "Projector LoRA rank.")
    projector_lora_alpha: float | None = option(
        None, "Projector LoRA alpha (default: 2 x the rank, a scale of 2 at every rank)."
    )
    projector_lora_dropout: float = option(0.05, "Projector LoRA dropout.")
    projector_lora_targets: str = option(
        "auto", "Projector LoRA targets: 'auto' or 'all-linear' (fc1, fc2), or one of them."
    )
    decoder_lora_r: int = option(16, "Text-decoder LoRA rank.")
    decoder_lora_alpha: float | None = option(
        None, "Text-decoder LoRA alpha (default: 2 x the rank, a scale of 2 at every rank)."
    )
    decoder_lora_dropout: float = option(0.05, "Text-decoder LoRA dropout.")
    decoder_lora_targets: str = option(
        "auto",
        "Text-decoder LoRA targets: 'auto' (q/k/v of self- and cross-attention), 'all-linear' "
        "(every linear layer of a decoder layer; never the LM head) or comma-separated names.",
    )
    decoder_lora_layers: str = option(
        "all", "Text-decoder layers that get LoRA: all, or 1-based numbers and ranges."
    )

    def __post_init__(self) -> None:
        check_fields(self)
        from vqadapt import menu

        choices = menu.resolve(self)
        problems = []
        for tower, choice in choices.items():
            prefix = menu.LORA_PREFIXES[tower]
            if tower != "projector":
                try:
                    menu.parse_layers(
                        getattr(self, f"{prefix}_lora_layers"), f"{prefix}_lora_layers"
                    )
                except VQAConfigError as err:
                    problems.append(str(err))
            if not choice.lora:
                continue
            for name, bounds in (("r", POSITIVE), ("alpha", POSITIVE), ("dropout", FRACTION)):
                value = getattr(self, f"{prefix}_lora_{name}")
                if value is None:  # alpha: 2 x the rank (menu.lora_spec)
                    continue
                problem = bounds.problem(value)
                if problem:
                    problems.append(f"--{prefix}_lora_{name} {problem} (got {show(value)})")
        if all(choice.frozen for choice in choices.values()):
            problems.append(
                "nothing would train: every tower is frozen (--vision_encoder, --projector, "
                "--text_encoder, --text_decoder)"
            )
        raise_problems(problems)


@dataclass
class TrainConfig:
    """The optimisation, the run directory and evaluation settings."""

    output_dir: str = option("runs/default", "Run directory.")
    epochs: int = option(8, "Maximum number of epochs.", POSITIVE)
    batch_size: int = option(
        32,
        "Questions per micro-batch, over all processes (under accelerate launch each process "
        "takes its share).",
        POSITIVE,
    )
    group_by_length: bool = option(
        False,
        "Length-aware batching: batches of questions of similar length (less padding). "
        "Shuffled windows of 50 batches are sorted by length, then the batches are shuffled: "
        "still random, not iid.",
    )
    epoch_repeats: int = option(
        1,
        "Passes over the training questions per epoch, each freshly shuffled: a small "
        "training set (--max_train_samples) then trains as many steps per epoch as a larger "
        "one and is validated as often (the ablation's train_fractions at equal steps).",
        POSITIVE,
    )
    eval_batch_size: int = option(128, "Questions per evaluation batch.", POSITIVE)
    gradient_accumulation_steps: int = option(1, "Micro-batches per step.", POSITIVE)
    lr: float = option(1e-3, "Peak learning rate (AdamW).", POSITIVE)
    vision_lr: float | None = option(
        None,
        "Learning rate of whatever trains in the vision tower (default: lr when only LoRA "
        "trains there, else lr * 0.3: a vision tower whose own weights train at the text rate "
        "collapses, see FINDINGS).",
        POSITIVE,
    )
    weight_decay: float = option(
        0.01,
        "AdamW weight decay (never on biases, norms or LoRA-free embeddings).",
        NON_NEGATIVE,
    )
    dropout: float = option(0.1, "Dropout in the trainable parts (projector, decoder).", FRACTION)
    scheduler: Scheduler = option("cosine", "Learning-rate schedule after the warmup.")
    warmup_ratio: float = option(0.05, "Share of steps spent warming up.", FRACTION)
    max_grad_norm: float = option(1.0, "Gradient clipping (0: off).", NON_NEGATIVE)
    label_smoothing: float = option(0.0, "Label smoothing of the token loss.", FRACTION)
    seed: int = option(0, "Seed of everything (deterministic on CPU).", SEED_RANGE)
    early_stopping_patience: int = option(
        0, "Stop after N epochs without improvement (0: off).", NON_NEGATIVE
    )
    early_stopping_metric: EarlyStoppingMetric = option(
        "val_loss", "val_loss (lower is better) or val_em (higher is better)."
    )
    answer_weights: str | None = option(
        None, "answer_weights.json: per-answer loss weights (vqadapt answer-weights)."
    )
    num_beams: int = option(1, "Beams at evaluation (1: greedy).", POSITIVE)
    constrain_to_train_answers: bool = option(
        False, "Decode only answers seen in training (prefix trie over their tokens)."
    )
    cache: bool = option(
        True,
        "Cache what frozen towers compute (vision features, frozen text-encoder prefix). "
        "--no_cache turns it off.",
    )
    on_nonfinite: OnNonfinite = option(
        "stop",
        "A non-finite loss or gradient: stop (last good checkpoint kept) or skip the step "
        "(counted per epoch).",
    )
    resume: bool = option(False, "Continue the run in output_dir.")
    overwrite: bool = option(False, "Replace an existing run in output_dir.")
    device: TrainingDevice = option(
        "auto",
        "auto (a CUDA GPU when there is one, else the CPU), cpu or cuda. Under accelerate "
        "launch each process takes its own GPU (CUDA_VISIBLE_DEVICES).",
        hint="training picks its GPU from CUDA_VISIBLE_DEVICES (one per process under "
        "accelerate launch): pass --device cuda",
    )
    mixed_precision: MixedPrecision = option(
        "auto",
        "auto (bf16 on a GPU that supports it, else fp32), no (fp32), bf16, or fp16 (GPUs "
        "without bf16; with a loss scaler).",
    )
    speed_paths: str = option(
        "auto",
        "How the model computes: auto (the device's measured profile, see vqadapt.speed), "
        "library (the library's path everywhere), or a comma-separated list of paths "
        "(packed_encoder, lean_decoder, absorbed_cross_attention, head_on_labels, "
        "fast_dropout, key_multiple=N, length_multiple=N).",
    )
    compile: bool = option(False, "torch.compile the model for training (inductor).")
    gradient_checkpointing: bool = option(
        False,
        "Recompute each layer's activations in the backward pass instead of keeping them "
        "(less memory, about a third more compute), in the towers of "
        "--gradient_checkpointing_towers; the gradients are the same.",
    )
    gradient_checkpointing_towers: str = option(
        "all",
        "Towers whose layers --gradient_checkpointing recomputes: all, or a comma-separated "
        "list of vision, text_encoder, text_decoder.",
    )
    report_to: str = option(
        "tensorboard",
        "Experiment trackers (accelerate's tracking API), comma-separated: tensorboard "
        "(run_dir/tensorboard/), wandb, mlflow (optional packages: pip install "
        "'vqadapt[wandb]' or 'vqadapt[mlflow]'), or none.",
    )
    ddp_timeout: int = option(
        1800, "Seconds a process waits at a collective before giving up (DDP).", TIMEOUT_RANGE
    )
    log_every: int = option(20, "Steps between tracker points (loss, gradient norm, lr).", POSITIVE)
    progress: bool = option(True, "Show progress bars.")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.resume and self.overwrite:
            raise VQAConfigError("--resume and --overwrite contradict each other")
        # The grammar of --speed_paths lives with the paths; vqadapt.speed imports torch, so
        # it is imported here, when a config is built, never for --help.
        from vqadapt.speed import SpeedPaths

        SpeedPaths.parse(self.speed_paths, "cpu")
        from vqadapt import menu

        menu.parse_names(
            self.gradient_checkpointing_towers, menu.CHECKPOINTABLE, "gradient_checkpointing_towers"
        )
        menu.parse_names(self.report_to, menu.TRACKERS, "report_to", none_ok=True)


CONFIG_CLASSES = (DataConfig, ModelConfig, AdaptConfig, TrainConfig)
SECTION_NAMES = ("data", "model", "adapt", "train")


@dataclass
class RunConfig:
    """The whole tree of one run; each section is valid on its own, and this checks what
    spans sections."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.model.blind and self.adapt.use_vision_lora:
            raise VQAConfigError("--use_vision_lora needs a vision tower, but --blind removes it")
        if self.model.blind:
            from vqadapt import menu

            choices = menu.resolve(self.adapt)
            for tower, default in (("vision", "frozen"), ("projector", "full")):
                if str(choices[tower]) != default:
                    flag = menu.TOWER_FLAGS[tower]
                    raise VQAConfigError(
                        f"--{flag} {choices[tower]} needs a vision tower, but --blind removes it"
                    )
            if choices["text_encoder"].frozen and choices["text_decoder"].frozen:
                raise VQAConfigError(
                    "nothing would train: --blind has no vision tower or projector, and the "
                    "text encoder and decoder are frozen"
                )

    def validate(self) -> None:
        """Check again what construction checked.

        The dataclasses are mutable and some callers change a built config (the ablation
        runner sets ``resume``/``overwrite`` per cell, ``vqadapt eval`` its ``num_beams``, a
        notebook anything); ``train``, the library's entry point, re-checks before it claims a
        run directory."""
        for name in SECTION_NAMES:
            getattr(self, name).__post_init__()
        self.__post_init__()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTION_NAMES}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str | Path | None = None) -> RunConfig:
        """Build from a sectioned dict (``{"train": {...}}``) or a flat one (``{"lr": ...}``).

        ``source`` (a file) is named in every error message."""
        flat = check_settings(flatten_config(values), source)
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTION_NAMES}
        owner = field_owner()
        for key, value in flat.items():
            sections[owner[key]][key] = value
        try:
            built = {
                name: klass(**sections[name])
                for name, klass in zip(SECTION_NAMES, CONFIG_CLASSES, strict=True)
            }
            return cls(**built)
        except VQAConfigError as err:
            if source is None:
                raise
            raise VQAConfigError(f"{source}: {err}") from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True))

    @classmethod
    def load(cls, path: str | Path, complete: bool = False) -> RunConfig:
        """Read a settings file; with ``complete`` (a run's own config.yaml, which ``save``
        writes whole) every setting must be there: a missing one means a damaged file, and
        filling it with its default would resume or evaluate another run than was trained."""
        values = load_yaml(path)
        config = cls.from_dict(values, source=path)  # a wrong value is named first
        missing = sorted(set(settings()) - set(flatten_config(values))) if complete else []
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise VQAConfigError(
                f"{path}: damaged, or written by an older vqadapt: {len(missing)} settings "
                f"missing ({shown})"
            )
        return config


@functools.cache
def settings() -> dict[str, Setting]:
    """Every field of the tree, by name (the names are unique across sections)."""
    return settings_of(CONFIG_CLASSES)


def check_setting(name: str, value: Any, label: str | None = None, from_text: bool = False) -> Any:
    """``value`` checked and converted for the field ``name`` (see ``Setting.check``)."""
    return settings()[name].check(value, label, from_text)


def check_settings(
    values: Mapping[str, Any], source: str | Path | None = None, from_text: bool = False
) -> dict[str, Any]:
    """Check every name and value of a flat mapping of settings; returns them converted.

    One ``VQAConfigError`` lists every problem. ``source`` (a file, a preset) prefixes each
    setting's name in the messages; ``from_text`` means command-line flags (``--name``)."""
    known = settings()
    out, problems = {}, []
    for name, value in values.items():
        label = f"--{name}" if from_text else f"{source}: {name}" if source else name
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"{source}: " if source is not None else ""
            problems.append(f"{where}unknown setting {name!r}{guess}")
            continue
        try:
            out[name] = check_setting(name, value, label, from_text)
        except VQAConfigError as err:
            problems.append(str(err))
    raise_problems(problems)
    return out


def check_fields(section: Any) -> None:
    """Check and convert every field of a section in place (its ``__post_init__``)."""
    problems = []
    for f in dataclasses.fields(section):
        try:
            setattr(section, f.name, check_setting(f.name, getattr(section, f.name)))
        except VQAConfigError as err:
            problems.append(str(err))
    raise_problems(problems)


# -- files ----------------------------------------------------------------------------------------
def field_owner() -> dict[str, str]:
    """Map each flag name to its section."""
    return {
        f.name: section
        for section, klass in zip(SECTION_NAMES, CONFIG_CLASSES, strict=True)
        for f in dataclasses.fields(klass)
    }


def flatten_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Accept both ``{"train": {"lr": 1}}`` and ``{"lr": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTION_NAMES and (value is None or isinstance(value, dict)):
            flat.update(value or {})
        else:
            flat[key] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file holding a mapping (or nothing); a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise VQAConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise VQAConfigError(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise VQAConfigError(f"{path}: not UTF-8 text ({err.reason})") from err
    if not isinstance(values, dict):
        raise VQAConfigError(f"{path}: expected a mapping of settings")
    empty = [key for key in SECTION_NAMES if key in values and values[key] is None]
    if empty:  # a cut-off file reads like this: never run on defaults in its place
        raise VQAConfigError(
            f"{path}: section {empty[0]!r} holds no settings (a truncated file?): give it its "
            "settings or remove the line"
        )
    return values


# -- the command line ------------------------------------------------------------------------------
def run_config_parser(
    prog: str = "vqadapt train", description: str | None = None
) -> argparse.ArgumentParser:
    """The flags of ``vqadapt train`` (and ``plan``): one per field, grouped by section.

    The conventions are those of transformers' ``HfArgumentParser`` (which this replaces: it
    took 1.4 s to import): ``--name`` and ``--name-with-dashes``; a boolean as ``--flag``,
    ``--flag false`` or, when it defaults to true, ``--no_flag``; choices listed in the help.
    Values stay text here and are checked by ``Setting.check`` (one checker for flags and files).
    """
    usage = f"{prog} [--config FILE.yaml] [--SETTING VALUE ...] (every setting below)"
    parser = ErrorRaisingParser(prog=prog, usage=usage, description=description)
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of settings (flat, or in data/model/adapt/train sections); flags "
        "given with it override its values",
    )
    for section, klass in zip(SECTION_NAMES, CONFIG_CLASSES, strict=True):
        group = parser.add_argument_group(section, (klass.__doc__ or "").split("\n")[0])
        for f in dataclasses.fields(klass):
            add_flag(group, f, settings()[f.name])
    return parser


def parse_run_config(argv: list[str]) -> RunConfig:
    """Parse ``vqadapt train`` style flags, ``--config FILE.yaml`` layered under them
    (``--help`` prints the flags and exits)."""
    args, extra = run_config_parser().parse_known_args(argv)
    if extra:
        raise VQAConfigError(f"unrecognised arguments: {' '.join(extra)}")
    return config_from_args(args)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The config of a namespace from ``run_config_parser`` (which may hold more flags, e.g.
    ``plan --rank_table``): the defaults, under the ``--config`` file, under the flags given."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(check_settings(flatten_config(load_yaml(args.config)), args.config))
    given = {name: value for name, value in vars(args).items() if name in settings()}
    values.update(check_settings(given, from_text=True))
    return RunConfig.from_dict(values)

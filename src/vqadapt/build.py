"""Assemble a run: backbones, model, adaptation, data, caches (shared by train / eval / predict / plan)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vqadapt import menu, speed
from vqadapt.adapt import AdaptationPlan, apply_adaptation
from vqadapt.backbones import (
    ImagePreprocessing,
    load_image_preprocessing,
    load_text,
    load_tokenizer,
    load_vision,
)
from vqadapt.cache import cache_key, keep_on_device, make_caches, plan_caches
from vqadapt.config import RunConfig
from vqadapt.data.images import ImageIndex
from vqadapt.data.pipeline import (
    Collator,
    Encoded,
    FeatureSources,
    ImageStore,
    Splits,
    encode_split,
    load_splits,
    resolve_data_files,
)
from vqadapt.errors import VQADataError
from vqadapt.memory import ActivationShapes
from vqadapt.model import VQAModel
from vqadapt.runtime import Runtime
from vqadapt.speed import SpeedPaths

Log = Callable[[str], None]


@dataclass
class Backbones:
    vision: str | None
    text: str
    embedded_data: Path | None


def resolve_backbones(config: RunConfig, log: Log) -> Backbones:
    """Hub ids / folders from the settings, or the embedded tiny ones (built on first use)."""
    from vqadapt import embedded

    vision, text = config.model.vision_model, config.model.text_model
    if (vision is None and not config.model.blind) or text is None:
        tiny = embedded.ensure_tiny_backbones(log=log)
        vision = vision or str(tiny["vision"])
        text = text or str(tiny["text"])
    data = embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
    return Backbones(None if config.model.blind else vision, text, data)


def build_model(
    config: RunConfig, backbones: Backbones, device: torch.device | str = "cpu"
) -> tuple[VQAModel, AdaptationPlan, object, ImagePreprocessing | None]:
    """Load the towers, assemble the model, decide what trains (seeded, so reproducible),
    install the device's speed paths and move the model there."""
    check_adaptation(config, backbones)
    torch.manual_seed(config.train.seed)
    remote = config.model.trust_remote_code
    text = load_text(backbones.text, remote)
    tokenizer = load_tokenizer(backbones.text, remote)
    vision = load_vision(backbones.vision, remote) if backbones.vision else None
    preprocessing = load_image_preprocessing(backbones.vision) if backbones.vision else None
    model = VQAModel(vision, text, dropout=config.train.dropout)
    t = config.train
    if t.gradient_checkpointing:
        towers = menu.parse_names(
            t.gradient_checkpointing_towers, menu.CHECKPOINTABLE, "gradient_checkpointing_towers"
        )
        model.set_gradient_checkpointing(towers)
    shapes = ActivationShapes.for_model(
        model,
        batch=t.batch_size,
        question_tokens=config.data.max_question_tokens,
        answer_tokens=config.data.max_answer_tokens,
        image_size=preprocessing.crop if preprocessing else None,
        precision=activation_precision(t.mixed_precision, torch.device(device)),
    )
    plan = apply_adaptation(model, config.adapt, blind=config.model.blind, shapes=shapes)
    speed.install(model, SpeedPaths.parse(t.speed_paths, device))
    return model.to(device), plan, tokenizer, preprocessing


def activation_precision(setting: str, device: torch.device) -> str:
    """The precision activations take under ``--mixed_precision setting`` on ``device`` (auto:
    bf16 on a CUDA GPU that supports it, else fp32), for the plan's memory estimate."""
    if setting != "auto":
        return setting
    cuda = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda else "no"


def _stat_list(folder: Path) -> list[tuple[str, int, int]]:
    import os

    out = []
    for base, _, names in os.walk(folder):
        for name in names:
            stat = os.stat(os.path.join(base, name))
            out.append(
                (os.path.relpath(os.path.join(base, name), folder), stat.st_size, stat.st_mtime_ns)
            )
    return sorted(out)


def validate_data(config: RunConfig, embedded_data: Path | None, log: Log) -> list[str]:
    """Check the whole data set before any model loads (every problem at once).

    Raises ``VQADataError`` with the full report when there are errors; returns the image
    references to skip (``--on_bad_image skip``). A passing check is remembered under the cache
    folder, keyed by the files' sizes and times, so an unchanged data set is not re-read.
    """
    import json

    from vqadapt.data.check import check_dataset
    from vqadapt.embedded import cache_root

    files = resolve_data_files(config.data, embedded_data)
    image_root = None if config.model.blind else files["image_root"]
    stats = {
        name: (path, Path(path).stat().st_size, Path(path).stat().st_mtime_ns)
        for name, path in files.items()
        if path and name != "image_root" and Path(path).is_file()
    }
    key = cache_key(
        files=stats,
        image_root=image_root,
        on_bad_image=config.data.on_bad_image,
        images=_stat_list(Path(image_root)) if image_root and Path(image_root).is_dir() else None,
        fmt=config.data.data_format,
        language=config.data.language,
        weights=config.train.answer_weights,
    )
    memo = cache_root() / "checks" / f"{key}.json"
    if memo.is_file():
        try:  # a damaged memo (truncated, zeroed, foreign) is only a reason to check again
            skipped = json.loads(memo.read_text(encoding="utf-8"))["skipped_images"]
            if isinstance(skipped, list) and all(isinstance(ref, str) for ref in skipped):
                return skipped
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            pass
    report = check_dataset(
        files["train"],
        files["test"],
        files["val"],
        image_root,
        config.data.data_format,
        config.data.language,
        config.data.on_bad_image,
        answer_weights=config.train.answer_weights,
    )
    if not report.ok:
        raise VQADataError(
            "the data check found problems (nothing was trained):\n" + report.format()
        )
    if report.warnings:
        log(report.format(max_per_kind=5))
    from vqadapt.io import atomic_write_json

    try:
        atomic_write_json(memo, {"skipped_images": report.skipped_images})
    except OSError as err:  # only a memo: the check ran, the run goes on
        if memo.is_dir():
            log(f"could not remember the data check in {memo} ({err.strerror})")
        else:
            raise
    return report.skipped_images


def check_adaptation(config: RunConfig, backbones: Backbones) -> None:
    """Check every tower choice against the towers' config.json (layer counts, LoRA layers and
    targets) before any weight loads: the model is assembled on the meta device (shapes only,
    no memory, no weights) and ``adapt.check_choices`` looks at it."""
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    from vqadapt.adapt import check_choices
    from vqadapt.backbones import load_config, loading

    remote = config.model.trust_remote_code
    text_config = load_config(backbones.text, "text model", remote)
    vision_config = None
    if backbones.vision:
        vision_config = load_config(backbones.vision, "vision model", remote)
        vision_config = getattr(vision_config, "vision_config", vision_config)
    with torch.device("meta"):
        with loading(backbones.text, "text model"):
            text = AutoModelForSeq2SeqLM.from_config(text_config, trust_remote_code=remote)
        vision = None
        if vision_config is not None:
            with loading(backbones.vision, "vision model"):
                vision = AutoModel.from_config(vision_config, trust_remote_code=remote)
        model = VQAModel(vision, text)
    check_choices(model, config.adapt, menu.resolve(config.adapt))


@dataclass
class DataBundle:
    splits: Splits
    encoded: dict[str, Encoded]
    images: ImageStore
    features: FeatureSources
    collators: dict[str, Collator]

    def loader(
        self, split: str, batches: Sequence[list[int]], *, device: torch.device | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``split`` given as lists of indices (``train.epoch_batches``), in that
        order: host tensors (pinned when ``device`` is an accelerator) plus cached rows, gathered
        on the device when a cache is held there. Prepared ahead by worker processes when
        images are decoded."""
        return self.collators[split].loader(batches, device=device)


def build_data(
    config: RunConfig,
    model: VQAModel,
    tokenizer,
    preprocessing,
    backbones: Backbones,
    answer_weight=None,
    log: Log = print,
    splits: Splits | None = None,
    runtime: Runtime | None = None,
    *,
    resident: bool | None = None,
    shard_items: int | None = None,
    workers: int | None = None,
) -> DataBundle:
    """Tokenised splits, image slots, the frozen-feature caches (built when missing) and a
    collator per split.

    The model is already on the runtime's device; the frozen towers run there, under the
    runtime's precision (default: fp32 on the model's device, one process). Under several
    processes each builds its share of the cache shards, then every process reads them all
    (a collective: every process calls this). ``resident`` forces holding the caches on the
    device (default: when they fit; on the CPU, within ``stream.HOST_HOLD_BYTES``); the crops
    of a run that decodes images are held within that budget too. ``shard_items`` fixes the
    items per shard (default: about 64 MB per shard); ``workers`` the decoding processes per
    stream (default: one per spare core).
    """
    runtime = runtime or Runtime(next(model.parameters()).device, "no")
    splits = splits or load_splits(config.data, backbones.embedded_data)
    blind = model.vision is None
    index = None
    if not blind:
        if splits.image_root is None:
            raise VQADataError("an image model needs --image_root (or pass --blind)")
        index = ImageIndex(splits.image_root)
    images = ImageStore(index, preprocessing)
    encoded = {}
    for name in ("train", "val", "test"):
        records = getattr(splits, name)
        weight = answer_weight if name == "train" else None
        encoded[name] = encode_split(records, tokenizer, config.data, images.slot, weight)
        if encoded[name].truncated_questions:
            log(
                f"{name}: {encoded[name].truncated_questions} questions truncated to "
                f"{config.data.max_question_tokens} tokens"
            )
    features = FeatureSources()
    if config.train.cache:
        from vqadapt.embedded import cache_root

        jobs = plan_caches(
            model,
            tokenizer,
            preprocessing,
            images.paths,
            encoded,
            runtime,
            cache_root() / "features",
            log,
            shard_items=shard_items,
            workers=workers,
        )
        readers = make_caches(jobs, runtime, log)
        features = FeatureSources(
            vision_features=readers.get("vision"),
            vision_embeddings=readers.get("vision_embeddings"),
            text_prefix={
                name.split(":", 1)[1]: reader
                for name, reader in readers.items()
                if name.startswith("text_prefix:")
            },
        )
        keep_on_device(features.readers(), runtime.device, log, resident)
    decodes = not blind and features.vision_features is None and features.vision_embeddings is None
    if decodes and images.hold(workers=workers):
        log(f"{len(images.paths)} image crops held in memory (decoded once)")
    pad = tokenizer.pad_token_id
    start = model.decoder_start_token_id
    multiple = model.speed_paths.length_multiple
    collators = {
        name: Collator(
            name, enc, pad, start, images, preprocessing, features, blind, multiple, workers
        )
        for name, enc in encoded.items()
    }
    return DataBundle(splits, encoded, images, features, collators)

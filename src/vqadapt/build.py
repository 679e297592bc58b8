"""Assemble a run: backbones, model, adaptation, data, caches (shared by train / eval / predict / plan)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vqadapt.adapt import AdaptationPlan, apply_adaptation
from vqadapt.backbones import (
    ImagePreprocessing,
    load_image_preprocessing,
    load_text,
    load_tokenizer,
    load_vision,
)
from vqadapt.cache import Precision, Ranks, cache_key, keep_on_device, make_caches, plan_caches
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
from vqadapt.model import VQAModel

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
    config: RunConfig, backbones: Backbones
) -> tuple[VQAModel, AdaptationPlan, object, ImagePreprocessing | None]:
    """Load the towers, assemble the model and decide what trains (seeded, so reproducible)."""
    check_adaptation(config, backbones)
    torch.manual_seed(config.train.seed)
    remote = config.model.trust_remote_code
    text = load_text(backbones.text, remote)
    tokenizer = load_tokenizer(backbones.text, remote)
    vision = load_vision(backbones.vision, remote) if backbones.vision else None
    preprocessing = load_image_preprocessing(backbones.vision) if backbones.vision else None
    model = VQAModel(vision, text, dropout=config.train.dropout)
    plan = apply_adaptation(model, config.adapt, blind=config.model.blind)
    return model, plan, tokenizer, preprocessing


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
        return json.loads(memo.read_text(encoding="utf-8"))["skipped_images"]
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

    atomic_write_json(memo, {"skipped_images": report.skipped_images})
    return report.skipped_images


def check_adaptation(config: RunConfig, backbones: Backbones) -> None:
    """Check layer counts and LoRA targets against the towers' config.json, before any weight
    loads: the towers are built on the meta device (shapes only, no memory, no weights)."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    from vqadapt.backbones import (
        check_source,
        get_submodule,
        resolve_targets,
        text_layout,
        vision_layout,
    )
    from vqadapt.errors import VQAConfigError

    adapt, remote = config.adapt, config.model.trust_remote_code
    check_source(backbones.text, "text model")
    with torch.device("meta"):
        text = AutoModelForSeq2SeqLM.from_config(
            AutoConfig.from_pretrained(backbones.text, trust_remote_code=remote)
        )
        layout = text_layout(text)
        if adapt.unfreeze_encoder_layers > layout.num_layers:
            raise VQAConfigError(
                f"--unfreeze_encoder_layers {adapt.unfreeze_encoder_layers} is out of range: the "
                f"text encoder has {layout.num_layers} layers"
            )
        if adapt.use_text_lora:
            first = get_submodule(text, layout.layers_path)[0]
            resolve_targets(adapt.text_lora_targets, layout, first)
        if adapt.use_vision_lora and backbones.vision:
            check_source(backbones.vision, "vision model")
            vision_config = AutoConfig.from_pretrained(backbones.vision, trust_remote_code=remote)
            vision_config = getattr(vision_config, "vision_config", vision_config)
            vision = AutoModel.from_config(vision_config)
            layout = vision_layout(vision)
            resolve_targets(
                adapt.vision_lora_targets, layout, get_submodule(vision, layout.layers_path)[0]
            )


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
    *,
    device: torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    resident: bool | None = None,
    shard_items: int | None = None,
    workers: int | None = None,
) -> DataBundle:
    """Tokenised splits, image slots, and the frozen-feature caches (built when missing).

    The model is already on ``device`` (default: its parameters' device); the frozen towers run
    there, under ``torch.autocast`` with ``compute_dtype`` when given. Under several processes
    (``rank`` of ``world``, meeting at ``barrier``) each builds its share of the cache shards,
    then every process reads them all. ``resident`` forces holding the caches on the device
    (default: when they fit); ``shard_items`` fixes the items per shard (default: about 64 MB
    per shard); ``workers`` the decoding processes per stream (default: one per spare core).
    """
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

        device = device if device is not None else next(model.parameters()).device
        jobs = plan_caches(
            model,
            tokenizer,
            preprocessing,
            images.paths,
            encoded,
            Precision(device, compute_dtype),
            cache_root() / "features",
            log,
            shard_items=shard_items,
            workers=workers,
        )
        ranks = Ranks(rank, world, barrier or (lambda: None))
        readers = make_caches(jobs, ranks, log)
        features = FeatureSources(
            vision_features=readers.get("vision"),
            vision_embeddings=readers.get("vision_embeddings"),
            text_prefix={
                name.split(":", 1)[1]: reader
                for name, reader in readers.items()
                if name.startswith("text_prefix:")
            },
        )
        keep_on_device(features.readers(), device, log, resident)
    pad = tokenizer.pad_token_id
    start = model.decoder_start_token_id
    collators = {
        name: Collator(name, enc, pad, start, images, preprocessing, features, blind, workers)
        for name, enc in encoded.items()
    }
    return DataBundle(splits, encoded, images, features, collators)

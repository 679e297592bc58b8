"""Assemble a run: backbones, model, adaptation, data, caches (shared by train / eval / predict / plan)."""

from __future__ import annotations

from collections.abc import Callable
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
from vqadapt.cache import (
    cache_key,
    cached_or_compute,
    pack,
    text_prefix_states,
    unpack,
    vision_features,
    weights_digest,
)
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
    torch.manual_seed(config.train.seed)
    remote = config.model.trust_remote_code
    text = load_text(backbones.text, remote)
    tokenizer = load_tokenizer(backbones.text, remote)
    vision = load_vision(backbones.vision, remote) if backbones.vision else None
    preprocessing = load_image_preprocessing(backbones.vision) if backbones.vision else None
    model = VQAModel(vision, text, dropout=config.train.dropout)
    plan = apply_adaptation(model, config.adapt, blind=config.model.blind)
    return model, plan, tokenizer, preprocessing


@dataclass
class DataBundle:
    splits: Splits
    encoded: dict[str, Encoded]
    images: ImageStore
    features: FeatureSources
    collators: dict[str, Collator]
    skipped: dict[str, int]


def build_data(
    config: RunConfig,
    model: VQAModel,
    tokenizer,
    preprocessing,
    backbones: Backbones,
    answer_weight=None,
    log: Log = print,
    splits: Splits | None = None,
) -> DataBundle:
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
        fill_caches(
            config, model, tokenizer, preprocessing, backbones, images, encoded, features, log
        )
    pad = tokenizer.pad_token_id
    start = model.decoder_start_token_id
    collators = {
        name: Collator(name, enc, pad, start, images, preprocessing, features, blind)
        for name, enc in encoded.items()
    }
    return DataBundle(splits, encoded, images, features, collators, {})


def fill_caches(
    config, model, tokenizer, preprocessing, backbones, images, encoded, features, log
) -> None:
    """Run the frozen parts once and keep their outputs (see cache.py)."""
    from vqadapt.embedded import cache_root

    folder = cache_root() / "features"
    if model.vision is not None and model.vision_frozen and images.paths:
        digest = weights_digest(model.vision)
        key = cache_key(
            kind="vision",
            weights=digest,
            preprocessing=preprocessing.to_dict(),
            images=[(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in images.paths],
        )
        log(f"vision tower frozen: caching features of {len(images.paths)} images")
        tensors = cached_or_compute(
            folder / f"vision-{key}.safetensors",
            key,
            lambda: {"features": vision_features(model, images.pixels(), preprocessing)},
            log,
        )
        features.vision_features = tensors["features"]
    layers = model.text_cache_layers
    if layers > 0 and (model.splittable or layers == model.text_layout.num_layers):
        encoder_digest = weights_digest(model.text_encoder)
        for name, enc in encoded.items():
            if not len(enc):
                continue
            key = cache_key(
                kind="text_prefix",
                weights=encoder_digest,
                layers=layers,
                inputs=[ids.tolist() for ids in enc.input_ids],
            )
            tensors = cached_or_compute(
                folder / f"text-{key}.safetensors",
                key,
                lambda enc=enc: pack(
                    text_prefix_states(model, enc.input_ids, tokenizer.pad_token_id)
                ),
                log,
            )
            features.text_prefix[name] = unpack(tensors)
        log(
            f"text encoder: first {layers} of {model.text_layout.num_layers} layers frozen, "
            "their output cached"
        )
    elif layers > 0:
        log(
            f"text prefix caching is not available for {model.text_layout.family}: running it every step"
        )

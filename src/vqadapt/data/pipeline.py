"""Records -> tokenised examples -> padded batches (with cached frozen features when present)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vqadapt.backbones import ImagePreprocessing
from vqadapt.config import DataConfig
from vqadapt.data.formats import load_records
from vqadapt.data.images import ImageIndex, load_image
from vqadapt.data.records import VQARecord
from vqadapt.data.splits import split_by_image
from vqadapt.errors import VQADataError
from vqadapt.speed import round_lengths

VAL_SPLIT_SEED = 0  # the validation split stays the same whatever the training seed


@dataclass
class Splits:
    train: list[VQARecord]
    val: list[VQARecord]
    test: list[VQARecord]
    image_root: Path | None
    sources: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def resolve_data_files(data: DataConfig, embedded_data: Path | None) -> dict[str, str | None]:
    """The annotation files and image root a run reads (the embedded set by default)."""
    if data.train_file is None:
        if embedded_data is None:
            raise VQADataError("no --train_file given and no embedded data set")
        return {
            "train": str(embedded_data / "train.csv"),
            "test": data.test_file or str(embedded_data / "test.csv"),
            "val": data.val_file,
            "image_root": data.image_root or str(embedded_data / "images"),
        }
    return {
        "train": data.train_file,
        "test": data.test_file,
        "val": data.val_file,
        "image_root": data.image_root,
    }


def load_splits(
    data: DataConfig, embedded_data: Path | None = None, skip_images: Sequence[str] = ()
) -> Splits:
    """Read train / val / test as the settings say (the embedded synthetic set by default).

    Questions about an image in ``skip_images`` (bad images, ``--on_bad_image skip``) are
    dropped; how many is in ``Splits.skipped``.
    """
    files = resolve_data_files(data, embedded_data)
    train_file, test_file, image_root = files["train"], files["test"], files["image_root"]
    fmt, language = data.data_format, data.language
    train = load_records(train_file, fmt, language)
    if data.val_file:
        val = load_records(data.val_file, fmt, language)
    else:
        train, val = split_by_image(train, data.val_fraction, seed=VAL_SPLIT_SEED)
    test = load_records(test_file, fmt, language) if test_file else []
    skipped = {}
    if skip_images:
        bad = set(skip_images)
        for name, records in (("train", train), ("val", val), ("test", test)):
            skipped[name] = sum(r.image in bad for r in records)
        train, val, test = ([r for r in rs if r.image not in bad] for rs in (train, val, test))
    if data.max_train_samples:
        train = train[: data.max_train_samples]
    if data.max_eval_samples:
        val, test = val[: data.max_eval_samples], test[: data.max_eval_samples]
    sources = {
        "train": str(train_file),
        "test": str(test_file),
        "val": data.val_file or "carved from train",
    }
    return Splits(train, val, test, Path(image_root) if image_root else None, sources, skipped)


@dataclass
class Encoded:
    """One split, tokenised: parallel lists."""

    records: list[VQARecord]
    input_ids: list[torch.Tensor]
    label_ids: list[torch.Tensor]
    image_slots: list[int]  # index into the image store, -1 when blind
    weights: torch.Tensor
    truncated_questions: int = 0
    truncated_answers: int = 0

    def __len__(self) -> int:
        return len(self.records)


def encode_split(
    records: Sequence[VQARecord],
    tokenizer,
    data: DataConfig,
    image_slot: Callable[[VQARecord], int],
    answer_weight: Callable[[str], float] | None = None,
) -> Encoded:
    if not records:  # a split may be absent (no --test_file); tokenizers fail on an empty batch
        return Encoded([], [], [], [], torch.zeros(0))
    questions = tokenizer([r.question for r in records], add_special_tokens=True)["input_ids"]
    answers = tokenizer([r.answer for r in records], add_special_tokens=True)["input_ids"]
    cut_q = sum(len(q) > data.max_question_tokens for q in questions)
    cut_a = sum(len(a) > data.max_answer_tokens for a in answers)
    eos = tokenizer.eos_token_id

    def clip(ids: list[int], limit: int) -> torch.Tensor:
        if len(ids) > limit:
            ids = [*ids[: limit - 1], eos]
        return torch.tensor(ids, dtype=torch.long)

    weights = [answer_weight(r.answer) if answer_weight else 1.0 for r in records]
    return Encoded(
        records=list(records),
        input_ids=[clip(q, data.max_question_tokens) for q in questions],
        label_ids=[clip(a, data.max_answer_tokens) for a in answers],
        image_slots=[image_slot(r) for r in records],
        weights=torch.tensor(weights, dtype=torch.float32),
        truncated_questions=cut_q,
        truncated_answers=cut_a,
    )


class ImageStore:
    """Decoded, resized, centre-cropped uint8 images, one slot per distinct image (decoded once)."""

    def __init__(self, index: ImageIndex | None, preprocessing: ImagePreprocessing | None) -> None:
        self.index = index
        self.preprocessing = preprocessing
        self.slots: dict[Path, int] = {}
        self.paths: list[Path] = []
        self._pixels: torch.Tensor | None = None

    def slot(self, record: VQARecord) -> int:
        if self.index is None or record.image is None:
            return -1
        path = self.index.resolve_strict(record.image)
        key = path.resolve()  # one slot per file, however it is referenced (a symlink too)
        if key not in self.slots:
            self.slots[key] = len(self.paths)
            self.paths.append(path)
        return self.slots[key]

    def pixels(self) -> torch.Tensor:
        """(N, 3, crop, crop) uint8 for every registered image."""
        if self._pixels is None or len(self._pixels) != len(self.paths):
            assert self.preprocessing is not None
            arrays = [self._prepare(path) for path in self.paths]
            self._pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        return self._pixels

    def _prepare(self, path: Path) -> np.ndarray:
        from PIL import Image

        prep = self.preprocessing
        image = load_image(path)
        width, height = image.size
        scale = prep.resize / min(width, height)
        size = (max(prep.crop, round(width * scale)), max(prep.crop, round(height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - prep.crop) // 2, (size[1] - prep.crop) // 2
        image = image.crop((left, top, left + prep.crop, top + prep.crop))
        return np.asarray(image, dtype=np.uint8)


@dataclass
class FeatureSources:
    """What a batch can take from caches instead of computing: filled in by ``cache.py``."""

    vision_features: torch.Tensor | None = None  # (num_images, tokens, hidden)
    vision_embeddings: torch.Tensor | None = None  # (num_images, tokens, hidden): vision LoRA
    text_prefix: dict[str, list[torch.Tensor]] = field(
        default_factory=dict
    )  # split -> per question


class Collator:
    """Indices of one split -> a padded batch dict for ``VQAModel``."""

    def __init__(
        self,
        split: str,
        encoded: Encoded,
        pad_id: int,
        start_id: int,
        images: ImageStore,
        preprocessing: ImagePreprocessing | None,
        features: FeatureSources,
        blind: bool,
        length_multiple: int = 1,
    ) -> None:
        self.split, self.encoded, self.pad_id, self.start_id = split, encoded, pad_id, start_id
        self.length_multiple = length_multiple  # static shape buckets (vqadapt.speed)
        self.images, self.preprocessing, self.features, self.blind = (
            images,
            preprocessing,
            features,
            blind,
        )

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        enc = self.encoded
        input_ids = pad_sequence(
            [enc.input_ids[i] for i in indices], batch_first=True, padding_value=self.pad_id
        )
        labels = pad_sequence(
            [enc.label_ids[i] for i in indices], batch_first=True, padding_value=-100
        )
        decoder_input_ids = torch.cat(
            [torch.full((len(indices), 1), self.start_id), labels[:, :-1].clamp(min=0)], dim=1
        )
        decoder_input_ids[:, 1:][labels[:, :-1] == -100] = self.pad_id
        batch = {
            "index": torch.tensor(indices),
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.pad_id).long(),
            "decoder_input_ids": decoder_input_ids,
            "labels": labels,
            "weights": enc.weights[indices],
        }
        prefix = self.features.text_prefix.get(self.split)
        if prefix is not None:
            batch["text_prefix"] = pad_sequence([prefix[i] for i in indices], batch_first=True)
        if not self.blind:
            slots = torch.tensor([enc.image_slots[i] for i in indices])
            if self.features.vision_features is not None:
                batch["vision_features"] = self.features.vision_features[slots]
            elif self.features.vision_embeddings is not None:
                batch["vision_embeddings"] = self.features.vision_embeddings[slots]
            else:
                batch["pixel_values"] = self.preprocessing.normalise(self.images.pixels()[slots])
        return round_lengths(batch, self.length_multiple, self.pad_id)

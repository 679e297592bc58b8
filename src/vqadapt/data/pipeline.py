"""Records -> tokenised examples -> padded batches (with cached frozen features when present).

Nothing here holds pixels or features of the whole set: images are decoded per batch and cached
rows are read per batch (``shard_reader.RowReader``), so memory follows the batch, not the data set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from vqadapt.backbones import ImagePreprocessing
from vqadapt.config import DataConfig
from vqadapt.data.formats import load_records
from vqadapt.data.images import ImageIndex
from vqadapt.data.records import VQARecord
from vqadapt.data.splits import sample_records, split_by_image
from vqadapt.data.stream import (
    HOST_HOLD_BYTES,
    PREFETCH,
    crops_tensor,
    default_workers,
    image_stream,
    is_accelerator,
    own_generator,
    prepare_crop,
)
from vqadapt.errors import VQADataError
from vqadapt.shard_reader import RowReader
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
        train = sample_records(train, data.max_train_samples, seed=data.train_sample_seed)
    if data.max_eval_samples:
        val, test = (sample_records(rs, data.max_eval_samples) for rs in (val, test))
    sources = {
        "train": str(train_file),
        "test": str(test_file),
        "val": data.val_file or "carved from train",
    }
    return Splits(train, val, test, Path(image_root) if image_root else None, sources, skipped)


class Ragged(Sequence[torch.Tensor]):
    """Token-id sequences of different lengths in one flat tensor: ``ragged[i]`` is a view of
    sequence ``i``. A list of small tensors costs about 1 kB per question in object overhead
    (and tokenising a whole split at once leaves the allocator fragmented); this costs the ids."""

    def __init__(self, sequences: Sequence[Sequence[int]] = ()) -> None:
        lengths = torch.tensor([len(ids) for ids in sequences], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.flat = torch.tensor([i for ids in sequences for i in ids], dtype=torch.long)

    @classmethod
    def join(cls, parts: Sequence[Ragged]) -> Ragged:
        """One ``Ragged`` holding the sequences of ``parts``, in order."""
        joined = cls()
        if parts:
            lengths = torch.cat([part.offsets.diff() for part in parts])
            joined.offsets = torch.cat([joined.offsets, lengths.cumsum(0)])
            joined.flat = torch.cat([part.flat for part in parts])
        return joined

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.flat[int(self.offsets[index]) : int(self.offsets[index + 1])]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> list[int]:
        return self.offsets.diff().tolist()


ENCODE_CHUNK = 4096  # questions tokenised at a time (bounds the tokenizer's Python lists)


@dataclass
class Encoded:
    """One split, tokenised: parallel sequences."""

    records: list[VQARecord]
    input_ids: Ragged
    label_ids: Ragged
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
    eos = tokenizer.eos_token_id

    def clip(ids: list[int], limit: int) -> list[int]:
        return [*ids[: limit - 1], eos] if len(ids) > limit else ids

    questions, answers, cut_q, cut_a = [], [], 0, 0
    for start in range(0, len(records), ENCODE_CHUNK):
        chunk = records[start : start + ENCODE_CHUNK]
        q_ids = tokenizer([r.question for r in chunk], add_special_tokens=True)["input_ids"]
        a_ids = tokenizer([r.answer for r in chunk], add_special_tokens=True)["input_ids"]
        cut_q += sum(len(q) > data.max_question_tokens for q in q_ids)
        cut_a += sum(len(a) > data.max_answer_tokens for a in a_ids)
        questions.append(Ragged([clip(q, data.max_question_tokens) for q in q_ids]))
        answers.append(Ragged([clip(a, data.max_answer_tokens) for a in a_ids]))
    weights = [answer_weight(r.answer) if answer_weight else 1.0 for r in records]
    return Encoded(
        records=list(records),
        input_ids=Ragged.join(questions),
        label_ids=Ragged.join(answers),
        image_slots=[image_slot(r) for r in records],
        weights=torch.tensor(weights, dtype=torch.float32),
        truncated_questions=cut_q,
        truncated_answers=cut_a,
    )


class ImageStore:
    """The distinct images of a run, one slot each; crops are decoded when asked for, never
    all held in memory (``stream.image_stream`` decodes many in worker processes), unless
    all of them fit in ``HOST_HOLD_BYTES`` (``hold``)."""

    def __init__(self, index: ImageIndex | None, preprocessing: ImagePreprocessing | None) -> None:
        self.index = index
        self.preprocessing = preprocessing
        self.slots: dict[Path, int] = {}
        self.paths: list[Path] = []
        self.held: torch.Tensor | None = None  # (N, 3, crop, crop) uint8, after ``hold``

    def hold(self, budget: int = HOST_HOLD_BYTES, workers: int | None = None) -> bool:
        """Decode every crop once, in parallel, and keep them when they fit in ``budget``
        bytes: a batch then indexes them instead of decoding."""
        if self.preprocessing is None or not self.paths:
            return False
        crop = self.preprocessing.crop
        if len(self.paths) * 3 * crop * crop > budget:
            return False
        slots = list(range(len(self.paths)))
        stream = image_stream(
            self.paths, self.preprocessing, slots, batch_size=256, device=None, workers=workers
        )
        self.held = torch.cat(list(stream))
        return True

    def slot(self, record: VQARecord) -> int:
        if self.index is None or record.image is None:
            return -1
        path = self.index.resolve_strict(record.image)
        key = path.resolve()  # one slot per file, however it is referenced (a symlink too)
        if key not in self.slots:
            self.slots[key] = len(self.paths)
            self.paths.append(path)
        return self.slots[key]

    def crops(self, slots: Sequence[int]) -> torch.Tensor:
        """(B, 3, crop, crop) uint8 of the images ``slots`` (each distinct one decoded once)."""
        assert self.preprocessing is not None
        if self.held is not None:
            return self.held[list(slots)]
        decoded = {slot: prepare_crop(self.paths[slot], self.preprocessing) for slot in set(slots)}
        return crops_tensor([decoded[slot] for slot in slots])


@dataclass
class FeatureSources:
    """What a batch can take from caches instead of computing: filled in by ``cache.py``.

    Each is a ``RowReader``: rows read from disk per batch, or gathered on the device when the
    cache is held there (``keep_on``)."""

    vision_features: RowReader | None = None  # per image: (tokens, hidden)
    vision_embeddings: RowReader | None = None  # per image: (tokens, hidden), vision LoRA
    text_prefix: dict[str, RowReader] = field(default_factory=dict)  # split -> per question

    def readers(self) -> list[RowReader]:
        found = [self.vision_features, self.vision_embeddings, *self.text_prefix.values()]
        return [reader for reader in found if reader is not None]


class Collator:
    """Indices of one split -> a padded batch dict for ``VQAModel``.

    ``collator(indices)`` makes one batch in this process (decoding its images, reading its
    cached rows); ``collator.loader(batches, device=...)`` streams many, prepared ahead by
    worker processes when images are decoded.
    """

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
        workers: int | None = None,
    ) -> None:
        self.split, self.encoded, self.pad_id, self.start_id = split, encoded, pad_id, start_id
        self.length_multiple = length_multiple  # static shape buckets (vqadapt.speed)
        self.images, self.preprocessing, self.features, self.blind = (
            images,
            preprocessing,
            features,
            blind,
        )
        self.workers = default_workers(self.decodes_images) if workers is None else workers
        self._stream: DataLoader | None = None
        self._stream_pinned = False
        self._sampler = _Batches()

    @property
    def decodes_images(self) -> bool:
        """Whether a batch needs its images decoded (no cached vision rows, no crops held)."""
        return (
            not self.blind
            and self.images.held is None
            and self.features.vision_features is None
            and self.features.vision_embeddings is None
        )

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}  # a DataLoader does not pickle

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self._complete(self.host_batch(indices), indices)

    def loader(
        self, batches: Sequence[list[int]], *, device: torch.device | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``batches`` (lists of indices), in that order: host tensors (pinned
        when ``device`` is an accelerator) plus the rows of caches held on a device, gathered
        there. Worker processes (persistent over calls) prepare them ahead."""
        pinned = is_accelerator(device)
        if self._stream is None or self._stream_pinned != pinned:
            self._stream = DataLoader(
                _HostBatches(self),
                batch_size=None,
                sampler=self._sampler,
                num_workers=self.workers,
                pin_memory=pinned,
                prefetch_factor=PREFETCH if self.workers else None,
                persistent_workers=self.workers > 0,
                generator=own_generator(),
            )
            self._stream_pinned = pinned
        self._sampler.batches = [list(indices) for indices in batches]
        for indices, batch in zip(self._sampler.batches, self._stream, strict=True):
            yield self._complete(batch, indices)

    def host_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Everything of the batch that is prepared on the host (all but device-held rows)."""
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
        if prefix is not None and prefix.resident is None:
            batch["text_prefix"] = prefix.read_padded(indices).float()
        if not self.blind:
            slots = [enc.image_slots[i] for i in indices]
            vision, name = self._vision_reader()
            if vision is None:
                pixels = self.images.crops(slots)
                batch["pixel_values"] = self.preprocessing.normalise(pixels)
            elif vision.resident is None:
                batch[name] = vision.read_padded(slots)[:, 0].float()
        return batch

    def _vision_reader(self) -> tuple[RowReader | None, str]:
        if self.features.vision_features is not None:
            return self.features.vision_features, "vision_features"
        return self.features.vision_embeddings, "vision_embeddings"

    def _complete(self, batch: dict[str, torch.Tensor], indices: list[int]) -> dict:
        """The host part plus the rows of device-held caches, lengths rounded up to the speed
        paths' multiple (static shape buckets, ``vqadapt.speed``)."""
        self._add_resident_rows(batch, indices)
        return round_lengths(batch, self.length_multiple, self.pad_id)

    def _add_resident_rows(self, batch: dict[str, torch.Tensor], indices: list[int]) -> None:
        prefix = self.features.text_prefix.get(self.split)
        if prefix is not None and prefix.resident is not None:
            batch["text_prefix"] = prefix.gather_padded(indices).float()
        vision, name = self._vision_reader()
        if not self.blind and vision is not None and vision.resident is not None:
            slots = [self.encoded.image_slots[i] for i in indices]
            batch[name] = vision.gather_padded(slots)[:, 0].float()


class _Batches(Sampler):
    """The current call's batches (lists of indices): the DataLoader's sampler, so that its
    persistent workers serve every call."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _HostBatches(Dataset):
    """``dataset[indices]`` is the host part of that batch (run in the DataLoader's workers)."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return self.collator.host_batch(indices)

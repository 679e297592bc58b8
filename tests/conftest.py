"""Shared fixtures: a small synthetic data set, tiny pretrained backbones, tiny random models.

Nothing is downloaded. The session builds (once, ~10 s) a 400-question synthetic set and the
project's own tiny backbones (``tiny.build_tiny_backbones``: a 12-layer MBart, d_model 128,
and a 6-layer DINOv2); ``$VQADAPT_CACHE`` points into the session's temporary folder so that
feature caches never touch the working tree.

Pretraining runs a fixed number of steps (``PRETRAIN_STEPS`` here) and everything else is
seeded, so the backbones are bit-identical in every session and golden values
(``test_train.py``) can be pinned.

Unit tests that need no tokenizer or images use ``make_tiny_model``: towers built from
random-init configs in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vqadapt.build import Backbones
from vqadapt.config import RunConfig, parse_run_config
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.synth import generate
from vqadapt.model import VQAModel
from vqadapt.tiny import build_tiny_backbones

# The models here are tiny: one thread is several times faster than two fighting over two
# cores with whatever else runs on the machine, and it keeps results reproducible.
torch.set_num_threads(1)

SYNTH_QUESTIONS = 400
PRETRAIN_STEPS = 7  # pretraining steps of each tower

# Random-init towers for unit tests. The widths differ on purpose (vision 24, text 16,
# encoder FFN 24, decoder FFN 40) so that a count mixing them up cannot pass by accident.
TINY_MBART = dict(
    vocab_size=48,
    d_model=16,
    encoder_layers=12,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=24,
    decoder_ffn_dim=40,
    max_position_embeddings=32,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=2,
)
TINY_T5 = dict(
    vocab_size=48,
    d_model=16,
    d_kv=4,
    d_ff=24,
    num_layers=4,
    num_decoder_layers=2,
    num_heads=2,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
TINY_DINO = dict(
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_ratio=2,
    image_size=28,
    patch_size=14,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``cuda``-marked tests run where CUDA exists and are skipped elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.sh runs these on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@dataclass(frozen=True)
class VQAEnv:
    """Where the session's data, backbones and caches live, and how to point a run at them."""

    root: Path
    data: Path
    vision: Path
    text: Path
    cache: Path

    def data_flags(self) -> list[str]:
        """The data and backbone flags of ``vqadapt train`` / ``plan``."""
        return [
            "--train_file",
            str(self.data / "train.csv"),
            "--test_file",
            str(self.data / "test.csv"),
            "--image_root",
            str(self.data / "images"),
            "--vision_model",
            str(self.vision),
            "--text_model",
            str(self.text),
        ]

    def argv(self, output_dir: str | Path, *extra: str) -> list[str]:
        """A small run's flags; ``extra`` comes last, so it overrides (argparse: last wins)."""
        return [
            *self.data_flags(),
            "--output_dir",
            str(output_dir),
            "--epochs",
            "1",
            "--batch_size",
            "16",
            "--max_train_samples",
            "64",
            "--max_eval_samples",
            "32",
            "--no_progress",
            *extra,
        ]

    def config(self, output_dir: str | Path, *extra: str) -> RunConfig:
        return parse_run_config(self.argv(output_dir, *extra))

    def backbones(self) -> Backbones:
        return Backbones(str(self.vision), str(self.text), None)


@pytest.fixture(scope="session")
def vqa_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VQAEnv]:
    root = tmp_path_factory.mktemp("vqadapt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQADAPT_CACHE", str(root / "cache"))
        data = root / "data"
        generate(data, n=SYNTH_QUESTIONS, seed=0)
        texts = [
            text
            for record in load_vivqa_csv(data / "train.csv")
            for text in (record.question, *record.answers)
        ]
        paths = build_tiny_backbones(
            root / "backbones", texts, text_steps=PRETRAIN_STEPS, vision_steps=PRETRAIN_STEPS
        )
        yield VQAEnv(root, data, paths["vision"], paths["text"], root / "cache")


def tiny_text_model(family: str = "mbart", encoder_layers: int | None = None, **overrides):
    """A random-init seq2seq model (MBart or T5) from the tiny configs above."""
    from transformers import (
        MBartConfig,
        MBartForConditionalGeneration,
        T5Config,
        T5ForConditionalGeneration,
    )

    if family == "mbart":
        values = {**TINY_MBART, **overrides}
        if encoder_layers is not None:
            values["encoder_layers"] = encoder_layers
        return MBartForConditionalGeneration(MBartConfig(**values))
    if family == "t5":
        values = {**TINY_T5, **overrides}
        if encoder_layers is not None:
            values["num_layers"] = encoder_layers
        return T5ForConditionalGeneration(T5Config(**values))
    raise ValueError(family)


def tiny_vision_model():
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(**TINY_DINO))


MakeModel = Callable[..., VQAModel]


@pytest.fixture
def make_tiny_model() -> MakeModel:
    """``make_tiny_model(family="mbart", encoder_layers=12, blind=False, seed=0, speed="cpu",
    **config)``: ``speed`` is the speed-path profile installed (``"library"`` for none)."""

    def make(
        family: str = "mbart",
        encoder_layers: int | None = None,
        blind: bool = False,
        seed: int = 0,
        dropout: float = 0.1,
        speed: str = "cpu",
        **overrides,
    ) -> VQAModel:
        from vqadapt import speed as speed_paths

        torch.manual_seed(seed)
        vision = None if blind else tiny_vision_model()
        text = tiny_text_model(family, encoder_layers, **overrides)
        model = VQAModel(vision, text, dropout=dropout)
        paths = speed_paths.SpeedPaths.library() if speed == "library" else None
        speed_paths.install(model, paths or speed_paths.SpeedPaths.for_device(speed))
        return model

    return make


def tiny_batch(model: VQAModel, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded random batch for a tiny model (questions of different lengths, one label
    padded with -100)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.text.config
    pad = config.pad_token_id
    lengths = [7, 5, 3, 6][:batch_size]
    low = 3  # above the special ids of both families
    input_ids = torch.full((batch_size, max(lengths)), pad)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(
            low, config.vocab_size, (length,), generator=generator
        )
    labels = torch.randint(low, config.vocab_size, (batch_size, 4), generator=generator)
    labels[0, -1] = -100
    start = torch.full((batch_size, 1), model.decoder_start_token_id)
    decoder_input_ids = torch.cat([start, labels[:, :-1].clamp(min=0)], dim=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": (input_ids != pad).long(),
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "weights": torch.ones(batch_size),
    }
    if model.vision is not None:
        size = model.vision.config.image_size
        batch["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=generator)
    return batch


@pytest.fixture
def make_batch() -> Callable[..., dict[str, torch.Tensor]]:
    """``make_batch(model, batch_size=3, seed=0)``: see ``tiny_batch``."""
    return tiny_batch

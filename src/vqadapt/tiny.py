"""Tiny backbones the project builds itself, so the real loading path runs without downloads.

``build_tiny_backbones(out_dir, texts)`` writes two standard Hugging Face folders:
- ``vision/``: a DINOv2 (112 px, patch 14), briefly pretrained on synthetic shape scenes (drawn
  with seeds the VQA set never uses) to predict each patch's shape and colour: a dense,
  position-aware objective (a CLS-only one destroys spatial information, see FINDINGS.md);
- ``text/``: a BARTpho-like MBart with 12 encoder layers (so "the last 3 of 12" mirrors the
  real model) and a BPE tokenizer trained on the given training-split text, briefly pretrained
  by denoising (spans masked, the decoder rebuilds the sentence).
Both load back with plain ``AutoModel*.from_pretrained`` calls. What was done is recorded in
each folder's ``vqadapt_pretraining.json``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vqadapt.io import atomic_write_json
from vqadapt.text import nfc

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0-4, as in MBart/BARTpho
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)

TEXT_PRETRAIN_STEPS = 320  # about 90 s on 2 CPU cores
VISION_PRETRAIN_STEPS = 250  # about 45 s
TINY_VISION = dict(
    hidden_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    mlp_ratio=2,
    image_size=112,
    patch_size=14,
)
TINY_TEXT = dict(
    d_model=128,
    encoder_layers=12,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=256,
    decoder_ffn_dim=256,
    max_position_embeddings=128,
    dropout=0.1,
)


def vietnamese_alphabet() -> list[str]:
    """Every Vietnamese letter (all tones, NFC, both cases), ASCII letters, digits, punctuation."""
    import string
    import unicodedata

    vowels = "aăâeêioôơuưy"
    tones = ["", "\u0300", "\u0301", "\u0309", "\u0303", "\u0323"]  # grave acute hook tilde dot
    letters = {unicodedata.normalize("NFC", v + t) for v in vowels for t in tones} | {"đ"}
    letters |= set(string.ascii_lowercase)
    cased = letters | {c.upper() for c in letters}
    return sorted(cased | set(string.digits) | set(string.punctuation))


def train_tokenizer(texts: Sequence[str], vocab_size: int = 3000):
    """A BPE tokenizer (NFC, Metaspace like SentencePiece) wrapped for ``transformers``.

    The whole Vietnamese alphabet is in the initial alphabet, so any Vietnamese word
    round-trips even when the training text never used one of its letters.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        min_frequency=2,
        initial_alphabet=vietnamese_alphabet(),
    )
    tok.train_from_iterator((nfc(t) for t in texts), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=TINY_TEXT["max_position_embeddings"],
    )


def _mask_spans(ids: list[int], rng: random.Random, mask_id: int) -> list[int]:
    """BART-style text infilling: 15-30% of the tokens, in spans, each span -> one <mask>."""
    body = ids[1:-1]
    if len(body) < 2:
        return ids
    budget = max(1, round(len(body) * rng.uniform(0.15, 0.30)))
    out: list[int] = []
    i = 0
    while i < len(body):
        if budget > 0 and rng.random() < 0.3:
            span = min(budget, rng.randint(1, 3), len(body) - i)
            out.append(mask_id)
            i += span
            budget -= span
        else:
            out.append(body[i])
            i += 1
    return [ids[0], *out, ids[-1]]


def _budget_left(steps: int, max_steps: int, started: float, seconds: float | None) -> bool:
    """A fixed number of steps (deterministic), optionally capped in time (quick tests)."""
    if steps >= max_steps:
        return False
    return seconds is None or time.perf_counter() - started < seconds


def pretrain_text(
    model,
    tokenizer,
    texts: Sequence[str],
    max_steps: int,
    seed: int = 0,
    seconds: float | None = None,
) -> dict:
    """Denoising on training-split text for ``max_steps`` steps."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [tokenizer(t)["input_ids"] for t in texts if t.strip()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    pad, mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
    start_id = model.config.decoder_start_token_id
    model.train()
    losses: list[float] = []
    steps, started = 0, time.perf_counter()
    batch_size = 64
    while _budget_left(steps, max_steps, started, seconds):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        sources = [_mask_spans(ids, rng, mask_id) for ids in batch]
        src = _pad([torch.tensor(s) for s in sources], pad)
        tgt = _pad([torch.tensor(t) for t in batch], pad)
        dec_in = torch.cat([torch.full((tgt.shape[0], 1), start_id), tgt[:, :-1]], dim=1)
        dec_in[dec_in == -100] = pad
        logits = model(
            input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=dec_in
        ).logits
        labels = tgt.masked_fill(tgt == pad, -100)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        steps += 1
    model.eval()
    return _summary(
        "denoising (BART text infilling, 15-30% of tokens in spans)", losses, steps, started
    )


def pretrain_vision(
    model, max_steps: int, seed: int, num_scenes: int = 2000, seconds: float | None = None
) -> dict:
    """Per-patch shape and colour prediction on synthetic scenes (seeds disjoint from the VQA set)."""
    from vqadapt.data.synth import COLOURS, SHAPES, patch_labels, render_scene

    rng = random.Random(seed)
    torch.manual_seed(seed)
    size, patch = model.config.image_size, model.config.patch_size
    images, shape_labels, colour_labels = [], [], []
    for _ in range(num_scenes):
        image, objects = render_scene(rng, size=size)
        labels = patch_labels(objects, size, patch)
        images.append(np.asarray(image, dtype=np.uint8))
        shape_labels.append(labels["shape"])
        colour_labels.append(labels["colour"])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    shapes = torch.tensor(shape_labels).flatten(1)
    colours = torch.tensor(colour_labels).flatten(1)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    hidden = model.config.hidden_size
    heads = nn.ModuleDict(
        {"shape": nn.Linear(hidden, len(SHAPES) + 1), "colour": nn.Linear(hidden, len(COLOURS) + 1)}
    )
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model.train()
    losses: list[float] = []
    steps, started = 0, time.perf_counter()
    while _budget_left(steps, max_steps, started, seconds):
        index = torch.randint(0, len(images), (32,))
        x = (pixels[index].float() / 255.0 - mean) / std
        tokens = model(pixel_values=x).last_hidden_state[:, 1:]  # patch tokens, CLS dropped
        loss = nn.functional.cross_entropy(
            heads["shape"](tokens).flatten(0, 1), shapes[index].flatten()
        ) + nn.functional.cross_entropy(
            heads["colour"](tokens).flatten(0, 1), colours[index].flatten()
        )
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        steps += 1
    model.eval()
    summary = _summary(
        "per-patch shape + colour classification on synthetic scenes", losses, steps, started
    )
    summary["scenes"] = num_scenes
    summary["scene_seed"] = seed
    return summary


def _pad(tensors: list[torch.Tensor], value: int) -> torch.Tensor:
    return nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def _summary(objective: str, losses: list[float], steps: int, started: float) -> dict:
    window = max(1, min(20, len(losses) // 5))
    return {
        "objective": objective,
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_first": round(float(np.mean(losses[:window])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-window:])), 4) if losses else None,
    }


def build_tiny_backbones(
    out_dir: str | Path,
    texts: Sequence[str],
    *,
    seed: int = 0,
    text_steps: int = TEXT_PRETRAIN_STEPS,
    vision_steps: int = VISION_PRETRAIN_STEPS,
    text_seconds: float | None = None,
    vision_seconds: float | None = None,
    text_sources: Sequence[str] = (),
    text_encoder_layers: int = TINY_TEXT["encoder_layers"],
) -> dict[str, Path]:
    """Build, pretrain and save the tiny vision and text backbones into ``out_dir``.

    Pretraining runs a fixed number of steps, so a build is deterministic for a seed (on the
    same machine and torch build); ``*_seconds`` optionally caps it in time (tests use that).
    ``texts`` must come from training splits only (never a test split). The folder appears
    complete or not at all (built in a temporary sibling, then renamed).
    """
    from transformers import Dinov2Config, Dinov2Model, MBartConfig, MBartForConditionalGeneration

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".building-{int(time.time())}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    previous_threads = torch.get_num_threads()

    tokenizer = train_tokenizer(texts)
    text_config = MBartConfig(
        vocab_size=len(tokenizer),
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        **{**TINY_TEXT, "encoder_layers": text_encoder_layers},
    )
    text_model = MBartForConditionalGeneration(text_config)
    text_record = pretrain_text(text_model, tokenizer, texts, text_steps, seed, text_seconds)
    text_dir = tmp / "text"
    text_model.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    atomic_write_json(
        text_dir / "vqadapt_pretraining.json",
        {
            **text_record,
            "texts": len(texts),
            "text_sources": list(text_sources),
            "config": {**TINY_TEXT, "encoder_layers": text_encoder_layers},
            "vocab_size": len(tokenizer),
            "note": "training-split text only",
        },
    )

    vision_model = Dinov2Model(Dinov2Config(**TINY_VISION))
    vision_record = pretrain_vision(
        vision_model, vision_steps, 10_000 + seed, seconds=vision_seconds
    )
    vision_dir = tmp / "vision"
    vision_model.save_pretrained(vision_dir)
    atomic_write_json(
        vision_dir / "preprocessor_config.json", image_processor_config(TINY_VISION["image_size"])
    )
    atomic_write_json(
        vision_dir / "vqadapt_pretraining.json", {**vision_record, "config": TINY_VISION}
    )
    torch.set_num_threads(previous_threads)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return {"vision": out_dir / "vision", "text": out_dir / "text"}


def image_processor_config(size: int) -> dict:
    """The same keys as DINOv2's own preprocessor_config.json (resize, centre crop, normalise)."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_convert_rgb": True,
    }


def describe(folder: str | Path) -> str:
    record = json.loads((Path(folder) / "vqadapt_pretraining.json").read_text(encoding="utf-8"))
    loss = f"loss {record['loss_first']} -> {record['loss_last']}"
    return f"{record['objective']}: {record['steps']} steps, {record['seconds']} s, {loss}"

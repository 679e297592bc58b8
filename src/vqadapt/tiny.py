"""Tiny backbones the project builds itself, so the real loading path runs without downloads.

``build_tiny_backbones(out_dir, texts)`` writes two standard Hugging Face folders:
- ``vision/``: a DINOv2 (112 px, patch 14), briefly pretrained on synthetic shape scenes (drawn
  with seeds the VQA set never uses) to predict each patch's shape and colour: a dense,
  position-aware objective (a CLS-only one destroys spatial information, see FINDINGS.md),
  and to give an image and its upside-down copy the same features (so it discards which way a
  triangle points: the embedded benchmark's vision shift, see ``data.synth``);
- ``text/``: a BARTpho-like MBart with 12 encoder layers (so "the last 3 of 12" mirrors the
  real model) and a BPE tokenizer trained on the given training-split text, briefly pretrained
  by denoising (spans masked, the decoder rebuilds the sentence). The embedded default's text
  is the benchmark's style-A questions only (``embedded.tiny_backbone_texts``).
Both load back with plain ``AutoModel*.from_pretrained`` calls. What was done is recorded in
each folder's ``vqadapt_pretraining.json``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager
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
VISION_PRETRAIN_STEPS = 600  # about 95 s on one thread
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


def _denoising_loss(model, sources, targets, pad: int) -> torch.Tensor:
    """Seq2seq cross-entropy of rebuilding ``targets`` from ``sources`` (token id lists)."""
    src = _pad([torch.tensor(s) for s in sources], pad)
    tgt = _pad([torch.tensor(t) for t in targets], pad)
    start_id = model.config.decoder_start_token_id
    dec_in = torch.cat([torch.full((tgt.shape[0], 1), start_id), tgt[:, :-1]], dim=1)
    logits = model(
        input_ids=src, attention_mask=(src != pad).long(), decoder_input_ids=dec_in
    ).logits
    labels = tgt.masked_fill(tgt == pad, -100)
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def blind_token_ids(tokenizer) -> list[int]:
    """The tokens of ``data.synth.BLIND_WORDS`` ("đếm", "số", "gọi", "tên"): what the embedded
    benchmark's text encoder cannot tell apart. Each must be one token."""
    from vqadapt.data.synth import BLIND_WORDS

    ids = []
    for word in BLIND_WORDS:
        pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            raise ValueError(f"blind word {word!r} is {len(pieces)} tokens, expected one")
        ids.append(pieces[0])
    return ids


def pretrain_text(
    model,
    tokenizer,
    texts: Sequence[str],
    max_steps: int,
    seed: int = 0,
    seconds: float | None = None,
    blind_to_words: bool = False,
) -> dict:
    """Denoising on training-split text for ``max_steps`` steps.

    With ``blind_to_words`` (the embedded benchmark), the encoder is built unable to tell
    ``data.synth.BLIND_WORDS`` apart (``blindspots.text_blind_spot``) and kept so while it
    pretrains: the benchmark's text shift.
    """
    from vqadapt import blindspots

    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded = [tokenizer(t)["input_ids"] for t in texts if t.strip()]
    spot: dict = {"masks": []}
    if blind_to_words:
        spot = blindspots.text_blind_spot(model, blind_token_ids(tokenizer), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    pad, mask_id = tokenizer.pad_token_id, tokenizer.mask_token_id
    model.train()
    losses: list[float] = []
    steps, started = 0, time.perf_counter()
    batch_size = 64
    with blindspots.keep_blind(spot):
        while _budget_left(steps, max_steps, started, seconds):
            batch = rng.sample(encoded, min(batch_size, len(encoded)))
            sources = [_mask_spans(ids, rng, mask_id) for ids in batch]
            loss = _denoising_loss(model, sources, batch, pad)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            steps += 1
    model.eval()
    summary = _summary(
        "denoising (BART text infilling, 15-30% of tokens in spans)", losses, steps, started
    )
    if blind_to_words:
        from vqadapt.data.synth import BLIND_WORDS

        summary["blind_to"] = f"which of {', '.join(BLIND_WORDS)} a text holds"
        summary["blind_dims"] = spot["dims"]
    return summary


def pretrain_vision(
    model,
    max_steps: int,
    seed: int,
    num_scenes: int = 1500,
    seconds: float | None = None,
    blind_to_colour: bool = False,
) -> dict:
    """Per-patch shape and colour prediction on synthetic scenes (seeds disjoint from the VQA
    set): a dense objective, so that patch tokens keep what is where (a CLS-only objective
    destroys spatial information, see FINDINGS.md).

    With ``blind_to_colour`` (the embedded benchmark), the tower is built blind to the
    blue-yellow colour axis (``blindspots.vision_blind_spot``) and kept so while it pretrains:
    the benchmark's vision shift. Its colour head then learns the colours it can tell apart
    (``data.synth.SEEN_COLOUR``: twins share a class).
    """
    from vqadapt import blindspots
    from vqadapt.data.synth import COLOURS, SEEN_COLOUR, SHAPES, patch_labels, render_scene

    rng = random.Random(seed)
    torch.manual_seed(seed)
    size, patch = model.config.image_size, model.config.patch_size
    images, labels = [], {"shape": [], "colour": []}
    for _ in range(num_scenes):
        image, objects = render_scene(rng, size=size)
        images.append(np.asarray(image, dtype=np.uint8))
        found = patch_labels(objects, size, patch)
        for key in labels:
            labels[key].append(found[key])
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    targets = {key: torch.tensor(rows).flatten(1) for key, rows in labels.items()}
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    hidden = model.config.hidden_size
    colour_classes = len(COLOURS)
    spot = {"masks": []}
    if blind_to_colour:
        spot = blindspots.vision_blind_spot(model, IMAGE_MEAN, IMAGE_STD, seed)
        blindspots.project(spot)  # remembers the colour filters as built
        # the colours it can tell apart: twins share a class (0 stays background)
        seen = torch.tensor([0] + [SEEN_COLOUR[c] for c in COLOURS])
        targets["colour"] = seen[targets["colour"]]
        colour_classes = max(SEEN_COLOUR.values())
    heads = nn.ModuleDict(
        {
            "shape": nn.Linear(hidden, len(SHAPES) + 1),
            "colour": nn.Linear(hidden, colour_classes + 1),
        }
    )
    params = list(model.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    model.train()
    losses: list[float] = []
    steps, started = 0, time.perf_counter()
    with blindspots.keep_blind(spot):
        while _budget_left(steps, max_steps, started, seconds):
            index = torch.randint(0, len(images), (32,))
            x = (pixels[index].float() / 255.0 - mean) / std
            tokens = model(pixel_values=x).last_hidden_state[:, 1:]  # patch tokens, CLS dropped
            loss = sum(
                nn.functional.cross_entropy(
                    head(tokens).flatten(0, 1), targets[key][index].flatten()
                )
                for key, head in heads.items()
            )
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            blindspots.project(spot)
            losses.append(loss.item())
            steps += 1
    model.eval()
    summary = _summary(
        f"per-patch {' + '.join(heads)} classification on synthetic scenes", losses, steps, started
    )
    summary["scenes"] = num_scenes
    summary["scene_seed"] = seed
    if blind_to_colour:
        summary["blind_to"] = "the blue-yellow colour axis (blindspots.vision_blind_spot)"
        summary["blind_dims"] = spot["dims"]
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


def build_vision_tower(
    folder: str | Path,
    seed: int = 0,
    steps: int = VISION_PRETRAIN_STEPS,
    seconds: float | None = None,
    blind_to_colour: bool = False,
) -> dict:
    """Build, pretrain (one thread) and save the tiny DINOv2 into ``folder``; its record."""
    from transformers import Dinov2Config, Dinov2Model

    with _one_thread():
        torch.manual_seed(10_000 + seed)
        model = Dinov2Model(Dinov2Config(**TINY_VISION))
        record = pretrain_vision(
            model, steps, 10_000 + seed, seconds=seconds, blind_to_colour=blind_to_colour
        )
    folder = Path(folder)
    model.save_pretrained(folder)
    atomic_write_json(
        folder / "preprocessor_config.json", image_processor_config(TINY_VISION["image_size"])
    )
    record = {**record, "config": TINY_VISION}
    atomic_write_json(folder / "vqadapt_pretraining.json", record)
    return record


def build_text_tower(
    folder: str | Path,
    texts: Sequence[str],
    seed: int = 0,
    steps: int = TEXT_PRETRAIN_STEPS,
    seconds: float | None = None,
    sources: Sequence[str] = (),
    encoder_layers: int = TINY_TEXT["encoder_layers"],
    blind_to_words: bool = False,
) -> dict:
    """Train the tokenizer, build, pretrain (one thread) and save the tiny MBart; its record."""
    from transformers import MBartConfig, MBartForConditionalGeneration

    with _one_thread():
        torch.manual_seed(seed)
        tokenizer = train_tokenizer(texts)
        config = MBartConfig(
            vocab_size=len(tokenizer),
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
            **{**TINY_TEXT, "encoder_layers": encoder_layers},
        )
        model = MBartForConditionalGeneration(config)
        record = pretrain_text(
            model, tokenizer, texts, steps, seed, seconds, blind_to_words=blind_to_words
        )
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        **record,
        "texts": len(texts),
        "text_sources": list(sources),
        "config": {**TINY_TEXT, "encoder_layers": encoder_layers},
        "vocab_size": len(tokenizer),
        "note": "training-split text only",
    }
    atomic_write_json(folder / "vqadapt_pretraining.json", record)
    return record


@contextmanager
def _one_thread():
    """Pretrain on one thread: the build is then the same whatever the core count (the
    thread count changes the matmuls' summation order) and two towers can share two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
    parallel: bool = False,
    benchmark_blind_spots: bool = False,
) -> dict[str, Path]:
    """Build, pretrain and save the tiny vision and text backbones into ``out_dir``.

    Pretraining runs a fixed number of steps on one thread per tower, so a build is
    deterministic for a seed (on the same CPU and torch build, whatever its core count);
    ``*_seconds`` optionally caps it in time (tests use that). With ``parallel`` the vision
    tower pretrains in a second process meanwhile (same result, about half the wall time on
    two cores). ``texts`` must come from training splits only (never a test split). The
    folder appears complete or not at all (built in a temporary sibling, then renamed).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".building-{os.getpid()}-{int(time.time())}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vision_args = (str(tmp / "vision"), seed, vision_steps, vision_seconds, benchmark_blind_spots)
    worker = None
    if parallel:  # a fresh interpreter (no fork of a process holding torch's thread pools)
        import subprocess
        import sys

        code = f"from vqadapt.tiny import build_vision_tower; build_vision_tower(*{vision_args!r})"
        worker = subprocess.Popen([sys.executable, "-c", code])
    try:
        build_text_tower(
            tmp / "text",
            texts,
            seed,
            text_steps,
            text_seconds,
            text_sources,
            text_encoder_layers,
            benchmark_blind_spots,
        )
        if worker is None:
            build_vision_tower(*vision_args)
        else:
            code = worker.wait()
            if code != 0 or not (tmp / "vision" / "vqadapt_pretraining.json").is_file():
                raise RuntimeError(f"the vision tower's build failed (exit code {code})")
    except BaseException:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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

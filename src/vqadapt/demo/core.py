"""What the demo page shows, without Gradio: the answer, the top beams and where the decoder looked.

The answer comes from the same batch and the same beam search as ``vqadapt predict``
(``inference.question_batch`` + ``VQAModel.generate``), and its beams are ranked as the search
ranked them. For each beam:

- ``Beam.log_prob``: the sum of the log-probabilities of its tokens (start-of-answer and end
  tokens included) as the search saw them, i.e. after generation's logits processors (a forced
  end token at the length limit counts as certain); ``exp(log_prob)`` is then the probability
  of that exact answer;
- ``Beam.score``: ``log_prob / tokens ** length_penalty``, the length-normalised score beam
  search ranks by (with the default length penalty 1, the mean token log-probability); equal
  to ``generate(..., output_scores=True).sequences_scores``, which a test checks.

The decoder cross-attends to ``[text-encoder states ; CLS (+ registers) ; image patches]``
(``VQAModel.encode``). For the top answer, one teacher-forced decoder pass with eager attention
returns the cross-attention weights; ``AttentionMap.patches`` is the attention the decoder put on
each patch, averaged over layers, heads and the positions that produce the answer's words: a
share of the total, so ``patches.sum() + text_share + prefix_share == 1``.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from vqadapt import embedded
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.data.images import ImageIndex
from vqadapt.data.records import QUESTION_TYPES, VQARecord
from vqadapt.demo.limits import UploadLimits, check_question, check_upload
from vqadapt.errors import VQADataError
from vqadapt.inference import LoadedRun, question_batch

SYNTHETIC_README_TITLE = "# Synthetic Vietnamese shapes VQA"
"""First line of the README that ``data.synth.generate`` writes beside a synthetic set."""


@dataclass(frozen=True)
class Beam:
    """One beam-search answer and how likely the model finds it."""

    answer: str
    score: float
    """Length-normalised log-probability: what beam search ranks by (see the module doc)."""
    log_prob: float
    """Sum of the token log-probabilities; ``exp(log_prob)`` is the answer's probability."""
    tokens: int
    """Number of generated tokens (end token included)."""


@dataclass(frozen=True)
class AttentionMap:
    """The decoder's cross-attention onto the vision patches, for the top answer."""

    patches: np.ndarray
    """(grid, grid) share of all cross-attention on each patch, row-major as in the image."""
    text_share: float
    """Share of the attention on the question's text-encoder states."""
    prefix_share: float
    """Share on the vision tokens that are not patches (CLS, registers)."""

    @property
    def grid(self) -> tuple[int, int]:
        return self.patches.shape  # type: ignore[return-value]

    @property
    def normalised(self) -> np.ndarray:
        """The patch map rescaled to sum to 1 (where on the image, whatever the text share)."""
        total = float(self.patches.sum())
        return self.patches / total if total > 0 else self.patches


@dataclass(frozen=True)
class DemoAnswer:
    """Everything the page shows for one question."""

    question: str
    answer: str
    beams: list[Beam]
    """Best first (the first is ``answer``)."""
    attention: AttentionMap | None
    """None for a blind (question-only) run."""
    image: np.ndarray | None
    """(crop, crop, 3) uint8: the image as the model saw it (resized, centre-cropped)."""


@dataclass(frozen=True)
class Example:
    """A preloaded example: an image of the synthetic set and a question about it."""

    image: Path
    question: str
    answer: str
    qtype: str | None


@contextlib.contextmanager
def eager_attention(text_model) -> Iterator[None]:
    """Run the text model with eager attention (the only kind that returns weights), then restore."""
    before = text_model.config._attn_implementation
    if before != "eager":
        text_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            text_model.set_attn_implementation(before)


@torch.no_grad()
def explain_answer(
    run: LoadedRun,
    question: str,
    image: str | Path | None,
    num_beams: int = 3,
    limits: UploadLimits | None = None,
) -> DemoAnswer:
    """Answer ``question`` about ``image``: the top ``num_beams`` answers and the attention map.

    ``image`` is ignored by a blind run. Bad input raises ``VQADataError`` with a message meant
    for the person who typed or uploaded it.
    """
    limits = limits or UploadLimits()
    if num_beams < 1:
        raise VQADataError(f"the number of beams must be at least 1, not {num_beams}")
    question = check_question(question, limits)
    model, tokenizer = run.model, run.tokenizer
    blind = model.vision is None
    if blind:
        image = None
    elif image is None:
        raise VQADataError("upload an image or pick an example first")
    else:
        check_upload(image, limits)
    batch = question_batch(run, question, image)  # on the run's device
    with run.runtime.autocast():
        out = model.generate(
            batch,
            max_new_tokens=run.config.data.max_answer_tokens,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            output_scores=True,
            return_dict_in_generate=True,
        )
    sequences = out.sequences  # (beams, 1 + generated): decoder start token first
    # Per-token log-probabilities as the search saw them (after its logits processors, e.g. a
    # forced end token at the length limit); greedy search returns raw logits, beam search
    # log-probabilities already.
    token_log_probs = model.text.compute_transition_scores(
        sequences, out.scores, getattr(out, "beam_indices", None), normalize_logits=num_beams == 1
    ).float()
    sequences = sequences.cpu()
    produced = sequences[:, 1:] != tokenizer.pad_token_id  # beams that ended early are padded
    log_probs = (token_log_probs.cpu() * produced).sum(dim=1)
    lengths = produced.sum(dim=1)
    length_penalty = getattr(model.text.generation_config, "length_penalty", None) or 1.0
    texts = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    beams = [
        Beam(
            text.strip(),
            float(log_prob / length.float() ** length_penalty),
            float(log_prob),
            int(length),
        )
        for text, log_prob, length in zip(texts, log_probs, lengths, strict=True)
    ]
    attention = seen = None
    if not blind:
        attention = _decoder_attention(run, batch, sequences[0][: 1 + int(lengths[0])])
        seen = _model_view(batch["pixel_values"][0].float().cpu(), run.preprocessing)
    return DemoAnswer(question, beams[0].answer, beams, attention, seen)


def _decoder_attention(
    run: LoadedRun, batch: dict[str, torch.Tensor], sequence: torch.Tensor
) -> AttentionMap:
    """Teacher-force ``sequence`` (start token, answer, end token) and average the decoder's
    cross-attention over layers, heads and the positions that produce the answer's words."""
    model, tokenizer = run.model, run.tokenizer
    with run.runtime.autocast():
        states, mask = model.encode(batch)
        with eager_attention(model.text):
            out = model.text(
                encoder_outputs=BaseModelOutput(last_hidden_state=states),
                attention_mask=mask,
                decoder_input_ids=sequence[None, :-1].to(states.device),
                output_attentions=True,
                use_cache=False,
            )
    # (layers, heads, target, source), read on the host
    weights = torch.cat(out.cross_attentions).float().cpu()
    mask = mask.cpu()
    targets = sequence[1:]
    words = ~torch.isin(targets, torch.tensor(sorted(tokenizer.all_special_ids)))
    rows = words if bool(words.any()) else torch.ones_like(words)  # an empty answer: all
    # (source,), real positions only: VQAModel.encode pads the keys with masked zeros
    mean = weights[:, :, rows].mean(dim=(0, 1, 2))[mask[0].bool()]
    height, width = batch["pixel_values"].shape[-2:]
    patch = model.vision.config.patch_size
    grid = (height // patch, width // patch)
    num_patches = grid[0] * grid[1]
    text_tokens = int(batch["attention_mask"][0].sum())  # VQAModel.encode: [text ; CLS ; patches]
    return AttentionMap(
        patches=mean[-num_patches:].reshape(grid).double().numpy(),
        text_share=float(mean[:text_tokens].sum()),
        prefix_share=float(mean[text_tokens:-num_patches].sum()),
    )


def _model_view(pixel_values: torch.Tensor, preprocessing) -> np.ndarray:
    """Undo the normalisation: the (H, W, 3) uint8 crop the vision tower saw."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    pixels = ((pixel_values * std + mean) * 255.0).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(1, 2, 0).numpy()


def attention_overlay(result: DemoAnswer, size: int = 336, opacity: float = 0.6):
    """The model's view of the image with the patch attention as a heat map (a PIL image).

    Colours (matplotlib's ``turbo``, blue to red) and opacity both grow with the attention,
    scaled to the map's own range: the most attended patch is red at ``opacity``, the least
    attended is left uncoloured. Each patch is a flat block, so the grid stays visible.
    None for a blind run.
    """
    from matplotlib import colormaps
    from PIL import Image

    if result.attention is None or result.image is None:
        return None
    patches = result.attention.patches
    low, high = float(patches.min()), float(patches.max())
    heat = (patches - low) / (high - low) if high > low else np.zeros_like(patches)
    colours = (colormaps["turbo"](heat)[..., :3] * 255).astype(np.uint8)
    alpha = (heat * opacity * 255).astype(np.uint8)
    layer = Image.fromarray(np.dstack([colours, alpha]), "RGBA")
    layer = layer.resize((size, size), Image.Resampling.NEAREST)
    base = Image.fromarray(result.image).resize((size, size), Image.Resampling.BICUBIC)
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def synthetic_folder(run: LoadedRun) -> Path:
    """Where the examples come from: the run's data when it is a synthetic set, else the embedded one."""
    data = run.config.data
    if data.train_file is None and run.backbones.embedded_data is not None:
        return Path(run.backbones.embedded_data)
    if data.train_file is not None:
        folder = Path(data.train_file).parent
        readme = folder / "README.md"
        if (
            readme.is_file()
            and readme.read_text(encoding="utf-8").startswith(SYNTHETIC_README_TITLE)
            and (folder / "test.csv").is_file()
        ):
            return folder
    return embedded.ensure_synthetic(log=lambda _: None)


def demo_examples(run: LoadedRun, n: int = 8, seed: int = 0) -> list[Example]:
    """``n`` test questions of the synthetic set, on distinct images, cycling through the types."""
    if n <= 0:
        return []
    folder = synthetic_folder(run)
    records = load_vivqa_csv(folder / "test.csv")
    random.Random(seed).shuffle(records)
    by_type: dict[str | None, deque[VQARecord]] = {}
    for record in records:
        by_type.setdefault(record.qtype, deque()).append(record)
    order = [t for t in QUESTION_TYPES.values() if t in by_type] + [
        t for t in by_type if t not in QUESTION_TYPES.values()
    ]
    index = ImageIndex(folder / "images")
    examples: list[Example] = []
    used: set[str | None] = set()
    while len(examples) < n and any(by_type.values()):
        for qtype in order:
            queue = by_type[qtype]
            while queue and queue[0].image in used:
                queue.popleft()
            if queue and len(examples) < n:
                record = queue.popleft()
                used.add(record.image)
                path = index.resolve(record.image) if record.image else None
                if path is not None:
                    examples.append(Example(path, record.question, record.answer, qtype))
    return examples

"""The embedded default: the synthetic shapes set and the tiny backbones, built on first use.

Everything lands under one ignored cache folder (``$VQADAPT_CACHE``, default ``.vqadapt_cache``
in the working directory) and is reused; a folder is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

SYNTH_SEED = 0
SYNTH_QUESTIONS = 10_000
SYNTH_EXTRA_TEST = 4_000
"""Test questions on further images, beyond the about 2,000 of the first 10,000 questions
(``data.synth.generate(extra_test=)``: the training set is that of the 10,000 exactly). Testing
costs seconds per cell and every test question narrows the minimum detectable effect of every
comparison (README: what the quick study measured)."""
SYNTH_VERSION = "v5"
"""Bumped when the generator's output changes (v2: an isoluminant palette, grey backgrounds,
1-4 larger shapes, yes/no questions, subsets.csv; v3: the test file's question ids follow the
training file's; v4: grey shapes, the name / instruct / grey kinds; v5: a palette of twin
colours, no grey, the tint kind, 60% single-shape images)."""
TINY_VERSION = "v6"
"""Bumped when the tiny backbones' recipe changes (v4: benchmark text only, a colour-blind
vision tower; v5: the text encoder blind to the instruction words, grey shapes in the vision
tower's pretraining scenes; v6: the vision tower blind to the blue-yellow axis only, 600
pretraining steps with a head for the colours it sees)."""


def cache_root() -> Path:
    return Path(os.environ.get("VQADAPT_CACHE", ".vqadapt_cache")).resolve()


def ensure_synthetic(
    n: int = SYNTH_QUESTIONS,
    seed: int = SYNTH_SEED,
    log=print,
    extra_test: int = SYNTH_EXTRA_TEST,
) -> Path:
    """The synthetic data folder (``train.csv``, ``test.csv``, ``images/``), generated once."""
    from vqadapt.data.synth import generate

    extra = f"-t{extra_test}" if extra_test else ""
    folder = cache_root() / "data" / f"shapes-{SYNTH_VERSION}-n{n}{extra}-seed{seed}"
    if (folder / "test.csv").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    more = f" and {extra_test} more for testing" if extra_test else ""
    log(f"generating the synthetic shapes set ({n} questions{more}, seed {seed}) into {folder}")
    summary = generate(tmp, n=n, seed=seed, extra_test=extra_test)
    if folder.exists():
        shutil.rmtree(tmp)
    else:
        tmp.rename(folder)
    log(
        f"  {summary.get('train')} train / {summary.get('test')} test questions, "
        f"{summary.get('images')} images"
    )
    return folder


def tiny_backbone_texts() -> tuple[list[str], list[str]]:
    """The tiny text model's pretraining text and its source: every question template of the
    synthetic benchmark with every slot value, and every answer
    (``data.synth.pretraining_texts``). Nothing optional: the embedded default is the same
    on every machine."""
    from vqadapt.data.synth import pretraining_texts

    return pretraining_texts(), ["vqadapt.data.synth.pretraining_texts"]


def corpus_texts(files: list[str]) -> tuple[list[str], list[str]]:
    """Questions and answers of annotation files (any supported format): a pretraining text
    chosen explicitly (``vqadapt backbones tiny --text_corpus FILE``). Pass training splits
    only, never a test split."""
    from vqadapt.data.formats import load_records

    texts = []
    for path in files:
        for record in load_records(path):
            texts += [record.question, *record.answers]
    return texts, [str(Path(path)) for path in files]


def ensure_tiny_backbones(log=print) -> dict[str, Path]:
    """The tiny ``vision/`` and ``text/`` folders, built and pretrained once (a few minutes)."""
    from vqadapt.tiny import build_tiny_backbones, describe

    texts, sources = tiny_backbone_texts()
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:10]
    folder = cache_root() / "backbones" / f"tiny-{TINY_VERSION}-{digest}"
    if (folder / "text" / "config.json").is_file() and (
        folder / "vision" / "config.json"
    ).is_file():
        return {"vision": folder / "vision", "text": folder / "text"}
    log(f"building the tiny backbones into {folder} (a few minutes, once)")
    started = time.perf_counter()
    paths = build_tiny_backbones(
        folder, texts, text_sources=sources, parallel=True, benchmark_blind_spots=True
    )
    log(f"  text: {describe(paths['text'])}")
    log(f"  vision: {describe(paths['vision'])}")
    log(f"  built in {time.perf_counter() - started:.0f} s")
    return paths

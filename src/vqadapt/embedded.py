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

from vqadapt.data.formats import load_vivqa_csv

SYNTH_SEED = 0
SYNTH_QUESTIONS = 10_000
TINY_VERSION = "v3"


def cache_root() -> Path:
    return Path(os.environ.get("VQADAPT_CACHE", ".vqadapt_cache")).resolve()


def shared_vivqa_train() -> Path | None:
    """The real ViVQA training CSV when this checkout has it (``../shared/data/vivqa``)."""
    explicit = os.environ.get("VQADAPT_VIVQA_TRAIN")
    candidates = [Path(explicit)] if explicit else []
    here = Path(__file__).resolve()
    candidates += [parent / "shared" / "data" / "vivqa" / "train.csv" for parent in here.parents]
    candidates.append(Path.cwd().parent / "shared" / "data" / "vivqa" / "train.csv")
    return next((path for path in candidates if path.is_file()), None)


def ensure_synthetic(n: int = SYNTH_QUESTIONS, seed: int = SYNTH_SEED, log=print) -> Path:
    """The synthetic data folder (``train.csv``, ``test.csv``, ``images/``), generated once."""
    from vqadapt.data.synth import generate

    folder = cache_root() / "data" / f"shapes-n{n}-seed{seed}"
    if (folder / "test.csv").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"generating the synthetic shapes set ({n} questions, seed {seed}) into {folder}")
    summary = generate(tmp, n=n, seed=seed)
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
    """Training-split text for the tokenizer and the denoising pretraining, and its sources."""
    texts, sources = [], []
    synthetic = ensure_synthetic() / "train.csv"
    sources.append(str(synthetic))
    for record in load_vivqa_csv(synthetic):
        texts += [record.question, *record.answers]
    vivqa = shared_vivqa_train()
    if vivqa is not None:
        sources.append(str(vivqa))
        for record in load_vivqa_csv(vivqa):
            texts += [record.question, *record.answers]
    return texts, sources


def ensure_tiny_backbones(log=print) -> dict[str, Path]:
    """The tiny ``vision/`` and ``text/`` folders, built and pretrained once (a few minutes)."""
    from vqadapt.tiny import build_tiny_backbones, describe

    texts, sources = tiny_backbone_texts()
    digest = hashlib.sha256("\n".join(sorted(set(texts))).encode()).hexdigest()[:10]
    folder = cache_root() / "backbones" / f"tiny-{TINY_VERSION}-{digest}"
    if (folder / "text" / "config.json").is_file() and (
        folder / "vision" / "config.json"
    ).is_file():
        return {"vision": folder / "vision", "text": folder / "text"}
    log(f"building the tiny backbones into {folder} (a few minutes, once)")
    started = time.perf_counter()
    paths = build_tiny_backbones(folder, texts, text_sources=sources)
    log(f"  text: {describe(paths['text'])}")
    log(f"  vision: {describe(paths['vision'])}")
    log(f"  built in {time.perf_counter() - started:.0f} s")
    return paths

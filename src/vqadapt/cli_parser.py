"""The command line's flags for every command but train and plan (those are the config's own
fields: ``config.run_config_parser``), each with its help text and, for numbers, its range.

Kept apart from ``cli`` (which runs the commands) and free of heavy imports: ``--help`` and a
refused flag answer at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from vqadapt.config import DATA_FORMATS, FRACTION_BUDGETS, ON_BAD_IMAGE, PRECISIONS
from vqadapt.demo.limits import UploadLimits
from vqadapt.embedded import SYNTH_EXTRA_TEST, SYNTH_QUESTIONS, SYNTH_SEED
from vqadapt.weights import SCHEMES

# The range of every numeric flag of every command but train / plan (whose settings check
# themselves, config.py): a value outside it (0, negative, NaN, huge) is refused before
# anything loads, naming the flag. A new numeric flag needs a row (a test checks).
NUMERIC_FLAGS: dict[str, dict[str, tuple[float, float]]] = {
    "eval": {"num_beams": (1, 64), "max_eval_samples": (1, 10**9)},
    "predict": {"num_beams": (1, 64)},
    "export": {"check_questions": (1, 100_000), "tolerance": (0.0, 1.0)},
    "data synth": {"n": (2, 10_000_000), "seed": (0, 2**32 - 1), "extra_test": (0, 10_000_000)},
    "backbones tiny": {
        "text_steps": (0, 1_000_000),
        "vision_steps": (0, 1_000_000),
        "text_encoder_layers": (1, 48),
    },
    "answer-weights": {"beta": (0.0, 0.999999999), "clip": (0.0, 1e6)},
    "ablate": {"seeds": (1, 1000), "jobs": (1, 256), "train_fractions": (1e-6, 1.0)},
    "demo": {
        "port": (1, 65535),
        "examples": (0, 64),
        "num_beams": (1, 8),
        "max_file_mb": (0.001, 1024.0),
        "max_pixels": (1, 10**9),
        "max_question_chars": (1, 100_000),
    },
}

RUN_HELP = "run directory (vqadapt train --output_dir); its best checkpoint is used"
FORMAT_HELP = "annotation format; auto: by extension (default %(default)s)"
# what add_subparsers returns (argparse has no public name for it)
Subparsers = Any


def build_parser() -> argparse.ArgumentParser:
    """Every command but train and plan (those take the config's flags: run_config_parser)."""
    parser = argparse.ArgumentParser(
        prog="vqadapt",
        description="Train Vietnamese generative VQA models and measure how the encoders are best adapted.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train one model (flags: vqadapt train --help)", add_help=False)
    sub.add_parser(
        "plan",
        help="print what would train, per tower and layer (same flags as train; "
        "--rank_table adds exact LoRA counts)",
        add_help=False,
    )
    _add_eval(sub)
    _add_predict(sub)
    _add_export(sub)
    _add_data(sub)
    _add_backbones(sub)
    _add_answer_weights(sub)
    _add_ablate(sub)
    _add_demo(sub)
    return parser


def _add_eval(sub: Subparsers) -> None:
    """``vqadapt eval``."""
    ev = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split")
    ev.add_argument("--run", required=True, help=RUN_HELP)
    ev.add_argument(
        "--split",
        default="test",
        choices=("val", "test", "train"),
        help="which split of the run's data (default %(default)s); writes "
        "predictions_<split>.jsonl and eval_<split>.json into the run",
    )
    ev.add_argument(
        "--num_beams",
        type=ranged("eval", "num_beams"),
        default=None,
        help="beams (default: the run's --num_beams)",
    )
    ev.add_argument(
        "--max_eval_samples",
        type=ranged("eval", "max_eval_samples"),
        default=None,
        help="score only N questions of the split, a fixed random sample (default: the run's "
        "setting; more than the split holds means all of it)",
    )
    device_flags(ev, precision=True)


def _add_predict(sub: Subparsers) -> None:
    """``vqadapt predict``."""
    pr = sub.add_parser("predict", help="answer one question about one image")
    pr.add_argument("--run", required=True, help=RUN_HELP)
    pr.add_argument("--question", required=True, help="the question, in Vietnamese")
    pr.add_argument(
        "--image", default=None, help="the image file (not needed by a --blind model's run)"
    )
    pr.add_argument(
        "--num_beams",
        type=ranged("predict", "num_beams"),
        default=1,
        help="beams (default %(default)s)",
    )
    device_flags(pr, precision=True)


def _add_export(sub: Subparsers) -> None:
    """``vqadapt export``."""
    ex = sub.add_parser(
        "export", help="write a self-contained model folder and check it against the run"
    )
    ex.add_argument("--run", required=True, help="run directory (vqadapt train --output_dir)")
    ex.add_argument("--out", required=True, help="folder to create (refused if not empty)")
    ex.add_argument(
        "--checkpoint",
        default="best",
        choices=("best", "last"),
        help="the run's best (by its early-stopping metric) or last checkpoint (default "
        "%(default)s)",
    )
    ex.add_argument("--merge", action="store_true", help="fold LoRA into the weights")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ex.add_argument(
        "--check_questions",
        type=ranged("export", "check_questions"),
        default=32,
        help="held-out questions checked (default %(default)s)",
    )
    ex.add_argument(
        "--tolerance",
        type=ranged("export", "tolerance", float),
        default=None,
        help="largest logit difference allowed (default 1e-4, with --merge 1e-3)",
    )
    device_flags(ex, precision=False)


def _add_data(sub: Subparsers) -> None:
    """``vqadapt data``."""
    data = sub.add_parser("data", help="synthetic data and data set summaries")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic Vietnamese shapes VQA set")
    synth.add_argument("--out", required=True, help="folder to write (CSV files and images/)")
    synth.add_argument(
        "--n",
        type=ranged("data synth", "n"),
        default=SYNTH_QUESTIONS,
        help="questions (default %(default)s)",
    )
    synth.add_argument(
        "--seed",
        type=ranged("data synth", "seed"),
        default=SYNTH_SEED,
        help="random seed (default %(default)s)",
    )
    synth.add_argument(
        "--extra_test",
        type=ranged("data synth", "extra_test"),
        default=SYNTH_EXTRA_TEST,
        help="more test questions on further images, after the --n questions (whose split they "
        "leave as it was); the embedded default's (default %(default)s)",
    )
    stats = data_sub.add_parser("stats", help="counts per type, answers, lengths, images found")
    stats.add_argument("files", nargs="+", help="annotation files (ViVQA CSV, JSON or JSONL)")
    stats.add_argument("--format", default="auto", choices=DATA_FORMATS, help=FORMAT_HELP)
    stats.add_argument("--language", default=None, help="keep only this language (EVJVQA JSON)")
    stats.add_argument(
        "--image_root", default=None, help="folder of the images: also count those found"
    )

    check = data_sub.add_parser(
        "check", help="validate a whole data set; report every problem at once"
    )
    check.add_argument("--train_file", required=True, help="training annotations")
    check.add_argument("--test_file", default=None, help="test annotations")
    check.add_argument("--val_file", default=None, help="validation annotations")
    check.add_argument(
        "--image_root", default=None, help="folder of the images (every image is opened)"
    )
    check.add_argument("--format", default="auto", choices=DATA_FORMATS, help=FORMAT_HELP)
    check.add_argument("--language", default=None, help="keep only this language (EVJVQA JSON)")
    check.add_argument(
        "--on_bad_image",
        default="error",
        choices=ON_BAD_IMAGE,
        help="a missing or unreadable image is an error, or a warning whose questions "
        "training would skip (default %(default)s)",
    )
    check.add_argument(
        "--answer_weights", default=None, help="an answer_weights.json to check against train"
    )


def _add_backbones(sub: Subparsers) -> None:
    """``vqadapt backbones``."""
    bb = sub.add_parser("backbones", help="tiny pretrained backbones")
    bb_sub = bb.add_subparsers(dest="backbones_command", required=True)
    tiny = bb_sub.add_parser("tiny", help="build (or show) the tiny DINOv2 + MBart")
    tiny.add_argument("--out", default=None, help="folder (default: the shared cache, built once)")
    tiny.add_argument(
        "--text_steps",
        type=ranged("backbones tiny", "text_steps"),
        default=None,
        help="denoising steps (default 320; 0: random init)",
    )
    tiny.add_argument(
        "--vision_steps",
        type=ranged("backbones tiny", "vision_steps"),
        default=None,
        help="vision steps (default 250; 0: random init)",
    )
    tiny.add_argument(
        "--text_encoder_layers",
        type=ranged("backbones tiny", "text_encoder_layers"),
        default=12,
        help="text-encoder depth (12 mirrors BARTpho; fewer learn faster from little data)",
    )
    tiny.add_argument(
        "--text_corpus",
        nargs="+",
        default=None,
        metavar="FILE",
        help="pretrain the text model (tokenizer and denoising) on the questions and answers of "
        "these training files, e.g. ../shared/data/vivqa/train.csv, instead of the embedded "
        "benchmark's questions (never pass a test split)",
    )


def _add_answer_weights(sub: Subparsers) -> None:
    """``vqadapt answer-weights``."""
    aw = sub.add_parser("answer-weights", help="per-answer loss weights (answer_weights.json)")
    aw.add_argument("--data", nargs="+", required=True, help="training annotation file(s)")
    aw.add_argument("--format", default="auto", choices=DATA_FORMATS, help=FORMAT_HELP)
    aw.add_argument(
        "--scheme",
        default="inverse",
        choices=SCHEMES,
        help="1/n, 1/sqrt(n) or the inverse effective number of samples (default %(default)s)",
    )
    aw.add_argument(
        "--beta",
        type=ranged("answer-weights", "beta", float),
        default=0.999,
        help="beta of effective_number, in [0, 1) (default %(default)s)",
    )
    aw.add_argument(
        "--clip",
        type=ranged("answer-weights", "clip", float),
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="clip the weights into [MIN, MAX] (MIN <= 1 <= MAX), keeping the mean weight 1",
    )
    aw.add_argument(
        "--out", default="answer_weights.json", help="file to write (default %(default)s)"
    )


def _add_ablate(sub: Subparsers) -> None:
    """``vqadapt ablate``."""
    ab = sub.add_parser("ablate", help="run the ablation study and write its report")
    ab.add_argument(
        "--preset",
        default="quick",
        help="a preset shipped with vqadapt (quick, seed, beyond-seed, vivqa-text, grid-example; $VQADAPT_EXPERIMENTS "
        "points elsewhere) or a YAML file (default %(default)s)",
    )
    ab.add_argument(
        "--seeds",
        type=ranged("ablate", "seeds"),
        default=None,
        help="number of seeds (default: the preset's)",
    )
    ab.add_argument("--out", default=None, help="study folder (default: runs/ablation-<preset>)")
    ab.add_argument("--quick", action="store_true", help="the quick preset on the embedded default")
    ab.add_argument("--retry_failed", action="store_true", help="rerun cells that failed before")
    ab.add_argument("--report_only", action="store_true", help="only rebuild the report")
    ab.add_argument(
        "--jobs",
        type=ranged("ablate", "jobs"),
        default=1,
        help="cells trained at once: each gets its own GPU (round-robin over the visible ones) "
        "or an equal share of the CPU cores",
    )
    ab.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every cell"
    )
    ab.add_argument(
        "--train_fractions",
        type=ranged("ablate", "train_fractions", float),
        nargs="+",
        default=None,
        metavar="F",
        help="train every experiment on these shares of the training questions too (data "
        "efficiency), e.g. 0.1 0.3 1.0; the largest is the main study (default: the preset's)",
    )
    ab.add_argument(
        "--fraction_budget",
        choices=FRACTION_BUDGETS,
        default=None,
        help="a smaller training fraction trains the same epochs (fewer steps) or about the "
        "same steps as the largest (each epoch passes several times over its questions; small "
        "sets then overfit, which the overfitting claims need) (default: the preset's)",
    )


def _add_demo(sub: Subparsers) -> None:
    """``vqadapt demo``."""
    dm = sub.add_parser(
        "demo", help="a local web page: ask a run questions, see beams and attention"
    )
    dm.add_argument("--run", required=True, help="run directory (its best checkpoint)")
    dm.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to serve on (default %(default)s: this machine only)",
    )
    dm.add_argument(
        "--port",
        type=ranged("demo", "port"),
        default=7860,
        help="port (default %(default)s)",
    )
    dm.add_argument(
        "--examples",
        type=ranged("demo", "examples"),
        default=8,
        help="preloaded synthetic examples",
    )
    dm.add_argument(
        "--num_beams",
        type=ranged("demo", "num_beams"),
        default=3,
        help="beams shown at first (1-8)",
    )
    limit = "refused above this (default %(default)s)"
    dm.add_argument(
        "--max_file_mb",
        type=ranged("demo", "max_file_mb", float),
        default=UploadLimits.max_file_mb,
        help=limit,
    )
    dm.add_argument(
        "--max_pixels",
        type=ranged("demo", "max_pixels"),
        default=UploadLimits.max_pixels,
        help=limit,
    )
    dm.add_argument(
        "--max_question_chars",
        type=ranged("demo", "max_question_chars"),
        default=UploadLimits.max_question_chars,
        help=limit,
    )
    device_flags(dm, precision=False)


def ranged(command: str, dest: str, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type``: an int or a float within the flag's ``NUMERIC_FLAGS`` range
    (never NaN or infinite), so that a bad value stops the command as it is parsed."""
    low, high = NUMERIC_FLAGS[command][dest]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g} (got {text})")
        return value

    parse.__name__ = kind.__name__
    parse.numeric = (command, dest, kind)  # found by the test that every number has a range
    return parse


def device_flags(parser: argparse.ArgumentParser, precision: bool) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N; a run "
        "trained on any device loads on any other",
    )
    # every command that loads a run: a run folder's own setting is never honoured
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="allow the run's models to import Python from their folders (never taken from a "
        "run's stored settings)",
    )
    if precision:
        parser.add_argument(
            "--mixed_precision",
            default=None,
            choices=PRECISIONS,
            help="default: the run's setting, resolved for this device (auto: bf16 on a GPU "
            "that supports it, else fp32)",
        )

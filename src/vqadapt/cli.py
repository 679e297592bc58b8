"""Command line: parses arguments and calls the library (no logic of its own).

Each command imports the library modules it runs when it runs: torch and transformers take
seconds to import, and ``--help`` (or a refused flag) must not wait for them.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vqadapt.config import (
    DATA_FORMATS,
    ON_BAD_IMAGE,
    PRECISIONS,
    config_from_args,
    parse_run_config,
    run_config_parser,
)
from vqadapt.demo.limits import UploadLimits
from vqadapt.errors import VQAConfigError, VQAError
from vqadapt.weights import SCHEMES

# The range of every numeric flag of every command but train / plan (whose settings check
# themselves, config.py): a value outside it (0, negative, NaN, huge) is refused before
# anything loads, naming the flag. A new numeric flag needs a row (a test checks).
NUMERIC_FLAGS: dict[str, dict[str, tuple[float, float]]] = {
    "eval": {"num_beams": (1, 64), "max_eval_samples": (1, 10**9)},
    "predict": {"num_beams": (1, 64)},
    "export": {"check_questions": (1, 100_000), "tolerance": (0.0, 1.0)},
    "data synth": {"n": (2, 10_000_000), "seed": (0, 2**32 - 1)},
    "backbones tiny": {
        "text_steps": (0, 1_000_000),
        "vision_steps": (0, 1_000_000),
        "text_encoder_layers": (1, 48),
    },
    "answer-weights": {"beta": (0.0, 0.999999999), "clip": (0.0, 1e6)},
    "ablate": {"seeds": (1, 1000), "jobs": (1, 256)},
    "demo": {
        "port": (1, 65535),
        "examples": (0, 64),
        "num_beams": (1, 8),
        "max_file_mb": (0.001, 1024.0),
        "max_pixels": (1, 10**9),
        "max_question_chars": (1, 100_000),
    },
}


def _cmd_train(argv: list[str]) -> int:
    config = parse_run_config(argv)  # --help prints the flags and exits here, before torch loads
    from vqadapt.train import train

    summary = train(config)
    return 0 if summary else 1


def _cmd_plan(argv: list[str]) -> int:
    parser = run_config_parser(
        "vqadapt plan",
        "Print what would train, per tower and layer, without training (the flags of "
        "vqadapt train).",
    )
    parser.add_argument(
        "--rank_table",
        action="store_true",
        help="add exact LoRA parameter counts for r = 4..64 on each tower's targets and layers",
    )
    args, extra = parser.parse_known_args(argv)
    if extra:
        raise VQAConfigError(f"unrecognised arguments: {' '.join(extra)}")
    config = config_from_args(args)
    from vqadapt import menu
    from vqadapt.adapt import format_plan, lora_parameter_count
    from vqadapt.build import build_model, resolve_backbones

    backbones = resolve_backbones(config, log=lambda m: print(m, file=sys.stderr))
    model, plan, _, _ = build_model(config, backbones)
    print(format_plan(plan))
    if args.rank_table:
        adapt = config.adapt
        towers = ("text_encoder", "vision", "text_decoder")
        specs = {tower: menu.lora_spec(adapt, tower) for tower in towers}
        print(
            f"\nexact LoRA parameter counts ({adapt.lora_variant}; each tower's "
            "--*_lora_targets and --*_lora_layers)"
        )
        print(f"{'r':>4}" + "".join(f"{tower:>16}" for tower in towers))
        for r in (4, 8, 16, 32, 64):
            counts = [
                lora_parameter_count(
                    model, tower, specs[tower].targets, r, specs[tower].layers, adapt.lora_variant
                )
                for tower in towers
            ]
            print(f"{r:>4}" + "".join(f"{count:>16,}" for count in counts))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vqadapt.inference import evaluate_run

    scores = evaluate_run(
        args.run,
        args.split,
        args.num_beams,
        device=args.device,
        precision=args.mixed_precision,
        max_eval_samples=args.max_eval_samples,
        trust_remote_code=args.trust_remote_code,
    )
    print(
        f"{args.split}: EM {100 * scores['em']:.2f}  F1 {100 * scores['f1']:.2f}  "
        f"F1(set) {100 * scores['f1_set']:.2f}  (n={scores['n']})"
    )
    for qtype, row in scores.get("per_type", {}).items():
        print(f"  {qtype:<10} EM {100 * row['em']:6.2f}  F1 {100 * row['f1']:6.2f}  n={row['n']}")
    for bucket, row in scores.get("per_frequency", {}).items():
        print(f"  {bucket:<10} EM {100 * row['em']:6.2f}  F1 {100 * row['f1']:6.2f}  n={row['n']}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from vqadapt.inference import answer_question, load_run
    from vqadapt.text import nfc

    run = load_run(
        args.run,
        device=args.device,
        precision=args.mixed_precision,
        trust_remote_code=args.trust_remote_code,
    )
    print(answer_question(run, nfc(args.question), args.image, args.num_beams))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vqadapt.export import ExportCheckError, export_run

    try:
        report = export_run(
            args.run,
            args.out,
            checkpoint=args.checkpoint,
            merge=args.merge,
            overwrite=args.overwrite,
            questions=args.check_questions,
            tolerance=args.tolerance,
            log=lambda m: print(m, file=sys.stderr),
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    except ExportCheckError as err:
        print(json.dumps(err.report, ensure_ascii=False, indent=1))
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from vqadapt.data.synth import generate

        _check_output("--out", args.out)
        summary = generate(args.out, n=args.n, seed=args.seed)
        print(json.dumps(summary, ensure_ascii=False, indent=1))
        return 0
    if args.data_command == "check":
        from vqadapt.data.check import check_dataset

        report = check_dataset(
            args.train_file,
            args.test_file,
            args.val_file,
            args.image_root,
            args.format,
            args.language,
            args.on_bad_image,
            answer_weights=args.answer_weights,
        )
        print(report.format())
        return 0 if report.ok else 1
    from vqadapt.data.formats import load_records
    from vqadapt.data.images import ImageIndex
    from vqadapt.data.stats import dataset_stats, format_stats

    index = ImageIndex(args.image_root) if args.image_root else None
    for path in args.files:
        records = load_records(path, args.format, args.language)
        print(f"== {path}")
        print(format_stats(dataset_stats(records, index)))
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from vqadapt import embedded
    from vqadapt.tiny import build_tiny_backbones, describe

    if args.out is None:
        paths = embedded.ensure_tiny_backbones()
    else:
        _check_output("--out", args.out)
        texts, sources = embedded.tiny_backbone_texts()
        steps = {
            key: value
            for key, value in (("text_steps", args.text_steps), ("vision_steps", args.vision_steps))
            if value is not None
        }
        paths = build_tiny_backbones(
            args.out,
            texts,
            text_sources=sources,
            text_encoder_layers=args.text_encoder_layers,
            **steps,
        )
    for name, path in paths.items():
        print(f"{name}: {path}\n  {describe(path)}")
    return 0


def _cmd_answer_weights(args: argparse.Namespace) -> int:
    from vqadapt.data.formats import load_records
    from vqadapt.run_dir import refuse_overlap
    from vqadapt.weights import compute_answer_weights, save_answer_weights

    _check_output("--out", args.out, folder=False)
    refuse_overlap("--out", Path(args.out), {f"--data {p}": p for p in args.data})
    answers = [
        a for path in args.data for r in load_records(path, args.format) for a in r.answers[:1]
    ]
    weights = compute_answer_weights(
        answers, args.scheme, args.beta, tuple(args.clip) if args.clip else None
    )
    save_answer_weights(weights, args.out)
    values = sorted(weights.values())
    print(
        f"wrote {args.out}: {len(weights)} answers from {len(answers)} training samples, "
        f"weights {values[0]:.3g} .. {values[-1]:.3g} (mean over samples 1)"
    )
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from vqadapt.ablation.runner import run_study

    if args.out is not None:
        _check_output("--out", args.out)
    run_study(args)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vqadapt.demo.page import serve

    limits = UploadLimits(args.max_file_mb, args.max_pixels, args.max_question_chars)
    serve(
        args.run,
        args.host,
        args.port,
        args.examples,
        args.num_beams,
        limits,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )
    return 0


def _check_output(flag: str, out: str, folder: bool = True) -> None:
    """Refuse an output path that lies inside a vqadapt run (runs are replaced whole) or is
    the wrong kind of thing (a file where a folder goes, or the reverse)."""
    from vqadapt.run_dir import enclosing_run, is_run

    path = Path(out)
    if folder and path.exists() and not path.is_dir():
        raise VQAConfigError(f"{flag} {out} is a file, not a folder")
    if not folder and path.is_dir():
        raise VQAConfigError(f"{flag} {out} is a folder, not a file")
    outer = enclosing_run(path) or (path if folder and is_run(path) else None)
    if outer is not None:
        raise VQAConfigError(
            f"{flag} {out} lies inside the run {outer}: choose a path outside any run"
        )


def _ranged(command: str, dest: str, kind: type = int) -> Callable[[str], Any]:
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
    run_help = "run directory (vqadapt train --output_dir); its best checkpoint is used"

    ev = sub.add_parser("eval", help="evaluate a run's best checkpoint on a split")
    ev.add_argument("--run", required=True, help=run_help)
    ev.add_argument(
        "--split",
        default="test",
        choices=("val", "test", "train"),
        help="which split of the run's data (default %(default)s); writes "
        "predictions_<split>.jsonl and eval_<split>.json into the run",
    )
    ev.add_argument(
        "--num_beams",
        type=_ranged("eval", "num_beams"),
        default=None,
        help="beams (default: the run's --num_beams)",
    )
    ev.add_argument(
        "--max_eval_samples",
        type=_ranged("eval", "max_eval_samples"),
        default=None,
        help="score only the first N questions of the split (default: the run's setting; "
        "more than the split holds means all of it)",
    )
    _device_flags(ev, precision=True)

    pr = sub.add_parser("predict", help="answer one question about one image")
    pr.add_argument("--run", required=True, help=run_help)
    pr.add_argument("--question", required=True, help="the question, in Vietnamese")
    pr.add_argument(
        "--image", default=None, help="the image file (not needed by a --blind model's run)"
    )
    pr.add_argument(
        "--num_beams",
        type=_ranged("predict", "num_beams"),
        default=1,
        help="beams (default %(default)s)",
    )
    _device_flags(pr, precision=True)

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
        type=_ranged("export", "check_questions"),
        default=32,
        help="held-out questions checked (default %(default)s)",
    )
    ex.add_argument(
        "--tolerance",
        type=_ranged("export", "tolerance", float),
        default=None,
        help="largest logit difference allowed (default 1e-4, with --merge 1e-3)",
    )
    _device_flags(ex, precision=False)

    data = sub.add_parser("data", help="synthetic data and data set summaries")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="generate the synthetic Vietnamese shapes VQA set")
    synth.add_argument("--out", required=True, help="folder to write (CSV files and images/)")
    synth.add_argument(
        "--n",
        type=_ranged("data synth", "n"),
        default=10_000,
        help="questions (default %(default)s)",
    )
    synth.add_argument(
        "--seed",
        type=_ranged("data synth", "seed"),
        default=0,
        help="random seed (default %(default)s)",
    )
    format_help = "annotation format; auto: by extension (default %(default)s)"
    stats = data_sub.add_parser("stats", help="counts per type, answers, lengths, images found")
    stats.add_argument("files", nargs="+", help="annotation files (ViVQA CSV, JSON or JSONL)")
    stats.add_argument("--format", default="auto", choices=DATA_FORMATS, help=format_help)
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
    check.add_argument("--format", default="auto", choices=DATA_FORMATS, help=format_help)
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

    bb = sub.add_parser("backbones", help="tiny pretrained backbones")
    bb_sub = bb.add_subparsers(dest="backbones_command", required=True)
    tiny = bb_sub.add_parser("tiny", help="build (or show) the tiny DINOv2 + MBart")
    tiny.add_argument("--out", default=None, help="folder (default: the shared cache, built once)")
    tiny.add_argument(
        "--text_steps",
        type=_ranged("backbones tiny", "text_steps"),
        default=None,
        help="denoising steps (default 320; 0: random init)",
    )
    tiny.add_argument(
        "--vision_steps",
        type=_ranged("backbones tiny", "vision_steps"),
        default=None,
        help="vision steps (default 250; 0: random init)",
    )
    tiny.add_argument(
        "--text_encoder_layers",
        type=_ranged("backbones tiny", "text_encoder_layers"),
        default=12,
        help="text-encoder depth (12 mirrors BARTpho; fewer learn faster from little data)",
    )

    aw = sub.add_parser("answer-weights", help="per-answer loss weights (answer_weights.json)")
    aw.add_argument("--data", nargs="+", required=True, help="training annotation file(s)")
    aw.add_argument("--format", default="auto", choices=DATA_FORMATS, help=format_help)
    aw.add_argument(
        "--scheme",
        default="inverse",
        choices=SCHEMES,
        help="1/n, 1/sqrt(n) or the inverse effective number of samples (default %(default)s)",
    )
    aw.add_argument(
        "--beta",
        type=_ranged("answer-weights", "beta", float),
        default=0.999,
        help="beta of effective_number, in [0, 1) (default %(default)s)",
    )
    aw.add_argument(
        "--clip",
        type=_ranged("answer-weights", "clip", float),
        nargs=2,
        metavar=("MIN", "MAX"),
        default=None,
        help="clip the weights into [MIN, MAX] (MIN <= 1 <= MAX), keeping the mean weight 1",
    )
    aw.add_argument(
        "--out", default="answer_weights.json", help="file to write (default %(default)s)"
    )

    ab = sub.add_parser("ablate", help="run the ablation study and write its report")
    ab.add_argument(
        "--preset",
        default="quick",
        help="a preset shipped with vqadapt (quick, seed, beyond-seed, grid-example; $VQADAPT_EXPERIMENTS "
        "points elsewhere) or a YAML file (default %(default)s)",
    )
    ab.add_argument(
        "--seeds",
        type=_ranged("ablate", "seeds"),
        default=None,
        help="number of seeds (default: the preset's)",
    )
    ab.add_argument("--out", default=None, help="study folder (default: runs/ablation-<preset>)")
    ab.add_argument("--quick", action="store_true", help="the quick preset on the embedded default")
    ab.add_argument("--retry_failed", action="store_true", help="rerun cells that failed before")
    ab.add_argument("--report_only", action="store_true", help="only rebuild the report")
    ab.add_argument(
        "--jobs",
        type=_ranged("ablate", "jobs"),
        default=1,
        help="cells trained at once: each gets its own GPU (round-robin over the visible ones) "
        "or an equal share of the CPU cores",
    )
    ab.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every cell"
    )

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
        type=_ranged("demo", "port"),
        default=7860,
        help="port (default %(default)s)",
    )
    dm.add_argument(
        "--examples",
        type=_ranged("demo", "examples"),
        default=8,
        help="preloaded synthetic examples",
    )
    dm.add_argument(
        "--num_beams",
        type=_ranged("demo", "num_beams"),
        default=3,
        help="beams shown at first (1-8)",
    )
    limit = "refused above this (default %(default)s)"
    dm.add_argument(
        "--max_file_mb",
        type=_ranged("demo", "max_file_mb", float),
        default=UploadLimits.max_file_mb,
        help=limit,
    )
    dm.add_argument(
        "--max_pixels",
        type=_ranged("demo", "max_pixels"),
        default=UploadLimits.max_pixels,
        help=limit,
    )
    dm.add_argument(
        "--max_question_chars",
        type=_ranged("demo", "max_question_chars"),
        default=UploadLimits.max_question_chars,
        help=limit,
    )
    _device_flags(dm, precision=False)
    return parser


def _device_flags(parser: argparse.ArgumentParser, precision: bool) -> None:
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


def main(argv: list[str] | None = None) -> None:
    """Run one command; every error meant for the user becomes ``error: ...`` on stderr and
    an exit code, never a traceback (``VQADAPT_DEBUG=1`` shows it)."""
    from vqadapt.lifeline import die_with_parent_from_env

    die_with_parent_from_env()  # a cell of ``vqadapt ablate`` ends with its runner
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "train":
            code = _cmd_train(argv[1:])
        elif argv and argv[0] == "plan":
            code = _cmd_plan(argv[1:])
        else:
            args = build_parser().parse_args(argv)  # numbers are range-checked as parsed
            handlers = {
                "eval": _cmd_eval,
                "predict": _cmd_predict,
                "export": _cmd_export,
                "data": _cmd_data,
                "backbones": _cmd_backbones,
                "answer-weights": _cmd_answer_weights,
                "ablate": _cmd_ablate,
                "demo": _cmd_demo,
            }
            code = handlers[args.command](args)
    except VQAError as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as err:
        message = environment_error(err)
        if message is None or os.environ.get("VQADAPT_DEBUG"):
            raise  # a bug: the traceback is what a report needs
        print(f"error: {message}", file=sys.stderr)
        code = 2
    sys.exit(code)


def environment_error(err: BaseException) -> str | None:
    """A message for what the machine refused (disk, permissions, GPU memory), or None for
    an error that is a bug."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return (
            f"out of memory on the GPU ({str(err).splitlines()[0][:200]}): free the GPU, use "
            "a smaller batch, or pass --device cpu"
        )
    if not isinstance(err, OSError):
        return None
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full{where}: free some space and run the command again"
    if isinstance(err, PermissionError) or err.errno == errno.EROFS:
        return f"{err.strerror or 'permission denied'}{where}: this command cannot write there"
    if err.filename:
        return f"{err.strerror or err}{where}"
    return None

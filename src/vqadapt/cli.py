"""Command line: parses arguments and calls the library (no logic of its own).

Each command imports the library modules it runs when it runs: torch and transformers take
seconds to import, and ``--help`` (or a refused flag) must not wait for them.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from vqadapt.cli_parser import build_parser
from vqadapt.config import config_from_args, parse_run_config, run_config_parser
from vqadapt.demo.limits import UploadLimits
from vqadapt.errors import VQAConfigError, VQAError


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
        summary = generate(args.out, n=args.n, seed=args.seed, extra_test=args.extra_test)
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
        if args.text_corpus or args.text_encoder_layers != 12:
            raise VQAConfigError("--text_corpus and --text_encoder_layers need --out DIR")
        paths = embedded.ensure_tiny_backbones()
    else:
        _check_output("--out", args.out)
        if args.text_corpus:
            texts, sources = embedded.corpus_texts(args.text_corpus)
        else:
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
            parallel=True,
            # the blind spots are the embedded benchmark's; a corpus of your own gets a plain
            # text model (the vision tower is the benchmark's either way)
            benchmark_blind_spots=not args.text_corpus,
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

"""One ablation cell, in its own process: ``python -m vqadapt.ablation.cell --config cell.yaml``
(``--probe_only``: a cell that trained, whose probe was interrupted).

Trains the run exactly as ``vqadapt train --config cell.yaml`` would, then scores the final
model question by question (``probe.write_question_losses``) for the overfitting claims. A
probe that fails leaves the cell a success without ``question_losses.json`` (the report then
says those claims lack per-question losses) and the reason in ``probe_error.txt``.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from vqadapt.ablation.probe import LOSSES_FILE, write_question_losses


def main(argv: list[str] | None = None) -> int:
    """Train, then probe; the exit code is the training's (0 on success)."""
    from vqadapt.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    probe_only = "--probe_only" in argv  # trained before; only the probe was interrupted
    argv = [arg for arg in argv if arg != "--probe_only"]
    if not probe_only:
        try:
            cli_main(["train", *argv])
        except SystemExit as done:
            if done.code not in (0, None):
                return int(done.code) if isinstance(done.code, int) else 1
    from vqadapt.config import parse_run_config

    run_dir = Path(parse_run_config(argv).train.output_dir)
    if (run_dir / "summary.json").is_file() and not (run_dir / LOSSES_FILE).is_file():
        try:
            path = write_question_losses(run_dir)
            print(f"per-question losses of the final model: {path}")
        except Exception:  # the cell trained; its probe is optional evidence
            (run_dir / "probe_error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            print(f"probe failed (see {run_dir / 'probe_error.txt'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

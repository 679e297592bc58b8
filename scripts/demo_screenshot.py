"""Make the README's screenshot of the demo page (docs/demo.png) in headless Chromium.

    python scripts/demo_screenshot.py --run runs/ablation-quick/lora_r32/seed0 --out docs/demo.png

Starts ``vqadapt demo`` on a free local port, clicks a preloaded example (by default the first
one the run answers correctly; ``--example N`` picks another), checks that the page shows the
library's answer, and saves the page as a palette PNG (small enough to commit). Needs the
``dev`` and ``demo`` extras and /usr/bin/chromium (Debian's ``chromium`` package).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

from vqadapt.demo.browser import ask, chromium_page, demo_server
from vqadapt.demo.core import demo_examples, explain_answer
from vqadapt.inference import load_run
from vqadapt.metrics import exact_match


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run directory")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument(
        "--example", type=int, default=None, help="example index (default: see above)"
    )
    parser.add_argument("--examples", type=int, default=6, help="examples listed on the page")
    parser.add_argument("--width", type=int, default=1100, help="browser width in pixels")
    parser.add_argument("--colours", type=int, default=128, help="palette size of the PNG")
    args = parser.parse_args()

    run = load_run(args.run)
    examples = demo_examples(run, args.examples)
    answers = [explain_answer(run, e.question, e.image, 3).answer for e in examples]
    index = args.example
    if index is None:
        correct = [i for i, e in enumerate(examples) if exact_match(answers[i], [e.answer])]
        index = correct[0] if correct else 0
    example = examples[index]
    with (
        tempfile.TemporaryDirectory() as profile,
        demo_server(args.run, ["--examples", str(args.examples)]) as url,
        chromium_page(profile, width=args.width, height=800) as page,
    ):
        shown = ask(page, url, example.question, example=f"{example.question} ({example.answer})")
        if shown != answers[index]:
            print(f"the page shows {shown!r}, the library {answers[index]!r}", file=sys.stderr)
            return 1
        shot = Path(profile) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        image = Image.open(shot).convert("RGB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(args.colours, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {image.size[0]} x {image.size[1]}, {out.stat().st_size / 1024:.0f} KiB")
    print(f"example {index}: {example.question!r} -> {shown!r} (reference {example.answer!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

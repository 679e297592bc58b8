"""The Gradio page of ``vqadapt demo``: layout and event wiring only (the logic is in ``core``).

Gradio is imported here alone, lazily, with its telemetry and version check off; the page is
served locally without share links or server-side rendering, and its fonts come from Gradio's
own static files, so it works with no network (the browser test checks that every request the
page makes stays on the local server).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vqadapt.demo.core import (
    DemoAnswer,
    Example,
    attention_overlay,
    demo_examples,
    explain_answer,
)
from vqadapt.demo.limits import MB, UploadLimits
from vqadapt.errors import VQAConfigError, VQADataError
from vqadapt.inference import LoadedRun, load_run

BEAM_HEADERS = ["#", "answer", "score", "log-prob", "probability"]
MAX_BEAMS = 8


def import_gradio() -> Any:
    """Gradio, with analytics and the update check switched off before it loads."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError:
        raise VQAConfigError(
            "the demo page needs gradio: pip install -e '.[demo]' (scripts/setup.sh does)"
        ) from None
    return gradio


def beam_rows(result: DemoAnswer) -> list[list[Any]]:
    """The beams as table rows: rank, answer, score, log-prob, probability (percent)."""
    return [
        [rank, beam.answer, round(beam.score, 4), round(beam.log_prob, 4), _percent(beam.log_prob)]
        for rank, beam in enumerate(result.beams, start=1)
    ]


def _percent(log_prob: float) -> str:
    import math

    return f"{100 * math.exp(log_prob):.1f}%"


def attention_caption(result: DemoAnswer) -> str:
    """What the overlay shows, in numbers."""
    if result.attention is None:
        return (
            "This run is **blind** (trained with `--blind`, question only): it does not see the "
            "image, so there is no attention map."
        )
    attention = result.attention
    rows, cols = attention.grid
    return (
        f"Decoder cross-attention onto the {rows} x {cols} image patches, averaged over layers, "
        f"heads and the answer's tokens (red: the most attended patch; uncoloured: the least). "
        f"Of all its attention the decoder gave {100 * attention.patches.sum():.1f}% to "
        f"the patches, {100 * attention.prefix_share:.1f}% to the CLS token and "
        f"{100 * attention.text_share:.1f}% to the question."
    )


def _run_description(run: LoadedRun) -> str:
    vision = f"`{_short(run.backbones.vision)}`" if run.backbones.vision else "none (blind run)"
    return f"Run `{_short(run.run_dir)}` · vision {vision} · text `{_short(run.backbones.text)}`"


def _short(path: str | Path) -> str:
    """A folder relative to the working directory when it is below it (hub ids stay as they are)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def build_page(
    run: LoadedRun,
    examples: list[Example],
    limits: UploadLimits | None = None,
    num_beams: int = 3,
) -> Any:
    """The page (a ``gradio.Blocks``), not yet launched."""
    gr = import_gradio()
    limits = limits or UploadLimits()
    blind = run.model.vision is None

    def ask(image: str | None, question: str, beams: float) -> tuple:
        try:
            result = explain_answer(run, question, image, int(beams), limits)
        except VQADataError as err:
            raise gr.Error(str(err), title="Cannot answer") from None
        return (
            result.answer,
            beam_rows(result),
            attention_overlay(result),
            attention_caption(result),
        )

    with gr.Blocks(title="vqadapt demo", analytics_enabled=False) as page:
        gr.Markdown(f"## Vietnamese visual question answering\n{_run_description(run)}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    sources=["upload"],
                    label="Image" + (" (not used: blind run)" if blind else ""),
                    elem_id="image",
                )
                question = gr.Textbox(
                    label="Question (Vietnamese)",
                    placeholder="hình màu đỏ là hình gì",
                    max_length=limits.max_question_chars,
                    elem_id="question",
                )
                beams = gr.Slider(
                    1, MAX_BEAMS, value=max(1, min(num_beams, MAX_BEAMS)), step=1, label="Beams"
                )
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
                gr.Markdown(
                    f"Images up to {limits.max_file_mb:g} MB and {limits.max_pixels:,} pixels."
                )
                if examples:
                    gr.Examples(
                        [[str(example.image), example.question] for example in examples],
                        inputs=[image, question],
                        label="Examples: test questions of the synthetic set (reference answer in brackets)",
                        example_labels=[
                            f"{example.question} ({example.answer})" for example in examples
                        ],
                        examples_per_page=len(examples),
                    )
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                table = gr.Dataframe(
                    headers=BEAM_HEADERS,
                    label="Beam search answers, best first",
                    interactive=False,
                    elem_id="beams",
                )
                gr.Markdown(
                    "score = the length-normalised log-probability beam search ranks by (the "
                    "mean token log-probability); log-prob = its sum over the answer's tokens; "
                    "probability = exp(log-prob), the model's probability of that exact answer."
                )
                overlay = gr.Image(
                    label="Where the decoder looked", interactive=False, elem_id="attention"
                )
                caption = gr.Markdown(elem_id="attention-caption")
        outputs = [answer, table, overlay, caption]
        submit.click(ask, [image, question, beams], outputs, concurrency_limit=1)
        question.submit(ask, [image, question, beams], outputs, concurrency_limit=1)
    return page


def launch(
    page: Any,
    host: str = "127.0.0.1",
    port: int = 7860,
    limits: UploadLimits | None = None,
    allowed_paths: Sequence[Path] = (),
    block: bool = True,
) -> Any:
    """Serve the page locally: no share link, no telemetry, no server-side rendering."""
    limits = limits or UploadLimits()
    return page.launch(
        server_name=host,
        server_port=port,
        share=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        max_file_size=int(limits.max_file_mb * MB),  # Gradio refuses bigger uploads itself
        allowed_paths=[str(path) for path in allowed_paths],
        prevent_thread_lock=not block,
        inbrowser=False,
    )


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 7860,
    examples: int = 8,
    num_beams: int = 3,
    limits: UploadLimits | None = None,
    block: bool = True,
    device: str = "auto",
    trust_remote_code: bool = False,
) -> Any:
    """Load a run onto ``device`` and serve its demo page (blocks until Ctrl+C unless
    ``block`` is False). ``trust_remote_code``: from the command line only (see load_run)."""
    import_gradio()  # fail before the model loads when the extra is missing
    run = load_run(run_dir, device=device, trust_remote_code=trust_remote_code)
    chosen = demo_examples(run, examples)
    page = build_page(run, chosen, limits, num_beams)
    folders = sorted({example.image.parent for example in chosen})
    return launch(page, host, port, limits, folders, block)

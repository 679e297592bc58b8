"""The demo page: its library (answer, beams, attention map, limits, examples) and a real browser.

The unit tests call ``vqadapt.demo.core`` on two tiny trained runs (with and without images).
The browser test starts ``vqadapt demo`` in a subprocess and drives Debian's headless Chromium
through Playwright: it uploads an image, then clicks an example, and checks that the page shows
the library's answers, that an oversized image is refused with the limit named, and that no
request leaves the local server.
"""

from __future__ import annotations

import math
import types
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from vqadapt import cli, embedded
from vqadapt.config import parse_run_config
from vqadapt.data.formats import load_vivqa_csv
from vqadapt.demo import core
from vqadapt.demo.browser import CHROMIUM
from vqadapt.demo.core import attention_overlay, demo_examples, explain_answer
from vqadapt.demo.limits import MB, UploadLimits, check_question, check_upload
from vqadapt.errors import VQADataError
from vqadapt.inference import LoadedRun, answer_question, load_run, question_batch
from vqadapt.train import train


def _train(vqa_env, out: Path, *extra: str) -> Path:
    """A tiny run; the high learning rate and small batches give varied, non-empty answers."""
    flags = ["--batch_size", "4", "--lr", "1e-2", "--epochs", "2", *extra]
    summary = train(parse_run_config(vqa_env.argv(out, *flags)))
    assert summary["status"] == "success"
    return out


@pytest.fixture(scope="module")
def vision_run_dir(vqa_env, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(vqa_env, tmp_path_factory.mktemp("demo") / "run")


@pytest.fixture(scope="module")
def vision_run(vision_run_dir: Path) -> LoadedRun:
    return load_run(vision_run_dir)


@pytest.fixture(scope="module")
def blind_run(vqa_env, tmp_path_factory: pytest.TempPathFactory) -> LoadedRun:
    return load_run(_train(vqa_env, tmp_path_factory.mktemp("demo") / "blind", "--blind"))


@pytest.fixture(scope="module")
def questions(vqa_env) -> list[tuple[Path, str]]:
    """(image, question) pairs of the test split, one per type."""
    seen: dict[str | None, tuple[Path, str]] = {}
    for record in load_vivqa_csv(vqa_env.data / "test.csv"):
        seen.setdefault(
            record.qtype, (vqa_env.data / "images" / f"{record.image}.png", record.question)
        )
    return list(seen.values())


# -- the library ------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams", [1, 3])
def test_answer_is_what_predict_answers(vision_run: LoadedRun, questions, num_beams: int) -> None:
    for image, question in questions:
        result = explain_answer(vision_run, question, image, num_beams)
        assert result.answer == answer_question(vision_run, question, image, num_beams)
        assert result.answer == result.beams[0].answer
        assert len(result.beams) == num_beams


def test_beams_are_sorted_and_scored_as_beam_search(vision_run: LoadedRun, questions) -> None:
    image, question = questions[0]
    result = explain_answer(vision_run, question, image, num_beams=4)
    assert len(result.beams) == 4
    scores = [beam.score for beam in result.beams]
    assert scores == sorted(scores, reverse=True)
    for beam in result.beams:
        assert beam.log_prob <= 0 and beam.tokens >= 1
        assert beam.score == pytest.approx(beam.log_prob / beam.tokens, abs=1e-6)
    # distinct sequences of one distribution: their probabilities add up to at most 1
    assert sum(math.exp(beam.log_prob) for beam in result.beams) <= 1 + 1e-6
    # the score is the one beam search itself ranks by
    with torch.no_grad():
        out = vision_run.model.generate(
            question_batch(vision_run, question, image),
            max_new_tokens=vision_run.config.data.max_answer_tokens,
            num_beams=4,
            num_return_sequences=4,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert scores == pytest.approx(out.sequences_scores.tolist(), abs=1e-4)


def test_attention_map_covers_the_patch_grid(vision_run: LoadedRun, questions) -> None:
    grid = vision_run.preprocessing.crop // vision_run.model.vision.config.patch_size
    maps = []
    for image, question in questions[:2]:
        result = explain_answer(vision_run, question, image)
        attention = result.attention
        assert attention is not None and attention.grid == (grid, grid)
        assert (attention.patches >= 0).all()
        # every decoder position's attention sums to 1 over [text ; CLS ; patches]
        total = attention.patches.sum() + attention.text_share + attention.prefix_share
        assert total == pytest.approx(1.0, abs=1e-5)
        assert 0 < attention.patches.sum() < 1
        assert attention.normalised.sum() == pytest.approx(1.0, abs=1e-9)
        assert result.image is not None and result.image.shape == (
            vision_run.preprocessing.crop,
            vision_run.preprocessing.crop,
            3,
        )
        overlay = attention_overlay(result, size=grid * 20)
        assert overlay.size == (grid * 20, grid * 20) and overlay.mode == "RGB"
        maps.append(attention.patches)
    assert not np.allclose(maps[0], maps[1])  # another image and question, another map


def test_blind_run_answers_without_an_image(blind_run: LoadedRun, questions) -> None:
    image, question = questions[1]
    result = explain_answer(blind_run, question, None, num_beams=2)
    assert result.attention is None and result.image is None
    assert attention_overlay(result) is None
    assert result.answer == answer_question(blind_run, question, None, 2)
    # an image given to a blind run is ignored, not an error
    assert explain_answer(blind_run, question, image, num_beams=2).beams == result.beams


def test_limits_refuse_with_a_clear_message(vision_run: LoadedRun, questions, tmp_path) -> None:
    image, question = questions[0]
    with pytest.raises(VQADataError, match=r"at most 0.001 MB \(vqadapt demo --max_file_mb\)"):
        explain_answer(vision_run, question, image, limits=UploadLimits(max_file_mb=0.001))
    with pytest.raises(VQADataError, match=r"112 x 112 pixels; .* at most 10,000 pixels"):
        explain_answer(vision_run, question, image, limits=UploadLimits(max_pixels=10_000))
    # a decompression bomb: 400 megapixels in a 50 KB file, refused from its header alone
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20_000, 20_000)).save(bomb)
    assert bomb.stat().st_size < 0.1 * MB
    with pytest.raises(VQADataError, match="larger than PIL's bomb limit"):
        check_upload(bomb, UploadLimits())
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    with pytest.raises(VQADataError, match="not a readable image"):
        explain_answer(vision_run, question, text)
    with pytest.raises(VQADataError, match="upload an image or pick an example"):
        explain_answer(vision_run, question, None)
    with pytest.raises(VQADataError, match="type a question first"):
        explain_answer(vision_run, "  ", image)
    with pytest.raises(VQADataError, match="the question has 301 characters"):
        check_question("a" * 301, UploadLimits())
    assert check_question(" có mấy hình \n", UploadLimits()) == "có mấy hình"


def test_examples_come_from_the_runs_synthetic_set(vqa_env, vision_run: LoadedRun) -> None:
    examples = demo_examples(vision_run, 8)
    assert len(examples) == 8
    assert len({example.image for example in examples}) == 8
    assert {example.qtype for example in examples} == {"object", "number", "colour", "location"}
    assert all(example.image.parent == vqa_env.data / "images" for example in examples)
    assert all(example.image.is_file() for example in examples)
    assert demo_examples(vision_run, 8) == examples  # the same every time
    assert demo_examples(vision_run, 0) == []


def test_examples_fall_back_to_the_embedded_set(
    vision_run: LoadedRun, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run on other data (no synthetic README beside its train file) gets the embedded set."""
    other = tmp_path / "vivqa"
    other.mkdir()
    (other / "train.csv").write_text(",question,answer,img_id,type\n", encoding="utf-8")
    monkeypatch.setattr(embedded, "ensure_synthetic", lambda log=print: tmp_path / "embedded")
    data = types.SimpleNamespace(train_file=str(other / "train.csv"))
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(data=data), backbones=vision_run.backbones
    )
    assert core.synthetic_folder(fake) == tmp_path / "embedded"


def test_cli_flags_default_to_the_limits() -> None:
    args = cli.build_parser().parse_args(["demo", "--run", "runs/x"])
    limits = UploadLimits()
    assert (args.max_file_mb, args.max_pixels, args.max_question_chars) == (
        limits.max_file_mb,
        limits.max_pixels,
        limits.max_question_chars,
    )
    assert (args.host, args.port, args.examples, args.num_beams) == ("127.0.0.1", 7860, 8, 3)


def test_page_tells_a_blind_run_apart(
    vision_run: LoadedRun, blind_run: LoadedRun, questions
) -> None:
    from vqadapt.demo.page import attention_caption, beam_rows, build_page

    image, question = questions[2]
    blind = explain_answer(blind_run, question, None, num_beams=2)
    assert "blind" in attention_caption(blind) and "no attention map" in attention_caption(blind)
    seeing = explain_answer(vision_run, question, image, num_beams=2)
    grid = vision_run.preprocessing.crop // vision_run.model.vision.config.patch_size
    assert f"{grid} x {grid} image patches" in attention_caption(seeing)
    rows = beam_rows(seeing)
    assert [row[0] for row in rows] == [1, 2] and rows[0][1] == seeing.answer
    assert rows[0][4] == f"{100 * math.exp(seeing.beams[0].log_prob):.1f}%"
    page = build_page(blind_run, demo_examples(blind_run, 2))
    assert page.analytics_enabled is False
    assert "not used: blind run" in str(page.config)


# -- the page in a real browser ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} not installed (apt-get install chromium)"
)
def test_page_in_headless_chromium(
    vision_run_dir: Path,
    vision_run: LoadedRun,
    questions,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vqadapt.demo.browser import ask, chromium_page, demo_server

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two cores: the page and the browser share them
    image, question = questions[0]
    expected = explain_answer(vision_run, question, image, num_beams=3).answer
    example = demo_examples(vision_run, 4)[1]
    expected_example = explain_answer(vision_run, example.question, example.image, 3).answer
    too_big = tmp_path / "big.png"
    Image.new("RGB", (200, 200), "white").save(too_big)

    flags = ["--examples", "4", "--max_pixels", "20000"]
    with (
        demo_server(vision_run_dir, flags, log=tmp_path / "demo.log") as url,
        chromium_page(tmp_path / "profile") as page,
    ):
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        assert ask(page, url, question, image=image) == expected
        assert "beam search" in page.locator("#beams").inner_text().lower()
        assert page.locator("#attention img").count() == 1
        page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)

        label = f"{example.question} ({example.answer})"
        assert ask(page, url, example.question, example=label) == expected_example

        with pytest.raises(RuntimeError, match=r"200 x 200 pixels; .* at most 20,000 pixels"):
            ask(page, url, question, image=too_big)
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    hosts = {urlsplit(request).netloc for request in requests if not request.startswith("data:")}
    assert hosts == {urlsplit(url).netloc}, "the page must work offline: only local requests"

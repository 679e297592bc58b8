"""The whole-data-set checker on real bad bytes: every problem, named, in one call."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqadapt.data import check
from vqadapt.data.check import CheckReport, Problem, check_dataset, check_file, check_images
from vqadapt.data.formats import load_records
from vqadapt.data.records import VQARecord
from vqadapt.errors import VQAConfigError, VQADataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIVQA_TRAIN = SHARED / "vivqa" / "train.csv"
VIVQA_TEST = SHARED / "vivqa" / "test.csv"
EVJVQA = SHARED / "evjvqa" / "evjvqa_public_test-lang-qtype-answer.json"
HEADER = ",question,answer,img_id,type\n"
NFD_QUESTION = unicodedata.normalize("NFD", "màu của chiếc bình là gì")


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def _where(problems: list[Problem]) -> set[tuple]:
    """(row, field, severity, kind) of each problem, to compare whole sets at once."""
    return {(p.row, p.field, p.severity, p.kind) for p in problems}


def _assert_named(problems: list[Problem], path: Path) -> None:
    """Every message names the file, and its row and field when it has them."""
    for problem in problems:
        text = str(problem)
        assert problem.file == str(path)
        assert text.startswith(str(path)), text
        if problem.row is not None:
            assert f"row {problem.row}" in text, text
        if problem.field is not None:
            assert f"field {problem.field!r}" in text, text


# ---------------------------------------------------------------------- Problem / report


def test_problem_reads_like_a_data_error() -> None:
    problem = Problem("train.csv", 12, "answer", "empty answer", "error")
    assert str(problem) == "train.csv, row 12, field 'answer': empty answer"
    assert str(VQADataError("empty answer", file="train.csv", row=12, field="answer")) == str(
        problem
    )
    assert str(Problem("w.json", None, None, "bad", "warning")) == "w.json: bad"
    with pytest.raises(ValueError, match="severity"):
        Problem("a.csv", 1, None, "x", "fatal")


def test_report_groups_counts_and_truncates() -> None:
    problems = [
        Problem("t.csv", i, "answer", "empty answer", "error", "empty answer") for i in (1, 2, 3)
    ]
    problems.append(
        Problem("t.csv", 4, "question", "not NFC; normalised on load", "warning", "not NFC")
    )
    report = CheckReport(problems, {"records": {"t.csv": 7}}, [])
    assert not report.ok
    assert (len(report.errors), len(report.warnings)) == (3, 1)
    text = report.format(max_per_kind=2)
    assert text.splitlines()[0] == "data check FAILED: 3 error(s), 1 warning(s)"
    assert "  empty answer (3):" in text
    assert "t.csv, row 2, field 'answer': empty answer" in text
    assert "t.csv, row 3" not in text
    assert "    ... and 1 more" in text
    assert "  not NFC (1):" in text
    assert "records: t.csv 7" in text
    assert CheckReport([], {}, []).ok
    assert CheckReport([], {}, []).format().startswith("data check OK: 0 error(s)")


# ---------------------------------------------------------------------------------- CSV


def test_csv_every_problem_in_one_call(tmp_path: Path) -> None:
    long_question = "câu hỏi " * 80  # 639 characters once stripped
    path = _write(
        tmp_path / "train.csv",
        HEADER
        + "0,màu của chiếc bình là gì,màu xanh lá,1,2\n"  # row 1: fine
        + "1,,màu trắng,2,2\n"  # row 2: empty question
        + "2,có bao nhiêu con mèo,  ,3,1\n"  # row 3: empty answer
        + "3,đây là cái gì,?!,4,0\n"  # row 4: punctuation only
        + "4,đây là cái gì,cái bàn,5,7\n"  # row 5: unknown type code
        + "4,kia là cái gì,cái ghế,6,0\n"  # row 6: duplicate id
        + "6,đây là cái gì,nan,7,0\n"  # row 7: pandas NaN as text
        + "7,đây là cái gì,cái bàn,nan,1.0\n"  # row 8: two bad fields
        + f"8,{NFD_QUESTION},màu đỏ,9,2\n"  # row 9: NFD (warning, record kept)
        + f"9,{long_question},con chó,10,0\n"  # row 10: long (warning, record kept)
        + "10,có mấy con,hai,11,1,extra\n"  # row 11: too many fields
        + "11,,,12,9\n",  # row 12: three bad fields
    )
    records, problems = check_file(path)
    assert _where(problems) == {
        (2, "question", "error", "empty question"),
        (3, "answer", "error", "empty answer"),
        (4, "answer", "error", "answer without letters or digits"),
        (5, "type", "error", "unknown type code"),
        (6, "id", "error", "duplicate id"),
        (7, "answer", "error", "missing value (NaN)"),
        (8, "img_id", "error", "bad img_id"),
        (8, "type", "error", "unknown type code"),
        (9, "question", "warning", "not NFC"),
        (10, "question", "warning", "long question"),
        (11, None, "error", "field count"),
        (12, "question", "error", "empty question"),
        (12, "answer", "error", "empty answer"),
        (12, "type", "error", "unknown type code"),
    }
    _assert_named(problems, path)
    messages = {(p.row, p.field): p.message for p in problems}
    assert "first used on row 5" in messages[(6, "id")]
    assert "a missing value" in messages[(8, "img_id")]
    assert "written as a float" in messages[(8, "type")]
    assert messages[(9, "question")] == "not NFC; normalised on load"
    assert "639 characters" in messages[(10, "question")]
    assert [r.id for r in records] == ["0", "8", "9"]
    assert records[1].question == unicodedata.normalize("NFC", NFD_QUESTION)


def test_csv_misspelled_column_is_one_file_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ",questoin,answer,img_id,Type\n0,a,b,1,0\n1,,,x,9\n")
    records, problems = check_file(path)
    assert records == []
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.row, problem.field, problem.severity) == (None, "question", "error")
    assert "did you mean 'questoin' for 'question', 'Type' for 'type'?" in problem.message
    assert str(problem).startswith(f"{path}, field 'question': missing column(s)")


def test_csv_wrong_delimiter(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", ";question;answer;img_id;type\n0;màu gì;đỏ;1;2\n")
    records, problems = check_file(path)
    assert records == []
    assert [(p.severity, p.kind) for p in problems] == [("error", "columns")]
    assert "';' as the delimiter" in problems[0].message


@pytest.mark.parametrize("name", ["t.csv", "t.json", "t.jsonl"])
@pytest.mark.parametrize("content", [b"", b"  \n\r\n\t"])
def test_empty_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = _write(tmp_path / name, content)
    assert check_file(path) == (
        [],
        [Problem(str(path), None, None, "empty file", "error", "empty file")],
    )


def test_csv_header_only(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", HEADER + "\n\n")
    records, problems = check_file(path)
    assert records == []
    assert [str(p) for p in problems] == [f"{path}: no data rows (the file has a header only)"]


def test_csv_latin1_bytes_name_each_row(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.csv",
        HEADER.encode()
        + b"0,what is this,a dog,1,0\n"
        + b"1,what is this,caf\xe9,2,0\n"  # latin-1 'é'
        + b"2,what is this,a cat,3,0\n"
        + b"3,na\xefve question,a cat,4,0\n",  # latin-1 'ï'
    )
    records, problems = check_file(path)
    assert _where(problems) == {
        (2, "answer", "error", "not UTF-8"),
        (4, "question", "error", "not UTF-8"),
    }
    _assert_named(problems, path)
    assert "byte 0xe9" in str(problems[0]) and "byte 0xef" in str(problems[1])
    assert [r.id for r in records] == ["0", "2"]


def test_bad_bytes_outside_a_checked_field_still_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", b'{"images": [], "annotations": [], "note": "\xff"}')
    _, problems = check_file(path)
    assert any(p.kind == "not UTF-8" and "line 1" in p.message for p in problems)


def test_utf16_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.csv", (HEADER + "0,a,b,1,0\n").encode("utf-16"))
    records, problems = check_file(path)
    assert records == [] and len(problems) == 1 and "UTF-16" in problems[0].message


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("t.csv", HEADER + "0,màu gì,đỏ,1,2\n"),
        ("t.jsonl", '{"question": "màu gì", "answer": "đỏ", "image": "1.jpg"}\n'),
        (
            "t.json",
            '{"images": [{"id": 1, "filename": "1.jpg"}], '
            '"annotations": [{"image_id": 1, "question": "màu gì", "answer": "đỏ"}]}',
        ),
    ],
)
def test_bom_is_accepted(tmp_path: Path, name: str, content: str) -> None:
    plain = _write(tmp_path / "plain" / name, content)
    bom = _write(tmp_path / "bom" / name, b"\xef\xbb\xbf" + content.encode())
    records, problems = check_file(bom)
    assert problems == []
    assert records == check_file(plain)[0] == load_records(bom)


class _WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per word plus BOS and EOS."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        extra = 2 if add_special_tokens else 0
        return {"input_ids": [[7] * (len(t.split()) + extra) for t in texts]}


def test_long_questions_with_a_tokenizer(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "t.csv",
        HEADER + "0,một hai ba,đỏ,1,2\n1,một hai ba bốn năm,đỏ,1,2\n2,một hai ba bốn,đỏ,1,2\n",
    )
    records, problems = check_file(path, max_question_tokens=6, tokenizer=_WordTokenizer())
    assert len(records) == 3
    assert [str(p) for p in problems] == [
        f"{path}, row 2, field 'question': question has 7 tokens; will be truncated to 6 tokens"
    ]
    assert problems[0].severity == "warning"
    # Without a tokenizer, whitespace words are a lower bound on tokens.
    _, problems = check_file(path, max_question_tokens=4)
    assert [(p.row, p.kind) for p in problems] == [(2, "long question")]
    assert "5 words" in problems[0].message and "truncated to 4 tokens" in problems[0].message


def test_tokenizer_failure_is_a_problem(tmp_path: Path) -> None:
    def broken(texts: list[str], add_special_tokens: bool = True) -> dict:
        raise RuntimeError("no vocabulary")

    path = _write(tmp_path / "t.csv", HEADER + "0,màu gì,đỏ,1,2\n")
    _, problems = check_file(path, max_question_tokens=8, tokenizer=broken)
    assert [(p.severity, p.kind) for p in problems] == [("error", "tokenizer")]


# --------------------------------------------------------------------------------- JSON


def test_json_every_problem_in_one_call(tmp_path: Path) -> None:
    document = {
        "images": [{"id": 1, "filename": "a.jpg"}, {"id": 2, "filename": ""}, {"id": 3}],
        "annotations": [
            {"id": 0, "image_id": 1, "question": "màu gì", "answer": "đỏ"},  # fine
            {"id": 1, "image_id": 1, "question": "  ", "answer": "đỏ"},
            {"id": 2, "image_id": 1, "question": "màu gì", "answer": float("nan")},
            {"id": 3, "image_id": 9, "question": "màu gì", "answer": "đỏ"},
            {"id": 0, "image_id": 1, "question": "màu gì", "answer": "xanh"},
            {"id": 5, "image_id": 1, "question": "màu gì", "answer": []},
            "not an annotation",
            {"id": 7, "image_id": 1, "question": "màu gì", "answer": "đỏ", "question_type": 3},
            {"id": 8, "image_id": 1, "question": NFD_QUESTION, "answer": ["đỏ", "..."]},
            {"id": 9, "image_id": 1, "answer": "đỏ"},
            {"id": 10, "image_id": 2, "question": "màu gì", "answer": "đỏ"},  # bad image entry
            {"id": 11, "image_id": 1, "question": NFD_QUESTION, "answer": "đỏ"},  # warning only
        ],
    }
    path = _write(tmp_path / "t.json", json.dumps(document, ensure_ascii=False))
    records, problems = check_file(path)
    assert _where(problems) == {
        ("images[1]", "filename", "error", "empty filename"),
        ("images[2]", None, "error", "bad image entry"),
        (1, "question", "error", "empty question"),
        (2, "answer", "error", "missing value (NaN)"),
        (3, "image_id", "error", "image_id not listed"),
        (4, "id", "error", "duplicate id"),
        (5, "answer", "error", "empty answer"),
        (6, None, "error", "not an object"),
        (7, "question_type", "error", "not text"),
        (8, "question", "warning", "not NFC"),
        (8, "answer", "error", "answer without letters or digits"),
        (9, "question", "error", "missing field"),
        (11, "question", "warning", "not NFC"),
    }
    _assert_named(problems, path)
    assert [r.id for r in records] == ["0", "11"]


def test_json_misspelled_key_is_one_file_error(tmp_path: Path) -> None:
    annotations = [{"image_id": 1, "questoin": f"q{i}", "answer": "a"} for i in range(5)]
    path = _write(
        tmp_path / "t.json",
        json.dumps({"images": [{"id": 1, "filename": "a.jpg"}], "annotations": annotations}),
    )
    records, problems = check_file(path)
    assert records == [] and len(problems) == 1
    assert (problems[0].field, problems[0].kind) == ("question", "columns")
    assert "did you mean 'questoin' for 'question'?" in problems[0].message


def test_json_misspelled_top_level_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", json.dumps({"images": [], "annotation": []}))
    _, problems = check_file(path)
    assert len(problems) == 1 and "did you mean 'annotation' for 'annotations'?" in str(problems[0])


def test_json_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.json", '{"images": [], "annotations": [}\n')
    _, problems = check_file(path)
    assert len(problems) == 1 and "not valid JSON" in problems[0].message
    assert "line 1, column 32" in problems[0].message


def test_json_latin1_bytes_name_the_annotation(tmp_path: Path) -> None:
    good = b'{"image_id": 1, "question": "what", "answer": "tea"}'
    bad = b'{"image_id": 1, "question": "what", "answer": "caf\xe9"}'
    path = _write(
        tmp_path / "t.json",
        b'{"images": [{"id": 1, "filename": "a.jpg"}], "annotations": ['
        + b", ".join([good, bad, good])
        + b"]}",
    )
    records, problems = check_file(path)
    assert _where(problems) == {(1, "answer", "error", "not UTF-8")}
    assert [r.id for r in records] == ["0", "2"]


def test_language_filter(tmp_path: Path) -> None:
    annotations = [
        {"image_id": 1, "question": "what", "answer": "tea", "language": "en"},
        {"image_id": 1, "question": "gì", "answer": "trà", "language": "vi"},
    ]
    doc = {"images": [{"id": 1, "filename": "a.jpg"}], "annotations": annotations}
    path = _write(tmp_path / "t.json", json.dumps(doc))
    records, problems = check_file(path, language="vi")
    assert problems == [] and [r.id for r in records] == ["1"]
    _, problems = check_file(path, language="ja")
    assert [p.kind for p in problems] == ["language filter"] and "['en', 'vi']" in str(problems[0])
    csv_path = _write(tmp_path / "t.csv", HEADER + "0,a,b,1,0\n")
    _, problems = check_file(csv_path, language="vi")
    assert [p.field for p in problems] == ["language"]


# -------------------------------------------------------------------------------- JSONL


def test_jsonl_every_problem_in_one_call(tmp_path: Path) -> None:
    lines = [
        b'{"id": "a", "question": "q", "answer": "x", "image": "1.png", "type": 0}',
        b'{"question": "q", "answer": ',  # line 2: not JSON
        b"[1, 2]",  # line 3: not an object
        b'{"question": "q", "answer": "x"}',  # line 4: no image
        b'{"question": "q", "answer": "x", "answers": ["y"], "image": null}',  # line 5
        b'{"question": "q", "answers": [], "image": null}',  # line 6
        b'{"question": "q", "answer": "x", "image": null, "type": 9}',  # line 7
        b'{"id": "a", "question": "q", "answer": "x", "image": null}',  # line 8: duplicate
        b'{"question": NaN, "answer": "x", "image": null}',  # line 9
        b'{"question": "caf\xe9?", "answer": "x", "image": null}',  # line 10: latin-1
        b"",
        b'{"question": "q2", "answers": ["x", "y"], "image": 7}',  # line 12: fine
    ]
    path = _write(tmp_path / "t.jsonl", b"\n".join(lines) + b"\n")
    records, problems = check_file(path)
    assert _where(problems) == {
        (2, None, "error", "not JSON"),
        (3, None, "error", "not an object"),
        (4, "image", "error", "missing field"),
        (5, "answer", "error", "missing field"),
        (6, "answers", "error", "empty answers"),
        (7, "type", "error", "unknown type code"),
        (8, "id", "error", "duplicate id"),
        (9, "question", "error", "missing value (NaN)"),
        (10, "question", "error", "not UTF-8"),
    }
    _assert_named(problems, path)
    assert records == [
        VQARecord("a", "q", ("x",), "1.png", "object"),
        VQARecord("12", "q2", ("x", "y"), "7", None),
    ]


def test_jsonl_misspelled_key_is_one_file_error(tmp_path: Path) -> None:
    text = "".join(f'{{"question": "q{i}", "answer": "x", "img": "{i}.jpg"}}\n' for i in range(4))
    path = _write(tmp_path / "t.jsonl", text)
    records, problems = check_file(path)
    assert records == [] and len(problems) == 1
    assert (problems[0].field, problems[0].kind) == ("image", "columns")
    assert "did you mean 'img' for 'image'?" in problems[0].message


# ----------------------------------------------------------------------------- dispatch


def test_unreadable_inputs_are_problems_not_exceptions(tmp_path: Path) -> None:
    for path, fmt, expected in [
        (tmp_path / "missing.csv", "auto", "file not found"),
        (_write(tmp_path / "t.txt", "x"), "auto", "unknown file extension '.txt'"),
        (_write(tmp_path / "t2.csv", "x"), "xml", "unknown format 'xml'"),
        (tmp_path, "vivqa_csv", "expected a file, found a directory"),
    ]:
        records, problems = check_file(path, fmt=fmt)
        assert records == [] and len(problems) == 1, problems
        assert expected in str(problems[0]) and problems[0].file == str(path)


def test_parse_bombs_are_problems(tmp_path: Path) -> None:
    for name, text in [("deep.json", "[" * 100_000), ("big.jsonl", "1" * 5000)]:
        path = _write(tmp_path / name, text)
        _, problems = check_file(path)
        assert [p.kind for p in problems] == ["not JSON"]
        with pytest.raises(VQADataError, match="cannot parse JSON"):
            load_records(path)


def test_loader_dict_key_with_superscript_digit(tmp_path: Path) -> None:
    doc = {
        "images": {"1": "a.jpg"},
        "annotations": {"²": {"image_id": 1, "question": "q", "answer": ""}},
    }
    path = _write(tmp_path / "t.json", json.dumps(doc))
    with pytest.raises(VQADataError) as info:
        load_records(path)
    assert info.value.row == "²"
    assert _where(check_file(path)[1]) == {("²", "answer", "error", "empty answer")}


# ------------------------------------------------------------------------------- images


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _truncated(path: Path, image: Image.Image, fmt: str, keep: float) -> None:
    image.save(path, fmt)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    _noise(32, 24).save(root / "ok.jpg")
    Image.new("CMYK", (16, 12), (0, 50, 100, 0)).save(root / "cmyk.jpg")
    Image.new("L", (16, 12), 128).save(root / "grey.png")
    Image.new("RGBA", (16, 12), (10, 20, 30, 0)).save(root / "rgba.png")
    Image.fromarray(np.full((12, 16), 40000, dtype=np.uint16)).save(root / "deep.png")
    _truncated(root / "truncated.png", _noise(40, 30, seed=1), "PNG", 0.6)
    _truncated(root / "truncated.jpg", _noise(120, 90, seed=2), "JPEG", 0.7)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not a picture\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    _noise(8, 8).save(outside / "secret.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    return root


GOOD_REFS = ["ok.jpg", "cmyk.jpg", "grey.png", "rgba.png", "deep.png"]
BAD_FILES = {
    "truncated.png": "unreadable image",
    "truncated.jpg": "unreadable image",
    "empty.jpg": "empty image file",
    "text.jpg": "not an image",
}
BAD_REFS = {
    "link.png": "image reference refused",
    "../../etc/passwd": "image reference refused",
    "/etc/passwd": "image reference refused",
    "missing.jpg": "image missing",
}


def _records(refs: list[str]) -> list[VQARecord]:
    return [VQARecord(str(i), "màu gì", ("đỏ",), ref) for i, ref in enumerate(refs)]


@pytest.mark.parametrize("on_bad_image", ["error", "skip"])
def test_check_images(image_root: Path, on_bad_image: str) -> None:
    refs = GOOD_REFS + list(BAD_FILES) + list(BAD_REFS) + ["ok.jpg"]
    records = [*_records(refs), VQARecord("blind", "q", ("a",), None)]
    counts: dict = {}
    problems, skipped = check_images(records, image_root, on_bad_image, counts=counts)
    severity = "error" if on_bad_image == "error" else "warning"
    assert {(p.file, p.kind, p.severity) for p in problems} == {
        *((str(image_root / ref), kind, severity) for ref, kind in BAD_FILES.items()),
        *((str(image_root), kind, severity) for kind in BAD_REFS.values()),
    }
    assert len(problems) == len(BAD_FILES) + len(BAD_REFS)
    for problem in problems:
        assert str(problem).startswith(problem.file)
        assert "used by 1 question(s): ids '" in problem.message
        if problem.file == str(image_root):
            assert problem.field == "image"
        assert ("skipped" in problem.message) == (on_bad_image == "skip")
    by_file = {p.file: p.message for p in problems}
    assert "truncated" in by_file[str(image_root / "truncated.jpg")]
    assert "0 bytes" in by_file[str(image_root / "empty.jpg")]
    assert "cannot identify" in by_file[str(image_root / "text.jpg")]
    refused = [p.message for p in problems if p.kind == "image reference refused"]
    assert any("'../../etc/passwd'" in m and "escapes" in m for m in refused)
    assert any("'link.png'" in m and "symlink points outside" in m for m in refused)
    assert skipped == (sorted([*BAD_FILES, *BAD_REFS]) if on_bad_image == "skip" else [])
    assert counts["modes"] == {"CMYK": 1, "I;16": 1, "L": 1, "RGB": 1, "RGBA": 1}
    assert counts["images"]["referenced"] == len(refs) - 1
    assert counts["images"]["readable"] == len(GOOD_REFS)


def test_decompression_bomb_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(root / "bomb.png")  # 4096 > 2 x limit: refused by PIL
    Image.new("RGB", (40, 40)).save(root / "big.png")  # 1600 > limit: loads with a warning
    Image.new("RGB", (20, 20)).save(root / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    records = _records(["bomb.png", "big.png", "fine.png"])
    problems, skipped = check_images(records, root, on_bad_image="skip")
    assert {(Path(p.file).name, p.severity, p.kind) for p in problems} == {
        ("bomb.png", "warning", "image too large"),
        ("big.png", "warning", "very large image"),
    }
    assert skipped == ["bomb.png"]  # a merely large image still loads: not skipped
    problems, skipped = check_images(records, root)
    assert {(Path(p.file).name, p.severity) for p in problems} == {
        ("bomb.png", "error"),
        ("big.png", "warning"),
    }
    assert "1600 pixels" in str(problems[0]) + str(problems[1])


def test_each_distinct_image_is_opened_once(
    image_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.new("RGB", (8, 8)).save(image_root / "17.png")
    opened: list[Path] = []
    inspect = check._inspect_image

    def counting(path: Path):
        opened.append(path)
        return inspect(path)

    monkeypatch.setattr(check, "_inspect_image", counting)
    records = _records(["ok.jpg", "ok.jpg", "17", "17.png", "ok.jpg", "text.jpg", "text.jpg"])
    problems, _ = check_images(records, image_root)
    assert sorted(p.name for p in opened) == ["17.png", "ok.jpg", "text.jpg"]
    assert len(problems) == 1 and "used by 2 question(s): ids '5', '6'" in problems[0].message


def test_image_root_problems(tmp_path: Path) -> None:
    problems, skipped = check_images(_records(["a.png"]), tmp_path / "nowhere")
    assert [(p.kind, p.severity) for p in problems] == [("image root", "error")] and skipped == []
    with pytest.raises(VQAConfigError, match="on_bad_image"):
        check_images([], tmp_path, on_bad_image="ignore")


# ----------------------------------------------------------------------------- data set


def test_check_dataset_collects_everything(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    for image_id in (1, 2, 3):
        Image.new("RGB", (8, 8)).save(root / f"{image_id}.png")
    (root / "4.png").write_bytes(b"")
    train = _write(
        tmp_path / "train.csv",
        HEADER + "0,màu gì,đỏ,1,2\n1,màu gì,xanh,2,2\n2,màu gì,,3,2\n3,có mấy,hai,4,1\n",
    )
    val = _write(
        tmp_path / "val.jsonl", '{"id": "0", "question": "gì", "answer": "đỏ", "image": "9.png"}\n'
    )
    test = _write(tmp_path / "test.csv", HEADER + "0,màu gì,đỏ,3,2\n1,màu gì,đỏ,3,2\n")
    weights = _write(tmp_path / "answer_weights.json", '{"đỏ": 1.0, "hai": -2}')

    report = check_dataset(
        train, test_file=test, val_file=val, image_root=root, answer_weights=weights
    )
    assert {(p.file, p.row, p.field, p.severity, p.kind) for p in report.problems} == {
        (str(train), 3, "answer", "error", "empty answer"),
        (str(val), None, "id", "warning", "id in several files"),
        (str(test), None, "id", "warning", "id in several files"),
        (str(root / "4.png"), None, None, "error", "empty image file"),
        (str(root), None, "image", "error", "image missing"),
        (str(weights), None, "hai", "error", "answer weights"),
    }
    assert not report.ok
    assert report.counts["records"] == {str(train): 3, str(val): 1, str(test): 2}
    # test.csv shares id '0' with train.csv and with val.jsonl: one warning per pair.
    assert len(report.problems) == 7
    assert report.counts["errors"] == 4 and report.counts["warnings"] == 3
    shared = next(p for p in report.problems if p.file == str(test))
    assert "2 id(s) also used in" in shared.message and str(train) in shared.message
    text = report.format(max_per_kind=1)
    assert text.startswith("data check FAILED: 4 error(s), 3 warning(s)")
    assert "  id in several files (3):" in text and "    ... and 2 more" in text

    # Skipping bad images and a weights file that misses answers: warnings only.
    _write(weights, '{"đỏ": 1.0}')
    _write(
        train, HEADER + "0,màu gì,đỏ,1,2\n1,màu gì,xanh,2,2\n2,màu gì,xanh,2,2\n3,có mấy,hai,4,1\n"
    )
    report = check_dataset(train, image_root=root, on_bad_image="skip", answer_weights=weights)
    assert report.ok
    assert report.skipped_images == ["4"]
    assert report.counts["images"]["skipped_questions"] == 1
    coverage = next(p for p in report.warnings if p.kind == "answer weights coverage")
    assert coverage.message.startswith(
        "2 of 3 distinct training answers (3 samples) have no weight and get 1.0"
    )


@pytest.mark.skipif(not VIVQA_TRAIN.exists(), reason="shared data not present")
def test_real_files_check_clean_and_match_the_loader() -> None:
    for path, language in [(VIVQA_TRAIN, None), (VIVQA_TEST, None), (EVJVQA, "vi")]:
        records, problems = check_file(path, language=language)
        assert problems == []
        assert records == load_records(path, language=language)
    report = check_dataset(VIVQA_TRAIN, test_file=VIVQA_TEST)
    assert report.ok
    assert report.counts["records"] == {str(VIVQA_TRAIN): 11999, str(VIVQA_TEST): 3001}
    # ViVQA numbers rows from 0 in both files: the only finding, and only a warning.
    assert [(p.kind, p.file) for p in report.problems] == [("id in several files", str(VIVQA_TEST))]
    assert report.problems[0].message.startswith(
        f"3001 id(s) also used in {VIVQA_TRAIN} (e.g. '0', '1', '2'"
    )

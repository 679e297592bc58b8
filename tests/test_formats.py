"""Loaders on the real shared files and on small bad files."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from vqadapt.data.formats import load_jsonl, load_records, load_vivqa_csv, load_vqa_json
from vqadapt.errors import VQADataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
VIVQA_TRAIN = SHARED / "vivqa" / "train.csv"
VIVQA_TEST = SHARED / "vivqa" / "test.csv"
EVJVQA = SHARED / "evjvqa" / "evjvqa_public_test-lang-qtype-answer.json"
HEADER = ",question,answer,img_id,type\n"


def _is_nfc(text: str) -> bool:
    return unicodedata.normalize("NFC", text) == text


def _raises(path: Path, row: int | None, field: str | None, loader=load_records, **kwargs):
    with pytest.raises(VQADataError) as info:
        loader(path, **kwargs)
    err = info.value
    assert err.file == str(path)
    assert err.row == row, str(err)
    assert err.field == field, str(err)
    assert str(path) in str(err)
    return str(err)


# ------------------------------------------------------------------------ real files


@pytest.mark.parametrize(("path", "rows"), [(VIVQA_TRAIN, 11999), (VIVQA_TEST, 3001)])
def test_vivqa_real_files(path: Path, rows: int) -> None:
    records = load_records(path)
    assert len(records) == rows
    assert {r.qtype for r in records} == {"object", "number", "colour", "location"}
    assert records[0].id == "0"
    assert len({r.id for r in records}) == rows
    assert all(r.image.isdigit() for r in records)
    assert all(_is_nfc(r.question) and _is_nfc(r.answer) for r in records)
    assert all(r.answer == r.answer.strip() and r.answer for r in records)


def test_vivqa_first_record() -> None:
    first = load_vivqa_csv(VIVQA_TRAIN)[0]
    assert (first.question, first.answers, first.image, first.qtype) == (
        "màu của chiếc bình là gì",
        ("màu xanh lá",),
        "68857",
        "colour",
    )


def test_evjvqa_real_file() -> None:
    records = load_records(EVJVQA)
    assert len(records) == 5015
    vietnamese = load_vqa_json(EVJVQA, language="vi")
    assert len(vietnamese) == 1678
    assert "HOW_MANY" in {r.qtype for r in vietnamese}
    assert all(r.image.endswith((".jpg", ".jpeg", ".png")) for r in vietnamese)
    assert all(_is_nfc(r.question) and all(_is_nfc(a) for a in r.answers) for r in vietnamese)
    assert vietnamese[0].answers == ("hai người",)


# ------------------------------------------------------------------------ ViVQA CSV


def _write(tmp_path: Path, text: str | bytes, name: str = "data.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_csv_good_with_bom_nfd_and_no_index(tmp_path: Path) -> None:
    nfd = unicodedata.normalize("NFD", "màu đỏ")
    path = _write(tmp_path, ("\ufeff" + HEADER + f"7, con gì ,{nfd} ,12,0\n\n").encode())
    (record,) = load_vivqa_csv(path)
    assert record.id == "7" and record.question == "con gì" and record.answer == "màu đỏ"
    no_index = _write(tmp_path, "question,answer,img_id,type\na,b,1,1\nc,d,2,3\n", "x.csv")
    records = load_vivqa_csv(no_index)
    assert [r.id for r in records] == ["0", "1"]
    assert [r.qtype for r in records] == ["number", "location"]


def test_csv_empty_file(tmp_path: Path) -> None:
    assert "empty" in _raises(_write(tmp_path, ""), None, None)


def test_csv_header_only(tmp_path: Path) -> None:
    assert "header only" in _raises(_write(tmp_path, HEADER), None, None)


def test_csv_misspelled_column(tmp_path: Path) -> None:
    path = _write(tmp_path, ",question,answr,img_id,type\n0,a,b,1,0\n")
    message = _raises(path, None, "answer")
    assert "expected columns" in message and "'answr'" in message


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_csv_wrong_delimiter(tmp_path: Path, delimiter: str) -> None:
    text = delimiter.join(["", "question", "answer", "img_id", "type"]) + "\n"
    text += delimiter.join(["0", "a", "b", "1", "0"]) + "\n"
    assert "delimiter" in _raises(_write(tmp_path, text), None, "question")


def test_csv_unknown_type(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + "0,a,b,1,0\n1,c,d,2,7\n")
    assert "'7'" in _raises(path, 2, "type")


def test_csv_bad_img_id(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + "0,a,b,1,0\n1,c,d,x12,1\n")
    assert "x12" in _raises(path, 2, "img_id")


@pytest.mark.parametrize(("row", "field"), [("0, ,b,1,0", "question"), ("0,a,  ,1,0", "answer")])
def test_csv_empty_text(tmp_path: Path, row: str, field: str) -> None:
    assert f"empty {field}" in _raises(_write(tmp_path, HEADER + row + "\n"), 1, field)


def test_csv_duplicate_id(tmp_path: Path) -> None:
    path = _write(tmp_path, HEADER + "0,a,b,1,0\n1,c,d,2,0\n0,e,f,3,0\n")
    assert "duplicate id '0'" in _raises(path, 3, "id")


def test_csv_not_utf8(tmp_path: Path) -> None:
    data = (HEADER + "0,a,b,1,0\n1,").encode() + "màu".encode("cp1258") + b",b,1,0\n"
    assert "UTF-8" in _raises(_write(tmp_path, data), 2, None)


def test_csv_wrong_field_count(tmp_path: Path) -> None:
    assert "5 fields" in _raises(_write(tmp_path, HEADER + "0,a,b,1\n"), 1, None)


# ------------------------------------------------------------------------------ JSON


def _json(tmp_path: Path, data: object, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


IMAGES = [{"id": 1, "filename": "a.jpg"}, {"id": 2, "filename": "b.jpg"}]


def test_json_list_and_dict_forms(tmp_path: Path) -> None:
    listed = {
        "images": IMAGES,
        "annotations": [
            {"id": 5, "image_id": 2, "question": "q", "answer": ["x", "y"], "question_type": "T"}
        ],
    }
    (record,) = load_vqa_json(_json(tmp_path, listed))
    assert (record.id, record.image, record.answers, record.qtype) == (
        "5",
        "b.jpg",
        ("x", "y"),
        "T",
    )
    keyed = {
        "images": {"1": "a.jpg"},
        "annotations": {"9": {"image_id": 1, "question": "q", "answer": "z"}},
    }
    (record,) = load_vqa_json(_json(tmp_path, keyed, "k.json"))
    assert (record.id, record.image, record.answers, record.qtype) == ("9", "a.jpg", ("z",), None)


def test_json_unknown_image_id(tmp_path: Path) -> None:
    data = {
        "images": IMAGES,
        "annotations": [
            {"id": 0, "image_id": 1, "question": "q", "answer": "a"},
            {"id": 1, "image_id": 3, "question": "q", "answer": "a"},
        ],
    }
    assert "image_id 3" in _raises(_json(tmp_path, data), 1, "image_id")


def test_json_duplicate_annotation_id(tmp_path: Path) -> None:
    ann = {"id": 4, "image_id": 1, "question": "q", "answer": "a"}
    data = {"images": IMAGES, "annotations": [ann, dict(ann)]}
    assert "duplicate annotation id '4'" in _raises(_json(tmp_path, data), 1, "id")


def test_json_empty_answer(tmp_path: Path) -> None:
    data = {
        "images": IMAGES,
        "annotations": [{"id": 0, "image_id": 1, "question": "q", "answer": ""}],
    }
    _raises(_json(tmp_path, data), 0, "answer")


def test_json_language_filter_without_language_field(tmp_path: Path) -> None:
    data = {
        "images": IMAGES,
        "annotations": [{"id": 0, "image_id": 1, "question": "q", "answer": "a"}],
    }
    path = _json(tmp_path, data)
    assert "no annotation has a 'language'" in _raises(path, None, "language", language="vi")


def test_json_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"images": [],\n "annotations": [,]}', encoding="utf-8")
    assert "line 2, column" in _raises(path, None, None)


def test_json_missing_annotations(tmp_path: Path) -> None:
    _raises(_json(tmp_path, {"images": []}), None, "annotations")


# ----------------------------------------------------------------------------- JSONL


def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_good(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path,
        [
            json.dumps({"question": "q", "answer": "a", "image": "x.png", "type": 2}),
            "",
            json.dumps(
                {"id": "k", "question": "q", "answers": ["a", "b"], "image": 7, "type": "number"}
            ),
        ],
    )
    first, second = load_jsonl(path)
    assert (first.id, first.qtype, first.image) == ("1", "colour", "x.png")
    assert (second.id, second.answers, second.image, second.qtype) == (
        "k",
        ("a", "b"),
        "7",
        "number",
    )


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ('{"answer": "a", "image": "x"}', "question"),
        ('{"question": "q", "image": "x"}', "answer"),
        ('{"question": "q", "answers": [], "image": "x"}', "answers"),
        ('{"question": "q", "answer": "a"}', "image"),
        ('{"question": "q", "answer": "a", "image": "x", "type": 9}', "type"),
        ('{"question": "q", "answer": "a", "image": "x", "id": "1"}', "id"),
        ('{"question": "q", "answer": "a", "image": "x"', None),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path: Path, line: str, field: str | None) -> None:
    good = json.dumps({"id": "1", "question": "q", "answer": "a", "image": "x"})
    _raises(_jsonl(tmp_path, [good, "", line]), 3, field)


# -------------------------------------------------------------------------- dispatch


def test_load_records_dispatch_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert "not found" in _raises(missing, None, None)
    assert "extension" in _raises(_write(tmp_path, "x", "data.txt"), None, None)
    csv_path = _write(tmp_path, HEADER + "0,a,b,1,0\n")
    assert len(load_records(csv_path, fmt="vivqa_csv")) == 1
    with pytest.raises(VQADataError, match="unknown format"):
        load_records(csv_path, fmt="parquet")
    _raises(csv_path, None, "language", language="vi")

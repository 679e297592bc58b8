"""One parser per format, two policies: the loaders raise the first error the check lists."""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vqadapt.data.check import check_file
from vqadapt.data.formats import load_records
from vqadapt.data.parse.problems import Collector, Problem
from vqadapt.errors import VQADataError

HEADER = ",question,answer,img_id,type\n"
NFD_QUESTION = unicodedata.normalize("NFD", "màu của chiếc bình là gì")
FUZZ_EXAMPLES = int(os.environ.get("VQADAPT_FUZZ_EXAMPLES", "150"))
GOOD_LINE = '{"id": "a", "question": "q", "answer": "x", "image": "1.png"}'
IMAGES = [{"id": 1, "filename": "a.jpg"}]


def _ann(**fields: object) -> dict:
    return {"image_id": 1, "question": "màu gì", "answer": "đỏ", **fields}


def _doc(annotations: object, images: object = IMAGES) -> str:
    return json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False)


def _first_error(path: Path) -> tuple[Problem, int]:
    """The first error the collecting policy lists, and how many errors it lists."""
    _, problems = check_file(path)
    errors = [p for p in problems if p.severity == "error"]
    assert errors, problems
    return errors[0], len(errors)


def _raised(path: Path) -> VQADataError:
    with pytest.raises(VQADataError) as info:
        load_records(path)
    return info.value


# Malformed files: (name, content, (row, field) of the first error, how many errors in all).
MALFORMED = [
    ("header.csv", ",questoin,answer,img_id,Type\n0,a,b,1,0\n", (None, "question"), 1),
    ("delimiter.csv", ";question;answer;img_id;type\n0;a;b;1;0\n", (None, "question"), 1),
    ("header-only.csv", HEADER, (None, None), 1),
    ("rows.csv", HEADER + "0,a,b,1,0\n1,,c,2,0\n2,d,?!,x,9\n1,e,f,4,0\n", (2, "question"), 5),
    ("count.csv", HEADER + "0,a,b,1\n1,c,nan,2,0\n", (1, None), 2),
    ("noindex.csv", "question,answer,img_id,type\na,b,1.0,0\n", (1, "img_id"), 1),
    ("syntax.json", '{"images": [], "annotations": [}', (None, None), 1),
    ("toplevel.json", json.dumps({"images": [], "annotation": []}), (None, "annotations"), 1),
    (
        "misspelled.json",
        _doc([{"image_id": 1, "questoin": "q", "answer": "a"}]),
        (None, "question"),
        1,
    ),
    (
        "image-entry.json",
        _doc([_ann(), _ann(image_id=2)], [IMAGES[0], {"id": 2}]),
        ("images[1]", None),
        2,
    ),
    (
        "annotations.json",
        _doc([_ann(id=0), _ann(id=0, answer=[]), "x", _ann(image_id=5)]),
        (1, "answer"),
        4,
    ),
    ("keyed.json", _doc({"b": _ann(answer=""), "3": _ann(question=None)}), ("b", "answer"), 2),
    ("lines.jsonl", "\n".join([GOOD_LINE, GOOD_LINE, '{"question": "q",', "[1]"]), (2, "id"), 3),
    ("first-line.jsonl", "\n".join(['{"question": ', GOOD_LINE]), (1, None), 1),
    ("misspelled.jsonl", '{"question": "q", "answer": "x", "img": "1.png"}\n', (None, "image"), 1),
    (
        "fields.jsonl",
        '{"question": "NaN", "answers": ["x", "..."], "image": 1, "type": 7}',
        (1, "question"),
        3,
    ),
    ("unknown.txt", "x", (None, None), 1),
    ("utf16.csv", (HEADER + "0,a,b,1,0\n").encode("utf-16"), (None, None), 1),
]


@pytest.mark.parametrize(("name", "content", "where", "count"), MALFORMED)
def test_the_loader_raises_the_first_problem_the_check_lists(
    tmp_path: Path, name: str, content: str | bytes, where: tuple, count: int
) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    first, errors = _first_error(path)
    assert ((first.row, first.field), errors) == (where, count)
    raised = _raised(path)
    assert (raised.file, raised.row, raised.field, raised.message) == (
        first.file,
        first.row,
        first.field,
        first.message,
    )
    assert str(raised) == str(first)


def test_undecodable_bytes_the_loader_names_the_line_the_check_each_field(
    tmp_path: Path,
) -> None:
    """The one place the policies part: a loader stops at the first byte it cannot decode,
    the check decodes on and names every field that holds one."""
    path = tmp_path / "t.csv"
    path.write_bytes(HEADER.encode() + b"0,a,b,1,0\n1,caf\xe9,b,2,0\n\n2,a,\xe0,3,0\n")
    _, problems = check_file(path)
    assert [(p.row, p.field, p.kind) for p in problems] == [
        (2, "question", "not UTF-8"),
        (3, "answer", "not UTF-8"),
    ]
    raised = _raised(path)
    assert (raised.row, raised.field) == (2, None)
    assert "byte 0xe9 on line 3" in raised.message


def test_warnings_do_not_stop_a_loader(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(HEADER + f"0,{NFD_QUESTION},đỏ,1,2\n1,{'từ ' * 200},xanh,2,2\n")
    records, problems = check_file(path)
    assert {p.kind for p in problems} == {"not NFC", "long question"}
    assert all(p.severity == "warning" for p in problems)
    assert load_records(path) == records and len(records) == 2


def test_collector_policies(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    keep = Collector(path)
    keep.warning("not NFC", "not NFC; normalised on load", 1, "question")
    keep.error("empty answer", "empty answer", 2, "answer")
    keep.error("bad img_id", "img_id must be a non-negative integer, got 'x'", 3, "img_id")
    assert [(p.row, p.severity) for p in keep.problems] == [
        (1, "warning"),
        (2, "error"),
        (3, "error"),
    ]
    assert keep.errors == 2
    first = Collector(path, raise_first=True)
    first.warning("not NFC", "not NFC; normalised on load", 1, "question")
    with pytest.raises(VQADataError) as info:
        first.error("empty answer", "empty answer", 2, "answer")
    assert (
        str(info.value) == str(keep.problems[1]) == f"{path}, row 2, field 'answer': empty answer"
    )
    assert len(first.problems) == 1  # the warning, kept
    # Undecodable bytes are quoted escaped, so a problem can always be printed.
    problem = Problem("t.csv", "k\udce9", None, "caf\udce9", "error")
    assert str(problem).encode("utf-8") == b"t.csv, row k\\udce9: caf\\udce9"


# --------------------------------------------------------------------------------- fuzz


# Mostly valid field values, with the bad ones the checker must catch mixed in, so that a
# good share of generated files pass both the checker and the loader and get compared.
_KEYS = ["id", "question", "answer", "answers", "image", "image_id", "type", "language"]
_GOOD_TEXT = st.sampled_from(
    ["màu gì", "đỏ", "hai con mèo", "x, y;", 'q"', NFD_QUESTION]
) | st.text(alphabet="abcăđ", min_size=1, max_size=6)
_BAD_TEXT = st.sampled_from(["", "  ", "nan", "NaN", "?!", "\ud800"])
_SCALARS = st.none() | st.booleans() | st.integers(-2, 5) | st.floats() | _BAD_TEXT
_ANY_BAD = _BAD_TEXT | _SCALARS
_VALUES = st.recursive(
    _SCALARS | _GOOD_TEXT,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=3)
    ),
    max_leaves=8,
)
_MAYBE_BAD = st.one_of(st.just(None), st.just(None), st.just(None), _VALUES)


def _pick(draw: st.DrawFn, good: st.SearchStrategy, bad: st.SearchStrategy) -> object:
    """A good value, and a bad one about one time in 15."""
    return draw(bad if draw(st.sampled_from(range(15))) == 0 else good)


def _text(draw: st.DrawFn) -> object:
    return _pick(draw, _GOOD_TEXT, _ANY_BAD)


def _csv_text(draw: st.DrawFn) -> str:
    header = draw(st.sampled_from([HEADER] * 8 + [HEADER.replace(",", ";"), HEADER[1:]] * 2))
    with_index = header.startswith(",")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    for number in range(draw(st.integers(0, 4))):
        row = [
            _pick(draw, st.just(str(number)), st.sampled_from(["", "0", " 1"])),
            _pick(draw, _GOOD_TEXT, _BAD_TEXT),
            _pick(draw, _GOOD_TEXT, _BAD_TEXT),
            _pick(draw, st.sampled_from(["1", "68857"]), st.sampled_from(["", "nan", "1.0", "-3"])),
            _pick(draw, st.sampled_from("0123"), st.sampled_from(["", "9", "1.0", "x"])),
        ]
        row = row if with_index else row[1:]
        if draw(st.sampled_from(range(15))) == 0:
            row.append("extra")
        writer.writerow(row)
    blank = "\n" if draw(st.booleans()) else ""
    return header + blank + buffer.getvalue()


def _jsonl_object(draw: st.DrawFn, line: int) -> dict:
    obj = {
        "question": _text(draw),
        "image": _pick(draw, st.sampled_from(["1.jpg", 7, None]), _SCALARS),
    }
    if draw(st.booleans()):
        obj["answer"] = _text(draw)
    else:
        answers = [_text(draw) for _ in range(draw(st.integers(1, 2)))]
        obj["answers"] = _pick(draw, st.just(answers), _VALUES)
    for key, good in (
        ("id", st.sampled_from([str(line), line, "a"])),
        ("type", st.sampled_from([0, 3, "colour"])),
    ):
        if draw(st.booleans()):
            obj[key] = _pick(draw, good, _SCALARS)
    if draw(st.sampled_from(range(15))) == 0:  # a key goes missing or gets misspelled
        key = draw(st.sampled_from(sorted(obj)))
        obj[key + draw(st.sampled_from(["", "s"]))] = obj.pop(key)
    return obj


def _json_annotation(draw: st.DrawFn) -> dict:
    ann = {
        "image_id": _pick(draw, st.integers(0, 2), _SCALARS),
        "question": _text(draw),
        "answer": _text(draw)
        if draw(st.booleans())
        else [_text(draw) for _ in range(draw(st.integers(0, 2)))],
    }
    for key, good in (
        ("id", st.integers(0, 4)),
        ("language", st.sampled_from(["vi", "en"])),
        ("question_type", st.sampled_from(["HOW_MANY", "WHAT"])),
    ):
        if draw(st.booleans()):
            ann[key] = _pick(draw, good, _SCALARS)
    if draw(st.sampled_from(range(15))) == 0:
        ann.pop(draw(st.sampled_from(sorted(ann))))
    return ann


@st.composite
def _documents(draw: st.DrawFn, suffix: str) -> bytes:
    """Bytes that are often a valid file of the given kind, sometimes broken, or just noise."""
    if draw(st.sampled_from(range(8))) == 0:
        return draw(st.binary(max_size=200))
    if suffix == ".csv":
        text = _csv_text(draw)
    elif suffix == ".jsonl":
        lines = [_jsonl_object(draw, i + 1) for i in range(draw(st.integers(1, 4)))]
        text = "\n".join(json.dumps(obj, ensure_ascii=draw(st.booleans())) for obj in lines)
    else:
        images = [
            {"id": i, "filename": f"{i}.jpg"} for i in range(draw(st.sampled_from([3, 3, 2])))
        ]
        if draw(st.booleans()):
            images = {str(entry["id"]): entry["filename"] for entry in images}
        annotations = [_json_annotation(draw) for _ in range(draw(st.integers(0, 3)))]
        if draw(st.booleans()):
            keys = draw(
                st.lists(
                    st.sampled_from(["0", "1", "²", "k"]),
                    unique=True,
                    min_size=len(annotations),
                    max_size=len(annotations),
                )
            )
            annotations = dict(zip(keys, annotations, strict=True))
        document: object = {
            "images": _pick(draw, st.just(images), _VALUES),
            "annotations": annotations,
        }
        if draw(st.sampled_from(range(15))) == 0:
            document = draw(_VALUES)
        text = json.dumps(document, ensure_ascii=draw(st.booleans()))
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.sampled_from(range(6))) == 0:  # splice in raw bytes: bad UTF-8, BOMs, NULs
        position = draw(st.integers(0, len(data)))
        data = data[:position] + draw(st.binary(min_size=1, max_size=3)) + data[position:]
    return data


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzz_the_check_never_raises_and_the_loader_raises_its_first_error(
    tmp_path: Path, suffix: str, data: st.DataObject
) -> None:
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data.draw(_documents(suffix)))
    records, problems = check_file(path)  # must not raise
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        assert problem.file == str(path)
        str(problem).encode("utf-8")  # printable, even when quoting undecodable bytes
    try:
        loaded = load_records(path)
    except VQADataError as err:
        assert errors, "the loader refused a file the check passed"
        if "on line" in err.message and err.message.startswith("not valid UTF-8"):
            assert any(p.kind == "not UTF-8" for p in errors)
            return  # undecodable bytes: the loader stops at the first (tested above)
        first = errors[0]
        assert (err.row, err.field, err.message) == (first.row, first.field, first.message)
    else:
        assert not errors, "the loader passed a file the check refused"
        assert records == loaded

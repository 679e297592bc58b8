"""When things go wrong: every failure class as a table, each row a case a user meets.

The classes (issue 14): every numeric flag of every command (but train's settings, which
check themselves) at 0, negative, NaN and huge; every output path that could land inside an
input or a run; the same image referenced in different ways; every internal file (run files,
checkpoints, caches, data-check memos, the lock) truncated, zeroed or replaced; every external
format the tool reads, broken. Each row runs the real command line (``cli.main``, in this
process) and checks what the user sees (an exit code and a message naming the file, flag or
value: never a traceback, since an uncaught exception fails the test) and what is kept.

The README's "When things go wrong" table lists the same cases.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from vqadapt import cli, cli_parser
from vqadapt.data.records import VQARecord
from vqadapt.data.splits import split_by_image
from vqadapt.train import train

QUIET = lambda _: None  # noqa: E731
TINY = ["--max_train_samples", "32", "--batch_size", "16", "--max_eval_samples", "16"]


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_cli(argv: list[str], capsys) -> Result:
    """``vqadapt ARGV`` in this process. A traceback would be an uncaught exception here,
    which fails the test: reaching ``SystemExit`` means the user got a message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        cli.main([str(a) for a in argv])
    seen = capsys.readouterr()
    assert "Traceback" not in seen.err
    return Result(caught.value.code or 0, seen.out, seen.err)


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: "nothing changed" is equality of two."""
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(vqa_env, tmp_path_factory) -> dict[str, Path]:
    """A finished run and one interrupted after epoch 1 of 2 (the resumable state)."""
    root = tmp_path_factory.mktemp("failure-runs")
    finished, interrupted = root / "finished", root / "interrupted"
    train(vqa_env.config(finished, *TINY, "--epochs", "2"), log=QUIET)
    train(vqa_env.config(interrupted, *TINY, "--epochs", "2"), log=QUIET, stop_after_epoch=1)
    return {"finished": finished, "interrupted": interrupted}


def copy_run(source: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


# == 1. numeric flags ============================================================================
# The smallest argv of each command; the flag under test comes last.
REQUIRED = {
    "eval": ["eval", "--run", "RUN"],
    "predict": ["predict", "--run", "RUN", "--question", "q"],
    "export": ["export", "--run", "RUN", "--out", "OUT"],
    "data synth": ["data", "synth", "--out", "OUT"],
    "backbones tiny": ["backbones", "tiny", "--out", "OUT"],
    "answer-weights": ["answer-weights", "--data", "DATA"],
    "ablate": ["ablate"],
    "demo": ["demo", "--run", "RUN"],
}
FLOAT_FLAGS = {("export", "tolerance"), ("answer-weights", "beta"), ("answer-weights", "clip")}
FLOAT_FLAGS |= {("demo", "max_file_mb")}
VALUES = {"zero": "0", "negative": "-1", "nan": "nan", "huge": None}  # huge: per type
ACCEPTED = {  # the values in range; every other (flag, value) is refused
    ("data synth", "seed", "zero"),
    ("data synth", "extra_test", "zero"),
    ("backbones tiny", "text_steps", "zero"),
    ("backbones tiny", "vision_steps", "zero"),
    ("demo", "examples", "zero"),
    ("export", "tolerance", "zero"),
    ("answer-weights", "beta", "zero"),
    ("answer-weights", "clip", "zero"),
}
NUMERIC_ROWS = [
    (command, dest, kind)
    for command, flags in cli_parser.NUMERIC_FLAGS.items()
    for dest in flags
    for kind in VALUES
]


def numeric_argv(command: str, dest: str, kind: str) -> list[str]:
    is_float = (command, dest) in FLOAT_FLAGS
    value = VALUES[kind] or ("1e30" if is_float else "1000000000000")
    values = [value, "2"] if dest == "clip" else [value]
    return [*REQUIRED[command], f"--{dest}", *values]


@pytest.mark.parametrize(("command", "dest", "kind"), NUMERIC_ROWS)
def test_numeric_flags_at_zero_negative_nan_and_huge(
    capsys, tmp_path, monkeypatch, command, dest, kind
) -> None:
    monkeypatch.chdir(tmp_path)  # OUT, RUN, DATA: names that must stay unused
    argv = numeric_argv(command, dest, kind)
    if (command, dest, kind) in ACCEPTED:
        cli.build_parser().parse_args(argv)  # parsed: the command goes on with it
        return
    result = run_cli(argv, capsys)  # refused before anything loads or is written
    assert result.code == 2
    assert f"--{dest}" in result.err, result.err
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_flag_has_a_range() -> None:
    """A numeric flag added to any command (but train / plan) needs a NUMERIC_FLAGS row."""
    parser = cli.build_parser()
    found = set()

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
            elif getattr(action.type, "numeric", None) or action.type in (int, float):
                found.add((prefix, action.dest))

    walk(parser, "")
    listed = {
        (command, dest) for command, flags in cli_parser.NUMERIC_FLAGS.items() for dest in flags
    }
    assert found == listed
    floats = {key for key in found if key in FLOAT_FLAGS}
    assert floats == FLOAT_FLAGS


def test_max_eval_samples_above_the_split_means_all(vqa_env, runs, capsys, tmp_path) -> None:
    run = copy_run(runs["finished"], tmp_path)
    result = run_cli(["eval", "--run", run, "--max_eval_samples", 10**6], capsys)
    assert result.code == 0, result.err
    lines = (vqa_env.data / "test.csv").read_text(encoding="utf-8").strip().splitlines()
    scores = json.loads((run / "eval_test.json").read_text(encoding="utf-8"))
    assert scores["n"] == len(lines) - 1  # every test question, not the run's 16


# == 2. output paths that could land inside an input or a run ===================================
@dataclass
class World:
    """Inputs and a run to aim outputs at: copies, so that no failure can touch the session's."""

    root: Path
    data: Path
    text: Path
    vision: Path
    run: Path
    notes: Path  # a user's folder (not a run)
    legacy: Path  # holds a config.yaml and a status.json, but no run marker

    def train(self, out: Path, *extra: str) -> list[str]:
        return [
            "train", "--train_file", self.data / "train.csv", "--test_file",
            self.data / "test.csv", "--image_root", self.data / "images", "--vision_model",
            self.vision, "--text_model", self.text, "--output_dir", out, *TINY, "--epochs", "1",
            "--no_progress", *extra,
        ]  # fmt: skip

    def guarded(self) -> dict[str, dict[str, bytes]]:
        return {
            name: listing(getattr(self, name))
            for name in ("data", "text", "run", "notes", "legacy")
        }


@pytest.fixture(scope="module")
def world(vqa_env, runs, tmp_path_factory) -> World:
    import yaml

    root = tmp_path_factory.mktemp("world")
    data, text = root / "data", root / "text"
    shutil.copytree(vqa_env.data, data)
    shutil.copytree(vqa_env.text, text)
    run = copy_run(runs["finished"], root)
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["data"].update(
        train_file=str(data / "train.csv"),
        test_file=str(data / "test.csv"),
        image_root=str(data / "images"),
    )
    config["model"]["text_model"] = str(text)
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    summary["backbones"]["text"] = str(text)
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    notes = root / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes", encoding="utf-8")
    legacy = root / "legacy"
    legacy.mkdir()
    (legacy / "config.yaml").write_text("train:\n  lr: 0.1\n", encoding="utf-8")
    (legacy / "status.json").write_text('{"status": "success"}', encoding="utf-8")
    return World(root, data, text, vqa_env.vision, run, notes, legacy)


OUTPUT_ROWS: list[tuple[str, Callable[[World], list], str]] = [
    ("train into the image root", lambda w: w.train(w.data / "images"), "inside the input --image_root"),
    ("train inside the image root", lambda w: w.train(w.data / "images" / "run"), "inside the input --image_root"),
    ("train into the data folder", lambda w: w.train(w.data), "holds the input --train_file"),
    ("train inside a run", lambda w: w.train(w.run / "sub"), "lies inside the run"),
    ("train into a run's checkpoint", lambda w: w.train(w.run / "best", "--overwrite"), "lies inside the run"),
    ("train into the text model", lambda w: w.train(w.text, "--overwrite"), "inside the input --text_model"),
    ("train into a data file", lambda w: w.train(w.data / "train.csv"), "is a file, not a folder"),
    ("--overwrite a user's folder", lambda w: w.train(w.notes, "--overwrite"), "is not a vqadapt run"),
    ("--overwrite a folder with a config.yaml", lambda w: w.train(w.legacy, "--overwrite"), "is not a vqadapt run"),
    ("export onto its run", lambda w: ["export", "--run", w.run, "--out", w.run, "--overwrite"], "would replace the run"),
    ("export onto the run's parent", lambda w: ["export", "--run", w.run, "--out", w.root, "--overwrite"], "would replace the run"),
    ("export inside its run", lambda w: ["export", "--run", w.run, "--out", w.run / "export"], "lies inside the run"),
    ("export inside its text model", lambda w: ["export", "--run", w.run, "--out", w.text / "export"], "inside the input text model"),
    ("export inside its image root", lambda w: ["export", "--run", w.run, "--out", w.data / "images" / "x"], "inside the input image_root"),
    ("export --overwrite a user's folder", lambda w: ["export", "--run", w.run, "--out", w.notes, "--overwrite"], "replaces only an earlier export"),
    ("synthetic data inside a run", lambda w: ["data", "synth", "--out", w.run / "data", "--n", "10"], "lies inside the run"),
    ("synthetic data onto a file", lambda w: ["data", "synth", "--out", w.data / "train.csv", "--n", "10"], "is a file"),
    ("tiny backbones inside a run", lambda w: ["backbones", "tiny", "--out", w.run / "bb"], "lies inside the run"),
    ("answer weights onto their data", lambda w: ["answer-weights", "--data", w.data / "train.csv", "--out", w.data / "train.csv"], "input --data"),
    ("answer weights inside a run", lambda w: ["answer-weights", "--data", w.data / "train.csv", "--out", w.run / "w.json"], "lies inside the run"),
    ("answer weights onto a folder", lambda w: ["answer-weights", "--data", w.data / "train.csv", "--out", w.notes], "is a folder"),
    ("a study inside a run", lambda w: ["ablate", "--out", w.run / "study"], "lies inside the run"),
    ("a study onto a run", lambda w: ["ablate", "--out", w.run], "lies inside the run"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "message"), OUTPUT_ROWS, ids=[r[0] for r in OUTPUT_ROWS])
def test_outputs_never_land_inside_an_input_or_a_run(world, capsys, case, argv, message) -> None:
    before = world.guarded()
    result = run_cli(argv(world), capsys)
    assert result.code == 2, result.err
    assert message in result.err, result.err
    assert world.guarded() == before, "a refused command changed a file"
    assert not [p for p in world.root.glob(".*") if p.name.endswith(".lock")]


# == 3. the same image referenced in different ways =============================================


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (20, 16), (200, 30, 30)).save(root / "7.png")
    Image.new("RGB", (20, 16), (30, 200, 30)).save(root / "sub" / "8.png")
    os.symlink(root / "7.png", root / "alias.png")
    return root


@pytest.mark.parametrize(
    ("refs", "same"),
    [
        (["7", "7.png", "./7.png", " 7.png ", "007"], "7.png"),
        (["sub/8.png", "8.png", "sub\\8.png", "./sub/8.png", "sub//8.png"], "sub/8.png"),
        (["alias.png", "7.png"], "7.png"),  # a symlink inside the root
    ],
)
def test_one_image_however_referenced_is_one_image(images, refs, same) -> None:
    """Every spelling finds the file, the image store decodes it once (one slot), and the
    validation split never puts two spellings of it on different sides."""
    from vqadapt.data.images import ImageIndex
    from vqadapt.data.pipeline import ImageStore

    index = ImageIndex(images)
    store = ImageStore(index, None)
    slots = {store.slot(VQARecord(str(i), "q", ("a",), ref)) for i, ref in enumerate(refs)}
    assert len(slots) == 1
    assert [p.resolve() for p in store.paths] == [(images / same).resolve()]
    if "alias.png" in refs:
        return  # a symlink's name cannot be told from its target by name alone
    records = [
        VQARecord(f"{i}-{j}", "q", ("a",), ref) for i, ref in enumerate(refs) for j in (0, 1)
    ]
    records += [VQARecord(f"other{i}", "q", ("a",), f"{100 + i}.png") for i in range(30)]
    placed = set()
    for seed in range(20):
        _, val = split_by_image(records, 0.3, seed=seed)
        sides = {("val" if r in val else "train") for r in records[: 2 * len(refs)]}
        assert len(sides) == 1, f"seed {seed}: one image on both sides"
        placed |= sides
    assert placed == {"train", "val"}  # the seeds did move the image between the sides


def test_predict_gives_one_answer_however_the_image_path_is_spelt(
    vqa_env, runs, capsys, tmp_path, monkeypatch
) -> None:
    row = json.loads((runs["finished"] / "predictions_test.jsonl").read_text().splitlines()[0])
    image = vqa_env.data / "images" / f"{row['image']}.png"
    os.symlink(image, tmp_path / "link.png")
    monkeypatch.chdir(image.parent)
    spellings = [
        image,
        f"{row['image']}.png",
        f"./{row['image']}.png",
        image.parent / ".." / "images" / image.name,
        tmp_path / "link.png",
    ]
    answers = set()
    for spelling in spellings:
        argv = ["predict", "--run", runs["finished"], "--question", row["question"]]
        result = run_cli([*argv, "--image", spelling], capsys)
        assert result.code == 0, result.err
        answers.add(result.out.strip())
    assert answers == {row["prediction"]}


# == 4. internal files truncated, zeroed or replaced ============================================
def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zeroed(path: Path) -> None:
    path.write_bytes(b"\0" * max(1, path.stat().st_size))


def replaced(path: Path) -> None:
    """By a folder: the file is there, but is not a file any more."""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.mkdir()
    (path / "x").write_text("x", encoding="utf-8")


DAMAGE = {"truncated": truncated, "zeroed": zeroed, "replaced": replaced}
OK = None  # the command succeeds: the damage is repaired or does not matter

# (file in the run, the command after the damage) -> what the user sees for each damage: OK or
# a piece of the message (which names the file). "resume" continues the run interrupted after
# epoch 1 of 2; "eval" evaluates the finished run.
RUN_FILE_ROWS = {
    ("vqadapt_run.json", "resume"): {"truncated": OK, "zeroed": OK, "replaced": "is not a vqadapt run"},
    ("config.yaml", "resume"): {"truncated": "config.yaml", "zeroed": "config.yaml", "replaced": "config.yaml"},
    ("status.json", "resume"): {"truncated": OK, "zeroed": OK, "replaced": "status.json"},
    ("metrics.jsonl", "resume"): {"truncated": OK, "zeroed": OK, "replaced": "metrics.jsonl"},
    ("last/training_state.pt", "resume"): dict.fromkeys(DAMAGE, "training_state.pt: damaged checkpoint"),
    ("last/trained.safetensors", "resume"): dict.fromkeys(DAMAGE, "trained.safetensors: damaged checkpoint"),
    ("summary.json", "resume"): {"truncated": OK, "zeroed": OK, "replaced": "summary.json"},  # rewritten
    ("summary.json", "eval"): dict.fromkeys(DAMAGE, OK),  # the backbones are in config.yaml too
    ("config.yaml", "eval"): {"truncated": "config.yaml", "zeroed": "config.yaml", "replaced": "config.yaml"},
    ("best/trained.safetensors", "eval"): {"truncated": "damaged checkpoint", "zeroed": "damaged checkpoint", "replaced": "no complete 'best' checkpoint"},
    ("../.run.lock", "resume"): {"truncated": OK, "zeroed": OK, "replaced": "cannot open the lock file"},
}  # fmt: skip


def damage_rows() -> list[tuple[str, str, str, str | None]]:
    return [
        (name, command, kind, expected)
        for (name, command), outcomes in RUN_FILE_ROWS.items()
        for kind, expected in outcomes.items()
    ]


@pytest.mark.parametrize(
    ("name", "command", "kind", "expected"),
    damage_rows(),
    ids=[f"{n}-{c}-{k}" for n, c, k, _ in damage_rows()],
)
def test_damaged_run_files(vqa_env, runs, capsys, tmp_path, name, command, kind, expected) -> None:
    finished = command == "eval" or name == "summary.json"
    run = copy_run(runs["finished" if finished else "interrupted"], tmp_path)
    target = run / name
    if not target.exists():
        target.write_text("pid 1 on elsewhere since long ago: vqadapt train\n", encoding="utf-8")
    DAMAGE[kind](target)
    if command == "resume":
        argv = ["train", *vqa_env.argv(run, *TINY, "--epochs", "2", "--resume")]
    else:
        argv = ["eval", "--run", run]
    result = run_cli(argv, capsys)
    if expected is OK:
        assert result.code == 0, result.err
        if command == "resume":
            status = json.loads((run / "status.json").read_text(encoding="utf-8"))
            assert status["status"] == "success"
            summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
            assert summary["epochs_run"] == 2
    else:
        assert result.code != 0
        assert expected in result.err, result.err
        assert "error:" in result.err


@pytest.fixture(scope="module")
def filled_cache(vqa_env, tmp_path_factory) -> Path:
    """A cache folder as one run leaves it: the data check's memo and the feature caches."""
    cache = tmp_path_factory.mktemp("cache") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQADAPT_CACHE", str(cache))
        train(vqa_env.config(cache.parent / "run", *TINY, "--epochs", "1"), log=QUIET)
    return cache


# (cache file pattern) -> what a new run sees for each damage: a feature cache is a folder of
# shards, each checked on its own (a damaged shard is rebuilt alone: tests/test_shards.py).
CACHE_ROWS = {
    "checks/*.json": dict.fromkeys(DAMAGE, OK),  # a damaged memo: the data is checked again
    "features/vision-*/shard-*.safetensors": {
        "truncated": OK,
        "zeroed": OK,
        "replaced": "vision-",
    },
    "features/text-*/shard-*.safetensors": {"truncated": OK, "zeroed": OK, "replaced": "text-"},
}


@pytest.mark.parametrize(
    ("pattern", "kind", "expected"),
    [(p, k, e) for p, outcomes in CACHE_ROWS.items() for k, e in outcomes.items()],
)
def test_damaged_cache_files(
    vqa_env, filled_cache, capsys, tmp_path, monkeypatch, pattern, kind, expected
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache, cache)
    monkeypatch.setenv("VQADAPT_CACHE", str(cache))
    targets = sorted(cache.glob(pattern))
    assert targets, pattern
    for target in targets:
        DAMAGE[kind](target)
    result = run_cli(["train", *vqa_env.argv(tmp_path / "run", *TINY)], capsys)
    if expected is OK:
        assert result.code == 0, result.err
        if kind != "replaced":  # rebuilt: a run after this one reads it back
            rebuilt = sorted(cache.glob(pattern))
            assert all(p.is_file() and p.read_bytes().strip(b"\0") for p in rebuilt)
    else:
        assert result.code == 2
        assert expected in result.err and "Is a directory" in result.err, result.err
        assert not (tmp_path / "run").exists()  # refused before the run folder was made


# == 5. every external format the tool reads, broken ============================================
def as_json(data: Path, tmp: Path) -> Path:
    """The data set's first questions as EVJVQA JSON."""
    from vqadapt.data.formats import load_vivqa_csv

    records = load_vivqa_csv(data / "train.csv")[:40]
    images = sorted({r.image for r in records})
    path = tmp / "train.json"
    document = {
        "images": [{"id": int(i), "filename": f"{i}.png"} for i in images],
        "annotations": [
            {"id": n, "image_id": int(r.image), "question": r.question, "answer": r.answer}
            for n, r in enumerate(records)
        ],
    }
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def as_jsonl(data: Path, tmp: Path) -> Path:
    from vqadapt.data.formats import load_vivqa_csv

    records = load_vivqa_csv(data / "train.csv")[:40]
    path = tmp / "train.jsonl"
    lines = [
        json.dumps({"question": r.question, "answer": r.answer, "image": f"{r.image}.png"})
        for r in records
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@dataclass
class Inputs:
    """Copies of every kind of input, for one row to break one of them."""

    data: Path
    csv: Path
    json: Path
    jsonl: Path
    weights: Path
    preset: Path
    config: Path
    text: Path
    vision: Path

    def check(self, train_file: Path, *extra: object) -> list[object]:
        return [
            "data",
            "check",
            "--train_file",
            train_file,
            "--image_root",
            self.data / "images",
            *extra,
        ]

    def plan(self) -> list[object]:
        return ["plan", "--train_file", self.csv, "--image_root", self.data / "images",
                "--vision_model", self.vision, "--text_model", self.text]  # fmt: skip


@pytest.fixture
def inputs(vqa_env, tmp_path) -> Inputs:
    import yaml

    data = tmp_path / "data"
    shutil.copytree(vqa_env.data, data)
    text, vision = tmp_path / "text", tmp_path / "vision"
    shutil.copytree(vqa_env.text, text)
    shutil.copytree(vqa_env.vision, vision)
    weights = tmp_path / "answer_weights.json"
    weights.write_text(json.dumps({"bốn": 2.0, "hình tròn": 0.5}), encoding="utf-8")
    preset = tmp_path / "preset.yaml"  # flow style: any cut leaves a bracket open
    preset.write_text(
        yaml.safe_dump(
            {"name": "p", "experiments": [{"name": "a", "overrides": {}}]},
            default_flow_style=True,
        ),
        encoding="utf-8",
    )
    config = tmp_path / "settings.yaml"
    config.write_text("train:\n  lr: 0.01\n", encoding="utf-8")
    csv = data / "train.csv"
    return Inputs(
        data, csv, as_json(data, tmp_path), as_jsonl(data, tmp_path), weights, preset, config,
        text, vision,
    )  # fmt: skip


# (what, the file broken, the command that reads it, exit code, piece of the message)
FORMAT_ROWS: list[tuple[str, Callable[[Inputs], Path], Callable[[Inputs], list], int, str]] = [
    ("ViVQA CSV", lambda i: i.csv, lambda i: i.check(i.csv), 1, "train.csv"),
    ("EVJVQA JSON", lambda i: i.json, lambda i: i.check(i.json), 1, "train.json"),
    ("JSONL", lambda i: i.jsonl, lambda i: i.check(i.jsonl), 1, "train.jsonl"),
    ("an image", lambda i: i.data / "images" / "0.png", lambda i: i.check(i.csv), 1, "0.png"),
    ("answer weights", lambda i: i.weights, lambda i: i.check(i.csv, "--answer_weights", i.weights), 1, "answer_weights.json"),
    ("a preset", lambda i: i.preset, lambda i: ["ablate", "--preset", i.preset, "--out", i.data.parent / "study", "--report_only"], 2, "preset"),
    ("a --config file", lambda i: i.config, lambda i: [*i.plan(), "--config", i.config], 2, "settings.yaml"),
    ("a model's config.json", lambda i: i.text / "config.json", lambda i: i.plan(), 2, "text"),
    ("a model's weights", lambda i: i.text / "model.safetensors", lambda i: i.plan(), 2, "text model"),
    ("a tokenizer", lambda i: i.text / "tokenizer.json", lambda i: i.plan(), 2, "tokenizer"),
    ("an image processor", lambda i: i.vision / "preprocessor_config.json", lambda i: i.plan(), 2, "image processor"),
    ("a vision model's weights", lambda i: i.vision / "model.safetensors", lambda i: i.plan(), 2, "vision model"),
]  # fmt: skip


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize(
    ("what", "target", "argv", "code", "message"), FORMAT_ROWS, ids=[r[0] for r in FORMAT_ROWS]
)
def test_broken_external_files(inputs, capsys, kind, what, target, argv, code, message) -> None:
    path = target(inputs)
    DAMAGE[kind](path)
    result = run_cli(argv(inputs), capsys)
    assert result.code == code, result.out + result.err
    assert message in result.out + result.err, result.out + result.err


@pytest.fixture(scope="module")
def export_folder(runs, tmp_path_factory) -> Path:
    from vqadapt.export import export_run

    out = tmp_path_factory.mktemp("export") / "export"
    export_run(runs["finished"], out, questions=4, log=QUIET, device="cpu")
    return out


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize(
    "name",
    [
        "vqadapt_export.json",
        "projector.safetensors",
        "text/model.safetensors",
        "vision/config.json",
    ],
)
def test_broken_export_folders(export_folder, tmp_path, kind, name) -> None:
    from vqadapt.errors import VQAError
    from vqadapt.export import load_exported

    folder = tmp_path / "export"
    shutil.copytree(export_folder, folder)
    DAMAGE[kind](folder / name)
    with pytest.raises(VQAError) as caught:
        load_exported(folder, device="cpu")
    assert str(folder) in str(caught.value)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_broken_study_manifest_is_named(vqa_env, tmp_path, capsys, kind) -> None:
    import yaml

    preset = tmp_path / "p.yaml"
    preset.write_text(
        yaml.safe_dump({"name": "p", "experiments": [{"name": "a", "overrides": {}}]}),
        encoding="utf-8",
    )
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"experiments": [], "base": {}}), encoding="utf-8")
    DAMAGE[kind](study / "study.json")
    before = listing(study)
    result = run_cli(["ablate", "--preset", preset, "--out", study, "--report_only"], capsys)
    assert result.code == 2
    assert "study.json" in result.err, result.err
    assert listing(study) == before

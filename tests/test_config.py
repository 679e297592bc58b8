"""Settings are valid by construction: every field's type and range, from every source.

Table-driven over every field of the config tree: a wrong type (from a YAML file, a run's
config.yaml, a preset) and, for numbers, 0, negative, NaN, infinite and huge values where those
are invalid, each refused with a ``VQAConfigError`` naming the file, the setting, the value and
what was expected; the flags of every command have help; the shipped presets load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vqadapt import cli
from vqadapt.ablation.runner import cell_config, load_preset
from vqadapt.config import (
    AdaptConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    field_owner,
    flatten_config,
    parse_run_config,
    run_config_parser,
    settings,
)
from vqadapt.errors import VQAConfigError
from vqadapt.experiments import experiments_dir, preset_names
from vqadapt.fields import show

NAN, INF = math.nan, math.inf

# -- wrong types ----------------------------------------------------------------------------------
WRONG = {  # base type -> values of another type
    bool: ["yes", "true", 1, 0, 0.5, [True], {"a": 1}],
    int: [1.7, 2.0, [1, 2], True, "many", "1.5", {"a": 1}],
    float: [[1, 2], True, "fast", {"a": 1}],
    str: [1, 2.5, True, False, [1], {"a": 1}, "", "  "],
}


def wrong_type_cases() -> list[tuple[str, object]]:
    cases = []
    for name, spec in settings().items():
        values = list(WRONG[spec.base])
        if spec.choices is not None:
            values += ["bogus", spec.choices[0].upper()]
        if not spec.optional:
            values.append(None)
        cases += [(name, value) for value in values]
    return cases


# When a LoRA tower is off, its rank, alpha and dropout are not range-checked (a grid may leave
# them at any value); the range cases below turn the tower on.
NEEDS = {
    f"{tower}_lora_{part}": {f"use_{tower}_lora": True}
    for tower in ("text", "vision")
    for part in ("r", "alpha", "dropout")
} | {
    f"{prefix}_lora_{part}": {flag: "lora"}
    for prefix, flag in (("projector", "projector"), ("decoder", "text_decoder"))
    for part in ("r", "alpha", "dropout")
}


@pytest.mark.parametrize(("name", "value"), wrong_type_cases())
def test_a_wrong_type_in_a_file_names_the_file_setting_value_and_type(
    name: str, value: object
) -> None:
    with pytest.raises(VQAConfigError) as caught:
        RunConfig.from_dict({name: value}, source="settings.yaml")
    message = str(caught.value)
    assert message.startswith(f"settings.yaml: {name} must be "), message
    assert f"(got {show(value)}" in message
    spec = settings()[name]
    assert spec.expected() in message or "non-empty" in message


# -- numbers out of range -------------------------------------------------------------------------
HUGE = 10**30
# Every numeric field, with values it refuses and values it accepts (edges included).
RANGES: dict[str, tuple[list[object], list[object]]] = {
    "val_fraction": ([0, 1, -0.1, 1.5, NAN, INF], [0.01, 0.5, 0.99]),
    "max_question_tokens": ([0, -1], [1, 4096]),
    "max_answer_tokens": ([0, -1], [1, 64]),
    "max_train_samples": ([0, -5], [1, HUGE, None]),
    "max_eval_samples": ([0, -5], [1, HUGE, None]),
    "train_sample_seed": ([-1, 2**32], [0, 2**32 - 1]),
    "unfreeze_encoder_layers": ([-1, -HUGE], [0, 3, 100]),  # the depth is checked at load
    "text_lora_r": ([0, -4], [1, 64]),
    "text_lora_alpha": ([0, -1, NAN, INF], [0.5, 32]),
    "text_lora_dropout": ([1, 1.5, -0.1, NAN, INF], [0, 0.5]),
    "vision_lora_r": ([0, -4], [1, 8]),
    "vision_lora_alpha": ([0, -1, NAN, -INF], [16]),
    "vision_lora_dropout": ([1, -0.1, NAN], [0, 0.05]),
    "projector_lora_r": ([0, -1], [1, 4]),
    "projector_lora_alpha": ([0, NAN, INF], [8]),
    "projector_lora_dropout": ([1, -0.1], [0, 0.1]),
    "decoder_lora_r": ([0, -8], [1, 16]),
    "decoder_lora_alpha": ([0, -2, NAN], [0.5, 32]),
    "decoder_lora_dropout": ([1, 2, NAN], [0, 0.05]),
    "epochs": ([0, -1], [1, HUGE]),
    "batch_size": ([0, -1], [1, 4096]),
    "epoch_repeats": ([0, -1, 1.5], [1, 10]),
    "eval_batch_size": ([0, -1], [1]),
    "gradient_accumulation_steps": ([0, -1], [1, 16]),
    "lr": ([0, -1e-3, NAN, INF, -INF, 1e400], [1e-5, "1e-3", 1, 10]),
    "vision_lr": ([0, -1, NAN, INF], [None, 1e-4]),
    "weight_decay": ([-0.1, NAN, INF], [0, 0.1]),
    "dropout": ([1, -0.1, NAN, INF], [0, 0.9]),
    "warmup_ratio": ([1, -0.1, NAN], [0, 0.5]),
    "max_grad_norm": ([-1, NAN, INF], [0, 1.0, 100]),
    "label_smoothing": ([1, -0.1, NAN], [0, 0.1]),
    "seed": ([-1, 2**32, HUGE], [0, 2**32 - 1]),
    "early_stopping_patience": ([-1], [0, 5]),
    "num_beams": ([0, -1], [1, 8]),
    "ddp_timeout": ([0, -1, 10**9, HUGE], [1, 1800, 365 * 86_400]),
    "log_every": ([0, -1], [1, 1000]),
}


def test_the_range_table_covers_every_numeric_field() -> None:
    numeric = {name for name, spec in settings().items() if spec.base in (int, float)}
    assert numeric == set(RANGES)


@pytest.mark.parametrize(
    ("name", "value"), [(name, v) for name, (bad, _) in RANGES.items() for v in bad]
)
def test_numbers_out_of_range_are_refused(name: str, value: object) -> None:
    with pytest.raises(VQAConfigError) as caught:
        RunConfig.from_dict({**NEEDS.get(name, {}), name: value}, source="run/config.yaml")
    message = str(caught.value)
    assert message.startswith("run/config.yaml: ") and name in message, message
    assert "must be" in message and "(got " in message, message


@pytest.mark.parametrize(
    ("name", "value"), [(name, v) for name, (_, good) in RANGES.items() for v in good]
)
def test_numbers_in_range_are_accepted(name: str, value: object) -> None:
    config = RunConfig.from_dict({**NEEDS.get(name, {}), name: value})
    stored = getattr(getattr(config, field_owner()[name]), name)
    expected = None if value is None else settings()[name].base(value)
    assert stored == expected and type(stored) is type(expected)


def test_unused_lora_settings_are_not_range_checked_but_typed() -> None:
    assert RunConfig.from_dict({"text_lora_r": 0, "vision_lora_dropout": 5}).adapt.text_lora_r == 0
    with pytest.raises(VQAConfigError, match=r"text_lora_r must be an integer \(got 'x'\)"):
        RunConfig.from_dict({"text_lora_r": "x"})


# -- messages ---------------------------------------------------------------------------------------
def test_every_problem_is_listed_at_once() -> None:
    with pytest.raises(VQAConfigError) as caught:
        RunConfig.from_dict(
            {"epochs": 1.7, "lr": [1, 2], "batch_size": None, "lr_typo": 1}, "c.yaml"
        )
    message = str(caught.value)
    assert message.startswith("invalid settings:")
    for part in (
        "c.yaml: epochs must be an integer (got 1.7)",
        "c.yaml: lr must be a number (got [1, 2])",
        "c.yaml: batch_size must be an integer (got null)",
        "c.yaml: unknown setting 'lr_typo'",
    ):
        assert part in message


def test_yaml_words_get_a_hint() -> None:
    with pytest.raises(VQAConfigError, match=r"got false: YAML reads an unquoted yes/no"):
        RunConfig.from_dict(yaml.safe_load("mixed_precision: no"))
    assert (
        RunConfig.from_dict(yaml.safe_load("mixed_precision: 'no'")).train.mixed_precision == "no"
    )
    with pytest.raises(VQAConfigError, match=r"use_text_lora must be true or false \(got 'yes'\)"):
        RunConfig.from_dict(yaml.safe_load("use_text_lora: 'yes'"))
    assert RunConfig.from_dict(yaml.safe_load("use_text_lora: yes")).adapt.use_text_lora is True


def test_a_misspelt_setting_gets_a_suggestion() -> None:
    with pytest.raises(
        VQAConfigError, match=r"unknown setting 'batchsize' \(did you mean 'batch_size'\?\)"
    ):
        RunConfig.from_dict({"batchsize": 8})


def test_a_gpu_index_for_training_says_what_to_do() -> None:
    with pytest.raises(
        VQAConfigError,
        match=r"--device must be one of auto, cpu, cuda \(got 'cuda:1'\); .*CUDA_VISIBLE_DEVICES",
    ):
        parse_run_config(["--device", "cuda:1"])


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"train": {"resume": True, "overwrite": True}}, "--resume and --overwrite contradict"),
        ({"model": {"blind": True}, "adapt": {"use_vision_lora": True}}, "needs a vision tower"),
        ({"train": {"speed_paths": "warp_drive"}}, "--speed_paths: unknown item 'warp_drive'"),
    ],
)
def test_settings_that_contradict_each_other(sections: dict, message: str) -> None:
    with pytest.raises(VQAConfigError, match=message) as caught:
        RunConfig.from_dict(sections, source="x.yaml")
    assert str(caught.value).startswith("x.yaml: ")


def test_construction_checks_and_validate_rechecks_a_changed_config() -> None:
    with pytest.raises(VQAConfigError, match=r"epochs must be > 0 \(got 0\)"):
        TrainConfig(epochs=0)
    with pytest.raises(VQAConfigError, match=r"val_fraction must be in \(0, 1\)"):
        DataConfig(val_fraction=1.0)
    config = RunConfig(adapt=AdaptConfig(use_text_lora=True))
    config.validate()
    config.adapt.text_lora_r = 0  # changed after construction
    with pytest.raises(VQAConfigError, match="--text_lora_r must be > 0"):
        config.validate()


def test_values_are_converted_once_checked() -> None:
    config = RunConfig.from_dict({"lr": "1e-3", "epochs": "3", "text_lora_alpha": 16})
    assert config.train.lr == 0.001 and config.train.epochs == 3
    assert config.adapt.text_lora_alpha == 16.0 and isinstance(config.adapt.text_lora_alpha, float)
    assert RunConfig.from_dict(config.to_dict()) == config  # the saved form reads back the same


# -- every source ---------------------------------------------------------------------------------
BAD_FILES = {
    "epochs: 1.7\n": "epochs must be an integer (got 1.7)",
    "lr: [1, 2]\n": "lr must be a number (got [1, 2])",
    "batch_size: null\n": "batch_size must be an integer (got null)",
    'use_text_lora: "yes"\n': "use_text_lora must be true or false (got 'yes')",
    "train:\n  epochs: 0\n": "epochs must be > 0 (got 0)",
}


@pytest.mark.parametrize(("text", "message"), BAD_FILES.items())
def test_a_config_file_is_refused_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, text: str, message: str
) -> None:
    import vqadapt.train

    def forbidden(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(vqadapt.train, "train", forbidden)
    settings_file = tmp_path / "bad.yaml"
    settings_file.write_text(text, encoding="utf-8")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(settings_file), "--output_dir", str(out)])
    assert exit_info.value.code == 2
    assert f"error: {settings_file}: {message}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("text", "message"), BAD_FILES.items())
def test_a_runs_config_yaml_is_refused_with_its_path(
    tmp_path: Path, capsys, text: str, message: str
) -> None:
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "best" / "trained.safetensors").write_bytes(b"")
    (run / "config.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--run", str(run)])
    assert exit_info.value.code == 2
    assert f"error: {run / 'config.yaml'}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), BAD_FILES.items())
def test_a_preset_is_refused_with_its_path_and_experiment(
    tmp_path: Path, text: str, message: str
) -> None:
    overrides = flatten_config(yaml.safe_load(text))
    preset = tmp_path / "p.yaml"
    experiments = [{"name": "fine", "overrides": {}}, {"name": "bad", "overrides": overrides}]
    preset.write_text(yaml.safe_dump({"experiments": experiments}), encoding="utf-8")
    with pytest.raises(VQAConfigError) as caught:
        load_preset(str(preset))
    assert f"{preset}, experiment 'bad': {message}" in str(caught.value)


@pytest.mark.parametrize(
    ("preset", "message"),
    [
        ({"base": [1], "experiments": [{"name": "a"}]}, "base must be a mapping"),
        ({"experiments": [{"overrides": {}}]}, "each with a name"),
        ({"experiments": "baseline"}, "experiments must be a list"),
        ({"experiments": [{"name": "a", "overrides": [1]}]}, "overrides must be a mapping"),
        ({"seeds": 0, "experiments": [{"name": "a"}]}, "seeds must be an integer >= 1"),
        ({"seeds": 1.5, "experiments": [{"name": "a"}]}, "seeds must be an integer >= 1"),
        ({"base": {"lr": "fast"}, "experiments": [{"name": "a"}]}, "base: lr must be a number"),
        ({"grid": {"epochs": [1, 0]}}, "experiment 'epochs-0': epochs must be > 0"),
    ],
)
def test_a_malformed_preset_names_its_file(tmp_path: Path, preset: dict, message: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    with pytest.raises(VQAConfigError, match=message) as caught:
        load_preset(str(path))
    assert str(path) in str(caught.value)


# -- presets as package data ----------------------------------------------------------------------
def test_the_shipped_presets_are_package_data_and_every_cell_is_valid() -> None:
    import vqadapt

    assert experiments_dir() == Path(vqadapt.__file__).parent / "experiments"
    assert {"quick", "seed", "grid-example"} <= set(preset_names())
    for name in preset_names():
        preset = load_preset(name)
        for experiment in preset.experiments:
            cell_config(preset, experiment, 0, Path("unused"), {})
    assert (experiments_dir() / "hypotheses.yaml").is_file()


def test_experiments_folder_can_be_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "presets").mkdir()
    (tmp_path / "defaults.yaml").write_text("epochs: 2\n", encoding="utf-8")
    mine = {"seeds": 2, "experiments": [{"name": "only", "overrides": {"lr": 0.01}}]}
    (tmp_path / "presets" / "mine.yaml").write_text(yaml.safe_dump(mine), encoding="utf-8")
    monkeypatch.setenv("VQADAPT_EXPERIMENTS", str(tmp_path))
    preset = load_preset("mine")
    assert (preset.seeds, preset.defaults, [e.name for e in preset.experiments]) == (
        2,
        {"epochs": 2},
        ["only"],
    )
    with pytest.raises(VQAConfigError, match=r"unknown preset 'seed'; known: mine"):
        load_preset("seed")


# -- the command line -----------------------------------------------------------------------------
def test_flags_follow_the_conventions_of_hf_argument_parser() -> None:
    config = parse_run_config(
        [
            "--use-text-lora",
            "--text_lora_r",
            "8",
            "--no-cache",
            "--progress",
            "no",
            "--blind",
            "false",
        ]
    )
    assert config.adapt.use_text_lora and config.adapt.text_lora_r == 8
    assert not config.train.cache and not config.train.progress and not config.model.blind
    assert parse_run_config(["--no_cache", "--cache", "yes"]).train.cache is True  # last wins
    with pytest.raises(
        VQAConfigError, match=r"--use_text_lora must be true or false \(got 'maybe'\)"
    ):
        parse_run_config(["--use_text_lora", "maybe"])
    with pytest.raises(VQAConfigError, match="--epochs: expected one argument"):
        parse_run_config(["--epochs"])


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path: Path) -> None:
    settings_file = tmp_path / "s.yaml"
    settings_file.write_text("train:\n  lr: 1e-2\n  epochs: 3\n", encoding="utf-8")
    config = parse_run_config(["--config", str(settings_file), "--epochs", "5"])
    assert (config.train.lr, config.train.epochs, config.train.batch_size) == (0.01, 5, 32)


def test_an_empty_section_is_refused_not_read_as_defaults(tmp_path: Path) -> None:
    """``train:`` with nothing under it is what a file cut off after that line looks like."""
    settings_file = tmp_path / "s.yaml"
    settings_file.write_text("data:\n  val_fraction: 0.2\ntrain:\n", encoding="utf-8")
    with pytest.raises(VQAConfigError, match=r"s.yaml: section 'train' holds no settings"):
        parse_run_config(["--config", str(settings_file)])


def _option_actions(parser: argparse.ArgumentParser, prefix: str) -> dict[str, list]:
    """Every (sub)command's options: ``{"vqadapt eval": [actions], ...}``."""
    found = {prefix: [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_option_actions(sub, f"{prefix} {name}"))
    return found


def test_every_option_of_every_command_has_help() -> None:
    commands = _option_actions(cli.build_parser(), "vqadapt")
    commands["vqadapt train"] = run_config_parser()._actions
    assert {"vqadapt eval", "vqadapt predict", "vqadapt data stats", "vqadapt data check"} <= set(
        commands
    )
    missing = [
        f"{command} {'/'.join(action.option_strings) or action.dest}"
        for command, actions in commands.items()
        for action in actions
        if not action.help
    ]
    assert missing == []
    flags = run_config_parser().format_help()
    for name in settings():
        assert f"--{name} " in flags  # shown, with its help (dashed aliases are hidden)


def test_speed_paths_help_names_every_path() -> None:
    """The grammar of --speed_paths lives in vqadapt.speed (which imports torch); the flag's
    help, shown without torch, must name the same paths."""
    from vqadapt.speed import SpeedPaths

    text = next(f for f in dataclasses.fields(TrainConfig) if f.name == "speed_paths")
    for name in [f.name for f in dataclasses.fields(SpeedPaths)] + ["auto", "library"]:
        assert name in text.metadata["help"], name


def test_plan_help_lists_the_rank_table(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--rank_table" in out and "--unfreeze_encoder_layers" in out


def test_train_help_imports_neither_torch_nor_transformers() -> None:
    code = (
        "import sys\nfrom vqadapt import cli\ntry:\n    cli.main(['train', '--help'])\n"
        "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "--speed_paths" in done.stdout


NUMERIC_FLAGS = [
    ("eval --run r --num_beams", ["0", "-1", "1.5"]),
    ("predict --run r --question q --num_beams", ["0", "-2"]),
    ("export --run r --out o --check_questions", ["0", "-1"]),
    ("export --run r --out o --tolerance", ["-1e-4", "nan", "inf", "2"]),
    ("data synth --out o --n", ["0", "1", "-5"]),
    ("data synth --out o --seed", ["-1", str(2**32), "x"]),
    ("data synth --out o --extra_test", ["-1", "1e9", "x"]),
    ("backbones tiny --text_steps", ["-1", "1e9"]),
    ("backbones tiny --vision_steps", ["-1"]),
    ("backbones tiny --text_encoder_layers", ["0", "-3"]),
    ("answer-weights --data d --beta", ["1", "-0.5", "nan"]),
    ("answer-weights --data d --clip 0.5", ["nan", "-1", "inf"]),
    ("ablate --seeds", ["0", "-1"]),
    ("ablate --jobs", ["0", "-1"]),
    ("demo --run r --port", ["-1", "65536", "1e9"]),
    ("demo --run r --examples", ["-1"]),
    ("demo --run r --num_beams", ["0"]),
    ("demo --run r --max_file_mb", ["0", "nan", "inf", "-1"]),
    ("demo --run r --max_pixels", ["0", "-1"]),
    ("demo --run r --max_question_chars", ["0"]),
]


@pytest.mark.parametrize(
    ("command", "value"), [(command, v) for command, values in NUMERIC_FLAGS for v in values]
)
def test_numeric_flags_of_every_command_refuse_bad_numbers(
    capsys, command: str, value: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    flag = next(word for word in reversed(command.split()) if word.startswith("--"))
    refused = (f"argument {flag}: must be", f"argument {flag}: expected", f"{flag} must be")
    assert any(words in err for words in refused), err


# -- the wheel ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_installed_wheel_finds_its_presets_outside_the_checkout(tmp_path: Path) -> None:
    """Build a wheel, install it into a fresh virtual environment (its dependencies borrowed
    from this environment's site-packages, nothing downloaded) and run the ablation command
    from a folder outside the checkout."""
    import sysconfig
    import venv
    import zipfile

    repo = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ in the checkout
    shutil.copytree(repo / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, source / name)
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*build, "--no-index", "-q", "-w", str(wheels), str(source)], check=True, timeout=300
    )
    (wheel,) = wheels.glob("vqadapt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("defaults.yaml", "hypotheses.yaml", "presets/seed.yaml", "presets/quick.yaml"):
        assert f"vqadapt/experiments/{shipped}" in names

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # torch, yaml, ... from this environment (after the new one's own site-packages; a .pth
    # line adds a folder without running that folder's .pth files, so the editable install of
    # the checkout stays out)
    (site / "borrowed.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            *["--no-index", str(wheel)],
        ],
        check=True,
        timeout=300,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    environment = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VQADAPT_EXPERIMENTS")
    }

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(env_dir / "bin" / "vqadapt"), *args],
            cwd=outside,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "--preset" in run("ablate", "--help")
    where = subprocess.run(
        [str(python), "-c", "import vqadapt.experiments as e; print(e.experiments_dir())"],
        cwd=outside,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where) == site / "vqadapt" / "experiments"
    run("ablate", "--preset", "seed", "--report_only", "--out", "study")
    study = json.loads((outside / "study" / "study.json").read_text(encoding="utf-8"))
    assert [e["name"] for e in study["experiments"]][:2] == ["baseline", "unfreeze3"]
    assert study["base"]["epochs"] == 10  # from the shipped defaults.yaml
    report = (outside / "study" / "report.md").read_text(encoding="utf-8")
    assert str(site / "vqadapt" / "experiments" / "hypotheses.yaml") in report


def test_a_runs_config_must_hold_every_setting(tmp_path: Path) -> None:
    """A run's config.yaml is written whole: one that lacks a setting is damaged, and its
    default would rebuild another model than the one trained."""
    path = tmp_path / "config.yaml"
    RunConfig().save(path)
    assert RunConfig.load(path, complete=True) == RunConfig()
    path.write_text(path.read_text(encoding="utf-8").replace("  batch_size: 32\n", ""))
    assert RunConfig.load(path).train.batch_size == 32  # a settings file may leave it out
    with pytest.raises(
        VQAConfigError, match=r"config.yaml: damaged.*1 settings missing \(batch_size\)"
    ):
        RunConfig.load(path, complete=True)

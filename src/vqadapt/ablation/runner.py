"""The ablation runner: presets are data, each cell is a run directory with a status.

A preset (``experiments/presets/NAME.yaml``) is a small file of overrides over
``experiments/defaults.yaml``: ``base`` applies to every cell, then each experiment's
``overrides`` (or every combination of a ``grid``). Each (experiment, seed) cell trains in its
own process (``python -m vqadapt train --config cell.yaml``), so a crash or an out-of-memory
kill marks that cell failed and the study goes on. Rerunning skips finished cells, resumes
interrupted ones from their last checkpoint, and retries failed ones only with
``--retry_failed``. The report is rebuilt at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vqadapt.config import RunConfig, field_owner, load_yaml
from vqadapt.errors import VQAConfigError
from vqadapt.io import atomic_write_json, atomic_write_text

EXPERIMENTS_DIR = Path(__file__).resolve().parents[3] / "experiments"


@dataclass
class Experiment:
    name: str
    description: str
    overrides: dict[str, Any]


@dataclass
class Preset:
    name: str
    description: str
    seeds: int
    base: dict[str, Any]
    experiments: list[Experiment]
    answer_weights: dict[str, Any] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)


def experiments_dir() -> Path:
    """``experiments/`` of the checkout, or ``$VQADAPT_EXPERIMENTS``."""
    return Path(os.environ.get("VQADAPT_EXPERIMENTS", EXPERIMENTS_DIR))


def _preset_file(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise VQAConfigError(f"preset file not found: {path}")
        return path
    path = experiments_dir() / "presets" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (experiments_dir() / "presets").glob("*.yaml"))
        raise VQAConfigError(f"unknown preset {name_or_path!r}; known: {', '.join(known)}")
    return path


def _grid_experiments(grid: dict[str, list[Any]]) -> list[Experiment]:
    keys = list(grid)
    out = []
    for values in itertools.product(
        *(grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys)
    ):
        overrides = dict(zip(keys, values, strict=True))
        name = "_".join(f"{k}-{v}" for k, v in overrides.items())
        out.append(Experiment(name, ", ".join(f"{k}={v}" for k, v in overrides.items()), overrides))
    return out


def load_preset(name_or_path: str) -> Preset:
    """Read a preset (following ``extends``) and check every override names a real setting."""
    values = load_yaml(_preset_file(name_or_path))
    if "extends" in values:
        parent = load_yaml(_preset_file(values["extends"]))
        merged_base = {**parent.get("base", {}), **values.get("base", {})}
        values = {**parent, **values, "base": merged_base}
    experiments = [
        Experiment(e["name"], e.get("description", ""), dict(e.get("overrides", {})))
        for e in values.get("experiments", [])
    ]
    if values.get("grid"):
        experiments += _grid_experiments(values["grid"])
    if not experiments:
        raise VQAConfigError(f"preset {name_or_path!r} defines no experiments")
    defaults = load_yaml(experiments_dir() / "defaults.yaml")
    owner = field_owner()
    for where, mapping in [("defaults", defaults), ("base", values.get("base", {}))] + [
        (e.name, e.overrides) for e in experiments
    ]:
        unknown = sorted(set(mapping) - set(owner))
        if unknown:
            raise VQAConfigError(
                f"preset {name_or_path!r}, {where}: unknown settings {', '.join(unknown)}"
            )
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise VQAConfigError(f"preset {name_or_path!r}: experiment names repeat")
    return Preset(
        name=values.get("name", Path(name_or_path).stem),
        description=values.get("description", ""),
        seeds=int(values.get("seeds", 1)),
        base=values.get("base", {}),
        experiments=experiments,
        answer_weights=values.get("answer_weights"),
        defaults=defaults,
    )


def cell_config(
    preset: Preset, experiment: Experiment, seed: int, cell: Path, extra: dict[str, Any]
) -> RunConfig:
    values = {**preset.defaults, **preset.base, **experiment.overrides, **extra}
    values.update(seed=seed, output_dir=str(cell))
    config = RunConfig.from_dict(values)
    config.validate()
    return config


def read_status(cell: Path) -> str | None:
    try:
        return json.loads((cell / "status.json").read_text(encoding="utf-8")).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise VQAConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def ensure_answer_weights(preset: Preset, out: Path, extra: dict[str, Any], log) -> Path | None:
    """Compute the study's answer_weights.json from its training split once (reused after)."""
    if not preset.answer_weights:
        return None
    path = out / "answer_weights.json"
    if path.is_file():
        return path
    from vqadapt import embedded
    from vqadapt.data.pipeline import load_splits
    from vqadapt.weights import compute_answer_weights, save_answer_weights

    config = RunConfig.from_dict({**preset.defaults, **preset.base, **extra})
    data_dir = embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
    train = load_splits(config.data, data_dir).train
    spec = preset.answer_weights
    clip = tuple(spec["clip"]) if spec.get("clip") else None
    weights = compute_answer_weights(
        [r.answer for r in train], spec.get("scheme", "inverse"), spec.get("beta", 0.999), clip
    )
    save_answer_weights(weights, path)
    log(f"answer weights ({spec.get('scheme')}) for {len(weights)} answers: {path}")
    return path


def prepare_embedded(preset: Preset, extra: dict[str, Any], log) -> None:
    """Build the embedded data and tiny backbones once, up front, so that no cell's wall time
    includes them."""
    from vqadapt import embedded

    config = RunConfig.from_dict({**preset.defaults, **preset.base, **extra})
    if config.data.train_file is None:
        embedded.ensure_synthetic(log=log)
    if config.model.text_model is None or (
        config.model.vision_model is None and not config.model.blind
    ):
        embedded.ensure_tiny_backbones(log=log)


def run_cell(config: RunConfig, cell: Path, resume: bool, log) -> str:
    """Train one cell in its own process; returns its final status."""
    cell.mkdir(parents=True, exist_ok=True)
    config.train.resume = resume
    config.save(cell / "cell.yaml")
    command = [sys.executable, "-m", "vqadapt", "train", "--config", str(cell / "cell.yaml")]
    started = time.perf_counter()
    with open(cell / "train.log", "a", encoding="utf-8") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    status = read_status(cell)
    if code != 0 or status != "success":
        tail = (cell / "train.log").read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        reason = f"exit code {code}" + (" (killed: out of memory?)" if code in (-9, 137) else "")
        atomic_write_json(
            cell / "status.json",
            {
                "status": "failed",
                "error": reason + "\n" + "\n".join(tail),
                "started": None,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
        status = "failed"
    log(f"  {status} in {time.perf_counter() - started:.0f} s")
    return status


def run_study(args) -> Path:
    """``vqadapt ablate``: run every missing cell, then write the report."""
    log = print
    preset = load_preset("quick" if args.quick else args.preset)
    out = Path(args.out or f"runs/ablation-{preset.name}")
    seeds = list(range(args.seeds if args.seeds is not None else preset.seeds))
    extra = _parse_sets(args.set)
    out.mkdir(parents=True, exist_ok=True)
    study = {
        "preset": preset.name,
        "description": preset.description,
        "seeds": seeds,
        "experiments": [
            {"name": e.name, "description": e.description, "overrides": e.overrides}
            for e in preset.experiments
        ],
        "base": {**preset.defaults, **preset.base, **extra},
        "synthetic": extra.get("train_file", preset.base.get("train_file")) is None,
        "notes": "",
    }
    previous = out / "study.json"
    if previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        if old.get("experiments") != study["experiments"] or old.get("base") != study["base"]:
            raise VQAConfigError(
                f"{out} holds a study with other settings: use another --out (nothing was overwritten)"
            )
        study["seeds"] = sorted(set(old.get("seeds", [])) | set(seeds))
    atomic_write_json(previous, study)
    started = time.perf_counter()
    if not args.report_only:
        prepare_embedded(preset, extra, log)
        weights = ensure_answer_weights(preset, out, extra, log)
        if weights is not None:
            extra = {**extra, "answer_weights": str(weights)}
        for experiment in preset.experiments:
            for seed in seeds:
                cell = out / experiment.name / f"seed{seed}"
                status = read_status(cell)
                if status == "success":
                    log(f"{experiment.name} seed {seed}: done before, skipped")
                    continue
                if status == "failed" and not args.retry_failed:
                    log(
                        f"{experiment.name} seed {seed}: failed before, skipped (--retry_failed reruns it)"
                    )
                    continue
                resume = (cell / "config.yaml").is_file() and status != "failed"
                log(
                    f"{experiment.name} seed {seed}: {'resuming' if resume else 'training'} ({experiment.description})"
                )
                config = cell_config(preset, experiment, seed, cell, extra)
                if status == "failed":
                    config.train.overwrite = True
                run_cell(config, cell, resume, log)
    from vqadapt.ablation.report import write_report

    paths = write_report(out)
    atomic_write_text(out / "wall_time.txt", f"{time.perf_counter() - started:.1f}\n")
    log(f"report: {paths['report.md']} (and report.html, results.csv, plots/)")
    return out

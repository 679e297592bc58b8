"""The ablation runner: presets are data, each cell is a run directory with a status.

A preset (``presets/NAME.yaml`` of ``vqadapt.experiments``, shipped with the package) is a small
file of overrides over its ``defaults.yaml``: ``base`` applies to every cell, then each experiment's
``overrides`` (or every combination of a ``grid``). Each (experiment, seed) cell trains in its
own process (``python -m vqadapt train --config cell.yaml``), so a crash or an out-of-memory
kill marks that cell failed and the study goes on. Rerunning skips finished cells, resumes
interrupted ones from their last checkpoint, and retries failed ones only with
``--retry_failed``. The report is rebuilt at the end. ``--jobs N`` trains N cells at once, each
on its own GPU when there are several, or on its share of the CPU cores.
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

from vqadapt.config import FRACTION_BUDGETS, RunConfig, check_settings, load_yaml
from vqadapt.errors import VQAConfigError
from vqadapt.experiments import defaults_file, preset_file
from vqadapt.folders import lock_holder
from vqadapt.io import atomic_write_json, atomic_write_text


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
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    """Shares of the training questions each experiment trains on (data efficiency)."""
    fraction_budget: str = "epochs"
    """How a smaller training fraction trains: ``epochs`` (the preset's epochs, so fewer
    steps) or ``steps`` (about as many steps as the largest fraction: each epoch passes
    several times over its questions, ``epoch_repeats``, and is validated once)."""


def _preset_file(name_or_path: str) -> Path:
    """A YAML file given by path, or a preset shipped with vqadapt by name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise VQAConfigError(f"preset file not found: {path}")
        return path
    return preset_file(name_or_path)


def _mapping(values: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    """``values[key]``: a mapping (absent or empty: ``{}``)."""
    found = values.get(key) or {}
    if not isinstance(found, dict):
        raise VQAConfigError(f"{path}: {key} must be a mapping of settings (got {found!r})")
    return dict(found)


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
    """Read a preset (following ``extends``) and check every override: a real setting, of the
    right type and range (a message names the preset, the experiment, the setting, the value)."""
    path = _preset_file(name_or_path)
    values = load_yaml(path)
    if "extends" in values:
        parent = load_yaml(_preset_file(str(values["extends"])))
        merged_base = {**_mapping(parent, "base", path), **_mapping(values, "base", path)}
        values = {**parent, **values, "base": merged_base}
    listed = values.get("experiments") or []
    if values.get("add_experiments"):  # appended to the experiments the preset extends
        listed = [*listed, *values["add_experiments"]]
    if not isinstance(listed, list) or not all(isinstance(e, dict) and "name" in e for e in listed):
        raise VQAConfigError(f"{path}: experiments must be a list of mappings, each with a name")
    experiments = [
        Experiment(str(e["name"]), e.get("description", ""), _mapping(e, "overrides", path))
        for e in listed
    ]
    if values.get("grid"):
        experiments += _grid_experiments(_mapping(values, "grid", path))
    seeds = values.get("seeds", 1)
    if type(seeds) is not int or seeds < 1:
        raise VQAConfigError(f"{path}: seeds must be an integer >= 1 (got {seeds!r})")
    if not experiments:
        raise VQAConfigError(f"preset {name_or_path!r} defines no experiments")
    defaults, base = load_yaml(defaults_file()), _mapping(values, "base", path)
    check_settings(defaults, defaults_file())
    check_settings(base, f"{path}, base")
    for experiment in experiments:
        check_settings(experiment.overrides, f"{path}, experiment {experiment.name!r}")
    names = [e.name for e in experiments]
    if len(set(names)) != len(names):
        raise VQAConfigError(f"preset {name_or_path!r}: experiment names repeat")
    return Preset(
        name=values.get("name", Path(name_or_path).stem),
        description=values.get("description", ""),
        seeds=seeds,
        base=base,
        experiments=experiments,
        answer_weights=values.get("answer_weights"),
        defaults=defaults,
        train_fractions=check_fractions(values.get("train_fractions", [1.0]), name_or_path),
        fraction_budget=check_budget(values.get("fraction_budget", "epochs"), name_or_path),
    )


def check_fractions(fractions: Any, where: str) -> list[float]:
    """Training fractions in (0, 1], sorted, without repeats; the largest is the main study."""
    if not isinstance(fractions, list | tuple) or not fractions:
        raise VQAConfigError(
            f"{where}: train_fractions must be a non-empty list, got {fractions!r}"
        )
    values = []
    for value in fractions:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise VQAConfigError(f"{where}: every train fraction must be in (0, 1], got {value!r}")
        values.append(float(value))
    return sorted(set(values))


def check_budget(budget: Any, where: str) -> str:
    """``epochs`` or ``steps`` (``Preset.fraction_budget``)."""
    if budget not in FRACTION_BUDGETS:
        raise VQAConfigError(
            f"{where}: fraction_budget must be one of {', '.join(FRACTION_BUDGETS)}, got {budget!r}"
        )
    return budget


SAMPLES = "random, training sample k for seed k"
"""How the study's cells draw max_train_samples / max_eval_samples (study.json ``samples``); a
study folder from before (the first questions) is not continued with other samples."""


def cell_dir(out: Path, experiment: str, seed: int, fraction: float, main_fraction: float) -> Path:
    """``<experiment>/seed<k>`` for the main (largest) fraction, else
    ``<experiment>/train<fraction>/seed<k>``."""
    if fraction == main_fraction:
        return out / experiment / f"seed{seed}"
    return out / experiment / f"train{fraction:g}" / f"seed{seed}"


def fraction_settings(preset: Preset, extra: dict[str, Any], log) -> dict[float, dict[str, int]]:
    """The settings each training fraction's cells add. ``max_train_samples``: a share of the
    training split the cells use (after the validation split and any ``max_train_samples``
    cap); it draws a random sample (per seed, ``cell_config``), so a smaller fraction's
    questions are part of every larger one's. Under ``fraction_budget: steps`` also
    ``epoch_repeats``: the passes per epoch that give a smaller fraction about as many steps as
    the largest one."""
    if preset.train_fractions == [1.0]:
        return {1.0: {}}
    from vqadapt import embedded
    from vqadapt.data.pipeline import load_splits

    config = RunConfig.from_dict({**preset.defaults, **preset.base, **extra})
    data_dir = embedded.ensure_synthetic(log=log) if config.data.train_file is None else None
    available = len(load_splits(config.data, data_dir).train)
    counts = {f: max(1, round(f * available)) for f in preset.train_fractions}
    largest = counts[max(preset.train_fractions)]
    settings: dict[float, dict[str, int]] = {}
    for fraction, count in counts.items():
        settings[fraction] = {} if fraction == 1.0 else {"max_train_samples": count}
        if preset.fraction_budget == "steps" and count < largest:
            repeats = config.train.epoch_repeats * max(1, round(largest / count))
            settings[fraction]["epoch_repeats"] = repeats
    return settings


def cell_config(
    preset: Preset,
    experiment: Experiment,
    seed: int,
    cell: Path,
    extra: dict[str, Any],
    fraction: dict[str, int] | None = None,
) -> RunConfig:
    """One cell's settings: the defaults, the preset's base, the experiment's overrides, the
    command line's ``--set``, then its training fraction's (``fraction_settings``). Seed k
    also draws training sample k (``train_sample_seed``, unless the preset or ``--set`` fixes
    it): where cells train on part of the questions, the seeds vary which part, and a verdict
    over seeds covers that too; the experiments of one seed share it."""
    values = {**preset.defaults, **preset.base, **experiment.overrides, **extra, **(fraction or {})}
    values.setdefault("train_sample_seed", seed)
    values.update(seed=seed, output_dir=str(cell))
    return RunConfig.from_dict(values)


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


@dataclass
class Job:
    """One cell to train: its folder, its config, and whether it resumes a checkpoint."""

    name: str  # "lora_r16 seed 0"
    description: str
    cell: Path
    config: RunConfig
    resume: bool
    threads: str | None = None
    """The thread count the job ran with (``OMP_NUM_THREADS`` it was given), for the record."""
    probe_only: bool = False
    """The cell trained but was stopped before its per-question losses were written."""


def expected_cost(config: RunConfig) -> float:
    """A rough rank of a cell's training time, to start the longest cells first when several
    run at once: every sample runs the decoder; text LoRA adds the text encoder's backward
    pass, vision LoRA the vision tower's too (in the quick study a vision + text LoRA cell takes
    about 4x the frozen baseline's time, a text LoRA cell about 2x)."""
    from vqadapt import menu

    choices = menu.resolve(config.adapt)
    text, vision = choices["text_encoder"], choices["vision"]
    per_sample = 1 + (text.last_n > 0) + 2 * (text.lora or text.full)
    per_sample += 4 * (not vision.frozen)
    samples = (config.data.max_train_samples or 10**9) * config.train.epoch_repeats
    return per_sample * config.train.epochs * samples


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device.strip() for device in listed.split(",") if device.strip()]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def job_environments(jobs: int) -> list[dict[str, str]]:
    """Environment overrides for each of ``jobs`` cells that run at once: a GPU each
    (round-robin over the visible ones) and an equal share of the CPU cores for each
    process's thread pool (unless ``OMP_NUM_THREADS`` is set already). One job changes
    nothing."""
    if jobs == 1:
        return [{}]
    gpus = visible_gpus()
    # The cores this process may run on (a container's or taskset's share); macOS lacks the call.
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    environments = []
    for slot in range(jobs):
        environment = {}
        if gpus:
            environment["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        if "OMP_NUM_THREADS" not in os.environ:
            environment["OMP_NUM_THREADS"] = str(max(1, cores // jobs))
        environments.append(environment)
    return environments


@dataclass
class _Running:
    job: Job
    process: subprocess.Popen
    log_file: Any
    started: float
    peak_rss_mb: float | None = None
    cpu_seconds: float | None = None


RESOURCES_FILE = "resources.json"


def _probe_missing(cell: Path) -> bool:
    """A finished cell whose per-question losses were never written (the study was stopped
    between training and the probe; a probe that failed leaves ``probe_error.txt``)."""
    from vqadapt.ablation.probe import LOSSES_FILE

    return not (cell / LOSSES_FILE).is_file() and not (cell / "probe_error.txt").is_file()


def reserve_cell(cell: Path) -> None:
    """Make ``cell`` a run folder (the marker) before the runner writes its own files there;
    a cell made before runs were marked (it holds the runner's ``cell.yaml``) is adopted."""
    from vqadapt.run_dir import MARKER, RunDirectory, now

    if (cell / "cell.yaml").is_file() and not (cell / MARKER).is_file():
        atomic_write_json(cell / MARKER, {"vqadapt_run": 1, "created": now()})
    RunDirectory.reserve(cell)


def _start(job: Job, environment: dict[str, str]) -> _Running:
    """Launch one cell's process: training, then the per-question loss probe
    (``python -m vqadapt.ablation.cell --config cell.yaml``); it dies with the runner
    (``lifeline``): a killed study leaves no cell training."""
    from vqadapt.lifeline import PARENT_ENV

    reserve_cell(job.cell)
    job.config.train.resume = job.resume
    job.config.save(job.cell / "cell.yaml")
    command = [
        sys.executable,
        "-m",
        "vqadapt.ablation.cell",
        "--config",
        str(job.cell / "cell.yaml"),
        *(["--probe_only"] if job.probe_only else []),
    ]
    log_file = open(job.cell / "train.log", "a", encoding="utf-8")  # noqa: SIM115 (closed in _finish)
    process = subprocess.Popen(
        command,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **environment, PARENT_ENV: str(os.getpid())},
    )
    return _Running(job, process, log_file, time.perf_counter())


def _reap(running: _Running) -> bool:
    """Whether the cell's process has exited; on POSIX its own peak resident memory and CPU
    time are read as it is reaped (``wait4``: this child only, not the other running cells)."""
    wait4 = getattr(os, "wait4", None)
    if wait4 is None:  # Windows: no per-child resource usage
        return running.process.poll() is not None
    if running.process.returncode is not None:
        return True
    try:
        pid, status, usage = wait4(running.process.pid, os.WNOHANG)
    except ChildProcessError:
        return running.process.poll() is not None
    if pid == 0:
        return False
    running.process.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    running.peak_rss_mb = usage.ru_maxrss / scale
    running.cpu_seconds = usage.ru_utime + usage.ru_stime
    return True


def _finish(running: _Running, log) -> str:
    """A cell's final status, once its process has exited; a crash is recorded as failed."""
    from vqadapt.errors import VQABusyError

    running.log_file.close()
    cell, code = running.job.cell, running.process.returncode
    status = read_status(cell)
    if code == VQABusyError.exit_code:  # another process trains this cell: not ours to mark
        log(f"{running.job.name}: in use by another process, left alone")
        return status or "running"
    seconds = time.perf_counter() - running.started
    if running.peak_rss_mb is not None:
        # Resumed cells keep the largest peak and add up their processes' times.
        previous = {}
        if (cell / RESOURCES_FILE).is_file():
            previous = json.loads((cell / RESOURCES_FILE).read_text(encoding="utf-8"))
        atomic_write_json(
            cell / RESOURCES_FILE,
            {
                "peak_rss_mb": round(max(running.peak_rss_mb, previous.get("peak_rss_mb", 0)), 1),
                "process_seconds": round(seconds + previous.get("process_seconds", 0), 1),
                "cpu_seconds": round(
                    (running.cpu_seconds or 0) + previous.get("cpu_seconds", 0), 1
                ),
                "threads": os.environ.get("OMP_NUM_THREADS") or running.job.threads,
            },
        )
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
    log(f"{running.job.name}: {status} in {seconds:.0f} s")
    return status


def run_cells(queue: list[Job], jobs: int, log, poll_seconds: float = 0.1) -> dict[str, str]:
    """Train the cells, ``jobs`` at a time, each in its own process; returns their statuses.

    One job trains them in the preset's order. Several start the longest first
    (``expected_cost``), so that no long cell starts last and runs alone. Each job keeps its
    GPU and CPU share (``job_environments``). If the study is interrupted, the running cells
    are stopped and keep their checkpoints and "running" status: the next run resumes them.
    """
    if jobs < 1:
        raise VQAConfigError(f"--jobs must be >= 1, got {jobs}")
    pending = list(queue) if jobs == 1 else sorted(queue, key=lambda j: -expected_cost(j.config))
    environments = job_environments(jobs)
    free_slots, running, statuses = list(range(jobs)), {}, {}
    try:
        while pending or running:
            while pending and free_slots:
                slot, job = free_slots.pop(0), pending.pop(0)
                where = ", ".join(f"{k}={v}" for k, v in environments[slot].items())
                job.threads = environments[slot].get("OMP_NUM_THREADS")
                log(
                    f"{job.name}: {'resuming' if job.resume else 'training'} ({job.description})"
                    + (f" [job {slot + 1}: {where}]" if where else "")
                )
                running[slot] = _start(job, environments[slot])
            time.sleep(poll_seconds)
            for slot in [s for s, r in running.items() if _reap(r)]:
                done = running.pop(slot)
                statuses[done.job.name] = _finish(done, log)
                free_slots.append(slot)
    finally:
        for left in running.values():  # interrupted: stop them, never mark them failed
            left.process.kill()
            left.process.wait()
            left.log_file.close()
    return statuses


def run_study(args) -> Path:
    """``vqadapt ablate``: run every missing cell, then write the report."""
    log = print
    preset = load_preset("quick" if args.quick else args.preset)
    out = Path(args.out or f"runs/ablation-{preset.name}")
    seeds = list(range(args.seeds if args.seeds is not None else preset.seeds))
    extra = _parse_sets(args.set)
    if args.jobs < 1:
        raise VQAConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if getattr(args, "train_fractions", None):
        preset.train_fractions = check_fractions(args.train_fractions, "--train_fractions")
    if getattr(args, "fraction_budget", None):
        preset.fraction_budget = check_budget(args.fraction_budget, "--fraction_budget")
    out.mkdir(parents=True, exist_ok=True)
    from vqadapt.folders import FolderLock

    with FolderLock(out, "study"):  # one runner per study; released when it ends or dies
        return _run_locked_study(args, preset, out, seeds, extra, log)


def _run_locked_study(args, preset: Preset, out: Path, seeds, extra, log) -> Path:
    study = {
        "preset": preset.name,
        "description": preset.description,
        "seeds": seeds,
        "train_fractions": preset.train_fractions,
        "fraction_budget": preset.fraction_budget,
        "experiments": [
            {"name": e.name, "description": e.description, "overrides": e.overrides}
            for e in preset.experiments
        ],
        "base": {**preset.defaults, **preset.base, **extra},
        "synthetic": extra.get("train_file", preset.base.get("train_file")) is None,
        "samples": SAMPLES,
        "notes": "",
    }
    previous = out / "study.json"
    if previous.is_file():
        try:
            old = json.loads(previous.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, UnicodeDecodeError, ValueError):
            raise VQAConfigError(
                f"{previous} is damaged: restore it, or use another --out (nothing was changed)"
            ) from None
        if old.get("experiments") != study["experiments"] or old.get("base") != study["base"]:
            raise VQAConfigError(
                f"{out} holds a study with other settings: use another --out (nothing was overwritten)"
            )
        base = study["base"]
        sampled = base.get("max_train_samples") or base.get("max_eval_samples")
        if old.get("samples") != SAMPLES and (sampled or preset.train_fractions != [1.0]):
            raise VQAConfigError(
                f"{out} holds a study whose cells took the first questions (max_train_samples, "
                "max_eval_samples, train_fractions), made before they drew random samples per "
                "seed: use another --out (nothing was overwritten)"
            )
        fractions = set(old.get("train_fractions", [1.0])) | set(preset.train_fractions)
        if len(fractions) > 1 and old.get("fraction_budget", "epochs") != preset.fraction_budget:
            raise VQAConfigError(
                f"{out} holds a study whose smaller training fractions train at equal "
                f"{old.get('fraction_budget', 'epochs')}: use another --out (nothing was "
                "overwritten)"
            )
        study["seeds"] = sorted(set(old.get("seeds", [])) | set(seeds))
        if max(fractions) != max(preset.train_fractions):
            raise VQAConfigError(
                f"{out} holds a study whose largest training fraction is "
                f"{max(old.get('train_fractions', [1.0])):g}: use another --out"
            )
        study["train_fractions"] = sorted(fractions)
    atomic_write_json(previous, study)
    started = time.perf_counter()
    if not args.report_only:
        prepare_embedded(preset, extra, log)
        weights = ensure_answer_weights(preset, out, extra, log)
        if weights is not None:
            extra = {**extra, "answer_weights": str(weights)}
        fraction_cells = fraction_settings(preset, extra, log)
        main_fraction = max(preset.train_fractions)
        queue = []
        for fraction in sorted(preset.train_fractions, reverse=True):
            for experiment in preset.experiments:
                for seed in seeds:
                    cell = cell_dir(out, experiment.name, seed, fraction, main_fraction)
                    name = f"{experiment.name} seed {seed}"
                    if fraction != main_fraction:
                        name += f" ({fraction:g} of the training questions)"
                    holder = lock_holder(cell)
                    if holder is not None:  # a cell of a killed runner that did not die with it
                        log(
                            f"{name}: still running in another process ({holder}), not started again"
                        )
                        continue
                    status = read_status(cell)
                    if status == "success" and _probe_missing(cell):
                        log(f"{name}: trained before; scoring its questions (interrupted)")
                        config = cell_config(
                            preset, experiment, seed, cell, extra, fraction_cells[fraction]
                        )
                        job = Job(name, experiment.description, cell, config, True, probe_only=True)
                        queue.append(job)
                        continue
                    if status == "success":
                        log(f"{name}: done before, skipped")
                        continue
                    if status == "failed" and not args.retry_failed:
                        log(f"{name}: failed before, skipped (--retry_failed reruns it)")
                        continue
                    config = cell_config(
                        preset, experiment, seed, cell, extra, fraction_cells[fraction]
                    )
                    if status == "failed":
                        config.train.overwrite = True
                    resume = (cell / "config.yaml").is_file() and status != "failed"
                    queue.append(Job(name, experiment.description, cell, config, resume))
        run_cells(queue, args.jobs, log)
    from vqadapt.ablation.report import write_report

    paths = write_report(out)
    atomic_write_text(out / "wall_time.txt", f"{time.perf_counter() - started:.1f}\n")
    log(f"report: {paths['report.md']} (and report.html, results.csv, plots/)")
    return out

"""Read a study directory into typed results and reduce it to tables.

A study is ``STUDY/study.json`` plus one run directory ("cell") per experiment and seed,
``STUDY/<experiment>/seed<k>/``, written by the runner. Only cells with status
``success`` and a readable ``summary.json`` enter the statistics; every other cell is
listed in ``Study.failed_cells`` with the reason.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from vqadapt.ablation import stats
from vqadapt.ablation.probe import LOSSES_FILE
from vqadapt.errors import VQADataError


def _to_float(value: Any) -> float:
    """``float(value)``, or NaN for a missing or non-numeric value (``null`` in JSON)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class RunResult:
    """One cell: one experiment trained with one seed."""

    seed: int
    status: str
    """``success``, ``failed``, ``running`` or ``missing`` (no cell directory)."""
    metrics: list[dict] = field(default_factory=list)
    """One dict per epoch, from ``metrics.jsonl``."""
    summary: dict | None = None
    predictions: list[dict] = field(default_factory=list)
    """One dict per test question, from ``predictions_test.jsonl`` (may be empty)."""
    error: str | None = None
    """Why the cell failed or was set aside; ``None`` for a usable cell."""
    resources: dict | None = None
    """``resources.json``: the cell process's peak resident memory and times (the runner)."""
    question_losses: dict | None = None
    """``question_losses.json``: per-question losses of the final model (``probe``)."""

    @property
    def ok(self) -> bool:
        """Whether this cell enters the statistics."""
        return self.status == "success" and self.summary is not None and self.error is None

    def curve(self, key: str) -> list[float]:
        """Per-epoch values of ``key`` (NaN where an epoch lacks it)."""
        return [_to_float(row.get(key)) for row in self.metrics]

    def step_losses(self) -> list[list[float]] | None:
        """Each epoch's step losses in order (``metrics.jsonl``; NaN for a skipped step);
        None when the run did not record them (runs of vqadapt before they were kept)."""
        epochs = [row.get("step_losses") for row in self.metrics]
        if not epochs or not all(isinstance(epoch, list) for epoch in epochs):
            return None
        return [[_to_float(value) for value in epoch] for epoch in epochs]

    def test_metric(self, key: str) -> float:
        """``summary.test[key]`` (``em``, ``f1``, ...) or NaN."""
        test = (self.summary or {}).get("test") or {}
        return _to_float(test.get(key))

    def train_questions(self) -> int | None:
        """How many training questions the cell trained on."""
        value = ((self.summary or {}).get("data") or {}).get("train")
        return int(value) if isinstance(value, int | float) else None

    def train_seconds(self) -> float:
        """Seconds of the epochs (training and the per-epoch validation), from metrics.jsonl."""
        seconds = [_to_float(row.get("seconds")) for row in self.metrics]
        return float(sum(seconds)) if seconds and all(map(math.isfinite, seconds)) else math.nan

    def subset_scores(self, subsets: dict[str, str], subset: str | None, key: str = "em"):
        """``{question id: score}`` of the test questions in ``subset`` (all when None)."""
        out = {}
        for p in self.predictions:
            qid = str(p.get("id"))
            if subset is None or subsets.get(qid) == subset:
                value = _to_float(p.get(key))
                if math.isfinite(value):
                    out[qid] = value
        return out


@dataclass
class ExperimentResult:
    """All seeds of one experiment."""

    name: str
    description: str = ""
    overrides: dict = field(default_factory=dict)
    runs: list[RunResult] = field(default_factory=list)
    """The runs of the main (largest) training fraction, one per seed."""
    fraction_runs: dict[float, list[RunResult]] = field(default_factory=dict)
    """Every training fraction's runs (the main one included), for data efficiency."""

    @property
    def ok_runs(self) -> list[RunResult]:
        """The runs that enter the statistics."""
        return [run for run in self.runs if run.ok]

    def run(self, seed: int) -> RunResult | None:
        """The usable run for ``seed``, if any."""
        return next((run for run in self.ok_runs if run.seed == seed), None)


@dataclass
class FailedCell:
    """A cell left out of the statistics."""

    experiment: str
    seed: int
    status: str
    reason: str
    fraction: float = 1.0


@dataclass
class Study:
    """A whole ablation study as read from disk."""

    preset: str
    seeds: list[int]
    experiments: list[ExperimentResult]
    synthetic: bool = False
    notes: str = ""
    failed_cells: list[FailedCell] = field(default_factory=list)
    path: Path | None = None
    train_fractions: list[float] = field(default_factory=lambda: [1.0])
    subsets: dict[str, str] = field(default_factory=dict)
    """Test question id -> control subset (``subsets.csv`` beside a synthetic test set)."""
    fraction_budget: str = "epochs"
    """How the smaller training fractions trained: the same ``epochs`` as the largest, or
    about the same ``steps`` (``study.json``)."""

    def experiment(self, name: str) -> ExperimentResult | None:
        """The experiment called ``name``, if it is part of the study."""
        return next((exp for exp in self.experiments if exp.name == name), None)

    def at_fraction(self, fraction: float) -> Study:
        """The study seen at training fraction ``fraction``: its runs there become every
        experiment's ``runs`` (a claim tested on a smaller training set)."""
        experiments = [
            replace(experiment, runs=experiment.fraction_runs.get(fraction, []))
            for experiment in self.experiments
        ]
        return replace(self, experiments=experiments)


# ---------------------------------------------------------------- loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise VQADataError(f"malformed JSON: {err.msg} (line {err.lineno})", file=path) from err


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise VQADataError(f"malformed JSON: {err.msg}", file=path, row=number) from err
        if not isinstance(row, dict):
            raise VQADataError("expected a JSON object", file=path, row=number)
        rows.append(row)
    return rows


def load_run(cell_dir: Path, seed: int) -> RunResult:
    """Read one cell; problems make it a failed run with the reason, never an exception."""
    if not cell_dir.is_dir():
        return RunResult(seed=seed, status="missing", error="no run directory")
    status_path = cell_dir / "status.json"
    if not status_path.exists():
        return RunResult(seed=seed, status="missing", error="no status.json")
    try:
        status = _read_json(status_path)
        state = str(status.get("status", "failed"))
        if state != "success":
            reason = status.get("error") or ("still running" if state == "running" else state)
            return RunResult(seed=seed, status=state, error=str(reason))
        summary_path = cell_dir / "summary.json"
        if not summary_path.exists():
            return RunResult(seed=seed, status="failed", error="success but no summary.json")
        summary = _read_json(summary_path)
        if not isinstance(summary, dict):
            raise VQADataError("expected a JSON object", file=summary_path)
        metrics_path = cell_dir / "metrics.jsonl"
        metrics = _read_jsonl(metrics_path) if metrics_path.exists() else []
        predictions_path = cell_dir / "predictions_test.jsonl"
        predictions = _read_jsonl(predictions_path) if predictions_path.exists() else []
        extras = {}
        for key, name in (("resources", "resources.json"), ("question_losses", LOSSES_FILE)):
            if (cell_dir / name).is_file():
                extras[key] = _read_json(cell_dir / name)
    except (VQADataError, OSError, AttributeError) as err:
        return RunResult(seed=seed, status="failed", error=str(err))
    return RunResult(seed, "success", metrics, summary, predictions, **extras)


def _cell_dir(study_dir: Path, name: str, seed: int, fraction: float, main: float) -> Path:
    if fraction == main:
        return study_dir / name / f"seed{seed}"
    return study_dir / name / f"train{fraction:g}" / f"seed{seed}"


def _load_subsets(experiments: list[ExperimentResult]) -> dict[str, str]:
    """The control subset of each test question the cells were scored on (``max_eval_samples``
    may keep only the first ones), from ``subsets.csv`` beside the test file the cells read
    (synthetic sets write it); empty when there is none."""
    from vqadapt.data.synth import read_subsets

    for experiment in experiments:
        for run in experiment.ok_runs:
            test = (((run.summary or {}).get("data") or {}).get("sources") or {}).get("test")
            path = Path(test).parent / "subsets.csv" if test else None
            if path is not None and path.is_file():
                rows = read_subsets(path).get("test", {})
                scored = {str(p.get("id")) for p in run.predictions}
                return {qid: row["subset"] for qid, row in rows.items() if qid in scored}
    return {}


def load_study(study_dir: str | Path) -> Study:
    """Read ``study.json`` and every cell it names (experiments x seeds)."""
    study_dir = Path(study_dir)
    manifest_path = study_dir / "study.json"
    if not manifest_path.exists():
        raise VQADataError("no study.json: not a study directory", file=manifest_path)
    manifest = _read_json(manifest_path)
    seeds = [int(seed) for seed in manifest.get("seeds", [0])]
    fractions = sorted(float(f) for f in manifest.get("train_fractions", [1.0]))
    main = fractions[-1]
    experiments, failed = [], []
    for number, spec in enumerate(manifest.get("experiments", []), start=1):
        spec = {"name": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or "name" not in spec:
            raise VQADataError(f"experiment {number} has no name", file=manifest_path)
        experiment = ExperimentResult(
            name=spec["name"],
            description=spec.get("description", ""),
            overrides=spec.get("overrides") or {},
        )
        for fraction in fractions:
            runs = []
            for seed in seeds:
                run = load_run(_cell_dir(study_dir, experiment.name, seed, fraction, main), seed)
                runs.append(run)
                if not run.ok:
                    reason = run.error or ""
                    failed.append(FailedCell(experiment.name, seed, run.status, reason, fraction))
            experiment.fraction_runs[fraction] = runs
        experiment.runs = experiment.fraction_runs[main]
        experiments.append(experiment)
    return Study(
        preset=str(manifest.get("preset", "unknown")),
        seeds=seeds,
        experiments=experiments,
        synthetic=bool(manifest.get("synthetic", False)),
        notes=str(manifest.get("notes", "")),
        failed_cells=failed,
        path=study_dir,
        train_fractions=fractions,
        subsets=_load_subsets(experiments),
        fraction_budget=str(manifest.get("fraction_budget", "epochs")),
    )


# ---------------------------------------------------------------- per-run numbers


def run_stats(run: RunResult, patience: int = 2) -> dict:
    """The per-run numbers the tables are built from (NaN or ``None`` where unknown)."""
    summary = run.summary or {}
    train, val = run.curve("train_loss"), run.curve("val_loss")
    have_curves = bool(val) and all(math.isfinite(v) for v in val + train)
    grad_mean = [
        math.sqrt(sum(_to_float(v) ** 2 for v in (row.get("grad_norm") or {}).values()))
        for row in run.metrics
    ]
    grad_max = run.curve("grad_norm_max")
    loss_std = run.curve("train_loss_std")
    stable = {"loss_std": math.nan, "grad_spike": math.nan}
    if run.metrics and all(math.isfinite(v) for v in loss_std + grad_max):
        stable = stats.stability(loss_std, grad_max, grad_mean)
    epochs = len(run.metrics) or summary.get("epochs_run")
    selected = summary.get("best_epoch")  # by the run's early-stopping metric
    resources = run.resources or {}
    return {
        "best_val_loss": min(val) if have_curves else _to_float(summary.get("best_val_loss")),
        "best_epoch": stats.convergence_epoch(val) if have_curves else selected,
        "selected_epoch": selected,
        "undertrained": bool(selected and epochs and selected == epochs),
        "onset": stats.overfitting_onset(train, val, patience) if have_curves else None,
        "epochs": epochs,
        "gap": val[-1] - train[-1] if have_curves else math.nan,
        "question_gap": question_gap(run),
        "em": run.test_metric("em"),
        "f1": run.test_metric("f1"),
        "wall_time_s": _to_float(summary.get("wall_time_s")),
        "train_seconds": run.train_seconds(),
        "peak_rss_mb": _to_float(resources.get("peak_rss_mb")),
        **stable,
    }


def question_gap(run: RunResult) -> float:
    """Generalisation gap of the final model: mean held-out minus mean training loss per
    question (``question_losses.json``), NaN without it."""
    losses = run.question_losses or {}
    held, train = (
        list((losses.get("test") or {}).values()),
        list((losses.get("train") or {}).values()),
    )
    if not held or not train:
        return math.nan
    return float(np.mean(held) - np.mean(train))


def _params(experiment: ExperimentResult) -> dict:
    runs = experiment.ok_runs
    return ((runs[0].summary or {}).get("params") or {}) if runs else {}


def _question_correctness(run: RunResult, key: str = "em") -> list[float]:
    values = [_to_float(p.get(key)) for p in run.predictions]
    return [v for v in values if math.isfinite(v)]


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def _summarise_metric(experiment: ExperimentResult, key: str) -> dict:
    """Mean, std and CI of a test metric; the CI is over seeds, or over questions for one."""
    runs = experiment.ok_runs
    combined = stats.combine_seeds([run.test_metric(key) for run in runs])
    combined["ci_over"] = "seeds" if combined["n"] > 1 else ""
    if combined["n"] == 1:
        per_question = _question_correctness(runs[0], key)
        combined["ci"] = (math.nan, math.nan)  # one number has no spread to bootstrap
        if per_question:
            combined["ci"] = stats.bootstrap_ci(per_question)
            combined["ci_over"] = "questions"
    return combined


def results_table(study: Study) -> list[dict]:
    """One row per experiment: parameters, losses, test EM/F1 with CIs, curve statistics.

    Test-metric CIs are 95% percentile bootstrap intervals of the mean over seeds when two
    or more seeds succeeded (``ci_over = "seeds"``), and over the test questions of the one
    run otherwise (``ci_over = "questions"``).
    """
    rows = []
    for experiment in study.experiments:
        per_run = [run_stats(run) for run in experiment.ok_runs]
        params = _params(experiment)
        trainable, total = params.get("trainable"), params.get("total")
        em, f1 = _summarise_metric(experiment, "em"), _summarise_metric(experiment, "f1")
        val_loss = stats.combine_seeds([r["best_val_loss"] for r in per_run])
        onsets = [r["onset"] for r in per_run if r["onset"] is not None]
        rows.append(
            {
                "experiment": experiment.name,
                "description": experiment.description,
                "n_seeds_ok": len(per_run),
                "n_seeds": len(experiment.runs),
                "trainable_params": trainable,
                "total_params": total,
                "trainable_pct": 100 * trainable / total if trainable and total else math.nan,
                "coverage": params.get("coverage", ""),
                "layers_adapted": " ".join(
                    str(i) for i in params.get("text_encoder_layers_adapted", [])
                ),
                "best_val_loss_mean": val_loss["mean"],
                "best_val_loss_std": val_loss["std"],
                "test_em_mean": em["mean"],
                "test_em_std": em["std"],
                "test_em_ci_low": em["ci"][0],
                "test_em_ci_high": em["ci"][1],
                "test_f1_mean": f1["mean"],
                "test_f1_std": f1["std"],
                "test_f1_ci_low": f1["ci"][0],
                "test_f1_ci_high": f1["ci"][1],
                "ci_over": em["ci_over"],
                "best_epoch_mean": _nanmean([r["best_epoch"] for r in per_run]),
                "overfit_onset_mean": _nanmean(onsets),
                "overfit_seeds": len(onsets),
                "loss_std": _nanmean([r["loss_std"] for r in per_run]),
                "grad_spike": _nanmean([r["grad_spike"] for r in per_run]),
                "wall_time_s_mean": _nanmean([r["wall_time_s"] for r in per_run]),
                "epochs_run_mean": _nanmean([r["epochs"] for r in per_run]),
                "undertrained_seeds": sum(r["undertrained"] for r in per_run),
                "generalisation_gap": _nanmean([r["question_gap"] for r in per_run]),
                "train_seconds_mean": _nanmean([r["train_seconds"] for r in per_run]),
                "peak_rss_mb_mean": _nanmean([r["peak_rss_mb"] for r in per_run]),
                "train_questions": next(
                    (q for q in (run.train_questions() for run in experiment.ok_runs) if q), None
                ),
            }
        )
    return rows


def efficiency_table(study: Study) -> list[dict]:
    """One row per experiment and training fraction: training questions, test EM (mean, std
    and CI over seeds, or over questions with one seed), train seconds, peak memory,
    trainable parameters and whether the best epoch was the last."""
    rows = []
    for experiment in study.experiments:
        params = _params(experiment)
        for fraction in study.train_fractions:
            runs = [run for run in experiment.fraction_runs.get(fraction, []) if run.ok]
            if not runs:
                continue
            per_run = [run_stats(run) for run in runs]
            em = stats.combine_seeds([r["em"] for r in per_run])
            if len(runs) == 1 and runs[0].predictions:
                em["ci"] = stats.bootstrap_ci(_question_correctness(runs[0]))
            rows.append(
                {
                    "experiment": experiment.name,
                    "fraction": fraction,
                    "train_questions": runs[0].train_questions(),
                    "seeds": len(runs),
                    "test_em_mean": em["mean"],
                    "test_em_std": em["std"],
                    "test_em_ci_low": em["ci"][0],
                    "test_em_ci_high": em["ci"][1],
                    "train_seconds_mean": _nanmean([r["train_seconds"] for r in per_run]),
                    "peak_rss_mb_mean": _nanmean([r["peak_rss_mb"] for r in per_run]),
                    "trainable_params": params.get("trainable"),
                    "undertrained_seeds": sum(r["undertrained"] for r in per_run),
                    "epochs_run_mean": _nanmean([r["epochs"] for r in per_run]),
                }
            )
    return rows


def subset_table(study: Study) -> list[dict]:
    """Test EM per control subset and experiment (main fraction): mean and std over seeds."""
    if not study.subsets:
        return []
    names = sorted(set(study.subsets.values()))
    rows = []
    for experiment in study.experiments:
        for subset in names:
            values = []
            for run in experiment.ok_runs:
                scores = run.subset_scores(study.subsets, subset)
                if scores:
                    values.append(float(np.mean(list(scores.values()))))
            combined = stats.combine_seeds(values)
            count = sum(1 for value in study.subsets.values() if value == subset)
            rows.append(
                {
                    "experiment": experiment.name,
                    "subset": subset,
                    "em_mean": combined["mean"],
                    "em_std": combined["std"],
                    "n": count,
                }
            )
    return rows


def per_type_table(study: Study) -> list[dict]:
    """Test EM per question type and experiment: mean and std over seeds."""
    rows = []
    for experiment in study.experiments:
        by_type: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for run in experiment.ok_runs:
            per_type = ((run.summary or {}).get("test") or {}).get("per_type") or {}
            for qtype, values in per_type.items():
                by_type.setdefault(qtype, []).append(_to_float(values.get("em")))
                count = _to_float(values.get("n"))
                counts[qtype] = int(count) if math.isfinite(count) else 0
        for qtype, values in sorted(by_type.items()):
            combined = stats.combine_seeds(values)
            rows.append(
                {
                    "experiment": experiment.name,
                    "type": qtype,
                    "em_mean": combined["mean"],
                    "em_std": combined["std"],
                    "n": counts[qtype],
                }
            )
    return rows


def layer_grad_profile(experiment: ExperimentResult) -> dict[int, float]:
    """Mean gradient norm per text-encoder layer (1-based), over epochs and seeds.

    Reads ``grad_norm_layers`` (``text_encoder.0`` .. ``text_encoder.11``, 0-based keys);
    a layer with nothing trainable reports 0.0 and stays 0.0 here.
    """
    values: dict[int, list[float]] = {}
    for run in experiment.ok_runs:
        for row in run.metrics:
            for name, norm in (row.get("grad_norm_layers") or {}).items():
                index = name.rsplit(".", 1)[-1]
                if index.isdigit():
                    values.setdefault(int(index) + 1, []).append(_to_float(norm))
    return {layer: _nanmean(norms) for layer, norms in sorted(values.items())}


def mean_curves(experiment: ExperimentResult, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Per-epoch mean and std over seeds of each metric in ``keys``.

    Returns ``{"epoch": ..., key: mean, f"{key}_std": std}``; an epoch only some seeds
    reached is averaged over those seeds.
    """
    runs = [run for run in experiment.ok_runs if run.metrics]
    epochs = max((len(run.metrics) for run in runs), default=0)
    curves: dict[str, np.ndarray] = {"epoch": np.arange(1, epochs + 1)}
    for key in keys:
        table = np.full((len(runs), epochs), np.nan)
        for i, run in enumerate(runs):
            values = run.curve(key)
            table[i, : len(values)] = values
        with np.errstate(all="ignore"):
            counts = np.sum(np.isfinite(table), axis=0)
            curves[key] = np.where(
                counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), np.nan
            )
            centred = np.where(np.isfinite(table), table - curves[key], 0.0)
            curves[f"{key}_std"] = np.sqrt(np.sum(centred**2, axis=0) / np.maximum(counts, 1))
    return curves


def write_results_csv(rows: list[dict], path: str | Path) -> Path:
    """Write ``rows`` as CSV atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in columns})
    return path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return value


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
        os.chmod(tmp_name, 0o644)  # mkstemp makes files private to the owner
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise

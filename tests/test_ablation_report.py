"""The ablation report end to end on a fake study directory (see ``fake_study.py``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fake_study import DEFAULT_EXPERIMENTS, build_fake_study
from vqadapt.ablation.hypotheses import check_claims, load_hypotheses
from vqadapt.ablation.report import write_report
from vqadapt.ablation.results import (
    layer_grad_profile,
    load_study,
    paired_comparison,
    results_table,
    significance,
)
from vqadapt.errors import VQADataError
from vqadapt.experiments import hypotheses_file

HYPOTHESES = hypotheses_file()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def report(study_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(study_dir, tmp_path_factory.mktemp("report"), HYPOTHESES)


def _verdicts(markdown: str) -> dict[str, str]:
    """Claim text -> verdict, from the claims table of report.md."""
    verdicts = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith(("supported", "not supported", "inconcl")):
            verdicts[cells[0]] = cells[1]
    return verdicts


def test_report_writes_every_file(report: dict[str, Path]) -> None:
    expected = {
        "report.md",
        "report.html",
        "results.csv",
        "significance.csv",
        "plots/learning_curves.png",
        "plots/em_vs_params.png",
        "plots/gradient_flow.png",
        "plots/per_type_em.png",
    }
    assert set(report) == expected
    for path in report.values():
        assert path.stat().st_size > 0
        assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"
    assert report["plots/gradient_flow.png"].read_bytes().startswith(b"\x89PNG")


def test_markdown_sections_and_tables(report: dict[str, Path]) -> None:
    markdown = report["report.md"].read_text(encoding="utf-8")
    for heading in (
        "## Failed cells",
        "## Results",
        "## Parameters and coverage",
        "## Significance",
        "## Hypothesis check",
        "## Plots",
        "## Method notes",
    ):
        assert heading in markdown
    assert "absolute numbers from a synthetic set are not ViVQA numbers" in markdown
    for spec in DEFAULT_EXPERIMENTS:
        assert f"| {spec.name} |" in markdown
    assert "| baseline | 1 | failed | CUDA out of memory |" in markdown
    assert "| unfreeze3 | 39M | 9.81% | layers 10-12 only (25% of encoder) | 10 11 12 |" in markdown
    assert "| baseline | 1/2 |" in markdown  # the failed seed is not counted
    assert "](plots/gradient_flow.png)" in markdown


def test_hypothesis_verdicts_follow_the_fake_data(report: dict[str, Path]) -> None:
    verdicts = _verdicts(report["report.md"].read_text(encoding="utf-8"))
    assert verdicts == {
        "LoRA r=16 beats unfreezing the last 3 text-encoder layers": "supported",
        "LoRA r=32 overfits relative to r=16": "supported",
        "Vision + text LoRA is the best configuration": "not supported",
        "LoRA delays overfitting compared with unfreezing 3 layers": "supported",
        "LoRA trains more stably than unfreezing 3 layers": "supported",
    }


def test_html_is_self_contained(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 4
    assert "<table>" in page and "CUDA out of memory" in page
    assert 'src="plots/' not in page


def test_results_csv_columns(report: dict[str, Path]) -> None:
    with report["results.csv"].open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["experiment"] for row in rows] == [spec.name for spec in DEFAULT_EXPERIMENTS]
    for column in (
        "trainable_params",
        "trainable_pct",
        "coverage",
        "best_val_loss_mean",
        "best_val_loss_std",
        "test_em_mean",
        "test_em_std",
        "test_em_ci_low",
        "test_em_ci_high",
        "test_f1_mean",
        "best_epoch_mean",
        "overfit_onset_mean",
        "loss_std",
        "grad_spike",
        "wall_time_s_mean",
        "n_seeds_ok",
    ):
        assert column in rows[0]
    by_name = {row["experiment"]: row for row in rows}
    assert by_name["baseline"]["n_seeds_ok"] == "1"
    assert by_name["baseline"]["ci_over"] == "questions"
    assert by_name["unfreeze3"]["ci_over"] == "seeds"
    assert float(by_name["lora_r16"]["test_em_mean"]) > float(by_name["unfreeze3"]["test_em_mean"])


def test_table_numbers_match_the_cells(study_dir: Path) -> None:
    study = load_study(study_dir)
    rows = {row["experiment"]: row for row in results_table(study)}
    summaries = [
        json.loads((study_dir / "lora_r16" / f"seed{s}" / "summary.json").read_text())
        for s in (0, 1)
    ]
    ems = [summary["test"]["em"] for summary in summaries]
    assert rows["lora_r16"]["test_em_mean"] == pytest.approx(sum(ems) / 2)
    assert rows["unfreeze3"]["overfit_onset_mean"] == 2
    assert rows["unfreeze3"]["best_epoch_mean"] == 2
    assert rows["lora_r16"]["overfit_seeds"] == 0
    assert rows["unfreeze3"]["loss_std"] > rows["lora_r16"]["loss_std"]


def test_gradient_profile_shows_frozen_layers(study_dir: Path) -> None:
    study = load_study(study_dir)
    unfreeze = layer_grad_profile(study.experiment("unfreeze3"))
    assert list(unfreeze) == list(range(1, 13))
    assert all(unfreeze[layer] == 0.0 for layer in range(1, 10))
    assert all(unfreeze[layer] > 0 for layer in (10, 11, 12))
    assert all(norm > 0 for norm in layer_grad_profile(study.experiment("lora_r16")).values())


def test_significance_pairs_only_seeds_both_ran(study_dir: Path) -> None:
    study = load_study(study_dir)
    rows = significance(study)
    against_baseline = next(
        r for r in rows if (r["experiment"], r["reference"]) == ("lora_r16", "baseline")
    )
    assert against_baseline["seeds"] == [0] and against_baseline["n_questions"] == 40
    against_unfreeze = paired_comparison(study, "lora_r16", "unfreeze3")
    assert against_unfreeze["seeds"] == [0, 1] and against_unfreeze["n_questions"] == 80
    assert against_unfreeze["p_bootstrap"] < 0.01 and against_unfreeze["p_mcnemar"] < 0.01


def test_claims_on_missing_experiments_are_not_run(tmp_path: Path) -> None:
    subset = [spec for spec in DEFAULT_EXPERIMENTS if spec.name in ("baseline", "unfreeze3")]
    study = load_study(build_fake_study(tmp_path, experiments=subset, seeds=(0,), failed=()))
    claims = check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    assert {claim["verdict"] for claim in claims} == {"inconclusive (not run)"}
    assert "not run: lora_r16" in claims[0]["evidence"]


def test_single_seed_curve_claims_are_inconclusive(tmp_path: Path) -> None:
    study = load_study(build_fake_study(tmp_path, seeds=(0,), failed=()))
    claims = {
        c["id"]: c for c in check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    }
    assert claims["r32_overfits_vs_r16"]["verdict"] == "inconclusive"
    assert "one seed" in claims["r32_overfits_vs_r16"]["evidence"]
    assert claims["lora16_beats_unfreeze3"]["verdict"] == "supported"  # 40 questions suffice


def test_malformed_cell_counts_as_failed(tmp_path: Path) -> None:
    study_dir = build_fake_study(tmp_path / "study", failed=())
    (study_dir / "lora_r8" / "seed0" / "summary.json").write_text("{not json", encoding="utf-8")
    (study_dir / "lora_r32" / "seed1" / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    study = load_study(study_dir)
    failed = {(cell.experiment, cell.seed): cell.reason for cell in study.failed_cells}
    assert set(failed) == {("lora_r8", 0), ("lora_r32", 1)}
    assert "malformed JSON" in failed["lora_r8", 0] and "summary.json" in failed["lora_r8", 0]
    assert "row 2" in failed["lora_r32", 1]
    paths = write_report(study_dir, tmp_path / "out", HYPOTHESES)
    assert "| lora_r8 | 0 | failed | " in paths["report.md"].read_text(encoding="utf-8")


def test_running_and_missing_cells_are_listed(tmp_path: Path) -> None:
    study_dir = build_fake_study(tmp_path, failed=())
    status = study_dir / "unfreeze3" / "seed1" / "status.json"
    status.write_text(json.dumps({"status": "running", "error": None, "started": "x"}))
    for path in sorted((study_dir / "lora_r8" / "seed0").iterdir()):
        path.unlink()
    (study_dir / "lora_r8" / "seed0").rmdir()
    study = load_study(study_dir)
    failed = {(cell.experiment, cell.seed): cell for cell in study.failed_cells}
    assert failed["unfreeze3", 1].status == "running"
    assert failed["lora_r8", 0].status == "missing"


def test_missing_study_json_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VQADataError, match=r"study\.json"):
        load_study(tmp_path)

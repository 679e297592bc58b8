"""The ablation report end to end on a fake study directory (see ``fake_study.py``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fake_study import DEFAULT_EXPERIMENTS, build_fake_study
from vqadapt.ablation.comparisons import gap_comparison, paired_comparison, significance
from vqadapt.ablation.hypotheses import check_claims, check_controls, load_hypotheses
from vqadapt.ablation.report import write_report
from vqadapt.ablation.results import efficiency_table, layer_grad_profile, load_study, results_table
from vqadapt.errors import VQADataError
from vqadapt.experiments import hypotheses_file

HYPOTHESES = hypotheses_file()


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_study(tmp_path_factory.mktemp("study"))


@pytest.fixture(scope="module")
def report(study_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_report(study_dir, tmp_path_factory.mktemp("report"), HYPOTHESES)


def _verdicts(markdown: str) -> dict[str, tuple[str, str, str]]:
    """Claim text -> (verdict, over questions, over seeds), from report.md's claims table."""
    verdicts = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith(("supported", "not supported", "inconcl")):
            verdicts[cells[0]] = (cells[1], cells[2], cells[3])
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
        "plots/cost.png",
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
        "## Positive controls",
        "## Power of this study",
        "## Cost",
        "## Plots",
        "## Method notes",
    ):
        assert heading in markdown
    # the report ends with its recommendation
    assert markdown.rindex("\n## ") == markdown.index("\n## Recommendation")
    assert "absolute numbers from a synthetic set are not ViVQA numbers" in markdown
    for spec in DEFAULT_EXPERIMENTS:
        assert f"| {spec.name} |" in markdown
    assert "| baseline | 1 | 1 | failed | CUDA out of memory |" in markdown
    assert "| unfreeze3 | 39M | 9.81% | layers 10-12 only (25% of encoder) | 10 11 12 |" in markdown
    assert "| baseline | 1/2 |" in markdown  # the failed seed is not counted
    assert "](plots/gradient_flow.png)" in markdown


def test_hypothesis_verdicts_follow_the_fake_data(report: dict[str, Path]) -> None:
    verdicts = _verdicts(report["report.md"].read_text(encoding="utf-8"))
    assert verdicts == {
        "LoRA r=16 beats unfreezing the last 3 text-encoder layers": (
            "supported",
            "supported",
            "supported",
        ),
        "LoRA r=32 overfits relative to r=16": ("supported", "supported", "supported"),
        "Vision + text LoRA is the best configuration": (
            "not supported",
            "not supported",
            "not supported",
        ),
        "LoRA delays overfitting compared with unfreezing 3 layers": (
            "supported",
            "supported",
            "supported",
        ),
        "LoRA trains more stably than unfreezing 3 layers": (
            "supported",
            "no per-question or per-step measure",
            "supported",
        ),
    }


def test_html_is_self_contained(report: dict[str, Path]) -> None:
    page = report["report.html"].read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 5
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
        "train_seconds_mean",
        "peak_rss_mb_mean",
        "undertrained_seeds",
        "generalisation_gap",
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
    assert against_unfreeze["p_bootstrap"] < 0.01
    assert against_baseline["p_mcnemar"] < 0.01  # one seed: McNemar's pairs are independent


def test_claims_on_missing_experiments_are_not_run(tmp_path: Path) -> None:
    subset = [spec for spec in DEFAULT_EXPERIMENTS if spec.name in ("baseline", "unfreeze3")]
    study = load_study(build_fake_study(tmp_path, experiments=subset, seeds=(0,), failed=()))
    claims = check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    assert {claim["verdict"] for claim in claims} == {"inconclusive (not run)"}
    assert "not run: lora_r16" in claims[0]["evidence"]


def test_one_seed_decides_over_questions_but_not_over_seeds(tmp_path: Path) -> None:
    study = load_study(build_fake_study(tmp_path, seeds=(0,), failed=()))
    claims = {
        c["id"]: c for c in check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    }
    # the generalisation gap is compared question by question: one seed suffices
    assert claims["r32_overfits_vs_r16"]["verdict_questions"] == "supported"
    assert claims["r32_overfits_vs_r16"]["verdict_seeds"] == "inconclusive"
    assert "one seed" in claims["r32_overfits_vs_r16"]["evidence"]
    assert claims["lora16_beats_unfreeze3"]["verdict"] == "supported"  # 40 questions suffice
    # stability has no per-question measure: one seed decides nothing
    assert claims["lora_more_stable"]["verdict"] == "inconclusive"
    assert claims["lora_more_stable"]["verdict_questions"] is None
    assert "needs at least 2" in claims["lora_more_stable"]["evidence"]
    assert claims["lora_more_stable"]["open_because"].startswith(
        "seeds: with no step losses to compare"
    )
    assert claims["lora16_beats_unfreeze3"]["open_because"] is None  # decisive: nothing open


def test_report_says_why_a_claim_stays_open(tmp_path: Path) -> None:
    """Where no cell overfits, the overfitting claims are open for that reason, not for power."""
    from dataclasses import replace

    calm = [replace(spec, overfit_from=None, gap=0.3) for spec in DEFAULT_EXPERIMENTS]
    study_dir = build_fake_study(tmp_path / "study", experiments=calm, failed=())
    study = load_study(study_dir)
    claims = {
        c["id"]: c for c in check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    }
    for claim_id, names in [
        ("r32_overfits_vs_r16", "lora_r32 or lora_r16"),
        ("lora_delays_overfitting", "lora_r8 or lora_r16 or lora_r32 or unfreeze3"),
    ]:
        assert claims[claim_id]["verdict"] == "inconclusive"
        assert claims[claim_id]["open_because"].startswith(
            f"cells that overfit: no run of {names} does"
        )
    # the same claims in the default fake study, whose cells overfit: open only for power
    overfitting = load_study(build_fake_study(tmp_path / "overfit", failed=()))
    for claim in check_claims(overfitting, load_hypotheses(HYPOTHESES), results_table(overfitting)):
        assert "cells that overfit" not in (claim["open_because"] or "")
    # stability over seeds alike: open for want of seeds, not of questions
    alike = [replace(spec, loss_std=0.2) for spec in DEFAULT_EXPERIMENTS]
    steady = load_study(build_fake_study(tmp_path / "alike", experiments=alike, failed=()))
    stable = {
        c["id"]: c for c in check_claims(steady, load_hypotheses(HYPOTHESES), results_table(steady))
    }
    assert stable["lora_more_stable"]["verdict"] == "inconclusive"
    assert stable["lora_more_stable"]["open_because"].startswith("more seeds: ")
    markdown = write_report(study_dir, tmp_path / "report", HYPOTHESES)["report.md"]
    text = markdown.read_text(encoding="utf-8")
    assert "What a verdict on each open claim would need:" in text
    assert "- LoRA r=32 overfits relative to r=16: cells that overfit: no run of lora_r32" in text


def test_a_claim_is_tested_at_the_training_fraction_it_names(tmp_path: Path) -> None:
    """The overfitting claims name ``fraction: smallest``: their verdicts come from the
    smallest fraction's cells (where lora_r32's gap is made larger here), and the evidence
    says where; other claims stay at the main fraction; a fraction the study lacks is not
    run; a fraction that is no fraction is refused."""
    from dataclasses import replace

    from fake_study import question_losses

    calm = [replace(spec, overfit_from=None, gap=0.3) for spec in DEFAULT_EXPERIMENTS]
    study_dir = build_fake_study(tmp_path / "study", calm, failed=(), fractions=(0.1, 1.0))
    r32 = replace(next(spec for spec in calm if spec.name == "lora_r32"), gap=0.6)
    for seed in (0, 1):
        losses = study_dir / "lora_r32" / "train0.1" / f"seed{seed}" / "question_losses.json"
        losses.write_text(json.dumps(question_losses(r32, 40, seed)), encoding="utf-8")
    manifest = json.loads((study_dir / "study.json").read_text(encoding="utf-8"))
    manifest["fraction_budget"] = "steps"
    (study_dir / "study.json").write_text(json.dumps(manifest), encoding="utf-8")
    study = load_study(study_dir)
    hypotheses = load_hypotheses(HYPOTHESES)

    def claims(hypotheses: dict) -> dict[str, dict]:
        return {c["id"]: c for c in check_claims(study, hypotheses, results_table(study))}

    found = claims(hypotheses)
    assert found["r32_overfits_vs_r16"]["fraction"] == 0.1
    assert found["r32_overfits_vs_r16"]["verdict"] == "supported"
    assert found["r32_overfits_vs_r16"]["evidence"].startswith(
        "Tested at training fraction 0.1 (400 training questions, about as many steps as the "
        "full set): generalisation gap"
    )
    # the recommendation's sentence on less data tests its lead at that fraction too
    text = (write_report(study_dir, tmp_path / "report", HYPOTHESES)["report.md"]).read_text(
        encoding="utf-8"
    )
    versus = paired_comparison(study.at_fraction(0.1), "lora_r16", "lora_r32")
    assert 0.05 <= versus["p_bootstrap"] < 0.1  # a lead the study cannot confirm
    assert (
        "With less data (400 training questions) lora_r16 leads with 45.0% [42.5, 47.5], ahead "
        f"of lora_r32 (40.0%; {100 * versus['diff']:+.1f} points, p = {versus['p_bootstrap']:.2f}: "
        "the paired test cannot tell them apart)"
    ) in text
    assert found["lora16_beats_unfreeze3"]["fraction"] == 1.0
    assert not found["lora16_beats_unfreeze3"]["evidence"].startswith("Tested")
    # the same claim at the main fraction, where every gap is 0.3: inconclusive
    r32_claim = next(c for c in hypotheses["claims"] if c["id"] == "r32_overfits_vs_r16")
    r32_claim["fraction"] = "largest"
    assert claims(hypotheses)["r32_overfits_vs_r16"]["verdict"] == "inconclusive"
    r32_claim["fraction"] = 0.3
    missing = claims(hypotheses)["r32_overfits_vs_r16"]
    assert missing["verdict"] == "inconclusive (not run)"
    assert missing["open_because"] == "cells at training fraction 0.3 (--train_fractions)"
    text = HYPOTHESES.read_text(encoding="utf-8").replace("fraction: smallest", "fraction: 3", 1)
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(VQADataError, match="fraction must be smallest, largest or a training"):
        load_hypotheses(tmp_path / "bad.yaml")


def test_stability_is_compared_step_by_step_when_runs_keep_their_step_losses(
    tmp_path: Path,
) -> None:
    """With step losses (same batches per seed) one seed decides the stability claim: every
    LoRA cell's loss_std (0.12-0.15) is below unfreeze3's (0.30), step by step; cells that are
    equally stable stay open for power, not for seeds."""
    from dataclasses import replace

    study = load_study(
        build_fake_study(tmp_path / "steps", seeds=(0,), failed=(), with_step_losses=True)
    )
    claims = {
        c["id"]: c for c in check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    }
    stable = claims["lora_more_stable"]
    assert stable["verdict"] == stable["verdict_questions"] == "supported"
    assert stable["evidence"].startswith(
        "over steps: loss_std lora_r8 0.1500 vs unfreeze3 0.3000 on the same 300 batches, "
        "unfreeze3 minus lora_r8 +0.1500 (95% CI"
    )
    assert "one seed: no test" in stable["evidence"] and 0 < min(stable["mde"]) < 0.15
    alike = [replace(spec, loss_std=0.2) for spec in DEFAULT_EXPERIMENTS]
    steady = load_study(
        build_fake_study(tmp_path / "alike", alike, seeds=(0,), failed=(), with_step_losses=True)
    )
    claims = {
        c["id"]: c for c in check_claims(steady, load_hypotheses(HYPOTHESES), results_table(steady))
    }
    assert claims["lora_more_stable"]["verdict"] == "inconclusive"
    # identical stability: the difference is a rounding error, and the reason says so
    assert claims["lora_more_stable"]["open_because"].startswith("more power: the nearest to ")
    assert claims["lora_more_stable"]["open_because"].endswith(
        "would need more than 100 times the steps: too small a difference for any "
        "study of this size to decide"
    )


def test_an_open_claim_says_how_much_more_data_a_verdict_would_need(tmp_path: Path) -> None:
    """lora_r16 barely ahead of unfreeze3 (fake EM 0.62 vs 0.55 on 40 questions, 2 seeds): the
    claim stays open, and its reason names the comparison and the multiple of its questions at
    which the observed difference reaches the minimum detectable effect, (MDE / diff)^2, which
    is the questions-needed figure of the significance table, and the seeds that many take."""
    import math
    from dataclasses import replace

    close = {"lora_r16": 0.62, "unfreeze3": 0.55}  # on every subset alike
    tied = [
        replace(spec, em=close[spec.name], subset_em={}) if spec.name in close else spec
        for spec in DEFAULT_EXPERIMENTS
    ]
    study = load_study(build_fake_study(tmp_path, tied, failed=()))
    claims = {
        c["id"]: c for c in check_claims(study, load_hypotheses(HYPOTHESES), results_table(study))
    }
    versus = paired_comparison(study, "lora_r16", "unfreeze3")
    assert versus["diff"] > 0 and versus["p_bootstrap"] >= 0.05  # open, with a difference
    factor = (versus["mde"] / versus["diff"]) ** 2
    assert versus["questions_needed"] == pytest.approx(factor * versus["n_questions"])
    assert claims["lora16_beats_unfreeze3"]["open_because"] == (
        f"more power: lora_r16 vs unfreeze3 (difference {100 * versus['diff']:+.1f} points, "
        f"minimum detectable {100 * versus['mde']:.1f}) would need about {factor:.1f} times "
        f"the paired questions ({versus['questions_needed']:,.0f}), that is about "
        f"{math.ceil(2 * factor)} seeds in all (each seed adds its own); a verdict over seeds "
        f"(training noise included), about {versus['seeds_needed']} seeds"
    )


def test_the_power_of_the_hypotheses_file_sets_every_minimum_detectable_effect(
    study_dir: Path, tmp_path: Path
) -> None:
    """``power: 0.9`` in the hypotheses file reaches the claims, the controls, the significance
    table and the report's words: every minimum detectable effect grows by
    (z_0.975 + z_0.9) / (z_0.975 + z_0.8); a power or alpha outside (0, 1) is refused."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf
    ratio = (z(0.975) + z(0.9)) / (z(0.975) + z(0.8))
    text = HYPOTHESES.read_text(encoding="utf-8")
    assert "\npower: 0.8\n" in text
    (tmp_path / "h90.yaml").write_text(text.replace("\npower: 0.8\n", "\npower: 0.9\n"))
    study = load_study(study_dir)
    table = results_table(study)
    default, strict = load_hypotheses(HYPOTHESES), load_hypotheses(tmp_path / "h90.yaml")
    pairs = list(
        zip(check_claims(study, default, table), check_claims(study, strict, table), strict=True)
    )
    mdes = [
        (a, b) for c80, c90 in pairs for a, b in zip(c80["mde"], c90["mde"], strict=True) if a == a
    ]
    assert len(mdes) >= 5
    assert all(b == pytest.approx(ratio * a, rel=1e-6) for a, b in mdes)
    controls = [
        (a["mde"], b["mde"])
        for c80, c90 in zip(
            check_controls(study, default), check_controls(study, strict), strict=True
        )
        for a, b in zip(c80["comparisons"], c90["comparisons"], strict=True)
    ]
    assert controls and all(b == pytest.approx(ratio * a) for a, b in controls)
    written = write_report(study_dir, tmp_path / "report", tmp_path / "h90.yaml")
    with written["significance.csv"].open(encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["mde"]]
    expected = {
        (r["experiment"], r["reference"]): r["mde"] for r in significance(study) if "mde" in r
    }
    assert rows and all(
        float(row["mde"]) == pytest.approx(ratio * expected[row["experiment"], row["reference"]])
        for row in rows
    )
    markdown = written["report.md"].read_text(encoding="utf-8")
    assert "(90% power at alpha 0.05)" in markdown and "80% power" not in markdown
    assert "(z_0.975 + z_0.9) x standard error = 3.24 x SE" in markdown
    for key, value in (("power", "1.5"), ("alpha", "0"), ("power", "true")):
        bad = text.replace("\npower: 0.8\n", f"\n{key}: {value}\n" if key == "power" else "\n")
        if key == "alpha":
            bad = bad.replace("\nalpha: 0.05\n", f"\nalpha: {value}\n")
        (tmp_path / "bad.yaml").write_text(bad, encoding="utf-8")
        with pytest.raises(VQADataError, match=f"{key} must be a number in \\(0, 1\\)"):
            load_hypotheses(tmp_path / "bad.yaml")


def test_a_second_seed_that_repeats_the_first_adds_no_evidence(tmp_path: Path) -> None:
    """Seeds are pooled question by question, and one question answered by several seeds'
    models is one draw of a question, not several: a study whose seed 1 is a copy of seed 0
    gets the intervals, p-values and minimum detectable effects of seed 0 alone, for the EM
    comparisons and the generalisation gaps alike (pooled as independent pairs, the copy
    would narrow every interval by sqrt(2)). McNemar's exact test, which takes every pair for
    an independent one, keeps its counts and drops its p-value with two seeds."""
    import json
    import shutil

    one_dir = build_fake_study(tmp_path / "one", seeds=(0,), failed=())
    two_dir = tmp_path / "two"
    shutil.copytree(one_dir, two_dir)
    for experiment in DEFAULT_EXPERIMENTS:
        shutil.copytree(two_dir / experiment.name / "seed0", two_dir / experiment.name / "seed1")
    manifest = json.loads((two_dir / "study.json").read_text(encoding="utf-8"))
    manifest["seeds"] = [0, 1]
    (two_dir / "study.json").write_text(json.dumps(manifest), encoding="utf-8")
    one, two = load_study(one_dir), load_study(two_dir)
    for a, b in (("lora_r16", "unfreeze3"), ("lora_r8", "lora_r32"), ("baseline", "lora_r8")):
        single, double = paired_comparison(one, a, b), paired_comparison(two, a, b)
        assert double["n_questions"] == 2 * single["n_questions"] and double["seeds"] == [0, 1]
        for key in ("diff", "ci_low", "ci_high", "p_bootstrap", "mde"):
            assert double[key] == pytest.approx(single[key]), (a, b, key)
        assert double["questions_needed"] == pytest.approx(2 * single["questions_needed"])
        assert (double["mcnemar_b"], double["mcnemar_c"]) == (
            2 * single["mcnemar_b"],
            2 * single["mcnemar_c"],
        )
        assert single["p_mcnemar"] <= 1 and double["p_mcnemar"] != double["p_mcnemar"]
        gap_single, gap_double = gap_comparison(one, a, b), gap_comparison(two, a, b)
        for key in ("diff", "ci_low", "ci_high", "p_bootstrap", "mde"):
            assert gap_double[key] == pytest.approx(gap_single[key]), (a, b, key)


def test_generalisation_gap_comparison(study_dir: Path) -> None:
    study = load_study(study_dir)
    gap = gap_comparison(study, "lora_r32", "lora_r16")
    assert gap["seeds"] == [0, 1] and gap["n_held_out"] == 80 and gap["n_train"] == 80
    assert gap["gap_a"] == pytest.approx(0.6, abs=0.02)
    assert gap["gap_b"] == pytest.approx(0.3, abs=0.02)
    assert gap["diff"] == pytest.approx(0.3, abs=0.02) and gap["p_bootstrap"] < 0.01
    assert 0 < gap["mde"] < 0.3
    assert gap_comparison(study, "lora_r16", "lora_r16")["diff"] == 0


def test_controls_and_minimum_detectable_effects(study_dir: Path, report: dict[str, Path]) -> None:
    study = load_study(study_dir)
    controls = {c["id"]: c for c in check_controls(study, load_hypotheses(HYPOTHESES))}
    text = controls["text_shift"]
    assert text["detected"] is True
    assert [c["experiment"] for c in text["comparisons"]] == [
        "unfreeze3",
        "lora_r8",
        "lora_r16",
        "lora_r32",
    ]
    assert all(c["subset"] == "text_shift" and c["n_questions"] == 13 for c in text["comparisons"])
    assert controls["vision_shift"]["detected"] is False
    comparison = paired_comparison(study, "lora_r16", "unfreeze3")
    # 2.80 x the standard error of the per-question differences, each question one draw:
    # its differences over the two seeds averaged
    differences = []
    for seed in (0, 1):
        runs = [study.experiment(n).run(seed).predictions for n in ("lora_r16", "unfreeze3")]
        differences.append([a["em"] - b["em"] for a, b in zip(*runs, strict=True)])
    import numpy as np

    per_question = np.mean(differences, axis=0)
    se = np.std(per_question, ddof=1) / np.sqrt(per_question.size)
    assert comparison["mde"] == pytest.approx(2.8016 * se, rel=1e-3)
    assert len(comparison["seed_diffs"]) == 2
    markdown = report["report.md"].read_text(encoding="utf-8")
    assert "| Adapting the text encoder pays" in markdown and "| detected |" in markdown
    assert "NOT detected" in markdown
    assert "Minimum detectable EM difference" in markdown


def test_data_efficiency_and_cost(tmp_path: Path) -> None:
    study_dir = build_fake_study(tmp_path / "study", fractions=(0.1, 0.3, 1.0), failed=())
    study = load_study(study_dir)
    rows = efficiency_table(study)
    sizes = {(r["experiment"], r["train_questions"]) for r in rows}
    assert (
        ("lora_r16", 400) in sizes and ("lora_r16", 1200) in sizes and ("lora_r16", 4000) in sizes
    )
    by_size = {r["train_questions"]: r for r in rows if r["experiment"] == "lora_r16"}
    assert by_size[400]["test_em_mean"] < by_size[4000]["test_em_mean"]
    assert by_size[4000]["train_seconds_mean"] == 180.0  # 6 epochs x 30 s
    paths = write_report(study_dir, tmp_path / "out", HYPOTHESES)
    assert {"plots/data_efficiency.png", "efficiency.csv", "plots/cost.png"} <= set(paths)
    markdown = paths["report.md"].read_text(encoding="utf-8")
    assert "## Data efficiency" in markdown and "| 400 questions |" in markdown.replace(
        "400 questions | 1,200", "400 questions |"
    )
    assert "(u)" in markdown  # undertrained cells are marked


def test_recommendation_and_exact_counts_at_real_shapes(report: dict[str, Path]) -> None:
    markdown = report["report.md"].read_text(encoding="utf-8")
    recommendation = markdown[markdown.index("## Recommendation") :]
    assert "Recommended: lora_r16" in recommendation
    # the fake vision control is missed: the recommendation says so before anything else
    assert recommendation.index("Positive controls not detected (vision_shift)") < (
        recommendation.index("Recommended: lora_r16")
    )
    # text LoRA r16 on BARTpho-syllable's q/k/v: 12 layers x 3 x 16 x (1024 + 1024)
    assert (
        "| lora_r16 | text LoRA r=16 alpha=32 | ~1.5M | 1,179,648 (0.79x the seed's figure)"
        in recommendation
    )
    # the last 3 encoder layers of BARTpho-syllable (and the final layer norm): 37.8M
    assert (
        "| unfreeze3 | unfreeze last 3 text-encoder layers | ~18M | 37,790,720 (2.10x"
        in recommendation
    )
    assert "| vision_text_lora |" in recommendation and "1,622,016" in recommendation


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
    assert "| lora_r8 | 1 | 0 | failed | " in paths["report.md"].read_text(encoding="utf-8")


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


def test_control_subsets_count_only_the_questions_scored(tmp_path: Path) -> None:
    """A study scored on part of a test set (max_eval_samples) counts its
    control subsets over those questions, not over the whole subsets.csv."""
    study_dir = build_fake_study(tmp_path / "study", n_questions=40)
    subsets = study_dir / "data" / "subsets.csv"
    with subsets.open("a", encoding="utf-8") as handle:
        for i in range(40, 100):
            handle.write(f"test,q{i:03d},colour,A,0,in_domain\n")
    study = load_study(study_dir)
    assert len(study.subsets) == 40
    assert set(study.subsets) == {f"q{i:03d}" for i in range(40)}


def test_recommendation_p_values_never_round_to_zero() -> None:
    """The recommendation wrote a lead at p = 0.0004 as "p = 0.00"."""
    from vqadapt.ablation.recommend import _p

    assert [_p(p) for p in (0.245, 0.05, 0.004, 0.0004)] == [
        "p = 0.24", "p = 0.05", "p = 0.004", "p < 0.001",
    ]  # fmt: skip

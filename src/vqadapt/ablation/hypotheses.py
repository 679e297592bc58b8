"""Check a study against its hypotheses file: expected ranges and directional claims.

``load_hypotheses`` reads and validates a hypotheses file (the shipped one:
``vqadapt/experiments/hypotheses.yaml``);
``expected_vs_measured`` compares expected and measured scores; ``check_claims`` gives
each claim a verdict with a sentence of evidence.
"""

from __future__ import annotations

import math
from pathlib import Path

from vqadapt.ablation import stats
from vqadapt.ablation.comparisons import gap_comparison, paired_comparison
from vqadapt.ablation.results import Study, results_table, run_stats
from vqadapt.errors import VQADataError

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
LEVELS = {"alpha": 0.05, "power": 0.8}
"""A hypotheses file's significance level and power where it names none."""
CLAIM_RULES = ("better", "best", "overfits_more", "later_onset", "more_stable")


def load_hypotheses(path: str | Path) -> dict:
    """Read and check a hypotheses file (see ``vqadapt/experiments/hypotheses.yaml``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise VQADataError(f"malformed YAML: {err}", file=path) from err
    for key, default in LEVELS.items():
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise VQADataError(
                f"{key} must be a number in (0, 1), got {value!r}", file=path, field=key
            )
    for number, claim in enumerate(data.get("claims") or [], start=1):
        for key in ("id", "rule", "a"):
            if key not in claim:
                raise VQADataError(f"claim {number} has no {key!r}", file=path, field="claims")
        if claim["rule"] not in CLAIM_RULES:
            raise VQADataError(
                f"claim {claim['id']!r}: unknown rule {claim['rule']!r} (one of {CLAIM_RULES})",
                file=path,
                field="claims",
            )
        if claim["rule"] != "best" and "b" not in claim:
            raise VQADataError(f"claim {claim['id']!r} has no 'b'", file=path, field="claims")
        fraction = claim.get("fraction", "largest")
        if fraction not in ("smallest", "largest") and (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 < fraction <= 1
        ):
            raise VQADataError(
                f"claim {claim['id']!r}: fraction must be smallest, largest or a training "
                f"fraction in (0, 1], got {fraction!r}",
                file=path,
                field="claims",
            )
    return data


def levels(hypotheses: dict | None) -> tuple[float, float]:
    """The ``alpha`` and ``power`` every test and minimum detectable effect of a report uses:
    the hypotheses file's, else ``LEVELS``."""
    hypotheses = hypotheses or {}
    return tuple(float(hypotheses.get(key, default)) for key, default in LEVELS.items())


def claim_fraction(study: Study, claim: dict) -> float | None:
    """The training fraction a claim is tested at (its ``fraction``: ``largest``, the
    default, ``smallest``, or a fraction), None when the study did not train that one."""
    fraction = claim.get("fraction", "largest")
    if fraction == "largest":
        return study.train_fractions[-1]
    if fraction == "smallest":
        return study.train_fractions[0]
    return float(fraction) if float(fraction) in study.train_fractions else None


def _fraction_note(study: Study, fraction: float) -> str:
    """Where a claim tested below the main training fraction was tested, as a sentence start."""
    runs = [run for experiment in study.experiments for run in experiment.ok_runs]
    questions = runs[0].train_questions() if runs else None
    size = f"{questions:,} training questions" if questions is not None else "its questions"
    budget = (
        "about as many steps as the full set"
        if study.fraction_budget == "steps"
        else "the same epochs as the full set"
    )
    return f"Tested at training fraction {fraction:g} ({size}, {budget}): "


def expected_vs_measured(study: Study, hypotheses: dict, table: list[dict]) -> list[dict]:
    """Per experiment in ``hypotheses["expected"]``: expected and measured val loss and EM.

    ``em_check`` is ``consistent`` when the measured 95% CI overlaps the expected range,
    ``below`` / ``above`` when it lies wholly on one side, ``not run`` when absent.
    """
    by_name = {row["experiment"]: row for row in table}
    rows = []
    for name, expected in (hypotheses.get("expected") or {}).items():
        em_low, em_high = (list(expected.get("em", [math.nan])) * 2)[:2]
        row = by_name.get(name)
        measured = {
            "experiment": name,
            "expected_val_loss": float(expected.get("val_loss", math.nan)),
            "expected_em_low": float(em_low),
            "expected_em_high": float(em_high),
        }
        if row is None or row["n_seeds_ok"] == 0:
            rows.append({**measured, "em_check": "not run" if row is None else "no results"})
            continue
        ci_low, ci_high = 100 * row["test_em_ci_low"], 100 * row["test_em_ci_high"]
        if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
            ci_low = ci_high = 100 * row["test_em_mean"]
        if ci_high < em_low:
            check = "below"
        elif ci_low > em_high:
            check = "above"
        else:
            check = "consistent"
        rows.append(
            {
                **measured,
                "val_loss": row["best_val_loss_mean"],
                "val_loss_std": row["best_val_loss_std"],
                "em": 100 * row["test_em_mean"],
                "em_ci_low": ci_low,
                "em_ci_high": ci_high,
                "em_check": check,
            }
        )
    return rows


def _as_list(names: str | list[str]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _p_text(p_value: float) -> str:
    if not math.isfinite(p_value):
        return "p=–"
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def _verdict(diff: float, p_value: float, alpha: float, sign: int = 1) -> str:
    """Supported when ``sign * diff`` > 0 with p < alpha, not supported when reversed."""
    if not (math.isfinite(p_value) and p_value < alpha and math.isfinite(diff)) or diff == 0:
        return INCONCLUSIVE
    return SUPPORTED if sign * diff > 0 else NOT_SUPPORTED


def _combine(verdicts: list[str]) -> str:
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _seed_text(c: dict, scale: float, unit: str) -> str:
    diffs = ", ".join(f"{scale * d:+.1f}" if scale == 100 else f"{d:+.3f}" for d in c["seed_diffs"])
    if len(c["seed_diffs"]) < 2:
        return f"over seeds: one seed ({diffs} {unit}), no test"
    ci = f"{scale * c['seed_ci_low']:+.{1 if scale == 100 else 3}f} to {scale * c['seed_ci_high']:+.{1 if scale == 100 else 3}f}"
    needed = c["seeds_needed"]
    return (
        f"over seeds: per-seed differences [{diffs}] {unit}, 95% CI {ci}, paired t-test "
        f"{_p_text(c['seed_p'])}, minimum detectable {scale * c['seed_mde']:.{1 if scale == 100 else 3}f}"
        + (f", a decision needs about {needed} seeds" if needed else "")
    )


NEED_LIMIT = 100  # beyond this many times its sample, a comparison is called a tie


def _need(
    label: str,
    diff: float,
    mde: float,
    decimals: int,
    units: str,
    count: float | None,
    seeds: int,
    seeds_needed: int | None,
    unit: str = "",
) -> dict:
    """What a verdict on one open comparison would need, as a phrase for the report: the
    multiple ``factor`` of its sample of ``units`` (``count`` of them in all, where given) at
    which the observed difference ``diff`` reaches the minimum detectable effect ``mde`` at the
    study's power (``stats.units_needed``); the seeds that sample takes (each seed adds its own
    questions or steps), and those a verdict over seeds would take. Both numbers are shown
    with ``decimals``, the difference with its ``unit``. Beyond ``NEED_LIMIT`` times the
    sample the difference is called what it is: too small for any such study."""
    factor = stats.units_needed(1.0, mde, diff)
    head = f"{label} (difference {diff:+.{decimals}f}{unit}, minimum detectable {mde:.{decimals}f})"
    if not factor <= NEED_LIMIT:  # also a zero difference (infinite factor)
        return {
            "factor": factor,
            "text": f"{head} would need more than {NEED_LIMIT} times the {units}: too small "
            "a difference for any study of this size to decide",
        }
    factor = max(factor, 1.0)
    total = f" ({factor * count:,.0f})" if count is not None else ""
    text = (
        f"{head} would need about {factor:.1f} times the {units}{total}, that is about "
        f"{math.ceil(factor * seeds)} seeds in all (each seed adds its own)"
    )
    if seeds >= 2 and seeds_needed:
        text += f"; a verdict over seeds (training noise included), about {seeds_needed} seeds"
    return {"factor": factor, "text": text}


def _comparison_evidence(c: dict, alpha: float) -> str:
    mcnemar_text = f", McNemar {_p_text(c['p_mcnemar'])}" if math.isfinite(c["p_mcnemar"]) else ""
    on = "" if c.get("subset", "all") == "all" else f" on {c['subset']} questions"
    needed = c.get("questions_needed", math.inf)
    need_text = ""
    if math.isfinite(needed) and c["p_bootstrap"] >= alpha:
        need_text = f"; this difference would need about {needed:,.0f} paired questions"
    return (
        f"{c['experiment']} {c['metric'].upper()} {_pct(c['score_a'])} vs {c['reference']} "
        f"{_pct(c['score_b'])}{on}: difference {100 * c['diff']:+.1f} points "
        f"(95% CI {100 * c['ci_low']:+.1f} to {100 * c['ci_high']:+.1f}), "
        f"paired bootstrap {_p_text(c['p_bootstrap'])}{mcnemar_text}; "
        f"{c['n_questions']:,} paired questions over {len(c['seeds'])} seed(s), minimum "
        f"detectable difference {100 * c['mde']:.1f} points{need_text}; "
        + _seed_text(c, 100, "points")
        + "."
    )


def _gap_evidence(c: dict, study: Study) -> str:
    onsets = []
    for name in (c["experiment"], c["reference"]):
        experiment = study.experiment(name)
        per_seed = [run_stats(run)["onset"] for run in experiment.ok_runs] if experiment else []
        onsets.append(f"{name} [{', '.join(str(o or 'never') for o in per_seed)}]")
    return (
        f"generalisation gap (held-out minus training loss of the final model) {c['experiment']} "
        f"{c['gap_a']:.3f} vs {c['reference']} {c['gap_b']:.3f}: difference {c['diff']:+.3f} "
        f"(95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}), paired bootstrap "
        f"{_p_text(c['p_bootstrap'])}; {c['n_held_out']:,} held-out and {c['n_train']:,} training "
        f"questions over {len(c['seeds'])} seed(s), minimum detectable difference "
        f"{c['mde']:.3f}; " + _seed_text(c, 1, "") + f"; overfitting onset epochs per seed: "
        f"{' vs '.join(onsets)}."
    )


def _stability(
    study: Study, name_a: str, name_b: str, metric: str, alpha: float, power: float, n_boot: int
) -> dict:
    """``a`` more stable than ``b``: over steps (``loss_std`` only: the runs' step losses on
    the same batches, ``stats.step_stability_bootstrap``) and over seeds (a paired t-test of
    the per-seed ``metric``)."""
    exp_a, exp_b = study.experiment(name_a), study.experiment(name_b)
    diffs, steps_a, steps_b = [], [], []
    for seed in study.seeds:
        run_a, run_b = exp_a.run(seed), exp_b.run(seed)
        if run_a is None or run_b is None:
            continue
        a, b = run_stats(run_a)[metric], run_stats(run_b)[metric]
        if math.isfinite(a) and math.isfinite(b):
            diffs.append(b - a)  # positive: a is more stable
        epochs_a, epochs_b = run_a.step_losses(), run_b.step_losses()
        if metric == "loss_std" and epochs_a and epochs_b:
            common = min(len(epochs_a), len(epochs_b))  # a run may have stopped early
            steps_a += epochs_a[:common]
            steps_b += epochs_b[:common]
    steps = stats.step_stability_bootstrap(steps_a, steps_b, n_boot=n_boot) if steps_a else None
    over_steps, step_text, mde, need = None, "", math.nan, None
    if steps is not None:
        over_steps = _verdict(steps["diff"], steps["p_value"], alpha)
        mde = stats.minimum_detectable_effect(steps["se"], alpha, power)
        need = _need(
            f"{name_b} minus {name_a} loss_std over steps",
            steps["diff"],
            mde,
            4,
            "steps",
            steps["steps"],
            len(diffs) or 1,
            None,
        )
        step_text = (
            f"over steps: loss_std {name_a} {steps['loss_std_a']:.4f} vs {name_b} "
            f"{steps['loss_std_b']:.4f} on the same {steps['steps']:,} batches, {name_b} minus "
            f"{name_a} {steps['diff']:+.4f} (95% CI {steps['ci'][0]:+.4f} to "
            f"{steps['ci'][1]:+.4f}), block bootstrap {_p_text(steps['p_value'])}, minimum "
            f"detectable {mde:.4f}; "
        )
    if not diffs:
        return {
            "questions": over_steps,
            "seeds": INCONCLUSIVE,
            "evidence": step_text + "no stability measure over seeds.",
            "mde": mde,
            "need": need,
        }
    test = stats.paired_t_test(diffs, alpha)
    shown = ", ".join(f"{d:+.3g}" for d in diffs)
    seeds = _verdict(test["mean"], test["p_value"], alpha)
    evidence = (
        step_text
        + f"{metric} of {name_b} minus {name_a} per seed [{shown}]"
        + (
            f": paired t-test {_p_text(test['p_value'])}"
            if len(diffs) > 1
            else " (one seed: no test; needs at least 2)"
        )
        + ("." if steps is not None else "; no per-step measure of stability.")
    )
    return {
        "questions": over_steps,
        "seeds": seeds,
        "evidence": evidence,
        "mde": mde,
        "need": need,
    }


def _best(
    study: Study,
    name: str,
    table: list[dict],
    metric: str,
    alpha: float,
    power: float,
    n_boot: int,
):
    key = f"test_{metric}_mean"
    ranked = sorted(
        (row for row in table if math.isfinite(row[key])), key=lambda row: row[key], reverse=True
    )
    if len(ranked) < 2:
        return None, "fewer than two experiments have results."
    top = ranked[0]["experiment"]
    rival = ranked[1]["experiment"] if top == name else top
    comparison = paired_comparison(
        study, name, rival, metric, n_boot=n_boot, alpha=alpha, power=power
    )
    rank = [row["experiment"] for row in ranked].index(name) + 1
    position = "ranks first" if top == name else f"ranks {rank} of {len(ranked)}"
    return comparison, f"{name} {position}; "


def _member(
    study: Study,
    claim: dict,
    name: str,
    table: list[dict],
    alpha: float,
    power: float,
    n_boot: int,
) -> dict:
    """Verdicts (over questions, over seeds) and evidence of a claim for one member of ``a``."""
    rule = claim["rule"]
    metric = claim.get("metric", "em" if rule in ("better", "best") else "loss_std")
    if rule == "more_stable":
        return _stability(study, name, claim["b"], metric, alpha, power, n_boot)
    if rule in ("overfits_more", "later_onset"):
        comparison = gap_comparison(
            study, name, claim["b"], n_boot=n_boot, alpha=alpha, power=power
        )
        if comparison is None:
            return {
                "questions": INCONCLUSIVE,
                "seeds": INCONCLUSIVE,
                "evidence": f"no per-question losses for {name} and {claim['b']} "
                "(question_losses.json, written after training by the ablation runner).",
            }
        sign = 1 if rule == "overfits_more" else -1  # later onset: a smaller gap
        return {
            "questions": _verdict(comparison["diff"], comparison["p_bootstrap"], alpha, sign),
            "seeds": _verdict(comparison["diff"], comparison["seed_p"], alpha, sign),
            "evidence": _gap_evidence(comparison, study),
            "mde": comparison["mde"],
            "need": _need(
                f"{name} vs {claim['b']}",
                comparison["diff"],
                comparison["mde"],
                3,
                "held-out and training questions",
                None,
                len(comparison["seeds"]),
                comparison["seeds_needed"],
            ),
        }
    prefix = ""
    if rule == "best":
        comparison, prefix = _best(study, name, table, metric, alpha, power, n_boot)
    else:
        comparison = paired_comparison(
            study, name, claim["b"], metric, n_boot=n_boot, alpha=alpha, power=power
        )
    if comparison is None:
        return {
            "questions": INCONCLUSIVE,
            "seeds": INCONCLUSIVE,
            "evidence": prefix or "no paired predictions.",
        }
    return {
        "questions": _verdict(comparison["diff"], comparison["p_bootstrap"], alpha),
        "seeds": _verdict(comparison["diff"], comparison["seed_p"], alpha),
        "evidence": prefix + _comparison_evidence(comparison, alpha),
        "mde": comparison["mde"],
        "need": _need(
            f"{comparison['experiment']} vs {comparison['reference']}",
            100 * comparison["diff"],
            100 * comparison["mde"],
            1,
            "paired questions",
            comparison["n_questions"],
            len(comparison["seeds"]),
            comparison["seeds_needed"],
            unit=" points",
        ),
    }


def _more_power(parts: list[dict], generic: str) -> str:
    """The "more power" reason, with what the open comparison nearest to a verdict would need (the
    smallest multiple of its sample; ``generic`` where no part says)."""
    needs = [
        part["need"]
        for part in parts
        if part.get("need") and part.get("questions") in (INCONCLUSIVE, None)
    ]
    if not needs:
        return f"more power: {generic}"
    nearest = min(needs, key=lambda need: need["factor"])
    lead = "the nearest to a verdict, " if len(needs) > 1 else ""
    return f"more power: {lead}{nearest['text']}"


def _open_because(
    study: Study, claim: dict, names: list[str], per_unit: bool, parts: list[dict]
) -> str:
    """Why an inconclusive claim stayed open in this study: what a verdict would need
    (``per_unit``: the claim was tested over questions or steps; ``parts``: its members'
    verdicts and what each would need)."""
    rule = claim["rule"]
    if rule == "more_stable" and per_unit:
        return _more_power(
            parts,
            "the difference is below the minimum detectable effect over steps (more steps "
            "or seeds)",
        )
    if rule == "more_stable":
        if len(study.seeds) < 2:
            return (
                "seeds: with no step losses to compare (a metric other than loss_std, or runs "
                "that did not record them) it is decided over seeds only, and the study has one"
            )
        return (
            "more seeds: with no step losses to compare it is decided over seeds only, and "
            "their differences are not significant"
        )
    if rule in ("overfits_more", "later_onset"):
        runs = [run for name in names for run in study.experiment(name).ok_runs]
        if runs and all(run_stats(run)["onset"] is None for run in runs):
            return (
                f"cells that overfit: no run of {' or '.join(names)} does (validation loss never "
                "rose for 2 epochs while training loss fell), so there is no overfitting to compare"
            )
    return _more_power(
        parts, "the difference is below the minimum detectable effect (more seeds or questions)"
    )


def check_claims(
    study: Study, hypotheses: dict, table: list[dict], n_boot: int = 10_000
) -> list[dict]:
    """Verdicts and a sentence of evidence for each claim in ``hypotheses["claims"]``.

    Each claim gets ``verdict_questions`` (paired bootstrap over questions; ``None`` for a
    rule without a per-question measure), ``verdict_seeds`` (paired t-test over seeds) and
    the headline ``verdict``: the one over questions where there is one, else over seeds.
    ``open_because`` says, for an inconclusive claim, what a verdict would need (seeds,
    cells that overfit, or more power); None for a decisive one.
    ``fraction`` is the training fraction the claim was tested at (its ``fraction``: the
    largest by default; ``smallest`` tests it where the fewest questions trained, as the
    overfitting claims are, and the evidence says so). ``inconclusive (not run)`` when the
    claim names an experiment or a training fraction the study lacks. A claim over several
    experiments (a list in ``a``) is supported when it is for every one of them, and not
    supported when it is not for any one.
    """
    alpha, power = levels(hypotheses)
    verdicts = []
    views: dict[float, tuple[Study, list[dict]]] = {}  # claims at a smaller fraction share one
    for claim in hypotheses.get("claims") or []:
        base = {"id": claim["id"], "text": claim.get("text", claim["id"]), "rule": claim["rule"]}
        fraction = claim_fraction(study, claim)
        if fraction is None:
            verdict = "inconclusive (not run)"
            verdicts.append(
                {
                    **base,
                    "fraction": claim.get("fraction"),
                    "verdict": verdict,
                    "verdict_questions": verdict,
                    "verdict_seeds": verdict,
                    "evidence": f"not run: no cells at training fraction {claim['fraction']:g}.",
                    "open_because": f"cells at training fraction {claim['fraction']:g} "
                    "(--train_fractions)",
                }
            )
            continue
        if fraction == study.train_fractions[-1]:
            verdict = _claim_verdict(study, claim, table, alpha, power, n_boot)
            verdicts.append({**base, **verdict, "fraction": fraction})
            continue
        if fraction not in views:
            view = study.at_fraction(fraction)
            views[fraction] = view, results_table(view)
        view, view_table = views[fraction]
        verdict = _claim_verdict(view, claim, view_table, alpha, power, n_boot)
        verdict["evidence"] = _fraction_note(view, fraction) + verdict["evidence"]
        verdicts.append({**base, **verdict, "fraction": fraction})
    return verdicts


def _claim_verdict(
    study: Study, claim: dict, table: list[dict], alpha: float, power: float, n_boot: int
) -> dict:
    """One claim's verdicts, evidence and what an open one would need, in ``study``."""
    by_name = {row["experiment"]: row for row in table}
    members = _as_list(claim["a"])
    names = members + ([claim["b"]] if "b" in claim else [])
    absent = [name for name in names if name not in by_name]
    empty = [name for name in names if name in by_name and by_name[name]["n_seeds_ok"] == 0]
    if absent:
        verdict = "inconclusive (not run)"
        return {
            "verdict": verdict,
            "verdict_questions": verdict,
            "verdict_seeds": verdict,
            "evidence": f"not run: {', '.join(absent)}.",
            "open_because": f"runs of {', '.join(absent)}, which the study lacks",
        }
    if empty:
        return {
            "verdict": INCONCLUSIVE,
            "verdict_questions": INCONCLUSIVE,
            "verdict_seeds": INCONCLUSIVE,
            "evidence": f"no successful runs: {', '.join(empty)}.",
            "open_because": f"successful runs of {', '.join(empty)}",
        }
    parts = [_member(study, claim, name, table, alpha, power, n_boot) for name in members]
    over_questions = None
    if all(part["questions"] is not None for part in parts):
        over_questions = _combine([part["questions"] for part in parts])
    over_seeds = _combine([part["seeds"] for part in parts])
    verdict = over_questions if over_questions is not None else over_seeds
    return {
        "verdict": verdict,
        "open_because": (
            _open_because(study, claim, names, over_questions is not None, parts)
            if verdict == INCONCLUSIVE
            else None
        ),
        "verdict_questions": over_questions,
        "verdict_seeds": over_seeds,
        "evidence": " ".join(part["evidence"] for part in parts),
        "mde": [part.get("mde", math.nan) for part in parts],
    }


def check_controls(study: Study, hypotheses: dict, n_boot: int = 10_000) -> list[dict]:
    """Each positive control: every member of ``a`` against ``b`` on the control's subset.

    ``detected`` is True when every member beats ``b`` there with paired bootstrap p < alpha,
    False when some member does not, and None when the study cannot test it (a strategy not
    run, or no subset labels: not a synthetic benchmark set).
    """
    alpha, power = levels(hypotheses)
    out = []
    for control in hypotheses.get("controls") or []:
        subset = control["subset"]
        row = {
            "id": control["id"],
            "text": control.get("text", control["id"]),
            "subset": subset,
            "comparisons": [],
            "detected": None,
        }
        if subset not in set(study.subsets.values()):
            row["reason"] = f"no test questions labelled {subset!r} (not the synthetic benchmark?)"
            out.append(row)
            continue
        for name in _as_list(control["a"]):
            comparison = paired_comparison(
                study,
                name,
                control["b"],
                "em",
                n_boot=n_boot,
                subset=subset,
                alpha=alpha,
                power=power,
            )
            if comparison is None:
                row["reason"] = f"no paired predictions for {name} and {control['b']}"
                break
            row["comparisons"].append(comparison)
        else:
            row["detected"] = all(
                c["diff"] > 0 and c["p_bootstrap"] < alpha for c in row["comparisons"]
            )
        out.append(row)
    return out

"""Check a study against its hypotheses file: expected ranges and directional claims.

``load_hypotheses`` reads and validates a hypotheses file (the shipped one:
``vqadapt/experiments/hypotheses.yaml``);
``expected_vs_measured`` compares expected and measured scores; ``check_claims`` gives
each claim a verdict with a sentence of evidence.
"""

from __future__ import annotations

import math
from pathlib import Path

from vqadapt.ablation.results import Study, paired_comparison, run_stats
from vqadapt.errors import VQADataError

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
CLAIM_RULES = ("better", "best", "overfits_more", "later_onset", "more_stable")


def load_hypotheses(path: str | Path) -> dict:
    """Read and check a hypotheses file (see ``vqadapt/experiments/hypotheses.yaml``)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise VQADataError(f"malformed YAML: {err}", file=path) from err
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
    return data


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
    return "p<0.001" if p_value < 0.001 else f"p={p_value:.3f}"


def _test_verdict(comparison: dict, alpha: float) -> str:
    if comparison["p_bootstrap"] < alpha:
        return SUPPORTED if comparison["diff"] > 0 else NOT_SUPPORTED
    return INCONCLUSIVE


def _comparison_evidence(c: dict) -> str:
    mcnemar_text = f", McNemar {_p_text(c['p_mcnemar'])}" if math.isfinite(c["p_mcnemar"]) else ""
    return (
        f"{c['experiment']} {c['metric'].upper()} {_pct(c['score_a'])} vs {c['reference']} "
        f"{_pct(c['score_b'])}: difference {100 * c['diff']:+.1f} points "
        f"(95% CI {100 * c['ci_low']:+.1f} to {100 * c['ci_high']:+.1f}), "
        f"paired bootstrap {_p_text(c['p_bootstrap'])}{mcnemar_text}; "
        f"{c['n_questions']} paired questions over {len(c['seeds'])} seed(s)."
    )


def _sign(value: float) -> int:
    return 0 if not math.isfinite(value) or value == 0 else (1 if value > 0 else -1)


def _overfits_more(a: dict, b: dict) -> int:
    onset_a, onset_b = a["onset"], b["onset"]
    if onset_a is not None and (onset_b is None or onset_a < onset_b):
        return 1
    if onset_b is not None and (onset_a is None or onset_b < onset_a):
        return -1
    return _sign(a["gap"] - b["gap"])


def _later_onset(a: dict, b: dict) -> int:
    onset_a, onset_b = a["onset"], b["onset"]
    if onset_b is not None and (onset_a is None or onset_a > onset_b):
        return 1
    if onset_a is not None and (onset_b is None or onset_a < onset_b):
        return -1
    return 0


def _curve_claim(study: Study, name_a: str, name_b: str, rule: str, metric: str) -> dict:
    """Seed-by-seed verdict for one pair under a curve rule (no per-question test)."""
    exp_a, exp_b = study.experiment(name_a), study.experiment(name_b)
    outcomes, shown_a, shown_b = [], [], []
    for seed in study.seeds:
        run_a, run_b = exp_a.run(seed), exp_b.run(seed)
        if run_a is None or run_b is None:
            continue
        a, b = run_stats(run_a), run_stats(run_b)
        if rule == "overfits_more":
            outcomes.append(_overfits_more(a, b))
        elif rule == "later_onset":
            outcomes.append(_later_onset(a, b))
        else:
            outcomes.append(_sign(b[metric] - a[metric]))
        if rule == "more_stable":
            shown_a.append(f"{a[metric]:.3g}")
            shown_b.append(f"{b[metric]:.3g}")
        else:
            shown_a.append(str(a["onset"] or "never"))
            shown_b.append(str(b["onset"] or "never"))
    n, holds, reverses = len(outcomes), outcomes.count(1), outcomes.count(-1)
    if n >= 2 and holds == n:
        verdict = SUPPORTED
    elif n >= 2 and reverses == n:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    what = metric if rule == "more_stable" else "overfitting onset epoch"
    evidence = (
        f"{what} per seed {name_a} [{', '.join(shown_a)}] vs {name_b} [{', '.join(shown_b)}]: "
        f"holds in {holds}/{n} paired seeds, reverses in {reverses}"
        + (" (one seed: no test)" if n == 1 else "")
        + "."
    )
    return {"verdict": verdict, "evidence": evidence}


def _best_claim(study: Study, name: str, table: list[dict], metric: str, alpha: float) -> dict:
    key = f"test_{metric}_mean"
    ranked = sorted(
        (row for row in table if math.isfinite(row[key])), key=lambda row: row[key], reverse=True
    )
    if len(ranked) < 2:
        return {"verdict": INCONCLUSIVE, "evidence": "fewer than two experiments have results."}
    top = ranked[0]["experiment"]
    rival = ranked[1]["experiment"] if top == name else top
    comparison = paired_comparison(study, name, rival, metric)
    if comparison is None:
        return {"verdict": INCONCLUSIVE, "evidence": f"no paired predictions with {rival}."}
    rank = [row["experiment"] for row in ranked].index(name) + 1
    position = "ranks first" if top == name else f"ranks {rank} of {len(ranked)}"
    return {
        "verdict": _test_verdict(comparison, alpha),
        "evidence": f"{name} {position}; " + _comparison_evidence(comparison),
    }


def _member_verdict(
    study: Study, claim: dict, name: str, table: list[dict], alpha: float, n_boot: int
) -> dict:
    """Verdict and evidence of a claim for one experiment named in its ``a``."""
    rule = claim["rule"]
    metric = claim.get("metric", "em" if rule in ("better", "best") else "loss_std")
    if rule == "best":
        return _best_claim(study, name, table, metric, alpha)
    if rule == "better":
        comparison = paired_comparison(study, name, claim["b"], metric, n_boot=n_boot)
        if comparison is None:
            return {"verdict": INCONCLUSIVE, "evidence": "no paired predictions."}
        return {
            "verdict": _test_verdict(comparison, alpha),
            "evidence": _comparison_evidence(comparison),
        }
    return _curve_claim(study, name, claim["b"], rule, metric)


def check_claims(
    study: Study, hypotheses: dict, table: list[dict], n_boot: int = 10_000
) -> list[dict]:
    """A verdict and a sentence of evidence for each claim in ``hypotheses["claims"]``.

    ``supported``: the direction holds and, where a per-question test applies, the paired
    bootstrap p < alpha. ``not supported``: reversed with p < alpha (or, for curve rules,
    reversed in every paired seed). ``inconclusive``: anything else, including too few
    seeds; ``inconclusive (not run)`` when the claim names an experiment the study lacks.
    A claim over several experiments (a list in ``a``) is supported when it is for every
    one of them, and not supported when it is not for any one.
    """
    alpha = float(hypotheses.get("alpha", 0.05))
    by_name = {row["experiment"]: row for row in table}
    verdicts = []
    for claim in hypotheses.get("claims") or []:
        members = _as_list(claim["a"])
        names = members + ([claim["b"]] if "b" in claim else [])
        base = {"id": claim["id"], "text": claim.get("text", claim["id"]), "rule": claim["rule"]}
        absent = [name for name in names if name not in by_name]
        empty = [name for name in names if name in by_name and by_name[name]["n_seeds_ok"] == 0]
        if absent:
            verdict, evidence = "inconclusive (not run)", f"not run: {', '.join(absent)}."
        elif empty:
            verdict, evidence = INCONCLUSIVE, f"no successful runs: {', '.join(empty)}."
        else:
            parts = [_member_verdict(study, claim, name, table, alpha, n_boot) for name in members]
            member_verdicts = [part["verdict"] for part in parts]
            if all(v == SUPPORTED for v in member_verdicts):
                verdict = SUPPORTED
            elif NOT_SUPPORTED in member_verdicts:
                verdict = NOT_SUPPORTED
            else:
                verdict = INCONCLUSIVE
            evidence = " ".join(part["evidence"] for part in parts)
        verdicts.append({**base, "verdict": verdict, "evidence": evidence})
    return verdicts

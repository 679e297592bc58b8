"""Paired comparisons between the experiments of a study: per-question EM (or loss-gap)
differences, paired bootstrap and exact sign tests over questions, paired t-tests over seeds,
and the minimum detectable effect of each comparison."""

from __future__ import annotations

import math

import numpy as np

from vqadapt.ablation import stats
from vqadapt.ablation.results import Study


def paired_comparison(
    study: Study,
    name_a: str,
    name_b: str,
    metric: str = "em",
    n_boot: int = 10_000,
    subset: str | None = None,
    alpha: float = 0.05,
    power: float = 0.8,
) -> dict | None:
    """Compare two experiments question by question, seeds paired and concatenated.

    For every seed where both experiments succeeded, the test questions both predicted (of
    ``subset`` when given) are matched by ``id``; the per-question ``metric`` values of all
    such seeds are concatenated and passed to ``stats.paired_bootstrap`` with each pair's
    question as its cluster (one question's pairs from several seeds are resampled together:
    they are not independent), and to ``stats.mcnemar`` (its p-value for one seed only, the
    counts always). Also: the minimum detectable effect of this test (``mde``: at ``power``,
    two-sided ``alpha``) and the questions a decision at the observed difference would need;
    and, over seeds (``seed_*``), a paired t-test of the per-seed differences, its minimum
    detectable effect and the seeds a decision would need. ``None`` when nothing pairs.
    """
    exp_a, exp_b = study.experiment(name_a), study.experiment(name_b)
    if exp_a is None or exp_b is None:
        return None
    values_a: list[float] = []
    values_b: list[float] = []
    questions: list[str] = []  # the cluster of each pair: its question, across seeds
    seeds, per_seed = [], []
    for seed in study.seeds:
        run_a, run_b = exp_a.run(seed), exp_b.run(seed)
        if run_a is None or run_b is None:
            continue
        scores_a = run_a.subset_scores(study.subsets, subset, metric)
        scores_b = run_b.subset_scores(study.subsets, subset, metric)
        common = [qid for qid in scores_a if qid in scores_b]
        if common:
            seeds.append(seed)
            a = [scores_a[qid] for qid in common]
            b = [scores_b[qid] for qid in common]
            values_a += a
            values_b += b
            questions += common
            per_seed.append(float(np.mean(a) - np.mean(b)))
    if not values_a:
        return None
    boot = stats.paired_bootstrap(values_a, values_b, n_boot=n_boot, clusters=questions)
    differences = np.asarray(values_a) - np.asarray(values_b)
    se = stats.cluster_standard_error(differences, questions)
    mde = stats.minimum_detectable_effect(se, alpha, power)
    over_seeds = stats.paired_t_test(per_seed, alpha)
    result = {
        "experiment": name_a,
        "reference": name_b,
        "metric": metric,
        "subset": subset or "all",
        "seeds": seeds,
        "n_questions": len(values_a),
        "score_a": float(np.mean(values_a)),
        "score_b": float(np.mean(values_b)),
        "diff": boot["diff"],
        "ci_low": boot["ci"][0],
        "ci_high": boot["ci"][1],
        "p_bootstrap": boot["p_value"],
        "mcnemar_b": math.nan,
        "mcnemar_c": math.nan,
        "p_mcnemar": math.nan,
        "mde": mde,
        "questions_needed": stats.units_needed(len(values_a), mde, boot["diff"]),
        "seed_diffs": per_seed,
        "seed_p": over_seeds["p_value"],
        "seed_ci_low": over_seeds["ci"][0],
        "seed_ci_high": over_seeds["ci"][1],
        "seed_mde": stats.seed_mde(over_seeds["sd"], len(per_seed), alpha, power),
        "seeds_needed": stats.seeds_needed(over_seeds["sd"], over_seeds["mean"], alpha, power),
    }
    if metric == "em":
        test = stats.mcnemar(values_a, values_b)
        # The exact test takes every discordant pair for an independent one: with several
        # seeds, one question's pairs are not, and only the counts are shown.
        p_value = test["p_value"] if len(seeds) == 1 else math.nan
        result.update(mcnemar_b=test["b"], mcnemar_c=test["c"], p_mcnemar=p_value)
    return result


def gap_comparison(
    study: Study,
    name_a: str,
    name_b: str,
    n_boot: int = 10_000,
    alpha: float = 0.05,
    power: float = 0.8,
) -> dict | None:
    """Compare two experiments' generalisation gaps (held-out minus training loss of the
    final model, ``probe``), questions paired by id and seeds concatenated as in
    ``paired_comparison``; positive ``diff``: A's gap is larger (A overfits more). Also over
    seeds: a paired t-test of the per-seed gap differences. The minimum detectable effects
    are at ``power``. ``None`` without losses."""
    exp_a, exp_b = study.experiment(name_a), study.experiment(name_b)
    if exp_a is None or exp_b is None:
        return None
    pooled: dict[str, list[list[float]]] = {"test": [[], []], "train": [[], []]}
    questions: dict[str, list[str]] = {"test": [], "train": []}  # clusters across seeds
    seeds, per_seed = [], []
    for seed in study.seeds:
        run_a, run_b = exp_a.run(seed), exp_b.run(seed)
        if run_a is None or run_b is None or not run_a.question_losses or not run_b.question_losses:
            continue
        seed_means = {}
        for split in ("test", "train"):
            losses_a = run_a.question_losses.get(split) or {}
            losses_b = run_b.question_losses.get(split) or {}
            common = [qid for qid in losses_a if qid in losses_b]
            pooled[split][0] += [losses_a[qid] for qid in common]
            pooled[split][1] += [losses_b[qid] for qid in common]
            questions[split] += common
            seed_means[split] = (
                float(np.mean([losses_a[q] - losses_b[q] for q in common])) if common else math.nan
            )
        seeds.append(seed)
        per_seed.append(seed_means["test"] - seed_means["train"])
    if not seeds or not pooled["test"][0] or not pooled["train"][0]:
        return None
    boot = stats.gap_difference_bootstrap(
        *pooled["test"],
        *pooled["train"],
        n_boot=n_boot,
        held_out_clusters=questions["test"],
        train_clusters=questions["train"],
    )
    over_seeds = stats.paired_t_test(per_seed, alpha)
    return {
        "experiment": name_a,
        "reference": name_b,
        "seeds": seeds,
        "n_held_out": len(pooled["test"][0]),
        "n_train": len(pooled["train"][0]),
        "gap_a": boot["gap_a"],
        "gap_b": boot["gap_b"],
        "diff": boot["diff"],
        "ci_low": boot["ci"][0],
        "ci_high": boot["ci"][1],
        "p_bootstrap": boot["p_value"],
        "mde": stats.minimum_detectable_effect(boot["se"], alpha, power),
        "seed_diffs": per_seed,
        "seed_p": over_seeds["p_value"],
        "seed_ci_low": over_seeds["ci"][0],
        "seed_ci_high": over_seeds["ci"][1],
        "seed_mde": stats.seed_mde(over_seeds["sd"], len(per_seed), alpha, power),
        "seeds_needed": stats.seeds_needed(over_seeds["sd"], over_seeds["mean"], alpha, power),
    }


def significance(
    study: Study,
    against: tuple[str, ...] = ("baseline", "unfreeze3"),
    n_boot: int = 10_000,
    alpha: float = 0.05,
    power: float = 0.8,
) -> list[dict]:
    """Every experiment against each reference in ``against`` that the study ran (test EM),
    minimum detectable effects at ``power`` and two-sided ``alpha``."""
    rows = []
    for reference in against:
        ref = study.experiment(reference)
        if ref is None or not ref.ok_runs:
            continue
        for experiment in study.experiments:
            if experiment.name == reference:
                continue
            row = paired_comparison(
                study, experiment.name, reference, n_boot=n_boot, alpha=alpha, power=power
            )
            if row is None:
                row = {"experiment": experiment.name, "reference": reference, "n_questions": 0}
            rows.append(row)
    return rows

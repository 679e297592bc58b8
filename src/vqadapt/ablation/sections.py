"""The report's sections, each a function from the study's tables to a list of blocks
(``render.py``): header, results, coverage, controls, power, claims, subsets, question types,
data efficiency, cost and the recommendation."""

from __future__ import annotations

import math

from vqadapt.ablation import hypotheses as hyp
from vqadapt.ablation import results as res
from vqadapt.ablation.plots import _finite, fmt_params
from vqadapt.ablation.render import (
    Block,
    Bullets,
    Heading,
    Image,
    Para,
    Table,
    fmt_mean_std,
    fmt_num,
    fmt_p,
    fmt_pct,
)


def header(study: res.Study, hypotheses_source: str) -> list[Block]:
    total = sum(len(exp.runs) for exp in study.experiments)
    ok = sum(len(exp.ok_runs) for exp in study.experiments)
    data = "synthetic (embedded test set)" if study.synthetic else "ViVQA (or as configured)"
    blocks: list[Block] = [
        Heading(f"Ablation report: {study.preset}", 1),
        Bullets(
            [
                f"Preset: {study.preset}",
                f"Seeds: {', '.join(str(s) for s in study.seeds)}",
                f"Data set: {data}",
                f"Experiments: {len(study.experiments)}; successful cells: {ok} of {total}"
                + (
                    f" at the main training fraction; training fractions: "
                    f"{', '.join(f'{f:g}' for f in study.train_fractions)} (at equal "
                    f"{study.fraction_budget})"
                    if len(study.train_fractions) > 1
                    else ""
                ),
                f"Hypotheses: {hypotheses_source}",
            ]
            + (
                [
                    "Test questions per control subset: "
                    + ", ".join(
                        f"{name} {sum(v == name for v in study.subsets.values())}"
                        for name in sorted(set(study.subsets.values()))
                    )
                ]
                if study.subsets
                else []
            )
            + ([f"Notes: {study.notes}"] if study.notes else [])
        ),
    ]
    if study.synthetic:
        blocks.append(
            Para(
                "Synthetic data: absolute numbers from a synthetic set are not ViVQA numbers. "
                "Compare experiments with each other only.",
                note=True,
            )
        )
    return blocks


def failed(study: res.Study) -> list[Block]:
    blocks: list[Block] = [Heading("Failed cells")]
    if not study.failed_cells:
        return [*blocks, Para("None: every cell succeeded.")]
    rows = [
        [c.experiment, f"{c.fraction:g}", str(c.seed), c.status, c.reason]
        for c in study.failed_cells
    ]
    return [
        *blocks,
        Para("These cells are excluded from every statistic below."),
        Table(["experiment", "training fraction", "seed", "status", "reason"], rows),
    ]


def main_table(table: list[dict]) -> list[Block]:
    headers = [
        "experiment",
        "seeds ok",
        "trainable params",
        "best val loss",
        "test EM % (95% CI)",
        "test F1 %",
        "best epoch",
        "overfit onset",
        "loss std",
        "grad spike",
        "train s",
        "peak MiB",
    ]
    rows = []
    for r in table:
        em = fmt_mean_std(r["test_em_mean"], r["test_em_std"], scale=100, decimals=1)
        if _finite(r["test_em_ci_low"]):
            em += f" [{fmt_pct(r['test_em_ci_low'])}, {fmt_pct(r['test_em_ci_high'])}]"
            em += " (q)" if r["ci_over"] == "questions" else ""
        onset = "never"
        if r["overfit_seeds"]:
            onset = f"{fmt_num(r['overfit_onset_mean'], 2)} ({r['overfit_seeds']} seed(s))"
        rows.append(
            [
                r["experiment"],
                f"{r['n_seeds_ok']}/{r['n_seeds']}",
                fmt_params(r["trainable_params"]),
                fmt_mean_std(r["best_val_loss_mean"], r["best_val_loss_std"]),
                em,
                fmt_mean_std(r["test_f1_mean"], r["test_f1_std"], scale=100, decimals=1),
                _best_epoch_text(r),
                onset if r["n_seeds_ok"] else "–",
                fmt_num(r["loss_std"]),
                fmt_num(r["grad_spike"]),
                f"{r['train_seconds_mean']:.0f}" if _finite(r["train_seconds_mean"]) else "–",
                f"{r['peak_rss_mb_mean']:.0f}" if _finite(r["peak_rss_mb_mean"]) else "–",
            ]
        )
    blocks: list[Block] = [
        Heading("Results"),
        Para(
            "Mean ± std over successful seeds. EM CIs are over seeds; (q) marks an "
            "experiment with one successful seed, whose CI is over test questions. Best "
            "epoch: lowest validation loss; 'undertrained' when the epoch the run selected "
            "was its last (it might still have improved). Train s: seconds of the epochs "
            "(training and per-epoch validation); peak MiB: the cell process's peak resident "
            "memory (both measured per cell, on a machine shared with whatever else ran)."
        ),
        Table(headers, rows),
    ]
    under = [r["experiment"] for r in table if r["undertrained_seeds"]]
    if under:
        blocks.append(
            Para(
                f"Undertrained: {', '.join(under)} selected their last epoch; more epochs "
                "might change their ranking.",
                note=True,
            )
        )
    return blocks


def _best_epoch_text(r: dict) -> str:
    text = fmt_num(r["best_epoch_mean"], 2)
    if r["undertrained_seeds"]:
        text += f" (undertrained: {r['undertrained_seeds']}/{r['n_seeds_ok']} seeds)"
    return text


def coverage_table(table: list[dict]) -> list[Block]:
    rows = [
        [
            r["experiment"],
            fmt_params(r["trainable_params"]),
            f"{r['trainable_pct']:.2f}%" if _finite(r["trainable_pct"]) else "–",
            r["coverage"] or "–",
            r["layers_adapted"] or "none",
        ]
        for r in table
    ]
    headers = [
        "experiment",
        "trainable params",
        "% of total",
        "text-encoder coverage",
        "layers adapted",
    ]
    exact = "; ".join(
        f"{r['experiment']} {r['trainable_params']:,}"
        for r in table
        if _finite(r["trainable_params"])
    )
    note = Para(f"Trainable parameters, exact (each cell's plan): {exact or 'none'}.")
    return [Heading("Parameters and coverage"), Table(headers, rows), note]


def _power_terms(alpha: float, power: float) -> tuple[str, str]:
    """The power and alpha as the report words them ("80% power at alpha 0.05") and the
    multiplier of the standard error that makes a minimum detectable effect ("2.80")."""
    from vqadapt.ablation.stats import minimum_detectable_effect

    words = f"{100 * power:g}% power at alpha {alpha:g}"
    return words, f"{minimum_detectable_effect(1.0, alpha, power):.2f}"


def significance(rows: list[dict], alpha: float = 0.05, power: float = 0.8) -> list[Block]:
    blocks: list[Block] = [Heading("Significance (test EM, paired)")]
    if not rows:
        return [*blocks, Para("No reference experiment (baseline, unfreeze3) has results.")]
    table = []
    for r in rows:
        if not r.get("n_questions"):
            table.append([r["experiment"], r["reference"], "no paired predictions", *[""] * 5])
            continue
        needed = r["questions_needed"]
        table.append(
            [
                r["experiment"],
                r["reference"],
                f"{100 * r['diff']:+.1f}",
                f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
                fmt_p(r["p_bootstrap"]),
                f"{fmt_p(r['p_mcnemar'])} ({r['mcnemar_b']}/{r['mcnemar_c']})",
                f"{100 * r['mde']:.1f}",
                f"{needed:,.0f}" if _finite(needed) and needed < 1e9 else "–",
                fmt_p(r["seed_p"]) if len(r["seeds"]) > 1 else "one seed",
                f"{r['n_questions']:,}",
            ]
        )
    headers = [
        "experiment",
        "reference",
        "EM diff (points)",
        "95% CI",
        "paired bootstrap p",
        "McNemar p (b/c)",
        "min. detectable (points)",
        "questions needed",
        "over seeds p",
        "questions",
    ]
    words, multiplier = _power_terms(alpha, power)
    return [
        *blocks,
        Para(
            f"Min. detectable: the smallest EM difference this test detects with {words}, "
            f"for this many paired questions ({multiplier} x the standard error of the mean "
            "per-question difference; with several seeds, clustered by question). Questions "
            "needed: how many paired questions would make "
            f"the observed difference detectable with {100 * power:g}% power. Over seeds: "
            "paired t-test of the per-seed EM differences (includes training noise; needs 2 "
            "seeds or more)."
        ),
        Table(headers, table),
    ]


def hypotheses(
    study: res.Study, hypotheses: dict | None, source: str, table: list[dict]
) -> list[Block]:
    blocks: list[Block] = [Heading("Hypothesis check")]
    if hypotheses is None:
        return [*blocks, Para(f"No hypotheses file ({source}).")]
    blocks.append(Para(f"Expected numbers and claims from {source}; they are claims, not results."))
    if study.synthetic:
        blocks.append(
            Para("On synthetic data the expected ViVQA numbers cannot be met or missed.", note=True)
        )
    rows = []
    for r in hyp.expected_vs_measured(study, hypotheses, table):
        low, high = r["expected_em_low"], r["expected_em_high"]
        expected_em = f"{low:g}" if low == high else f"{low:g}–{high:g}"
        measured_em = "–"
        if "em" in r:
            measured_em = f"{r['em']:.1f} [{r['em_ci_low']:.1f}, {r['em_ci_high']:.1f}]"
        rows.append(
            [
                r["experiment"],
                fmt_num(r["expected_val_loss"]),
                fmt_mean_std(r.get("val_loss"), r.get("val_loss_std")),
                expected_em,
                measured_em,
                r["em_check"],
            ]
        )
    headers = [
        "experiment",
        "expected val loss",
        "measured val loss",
        "expected EM %",
        "measured EM % (95% CI)",
        "EM vs expected",
    ]
    blocks.append(Table(headers, rows))
    claims = hyp.check_claims(study, hypotheses, table)
    blocks.append(
        Table(
            ["claim", "verdict", "over questions (stability: steps)", "over seeds", "evidence"],
            [
                [
                    c["text"],
                    c["verdict"],
                    c["verdict_questions"] or "no per-question or per-step measure",
                    c["verdict_seeds"] if len(study.seeds) > 1 else "one seed: no test",
                    c["evidence"],
                ]
                for c in claims
            ],
        )
    )
    decisive = sum(c["verdict"] in (hyp.SUPPORTED, hyp.NOT_SUPPORTED) for c in claims)
    blocks.append(
        Para(
            f"{decisive} of {len(claims)} claims got a decisive verdict (p < "
            f"{hyp.levels(hypotheses)[0]:g}). Verdicts over questions (or steps) speak "
            "about these trained models (these training runs); only the verdicts over seeds "
            "include training noise."
        )
    )
    still_open = [c for c in claims if c.get("open_because")]
    if still_open:
        blocks.append(Para("What a verdict on each open claim would need:"))
        blocks.append(Bullets([f"{c['text']}: {c['open_because']}." for c in still_open]))
    return blocks


def controls(study: res.Study, hypotheses: dict | None) -> list[Block]:
    if not hypotheses or not hypotheses.get("controls") or not study.subsets:
        return []  # a data set without control subsets (real data) has no controls to test
    blocks: list[Block] = [
        Heading("Positive controls"),
        Para(
            "Each control is a subset of test questions built so that the named strategies "
            "should beat the reference there if they are implemented correctly (README: the "
            "embedded benchmark). A study that misses a control cannot tell strategies apart."
        ),
    ]
    rows = []
    for control in hyp.check_controls(study, hypotheses):
        state = {True: "detected", False: "NOT detected", None: "not testable"}[control["detected"]]
        if not control["comparisons"]:
            rows.append([control["text"], control["subset"], "–", "–", "–", "–", "–", state])
            continue
        for c in control["comparisons"]:
            rows.append(
                [
                    control["text"],
                    f"{c['subset']} ({c['n_questions']} q)",
                    f"{c['experiment']} vs {c['reference']}",
                    f"{fmt_pct(c['score_a'])} vs {fmt_pct(c['score_b'])}",
                    f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]",
                    fmt_p(c["p_bootstrap"]),
                    f"{100 * c['mde']:.1f}",
                    state,
                ]
            )
    headers = [
        "control",
        "subset",
        "comparison",
        "EM %",
        "diff (points) [95% CI]",
        "p",
        "min. detectable",
        "result",
    ]
    return [*blocks, Table(headers, rows)]


def power(
    study: res.Study, significance: list[dict], alpha: float = 0.05, power: float = 0.8
) -> list[Block]:
    rows = [r for r in significance if r.get("n_questions")]
    if not rows:
        return []
    mdes = [100 * r["mde"] for r in rows if _finite(r["mde"])]
    n = max(r["n_questions"] for r in rows)
    items = [
        f"{n:,} paired test questions per comparison ({len(study.seeds)} seed(s) x "
        f"{n // max(1, len(study.seeds)):,} questions).",
        f"Minimum detectable EM difference ({_power_terms(alpha, power)[0]}) of the paired "
        "comparisons "
        f"over questions: {min(mdes):.1f} to {max(mdes):.1f} points; smaller differences are "
        "likely to come out inconclusive however real they are.",
    ]
    seed_mdes = [100 * r["seed_mde"] for r in rows if _finite(r.get("seed_mde", math.nan))]
    if seed_mdes:
        items.append(
            f"Over seeds ({len(study.seeds)}): minimum detectable EM difference {min(seed_mdes):.1f} "
            f"to {max(seed_mdes):.1f} points (paired t-test, per-seed differences' spread)."
        )
    else:
        items.append(
            "Over seeds: one seed measures no training noise; the verdicts over questions "
            "are about these trained models (run several seeds, e.g. --seeds 3, to test over "
            "seeds)."
        )
    return [Heading("Power of this study"), Bullets(items)]


def subset_table(rows: list[dict]) -> list[Block]:
    if not rows:
        return []
    subsets = list(dict.fromkeys(r["subset"] for r in rows))
    names = list(dict.fromkeys(r["experiment"] for r in rows))
    by_key = {(r["experiment"], r["subset"]): r for r in rows}
    body = [
        [name]
        + [
            fmt_mean_std(by_key[name, t]["em_mean"], by_key[name, t]["em_std"], 100, 1)
            if (name, t) in by_key
            else "–"
            for t in subsets
        ]
        for name in names
    ]
    counts = {t: rows[[r["subset"] for r in rows].index(t)]["n"] for t in subsets}
    headers = ["experiment"] + [f"{t} (n={counts[t]})" for t in subsets]
    return [Heading("Test EM % per control subset"), Table(headers, body)]


def efficiency(study: res.Study, rows: list[dict], plot: bool) -> list[Block]:
    if len(study.train_fractions) < 2 or not rows:
        return []
    sizes = sorted({r["train_questions"] for r in rows if r["train_questions"]})
    by_key = {(r["experiment"], r["train_questions"]): r for r in rows}
    body = []
    for experiment in study.experiments:
        line = [experiment.name]
        for size in sizes:
            r = by_key.get((experiment.name, size))
            if r is None:
                line.append("–")
                continue
            text = fmt_mean_std(r["test_em_mean"], r["test_em_std"], 100, 1)
            if _finite(r["test_em_ci_low"]):
                text += f" [{fmt_pct(r['test_em_ci_low'])}, {fmt_pct(r['test_em_ci_high'])}]"
            if r["undertrained_seeds"]:
                text += " (u)"
            line.append(text)
        body.append(line)
    budget = (
        "trained for about as many steps (each epoch passes several times over its questions, "
        "so the curves compare at equal compute and the small sets can overfit)"
        if study.fraction_budget == "steps"
        else "trained for the same epochs (so for fewer steps)"
    )
    blocks: list[Block] = [
        Heading("Data efficiency"),
        Para(
            "Test EM % (95% CI, best checkpoint) against the number of training questions; "
            f"each smaller set is a random part of every larger one, {budget}. (u): "
            "undertrained (the selected epoch was the last)."
        ),
        Table(["experiment"] + [f"{size:,} questions" for size in sizes], body),
    ]
    if plot:
        blocks.append(Image("plots/data_efficiency.png", "Test EM against training questions"))
    return blocks


def cost(table: list[dict], plot: bool) -> list[Block]:
    rows = [
        [
            r["experiment"],
            fmt_params(r["trainable_params"]),
            f"{r['train_seconds_mean']:.0f}" if _finite(r["train_seconds_mean"]) else "–",
            f"{r['peak_rss_mb_mean']:.0f}" if _finite(r["peak_rss_mb_mean"]) else "–",
            fmt_mean_std(r["test_em_mean"], r["test_em_std"], 100, 1),
        ]
        for r in table
    ]
    blocks: list[Block] = [
        Heading("Cost"),
        Para(
            "Measured per cell at the main training fraction: trainable parameters (the plan), "
            "training seconds (sum of the epochs, validation included) and the peak resident "
            "memory of the cell's process (training and the loss probe; on a CPU this is the "
            "whole process, tiny models included). Seconds depend on what else ran on the "
            "machine at the time."
        ),
        Table(["experiment", "trainable params", "train s", "peak MiB", "test EM %"], rows),
    ]
    if plot:
        blocks.append(Image("plots/cost.png", "Test EM against cost"))
    return blocks


def per_type_table(rows: list[dict]) -> list[Block]:
    if not rows:
        return []
    types = sorted({r["type"] for r in rows})
    names = list(dict.fromkeys(r["experiment"] for r in rows))
    by_key = {(r["experiment"], r["type"]): r for r in rows}
    body = [
        [name]
        + [fmt_pct(by_key[name, t]["em_mean"]) if (name, t) in by_key else "–" for t in types]
        for name in names
    ]
    counts = {t: max(r["n"] for r in rows if r["type"] == t) for t in types}
    headers = ["experiment"] + [f"{t} (n={counts[t]})" for t in types]
    return [Heading("Test EM % per question type"), Table(headers, body)]


def method_notes(alpha: float = 0.05, power: float = 0.8) -> list[str]:
    """The report's method notes, with the study's alpha and power."""
    multiplier = _power_terms(alpha, power)[1]
    return [
        *_METHOD_NOTES,
        f"Minimum detectable effect (MDE): (z_{1 - alpha / 2:g} + z_{power:g}) x standard "
        f"error = {multiplier} x SE over questions (SE of the mean paired difference, "
        "clustered by question when seeds are pooled); over "
        f"k seeds, (t_{1 - alpha / 2:g} + t_{power:g}, k-1 df) x sd / sqrt(k) of the per-seed "
        "differences. Questions / seeds needed: the count at which the observed difference "
        "would reach that power. What an open claim would need: the sample (questions or "
        "steps) times (MDE / observed difference)^2, for the comparison of the claim nearest "
        "to a verdict; seeds in all: that many times the seeds, each adding its questions.",
    ]


_METHOD_NOTES = [
    "Test EM/F1: from each run's summary.json; mean ± sample std (ddof=1) over successful seeds.",
    "95% CI: percentile bootstrap (10,000 resamples) of the mean over seeds; with one seed, "
    "of the mean over test questions (per-question correctness). With 2-3 seeds the "
    "seed CI is a coarse range.",
    "Paired tests: for every seed where both experiments succeeded, questions are matched by id "
    "and the per-question EM of all such seeds concatenated. Paired bootstrap p: two-sided "
    "'shift' method, p = (1 + #{|D* - D| >= |D|}) / (B + 1) over B = 10,000 resamples of "
    "the per-question differences (D = observed mean difference); a resample draws "
    "questions, each with its differences from every seed (one question answered by several "
    "seeds' models is one draw of a question, not several), and the standard error behind "
    "the minimum detectable effects is clustered by question alike. McNemar: exact binomial "
    "test on discordant pairs b (only A right) and c (only B right); its p-value with one "
    "seed only (it takes every pair for an independent one), the counts always.",
    "Best epoch: the epoch of lowest validation loss (mean over seeds). Undertrained: the "
    "epoch the run selected (by its early-stopping metric) was its last.",
    "Overfitting onset: the first epoch e after which validation loss rises for 2 consecutive "
    "epochs while training loss falls; 'never' if it does not happen within the run.",
    "Loss std: mean over epochs of the within-epoch std of step losses. Grad spike: mean over "
    "epochs of (largest step grad norm / mean grad norm), the mean being the root sum of "
    "squares of the per-tower mean norms (so the ratio slightly overstates spikes). Lower "
    "is more stable for both.",
    "Gradient flow: mean over epochs and seeds of the per-layer grad norm of the trainable "
    "parameters in each text-encoder layer; 0 means the layer has nothing trainable.",
    "Generalisation gap: per question, the final model's (last checkpoint) mean token loss "
    "in eval mode, unweighted; the gap is the mean over held-out test questions minus the "
    "mean over (up to 2,000 of) its training questions. Two cells' gaps are compared with a "
    "bootstrap that resamples held-out and training questions independently, pairs kept "
    "(and each question's pairs from all seeds together).",
    "Claim verdicts: over questions, 'supported' when the direction holds with paired "
    "bootstrap p < alpha (EM claims: per-question EM; overfitting claims: per-question "
    "losses of the generalisation gap), 'not supported' when it reverses with p < alpha, "
    "otherwise 'inconclusive'. Stability (loss_std) over steps: cells with the same seed "
    "train on the same batches in the same order, so their step losses pair up by step; "
    "blocks of 10 consecutive steps of each epoch are resampled (a circular block bootstrap, "
    "the same steps for both runs) and each resample recomputes both loss_stds. Over seeds: "
    "the same with a paired t-test of the per-seed differences (2 seeds or more).",
]


def recommendation(
    study: res.Study,
    table: list[dict],
    efficiency: list[dict],
    hypotheses: dict | None,
    alpha: float,
) -> list[Block]:
    from vqadapt.ablation.real_counts import REAL_SHAPES
    from vqadapt.ablation.recommend import parameter_rows, recommendation

    paragraphs = recommendation(study, table, efficiency, alpha)
    if not paragraphs:
        return []
    blocks: list[Block] = [Heading("Recommendation")]
    missed = [
        control["id"]
        for control in (hyp.check_controls(study, hypotheses) if hypotheses else [])
        if control["detected"] is False
    ]
    if missed:
        blocks.append(
            Para(
                f"Positive controls not detected ({', '.join(missed)}): this study could not "
                "show a difference that was built into its data, so its ranking of the "
                "strategies below rests on differences it cannot resolve. Read it as what was "
                "measured, not as evidence for a choice.",
                note=True,
            )
        )
    blocks += [Para(text) for text in paragraphs]
    if study.synthetic:
        blocks.append(
            Para(
                "This is a recommendation for the embedded benchmark (tiny backbones, "
                "synthetic questions built to need adaptation); on a real data set, run the "
                "study there.",
                note=True,
            )
        )
    try:
        rows = parameter_rows(study, hypotheses)
    except Exception as err:  # the counts need transformers + peft; the report stands without
        return [*blocks, Para(f"Exact counts at the real shapes not computed: {err}")]
    blocks += [
        Para(
            f"What each strategy trains at the real backbones' shapes, {REAL_SHAPES}: exact "
            "counts from the same adaptation code on meta-device models built from config (no "
            "download). The adapted-encoder column is what the strategy adds; the decoder side "
            "(with its own copy of the 40,030 x 1,024 embedding) and the projector train in "
            "every strategy."
        ),
        Table(
            [
                "experiment",
                "strategy",
                "seed's figure",
                "adapted encoder params (exact)",
                "all trainable params",
                "share of the model",
            ],
            rows,
        ),
    ]
    return blocks

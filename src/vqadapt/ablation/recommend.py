"""The report's closing recommendation: which strategy, for this data size and budget, and how
sure the study is; with the seed's parameter figures beside exact counts at the real shapes.

The text is derived from the measurements only: the strategy with the highest test EM, the
strategies the paired tests cannot tell apart from it, the cheapest of those (training
seconds), what changes with less data, and what the seeds say about training noise.
"""

from __future__ import annotations

import math

from vqadapt.ablation import results as res
from vqadapt.ablation.comparisons import paired_comparison


def _p(p_value: float) -> str:
    """``p = 0.24``, ``p = 0.004``, ``p < 0.001``: two decimals, or three below 0.01."""
    if p_value < 0.001:
        return "p < 0.001"
    return f"p = {p_value:.3f}" if p_value < 0.01 else f"p = {p_value:.2f}"


def _fmt_em(row: dict) -> str:
    text = f"{100 * row['test_em_mean']:.1f}%"
    if math.isfinite(row.get("test_em_ci_low", math.nan)):
        text += f" [{100 * row['test_em_ci_low']:.1f}, {100 * row['test_em_ci_high']:.1f}]"
    return text


def _seconds(row: dict) -> float:
    value = row.get("train_seconds_mean", math.nan)
    return value if math.isfinite(value) else math.inf


def recommendation(
    study: res.Study, table: list[dict], efficiency: list[dict], alpha: float = 0.05
) -> list[str]:
    """Paragraphs of the recommendation (empty when no experiment has results)."""
    ranked = sorted(
        (row for row in table if math.isfinite(row["test_em_mean"])),
        key=lambda row: row["test_em_mean"],
        reverse=True,
    )
    if not ranked:
        return []
    best = ranked[0]
    size = best.get("train_questions")
    within, below = [], []
    for row in ranked[1:]:
        comparison = paired_comparison(study, row["experiment"], best["experiment"], alpha=alpha)
        if comparison is None:
            continue
        entry = (row, comparison)
        (within if comparison["p_bootstrap"] >= alpha else below).append(entry)
    paragraphs = []
    data = f"{size:,} training questions" if size else "this data size"
    text = f"With {data}, {best['experiment']} has the highest test EM, {_fmt_em(best)}."
    if within:
        text += (
            " The paired tests cannot tell it apart from "
            + "; ".join(
                f"{row['experiment']} ({100 * c['diff']:+.1f} points, {_p(c['p_bootstrap'])})"
                for row, c in within
            )
            + "."
        )
    if below:
        text += (
            " Significantly below it: "
            + ", ".join(f"{row['experiment']} ({100 * c['diff']:+.1f})" for row, c in below)
            + "."
        )
    paragraphs.append(text)

    candidates = [best] + [row for row, _ in within]
    cheapest = min(candidates, key=_seconds)
    if cheapest is best or not math.isfinite(_seconds(cheapest)):
        advice = f"Recommended: {best['experiment']}."
        if within:
            advice += (
                " Its lead over the strategies above is within this study's noise, and none of "
                "them trains faster."
            )
    else:
        ratio = _seconds(cheapest) / _seconds(best)
        advice = (
            f"Recommended: {cheapest['experiment']} under a compute budget (it trains in "
            f"{ratio:.0%} of {best['experiment']}'s time, {_seconds(cheapest):.0f} against "
            f"{_seconds(best):.0f} s, and the study cannot tell their EM apart); "
            f"{best['experiment']} when the last points of EM matter more than time."
        )
    paragraphs.append(advice)

    sizes = sorted({row["train_questions"] for row in efficiency if row["train_questions"]})
    if len(sizes) > 1:
        smallest = [row for row in efficiency if row["train_questions"] == sizes[0]]
        smallest.sort(key=lambda row: row["test_em_mean"], reverse=True)
        lead = smallest[0]
        runner = smallest[1] if len(smallest) > 1 else None
        text = (
            f"With less data ({sizes[0]:,} training questions) {lead['experiment']} leads with "
            f"{_fmt_em(lead)}"
        )
        if runner is not None:
            text += f", ahead of {runner['experiment']} ({100 * runner['test_em_mean']:.1f}%"
            versus = paired_comparison(
                study.at_fraction(study.train_fractions[0]),
                lead["experiment"],
                runner["experiment"],
                alpha=alpha,
            )
            if versus is not None:
                text += f"; {100 * versus['diff']:+.1f} points, {_p(versus['p_bootstrap'])}"
                if versus["p_bootstrap"] >= alpha:
                    text += ": the paired test cannot tell them apart"
            text += ")"
        under = [row["experiment"] for row in smallest if row["undertrained_seeds"]]
        if under:
            text += f"; undertrained there: {', '.join(under)}"
        paragraphs.append(text + " (data efficiency table).")

    seeds = len(study.seeds)
    if seeds < 2:
        paragraphs.append(
            "Uncertainty: one seed. The intervals and tests are over test questions and say "
            "how sure the study is about these trained models; a retrained model moves by "
            "training noise that one seed cannot measure. Run several seeds before acting on "
            "a difference close to the minimum detectable effect."
        )
    elif len(ranked) > 1:
        comparison = paired_comparison(study, ranked[1]["experiment"], best["experiment"])
        if comparison is not None and math.isfinite(comparison["seed_p"]):
            paragraphs.append(
                f"Uncertainty over {seeds} seeds: {best['experiment']} against the runner-up "
                f"{ranked[1]['experiment']}: per-seed differences "
                + ", ".join(f"{-100 * d:+.1f}" for d in comparison["seed_diffs"])
                + f" points, paired t-test {_p(comparison['seed_p'])}."
            )
    return paragraphs


def parameter_rows(study: res.Study, hypotheses: dict | None) -> list[list[str]]:
    """Per experiment: exact trainable counts at BARTpho-syllable + DINOv2-base shapes, beside
    the seed's own figure where it gives one (``parameter_claims`` in the hypotheses)."""
    from vqadapt.ablation.real_counts import real_shape_counts

    claims = (hypotheses or {}).get("parameter_claims") or {}
    specs = [{"name": e.name, "overrides": e.overrides} for e in study.experiments]
    rows = []
    for count in real_shape_counts(specs):
        claim = claims.get(count["experiment"], "")
        exact = count["adapted_encoder_params"]
        ratio = ""
        if claim:
            stated = _parse_count(claim)
            if stated:
                ratio = f" ({exact / stated:.2f}x the seed's figure)"
        rows.append(
            [
                count["experiment"],
                count["strategy"],
                claim or "–",
                f"{exact:,}{ratio}",
                f"{count['trainable_params']:,}",
                f"{100 * count['trainable_params'] / count['total_params']:.1f}%",
            ]
        )
    return rows


def _parse_count(text: str) -> float | None:
    """``"~1.5M"`` -> 1.5e6 (None when it is not a number with K / M / B)."""
    cleaned = text.strip().lstrip("~≈").strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(cleaned[-1:], 1.0)
    number = cleaned[:-1] if cleaned[-1:] in "KMB" else cleaned
    try:
        return float(number.replace(",", "")) * scale
    except ValueError:
        return None

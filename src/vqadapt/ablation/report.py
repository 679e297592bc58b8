"""Write an ablation study's report: Markdown, self-contained HTML, CSV and plots.

The report is built once as a list of blocks (headings, paragraphs, tables, images) and
rendered twice, so ``report.md`` and ``report.html`` always say the same thing.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from vqadapt.ablation import hypotheses as hyp
from vqadapt.ablation import results as res
from vqadapt.ablation.plots import (
    _finite,
    fmt_params,
    plot_em_vs_params,
    plot_gradient_flow,
    plot_learning_curves,
    plot_per_type,
)
from vqadapt.experiments import hypotheses_file

# ---------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    note: bool = False
    """Rendered as a highlighted call-out."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    path: str
    """Relative to the report."""
    caption: str


Block = Heading | Para | Table | Bullets | Image


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured Markdown."""
    out = []
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"{'#' * level} {text}")
            case Para(text, note):
                out.append(f"> **{text}**" if note else text)
            case Table(headers, rows):
                lines = ["| " + " | ".join(_md_cell(h) for h in headers) + " |"]
                lines.append("|" + "|".join("---" for _ in headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("\n".join(lines))
            case Bullets(items):
                out.append("\n".join(f"- {item}" for item in items))
            case Image(path, caption):
                out.append(f"![{caption}]({path})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.6em 1em;
        font-weight: bold; }
figure { margin: 1.5em 0; } img { max-width: 100%; }
figcaption { font-style: italic; color: #555; }
"""


def render_html(blocks: list[Block], title: str, images: dict[str, bytes]) -> str:
    """Render blocks as one HTML page; ``images`` maps an image path to its PNG bytes."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    for block in blocks:
        match block:
            case Heading(text, level):
                out.append(f"<h{level}>{html.escape(text)}</h{level}>")
            case Para(text, note):
                css = ' class="note"' if note else ""
                out.append(f"<p{css}>{html.escape(text)}</p>")
            case Table(headers, rows):
                head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                    for row in rows
                )
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            case Bullets(items):
                out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            case Image(path, caption):
                data = base64.b64encode(images[path]).decode("ascii")
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" '
                    f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}'
                    "</figcaption></figure>"
                )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- formatting


def fmt_num(value: object, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if _finite(value) else "–"


def fmt_pct(value: object, digits: int = 1) -> str:
    """A 0..1 fraction as a percentage."""
    return f"{100 * value:.{digits}f}" if _finite(value) else "–"


def fmt_p(value: object) -> str:
    if not _finite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def fmt_mean_std(mean: object, std: object, scale: float = 1.0, decimals: int = 3) -> str:
    """``mean ± std`` (std left out when zero or unknown), both multiplied by ``scale``."""
    if not _finite(mean):
        return "–"
    text = f"{scale * mean:.{decimals}f}"
    if _finite(std) and std > 0:
        text += f" ± {scale * std:.{decimals}f}"
    return text


# ---------------------------------------------------------------- sections


def _header(study: res.Study, hypotheses_source: str) -> list[Block]:
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
                f"Experiments: {len(study.experiments)}; successful cells: {ok} of {total}",
                f"Hypotheses: {hypotheses_source}",
            ]
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


def _failed(study: res.Study) -> list[Block]:
    blocks: list[Block] = [Heading("Failed cells")]
    if not study.failed_cells:
        return [*blocks, Para("None: every cell succeeded.")]
    rows = [[c.experiment, str(c.seed), c.status, c.reason] for c in study.failed_cells]
    return [
        *blocks,
        Para("These cells are excluded from every statistic below."),
        Table(["experiment", "seed", "status", "reason"], rows),
    ]


def _main_table(table: list[dict]) -> list[Block]:
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
        "wall time (s)",
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
                fmt_num(r["best_epoch_mean"], 2),
                onset if r["n_seeds_ok"] else "–",
                fmt_num(r["loss_std"]),
                fmt_num(r["grad_spike"]),
                fmt_num(r["wall_time_s_mean"], 4),
            ]
        )
    return [
        Heading("Results"),
        Para(
            "Mean ± std over successful seeds. EM CIs are over seeds; (q) marks an "
            "experiment with one successful seed, whose CI is over test questions."
        ),
        Table(headers, rows),
    ]


def _coverage_table(table: list[dict]) -> list[Block]:
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


def _significance(rows: list[dict]) -> list[Block]:
    blocks: list[Block] = [Heading("Significance (test EM, paired)")]
    if not rows:
        return [*blocks, Para("No reference experiment (baseline, unfreeze3) has results.")]
    table = []
    for r in rows:
        if not r.get("n_questions"):
            table.append([r["experiment"], r["reference"], "no paired predictions", *[""] * 5])
            continue
        table.append(
            [
                r["experiment"],
                r["reference"],
                f"{100 * r['diff']:+.1f}",
                f"[{100 * r['ci_low']:+.1f}, {100 * r['ci_high']:+.1f}]",
                fmt_p(r["p_bootstrap"]),
                f"{fmt_p(r['p_mcnemar'])} ({r['mcnemar_b']}/{r['mcnemar_c']})",
                str(r["n_questions"]),
                " ".join(str(s) for s in r["seeds"]),
            ]
        )
    headers = [
        "experiment",
        "reference",
        "EM diff (points)",
        "95% CI",
        "paired bootstrap p",
        "McNemar p (b/c)",
        "questions",
        "paired seeds",
    ]
    return [*blocks, Table(headers, table)]


def _hypotheses(
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
            ["claim", "verdict", "evidence"],
            [[c["text"], c["verdict"], c["evidence"]] for c in claims],
        )
    )
    return blocks


def _per_type_table(rows: list[dict]) -> list[Block]:
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


METHOD_NOTES = [
    "Test EM/F1: from each run's summary.json; mean ± sample std (ddof=1) over successful seeds.",
    "95% CI: percentile bootstrap (10,000 resamples) of the mean over seeds; with one seed, "
    "of the mean over test questions (per-question correctness). With 2-3 seeds the "
    "seed CI is a coarse range.",
    "Paired tests: for every seed where both experiments succeeded, questions are matched by id "
    "and the per-question EM of all such seeds concatenated. Paired bootstrap p: two-sided "
    "'shift' method, p = (1 + #{|D* - D| >= |D|}) / (B + 1) over B = 10,000 resamples of "
    "the per-question differences (D = observed mean difference). McNemar: exact binomial "
    "test on discordant pairs b (only A right) and c (only B right).",
    "Best epoch: the epoch of lowest validation loss (mean over seeds).",
    "Overfitting onset: the first epoch e after which validation loss rises for 2 consecutive "
    "epochs while training loss falls; 'never' if it does not happen within the run.",
    "Loss std: mean over epochs of the within-epoch std of step losses. Grad spike: mean over "
    "epochs of (largest step grad norm / mean grad norm), the mean being the root sum of "
    "squares of the per-tower mean norms (so the ratio slightly overstates spikes). Lower "
    "is more stable for both.",
    "Gradient flow: mean over epochs and seeds of the per-layer grad norm of the trainable "
    "parameters in each text-encoder layer; 0 means the layer has nothing trainable.",
    "Claim verdicts: 'supported' when the direction holds and the paired bootstrap p < alpha "
    "(EM claims) or, for curve claims (onset, stability), when it holds in every paired "
    "seed with at least 2 seeds; 'not supported' when reversed with p < alpha or in every "
    "paired seed; otherwise 'inconclusive'.",
]


# ---------------------------------------------------------------- entry point


def _find_hypotheses(study_dir: Path, explicit: str | Path | None) -> Path | None:
    if explicit is not None:
        return Path(explicit)
    for candidate in (study_dir / "hypotheses.yaml", hypotheses_file()):
        if candidate.exists():
            return candidate
    return None


def write_report(
    study_dir: str | Path,
    out_dir: str | Path | None = None,
    hypotheses_path: str | Path | None = None,
) -> dict[str, Path]:
    """Read a study and write report.md, report.html, results.csv, significance.csv, plots/.

    ``hypotheses_path`` defaults to ``STUDY/hypotheses.yaml``, then the one shipped in
    ``vqadapt.experiments``. Returns each written file keyed by its path relative
    to ``out_dir`` (default: the study directory). Every file is written atomically.
    """
    study_dir = Path(study_dir)
    out_dir = Path(out_dir) if out_dir is not None else study_dir
    study = res.load_study(study_dir)
    table = res.results_table(study)
    significance = res.significance(study)
    per_type = res.per_type_table(study)
    hypotheses_file = _find_hypotheses(study_dir, hypotheses_path)
    hypotheses = hyp.load_hypotheses(hypotheses_file) if hypotheses_file else None
    source = str(hypotheses_file) if hypotheses_file else "none found"

    written: dict[str, Path] = {}

    def save(relative: str, data: bytes | str) -> None:
        mode = "wb" if isinstance(data, bytes) else "w"
        with res.atomic_write(out_dir / relative, mode) as handle:
            handle.write(data)
        written[relative] = out_dir / relative

    plots = {
        "plots/learning_curves.png": (
            plot_learning_curves(study),
            "Learning curves: mean over seeds, band = ±1 std",
        ),
        "plots/em_vs_params.png": (
            plot_em_vs_params(study, table),
            "Test EM against trainable parameters (log x, 95% CI)",
        ),
        "plots/gradient_flow.png": (
            plot_gradient_flow(study),
            "Gradient flow: mean grad norm per text-encoder layer",
        ),
        "plots/per_type_em.png": (plot_per_type(study, per_type), "Test EM per question type"),
    }
    images = {path: data for path, (data, _) in plots.items() if data is not None}
    for path, data in images.items():
        save(path, data)

    blocks: list[Block] = [
        *_header(study, source),
        *_failed(study),
        *_main_table(table),
        *_coverage_table(table),
        *_significance(significance),
        *_hypotheses(study, hypotheses, source, table),
        *_per_type_table(per_type),
        Heading("Plots"),
        *[Image(path, caption) for path, (data, caption) in plots.items() if data is not None],
        Heading("Method notes"),
        Bullets(METHOD_NOTES),
    ]
    title = f"Ablation report: {study.preset}"
    save("report.md", render_markdown(blocks))
    save("report.html", render_html(blocks, title, images))
    res.write_results_csv(table, out_dir / "results.csv")
    written["results.csv"] = out_dir / "results.csv"
    res.write_results_csv(significance, out_dir / "significance.csv")
    written["significance.csv"] = out_dir / "significance.csv"
    return written

"""Write an ablation study's report: Markdown, self-contained HTML, CSV and plots.

The report is built once as a list of blocks (``render.py``), section by section
(``sections.py``), and rendered twice, so ``report.md`` and ``report.html`` always say the same
thing.
"""

from __future__ import annotations

from pathlib import Path

from vqadapt.ablation import comparisons
from vqadapt.ablation import hypotheses as hyp
from vqadapt.ablation import results as res
from vqadapt.ablation import sections as sec
from vqadapt.ablation.plots import (
    plot_cost,
    plot_data_efficiency,
    plot_em_vs_params,
    plot_gradient_flow,
    plot_learning_curves,
    plot_per_type,
)
from vqadapt.ablation.render import Block, Bullets, Heading, Image, render_html, render_markdown
from vqadapt.experiments import hypotheses_file

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
    per_type = res.per_type_table(study)
    subsets = res.subset_table(study)
    efficiency = res.efficiency_table(study)
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
    extra_plots = {
        "plots/data_efficiency.png": plot_data_efficiency(study, efficiency),
        "plots/cost.png": plot_cost(study, table),
    }
    images = {path: data for path, (data, _) in plots.items() if data is not None}
    images.update({path: data for path, data in extra_plots.items() if data is not None})
    for path, data in images.items():
        save(path, data)

    alpha, power = hyp.levels(hypotheses)
    significance = comparisons.significance(study, alpha=alpha, power=power)
    blocks: list[Block] = [
        *sec.header(study, source),
        *sec.failed(study),
        *sec.main_table(table),
        *sec.coverage_table(table),
        *sec.controls(study, hypotheses),
        *sec.power(study, significance, alpha, power),
        *sec.significance(significance, alpha, power),
        *sec.hypotheses(study, hypotheses, source, table),
        *sec.subset_table(subsets),
        *sec.per_type_table(per_type),
        *sec.efficiency(study, efficiency, "plots/data_efficiency.png" in images),
        *sec.cost(table, "plots/cost.png" in images),
        Heading("Plots"),
        *[Image(path, caption) for path, (data, caption) in plots.items() if data is not None],
        Heading("Method notes"),
        Bullets(sec.method_notes(alpha, power)),
        *sec.recommendation(study, table, efficiency, hypotheses, alpha),
    ]
    title = f"Ablation report: {study.preset}"
    save("report.md", render_markdown(blocks))
    save("report.html", render_html(blocks, title, images))
    res.write_results_csv(table, out_dir / "results.csv")
    written["results.csv"] = out_dir / "results.csv"
    res.write_results_csv(significance, out_dir / "significance.csv")
    written["significance.csv"] = out_dir / "significance.csv"
    if len(study.train_fractions) > 1:
        res.write_results_csv(efficiency, out_dir / "efficiency.csv")
        written["efficiency.csv"] = out_dir / "efficiency.csv"
    return written

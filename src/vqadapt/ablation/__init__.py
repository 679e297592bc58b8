"""Ablation study: read the runner's cells, compute statistics, write the report.

``stats`` holds pure statistics, ``results`` reads a study directory into typed results
and tables, ``comparisons`` compares its experiments pairwise, ``hypotheses`` checks them
against the expected claims, ``plots`` draws the figures, and ``report`` (with ``sections``
and ``render``) writes report.md / report.html / results.csv / plots.
"""

from vqadapt.ablation.comparisons import significance
from vqadapt.ablation.results import (
    ExperimentResult,
    FailedCell,
    RunResult,
    Study,
    load_study,
    results_table,
    write_results_csv,
)

__all__ = [
    "ExperimentResult",
    "FailedCell",
    "RunResult",
    "Study",
    "load_study",
    "results_table",
    "significance",
    "write_results_csv",
]

"""The ablation report's plots, each returned as PNG bytes (``None`` when nothing to draw)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, NullFormatter

from vqadapt.ablation import results as res


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def fmt_params(count: object) -> str:
    """``1789824`` -> ``1.79M``."""
    if not _finite(count):
        return "–"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(count) >= scale:
            return f"{count / scale:.3g}{suffix}"
    return str(int(count))


def _colours(study: res.Study) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {exp.name: cmap(i % 10) for i, exp in enumerate(study.experiments)}


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_learning_curves(study: res.Study) -> bytes | None:
    """Train loss, val loss and val EM per epoch; mean over seeds, band = ±1 std."""
    keys = ("train_loss", "val_loss", "val_em")
    titles = ("train loss", "validation loss", "validation EM (%)")
    colours = _colours(study)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    plotted = False
    for experiment in study.experiments:
        curves = res.mean_curves(experiment, keys)
        if curves["epoch"].size == 0:
            continue
        plotted = True
        for ax, key in zip(axes, keys, strict=True):
            scale = 100.0 if key == "val_em" else 1.0
            mean, std = scale * curves[key], scale * curves[f"{key}_std"]
            colour = colours[experiment.name]
            ax.plot(curves["epoch"], mean, marker="o", ms=3, color=colour, label=experiment.name)
            ax.fill_between(curves["epoch"], mean - std, mean + std, color=colour, alpha=0.15)
    if not plotted:
        plt.close(fig)
        return None
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    fig.subplots_adjust(bottom=0.22)
    return _png(fig)


def plot_em_vs_params(study: res.Study, table: list[dict]) -> bytes | None:
    """Test EM (mean, 95% CI error bars) against trainable parameters on a log axis."""
    rows = [r for r in table if _finite(r["test_em_mean"]) and (r["trainable_params"] or 0) > 0]
    if not rows:
        return None
    colours = _colours(study)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for row in rows:
        mean = 100 * row["test_em_mean"]
        low, high = 100 * row["test_em_ci_low"], 100 * row["test_em_ci_high"]
        errors = [[max(0.0, mean - low)], [max(0.0, high - mean)]]
        ax.errorbar(
            row["trainable_params"],
            mean,
            yerr=errors,
            fmt="o",
            capsize=4,
            color=colours[row["experiment"]],
            label=row["experiment"],
        )
        ax.annotate(
            row["experiment"],
            (row["trainable_params"], mean),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    counts = [row["trainable_params"] for row in rows]
    ax.set_xlim(min(counts) / 2, max(counts) * 3)  # room for the labels
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_params(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test EM (%)")
    ax.set_title("Test EM against trainable parameters (error bars: 95% CI)")
    ax.grid(alpha=0.3, which="both")
    return _png(fig)


def plot_gradient_flow(study: res.Study) -> bytes | None:
    """Mean gradient norm per text-encoder layer for each experiment, as measured.

    Layers with nothing trainable report 0; on a log axis they are drawn as hollow
    triangles on the bottom edge, and the line is broken there rather than interpolated.
    """
    profiles = {exp.name: res.layer_grad_profile(exp) for exp in study.experiments}
    profiles = {name: p for name, p in profiles.items() if p}
    if not profiles:
        return None
    positive = [v for p in profiles.values() for v in p.values() if v > 0]
    use_log = bool(positive) and max(positive) / min(positive) > 20
    floor = min(positive) / 3 if positive else 0.0
    colours = _colours(study)
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for index, (name, profile) in enumerate(profiles.items()):
        layers = np.array(list(profile))
        norms = np.array(list(profile.values()))
        shown = np.where(norms > 0, norms, np.nan) if use_log else norms
        marker = "osD^PX*h"[index % 8]  # lines that coincide stay distinguishable
        ax.plot(layers, shown, marker=marker, ms=5, color=colours[name], label=name)
        if use_log and np.any(norms == 0):
            # Side by side, so experiments frozen at the same layer do not hide each other.
            shift = (index - (len(profiles) - 1) / 2) * 0.08
            zeros = layers[norms == 0] + shift
            ax.plot(zeros, np.full(zeros.size, floor), "v", mfc="none", color=colours[name])
    if use_log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 1.5)
        ax.text(
            0.01,
            0.01,
            "▽ on the bottom edge: 0 (layer not trainable)",
            transform=ax.transAxes,
            fontsize=8,
            color="#555",
        )
    ax.set_xticks(range(1, max(max(p) for p in profiles.values()) + 1))
    ax.set_xlabel("text-encoder layer (1 = closest to the input)")
    ax.set_ylabel("mean gradient norm" + (" (log scale)" if use_log else ""))
    ax.set_title("Gradient flow through the text encoder (mean over epochs and seeds)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_per_type(study: res.Study, rows: list[dict]) -> bytes | None:
    """Test EM per question type, one bar per experiment (error bars: std over seeds)."""
    if not rows:
        return None
    types = sorted({row["type"] for row in rows})
    names = [
        exp.name for exp in study.experiments if any(r["experiment"] == exp.name for r in rows)
    ]
    colours = _colours(study)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(types) + 4), 5))
    for i, name in enumerate(names):
        by_type = {r["type"]: r for r in rows if r["experiment"] == name}
        means = [100 * by_type[t]["em_mean"] if t in by_type else np.nan for t in types]
        stds = [100 * by_type[t]["em_std"] if t in by_type else np.nan for t in types]
        stds = [std if std > 0 else np.nan for std in stds]  # no caps on zero-width bars
        x = np.arange(len(types)) + (i - (len(names) - 1) / 2) * width
        ax.bar(x, means, width, yerr=stds, capsize=2, color=colours[name], label=name)
    ax.set_xticks(range(len(types)), types)
    ax.set_ylabel("test EM (%)")
    ax.set_title("Test EM per question type")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_data_efficiency(study: res.Study, rows: list[dict]) -> bytes | None:
    """Test EM against training questions (log x), one line per experiment (error bars: 95%
    CI over seeds, or over questions with one seed); hollow markers: undertrained cells."""
    points = [r for r in rows if _finite(r["test_em_mean"]) and r["train_questions"]]
    if len({r["train_questions"] for r in points}) < 2:
        return None
    colours = _colours(study)
    fig, ax = plt.subplots(figsize=(8, 5))
    for experiment in study.experiments:
        mine = sorted(
            (r for r in points if r["experiment"] == experiment.name),
            key=lambda r: r["train_questions"],
        )
        if not mine:
            continue
        x = [r["train_questions"] for r in mine]
        y = [100 * r["test_em_mean"] for r in mine]
        low = [max(0.0, yi - 100 * r["test_em_ci_low"]) for yi, r in zip(y, mine, strict=True)]
        high = [max(0.0, 100 * r["test_em_ci_high"] - yi) for yi, r in zip(y, mine, strict=True)]
        colour = colours[experiment.name]
        ax.errorbar(
            x, y, yerr=[low, high], marker="o", capsize=3, color=colour, label=experiment.name
        )
        hollow = [(xi, yi) for xi, yi, r in zip(x, y, mine, strict=True) if r["undertrained_seeds"]]
        if hollow:
            ax.plot(*zip(*hollow, strict=True), "o", ms=9, mfc="white", color=colour, zorder=3)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted({r["train_questions"] for r in points}))
    ax.set_xlabel("training questions (log scale)")
    ax.set_ylabel("test EM (%)")
    ax.set_title("Data efficiency: test EM against training questions (hollow: best epoch = last)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def plot_cost(study: res.Study, table: list[dict]) -> bytes | None:
    """Test EM against three costs measured per cell: training seconds, peak resident
    memory of the cell's process, trainable parameters (error bars: 95% CI)."""
    panels = (
        ("train_seconds_mean", "training seconds (epochs incl. validation)", False),
        ("peak_rss_mb_mean", "peak resident memory of the cell process (MiB)", False),
        ("trainable_params", "trainable parameters (log scale)", True),
    )
    rows = [r for r in table if _finite(r["test_em_mean"])]
    if not rows:
        return None
    colours = _colours(study)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    drawn = False
    for ax, (key, label, log) in zip(axes, panels, strict=True):
        for row in rows:
            if not _finite(row.get(key)) or not row.get(key):
                continue
            drawn = True
            mean = 100 * row["test_em_mean"]
            err = [
                [max(0.0, mean - 100 * row["test_em_ci_low"])],
                [max(0.0, 100 * row["test_em_ci_high"] - mean)],
            ]
            ax.errorbar(
                row[key], mean, yerr=err, fmt="o", capsize=3, color=colours[row["experiment"]]
            )
            ax.annotate(
                row["experiment"],
                (row[key], mean),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=7,
            )
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt_params(x)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label)
        ax.set_ylabel("test EM (%)")
        ax.grid(alpha=0.3, which="both")
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle("Test EM against cost, measured per cell (error bars: 95% CI)")
    return _png(fig)

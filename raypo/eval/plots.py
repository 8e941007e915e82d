"""The report's figures, drawn with matplotlib's object API on an Agg canvas.

Every function takes plain numbers (lists, NumPy arrays, dicts), writes one PNG and returns its
path. Figures are built from :class:`matplotlib.figure.Figure` with an explicit Agg canvas rather
than ``pyplot``: nothing here selects a global backend or keeps figures alive, so the report can be
built inside a training or evaluation process without disturbing its own plotting. matplotlib is
imported inside the functions; importing this module does no work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Series = tuple[list[float], list[float]]
"""(steps, values) of one metric."""


@dataclass(frozen=True)
class Panel:
    """One panel of the training curves: a title, a y-axis label and labelled series."""

    title: str
    ylabel: str
    series: Mapping[str, Series]
    """Legend label -> (steps, values); labels starting with "reference" are drawn dashed."""


_DPI = 110


def _figure(columns: int, rows: int = 1, width: float = 4.6, height: float = 3.6) -> Any:
    """A figure on its own Agg canvas with ``rows x columns`` axes (always a 2-D array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=_DPI)
    return path


def training_curves(panels: Sequence[Panel], path: Path) -> Path:
    """One panel per metric, side by side, each with its labelled series (train, held-out, ...)."""
    figure, axes = _figure(len(panels), height=4.2)
    for axis, panel in zip(axes[0], panels, strict=True):
        for label, (steps, values) in panel.series.items():
            style = "--" if label.startswith("reference") else "-"
            axis.plot(steps, values, style, marker="o", markersize=3, label=label)
        axis.set_title(panel.title)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(panel.ylabel)
        axis.grid(alpha=0.3)
        # Below the axes: inside, the legend hides parts of short, noisy curves.
        axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    figure.suptitle("Training curves")
    return _save(figure, path)


def dispersion_histogram(weights: Mapping[str, np.ndarray], scale: float, path: Path) -> Path:
    """Density histograms of w(x) per split with each split's mean as a vertical line."""
    figure, axes = _figure(1, width=6.4, height=4.0)
    axis = axes[0, 0]
    values = np.concatenate(list(weights.values()))
    bins = np.linspace(float(values.min()), float(values.max()), 31)
    if bins[0] == bins[-1]:
        bins = np.linspace(bins[0] - 0.5, bins[0] + 0.5, 31)
    for index, (split, split_weights) in enumerate(weights.items()):
        color = f"C{index}"
        mean = float(np.mean(split_weights))
        label = f"{split} ({len(split_weights)} pairs)"
        axis.hist(split_weights, bins=bins, density=True, alpha=0.5, color=color, label=label)
        axis.axvline(mean, color=color, linestyle="--", label=f"{split} mean {mean:.4g}")
    axis.set_title(f"Dispersion weight w(x) = -{scale:g} ln Hn(x) over the pairs")
    axis.set_xlabel("w(x)")
    axis.set_ylabel("density")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


def strength_density(family: str, a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Density of the MixDPO strength distribution at ``x > 0``: lognormal(mu=a, sigma=b) or
    gamma(shape=a, scale=b), in closed form (float64)."""
    x = np.asarray(x, dtype=np.float64)
    if family == "lognormal":
        z = (np.log(x) - a) / b
        return np.exp(-0.5 * z * z) / (x * b * math.sqrt(2 * math.pi))
    if family == "gamma":
        log_pdf = (a - 1) * np.log(x) - x / b - math.lgamma(a) - a * math.log(b)
        return np.exp(log_pdf)
    raise ValueError(f"unknown strength distribution family {family!r}; expected lognormal/gamma")


def strength_grid(family: str, a: float, b: float, points: int = 2001) -> np.ndarray:
    """Points covering all but a negligible tail of the strength distribution: mu +- 6 sigma in
    log space for lognormal (mass outside < 2e-9); mean - 8 sd to mean + 12 sd for gamma."""
    if family == "lognormal":
        return np.exp(np.linspace(a - 6 * b, a + 6 * b, points))
    mean, sd = a * b, math.sqrt(a) * b
    low = max(mean - 8 * sd, 1e-4 * mean)
    return np.linspace(low, mean + 12 * sd, points)


def _bulk(family: str, a: float, b: float) -> tuple[float, float]:
    """Plotted range: the lognormal's 0.05% to 99.95% quantiles (mu +- 3.3 sigma in log space);
    mean +- 4.5 sd for gamma, cut at 0."""
    if family == "lognormal":
        return math.exp(a - 3.3 * b), math.exp(a + 3.3 * b)
    mean, sd = a * b, math.sqrt(a) * b
    return max(0.0, mean - 4.5 * sd), mean + 4.5 * sd


def strength_plot(
    strength: Mapping[str, Any], cv_series: Series | None, beta: float, path: Path
) -> Path:
    """Density of the learned beta distribution with its mean (and the configured beta) marked;
    a second panel shows the CV of beta over training steps when it was logged."""
    figure, axes = _figure(2 if cv_series else 1, width=5.2, height=3.8)
    axis = axes[0, 0]
    family, a, b = strength["family"], float(strength["a"]), float(strength["b"])
    moments = strength["moments"]
    grid = strength_grid(family, a, b)
    density = strength_density(family, a, b, grid)
    axis.plot(grid, density, color="C0")
    axis.fill_between(grid, density, alpha=0.2, color="C0")
    axis.axvline(moments["mean"], color="C1", linestyle="--", label=f"mean {moments['mean']:.4g}")
    if not math.isclose(beta, moments["mean"], rel_tol=1e-3):
        axis.axvline(beta, color="C2", linestyle=":", label=f"loss.beta {beta:g}")
    names = {"lognormal": ("mu", "sigma"), "gamma": ("shape", "scale")}[family]
    axis.set_title(
        f"Learned beta ~ {family}({names[0]}={a:.3g}, {names[1]}={b:.3g}), CV {moments['cv']:.3g}",
        fontsize="medium",
    )
    axis.set_xlabel("beta")
    axis.set_ylabel("density")
    low, high = _bulk(family, a, b)
    axis.set_xlim(low, high)
    # A gamma shape < 1 has an integrable pole at 0: scale the axis to the bulk, not the pole.
    axis.set_ylim(0, 1.1 * float(density[grid >= max(low, 0.05 * moments["mean"])].max()))
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    if cv_series:
        steps, values = cv_series
        trajectory = axes[0, 1]
        trajectory.plot(steps, values, marker="o", markersize=3)
        trajectory.set_title("CV of beta during training", fontsize="medium")
        trajectory.set_xlabel("optimizer step")
        trajectory.set_ylabel("std / mean of beta")
        trajectory.grid(alpha=0.3)
    return _save(figure, path)


def reward_histograms(policy: np.ndarray, baseline: np.ndarray, title: str, path: Path) -> Path:
    """Overlaid reward-model score histograms of the policy's and the baseline's completions."""
    figure, axes = _figure(1, width=6.4, height=4.0)
    axis = axes[0, 0]
    scores = np.concatenate([policy, baseline])
    bins = np.histogram_bin_edges(scores, bins="auto")
    if len(bins) > 41:
        bins = np.histogram_bin_edges(scores, bins=40)
    for index, (label, scores) in enumerate((("policy", policy), ("baseline", baseline))):
        color = f"C{index}"
        mean = float(np.mean(scores))
        axis.hist(scores, bins=bins, alpha=0.5, color=color, label=f"{label} ({len(scores)})")
        axis.axvline(mean, color=color, linestyle="--", label=f"{label} mean {mean:.3g}")
    axis.set_title(title, fontsize="medium")
    axis.set_xlabel("reward-model score")
    axis.set_ylabel("completions")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return _save(figure, path)


def group_bars(
    groups: Sequence[str], accuracy: Sequence[float], pairs: Sequence[int], path: Path
) -> Path:
    """Held-out implicit-reward accuracy per group, each bar labelled with its value and pair
    count."""
    figure, axes = _figure(1, width=max(5.0, 0.7 * len(groups) + 2.0), height=4.0)
    axis = axes[0, 0]
    positions = np.arange(len(groups))
    bars = axis.bar(positions, accuracy, color="C0")
    labels = [f"{100 * acc:.1f}%\nn={count}" for acc, count in zip(accuracy, pairs, strict=True)]
    axis.bar_label(bars, labels=labels, label_type="center", color="white", fontsize="small")
    axis.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    rotated = len(groups) > 4
    axis.set_xticks(
        positions, list(groups), rotation=30 if rotated else 0, ha="right" if rotated else "center"
    )
    axis.set_ylim(0, 1.1)
    axis.set_title("Held-out implicit-reward accuracy per group")
    axis.set_xlabel("group")
    axis.set_ylabel("accuracy (chosen ranked above rejected)")
    axis.legend(fontsize="small")
    return _save(figure, path)


@dataclass(frozen=True)
class Line:
    """One curve of a :class:`LinePanel`."""

    label: str
    points: Series
    color: int
    """Index into matplotlib's colour cycle (``C0``, ``C1``, ...): one colour per run."""
    linestyle: str = "-"
    """matplotlib's line style: ``--`` for a reference level, which is not measured."""
    marker: str = "o"
    """Point marker, one shape per run; empty for a dense curve (training batches, a reference
    level)."""


@dataclass(frozen=True)
class LinePanel:
    """A panel of curves over optimizer steps."""

    title: str
    ylabel: str
    lines: Sequence[Line]


def _finish_axis(axis: Any, title: str, xlabel: str, ylabel: str, legend_columns: int) -> None:
    """Title, axis labels, a light grid and the legend below the axes of one side-by-side panel."""
    axis.set_title(title, fontsize="medium")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    # Below the axes: inside, the legend hides parts of short, noisy curves and of histograms.
    axis.legend(
        fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=legend_columns
    )


def line_panels(panels: Sequence[LinePanel], title: str, path: Path) -> Path:
    """Panels side by side, each with its curves, the legend below each panel."""
    figure, axes = _figure(len(panels), height=4.4)
    for axis, panel in zip(axes[0], panels, strict=True):
        for line in panel.lines:
            steps, values = line.points
            axis.plot(
                steps,
                values,
                color=f"C{line.color}",
                linestyle=line.linestyle,
                marker=line.marker or None,
                markersize=5,
                # Hollow: where two runs' curves coincide, both runs' marker shapes still show.
                fillstyle="none",
                label=line.label,
            )
        _finish_axis(axis, panel.title, "optimizer step", panel.ylabel, legend_columns=1)
    figure.suptitle(title)
    return _save(figure, path)


@dataclass(frozen=True)
class HistogramPanel:
    """A panel of overlaid histograms sharing one set of bins."""

    title: str
    xlabel: str
    samples: Mapping[str, np.ndarray]
    """Legend label -> values; drawn in colour order C0, C1, ... unless ``colors`` says."""
    colors: Sequence[int] | None = None
    """Colour-cycle index of each entry of ``samples``; None = 0, 1, 2, ..."""
    zero_line: bool = False
    """Mark x = 0 (the sign of a margin decides the ranking)."""


def histogram_panels(panels: Sequence[HistogramPanel], title: str, path: Path) -> Path:
    """Overlaid step-outlined, lightly filled histograms with each sample's mean dashed."""
    figure, axes = _figure(len(panels), height=4.2)
    for axis, panel in zip(axes[0], panels, strict=True):
        bins = np.histogram_bin_edges(np.concatenate(list(panel.samples.values())), bins=30)
        colors = panel.colors or range(len(panel.samples))
        for color, (label, values) in zip(colors, panel.samples.items(), strict=True):
            mean = float(np.mean(values))
            kwargs = {"bins": bins, "color": f"C{color}"}
            axis.hist(values, alpha=0.25, **kwargs)
            axis.hist(
                values, histtype="step", linewidth=1.5, label=f"{label} (n={len(values)})", **kwargs
            )
            axis.axvline(mean, color=f"C{color}", linestyle="--", label=f"mean {mean:.3g}")
        if panel.zero_line:
            axis.axvline(0.0, color="black", linewidth=0.8)
        _finish_axis(axis, panel.title, panel.xlabel, "pairs", legend_columns=2)
    figure.suptitle(title)
    return _save(figure, path)


@dataclass(frozen=True)
class BucketBars:
    """One run's accuracy and mean margin per dispersion bucket (None: an empty bucket)."""

    label: str
    accuracy: Sequence[float | None]
    margin: Sequence[float | None]
    margin_sem: Sequence[float | None]
    """Standard error of each mean margin (None: not computable, drawn without a bar)."""
    pairs: Sequence[int]
    color: int = 0


def bucket_bars(runs: Sequence[BucketBars], ticks: Sequence[str], title: str, path: Path) -> Path:
    """Two panels of grouped bars, one group per bucket and one bar per run: implicit-reward
    accuracy (labelled with its pair count, chance marked) and mean margin with its standard
    error."""
    figure, axes = _figure(2, width=max(5.0, 0.8 * len(ticks) + 0.6 * len(runs)), height=4.4)
    positions = np.arange(len(ticks))
    width = 0.8 / len(runs)
    accuracy_axis, margin_axis = axes[0]
    for index, run in enumerate(runs):
        offsets = positions - 0.4 + width * (index + 0.5)
        accuracy = [np.nan if value is None else value for value in run.accuracy]
        bars = accuracy_axis.bar(offsets, accuracy, width, color=f"C{run.color}", label=run.label)
        counts = [f"n={count}" for count in run.pairs]
        accuracy_axis.bar_label(bars, labels=counts, fontsize="x-small", padding=1)
        margin = [np.nan if value is None else value for value in run.margin]
        errors = [0.0 if value is None else value for value in run.margin_sem]
        margin_axis.bar(
            offsets, margin, width, yerr=errors, capsize=3, color=f"C{run.color}", label=run.label
        )
    accuracy_axis.axhline(0.5, color="grey", linestyle=":", label="chance (0.5)")
    accuracy_axis.set_ylim(0, 1.12)
    accuracy_axis.set_ylabel("accuracy (chosen reward > rejected)")
    accuracy_axis.set_title("Held-out implicit-reward accuracy", fontsize="medium")
    margin_axis.axhline(0.0, color="black", linewidth=0.8)
    margin_axis.set_ylabel("mean reward margin ± s.e.")
    margin_axis.set_title("Held-out implicit-reward margin", fontsize="medium")
    for axis in (accuracy_axis, margin_axis):
        axis.set_xticks(positions, list(ticks), fontsize="small")
        axis.set_xlabel("reference entropy Hn(x) quintile (low Hn = low dispersion)")
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)
    figure.suptitle(title)
    return _save(figure, path)

"""What a ``raypo tune`` sweep leaves for the user: the trial table, the best config, plots.

Written into the sweep directory after every ``Tuner.fit`` (first run or ``--resume``):
``trials.csv`` and ``trials.md`` (every trial sorted by the metric, with its searched values,
status and, for a failed trial, its error), ``best_config.yaml`` (the sweep's config with the best
trial's values: ready for ``raypo train``, with its own run directory ``RUN_DIR-best``) and
``metric_vs_beta.png`` / ``metric_vs_dispersion_scale.png`` for those keys when they were searched.
The best trial is the best final metric among trials that trained to their end; trials stopped
early by ASHA count only when none did.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from ray.tune import ResultGrid

from raypo.config import RaypoConfig, save_config
from raypo.config_base import parse_search_expression
from raypo.run_layout import RunLayout
from raypo.tune.space import apply_params

PLOTTED_KEYS = {"loss.beta": "beta", "loss.dispersion_scale": "dispersion_scale"}
"""Searched keys that get a plot of the metric against them, and the plot's file-name part."""
_ERROR_CHARS = 300


@dataclass(frozen=True)
class TrialRow:
    """One trial of the sweep, as the table shows it."""

    trial_id: str
    """Tune's trial id; the trial's run directory is ``RUN_DIR/trials/<trial_id>``."""
    status: str
    """``completed``, ``stopped early`` (by the scheduler), ``error`` or ``unfinished``."""
    metric: float | None
    """The last value of the sweep's metric the trial reported; None = never reported."""
    params: dict[str, Any]
    """The searched keys' values."""
    step: int | None
    """Optimizer step of the last report."""
    error: str
    """For a failed trial, the last line of its error; else empty."""


@dataclass(frozen=True)
class SweepResult:
    """Where the sweep's results were written, and what they say."""

    rows: list[TrialRow]
    """Every trial, best first."""
    table: str
    """The trial table as Markdown (also in ``trials.md``)."""
    table_path: Path
    """``RUN_DIR/trials.md``."""
    best: TrialRow | None
    """The best trial (see the module docstring); None when no trial reported the metric."""
    best_config: Path | None
    """``RUN_DIR/best_config.yaml``; None without a best trial."""
    plots: list[Path]
    """The metric-vs-key plots written."""
    failed: int
    """Trials that ended in an error."""
    unfinished: int
    """Trials an interruption left running or pending."""


def _error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:_ERROR_CHARS]


def _status(result: Any, trial: RunLayout, has_metric: bool) -> str:
    if result.error is not None:
        return "error"
    if trial.trial_done.exists():
        return "completed"
    return "stopped early" if has_metric else "unfinished"


def trial_rows(config: RaypoConfig, grid: ResultGrid) -> list[TrialRow]:
    """The trials of ``grid``, best metric first (trials without the metric last)."""
    metric, keys = config.tune.metric, list(config.tune.search_space)
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        value = metrics.get(metric)
        value = float(value) if isinstance(value, int | float) else None
        trial_id = str(metrics["trial_id"])  # Tune sets it even before a trial's first report
        trial = RunLayout(config.run_path).trial(trial_id)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=_status(result, trial, value is not None),
                metric=value,
                params={key: result.config.get(key) for key in keys},
                step=int(metrics["step"]) if "step" in metrics else None,
                error=_error_line(result.error) if result.error is not None else "",
            )
        )
    sign = 1.0 if config.tune.mode == "min" else -1.0
    return sorted(rows, key=lambda r: (r.metric is None, sign * (r.metric or 0.0), r.trial_id))


def best_trial(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The first (best) completed row with a metric, else the first row with one."""
    scored = [row for row in rows if row.metric is not None and math.isfinite(row.metric)]
    completed = [row for row in scored if row.status == "completed"]
    return (completed or scored or [None])[0]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def write_tables(config: RaypoConfig, rows: Sequence[TrialRow]) -> str:
    """Write ``trials.csv`` (full precision) and ``trials.md``; returns the Markdown table."""
    keys = list(config.tune.search_space)
    header = ["trial", "status", config.tune.metric, *keys, "step", "error"]
    records = [
        [r.trial_id, r.status, r.metric, *(r.params[k] for k in keys), r.step, r.error]
        for r in rows
    ]
    layout = RunLayout(config.run_path)
    with layout.trials_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(["" if v is None else v for v in record] for record in records)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        cells = (_format(v).replace("|", "\\|") for v in record)
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    layout.trials_md.write_text(table, encoding="utf-8")
    return table


def write_best_config(config: RaypoConfig, best: TrialRow) -> Path:
    """The sweep's config with ``best``'s values, no tune section, run dir ``RUN_DIR-best``."""
    name = f"{config.name}-best"
    run_dir = config.run_path.with_name(config.run_path.name + "-best")
    best_config = apply_params(config, best.params, name, str(run_dir))
    return save_config(best_config, RunLayout(config.run_path).best_config)


def plot_metric(config: RaypoConfig, rows: Sequence[TrialRow], key: str, path: Path) -> Path:
    """Scatter of the metric against the searched ``key``, one colour per ``loss.type`` when it
    was searched; crosses mark trials stopped early."""
    scored = [r for r in rows if r.metric is not None and r.params.get(key) is not None]
    by_type = "loss.type" in config.tune.search_space
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    groups = sorted({str(r.params["loss.type"]) for r in scored}) if by_type else [""]
    for group in groups:
        for status, marker in (("completed", "o"), ("stopped early", "x")):
            members = [
                r
                for r in scored
                if (not by_type or str(r.params["loss.type"]) == group) and r.status == status
            ]
            if members:
                label = ", ".join(part for part in (group, status) if part)
                xs = [float(r.params[key]) for r in members]
                axes.scatter(xs, [r.metric for r in members], marker=marker, label=label)
    function, bounds = parse_search_expression(config.tune.search_space[key])
    if function == "loguniform":
        axes.set_xscale("log")
        axes.xaxis.set_minor_formatter(NullFormatter())
    if function in ("uniform", "loguniform"):
        axes.set_xlim(*bounds)  # the searched range, so the plot shows where trials fell in it
    axes.set_xlabel(key)
    axes.set_ylabel(config.tune.metric)
    axes.set_title(f"{config.name}: {len(scored)} trials")
    if scored:
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_results(config: RaypoConfig, grid: ResultGrid) -> SweepResult:
    """Write every result file of the sweep in ``config.run_path`` (see the module docstring)."""
    layout = RunLayout(config.run_path)
    rows = trial_rows(config, grid)
    table = write_tables(config, rows)
    best = best_trial(rows)
    best_config = write_best_config(config, best) if best is not None else None
    plots = [
        plot_metric(config, rows, key, layout.metric_plot(stem))
        for key, stem in PLOTTED_KEYS.items()
        if key in config.tune.search_space
    ]
    failed = sum(row.status == "error" for row in rows)
    unfinished = sum(row.status == "unfinished" for row in rows)
    return SweepResult(rows, table, layout.trials_md, best, best_config, plots, failed, unfinished)

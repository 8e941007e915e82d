"""The run report: ``RUN_DIR/eval/report.md`` with PNG plots, rebuilt from the files a run saved.

Inputs (each optional except the resolved config): ``metrics.jsonl`` (training curves, the
reference's likelihood accuracy, the policy's entropy and the length of its sampled completions
over training), ``heldout_pairs.jsonl`` (accuracy and margin per dispersion quintile, implicit
reward distributions), the reference pass Parquet (``ref_hn_*`` columns -> the dispersion weight
w(x)), ``final/mixdpo_strength.json`` (the learned beta distribution), ``eval/results.json`` and
``eval/samples.jsonl`` written by ``raypo eval`` (summary numbers, reward histograms, the
per-group table). Whatever is absent becomes an entry of the report's "Missing" section with the
reason, never a made-up number. ``raypo report RUN_DIR`` calls :func:`main` (with two or more run
directories it writes their comparison, :mod:`raypo.eval.compare`); ``raypo eval`` calls
:func:`build_report` after writing its results.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from raypo.config import RaypoConfig
from raypo.eval import plots
from raypo.eval.compare import (
    RUN_FIGURES,
    bucket_table,
    build_comparison,
    draw_figures,
    entropy_cell,
    label_runs,
)
from raypo.eval.run_files import (
    COMPLETION_TOKENS,
    METRICS,
    RESULTS,
    Figure,
    RunFiles,
    kl_text,
    last,
    na,
    no_reward_reason,
    num,
    pct,
    read_json,
    read_run,
    series,
    win_rate_text,
)
from raypo.objectives import OBJECTIVES
from raypo.run_layout import RunLayout

_CURVES = (
    ("Loss", "loss", {"train": "loss", "held-out": "eval/loss"}),
    (
        "Reward accuracy",
        "accuracy (chosen reward > rejected)",
        {
            "train": "rewards/accuracies",
            "held-out": "eval/rewards/accuracies",
            "reference likelihood (train)": "reference/accuracies",
            "reference likelihood (held-out)": "eval/reference/accuracies",
        },
    ),
    (
        "Reward margin",
        "reward(chosen) - reward(rejected)",
        {"train": "rewards/margins", "held-out": "eval/rewards/margins"},
    ),
)
"""(panel title, y label, {series label: metric name}) of training_curves.png."""


@dataclass
class _Report:
    """What the report accumulates while its sections are built (figures, tables, gaps)."""

    figures: list[Figure] = field(default_factory=list)
    group_table: list[str] = field(default_factory=list)
    bucket_table: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _training_curves(inputs: RunFiles, plots_dir: Path, report: _Report) -> None:
    if not inputs.metrics:
        report.missing.append(("Training curves", f"no {METRICS} in {inputs.layout.root}"))
        return
    panels = []
    for title, ylabel, names in _CURVES:
        logged = {label: series(inputs.metrics, name) for label, name in names.items()}
        logged = {label: points for label, points in logged.items() if points[0]}
        if logged:
            panels.append(plots.Panel(title, ylabel, logged))
    if not panels:
        reason = f"{METRICS} has no loss, rewards/accuracies or rewards/margins values"
        report.missing.append(("Training curves", reason))
        return
    path = plots.training_curves(panels, plots_dir / "training_curves.png")
    caption = (
        "Loss, implicit-reward accuracy and reward margin per logged optimizer step, on training "
        "batches and on the held-out pairs; dashed lines are the reference model's own "
        "likelihood accuracy."
    )
    report.figures.append(Figure("Training curves", f"{plots_dir.name}/{path.name}", caption))


def _reference_directory(config: RaypoConfig, run_path: Path) -> tuple[Path | None, str]:
    """The reference pass directory of this run, or None and why it is not available.

    The fingerprint is recomputed from the saved config; when it matches no pass (the data or a
    model changed since training) but the cache holds exactly one complete pass, that one is used
    and the report says so."""
    from raypo.data.reference import COMPLETE_MARKER, reference_fingerprint
    from raypo.models import ModelLoadError

    # {run_dir} in reference.cache_dir means the directory the run lives in now.
    located = dataclasses.replace(config, run_dir=str(run_path))
    cache = located.reference_cache_path
    try:
        directory = cache / reference_fingerprint(located)[:16]
    except (ModelLoadError, OSError) as error:
        directory, why = None, f"fingerprint not computable ({error})"
    else:
        why = f"no reference pass {directory.name} under {cache}"
    if directory is not None and (directory / COMPLETE_MARKER).exists():
        return directory, ""
    complete = sorted(marker.parent for marker in cache.glob(f"*/{COMPLETE_MARKER}"))
    if len(complete) == 1:
        return complete[0], f"{why}; used the only pass there, {complete[0].name}"
    return None, f"{why} (found {len(complete)} complete passes)"


def _dispersion_weights(inputs: RunFiles, report: _Report) -> dict[str, np.ndarray] | None:
    """w(x) per split from the reference pass, or None after noting why in ``report``."""
    import pyarrow.parquet as pq
    import torch

    from raypo.dispersion import dispersion_weight

    config = inputs.config
    if config.reference.mode != "precomputed":
        reason = (
            f"not available: reference.mode is {config.reference.mode}, so the reference "
            "entropies Hn were never saved"
        )
        report.missing.append(("Dispersion histogram", reason))
        return None
    directory, note = _reference_directory(config, inputs.layout.root)
    if directory is None:
        report.missing.append(("Dispersion histogram", note))
        return None
    if note:
        report.notes.append(f"Dispersion histogram: {note}.")
    weights = {}
    for split in ("train", "eval"):
        if (directory / split).is_dir():
            table = pq.read_table(directory / split, columns=["ref_hn_chosen", "ref_hn_rejected"])
            hn = [torch.tensor(table.column(name).to_numpy()) for name in table.column_names]
            weights[split] = dispersion_weight(*hn, scale=config.loss.dispersion_scale).numpy()
    weights = {split: values for split, values in weights.items() if len(values)}
    if not weights:
        report.missing.append(("Dispersion histogram", f"{directory} holds no pairs"))
        return None
    return weights


def _dispersion(inputs: RunFiles, plots_dir: Path, report: _Report) -> None:
    weights = _dispersion_weights(inputs, report)
    if weights is None:
        return
    loss = inputs.config.loss
    path = plots.dispersion_histogram(weights, loss.dispersion_scale, plots_dir / "dispersion.png")
    used = OBJECTIVES[loss.type].uses_dispersion
    role = "the weight the loss applied to each pair" if used else f"not used by loss {loss.type}"
    means = ", ".join(f"{split} {num(float(np.mean(w)))}" for split, w in weights.items())
    caption = (
        f"Distribution of the MallowsPO dispersion weight w(x) = -c ln Hn(x) (c = "
        f"{loss.dispersion_scale:g}) over the {' and '.join(weights)} pairs, from the reference "
        f"model's normalised entropies ({role}); dashed lines mark the means ({means})."
    )
    report.figures.append(
        Figure("Dispersion weight w(x)", f"{plots_dir.name}/{path.name}", caption)
    )


def _strength(inputs: RunFiles, plots_dir: Path, report: _Report) -> None:
    loss = inputs.config.loss
    title = "Learned MixDPO beta distribution"
    if not OBJECTIVES[loss.type].learns_strength:
        report.missing.append((title, f"loss.type is {loss.type}, which learns no distribution"))
        return
    source = inputs.layout.strength
    if not source.is_file():
        report.missing.append((title, f"no {source} (training did not finish?)"))
        return
    strength = read_json(source)
    cv = series(inputs.metrics, "mixdpo/cv")
    path = plots.strength_plot(
        strength, cv if cv[0] else None, loss.beta, plots_dir / "mixdpo_beta.png"
    )
    caption = (
        f"Density of the {strength['family']} distribution of the preference strength beta "
        f"learned by MixDPO (mean {num(strength['moments']['mean'])}, CV "
        f"{num(strength['moments']['cv'])})"
        + (", and its coefficient of variation over training." if cv[0] else ".")
    )
    report.figures.append(Figure(title, f"{plots_dir.name}/{path.name}", caption))


def _rewards(inputs: RunFiles, plots_dir: Path, report: _Report) -> None:
    title = "Reward distributions"
    if inputs.results is None or inputs.samples is None:
        layout = inputs.layout
        absent = layout.eval_results if inputs.results is None else layout.eval_samples
        report.missing.append((title, f"no {absent}: run `raypo eval`"))
        return
    scored = [
        (row["policy_reward"], row["baseline_reward"])
        for row in inputs.samples
        if row["policy_reward"] is not None and row["baseline_reward"] is not None
    ]
    if not scored:
        report.missing.append((title, no_reward_reason(inputs.results)))
        return
    policy, baseline = (np.asarray(side, dtype=np.float64) for side in zip(*scored, strict=True))
    heading = f"Reward-model scores, policy vs {inputs.results['baseline']}"
    heading += f"\nwin rate {win_rate_text(inputs.results)}"
    path = plots.reward_histograms(policy, baseline, heading, plots_dir / "rewards.png")
    caption = (
        f"Reward-model scores of the policy's and the baseline's completions for the same "
        f"{len(scored)} prompt samples, with each side's mean dashed."
    )
    report.figures.append(Figure(title, f"{plots_dir.name}/{path.name}", caption))


def _group_row(name: str, stats: Mapping[str, Any]) -> str:
    accuracy = "n/a (no pairs)" if stats["accuracy"] is None else pct(stats["accuracy"])
    margin = "n/a (no pairs)" if stats["margin_mean"] is None else num(stats["margin_mean"])
    spread = "n/a (no pairs)" if stats["margin_std"] is None else num(stats["margin_std"])
    return f"| {name} | {stats['pairs']} | {accuracy} | {margin} | {spread} |"


def _groups(inputs: RunFiles, plots_dir: Path, report: _Report) -> None:
    if inputs.results is None:
        reason = f"no {inputs.layout.eval_results}: run `raypo eval`"
        report.missing.append(("Per-group table", reason))
        return
    implicit = inputs.results["implicit_reward"]
    groups = implicit["groups"]
    report.group_table = [
        "| group | pairs | accuracy | margin mean | margin std |",
        "|---|---:|---:|---:|---:|",
        *(_group_row(name, stats) for name, stats in groups.items()),
        _group_row("**overall**", implicit["overall"]),
    ]
    if not groups:
        report.notes.append("Per-group table: the data has no group column (data.group_field).")
    plotted = {name: stats for name, stats in groups.items() if stats["accuracy"] is not None}
    if len(plotted) < 2:
        reason = f"{len(plotted)} group(s) with pairs; a bar plot needs at least 2"
        report.missing.append(("Per-group bar plot", reason))
        return
    path = plots.group_bars(
        list(plotted),
        [stats["accuracy"] for stats in plotted.values()],
        [stats["pairs"] for stats in plotted.values()],
        plots_dir / "groups.png",
    )
    caption = "Held-out implicit-reward accuracy of the policy against the reference per group."
    report.figures.append(Figure("Per-group accuracy", f"{plots_dir.name}/{path.name}", caption))


def _side_pair(results: Mapping[str, Any], key: str) -> str:
    """``policy / baseline`` of one generation statistic."""
    generation = results["generation"]
    values = [generation[side][key] for side in ("policy", "baseline")]
    return " / ".join(na("not computed") if v is None else num(v) for v in values)


def _held_out_accuracy(inputs: RunFiles) -> str:
    if inputs.results is not None:
        overall = inputs.results["implicit_reward"]["overall"]
        if overall["accuracy"] is not None:
            return f"{pct(overall['accuracy'])} ({overall['pairs']} pairs, {RESULTS})"
    logged = last(inputs.metrics, "eval/rewards/accuracies")
    if logged is None:
        return na(f"no held-out evaluation in {METRICS} and no {RESULTS}")
    return f"{pct(logged[1])} (step {logged[0]}, {METRICS})"


def _metric_text(inputs: RunFiles, name: str, fmt: Any) -> str:
    logged = last(inputs.metrics, name)
    if logged is None:
        return na(f"{name} not in {METRICS}")
    return f"{fmt(logged[1])} (step {logged[0]})"


def _eval_rows(results: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Summary rows that only ``raypo eval`` can fill."""
    if results is None:
        absent = na(f"no {RESULTS}: run `raypo eval`")
        return [("Win rate vs baseline", absent), ("KL(policy ‖ reference)", absent)]
    kl, rewards = results["kl"], results["rewards"]
    kl_cell = na("not computed") if kl is None else kl_text(kl)
    reward_text = (
        na(no_reward_reason(results))
        if rewards is None
        else f"{num(rewards['policy']['mean'])} / {num(rewards['baseline']['mean'])}"
    )
    sampling = results["sampling"]
    return [
        ("Win rate vs baseline", win_rate_text(results)),
        ("Mean reward, policy / baseline", reward_text),
        ("KL(policy ‖ reference)", kl_cell),
        ("Mean completion tokens, policy / baseline", _side_pair(results, "mean_tokens")),
        ("distinct-1, policy / baseline", _side_pair(results, "distinct_1")),
        ("distinct-2, policy / baseline", _side_pair(results, "distinct_2")),
        ("Completions per second, policy / baseline", _side_pair(results, "generations_per_s")),
        ("Baseline", f"{results['baseline']}"),
        ("Sampling backend", f"{results['backend']} ({results['backend_reason']})"),
        (
            "Sampling",
            f"{results['num_prompts']} prompts x n={sampling['n']}, temperature "
            f"{sampling['temperature']:g}, top_p {sampling['top_p']:g}, max_tokens "
            f"{sampling['max_tokens']}, seed {sampling['seed']}",
        ),
    ]


def _summary(inputs: RunFiles) -> list[str]:
    rows = [
        ("Held-out implicit-reward accuracy (policy vs reference)", _held_out_accuracy(inputs)),
        (
            "Reference likelihood accuracy (held-out)",
            _metric_text(inputs, "eval/reference/accuracies", pct),
        ),
        ("Final training loss", _metric_text(inputs, "loss", num)),
        ("Final held-out loss", _metric_text(inputs, "eval/loss", num)),
        ("Policy entropy Hn on the held-out completions", entropy_cell(inputs)),
        (
            "Mean tokens of the completions sampled during training",
            _metric_text(inputs, COMPLETION_TOKENS, num),
        ),
        *_eval_rows(inputs.results),
    ]
    return ["| quantity | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _header(inputs: RunFiles) -> list[str]:
    config = inputs.config
    loss, trainer = config.loss, config.trainer
    last_time = last(inputs.metrics, "time")
    trained = (
        datetime.fromtimestamp(last_time[1], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        if last_time
        else na(f"no {METRICS}")
    )
    last_step = last(inputs.metrics, "step")
    steps = f"{last_step[1]} logged" if last_step else na(f"no {METRICS}")
    if trainer.max_steps is not None:
        steps += f" (trainer.max_steps {trainer.max_steps})"
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# raypo report: {config.name}",
        "",
        f"Run directory `{inputs.layout.root}`; last metrics logged {trained}; "
        f"report built {built}.",
        "",
        f"Objective **{loss.type}**: {OBJECTIVES[loss.type].summary}.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| loss.type | {loss.type} |",
        f"| loss.beta | {loss.beta:g} |",
        f"| loss.dispersion_scale | {loss.dispersion_scale:g} |",
        f"| model | {config.model.name_or_path} ({config.model.dtype}) |",
        f"| reference.mode | {config.reference.mode} |",
        f"| steps | {steps} |",
        f"| workers x batch x accumulation | {trainer.num_workers} x "
        f"{trainer.per_device_batch_size} x {trainer.gradient_accumulation_steps} |",
        f"| learning rate | {trainer.learning_rate:g} ({trainer.lr_scheduler}) |",
    ]


def _markdown(inputs: RunFiles, report: _Report) -> str:
    lines = [*_header(inputs), "", "## Summary", "", *_summary(inputs), "", "## Plots", ""]
    for figure in report.figures:
        image = f"![{figure.title}]({figure.file})"
        lines += [f"### {figure.title}", "", image, "", figure.caption, ""]
    if report.bucket_table:
        title = "## Held-out accuracy and margin by dispersion quintile"
        lines += [title, "", *report.bucket_table, ""]
    if report.group_table:
        lines += ["## Per-group implicit-reward accuracy (held-out)", "", *report.group_table, ""]
    if report.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    lines += ["## Missing", ""]
    lines += [f"- **{name}**: {reason}" for name, reason in report.missing] or ["Nothing."]
    return "\n".join(lines) + "\n"


def build_report(run_path: Path, config: RaypoConfig | None = None) -> Path:
    """Write ``RUN_DIR/eval/report.md`` and ``RUN_DIR/eval/plots/*.png`` from the run's saved
    files.

    ``config`` defaults to the run's resolved config (pass it to apply command-line overrides such
    as a different ``loss.dispersion_scale``). Sections whose inputs are absent are listed under
    "Missing" with the reason. Returns the path of report.md.
    """
    layout = RunLayout(Path(run_path))
    inputs = read_run(layout, config)
    report = _Report()
    _training_curves(inputs, layout.eval_plots, report)
    runs = label_runs([inputs])
    report.figures += draw_figures(RUN_FIGURES, runs, layout.eval_plots, report.missing)
    report.bucket_table = bucket_table(runs)
    for section in (_dispersion, _strength, _rewards, _groups):
        section(inputs, layout.eval_plots, report)
    layout.eval_report.write_text(_markdown(inputs, report), encoding="utf-8")
    return layout.eval_report


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """``raypo report RUN_DIR``: rebuild RUN_DIR/eval/report.md; ``raypo report RUN_A RUN_B
    ...``: write their comparison (``--out``, default :func:`raypo.eval.compare.default_output`).
    Prints the path of the report written."""
    layouts = [RunLayout(Path(run_dir)) for run_dir in args.run_dirs]
    for layout in layouts:
        for required in (layout.config, layout.metrics):
            if not required.is_file():
                print(
                    f"raypo report: {layout.root} has no {required.name}; pass a run directory "
                    f"written by `raypo train` (it holds {layout.config.name} and {METRICS})",
                    file=sys.stderr,
                )
                return 1
    if len(layouts) > 1:
        out = None if args.out is None else Path(args.out)
        print(build_comparison([layout.root for layout in layouts], out))
    elif args.out is not None:
        print("raypo report: --out is for a comparison of two or more runs", file=sys.stderr)
        return 2
    else:
        print(build_report(layouts[0].root, config=config))
    return 0

"""Runs side by side (``raypo report RUN_A RUN_B ...``) and the figures of the policy in training.

The comparison of two or more runs (DPO against MallowsPO on the same data, say) is written to
its own directory, ``--out`` or by default ``compare-<A>-vs-<B>`` beside the runs: ``report.md``
with a table of headline numbers and, in ``plots/``,

- ``training_curves.png``: implicit-reward accuracy, margin and loss per run, on the training
  batches (dotted) and on the held-out pairs (points);
- ``policy_dynamics.png``: the policy's normalised entropy Hn on the held-out completions (the
  reference's dashed) and the mean length of the completions sampled during training;
- ``dispersion_buckets.png``: held-out accuracy and mean margin per quintile of the reference's
  Hn(x) (:mod:`raypo.eval.heldout`);
- ``implicit_rewards.png``: the held-out margins and the chosen and rejected rewards;
- ``reward_model.png``: ``raypo eval``'s reward-model scores of each policy's samples.

Each run is labelled with its directory and objective and keeps one colour in every figure; what a
run lacks is listed under "Missing" with the reason. The single-run report
(:mod:`raypo.eval.report`) draws its dynamics, bucket and reward figures with the same functions,
given one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from raypo.eval import plots
from raypo.eval.heldout import Bucket, HeldOut, dispersion_buckets
from raypo.eval.run_files import (
    COMPLETION_TOKENS,
    ENTROPY,
    METRICS,
    REFERENCE_ENTROPY,
    RESULTS,
    Figure,
    RunFiles,
    buckets_missing,
    entropy_missing,
    held_out_missing,
    kl_text,
    last,
    length_missing,
    na,
    no_reward_reason,
    num,
    pct,
    read_run,
    series,
    win_rate_text,
)
from raypo.objectives import OBJECTIVES
from raypo.run_layout import RunLayout

_MARKERS = ("o", "s", "^", "D", "v", "P")
"""Point markers of the runs' curves, in order."""

Missing = list[tuple[str, str]]
"""(section title, reason) of every figure or table part a run could not give."""

_CURVES = (
    ("Implicit-reward accuracy", "accuracy (chosen reward > rejected)", "rewards/accuracies"),
    ("Implicit-reward margin", "reward(chosen) - reward(rejected)", "rewards/margins"),
    ("Loss", "loss (each run's own objective)", "loss"),
)
"""(panel title, y label, metric) of the comparison's training curves."""


@dataclass(frozen=True)
class LabelledRun:
    """A run with its label and colour in the figures and tables."""

    label: str
    """``<directory name> (<loss.type>)``, or the name alone when it is the objective's."""
    run: RunFiles
    color: int
    """matplotlib colour-cycle index."""

    @property
    def marker(self) -> str:
        """The run's point marker in curves."""
        return _MARKERS[self.color % len(_MARKERS)]


def label_runs(runs: Sequence[RunFiles]) -> list[LabelledRun]:
    """Each run labelled with its directory's name and its objective (the name alone when it is
    the objective's); a name that two runs share gets the run's position."""
    names = [run.layout.root.name for run in runs]
    labelled = []
    for index, (name, run) in enumerate(zip(names, runs, strict=True)):
        tag = name if names.count(name) == 1 else f"{name} #{index + 1}"
        loss = run.config.loss.type
        label = tag if tag == loss else f"{tag} ({loss})"
        labelled.append(LabelledRun(label, run, index))
    return labelled


def _note(
    missing: Missing, title: str, runs: Sequence[LabelledRun], item: LabelledRun, why: str
) -> None:
    """Record that ``item`` lacks ``title``, naming the run when there are several."""
    missing.append((title, f"{item.label}: {why}" if len(runs) > 1 else why))


def curves_figure(runs: Sequence[LabelledRun], path: Path, missing: Missing) -> Path | None:
    """The comparison's training curves (module docstring); None when no run logged any."""
    panels = []
    for title, ylabel, name in _CURVES:
        lines = []
        for item in runs:
            train, held = series(item.run.metrics, name), series(item.run.metrics, f"eval/{name}")
            if train[0]:
                lines.append(plots.Line(f"{item.label} train", train, item.color, ":", ""))
            if held[0]:
                lines.append(
                    plots.Line(f"{item.label} held-out", held, item.color, "-", item.marker)
                )
        if lines:
            panels.append(plots.LinePanel(title, ylabel, lines))
    for item in runs:
        if not item.run.metrics:
            _note(missing, "Training curves", runs, item, f"no {METRICS} in {item.run.layout.root}")
    if not panels:
        return None
    title = "Training curves: training batches (dotted) and held-out pairs (points)"
    return plots.line_panels(panels, title, path)


def dynamics_figure(runs: Sequence[LabelledRun], path: Path, missing: Missing) -> Path | None:
    """Policy entropy and completion length over training; None when no run recorded either."""
    entropy, length = [], []
    for item in runs:
        metrics = item.run.metrics
        policy, reference = series(metrics, ENTROPY), series(metrics, REFERENCE_ENTROPY)
        if policy[0]:
            entropy.append(plots.Line(f"{item.label} policy", policy, item.color, "-", item.marker))
        else:
            _note(missing, "Policy entropy over training", runs, item, entropy_missing(item.run))
        if policy[0] and reference[0]:
            line = plots.Line(f"{item.label} reference", reference, item.color, "--", "")
            entropy.append(line)
        tokens = series(metrics, COMPLETION_TOKENS)
        if tokens[0]:
            length.append(plots.Line(item.label, tokens, item.color, "-", item.marker))
        else:
            title = "Completion length over training"
            _note(missing, title, runs, item, length_missing(item.run))
    panels = []
    if entropy:
        ylabel = "normalised entropy Hn (nats per token / ln V)"
        panels.append(plots.LinePanel("Entropy on the held-out completions", ylabel, entropy))
    if length:
        title = "Completions sampled during training"
        panels.append(plots.LinePanel(title, "mean completion length (tokens)", length))
    if not panels:
        return None
    return plots.line_panels(panels, "The policy over training", path)


def _with_buckets(
    runs: Sequence[LabelledRun], missing: Missing | None = None
) -> list[tuple[LabelledRun, list[Bucket]]]:
    """The runs whose held-out pairs have reference entropies, with their buckets; the others
    are noted in ``missing`` when it is given."""
    usable = []
    for item in runs:
        why = buckets_missing(item.run)
        if why is None:
            usable.append((item, dispersion_buckets(item.run.held_out)))
        elif missing is not None:
            _note(missing, "Accuracy by dispersion bucket", runs, item, why)
    return usable


def _same_buckets(usable: Sequence[tuple[LabelledRun, list[Bucket]]]) -> bool:
    """Whether every run's buckets hold the same Hn(x) ranges and pair counts (the same held-out
    pairs and reference)."""
    shapes = {tuple((b.hn_low, b.hn_high, b.pairs) for b in buckets) for _, buckets in usable}
    return len(shapes) == 1


def _range(bucket: Bucket) -> str:
    if bucket.hn_low is None or bucket.hn_high is None:
        return "empty"
    return f"{bucket.hn_low:.3f}-{bucket.hn_high:.3f}"


def bucket_figure(runs: Sequence[LabelledRun], path: Path, missing: Missing) -> Path | None:
    """Accuracy and margin per dispersion quintile; None when no run has reference entropies."""
    usable = _with_buckets(runs, missing)
    if not usable:
        return None
    bars = [
        plots.BucketBars(
            item.label,
            [b.accuracy for b in buckets],
            [b.margin_mean for b in buckets],
            [b.margin_sem for b in buckets],
            [b.pairs for b in buckets],
            item.color,
        )
        for item, buckets in usable
    ]
    first = usable[0][1]
    common = _same_buckets(usable)
    ticks = [f"Q{b.index + 1}" + (f"\n{_range(b)}" if common else "") for b in first]
    title = "Held-out pairs by the reference's entropy Hn(x) (Q1: most confident reference)"
    return plots.bucket_bars(bars, ticks, title, path)


def _margin_cell(bucket: Bucket) -> str:
    if bucket.margin_mean is None:
        return "n/a (no pairs)"
    if bucket.margin_sem is None:
        return num(bucket.margin_mean)
    return f"{num(bucket.margin_mean)} ± {num(bucket.margin_sem)}"


def bucket_table(runs: Sequence[LabelledRun]) -> list[str]:
    """Markdown table of accuracy and margin per dispersion quintile and run; [] without any.
    The Hn(x) range and pair count appear once when every run shares them."""
    usable = _with_buckets(runs)
    if not usable:
        return []
    common = _same_buckets(usable)
    columns = ["quintile", "Hn(x) range", "pairs"] if common else ["quintile"]
    for item, _ in usable:
        own = [] if common else [f"{item.label} Hn(x) range", f"{item.label} pairs"]
        columns += [*own, f"{item.label} accuracy", f"{item.label} margin ± s.e."]
    lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    for index in range(len(usable[0][1])):
        cells = [f"Q{index + 1}"]
        for position, (_, buckets) in enumerate(usable):
            bucket = buckets[index]
            if not common or position == 0:
                cells += [_range(bucket), str(bucket.pairs)]
            accuracy = na("no pairs") if bucket.accuracy is None else pct(bucket.accuracy)
            cells += [accuracy, _margin_cell(bucket)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rewards_figure(runs: Sequence[LabelledRun], path: Path, missing: Missing) -> Path | None:
    """Implicit rewards of the held-out pairs at each run's last evaluation: for one run its
    chosen and rejected rewards and its margins, for several the margins, the chosen and the
    rejected rewards with the runs overlaid. None when no run recorded its held-out pairs."""
    usable = []
    for item in runs:
        if item.run.held_out is None:
            _note(missing, "Implicit reward distributions", runs, item, held_out_missing(item.run))
        else:
            usable.append(item)
    if not usable:
        return None
    xlabel = "beta (log pi - log pi_ref)"
    margin_label = "reward(chosen) - reward(rejected)"
    colors = [item.color for item in usable]

    def by_run(value: Callable[[HeldOut], np.ndarray]) -> dict[str, np.ndarray]:
        return {item.label: value(item.run.held_out) for item in usable}

    margins = plots.HistogramPanel("Margins", margin_label, by_run(_margins), colors, True)
    if len(runs) == 1:
        held_out = usable[0].run.held_out
        sides = {"chosen": held_out.reward_chosen, "rejected": held_out.reward_rejected}
        # Green and red: apart from the run's own colour, which its margins keep.
        both = plots.HistogramPanel("Chosen and rejected completions", xlabel, sides, (2, 3))
        panels = [both, margins]
    else:
        panels = [
            margins,
            plots.HistogramPanel("Chosen completions", xlabel, by_run(_chosen), colors),
            plots.HistogramPanel("Rejected completions", xlabel, by_run(_rejected), colors),
        ]
    steps = ", ".join(sorted({str(item.run.held_out.step) for item in usable}))
    title = f"Implicit rewards of the held-out pairs (evaluation at step {steps})"
    return plots.histogram_panels(panels, title, path)


def _margins(held_out: HeldOut) -> np.ndarray:
    return held_out.margins


def _chosen(held_out: HeldOut) -> np.ndarray:
    return held_out.reward_chosen


def _rejected(held_out: HeldOut) -> np.ndarray:
    return held_out.reward_rejected


def _scores(run: RunFiles, side: str) -> np.ndarray | None:
    """``<side>_reward`` of every scored sample of ``raypo eval``; None when there are none."""
    values = [row[f"{side}_reward"] for row in run.samples or []]
    values = [value for value in values if value is not None]
    return np.asarray(values, dtype=np.float64) if values else None


def reward_model_figure(runs: Sequence[LabelledRun], path: Path, missing: Missing) -> Path | None:
    """Reward-model scores of each policy's samples and of the first scored run's baseline
    (left out when its samples carry no baseline scores)."""
    title = "Reward-model scores"
    samples, colors, baseline = {}, [], None
    for item in runs:
        scores = _scores(item.run, "policy")
        if scores is None:
            results = item.run.results
            why = (
                f"no {item.run.layout.eval_samples}: run `raypo eval`"
                if results is None or item.run.samples is None
                else no_reward_reason(results)
            )
            _note(missing, title, runs, item, why)
            continue
        samples[item.label], baseline = scores, baseline or item
        colors.append(item.color)
    if baseline is None:
        return None
    baseline_scores = _scores(baseline.run, "baseline")
    if baseline_scores is not None:
        samples[f"baseline ({baseline.run.results['baseline']})"] = baseline_scores
        colors.append(len(runs))
    panel = plots.HistogramPanel(
        "Policy samples and the baseline", "reward-model score", samples, colors
    )
    return plots.histogram_panels([panel], f"{title} of `raypo eval`'s samples", path)


def _logged(run: RunFiles, name: str, fmt: Callable[[float], str]) -> str:
    value = last(run.metrics, name)
    return na(f"not in {METRICS}") if value is None else f"{fmt(value[1])} (step {value[0]})"


def _steps_cell(item: LabelledRun) -> str:
    logged = last(item.run.metrics, "step")
    return na(f"no {METRICS}") if logged is None else str(logged[1])


def _objective(run: RunFiles) -> str:
    loss = run.config.loss
    text = f"{loss.type}, beta {loss.beta:g}"
    if OBJECTIVES[loss.type].uses_dispersion:
        text += f", dispersion scale {loss.dispersion_scale:g}"
    return text


def entropy_cell(run: RunFiles) -> str:
    """The policy's last held-out entropy Hn with its step and the reference's."""
    policy = last(run.metrics, ENTROPY)
    if policy is None:
        return na(f"{ENTROPY} not in {METRICS}")
    reference = last(run.metrics, REFERENCE_ENTROPY)
    tail = "" if reference is None else f"; reference {num(reference[1])}"
    return f"{num(policy[1])} (step {policy[0]}{tail})"


def _extreme_buckets(item: LabelledRun) -> str:
    usable = _with_buckets([item])
    if not usable:
        return na("no held-out pairs with the reference's entropies: see Missing")
    buckets = usable[0][1]
    cells = [na("no pairs") if b.accuracy is None else pct(b.accuracy) for b in buckets]
    return f"{cells[0]} / {cells[-1]}"


def _kl_cell(item: LabelledRun) -> str:
    results = item.run.results
    if results is None:
        return na(f"no {RESULTS}: run `raypo eval`")
    return na("not computed") if results["kl"] is None else kl_text(results["kl"])


def headline_table(runs: Sequence[LabelledRun]) -> list[str]:
    """The headline numbers, one column per run."""
    rows: list[tuple[str, Callable[[LabelledRun], str]]] = [
        ("objective", lambda item: _objective(item.run)),
        ("optimizer steps logged", _steps_cell),
        (
            "held-out implicit-reward accuracy",
            lambda item: _logged(item.run, "eval/rewards/accuracies", pct),
        ),
        ("held-out reward margin", lambda item: _logged(item.run, "eval/rewards/margins", num)),
        (
            "reference likelihood accuracy (held-out)",
            lambda item: _logged(item.run, "eval/reference/accuracies", pct),
        ),
        ("held-out loss (own objective)", lambda item: _logged(item.run, "eval/loss", num)),
        ("policy entropy Hn, held-out", lambda item: entropy_cell(item.run)),
        (
            "mean completion tokens during training",
            lambda item: _logged(item.run, COMPLETION_TOKENS, num),
        ),
        ("held-out accuracy, lowest / highest Hn(x) quintile", _extreme_buckets),
        ("win rate vs baseline (raypo eval)", lambda item: win_rate_text(item.run.results)),
        ("KL(policy ‖ reference) (raypo eval)", _kl_cell),
    ]
    header = "| quantity | " + " | ".join(item.label for item in runs) + " |"
    lines = [header, "|---" + "|---" * len(runs) + "|"]
    for name, cell in rows:
        lines.append(f"| {name} | " + " | ".join(cell(item) for item in runs) + " |")
    return lines


def default_output(run_dirs: Sequence[Path]) -> Path:
    """``compare-<A>-vs-<B>...`` in the deepest directory that holds all the runs."""
    parents = [str(Path(run).resolve().parent) for run in run_dirs]
    name = "compare-" + "-vs-".join(Path(run).resolve().name for run in run_dirs)
    return Path(os.path.commonpath(parents)) / name


@dataclass(frozen=True)
class FigureSpec:
    """One figure over runs: how it is drawn and what its caption says."""

    title: str
    file: str
    """PNG file name under plots/."""
    draw: Callable[[Sequence[LabelledRun], Path, Missing], Path | None]
    """Draws it to the path for the runs (None: no run had the inputs, each noted missing)."""
    caption: str


CURVES = FigureSpec(
    "Training curves",
    "training_curves.png",
    curves_figure,
    "Implicit-reward accuracy, reward margin and loss per logged optimizer step; dotted: the "
    "training batches, points: the held-out pairs. Each loss is the run's own objective, so "
    "losses of different objectives are not on one scale; rewards are beta (log pi - log "
    "pi_ref), never scaled by MallowsPO's dispersion.",
)
DYNAMICS = FigureSpec(
    "The policy over training",
    "policy_dynamics.png",
    dynamics_figure,
    "Left: the policy's normalised entropy Hn (mean next-token entropy over ln V) on the chosen "
    "and rejected completions of the held-out pairs at each held-out evaluation, the "
    "reference's dashed. Right: mean length in tokens of the completions the generation eval "
    "sampled for the same held-out prompts during training (eval.during_training_num_prompts).",
)
BUCKETS = FigureSpec(
    "Accuracy and margin by dispersion quintile",
    "dispersion_buckets.png",
    bucket_figure,
    "Held-out pairs at the last evaluation, cut into quintiles of the reference's normalised "
    "entropy Hn(x) = (Hn(y_w) + Hn(y_l)) / 2. Q1 holds the pairs the reference is most sure of "
    "(low dispersion, MallowsPO's largest weight w(x) = -c ln Hn(x)), Q5 the least. Error bars: "
    "standard error of the mean margin.",
)
REWARDS = FigureSpec(
    "Implicit reward distributions",
    "implicit_rewards.png",
    rewards_figure,
    "Implicit rewards beta (log pi - log pi_ref) of the held-out pairs at the last held-out "
    "evaluation; dashed lines mark the means, the black line a zero margin.",
)
REWARD_MODEL = FigureSpec(
    "Reward-model scores",
    "reward_model.png",
    reward_model_figure,
    "Reward-model scores of the completions `raypo eval` sampled from each policy and from the "
    "baseline, for the same prompts; dashed lines mark the means.",
)
RUN_FIGURES = (DYNAMICS, BUCKETS, REWARDS)
"""The figures the single-run report draws with this module (it has its own training curves and
reward-model histogram)."""


def draw_figures(
    specs: Sequence[FigureSpec], runs: Sequence[LabelledRun], plots_dir: Path, missing: Missing
) -> list[Figure]:
    """Draw each figure into ``plots_dir``; the figures drawn, for report.md."""
    figures = []
    for spec in specs:
        path = spec.draw(runs, plots_dir / spec.file, missing)
        if path is not None:
            figures.append(Figure(spec.title, f"{plots_dir.name}/{path.name}", spec.caption))
    return figures


def _runs_table(runs: Sequence[LabelledRun]) -> list[str]:
    lines = ["| run | directory | objective | model | workers x batch x accumulation |"]
    lines.append("|---|---|---|---|---|")
    for item in runs:
        config, trainer = item.run.config, item.run.config.trainer
        shape = (
            f"{trainer.num_workers} x {trainer.per_device_batch_size} x "
            f"{trainer.gradient_accumulation_steps}"
        )
        lines.append(
            f"| {item.label} | `{item.run.layout.root}` | {_objective(item.run)} | "
            f"{config.model.name_or_path} | {shape} |"
        )
    return lines


def build_comparison(run_dirs: Sequence[Path], out: Path | None = None) -> Path:
    """Write the comparison of the runs in ``run_dirs`` (``out``/report.md and ``out``/plots/,
    ``out`` defaulting to :func:`default_output`); returns the path of report.md.

    Raises:
        FileNotFoundError: a directory is not a run directory (no config.yaml).
    """
    runs = label_runs([read_run(RunLayout(Path(run))) for run in run_dirs])
    out = Path(out) if out is not None else default_output(run_dirs)
    plots_dir = out / "plots"
    missing: Missing = []
    figures = draw_figures(
        (CURVES, DYNAMICS, BUCKETS, REWARDS, REWARD_MODEL), runs, plots_dir, missing
    )
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# raypo comparison: " + " vs ".join(item.label for item in runs),
        "",
        f"Built {built} from the runs' saved files (`raypo report "
        + " ".join(str(run) for run in run_dirs)
        + "`).",
        "",
        *_runs_table(runs),
        "",
        "## Headline numbers",
        "",
        *headline_table(runs),
        "",
        "## Plots",
        "",
    ]
    for figure in figures:
        lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.file})", ""]
        lines += [figure.caption, ""]
    buckets = bucket_table(runs)
    if buckets:
        lines += ["## Held-out accuracy and margin by dispersion quintile", "", *buckets, ""]
    lines += ["## Missing", ""]
    lines += [f"- **{name}**: {reason}" for name, reason in missing] or ["Nothing."]
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report

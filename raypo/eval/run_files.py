"""A run directory's saved files, read once, and what the run report and the comparison share.

:mod:`raypo.eval.report` (one run, ``raypo report RUN_DIR``) and :mod:`raypo.eval.compare`
(runs side by side, ``raypo report RUN_A RUN_B``) read the same files: the resolved config,
``metrics.jsonl``, ``heldout_pairs.jsonl`` (per held-out pair, :mod:`raypo.eval.heldout`) and
``raypo eval``'s ``eval/results.json`` and ``eval/samples.jsonl``. Each absent input is None (or
empty), and the ``*_missing`` functions say why in the words both reports use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raypo.config import RaypoConfig, load_config
from raypo.eval.heldout import HeldOut, last_evaluation
from raypo.eval.plots import Series
from raypo.run_layout import RunLayout

METRICS = RunLayout(Path()).metrics.name
"""``metrics.jsonl``, as the reports' messages name it."""
RESULTS = RunLayout(Path()).eval_results.name
"""``results.json``, as the reports' messages name it."""

ENTROPY = "eval/entropy/policy"
"""The policy's mean normalised entropy Hn(x) on the held-out completions."""
REFERENCE_ENTROPY = "eval/entropy/reference"
"""The reference's, on the same pairs (constant over training)."""
COMPLETION_TOKENS = "eval/gen/mean_tokens"
"""Mean length of the completions the generation eval sampled during training."""


@dataclass(frozen=True)
class Figure:
    """One embedded plot of a report."""

    title: str
    file: str
    """Path relative to report.md."""
    caption: str


@dataclass(frozen=True)
class RunFiles:
    """The saved files of one run, read once."""

    layout: RunLayout
    config: RaypoConfig
    metrics: list[dict[str, Any]]
    """``metrics.jsonl``'s records; empty when there is none."""
    results: dict[str, Any] | None
    """``eval/results.json``."""
    samples: list[dict[str, Any]] | None
    """``eval/samples.jsonl``."""
    held_out: HeldOut | None
    """The last evaluation of ``heldout_pairs.jsonl``."""


def read_json(path: Path) -> Any:
    """The JSON document at ``path``; a malformed file is a ValueError naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        problem = f"{path}: not valid JSON ({error}); rerun the step that wrote it"
        raise ValueError(problem) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every JSON object of the JSONL file at ``path``, blank lines skipped; a malformed line
    is a ValueError naming the file and the line."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                problem = f"{path}:{number}: not valid JSON ({error}); rerun the step that wrote it"
                raise ValueError(problem) from None
    return records


def read_run(layout: RunLayout, config: RaypoConfig | None = None) -> RunFiles:
    """The files of the run at ``layout``; ``config`` replaces its saved config.yaml.

    Raises:
        FileNotFoundError: the directory has no config.yaml (it is not a run directory).
    """
    if not layout.config.is_file():
        raise FileNotFoundError(
            f"{layout.root} is not a raypo run directory: no {layout.config.name}; pass the "
            "directory `raypo train` wrote (its run_dir)"
        )
    results, samples, pairs = layout.eval_results, layout.eval_samples, layout.heldout_pairs
    return RunFiles(
        layout=layout,
        config=load_config(layout.config) if config is None else config,
        metrics=read_jsonl(layout.metrics) if layout.metrics.is_file() else [],
        results=read_json(results) if results.is_file() else None,
        samples=read_jsonl(samples) if samples.is_file() else None,
        held_out=last_evaluation(read_jsonl(pairs)) if pairs.is_file() else None,
    )


def series(metrics: list[dict[str, Any]], name: str) -> Series:
    """(steps, values) of ``name`` over the records that logged a finite value of it."""
    points = [(row["step"], row[name]) for row in metrics if row.get(name) is not None]
    return [step for step, _ in points], [value for _, value in points]


def last(metrics: list[dict[str, Any]], name: str) -> tuple[int, float] | None:
    """(step, value) of the last record with a value of ``name``."""
    steps, values = series(metrics, name)
    return (steps[-1], values[-1]) if steps else None


def pct(value: float) -> str:
    """0.625 -> ``62.5%``."""
    return f"{100 * value:.1f}%"


def num(value: float) -> str:
    """Four significant digits."""
    return f"{value:.4g}"


def na(reason: str) -> str:
    """A table cell for a value that is not available, with the reason."""
    return f"n/a ({reason})"


def held_out_missing(run: RunFiles) -> str:
    """Why the run has no per-pair held-out values."""
    return (
        f"no {run.layout.heldout_pairs.name} in {run.layout.root}: the run had no held-out "
        "evaluation (trainer.eval_steps, data.eval_fraction) or was trained before raypo "
        "recorded each held-out pair"
    )


def buckets_missing(run: RunFiles) -> str | None:
    """Why the run's held-out pairs cannot be cut into dispersion buckets; None when they can."""
    if run.held_out is None:
        return held_out_missing(run)
    if run.held_out.reference_hn is None:
        config = run.config
        return (
            f"the held-out pairs carry no reference entropy Hn: reference.mode is "
            f"{config.reference.mode} and loss.type {config.loss.type} does not use the "
            "dispersion, so the reference's entropies were never computed (reference.mode "
            "precomputed saves them for every objective)"
        )
    return None


def entropy_missing(run: RunFiles) -> str:
    """Why ``metrics.jsonl`` has no policy entropy."""
    return (
        f"{METRICS} has no {ENTROPY}: the run had no held-out evaluation (trainer.eval_steps, "
        "data.eval_fraction) or was trained before raypo measured the policy's entropy"
    )


def length_missing(run: RunFiles) -> str:
    """Why ``metrics.jsonl`` has no completion length over training."""
    prompts = run.config.eval.during_training_num_prompts
    if not prompts:
        return "no completions were sampled during training (eval.during_training_num_prompts 0)"
    return f"{METRICS} has no {COMPLETION_TOKENS} (no generation eval ran)"


def win_rate_text(results: Mapping[str, Any] | None) -> str:
    """``raypo eval``'s win rate with its interval, or n/a with the reason."""
    if results is None:
        return na(f"no {RESULTS}: run `raypo eval`")
    win = results["win_rate"]
    if win is None:
        return na(no_reward_reason(results))
    level = round(100 * win["confidence_level"])
    return (
        f"{pct(win['value'])} ({level}% CI {pct(win['ci_low'])} to {pct(win['ci_high'])}; "
        f"ties {pct(win['ties'])}; {win['num_pairs']} pairs)"
    )


def no_reward_reason(results: Mapping[str, Any]) -> str:
    """Why ``results`` (results.json) holds no reward-model scores."""
    if results["reward_model"] is None:
        return "no reward model configured (eval.reward_model is null)"
    return f"the reward model {results['reward_model']} produced no scores"


def kl_text(kl: Mapping[str, Any]) -> str:
    """results.json's KL estimate with its standard error."""
    if kl["std_error"] is None:
        spread = "standard error n/a (one prompt)"
    else:
        spread = f"± {num(kl['std_error'])} standard error"
    return f"{num(kl['mean'])} nats per completion ({spread}; {kl['num_samples']} completions)"

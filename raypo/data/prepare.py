"""Everything a run does before training, in one function: :func:`prepare`.

read -> validate -> tokenise (:mod:`raypo.data.pipeline`) -> the reference pass, when it is
precomputed (:mod:`raypo.data.reference`). ``raypo prepare`` runs it alone; ``raypo train`` runs
it and trains on what it returns; ``raypo tune`` runs it once for all the trials of a sweep. The
embedded tiny model's fit comes before it (:func:`raypo.train.run.fit_tiny_model`: a ``raypo
sft`` run), so the config given here already names the fitted model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from raypo.config import RaypoConfig
from raypo.console import is_terminal, stage
from raypo.data.pipeline import PreparedData, prepare_pairs
from raypo.data.reference import ReferencePass, run_reference_pass
from raypo.ray_runtime import data_progress_bars, init_ray


@dataclass(frozen=True)
class PreparedRun:
    """The data a training run reads: tokenised splits, with reference columns when
    precomputed."""

    data: PreparedData
    """Tokenised splits, rejects and summary under RUN_DIR."""
    reference: ReferencePass | None
    """The reference-annotated splits; None unless ``reference.mode`` is ``precomputed``."""
    seconds: dict[str, float]
    """Wall time of each stage: ``tokenise`` and ``reference`` (those that ran)."""

    def split_path(self, split: str) -> Path:
        """Where the trainer reads ``split`` from (annotated when precomputed)."""
        if self.reference is not None:
            return self.reference.split_path(split)
        return self.data.split_path(split)


def prepare(
    config: RaypoConfig,
    command: str = "prepare",
    reference_pass: bool = True,
    sft: bool = False,
) -> PreparedRun:
    """Run every stage before training for ``config`` on the current Ray cluster (started if
    needed), printing one line per stage as ``raypo COMMAND: ...``; see the module docstring.
    ``reference_pass`` False skips the precomputed reference pass (``raypo sft`` has no
    reference); ``sft`` reads the data for ``raypo sft`` (:func:`prepare_pairs`)."""
    init_ray()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    data = prepare_pairs(config, sft=sft)
    seconds["tokenise"] = time.perf_counter() - started
    stage(command, data_line(config, data, seconds["tokenise"]))
    reference = None
    if reference_pass and config.reference.mode == "precomputed":
        started = time.perf_counter()
        with data_progress_bars(is_terminal()):
            reference = run_reference_pass(config, data)
        seconds["reference"] = time.perf_counter() - started
        pairs = sum(data.split_counts.values())
        state = "reused from the cache" if reference.cache_hit else "computed"
        stage(
            command,
            f"reference pass: {pairs} pairs {state} in {seconds['reference']:.1f} s -> "
            f"{reference.directory}",
        )
    return PreparedRun(data, reference, seconds)


def data_line(config: RaypoConfig, data: PreparedData, seconds: float) -> str:
    """The data stage's line: rows read, accepted, rejected by reason, the split, the time."""
    summary = data.summary
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary.top_reasons())
    rejected = f"rejected {summary.rejected}"
    if summary.rejected:
        rejected += f" ({reasons}; see {data.rejects_path})"
    counts = data.split_counts
    return (
        f"data: read {summary.total} rows from {config.data.path}, accepted {summary.accepted}, "
        f"{rejected}; split {counts['train']} train / {counts['eval']} held out; tokenised in "
        f"{seconds:.1f} s"
    )


def prepare_report(run: PreparedRun) -> str:
    """What ``raypo prepare`` prints after its stage lines: the per-reason table and where the
    outputs are."""
    lines = [
        run.data.summary.format_table(),
        f"prepared data: {run.data.directory}",
        f"rejected rows: {run.data.rejects_path}",
        f"summary: {run.data.summary_path}",
    ]
    return "\n".join(lines)

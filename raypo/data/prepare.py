"""``raypo prepare``: read, validate and tokenise the data, then run the reference pass.

Also the first stage of ``raypo train``, which calls :func:`prepare` and trains on what it returns.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from raypo.config import RaypoConfig
from raypo.data.pipeline import PreparedData, prepare_pairs
from raypo.data.reference import ReferencePass, run_reference_pass
from raypo.data.validate import DataQualityError
from raypo.ray_runtime import init_ray


@dataclass(frozen=True)
class PreparedRun:
    """The data a training run reads: tokenised splits, with reference columns when precomputed."""

    data: PreparedData
    """Tokenised splits, rejects and summary under RUN_DIR."""
    reference: ReferencePass | None
    """The reference-annotated splits; None unless ``reference.mode`` is ``precomputed``."""
    seconds: dict[str, float]
    """Wall time of each stage: ``tokenise`` and ``reference``."""

    def split_path(self, split: str) -> Path:
        """Where the trainer reads ``split`` from (annotated when precomputed)."""
        if self.reference is not None:
            return self.reference.split_path(split)
        return self.data.split_path(split)


def prepare(config: RaypoConfig) -> PreparedRun:
    """Run the data stages of ``config`` on the current Ray cluster (started if needed)."""
    init_ray()
    started = time.perf_counter()
    data = prepare_pairs(config)
    seconds = {"tokenise": time.perf_counter() - started}
    reference = None
    if config.reference.mode == "precomputed":
        started = time.perf_counter()
        reference = run_reference_pass(config, data)
        seconds["reference"] = time.perf_counter() - started
    return PreparedRun(data, reference, seconds)


def _report(run: PreparedRun) -> str:
    summary = run.data.summary
    lines = [
        summary.format_table(),
        f"splits: train {run.data.split_counts['train']}, eval {run.data.split_counts['eval']}",
        f"tokenised {summary.total} rows in {run.seconds['tokenise']:.1f} s "
        f"({summary.total / max(run.seconds['tokenise'], 1e-9):.0f} rows/s)",
        f"prepared data: {run.data.directory}",
        f"rejected rows: {run.data.rejects_path}",
        f"summary: {run.data.summary_path}",
    ]
    if run.reference is not None:
        state = "reused (cache hit)" if run.reference.cache_hit else "computed"
        lines.append(
            f"reference pass {state} in {run.seconds['reference']:.1f} s: {run.reference.directory}"
        )
    return "\n".join(lines)


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo prepare``; prints the summary and where everything was written."""
    del args
    try:
        run = prepare(config)
    except DataQualityError as error:
        print(f"raypo prepare: {error}", file=sys.stderr)
        return 1
    print(_report(run))
    return 0

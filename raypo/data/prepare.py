"""Everything a run does before training, in one function: :func:`prepare`.

read -> validate -> tokenise (:mod:`raypo.data.pipeline`) -> the tiny model's fit, when the run
trains the embedded tiny model (:mod:`raypo.data.tiny_fit`) -> the reference pass, when it is
precomputed (:mod:`raypo.data.reference`). ``raypo prepare`` runs it alone; ``raypo train`` runs
it and trains on what it returns; ``raypo tune`` runs it once for all the trials of a sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from raypo.config import RaypoConfig
from raypo.data.pipeline import PreparedData, prepare_pairs, read_split
from raypo.data.reference import ReferencePass, run_reference_pass
from raypo.data.tiny_fit import fit_reference
from raypo.data.validate import DataQualityError
from raypo.models import TINY_NAME, load_tokenizer, resolve_model_path
from raypo.ray_runtime import init_ray
from raypo.run_layout import RunLayout

FIT_TEXTS = 2000
"""At most this many chosen dialogues are used to fit the tiny model."""


@dataclass(frozen=True)
class PreparedRun:
    """The data a training run reads: tokenised splits, with reference columns when precomputed,
    and the tiny model fitted to them."""

    data: PreparedData
    """Tokenised splits, rejects and summary under RUN_DIR."""
    reference: ReferencePass | None
    """The reference-annotated splits; None unless ``reference.mode`` is ``precomputed``."""
    fitted_model: Path | None
    """The embedded tiny model fitted to the chosen dialogues; None when the run brings its own
    model (or ``model.tiny_fit_steps`` is 0)."""
    seconds: dict[str, float]
    """Wall time of each stage: ``tokenise``, ``tiny_fit`` and ``reference`` (those that ran)."""

    def configure(self, config: RaypoConfig) -> RaypoConfig:
        """``config`` set to train on this preparation: the fitted tiny model (and its tokenizer)
        in place of the embedded one."""
        return _with_model(config, self.fitted_model)

    def split_path(self, split: str) -> Path:
        """Where the trainer reads ``split`` from (annotated when precomputed)."""
        if self.reference is not None:
            return self.reference.split_path(split)
        return self.data.split_path(split)


def prepare(config: RaypoConfig) -> PreparedRun:
    """Run every stage before training for ``config`` on the current Ray cluster (started if
    needed); see the module docstring."""
    init_ray()
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    data = prepare_pairs(config)
    seconds["tokenise"] = time.perf_counter() - started
    fitted_model = None
    if config.model.name_or_path == TINY_NAME and config.model.tiny_fit_steps > 0:
        started = time.perf_counter()
        fitted_model = fit_tiny(config, data)
        seconds["tiny_fit"] = time.perf_counter() - started
    reference = None
    if config.reference.mode == "precomputed":
        started = time.perf_counter()
        reference = run_reference_pass(_with_model(config, fitted_model), data)
        seconds["reference"] = time.perf_counter() - started
    return PreparedRun(data, reference, fitted_model, seconds)


def _with_model(config: RaypoConfig, fitted_model: Path | None) -> RaypoConfig:
    if fitted_model is None:
        return config
    fitted = str(fitted_model)
    model = dataclasses.replace(config.model, name_or_path=fitted, tokenizer_name_or_path=fitted)
    return dataclasses.replace(config, model=model)


def fit_tiny(config: RaypoConfig, data: PreparedData) -> Path:
    """Fit the embedded tiny model to the chosen dialogues so the reference is not random;
    returns the fitted model's directory (``RUN_DIR/tiny-fit``)."""
    model = config.model
    tokenizer = load_tokenizer(model.tokenizer_path, trust_remote_code=model.trust_remote_code)
    rows = read_split(data.split_path("train")).limit(FIT_TEXTS).take_all()
    texts = [tokenizer.decode(list(r["prompt_ids"]) + list(r["chosen_ids"])) for r in rows]
    return fit_reference(
        resolve_model_path(TINY_NAME),
        texts,
        RunLayout(config.run_path).tiny_fit,
        steps=config.model.tiny_fit_steps,
        max_length=config.data.max_length,
        seed=config.seed,
    )


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
    if run.fitted_model is not None:
        lines.append(f"tiny model fitted in {run.seconds['tiny_fit']:.1f} s: {run.fitted_model}")
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

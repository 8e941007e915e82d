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
from raypo.console import is_terminal, stage
from raypo.data.pipeline import PreparedData, prepare_pairs, read_split
from raypo.data.reference import ReferencePass, run_reference_pass
from raypo.data.tiny_fit import fit_reference, read_fit_report
from raypo.data.validate import DataQualityError
from raypo.models import TINY_NAME, load_tokenizer, resolve_model_path
from raypo.ray_runtime import data_progress_bars, init_ray
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
    fitted_model = None
    if config.model.name_or_path == TINY_NAME and config.model.tiny_fit_steps > 0:
        started = time.perf_counter()
        fitted_model = fit_tiny(config, data)
        seconds["tiny_fit"] = time.perf_counter() - started
        stage(command, tiny_fit_line(fitted_model, seconds["tiny_fit"]))
    reference = None
    if reference_pass and config.reference.mode == "precomputed":
        started = time.perf_counter()
        with data_progress_bars(is_terminal()):
            reference = run_reference_pass(_with_model(config, fitted_model), data)
        seconds["reference"] = time.perf_counter() - started
        pairs = sum(data.split_counts.values())
        state = "reused from the cache" if reference.cache_hit else "computed"
        stage(
            command,
            f"reference pass: {pairs} pairs {state} in {seconds['reference']:.1f} s -> "
            f"{reference.directory}",
        )
    return PreparedRun(data, reference, fitted_model, seconds)


def tiny_fit_line(fitted_model: Path, seconds: float) -> str:
    """The tiny fit's line: steps, texts, next-token loss before and after, time."""
    report = read_fit_report(fitted_model) or {}
    loss = ""
    if "loss_before" in report:
        loss = f", token loss {report['loss_before']:.2f} -> {report['loss_after']:.2f}"
    return (
        f"tiny fit: {report.get('steps', '?')} steps on {report.get('num_texts', '?')} chosen "
        f"dialogues{loss} in {seconds:.1f} s -> {fitted_model}"
    )


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
    """What ``raypo prepare`` prints after its stage lines: the per-reason table and where the
    outputs are."""
    lines = [
        run.data.summary.format_table(),
        f"prepared data: {run.data.directory}",
        f"rejected rows: {run.data.rejects_path}",
        f"summary: {run.data.summary_path}",
    ]
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

"""``raypo tune``: a Ray Tune sweep whose trials are raypo training runs.

The driver prepares what the trials share once (the tokenised pairs, the tiny model's fit, the
reference pass) when no searched key changes them, then runs a ``Tuner`` over a function trainable
(Ray Train V2's pattern): each trial applies its sampled ``section.field`` values to the config,
runs :func:`raypo.train.run.train` in its own run directory ``RUN_DIR/trials/<trial id>`` and
forwards every report holding ``tune.metric`` to Tune, so ASHA sees one result per held-out
evaluation. The trial only drives its Train workers, which reserve their own resources
(``trainer.num_workers`` x ``trainer.cpus_per_worker`` / a GPU each).

The sweep directory ``RUN_DIR`` holds ``config.yaml`` (what ``--resume`` reads), ``tune/`` (Tune's
experiment), ``trials/``, the shared ``prepared/``, ``tiny-fit/`` and ``reference/``, and the
results written by :mod:`raypo.tune.results`. ``raypo tune --resume RUN_DIR`` restores the
experiment: finished trials are kept, unfinished and failed ones continue from their last Train
checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, SearchAlgorithm, Searcher
from ray.tune.search.optuna import OptunaSearch

from raypo.config import ConfigError, RaypoConfig, save_config
from raypo.console import stage, verbose
from raypo.data.prepare import PreparedRun, prepare
from raypo.data.validate import DataQualityError
from raypo.ray_runtime import init_ray
from raypo.run_layout import RunLayout
from raypo.train.run import fit_tiny_model, train
from raypo.train.worker_plan import StepCallback
from raypo.tune.results import SweepResult, write_results
from raypo.tune.space import apply_params, search_domains

SHARED_SECTIONS = ("loss", "trainer", "eval", "model.lora")
"""Searched keys in these sections leave the data, the tiny fit and the reference unchanged, so
the driver prepares them once for all trials (the adapters exist only in training)."""
TRIAL_RESOURCES = {"cpu": 0, "memory": 2**30}
"""What a trial's own process reserves. It only drives its Train workers, which reserve their own
CPUs and GPUs, so it takes no CPU: on a 2-core Ray, 2 workers of 0.5 CPU then leave a whole CPU
for Ray Data's read tasks (1 CPU each), where any CPU share would stall them. The memory (the
process imports torch and transformers) also makes the request non-empty, which Tune requires."""


@dataclass(frozen=True)
class SweepPlan:
    """What every trial starts from."""

    base: RaypoConfig
    """The sweep's config, set to train on the shared preparation (the fitted tiny model)."""
    prepared: PreparedRun | None
    """The shared :class:`raypo.data.prepare.PreparedRun`; None = each trial prepares its own."""
    step_callbacks: tuple[StepCallback, ...] = ()
    """Run on every trial's workers after each optimizer step (:func:`raypo.train.run.train`)."""


def _check_sweep(config: RaypoConfig) -> None:
    tune_config = config.tune
    if not tune_config.search_space:
        problem = "is empty: give at least one dotted key, e.g. loss.beta: loguniform(0.01, 1.0)"
        raise ConfigError("tune.search_space", {}, problem)
    for key in ("name", "run_dir"):
        if key in tune_config.search_space:
            problem = "is set by the sweep for each trial and cannot be searched"
            raise ConfigError(f"tune.search_space.{key}", tune_config.search_space[key], problem)
    if tune_config.metric.startswith("eval/") and config.trainer.eval_steps == 0:
        problem = (
            f"tune.metric {tune_config.metric!r} is a held-out metric, reported every "
            "trainer.eval_steps; set trainer.eval_steps so each trial reports it a few times"
        )
        raise ConfigError("trainer.eval_steps", 0, problem)


def shares_preparation(key: str) -> bool:
    """Whether trials that differ only in the searched ``key`` can share one preparation (the
    key is in one of :data:`SHARED_SECTIONS`)."""
    return any(key.startswith(f"{section}.") for section in SHARED_SECTIONS)


def plan_sweep(config: RaypoConfig, step_callbacks: Sequence[StepCallback] = ()) -> SweepPlan:
    """Prepare what the trials share in the sweep directory, once (see the module docstring)."""
    per_trial = [k for k in config.tune.search_space if not shares_preparation(k)]
    if per_trial:
        print(
            f"raypo tune: {', '.join(per_trial)} may change the data, the tiny model's fit or "
            "the reference pass, so every trial prepares its own"
        )
        return SweepPlan(config, None, tuple(step_callbacks))
    config = fit_tiny_model(config, "tune")
    prepared = prepare(config, command="tune")
    return SweepPlan(config, prepared, tuple(step_callbacks))


class MetricReportCallback(TuneReportCallback):
    """Forwards to Tune only the Train reports that hold ``metric``: Tune checks every result for
    it, and ASHA's time unit becomes one held-out evaluation."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint) -> None:
        """Ray Train's hook, called on its controller after each report of the workers."""
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(params: dict[str, Any], plan: SweepPlan) -> None:
    """Tune's function trainable: one training run with ``params`` applied to the plan's base.

    A restored trial finds its Train checkpoints in its run directory and continues from them.
    """
    metric = plan.base.tune.metric
    trial_id = tune.get_context().get_trial_id()
    trial = RunLayout(plan.base.run_path).trial(trial_id)
    run_dir = trial.root
    config = apply_params(plan.base, params, f"{plan.base.name}-{trial_id}", str(run_dir))
    callbacks = [MetricReportCallback(metric)]
    run_dir.mkdir(parents=True, exist_ok=True)
    # The trial's stage and progress lines go to its own log: the sweep's console holds one line
    # per trial as it ends (TrialLines).
    with trial.console_log.open("a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        result = train(
            config,
            resume=True,
            callbacks=callbacks,
            prepared=plan.prepared,
            step_callbacks=plan.step_callbacks,
        )
    value = result.metrics.get(metric)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise RuntimeError(
            f"the training run reported no finite {metric!r} (got {value!r}); "
            "check tune.metric and trainer.eval_steps"
        )
    trial.trial_done.write_text(f"{metric}: {value}\n", encoding="utf-8")


class TrialLines(tune.Callback):
    """Prints one line per trial as it ends (Tune's own status tables only with --verbose)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.ended = 0

    def _line(self, trial: Any, outcome: str) -> None:
        self.ended += 1
        params = " ".join(f"{key}={_short(value)}" for key, value in trial.config.items())
        stage("tune", f"trial {self.ended} ({trial.trial_id}) {outcome} | {params}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune's hook: a trial finished or was stopped by the scheduler."""
        value = (trial.last_result or {}).get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "n/a"
        iterations = (trial.last_result or {}).get("training_iteration", 0)
        self._line(trial, f"ended after {iterations} evaluation(s): {self.metric} {shown}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Tune's hook: a trial raised."""
        self._line(trial, f"failed (see {trial.path})")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _scheduler(config: RaypoConfig) -> TrialScheduler:
    """ASHA over held-out evaluations (``training_iteration`` counts the reports that hold the
    metric), or Tune's FIFO."""
    tune_config = config.tune
    if tune_config.scheduler == "none":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        grace_period=tune_config.grace_period,
        reduction_factor=tune_config.reduction_factor,
        # Rungs sit at grace_period * reduction_factor**k reports; with this off, ASHA's max_t
        # (its default, 100) only bounds them and never ends a trial that is still improving.
        stop_last_trials=False,
    )


def _search_alg(config: RaypoConfig) -> SearchAlgorithm | Searcher:
    """Seeded random / grid variants, or Optuna's TPE (limited to the concurrent trials)."""
    tune_config = config.tune
    if tune_config.search_alg == "optuna":
        optuna = OptunaSearch(seed=config.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=tune_config.max_concurrent_trials)
    return BasicVariantGenerator(
        max_concurrent=tune_config.max_concurrent_trials, random_state=config.seed
    )


def _check_experiment(config: RaypoConfig, resume: bool) -> None:
    """Refuse to resume nothing, or to start a second sweep over an existing one."""
    experiment = RunLayout(config.run_path).tune
    if resume and not tune.Tuner.can_restore(str(experiment)):
        raise SystemExit(f"raypo tune: no Tune experiment to resume in {experiment}")
    if not resume and experiment.exists():
        raise SystemExit(
            f"raypo tune: {experiment} already holds a sweep; continue it with "
            f"`raypo tune --resume {config.run_path}` or choose another --run_dir or --name"
        )


def _tuner(config: RaypoConfig, plan: SweepPlan, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(partial(run_trial, plan=plan), TRIAL_RESOURCES)
    if resume:
        experiment = str(RunLayout(config.run_path).tune)
        return tune.Tuner.restore(experiment, trainable, resume_errored=True)
    tune_config = config.tune
    return tune.Tuner(
        trainable,
        param_space=search_domains(tune_config),
        tune_config=tune.TuneConfig(
            metric=tune_config.metric,
            mode=tune_config.mode,
            search_alg=_search_alg(config),
            scheduler=_scheduler(config),
            num_samples=tune_config.num_samples,
        ),
        run_config=tune.RunConfig(
            name=RunLayout(config.run_path).tune.name,
            storage_path=str(config.run_path),
            verbose=None if verbose() else 0,
            callbacks=[TrialLines(tune_config.metric)],
        ),
    )


def run_sweep(
    config: RaypoConfig, resume: bool = False, step_callbacks: Sequence[StepCallback] = ()
) -> SweepResult:
    """Run (or, with ``resume``, continue) the sweep in ``config.run_path``; write and return
    its results. ``step_callbacks`` run on every trial's workers after each optimizer step."""
    config = dataclasses.replace(config, run_dir=str(config.run_path.resolve()))
    _check_sweep(config)
    _check_experiment(config, resume)
    init_ray()
    save_config(config, RunLayout(config.run_path).config)
    plan = plan_sweep(config, step_callbacks)
    grid = _tuner(config, plan, resume).fit()
    return write_results(config, grid)


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo tune``: 0 when every trial ended, 1 when some failed or the sweep
    was interrupted."""
    resume = getattr(args, "resume", None)
    if resume:
        config = dataclasses.replace(config, run_dir=str(Path(resume).resolve()))
    try:
        result = run_sweep(config, resume=bool(resume))
    except DataQualityError as error:
        print(f"raypo tune: {error}", file=sys.stderr)
        return 1
    print(result.table)
    if result.best_config is not None:
        print(
            f"best config: {result.best_config}  (run it with `raypo train {result.best_config}`)"
        )
    if result.failed or result.unfinished:
        print(
            f"raypo tune: {result.failed} trial(s) failed and {result.unfinished} did not finish "
            f"(see {result.table_path}); go on with `raypo tune --resume {config.run_path}`",
            file=sys.stderr,
        )
        return 1
    return 0

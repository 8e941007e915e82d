"""``raypo train``: fit the tiny model if asked, prepare the data, then run Ray Train.

The driver fits the embedded tiny model first when ``model.tiny_fit_steps`` asks for it (a
``raypo sft`` run of this same driver: :func:`fit_tiny_model`), runs every stage before training
(:func:`raypo.data.prepare.prepare`: data, reference pass), writes the resolved config to
``RUN_DIR/config.yaml`` and launches a ``TorchTrainer`` whose workers run
:func:`raypo.train.loop.train_worker` on one :class:`raypo.train.worker_plan.WorkerPlan`. Ray Train
keeps its checkpoints under ``trainer.storage_path`` (default ``RUN_DIR/ray``); a run restarted
with the same storage path and name (``raypo train --resume RUN_DIR``) continues from the newest
whole one, with the run's own settings (:mod:`raypo.train.resume`), and worker failures restart
from the latest automatically up to ``trainer.max_failures`` times.

One run writes a run directory at a time: :class:`raypo.run_lock.RunLock` is taken before
anything is written and released on every way out; a local Ray started here is stopped on every
way out too (:func:`raypo.ray_runtime.local_ray`). Ctrl-C (or SIGTERM to ``raypo train``) ends
with a message naming the last whole checkpoint and the ``--resume`` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow.fs
import ray.train
import ray.util
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypo.config import RaypoConfig, config_to_dict, load_config, save_config
from raypo.console import is_terminal, ray_train_log_level, stage
from raypo.data.pipeline import apply_row_order, read_split
from raypo.data.prepare import PreparedRun, prepare
from raypo.data.validate import DataQualityError
from raypo.forward import padding_free_layout
from raypo.models import resolve_model_path
from raypo.preflight import check_resources, resource_warnings
from raypo.ray_runtime import local_ray
from raypo.run_layout import RunLayout
from raypo.run_lock import RunLock
from raypo.train.batches import pad_for_equal_split
from raypo.train.generation_eval import select_prompts
from raypo.train.metrics import MetricsLogger, TrackerRun, read_metrics
from raypo.train.progress import ProgressMonitor, summary_lines
from raypo.train.resume import (
    ResumePoint,
    describe,
    find_resume_point,
    last_whole_checkpoint,
    remove_unregistered,
    resumed_config,
    with_resume_point,
)
from raypo.train.schedule import total_training_steps
from raypo.train.sft import (
    SFT,
    needs_tiny_fit,
    read_tiny_fit,
    tiny_fit_config,
    tiny_fit_fingerprint,
    with_model,
    write_tiny_fit,
)
from raypo.train.worker_plan import PREFERENCE, Recipe, StepCallback, WorkerPlan

logger = logging.getLogger(__name__)


class MetricsCallback(ray.train.UserCallback):
    """Writes rank 0's reports to RUN_DIR/metrics.jsonl and the trackers (controller side; the
    driver's :class:`raypo.train.progress.ProgressMonitor` prints them)."""

    def __init__(self, run_path: Path, report_to: list[str], tracker: TrackerRun) -> None:
        self.run_path = run_path
        self.report_to = report_to
        self.tracker = tracker
        self.logger: MetricsLogger | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint) -> None:
        # Created on Ray Train's controller: the callback is pickled, and a logger holds a file.
        if self.logger is None:
            self.logger = MetricsLogger(self.run_path, self.report_to, True, self.tracker)
        values = dict(metrics[0])
        step = int(values.pop("step"))
        epoch = values.pop("epoch", None)
        if values:
            self.logger.log(step, values, epoch=epoch)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished run put its outputs."""

    run_path: Path
    """RUN_DIR."""
    final_dir: Path
    """The exported policy (HF format)."""
    metrics: dict[str, Any]
    """The last metrics reported."""


def _storage(config: RaypoConfig) -> str:
    """Ray Train's storage path: a URI (``s3://``, ``gs://``, ...) as given, else an absolute
    directory (default ``RUN_DIR/ray``)."""
    storage = config.trainer.storage_path
    if storage and "://" in storage:
        return storage
    return str(Path(storage or RunLayout(config.run_path).ray).resolve())


def _has_checkpoints(storage: str, name: str) -> bool:
    """Whether Ray Train's run ``name`` under ``storage`` (a directory or URI) has checkpoints."""
    filesystem, base = pyarrow.fs.FileSystem.from_uri(storage)
    selector = pyarrow.fs.FileSelector(f"{base.rstrip('/')}/{name}", allow_not_found=True)
    return any(
        info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
        for info in filesystem.get_file_info(selector)
    )


def _refuse_accidental_resume(config: RaypoConfig, resume: bool) -> None:
    storage = _storage(config)
    if not resume and _has_checkpoints(storage, config.name):
        existing = f"{storage.rstrip('/')}/{config.name}"
        raise SystemExit(
            f"raypo train: {existing} already holds checkpoints of a run named {config.name!r}; "
            f"continue it with `raypo train --resume {config.run_path}` or choose another "
            "--run_dir or --name"
        )


def ingest_config(dataset_names: list[str], preserve_order: bool) -> ray.train.DataConfig:
    """Ray Train's split of ``dataset_names`` over the workers; the same on every run when
    ``preserve_order``.

    ``streaming_split`` hands each block to whichever worker has received the fewest rows. With
    Ray Data's default execution blocks arrive in completion order and locality hints move them
    between workers, so two runs with the same seed trained different pairs on each rank at each
    step (held-out accuracy 0.49 vs 0.59 after 10 quickstart steps). Preserving the order (which
    also turns the locality hints off) makes the assignment a function of the shuffled row order
    alone, which the seed fixes.
    """
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return ray.train.DataConfig(datasets_to_split=dataset_names, execution_options=options)


def _generation_eval_inputs(config: RaypoConfig, eval_path: Path, eval_pairs: int) -> dict:
    """The plan's entries for the during-training generation eval: its prompts and the file
    rank 0 appends the completions to (nothing when it is off, or, like every held-out
    evaluation, when the run has no held-out pairs)."""
    num_prompts = config.eval.during_training_num_prompts
    if not num_prompts:
        return {}
    if not eval_pairs:
        logger.warning(
            "eval.during_training_num_prompts is %d but the run has no held-out pairs: no "
            "generation eval (set data.eval_fraction > 0 or data.eval_split)",
            num_prompts,
        )
        return {}
    rows = read_split(eval_path).select_columns(["id", "prompt_ids"]).take_all()
    return {
        "generation_prompts": tuple(select_prompts(rows, num_prompts)),
        "generations_path": str(RunLayout(config.run_path).generations),
    }


def _datasets(config: RaypoConfig, prepared: PreparedRun) -> dict[str, ray.data.Dataset]:
    """The train split (shuffled by the seed) and the eval split, each padded so that an equal
    split over the workers drops no pair (:func:`raypo.train.batches.pad_for_equal_split`)."""
    counts, world_size = prepared.data.split_counts, config.trainer.num_workers
    apply_row_order(config.data)
    train_split = read_split(
        prepared.split_path("train"), shuffle_seed=config.seed if config.data.shuffle else None
    )
    datasets = {"train": pad_for_equal_split(train_split, counts["train"], world_size)}
    if counts["eval"]:
        eval_split = read_split(prepared.split_path("eval"))
        datasets["eval"] = pad_for_equal_split(eval_split, counts["eval"], world_size)
    if ray.util.get_current_placement_group() is None:
        # Read, sorted and padded once here, while no worker holds CPUs (blocks in the object
        # store, spilled to disk when it is full): every epoch takes the same order, and Ray
        # Data's tasks (1 CPU each) never wait behind workers that hold most CPUs, as one worker
        # with 1.5 of 2 CPUs would, forever. Not inside a Tune trial: its placement group has no
        # CPU bundle for these tasks, so there Ray Train's split coordinator runs them.
        datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
    return datasets


def _worker_plan(
    config: RaypoConfig,
    prepared: PreparedRun,
    step_callbacks: Sequence[StepCallback],
    recipe: Recipe,
) -> WorkerPlan:
    counts, trainer = prepared.data.split_counts, config.trainer
    layout = RunLayout(config.run_path)
    return WorkerPlan(
        config=config,
        total_steps=total_training_steps(counts["train"], trainer, trainer.num_workers),
        total_pairs=math.ceil(counts["train"] * trainer.num_epochs),
        policy_path=resolve_model_path(config.model.name_or_path),
        reference_path=resolve_model_path(config.reference_model_path),
        tokenizer_path=resolve_model_path(config.model.tokenizer_path),
        final_dir=str(layout.final),
        has_eval=counts["eval"] > 0,
        heldout_pairs_path=str(layout.heldout_pairs) if counts["eval"] else None,
        step_callbacks=tuple(step_callbacks),
        micro_step=recipe.micro_step,
        **_generation_eval_inputs(config, prepared.split_path("eval"), counts["eval"]),
    )


def _print_plan(
    config: RaypoConfig, plan: WorkerPlan, prepared: PreparedRun, recipe: Recipe
) -> None:
    """The training stage's line: pairs (SFT: rows), steps, batch, epochs, workers and forward
    layout."""
    counts, trainer = prepared.data.split_counts, config.trainer
    rows = "rows" if recipe.sft_data else "pairs"
    layout = padding_free_layout(
        trainer.padding_free, config.model.attn_implementation, trainer.zero_stage == 3
    )
    per_step = trainer.num_workers * trainer.per_device_batch_size
    per_step *= trainer.gradient_accumulation_steps
    epochs = plan.total_steps * per_step / max(1, counts["train"])
    stage(
        recipe.command,
        f"plan: {counts['train']} training {rows}, {counts['eval']} held out; "
        f"{plan.total_steps} steps of {per_step} {rows} ({trainer.num_workers} workers x "
        f"{trainer.per_device_batch_size} x {trainer.gradient_accumulation_steps} accumulated), "
        f"{epochs:.2f} epochs; {'GPU' if trainer.use_gpu else 'CPU'} workers, ZeRO-"
        f"{trainer.zero_stage}, forward layout {layout}",
    )


def _check_cluster(config: RaypoConfig) -> None:
    """Requests beyond the cluster fail here, before any data work (:mod:`raypo.preflight`)."""
    check_resources(config, ray.cluster_resources())
    for warning in resource_warnings(config):
        stage("train", f"warning: {warning}")


def _tracker(config: RaypoConfig) -> TrackerRun:
    trainer = config.trainer
    return TrackerRun(
        project=trainer.tracker_project,
        name=trainer.tracker_run_name or config.name,
        tags=tuple(trainer.tracker_tags),
        config=config_to_dict(config),
    )


def _check_storage_writable(config: RaypoConfig) -> None:
    """A local ``trainer.storage_path`` that cannot be written fails here, before Ray starts,
    not in a worker's first checkpoint (the run directory itself is checked by its lock)."""
    storage = _storage(config)
    if "://" in storage:
        return
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=storage):
            pass
    except OSError as error:
        raise SystemExit(
            f"raypo train: cannot write the checkpoint storage {storage}: "
            f"{error.strerror or error}; set a writable --trainer.storage_path"
        ) from error


def _resume_settings(config: RaypoConfig) -> RaypoConfig:
    """The run's saved settings with the safe changes of ``config`` (:mod:`raypo.train.resume`);
    ``config`` itself when the run saved none yet (a first attempt given ``--resume``)."""
    saved = RunLayout(config.run_path).config
    if not saved.exists():
        return config
    return resumed_config(load_config(saved), config, str(saved))


def _interrupted(config: RaypoConfig, command: str) -> SystemExit:
    """Ctrl-C's last word: where the run can continue from, and how (``raypo COMMAND``)."""
    storage = _storage(config)
    remove_unregistered(storage, config.name)
    info = last_whole_checkpoint(storage, config.name)
    where = "no checkpoint yet" if info is None else f"last checkpoint: step {info.step}"
    again = f"raypo {command} --resume {config.run_path}"
    if not RunLayout(config.run_path).config.exists():
        # Nothing saved to resume from yet: the command needs its CONFIG again.
        again = f"raypo {command} CONFIG --resume {config.run_path}"
    print(f"\nraypo {command}: interrupted ({where}). Continue with:\n  {again}", file=sys.stderr)
    return SystemExit(130)


def train(
    config: RaypoConfig,
    resume: bool = False,
    callbacks: Sequence[ray.train.UserCallback] = (),
    prepared: PreparedRun | None = None,
    step_callbacks: Sequence[StepCallback] = (),
    recipe: Recipe = PREFERENCE,
) -> TrainResult:
    """Run the whole training job described by ``config`` (see the module docstring).

    ``callbacks`` are added to Ray Train's (``raypo tune`` passes the one reporting to Tune);
    ``prepared``: the stages before training, already run from the same data, model and reference
    settings (a sweep prepares once for all its trials), used instead of preparing again into
    this run's directory; ``step_callbacks`` run on every worker after each optimizer step
    (:data:`raypo.train.worker_plan.StepCallback`). ``resume``: continue the run in
    ``config.run_path`` with its saved settings (``config`` may change only the safe ones) from
    its newest whole checkpoint, or start it when it has none. ``recipe``: the step the
    workers run (``raypo sft`` passes its own).
    """
    if prepared is not None and needs_tiny_fit(config):
        raise ValueError(
            "train(prepared=...) needs the config its preparation was made for: "
            "fit_tiny_model(config) first, then prepare"
        )
    config = dataclasses.replace(config, run_dir=str(config.run_path.resolve()))
    with RunLock(config.run_path, f"raypo {recipe.command}"):
        if resume:
            config = _resume_settings(config)
        _check_storage_writable(config)
        _refuse_accidental_resume(config, resume)
        point = ResumePoint(None)
        if resume:
            point = find_resume_point(_storage(config), config.name, config.trainer.num_workers)
            print(describe(point, str(config.run_path)), flush=True)
        try:
            with local_ray():
                return _fit(config, point, callbacks, prepared, step_callbacks, recipe)
        except KeyboardInterrupt:
            raise _interrupted(config, recipe.command) from None


def _fit(
    config: RaypoConfig,
    point: ResumePoint,
    callbacks: Sequence[ray.train.UserCallback],
    prepared: PreparedRun | None,
    step_callbacks: Sequence[StepCallback],
    recipe: Recipe,
) -> TrainResult:
    """Prepare (unless ``prepared``), then run Ray Train from ``point``."""
    _check_cluster(config)
    if prepared is None:
        config = fit_tiny_model(config, recipe.command)
        prepared = prepare(
            config, recipe.command, reference_pass=recipe.uses_reference, sft=recipe.sft_data
        )
    save_config(config, RunLayout(config.run_path).config)
    plan = with_resume_point(_worker_plan(config, prepared, step_callbacks, recipe), point)
    datasets = _datasets(config, prepared)
    _print_plan(config, plan, prepared, recipe)
    trainer_config = config.trainer
    resources = {"CPU": trainer_config.cpus_per_worker}
    if trainer_config.use_gpu:
        resources["GPU"] = 1
    # Imported here: only the workers run DeepSpeed; the driver importing it would cost seconds
    # and print DeepSpeed's accelerator notice before a config or resource error.
    from raypo.train.loop import train_worker

    trainer = TorchTrainer(
        partial(train_worker, plan),
        scaling_config=ScalingConfig(
            num_workers=trainer_config.num_workers,
            use_gpu=trainer_config.use_gpu,
            resources_per_worker=resources,
        ),
        datasets=datasets,
        dataset_config=ingest_config(list(datasets), config.data.preserve_order),
        run_config=RunConfig(
            name=config.name,
            storage_path=_storage(config),
            logging_config=ray.train.LoggingConfig(log_level=ray_train_log_level()),
            failure_config=FailureConfig(max_failures=trainer_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=trainer_config.save_total_limit),
            callbacks=[
                MetricsCallback(config.run_path, trainer_config.report_to, _tracker(config)),
                *callbacks,
            ],
        ),
    )
    metrics_path = RunLayout(config.run_path).metrics
    with ProgressMonitor(metrics_path, plan.total_steps, live=is_terminal()):
        result = _fit_interruptibly(trainer)
    return TrainResult(config.run_path, Path(plan.final_dir), dict(result.metrics or {}))


def fit_tiny_model(config: RaypoConfig, command: str = "train") -> RaypoConfig:
    """``config`` training the embedded tiny model after its fit, when ``model.tiny_fit_steps``
    asks for one (else ``config`` itself): a ``raypo sft`` run into ``RUN_DIR/tiny-fit``
    (:func:`raypo.train.sft.tiny_fit_config`) whose ``final/`` becomes the model, tokenizer and
    reference. It holds that directory's lock throughout. A finished fit with the same
    fingerprint is reused; another raypo fit there (interrupted, or of other settings) is
    replaced; files raypo did not write there (no lock file beside them) are an error."""
    if not needs_tiny_fit(config):
        return config
    fit = tiny_fit_config(config)
    fit = dataclasses.replace(fit, run_dir=str(fit.run_path.resolve()))
    layout, fingerprint = RunLayout(fit.run_path), tiny_fit_fingerprint(fit)
    _refuse_foreign_fit_dir(fit.run_path, command)
    with RunLock(fit.run_path, f"raypo {command}"):
        report = read_tiny_fit(fit.run_path)
        if report is not None and report["fingerprint"] == fingerprint and layout.final.is_dir():
            stage(command, f"tiny fit: reused ({_fit_summary(report)}) -> {layout.final}")
            return with_model(config, layout.final)
        for entry in fit.run_path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry != layout.lock:
                entry.unlink()
        steps = config.model.tiny_fit_steps
        stage(command, f"tiny fit: raypo sft of the embedded tiny model, {steps} steps")
        started = time.perf_counter()
        recipe = dataclasses.replace(SFT, command=f"{command}: tiny fit")
        # _fit, not train: an interruption is the calling command's to report, and the lock is
        # already held.
        with local_ray():
            result = _fit(fit, ResumePoint(None), (), None, (), recipe)
        report = {
            "fingerprint": fingerprint,
            "steps": steps,
            "losses": [round(m["loss"], 4) for m in read_metrics(fit.run_path) if "loss" in m],
            "seconds": round(time.perf_counter() - started, 1),
        }
        write_tiny_fit(fit.run_path, report)
    stage(command, f"tiny fit: {_fit_summary(report)} -> {result.final_dir}")
    return with_model(config, result.final_dir)


def _refuse_foreign_fit_dir(directory: Path, command: str) -> None:
    """Every raypo run creates its lock file first, so a non-empty ``tiny-fit/`` without one
    (or a link) holds someone else's files, which the fit must not replace."""
    foreign = directory.is_dir() and any(directory.iterdir())
    if directory.is_symlink() or (foreign and not RunLayout(directory).lock.exists()):
        raise SystemExit(
            f"raypo {command}: {directory} holds files raypo did not write, where the tiny "
            "model's fit goes; move them, or choose another --run_dir"
        )


def _fit_summary(report: dict[str, Any]) -> str:
    """Steps, the completion loss at each logging step of the fit, and the time."""
    losses = ", ".join(f"{loss:.2f}" for loss in report["losses"])
    return f"{report['steps']} steps, completion loss {losses} in {report['seconds']:.1f} s"


def _fit_interruptibly(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()`` in a helper thread, so that Ctrl-C reaches this thread as
    ``KeyboardInterrupt`` and :func:`train` answers it. On the main thread Ray Train installs its
    own SIGINT handler, which ends the process with status 1 and no word of where the run
    stopped, and stays installed after the run."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the caller's thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=fit, name="raypo-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends ``raypo train`` as Ctrl-C does: lock released,
    local Ray stopped, the resume command printed."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo train``."""
    try:
        resume_dir = getattr(args, "resume", None)
        if resume_dir:
            # `raypo train CONFIG --resume RUN_DIR` continues the run in RUN_DIR whatever the
            # config's run_dir says (a restarted cluster job passes both).
            config = dataclasses.replace(config, run_dir=str(resume_dir))
        _stop_on_sigterm()
        result = train(config, resume=bool(resume_dir))
    except DataQualityError as error:
        print(f"raypo train: {error}", file=sys.stderr)
        return 1
    print_result(result, f"final policy: {result.final_dir}")
    return 0


def print_result(result: TrainResult, final_line: str) -> None:
    """A finished run's last lines: the summary, where its directory and metrics are, then
    ``final_line`` (what ``final/`` holds)."""
    for line in summary_lines(result.metrics):
        print(line)
    print(f"run directory: {result.run_path}")
    print(f"metrics: {RunLayout(result.run_path).metrics}")
    print(final_line)

"""What ``raypo train --resume`` continues: the run's own settings and its newest whole checkpoint.

A resume trains with the run's saved ``config.yaml``. A CONFIG file or flags given with
``--resume`` may change only the settings in :data:`SAFE_ON_RESUME`, which change neither the
pairs trained nor the updates made (logging, checkpointing cadence, evaluation, storage, sweeps);
any other difference is refused with every difference listed, since it would silently change the
run half-way (another ``max_steps`` moves the learning-rate schedule; another seed, the data).

Ray Train restores the latest checkpoint it registered. Here the driver checks those checkpoints
newest first (:func:`raypo.train.manifest.verify_checkpoint`, sizes and SHA-256 of every file)
and continues from the newest whole one, warning about each one it skips and why; checkpoint
directories that Ray Train never registered (written by workers after the driver stopped) are
removed first, so that nothing outside the rotation stays on the storage.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import pyarrow.fs
import ray.train

from raypo.config import RaypoConfig, config_from_dict, config_to_dict
from raypo.models import TINY_NAME
from raypo.train.manifest import CheckpointError, CheckpointInfo, verify_checkpoint
from raypo.train.sft import is_tiny_fit_model
from raypo.train.worker_plan import WorkerPlan

logger = logging.getLogger(__name__)

SAFE_ON_RESUME: tuple[str, ...] = (
    "run_dir",
    "trainer.logging_steps",
    "trainer.report_to",
    "trainer.eval_steps",
    "trainer.save_steps",
    "trainer.save_total_limit",
    "trainer.max_failures",
    "trainer.storage_path",
    "eval.",
    "tune.",
)
"""Settings a resume may change (a trailing dot: the whole section). ``run_dir`` is the run being
resumed itself; ``trainer.storage_path`` is where its checkpoints are read (moved storage)."""

_FITTED_MODEL_KEYS = ("model.name_or_path", "model.tokenizer_name_or_path")
"""Saved as the fitted tiny model's directory when the run was given ``tiny``."""


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "search_space":
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return tree


def _is_safe(key: str) -> bool:
    return any(
        key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_ON_RESUME
    )


def _same_fitted_model(key: str, given: dict[str, Any], saved: dict[str, Any]) -> bool:
    """The saved config names the run's fit of ``tiny`` where the given one names ``tiny``."""
    if key not in _FITTED_MODEL_KEYS or given["model.name_or_path"] != TINY_NAME:
        return False
    return given[key] in (None, TINY_NAME) and is_tiny_fit_model(saved[key])


def resumed_config(saved: RaypoConfig, given: RaypoConfig, config_file: str) -> RaypoConfig:
    """``saved`` (the run's ``config.yaml``, read from ``config_file``) with the safe settings
    of ``given`` (:data:`SAFE_ON_RESUME`); raises ``SystemExit`` listing every other
    difference."""
    saved_flat = _flatten(config_to_dict(saved))
    given_flat = _flatten(config_to_dict(given))
    changed = [key for key in saved_flat if saved_flat[key] != given_flat.get(key)]
    refused = [
        key
        for key in changed
        if not _is_safe(key) and not _same_fitted_model(key, given_flat, saved_flat)
    ]
    if refused:
        lines = [f"  {key}: {saved_flat[key]!r} -> {given_flat.get(key)!r}" for key in refused]
        safe = ", ".join(SAFE_ON_RESUME)
        raise SystemExit(
            f"raypo train --resume: the run was started with other settings ({config_file}); a "
            f"resume may change only {safe}. Refused differences (run's value -> given):\n"
            + "\n".join(lines)
            + "\nResume with the run's own settings (`raypo train --resume RUN_DIR` and no "
            "CONFIG), or start a new run with another --run_dir."
        )
    merged = saved_flat | {key: given_flat[key] for key in changed if _is_safe(key)}
    return config_from_dict(_unflatten(merged))


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues."""

    checkpoint: CheckpointInfo | None
    """The newest whole checkpoint; None when the run has none (it starts afresh)."""
    skipped: tuple[tuple[str, str], ...] = ()
    """(checkpoint name, why) of each newer checkpoint found incomplete or damaged."""
    removed: tuple[str, ...] = ()
    """Checkpoint directories Ray Train never registered, deleted."""


def _experiment(storage: str, name: str) -> tuple[pyarrow.fs.FileSystem, str, str]:
    """Ray Train's run directory as (filesystem, path in it, path or URI as given)."""
    uri = f"{storage.rstrip('/')}/{name}"
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    return filesystem, path.rstrip("/"), uri


def _checkpoint_dirs(filesystem: pyarrow.fs.FileSystem, path: str) -> list[str]:
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    return sorted(
        info.base_name
        for info in filesystem.get_file_info(selector)
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_")
    )


def _registered(uri: str) -> set[str]:
    """Names of the checkpoints in Ray Train's record of the run (none without a record)."""
    train_logger = logging.getLogger("ray.train")
    level = train_logger.level
    # Ray logs at INFO that it found the record, with advice meant for a new Ray Train run.
    train_logger.setLevel(logging.WARNING)
    try:
        result = ray.train.Result.from_path(uri)
    except RuntimeError:
        return set()
    finally:
        train_logger.setLevel(level)
    return {PurePosixPath(c.path.rstrip("/")).name for c, _ in result.best_checkpoints}


def remove_unregistered(storage: str, name: str) -> tuple[str, ...]:
    """Delete the checkpoint directories of run ``name`` under ``storage`` that Ray Train never
    registered (written after its controller stopped); return their names."""
    filesystem, path, uri = _experiment(storage, name)
    registered = _registered(uri)
    removed = tuple(d for d in _checkpoint_dirs(filesystem, path) if d not in registered)
    for directory in removed:
        filesystem.delete_dir(f"{path}/{directory}")
        logger.warning("removed %s/%s: a checkpoint Ray Train never registered", uri, directory)
    return removed


def _newest_first(
    storage: str, name: str, checksums: bool
) -> tuple[CheckpointInfo | None, list[tuple[str, str]]]:
    """The newest whole checkpoint of run ``name`` (None if none) and (name, why) of each newer
    one that is not."""
    filesystem, path, uri = _experiment(storage, name)
    skipped: list[tuple[str, str]] = []
    for directory in reversed(_checkpoint_dirs(filesystem, path)):
        try:
            return verify_checkpoint(f"{uri}/{directory}", checksums), skipped
        except CheckpointError as error:
            skipped.append((directory, str(error)))
    return None, skipped


def last_whole_checkpoint(storage: str, name: str) -> CheckpointInfo | None:
    """The newest checkpoint of run ``name`` whose files are all there at their sizes."""
    return _newest_first(storage, name, checksums=False)[0]


def find_resume_point(storage: str, name: str, world_size: int) -> ResumePoint:
    """The newest whole checkpoint of run ``name`` under ``storage`` (every file's size and
    SHA-256 checked), after removing unregistered ones; raises ``SystemExit`` when checkpoints
    exist but none is whole, or when they were written by another number of workers than
    ``world_size``."""
    removed = remove_unregistered(storage, name)
    info, skipped = _newest_first(storage, name, checksums=True)
    if info is None and skipped:
        reasons = "\n".join(f"  {directory}: {why}" for directory, why in skipped)
        raise SystemExit(
            f"raypo train --resume: no whole checkpoint of run {name!r} under {storage}; every "
            f"one is incomplete or damaged:\n{reasons}\nStart a new run with another --run_dir "
            "(or --name)."
        )
    if info is not None and info.world_size != world_size:
        raise SystemExit(
            f"raypo train --resume: {info.path} was written by {info.world_size} workers and "
            f"this run has trainer.num_workers {world_size}; restoring onto another number of "
            f"workers is not supported: resume with --trainer.num_workers {info.world_size}"
        )
    return ResumePoint(info, tuple(skipped), removed)


def describe(point: ResumePoint, run_path: str) -> str:
    """The first lines a resume prints: what it continues from, and what it skipped."""
    lines = []
    for directory, why in point.skipped:
        lines.append(f"raypo train: WARNING: skipped checkpoint {directory}: {why}")
    info = point.checkpoint
    if info is None:
        lines.append(f"raypo train: {run_path} has no checkpoint yet: starting from step 0")
    else:
        lines.append(
            f"raypo train: resuming {run_path} from checkpoint {info.path} (step {info.step}, "
            f"epoch {info.epoch}, {info.pairs_done} pairs trained, {info.world_size} workers)"
        )
    return "\n".join(lines)


def with_resume_point(plan: WorkerPlan, point: ResumePoint) -> WorkerPlan:
    """``plan`` told to restore ``point``'s
    checkpoint instead of the skipped ones."""
    if not point.skipped:
        return plan
    resume_from = None if point.checkpoint is None else point.checkpoint.path
    skipped = tuple(directory for directory, _ in point.skipped)
    return dataclasses.replace(plan, resume_from=resume_from, skipped_checkpoints=skipped)

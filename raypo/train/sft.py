"""``raypo sft`` on the shared driver and worker loop, and the tiny model's fit as an SFT run.

``raypo sft`` is ``raypo train`` (:mod:`raypo.train.run`) with another :class:`Recipe`: the
workers call :func:`sft_micro_step` (:func:`raypo.sft.step.sft_step`, the completion-only loss)
instead of the preference step, no reference is loaded or computed, and the data is read for SFT
(prompt/completion and messages rows, or the chosen completions of pairs).

The embedded tiny model starts from random weights, and preference training against a random
reference measures little: ``model.tiny_fit_steps`` first fine-tunes it with ``raypo sft`` on
the chosen completions of the run's own training split, into ``RUN_DIR/tiny-fit``
(:func:`tiny_fit_config`); its ``final/`` is then the run's policy and reference. A finished fit
leaves :data:`TINY_FIT_REPORT` with its fingerprint, so ``raypo prepare`` then ``raypo train``
(or a rerun) into the same directory fits once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers

from raypo.config import LoraConfig, LossConfig, RaypoConfig, config_to_dict
from raypo.data.collate import collate_pairs
from raypo.data.readers import list_sources
from raypo.data.reference import path_state
from raypo.models import TINY_NAME, resolve_model_path
from raypo.run_layout import RunLayout
from raypo.sft.step import COMPLETION_KEYS, sft_step
from raypo.step import StepResult
from raypo.train.worker_plan import Recipe

if TYPE_CHECKING:
    # For the annotations only: raypo.train.loop imports DeepSpeed, which the driver does not.
    from raypo.train.batches import MicroBatch
    from raypo.train.loop import Worker

TINY_FIT_REPORT = "tiny_fit.json"
"""Written into ``RUN_DIR/tiny-fit`` once its SFT run has finished: the fit's fingerprint, the
steps, every logged completion loss and the wall time."""

TINY_FIT_LEARNING_RATE = 3e-3
"""A random 2-layer model learns at rates far above an LLM's."""
TINY_FIT_BATCH_SIZE = 16
"""Rows per optimizer step over all workers (rounded down to a multiple of the workers, at
least one row each)."""
_FIT_SECTIONS = ("seed", "model", "data", "trainer")
"""The config sections a fit depends on (the fingerprint ignores the rest: eval, tune, ...)."""
_NOT_FIT_SETTINGS = (
    "cpus_per_worker",
    "max_failures",
    "save_total_limit",
    "num_epochs",
    "tracker_project",
    "tracker_run_name",
    "tracker_tags",
)
"""Trainer settings that do not change the fitted weights (resources, bookkeeping; ``max_steps``
overrides ``num_epochs``): a change to them reuses the fit."""
_FORMAT_VERSION = 2
"""Bumped when the fit itself changes (1: a next-token fit of whole dialogues on the driver)."""


def sft_micro_step(worker: Worker, micro: MicroBatch) -> StepResult:
    """:func:`raypo.sft.step.sft_step` of the policy on one micro-batch's prompt + chosen
    sequences (with grad when grad mode is on); ``rejected_ids`` are never read (the data read
    for SFT leaves them empty)."""
    rows = micro.rows
    # The collator lays out pairs; with the chosen completion standing in for the rejected one
    # its first B rows are the prompt + chosen sequences, and the other B are never forwarded.
    pairs = {"prompt_ids": rows["prompt_ids"], "chosen_ids": rows["chosen_ids"]}
    pad_id = worker.tokenizer.pad_token_id
    collated = collate_pairs(pairs | {"rejected_ids": rows["chosen_ids"]}, pad_id)
    size = len(rows["prompt_ids"])
    batch = {name: collated[name][:size].to(worker.device) for name in COMPLETION_KEYS}
    return sft_step(worker.policy, batch, worker.forward)


SFT = Recipe(command="sft", micro_step=sft_micro_step, uses_reference=False, sft_data=True)
"""``raypo sft``'s recipe: the SFT step, no reference values, SFT data (prompt/completion and
messages rows, or the chosen completions of pairs)."""


def sft_config(config: RaypoConfig) -> RaypoConfig:
    """``config`` as an SFT run trains it: no tiny-model pre-fit (SFT is that fit), no
    reference model on the workers (``precomputed`` loads none, and :data:`SFT` skips its
    pass), and the default objective in place of one whose parameters the workers would build
    (MixDPO's strength distribution)."""
    reference = dataclasses.replace(config.reference, mode="precomputed")
    model = dataclasses.replace(config.model, tiny_fit_steps=0)
    return dataclasses.replace(config, model=model, reference=reference, loss=LossConfig())


def needs_tiny_fit(config: RaypoConfig) -> bool:
    """Whether ``config`` trains the embedded tiny model with ``model.tiny_fit_steps`` > 0."""
    return config.model.name_or_path == TINY_NAME and config.model.tiny_fit_steps > 0


def tiny_fit_config(config: RaypoConfig) -> RaypoConfig:
    """The ``raypo sft`` run that fits the tiny model for ``config``: ``model.tiny_fit_steps``
    steps of :data:`TINY_FIT_BATCH_SIZE` rows at :data:`TINY_FIT_LEARNING_RATE` (10% warmup,
    cosine decay, gradient norm clipped at 1) of every weight (no LoRA: the adapters come after)
    on the same data, split, seed, workers and ZeRO stage, into ``RUN_DIR/tiny-fit`` with one
    checkpoint at the end, no generation eval and no experiment tracker."""
    workers = config.trainer.num_workers
    trainer = dataclasses.replace(
        config.trainer,
        per_device_batch_size=max(1, TINY_FIT_BATCH_SIZE // workers),
        gradient_accumulation_steps=1,
        learning_rate=TINY_FIT_LEARNING_RATE,
        weight_decay=0.0,
        lr_scheduler="cosine",
        warmup_ratio=0.1,
        warmup_steps=None,
        max_steps=config.model.tiny_fit_steps,
        max_grad_norm=1.0,
        logging_steps=max(1, config.model.tiny_fit_steps // 4),
        save_steps=0,
        eval_steps=0,
        storage_path=None,
        report_to=[],
    )
    evaluation = dataclasses.replace(config.eval, during_training_num_prompts=0)
    fit = dataclasses.replace(
        config,
        name=f"{config.name}-tiny-fit",
        run_dir=str(RunLayout(config.run_path).tiny_fit),
        model=dataclasses.replace(config.model, lora=LoraConfig()),
        trainer=trainer,
        eval=evaluation,
    )
    return sft_config(fit)


def tiny_fit_fingerprint(fit: RaypoConfig) -> str:
    """sha256 over the fit's settings, its data files' names, sizes and modification times, the
    tiny model's files and the library versions: a change to any of them fits again."""
    settings = {k: v for k, v in config_to_dict(fit).items() if k in _FIT_SECTIONS}
    settings["trainer"] = {
        k: v for k, v in settings["trainer"].items() if k not in _NOT_FIT_SETTINGS
    }
    inputs = {
        "format": _FORMAT_VERSION,
        "config": settings,
        "sources": [path_state(source.path) for source in list_sources(fit.data)],
        "model": path_state(resolve_model_path(fit.model.name_or_path)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def read_tiny_fit(directory: Path) -> dict[str, Any] | None:
    """The report of a finished fit in ``directory`` (``RUN_DIR/tiny-fit``), or None."""
    try:
        report = json.loads((Path(directory) / TINY_FIT_REPORT).read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and "fingerprint" in report else None


def write_tiny_fit(directory: Path, report: dict[str, Any]) -> None:
    """Write :data:`TINY_FIT_REPORT` whole (renamed into place: never half a report)."""
    staging = Path(directory) / f".{TINY_FIT_REPORT}.tmp"
    staging.write_text(json.dumps(report, indent=2) + "\n")
    staging.replace(Path(directory) / TINY_FIT_REPORT)


def is_tiny_fit_model(path: str | None) -> bool:
    """Whether ``path`` is the ``final/`` of a finished tiny fit (a run's saved
    ``model.name_or_path`` after :func:`raypo.train.run.fit_tiny_model`)."""
    if not path:
        return False
    final = Path(path)
    return final.name == "final" and read_tiny_fit(final.parent) is not None


def with_model(config: RaypoConfig, model_dir: Path) -> RaypoConfig:
    """``config`` training ``model_dir`` (and its tokenizer) in place of its model."""
    path = str(model_dir)
    model = dataclasses.replace(config.model, name_or_path=path, tokenizer_name_or_path=path)
    return dataclasses.replace(config, model=model)

"""What the driver of ``raypo train`` hands to every Ray Train worker, typed and frozen.

The driver (:mod:`raypo.train.run`) prepares the data, counts the steps and resolves the model
paths; each worker (:mod:`raypo.train.loop`) receives one :class:`WorkerPlan` and needs nothing
else from the driver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raypo.config import RaypoConfig
from raypo.train.generation_eval import GenerationPrompt


@dataclass(frozen=True)
class StepEvent:
    """Where a worker stands right after an optimizer step (and its reports and checkpoint)."""

    rank: int
    """This worker's world rank."""
    world_size: int
    """Number of workers."""
    step: int
    """Optimizer steps done in the run, counting the restored ones."""
    epoch: int
    """0-based epoch of that step."""


StepCallback = Callable[[StepEvent], None]
"""Called on every worker after each optimizer step: instrumentation a user or a test installs
(a profiler's marker, a fault injected to test recovery). It must be picklable: Ray ships it to
the workers."""


MicroStep = Callable[[Any, Any], Any]
"""A worker's step on one micro-batch: ``(Worker, MicroBatch) -> StepResult``
(:mod:`raypo.train.loop`), e.g. ``raypo sft``'s :func:`raypo.train.sft.sft_micro_step`. It must be
picklable (a module-level function): Ray ships it to the workers."""


@dataclass(frozen=True)
class Recipe:
    """What a training command runs on the shared driver and worker loop: ``raypo train``'s
    preference step (the default) or another (``raypo sft``)."""

    command: str = "train"
    """The command's name in its stage lines (``raypo COMMAND: ...``)."""
    micro_step: MicroStep | None = None
    """The workers' step (:attr:`WorkerPlan.micro_step`); None = the preference step."""
    uses_reference: bool = True
    """Whether the step reads reference values; False skips the precomputed reference pass."""
    sft_data: bool = False
    """Whether the data is read for supervised fine-tuning: rows with one completion
    (prompt/completion, messages) are accepted and pairs keep only their chosen completion
    (:func:`raypo.data.prepare.prepare`'s ``sft``)."""


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker of one run is given."""

    config: RaypoConfig
    """The resolved config of the run (the fitted tiny model in place of ``tiny``, if any)."""
    total_steps: int
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    total_pairs: int
    """Pairs the run trains, all epochs and workers together (positions a whole-epoch run's
    schedule by the pairs trained)."""
    policy_path: str
    """Local directory of the policy's initial weights."""
    reference_path: str
    """Local directory of the reference model (loaded by workers in ``reference.mode: online``)."""
    tokenizer_path: str
    """Local directory of the tokenizer, exported next to the final policy."""
    final_dir: str
    """Where rank 0 exports the trained policy (and MixDPO's learned strength)."""
    has_eval: bool
    """Whether the workers receive an ``eval`` dataset shard of held-out pairs."""
    generation_prompts: tuple[GenerationPrompt, ...] = ()
    """Held-out prompts sampled at every evaluation (``eval.during_training_num_prompts``)."""
    generations_path: str | None = None
    """File rank 0 appends those completions to; None when there are no prompts."""
    heldout_pairs_path: str | None = None
    """File rank 0 appends each held-out evaluation's per-pair values to
    (:mod:`raypo.train.records`); None when the run has no held-out pairs."""
    step_callbacks: tuple[StepCallback, ...] = ()
    """Run on every worker after each optimizer step, in order."""
    resume_from: str | None = None
    """The checkpoint to restore instead of Ray Train's latest when that one is among
    ``skipped_checkpoints`` (the newest whole one the driver verified; None: start afresh)."""
    skipped_checkpoints: tuple[str, ...] = ()
    """Names (``checkpoint_*``) of the checkpoints the driver found incomplete or damaged."""
    micro_step: MicroStep | None = None
    """The step of every training and held-out micro-batch; None = the preference step
    (:func:`raypo.train.loop.micro_batch_step`)."""


PREFERENCE = Recipe()
"""``raypo train``'s recipe: the preference step, with the reference."""

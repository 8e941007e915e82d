"""Step counts and the learning-rate schedule: linear warmup from 0, then cosine, linear, constant.

The multipliers are those of Hugging Face's ``get_{cosine,linear,constant}_schedule_with_warmup``
(one cosine half-wave, ``num_cycles=0.5``), so runs compare with TRL's. Steps are optimizer steps:
the scheduler is stepped by DeepSpeed once per gradient-accumulation boundary, and the multiplier
of step ``s`` is the one the ``s``-th update (counting from 0) uses, so with warmup the first update
has learning rate 0, as in Hugging Face's trainer.

Runs of whole epochs follow the data instead of the step count: the scheduler's ``progress`` is
set to the fraction of the run's pairs already trained, in steps (``pairs_done * total_steps /
total_pairs``). After a restart the pairs left can be spread unevenly over the workers, which takes
a few more lock-step steps than planned; counting pairs keeps those steps inside the schedule
instead of running them past its end at a decayed learning rate of 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch

from raypo.config import TrainerConfig

_ROUND_DIGITS = 9
"""Products such as ``0.1 * 30`` (= 3.0000000000000004) are rounded to this many decimals before
``ceil``, so a float artefact never adds a step."""

_KINDS = ("cosine", "linear", "constant")
"""Shapes after warmup, as ``trainer.lr_scheduler`` spells them."""


def _ceil(value: float) -> int:
    return math.ceil(round(value, _ROUND_DIGITS))


def lr_lambda(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based) in [0, 1].

    Warmup: ``step / warmup_steps`` for ``step < warmup_steps``. After it, with ``p = (step -
    warmup) / (total - warmup)`` capped at 1: cosine ``0.5 * (1 + cos(pi * p))``, linear ``1 - p``,
    constant 1. The cap keeps decays at 0 past ``total_steps`` (Hugging Face's cosine rises again).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown lr_scheduler {kind!r}; choose one of {list(_KINDS)}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def warmup_steps(trainer: TrainerConfig, total_steps: int) -> int:
    """Optimizer steps of linear warmup: ``trainer.warmup_steps`` when set (at most
    ``total_steps``), else ``ceil(warmup_ratio * total_steps)``."""
    if trainer.warmup_steps is not None:
        return min(trainer.warmup_steps, total_steps)
    return _ceil(trainer.warmup_ratio * total_steps)


class ProgressLR(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose position is ``progress`` (fractional steps) when it is set, else the count of
    ``step()`` calls. ``progress`` is part of the state dict, so checkpoints keep it."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[float], float]):
        self.progress: float | None = None
        super().__init__(optimizer, multiplier)

    def get_lr(self) -> list[float]:
        """Each group's initial learning rate times the multiplier at the current position."""
        position = self.last_epoch if self.progress is None else self.progress
        pairs = zip(self.base_lrs, self.lr_lambdas, strict=True)
        return [base * lmbda(position) for base, lmbda in pairs]


def build_scheduler(
    optimizer: torch.optim.Optimizer, trainer: TrainerConfig, total_steps: int
) -> ProgressLR:
    """Schedule over ``total_steps`` optimizer steps with ``trainer``'s warmup and shape.

    Every parameter group follows the same multiplier of its own initial learning rate. Used as
    ``deepspeed.initialize(lr_scheduler=partial(build_scheduler, trainer=..., total_steps=...))``;
    its state dict is saved in DeepSpeed checkpoints with the engine's.
    """
    multiplier = partial(
        lr_lambda,
        total_steps=total_steps,
        warmup_steps=warmup_steps(trainer, total_steps),
        kind=trainer.lr_scheduler,
    )
    return ProgressLR(optimizer, multiplier)


def data_progress(pairs_done: int, total_pairs: int, total_steps: int) -> float:
    """The schedule position, in steps, of a whole-epoch run that has trained ``pairs_done`` of
    its ``total_pairs`` pairs (see the module docstring)."""
    return pairs_done * total_steps / max(1, total_pairs)


def total_training_steps(num_pairs: int, trainer: TrainerConfig, world_size: int) -> int:
    """Optimizer steps of the run: ``max_steps`` when set, else from ``num_epochs``.

    Each epoch every worker runs ``ceil(num_pairs / (per_device_batch_size * world_size))``
    micro-batches (a partial last micro-batch counts; the split is padded to equal shards) and ends
    with an optimizer step (a partial last accumulation counts as a step):
    ``num_epochs * ceil(micro_batches_per_epoch / gradient_accumulation_steps)``. A fractional
    ``num_epochs`` stops at ``ceil(num_epochs * micro_batches_per_epoch /
    gradient_accumulation_steps)``. For one epoch this equals ``ceil(num_pairs / global_batch)``.
    """
    if num_pairs < 1:
        raise ValueError(f"there are no training pairs to take steps on (num_pairs={num_pairs})")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if trainer.max_steps is not None:
        return trainer.max_steps
    micro_per_epoch = math.ceil(num_pairs / (trainer.per_device_batch_size * world_size))
    accumulation = trainer.gradient_accumulation_steps
    if float(trainer.num_epochs).is_integer():
        return int(trainer.num_epochs) * math.ceil(micro_per_epoch / accumulation)
    return math.ceil(_ceil(trainer.num_epochs * micro_per_epoch) / accumulation)

"""Step counts and the learning-rate schedule: linear warmup from 0, then cosine, linear, constant.

The multipliers are those of Hugging Face's ``get_{cosine,linear,constant}_schedule_with_warmup``
(one cosine half-wave, ``num_cycles=0.5``), so runs compare with TRL's. Steps are optimizer steps:
the scheduler is stepped by DeepSpeed once per gradient-accumulation boundary, and the multiplier
of step ``s`` is the one the ``s``-th update (counting from 0) uses, so with warmup the first update
has learning rate 0, as in Hugging Face's trainer.
"""

from __future__ import annotations

import math
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
    """``ceil(warmup_ratio * total_steps)`` optimizer steps of linear warmup."""
    return _ceil(trainer.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, trainer: TrainerConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``total_steps`` optimizer steps with ``trainer``'s warmup and shape.

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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def total_training_steps(num_pairs: int, trainer: TrainerConfig, world_size: int) -> int:
    """Optimizer steps of the run: ``max_steps`` when set, else from ``num_epochs``.

    Each epoch every worker runs ``ceil(num_pairs / (per_device_batch_size * world_size))``
    micro-batches (a partial last micro-batch counts; the count is exact when the rows split evenly
    over the workers), gradient accumulation carries across epoch ends, and a partial last
    accumulation counts as a step: ``ceil(num_epochs * micro_batches_per_epoch /
    gradient_accumulation_steps)``. For one epoch this equals ``ceil(num_pairs / global_batch)``.
    """
    if num_pairs < 1:
        raise ValueError(f"there are no training pairs to take steps on (num_pairs={num_pairs})")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if trainer.max_steps is not None:
        return trainer.max_steps
    micro_per_epoch = math.ceil(num_pairs / (trainer.per_device_batch_size * world_size))
    micro_batches = _ceil(trainer.num_epochs * micro_per_epoch)
    return math.ceil(micro_batches / trainer.gradient_accumulation_steps)

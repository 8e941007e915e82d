"""Learning-rate multipliers, warmup length and the number of optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from raypo.config import TrainerConfig
from raypo.train.schedule import (
    build_scheduler,
    data_progress,
    lr_lambda,
    total_training_steps,
    warmup_steps,
)


@pytest.mark.parametrize(
    ("kind", "step", "expected"),
    [
        # total 10, warmup 2: warmup gives step / 2; afterwards p = (step - 2) / 8.
        ("cosine", 0, 0.0),
        ("cosine", 1, 0.5),
        ("cosine", 2, 1.0),
        ("cosine", 4, 0.5 * (1 + math.sqrt(0.5))),  # p = 1/4: cos(pi/4) = sqrt(1/2)
        ("cosine", 6, 0.5),  # p = 1/2: cos(pi/2) = 0
        ("cosine", 10, 0.0),  # p = 1: cos(pi) = -1
        ("cosine", 12, 0.0),  # past the end: clamped (HF would rise again)
        ("linear", 1, 0.5),
        ("linear", 4, 0.75),  # 1 - 2/8
        ("linear", 6, 0.5),
        ("linear", 10, 0.0),
        ("linear", 12, 0.0),
        ("constant", 1, 0.5),
        ("constant", 2, 1.0),
        ("constant", 10, 1.0),
    ],
)
def test_lr_lambda_hand_values(kind: str, step: int, expected: float) -> None:
    assert lr_lambda(step, total_steps=10, warmup_steps=2, kind=kind) == pytest.approx(expected)


def test_no_warmup_starts_at_full_rate() -> None:
    assert lr_lambda(0, total_steps=10, warmup_steps=0, kind="cosine") == 1.0
    assert lr_lambda(0, total_steps=10, warmup_steps=0, kind="linear") == 1.0


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="polynomial"):
        lr_lambda(1, total_steps=10, warmup_steps=2, kind="polynomial")


@pytest.mark.parametrize(
    ("ratio", "total", "expected"),
    [
        (0.0, 30, 0),
        (0.1, 30, 3),  # 0.1 * 30 is 3.0000000000000004 in floating point: still 3, not 4
        (0.1, 25, 3),  # ceil(2.5)
        (0.5, 7, 4),  # ceil(3.5)
    ],
)
def test_warmup_steps(ratio: float, total: int, expected: int) -> None:
    assert warmup_steps(TrainerConfig(warmup_ratio=ratio), total) == expected


@pytest.mark.parametrize(("steps", "total", "expected"), [(7, 30, 7), (0, 30, 0), (50, 30, 30)])
def test_warmup_steps_replace_the_ratio(steps: int, total: int, expected: int) -> None:
    # TRL's warmup_steps: a count, capped at the run's length; the ratio (0.5) is then ignored.
    trainer = TrainerConfig(warmup_ratio=0.5, warmup_steps=steps)
    assert warmup_steps(trainer, total) == expected


@pytest.mark.parametrize(
    ("kind", "hf_schedule"),
    [
        ("cosine", transformers.get_cosine_schedule_with_warmup),
        ("linear", transformers.get_linear_schedule_with_warmup),
    ],
)
def test_matches_transformers_schedules(kind: str, hf_schedule) -> None:
    total = 37
    trainer = TrainerConfig(lr_scheduler=kind, warmup_ratio=0.1, learning_rate=1e-3)
    ours_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    hf_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    ours = build_scheduler(ours_optimizer, trainer, total)
    hf = hf_schedule(hf_optimizer, warmup_steps(trainer, total), total)
    for _ in range(total):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr(), rel=1e-12, abs=1e-18)
        ours_optimizer.step(), hf_optimizer.step()
        ours.step(), hf.step()
    assert ours.get_last_lr() == [0.0]


def test_matches_transformers_constant() -> None:
    trainer = TrainerConfig(lr_scheduler="constant", warmup_ratio=0.2)
    ours_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    hf_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    ours = build_scheduler(ours_optimizer, trainer, 20)
    hf = transformers.get_constant_schedule_with_warmup(hf_optimizer, warmup_steps(trainer, 20))
    for _ in range(25):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr())
        ours_optimizer.step(), hf_optimizer.step()
        ours.step(), hf.step()


def test_every_group_scales_its_own_rate() -> None:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-2},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = build_scheduler(optimizer, TrainerConfig(warmup_ratio=0.5), total_steps=4)
    optimizer.step()
    scheduler.step()
    # warmup = ceil(0.5 * 4) = 2 steps, so step 1 has multiplier 1/2.
    assert scheduler.get_last_lr() == pytest.approx([5e-4, 5e-3])


@pytest.mark.parametrize(
    ("pairs", "trainer", "world", "expected"),
    [
        # 400 pairs / (4 per device x 2 workers) = 50 micro-batches = 50 steps.
        (400, TrainerConfig(per_device_batch_size=4), 2, 50),
        # 401 pairs: a partial last micro-batch counts: ceil(401 / 8) = 51.
        (401, TrainerConfig(per_device_batch_size=4), 2, 51),
        # 51 micro-batches with 2 accumulated per step: ceil(51 / 2) = 26 = ceil(401 / 16).
        (401, TrainerConfig(per_device_batch_size=4, gradient_accumulation_steps=2), 2, 26),
        # 2 epochs of 10 pairs in micro-batches of 4: ceil(10 / 4) = 3 per epoch -> 6 steps
        # (ceil(2 * 10 / 4) = 5 would stop before the second epoch's last 2 pairs).
        (10, TrainerConfig(per_device_batch_size=4, num_epochs=2.0), 1, 6),
        # Each epoch ends with a step: 3 micro-batches, 2 accumulated -> 2 steps per epoch, 4 in
        # 2 epochs (not ceil(6 / 2) = 3, which would accumulate across the epoch end).
        (
            10,
            TrainerConfig(per_device_batch_size=4, num_epochs=2.0, gradient_accumulation_steps=2),
            1,
            4,
        ),
        # Half an epoch of 3 micro-batches: ceil(1.5) = 2.
        (10, TrainerConfig(per_device_batch_size=4, num_epochs=0.5), 1, 2),
        # 0.1 epochs of 30 micro-batches: 0.1 * 30 = 3.0000000000000004 in floats, still 3.
        (300, TrainerConfig(per_device_batch_size=1, num_epochs=0.1), 10, 3),
        # max_steps wins over epochs.
        (400, TrainerConfig(max_steps=7, num_epochs=3.0), 2, 7),
    ],
)
def test_total_training_steps(
    pairs: int, trainer: TrainerConfig, world: int, expected: int
) -> None:
    assert total_training_steps(pairs, trainer, world) == expected


def test_total_training_steps_needs_pairs_and_workers() -> None:
    with pytest.raises(ValueError, match="no training pairs"):
        total_training_steps(0, TrainerConfig(), 1)
    with pytest.raises(ValueError, match="world_size"):
        total_training_steps(10, TrainerConfig(), 0)


def test_progress_positions_the_schedule_by_data_and_survives_a_state_dict_round_trip() -> None:
    """Cosine over 10 steps, no warmup: 6 of 10 steps' worth of pairs trained (48 of 80 pairs)
    gives the multiplier 0.5 * (1 + cos(0.6 pi)) = 0.3455, whatever the step() count."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer = TrainerConfig(warmup_ratio=0.0, lr_scheduler="cosine")
    scheduler = build_scheduler(optimizer, trainer, total_steps=10)
    assert data_progress(48, 80, 10) == pytest.approx(6.0)
    scheduler.progress = data_progress(48, 80, 10)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(0.6 * math.pi)))
    restored = build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), trainer, total_steps=10
    )
    restored.load_state_dict(scheduler.state_dict())
    assert restored.progress == pytest.approx(6.0) and restored.last_epoch == 1
    # Without progress the position is the step count: step 1 of 10 -> 0.5 * (1 + cos(0.1 pi)).
    plain = build_scheduler(
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), trainer, total_steps=10
    )
    plain.optimizer.step()
    plain.step()
    assert plain.get_last_lr()[0] == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))

"""Checkpoints that prove themselves: manifests, their verification, the train state's format and
the resume's choice among damaged checkpoints. No Ray and no DeepSpeed: a stand-in engine writes
and reads one file as DeepSpeed's engine would; Ray Train's merge of every rank's directory into
one checkpoint is a copy."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raypo.mixdpo import StrengthDistribution
from raypo.run_layout import CheckpointLayout
from raypo.train import resume
from raypo.train.checkpoint import TrainState, load_checkpoint, save_checkpoint, trained_ids
from raypo.train.manifest import CheckpointError, verify_checkpoint


class StandInEngine:
    """Writes this rank's shard under ``engine/`` as DeepSpeed does; records what it loads.
    Its module is a plain (not 4-bit) model: DeepSpeed's module options stay at their defaults."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.loaded: list[str] = []
        self.module = torch.nn.Linear(2, 2)

    def save_checkpoint(self, directory: str, tag: str, exclude_frozen_parameters: bool) -> None:
        assert not exclude_frozen_parameters
        shard = Path(directory) / tag / f"zero_pp_rank_{self.rank}_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(bytes(range(256)) * (4 + self.rank))

    def load_checkpoint(self, directory: str, tag: str, custom_load_fn: object) -> None:
        assert custom_load_fn is None
        self.loaded.append(directory)


def _state(rank: int, step: int) -> TrainState:
    state = TrainState(step=step, epoch=0, pairs_done=8 * step)
    state.record([f"pair-{step}-{rank}-{i}" for i in range(4)])
    return state


def write_checkpoint(directory: Path, step: int, world_size: int = 2) -> Path:
    """Every rank saves into its own directory; the directories are merged into ``directory``."""
    for rank in range(world_size):
        part = directory.parent / f".rank{rank}-{directory.name}"
        part.mkdir(parents=True)
        save_checkpoint(part, StandInEngine(rank), _state(rank, step), rank, world_size, None, None)
        shutil.copytree(part, directory, dirs_exist_ok=True)
        shutil.rmtree(part)
    return directory


def test_a_whole_checkpoint_verifies_with_its_counters(tmp_path: Path) -> None:
    info = verify_checkpoint(str(write_checkpoint(tmp_path / "checkpoint_a", step=3)))
    assert (info.world_size, info.step, info.epoch, info.pairs_done) == (2, 3, 0, 24)
    assert trained_ids(tmp_path / "checkpoint_a") == sorted(
        f"pair-3-{rank}-{i}" for rank in range(2) for i in range(4)
    )


def test_train_state_loads_with_weights_only(tmp_path: Path) -> None:
    """No pickle from the storage: the train state holds tensors, strings and numbers only."""
    checkpoint = write_checkpoint(tmp_path / "checkpoint_a", step=1)
    payload = torch.load(CheckpointLayout(checkpoint).train_state(1), weights_only=True)
    assert payload["trained"] == [f"pair-1-1-{i}" for i in range(4)]


def test_restore_resumes_every_random_stream_and_the_learned_strength(tmp_path: Path) -> None:
    strength = StrengthDistribution(family="gamma", mean=0.1, cv=0.5)
    optimizer = torch.optim.Adam(strength.parameters(), lr=0.1)
    for param in strength.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    directory = tmp_path / "checkpoint_a"
    directory.mkdir()
    save_checkpoint(directory, StandInEngine(0), _state(0, 2), 0, 1, strength, optimizer)
    expected = (random.random(), np.random.standard_normal(), torch.rand(2))
    saved_strength = {k: v.clone() for k, v in strength.state_dict().items()}
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    fresh = StrengthDistribution(family="gamma", mean=0.1, cv=0.5)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    engine = StandInEngine(0)
    state = load_checkpoint(directory, engine, 0, 1, fresh, fresh_optimizer)
    assert (random.random(), np.random.standard_normal()) == expected[:2]
    assert torch.equal(torch.rand(2), expected[2])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved_strength.items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
    assert (state.step, state.pairs_done, engine.loaded) == (2, 16, [str(directory)])


def _remove_rank_file(checkpoint: Path) -> str:
    target = CheckpointLayout(checkpoint).train_state(1)
    target.unlink()
    return target.name


def _truncate(checkpoint: Path) -> str:
    target = CheckpointLayout(checkpoint).engine / "zero_pp_rank_1_optim_states.pt"
    target.write_bytes(target.read_bytes()[:100])
    return target.name


def _flip_a_byte(checkpoint: Path) -> str:
    target = CheckpointLayout(checkpoint).train_state(0)
    data = bytearray(target.read_bytes())
    data[-30] ^= 0xFF
    target.write_bytes(bytes(data))
    return target.name


def _remove_rank_manifest(checkpoint: Path) -> str:
    target = CheckpointLayout(checkpoint).manifest(1)
    target.unlink()
    return target.name


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_remove_rank_file, "is missing"),
        (_truncate, "truncated"),
        (_flip_a_byte, "SHA-256"),
        (_remove_rank_manifest, "rank 1 of 2 never finished"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path: Path, damage, why) -> None:
    checkpoint = write_checkpoint(tmp_path / "checkpoint_a", step=2)
    name = damage(checkpoint)
    with pytest.raises(CheckpointError, match=why) as refused:
        verify_checkpoint(str(checkpoint))
    assert name in str(refused.value)


def test_a_worker_refuses_a_missing_rank_file_before_loading_anything(tmp_path: Path) -> None:
    """The defect of old: rank 1's state missing, rank 0's was used in its place and 80 pairs
    were trained twice."""
    checkpoint = write_checkpoint(tmp_path / "checkpoint_a", step=2)
    _remove_rank_file(checkpoint)
    engine = StandInEngine(1)
    with pytest.raises(CheckpointError, match="train_state_rank1.pt is missing"):
        load_checkpoint(checkpoint, engine, 1, 2, None, None)
    assert engine.loaded == []


def test_a_worker_refuses_another_world_size(tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "checkpoint_a", step=2)
    with pytest.raises(CheckpointError, match="written by 2 workers, this run has 4"):
        load_checkpoint(checkpoint, StandInEngine(0), 0, 4, None, None)


def _storage(tmp_path: Path, steps: list[int]) -> tuple[Path, list[Path]]:
    """Ray Train's run directory ``storage/run`` with one checkpoint per step, oldest first."""
    run = tmp_path / "storage" / "run"
    checkpoints = [write_checkpoint(run / f"checkpoint_{step:02d}", step) for step in steps]
    return run.parent, checkpoints


def _all_registered(monkeypatch: pytest.MonkeyPatch, but: tuple[str, ...] = ()) -> None:
    """Ray Train's record lists every checkpoint directory except ``but``."""

    def registered(uri: str) -> set[str]:
        return {p.name for p in Path(uri).glob("checkpoint_*")} - set(but)

    monkeypatch.setattr(resume, "_registered", registered)


def test_resume_falls_back_past_a_missing_rank_file_and_a_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, (_, second, third, fourth) = _storage(tmp_path, [1, 2, 3, 4])
    _all_registered(monkeypatch)
    _remove_rank_file(fourth)
    _truncate(third)
    point = resume.find_resume_point(str(storage), "run", world_size=2)
    assert point.checkpoint is not None and point.checkpoint.step == 2
    assert point.checkpoint.path == f"{storage}/run/{second.name}"
    assert [name for name, _ in point.skipped] == [fourth.name, third.name]
    printed = resume.describe(point, "RUN")
    assert f"skipped checkpoint {fourth.name}" in printed and "train_state_rank1.pt" in printed
    assert "from checkpoint" in printed and "(step 2, epoch 0, 16 pairs trained" in printed


def test_resume_removes_checkpoints_ray_never_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What workers wrote after the driver stopped (Ctrl-C) is not left outside the rotation."""
    storage, (first, second) = _storage(tmp_path, [1, 2])
    _all_registered(monkeypatch, but=(second.name,))
    point = resume.find_resume_point(str(storage), "run", world_size=2)
    assert point.removed == (second.name,) and not second.exists()
    assert point.checkpoint is not None and point.checkpoint.step == 1


def test_resume_refuses_when_no_checkpoint_is_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, (first, second) = _storage(tmp_path, [1, 2])
    _all_registered(monkeypatch)
    _truncate(first)
    _remove_rank_manifest(second)
    with pytest.raises(SystemExit, match="no whole checkpoint") as refused:
        resume.find_resume_point(str(storage), "run", world_size=2)
    assert first.name in str(refused.value) and second.name in str(refused.value)


def test_resume_refuses_another_number_of_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _ = _storage(tmp_path, [1])
    _all_registered(monkeypatch)
    with pytest.raises(SystemExit, match="--trainer.num_workers 2"):
        resume.find_resume_point(str(storage), "run", world_size=3)


def test_a_run_without_checkpoints_starts_afresh(tmp_path: Path) -> None:
    point = resume.find_resume_point(str(tmp_path / "storage"), "run", world_size=2)
    assert point == resume.ResumePoint(None)
    assert "starting from step 0" in resume.describe(point, "RUN")

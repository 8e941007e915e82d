"""Checkpoints of a training run: everything needed to continue as if nothing had happened.

A checkpoint directory holds the DeepSpeed engine (model, optimizer, LR scheduler; one shard per
rank under ZeRO), and per rank a ``train_state_rank{r}.pt`` with the step, the epoch, the pair ids
that rank trained on in the current epoch (in order, repeats kept, so the files together are the
epoch's multiset), its RNG states, and the MixDPO strength distribution with its optimizer. Ray
Train uploads every rank's files into one checkpoint; on restore each rank reads all ranks' ids,
since ``streaming_split`` may now send it rows another rank had (without ``data.preserve_order``,
or with another number of workers).

With LoRA (``model.lora``) the engine state is the PEFT model's: the adapters with their
optimizer state, and the frozen base weights too, as DeepSpeed saves the whole module. The base is
redundant there (a restart loads it from the policy's path before the checkpoint) and costs one
model copy of disk per kept checkpoint; it is kept so that restoring is DeepSpeed's plain, strict
load, the same as for full fine-tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENGINE_TAG = "engine"
"""DeepSpeed's tag (sub-directory) for the engine state inside a checkpoint."""


@dataclass
class TrainState:
    """Where a run is: the counters and the ids consumed in the current epoch."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current pass over the training split (0-based)."""
    pairs_done: int = 0
    """Pairs trained so far in the whole run, by all ranks (the learning-rate schedule's clock in
    whole-epoch runs)."""
    consumed: set[str] = field(default_factory=set)
    """Ids of the pairs trained on in the current epoch by any rank (skipped after a restore)."""
    trained: list[str] = field(default_factory=list)
    """Ids this rank trained on in the current epoch, in order; after a restore rank 0 also
    carries every rank's earlier ids, so the ranks' lists together stay the epoch's multiset."""

    def record(self, ids: list[str]) -> None:
        """Note that this rank trained on ``ids``."""
        self.consumed.update(ids)
        self.trained.extend(ids)

    def next_epoch(self) -> None:
        """Start a new pass: nothing consumed yet."""
        self.epoch += 1
        self.consumed = set()
        self.trained = []


def _state_file(directory: Path, rank: int) -> Path:
    return directory / f"train_state_rank{rank}.pt"


def _rng_states() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def _restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


def save_checkpoint(
    directory: Path,
    engine: Any,
    state: TrainState,
    rank: int,
    strength: torch.nn.Module | None,
    strength_optimizer: torch.optim.Optimizer | None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (every rank must call it)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG)
    payload = {
        "step": state.step,
        "epoch": state.epoch,
        "pairs_done": state.pairs_done,
        "trained": state.trained,
        "rng": _rng_states(),
        "strength": None if strength is None else strength.state_dict(),
        "strength_optimizer": None
        if strength_optimizer is None
        else strength_optimizer.state_dict(),
    }
    torch.save(payload, _state_file(directory, rank))


def load_checkpoint(
    directory: Path,
    engine: Any,
    rank: int,
    strength: torch.nn.Module | None,
    strength_optimizer: torch.optim.Optimizer | None,
) -> TrainState:
    """Restore the engine, this rank's RNG and the strength; return the merged TrainState."""
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG)
    files = sorted(directory.glob("train_state_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"checkpoint {directory} has no train_state_rank*.pt files")
    payloads = {path: torch.load(path, weights_only=False) for path in files}
    own = payloads.get(_state_file(directory, rank), payloads[files[0]])
    trained = [pair_id for payload in payloads.values() for pair_id in payload["trained"]]
    if _state_file(directory, rank) in payloads:
        _restore_rng(own["rng"])
    if strength is not None and own["strength"] is not None:
        strength.load_state_dict(own["strength"])
    if strength_optimizer is not None and own["strength_optimizer"] is not None:
        strength_optimizer.load_state_dict(own["strength_optimizer"])
    return TrainState(
        step=own["step"],
        epoch=own["epoch"],
        pairs_done=own["pairs_done"],
        consumed=set(trained),
        trained=trained if rank == 0 else [],
    )


def trained_ids(directory: Path) -> list[str]:
    """The multiset (as a sorted list) of pair ids trained in the checkpoint's current epoch."""
    files = sorted(directory.glob("train_state_rank*.pt"))
    return sorted(i for path in files for i in torch.load(path, weights_only=False)["trained"])

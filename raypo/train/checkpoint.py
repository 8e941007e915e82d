"""Checkpoints of a training run: everything needed to continue as if nothing had happened.

A checkpoint directory (:class:`raypo.run_layout.CheckpointLayout`) holds the DeepSpeed engine
(model, optimizer, LR scheduler; one shard per rank under ZeRO), and per rank a
``train_state_rank{r}.pt`` with the step, the epoch, the pair ids that rank trained on in the
current epoch (in order, repeats kept, so the files together are the epoch's multiset), its RNG
states, and the MixDPO strength distribution with its optimizer, and last its manifest
(:mod:`raypo.train.manifest`). Ray Train uploads every rank's files into one checkpoint; on
restore each rank first checks the manifests (every rank's files there, at their sizes, the train
states at their checksums), then reads all ranks' ids, since ``streaming_split`` may now send it
rows another rank had (without ``data.preserve_order``).

The train state holds only tensors, strings and numbers, and is read with
``torch.load(weights_only=True)``: unpickling it runs no code from the checkpoint storage.
DeepSpeed's own loader still unpickles its engine files (``torch.load(weights_only=False)``);
those are listed with their SHA-256 in the manifests, which ``raypo train --resume`` verifies
before any worker loads them.

With LoRA (``model.lora``) the engine state is the PEFT model's: the adapters with their
optimizer state, and the frozen base weights too, as DeepSpeed saves the whole module. The base is
redundant there (a restart loads it from the policy's path before the checkpoint) and costs one
model copy of disk per kept checkpoint; it is kept so that restoring is DeepSpeed's plain, strict
load, the same as for full fine-tuning. A 4-bit base (QLoRA, ``model.lora.load_in_4bit``) is left
out instead: bitsandbytes writes its quantisation constants into a 4-bit layer's state dict but no
layer reads them back, so a strict load of the whole module fails. Its checkpoint holds the
trainable parameters (and those constants, which are not parameters), and restoring loads every
trainable parameter from it and nothing else (:func:`load_trainable`); the 4-bit base is the one
the worker loaded from the policy's path, as at the start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch

from raypo.lora import is_quantized
from raypo.run_layout import CheckpointLayout
from raypo.train.manifest import CheckpointError, verify_checkpoint, write_manifest

ENGINE_TAG = CheckpointLayout.ENGINE_TAG
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


def _rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and numbers (``weights_only``-loadable)."""
    version, mt_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(mt_state), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached,
        },
        "torch": torch.get_rng_state(),
    }


def _restore_rng(states: dict[str, Any]) -> None:
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])


def save_checkpoint(
    directory: Path,
    engine: Any,
    state: TrainState,
    rank: int,
    world_size: int,
    strength: torch.nn.Module | None,
    strength_optimizer: torch.optim.Optimizer | None,
) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (every rank must call it, each
    into a directory of its own), its manifest last."""
    layout = CheckpointLayout(directory)
    quantized = is_quantized(engine.module)
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=quantized)
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
    torch.save(payload, layout.train_state(rank))
    counters = {"step": state.step, "epoch": state.epoch, "pairs_done": state.pairs_done}
    write_manifest(directory, rank, world_size, counters)


def _train_states(directory: Path, world_size: int) -> list[dict[str, Any]]:
    """Every rank's train state, after checking the checkpoint's manifests (sizes of all files,
    checksums of the train states) and that ``world_size`` ranks wrote it."""
    info = verify_checkpoint(str(directory), checksums="train_state")
    if info.world_size != world_size:
        raise CheckpointError(
            f"checkpoint {directory} was written by {info.world_size} workers, this run has "
            f"{world_size}: restoring onto another number of workers is not supported"
        )
    layout = CheckpointLayout(directory)
    return [torch.load(layout.train_state(r), weights_only=True) for r in range(world_size)]


def load_checkpoint(
    directory: Path,
    engine: Any,
    rank: int,
    world_size: int,
    strength: torch.nn.Module | None,
    strength_optimizer: torch.optim.Optimizer | None,
) -> TrainState:
    """Check the checkpoint, restore the engine, this rank's RNG and the strength; return the
    merged TrainState. Raises :class:`raypo.train.manifest.CheckpointError` naming what is
    missing or damaged, before anything is loaded."""
    payloads = _train_states(directory, world_size)
    custom_load = load_trainable if is_quantized(engine.module) else None
    engine.load_checkpoint(str(directory), tag=ENGINE_TAG, custom_load_fn=custom_load)
    own = payloads[rank]
    trained = [pair_id for payload in payloads for pair_id in payload["trained"]]
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


def load_trainable(src: dict[str, torch.Tensor], dst: torch.nn.Module) -> None:
    """DeepSpeed's module load of a 4-bit policy (``custom_load_fn``): every trainable parameter
    of ``dst`` from the checkpoint's module state ``src``, the rest of ``src`` ignored (module
    docstring).

    Raises:
        CheckpointError: ``src`` lacks a trainable parameter of ``dst`` (another LoRA setting).
    """
    trainable = [name for name, param in dst.named_parameters() if param.requires_grad]
    missing = [name for name in trainable if name not in src]
    if missing:
        raise CheckpointError(
            f"the checkpoint holds no value for {len(missing)} of the {len(trainable)} trainable "
            f"parameters (first: {missing[0]}): it was written with other model.lora settings"
        )
    dst.load_state_dict({name: src[name] for name in trainable}, strict=False)


def checkpoint_to_restore(
    resume_from: str | None, skipped: tuple[str, ...]
) -> ray.train.Checkpoint | None:
    """The checkpoint a worker restores: Ray Train's latest, unless the driver found that one
    damaged at the start of this run (its name in ``skipped``), then the driver's choice
    ``resume_from`` (the newest whole checkpoint; None: start afresh)."""
    latest = ray.train.get_checkpoint()
    if latest is not None and Path(latest.path.rstrip("/")).name not in skipped:
        return latest
    return None if resume_from is None else ray.train.Checkpoint(resume_from)


def trained_ids(directory: Path) -> list[str]:
    """The multiset (as a sorted list) of pair ids trained in the checkpoint's current epoch."""
    info = verify_checkpoint(str(directory), checksums="train_state")
    layout = CheckpointLayout(directory)
    states = [torch.load(layout.train_state(r), weights_only=True) for r in range(info.world_size)]
    return sorted(i for state in states for i in state["trained"])

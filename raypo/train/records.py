"""Per-record outputs of the held-out evaluations during training, gathered and appended to JSONL.

Two evaluations write one line per item, each with its optimizer ``step``: the generation eval
(:mod:`raypo.train.generation_eval`) one per completion to ``RUN_DIR/generations.jsonl``, and the
held-out pair evaluation (:func:`raypo.train.loop.evaluate`) one per held-out pair to
``RUN_DIR/heldout_pairs.jsonl``: its id, the implicit rewards of the chosen and the rejected
completion and, where known, the pair's normalised entropy ``Hn(x)`` under the reference and the
policy (:attr:`raypo.step.StepResult.per_pair`). ``raypo report`` reads the latter for the
accuracy and margins per dispersion bucket and the reward distributions. Every worker holds part
of the records; rank 0 writes them all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor


def gather_records(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """Every rank's ``records`` in rank order, on every rank (collective: all ranks call it)."""
    if world_size == 1 or not dist.is_initialized():
        return records
    gathered: list[list[dict[str, Any]] | None] = [None] * world_size
    dist.all_gather_object(gathered, records)
    return [record for part in gathered for record in part or []]


def gather_records_to_rank_zero(
    records: list[dict[str, Any]], world_size: int
) -> list[dict[str, Any]]:
    """Every rank's ``records`` in rank order on rank 0, none on the others (collective: all
    ranks call it). For records only rank 0 writes: :func:`gather_records` would send every
    rank a copy of them all."""
    if world_size == 1 or not dist.is_initialized():
        return records
    gathered: list[list[dict[str, Any]] | None] | None = None
    if dist.get_rank() == 0:
        gathered = [None] * world_size
    dist.gather_object(records, gathered, dst=0)
    return [record for part in gathered or [] for record in part or []]


def append_records(path: Path, step: int, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to the JSONL file at ``path``, each with ``step``, in one write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": step, **record}) + "\n" for record in records]
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(lines))


def pair_records(ids: Sequence[str], per_pair: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    """One record per pair of a micro-batch: ``{"id", <name>: value, ...}`` for every ``[B]``
    tensor of ``per_pair`` (none when the step gives no per-pair values, as ``raypo sft``'s)."""
    if not per_pair:
        return []
    columns = {name: values.detach().cpu().tolist() for name, values in per_pair.items()}
    return [
        {"id": pair_id, **{name: column[index] for name, column in columns.items()}}
        for index, pair_id in enumerate(ids)
    ]

"""Micro-batches for one worker, kept in lock-step with the other workers.

Ray Train's ``streaming_split`` hands blocks to workers as they come; with ``data.preserve_order``
each worker gets the same rows on every run, otherwise after a restart the rows a worker sees are
not the ones it saw before (and with a changed number of workers they never are). It also splits
with ``equal=True``, which drops up to ``world_size - 1`` rows per epoch;
:func:`pad_for_equal_split` tops the split up with marked padding rows instead, which every worker
drops again (:func:`drop_consumed`), so no pair is lost.

Exactly-once training is kept by pair id: a checkpoint records every id consumed in the current
epoch (by all workers), and on restart each worker drops those ids from whatever it receives. The
remaining rows can differ in number between workers; a worker that runs out early keeps stepping on
a zero-weight copy of an earlier batch until every worker is done, so DeepSpeed's collectives stay
matched and no pair is dropped or repeated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray.data
import torch
import torch.distributed as dist

Batch = dict[str, np.ndarray]

PADDING_ID_PREFIX = "__raypo_padding__:"
"""Id prefix of the rows :func:`pad_for_equal_split` adds; no real pair id starts with it."""


@dataclass(frozen=True)
class MicroBatch:
    """One worker's micro-batch; ``real`` is False for a zero-weight placeholder."""

    rows: Batch
    """Column-major numpy batch as Ray Data yields it."""
    real: bool
    """Whether the pairs count: placeholders only keep the collectives in step."""

    @property
    def ids(self) -> list[str]:
        """Pair ids of a real batch (none for a placeholder)."""
        return [str(pair_id) for pair_id in self.rows["id"]] if self.real else []


def pad_for_equal_split(
    dataset: ray.data.Dataset, num_rows: int, world_size: int
) -> ray.data.Dataset:
    """``dataset`` (of ``num_rows`` rows) followed by copies of its first rows, re-identified as
    padding, so that its length is a multiple of ``world_size`` and an equal split drops nothing."""
    missing = -num_rows % world_size
    if missing == 0:
        return dataset

    def as_padding(table: pa.Table) -> pa.Table:
        # In Arrow, so that every other column keeps its type: numpy batches would turn list
        # columns into tensor columns, which Ray Data cannot put in one batch with the real rows.
        ids = [f"{PADDING_ID_PREFIX}{index}" for index in range(table.num_rows)]
        column = table.schema.get_field_index("id")
        return table.set_column(column, "id", pa.array(ids, type=table.schema.field("id").type))

    padding = dataset.limit(missing).map_batches(as_padding, batch_format="pyarrow")
    return dataset.union(padding)


def drop_consumed(batch: Batch, consumed: set[str]) -> Batch | None:
    """The rows of ``batch`` that are neither in ``consumed`` nor padding; None when none are
    left."""
    keep = np.array(
        [
            not (pair_id.startswith(PADDING_ID_PREFIX) or pair_id in consumed)
            for pair_id in map(str, batch["id"])
        ]
    )
    if keep.all():
        return batch
    if not keep.any():
        return None
    return {name: column[keep] for name, column in batch.items()}


def _anyone_has(has_batch: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def lockstep_batches(batches: Iterable[Batch], consumed: set[str]) -> Iterator[MicroBatch]:
    """Yield this worker's unconsumed micro-batches until every worker has run out.

    A worker without a batch left yields its last batch (or, if it never had an unconsumed one,
    the first batch it received) as a placeholder with ``real=False``. Every worker must call this
    the same number of times per epoch: it runs one all-reduce per micro-batch.
    """
    source = iter(batches)
    placeholder: Batch | None = None
    while True:
        batch: Batch | None = None
        for raw in source:
            placeholder = placeholder if placeholder is not None else raw
            batch = drop_consumed(raw, consumed)
            if batch is not None:
                break
        if not _anyone_has(batch is not None):
            return
        if batch is not None:
            placeholder = batch
            yield MicroBatch(batch, real=True)
        elif placeholder is not None:
            yield MicroBatch(placeholder, real=False)
        else:
            raise RuntimeError(
                "this worker received no preference pairs at all while others did; the "
                "training split has fewer rows than there are workers"
            )


def until_accumulation_boundary(
    micro_batches: Iterable[MicroBatch], accumulation_steps: int
) -> Iterator[MicroBatch]:
    """``micro_batches``, then zero-weight placeholders up to the next multiple of
    ``accumulation_steps``, so a trailing partial accumulation still ends in an optimizer step.

    The count is the same on every worker (lock-step), so all of them add the same placeholders.
    """
    count = 0
    last: MicroBatch | None = None
    for last in micro_batches:
        count += 1
        yield last
    while last is not None and count % accumulation_steps:
        count += 1
        yield MicroBatch(last.rows, real=False)

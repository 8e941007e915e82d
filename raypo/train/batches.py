"""Micro-batches for one worker, kept in lock-step with the other workers.

Ray Train's ``streaming_split`` hands rows to workers dynamically, so after a restart the rows a
worker sees are not the ones it saw before. Exactly-once training is therefore kept by pair id: a
checkpoint records every id consumed in the current epoch (by all workers), and on restart each
worker drops those ids from whatever it receives. The remaining rows can differ in number between
workers; a worker that runs out early keeps stepping on a zero-weight copy of an earlier batch until
every worker is done, so DeepSpeed's collectives stay matched and no pair is dropped or repeated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

Batch = dict[str, np.ndarray]


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


def drop_consumed(batch: Batch, consumed: set[str]) -> Batch | None:
    """The rows of ``batch`` whose id is not in ``consumed``; None when none are left."""
    if not consumed:
        return batch
    keep = np.array([str(pair_id) not in consumed for pair_id in batch["id"]])
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

"""Lock-step micro-batches: consumed ids and padding are skipped, uneven workers stay matched, an
equal split loses no row, and every epoch ends on an accumulation boundary."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray.data
import torch.distributed as dist
import torch.multiprocessing as mp

from raypo.train.batches import (
    PADDING_ID_PREFIX,
    MicroBatch,
    drop_consumed,
    lockstep_batches,
    pad_for_equal_split,
    until_accumulation_boundary,
)


def _batch(*ids: str) -> dict[str, np.ndarray]:
    return {"id": np.array(ids, dtype=object), "x": np.arange(len(ids))}


def test_drop_consumed_keeps_order_and_columns() -> None:
    kept = drop_consumed(_batch("a", "b", "c"), {"b"})
    assert list(kept["id"]) == ["a", "c"] and list(kept["x"]) == [0, 2]
    assert drop_consumed(_batch("a"), {"a"}) is None
    padded = drop_consumed(_batch("a", f"{PADDING_ID_PREFIX}0", "b"), set())
    assert list(padded["id"]) == ["a", "b"] and list(padded["x"]) == [0, 2]


def _equal_split_ids(dataset: ray.data.Dataset, world_size: int) -> list[list[str]]:
    """What each of ``world_size`` concurrent consumers of ``streaming_split(equal=True)`` (Ray
    Train's split) receives, after dropping padding."""
    splits = dataset.streaming_split(world_size, equal=True)
    received: list[list[str]] = [[] for _ in range(world_size)]

    def consume(rank: int) -> None:
        for batch in splits[rank].iter_batches(batch_size=2, batch_format="numpy"):
            kept = drop_consumed(batch, set())
            received[rank].extend([] if kept is None else map(str, kept["id"]))

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return received


@pytest.mark.parametrize("num_rows", [7, 8])
def test_padding_makes_the_equal_split_lose_no_row(ray_session, num_rows: int) -> None:
    rows = [{"id": f"p{i}", "x": i} for i in range(num_rows)]
    plain = _equal_split_ids(ray.data.from_items(rows), 2)
    assert sum(len(ids) for ids in plain) == num_rows - num_rows % 2  # Ray drops the odd row
    padded = pad_for_equal_split(ray.data.from_items(rows), num_rows, 2)
    received = _equal_split_ids(padded, 2)
    assert sorted(i for ids in received for i in ids) == sorted(row["id"] for row in rows)


def test_a_trailing_partial_accumulation_is_completed_with_placeholders() -> None:
    micro = [MicroBatch(_batch(name), real=True) for name in "abcde"]
    padded = list(until_accumulation_boundary(iter(micro), 4))
    assert [mb.ids for mb in padded] == [["a"], ["b"], ["c"], ["d"], ["e"], [], [], []]
    assert [mb.real for mb in padded[5:]] == [False, False, False]
    assert len(list(until_accumulation_boundary(iter(micro[:4]), 4))) == 4
    assert list(until_accumulation_boundary(iter([]), 4)) == []


def test_single_worker_skips_consumed_ids_and_fully_consumed_batches() -> None:
    batches = [_batch("a", "b"), _batch("c"), _batch("d", "e")]
    got = list(lockstep_batches(batches, {"a", "c"}))
    assert [mb.ids for mb in got] == [["b"], ["d", "e"]]
    assert all(mb.real for mb in got)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shards = {0: [_batch("a"), _batch("b"), _batch("c")], 1: [_batch("d"), _batch("e")]}
    consumed = {"e"}  # consumed before a restart: rank 1 is left with one batch
    got = [(mb.ids, mb.real) for mb in lockstep_batches(shards[rank], consumed)]
    Path(out, f"{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_uneven_workers_step_together_with_placeholders(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0 = json.loads((tmp_path / "0.json").read_text())
    rank1 = json.loads((tmp_path / "1.json").read_text())
    assert rank0 == [[["a"], True], [["b"], True], [["c"], True]]
    # Rank 1 trains on "d" once, then steps twice on zero-weight placeholders.
    assert rank1 == [[["d"], True], [[], False], [[], False]]


def test_padding_rows_keep_the_arrow_types_of_the_real_rows(ray_session) -> None:
    """Token-id list columns stay lists in the padding rows, so one batch can hold real and
    padding rows (as numpy batches, the padding had become tensor columns, and iterating over
    the boundary failed to unify list<int64> with them)."""
    table = pa.table({"id": ["a", "b", "c"], "prompt_ids": [[1, 2], [3], [4, 5, 6]]})
    padded = pad_for_equal_split(ray.data.from_arrow(table), 3, 2)
    assert padded.schema().types == ray.data.from_arrow(table).schema().types
    (batch,) = list(padded.iter_batches(batch_size=4, batch_format="numpy"))
    assert list(batch["id"]) == ["a", "b", "c", f"{PADDING_ID_PREFIX}0"]
    assert [list(ids) for ids in batch["prompt_ids"]] == [[1, 2], [3], [4, 5, 6], [1, 2]]

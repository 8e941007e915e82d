"""Lock-step micro-batches: consumed ids are skipped, and uneven workers stay matched."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from raypo.train.batches import drop_consumed, lockstep_batches


def _batch(*ids: str) -> dict[str, np.ndarray]:
    return {"id": np.array(ids, dtype=object), "x": np.arange(len(ids))}


def test_drop_consumed_keeps_order_and_columns() -> None:
    kept = drop_consumed(_batch("a", "b", "c"), {"b"})
    assert list(kept["id"]) == ["a", "c"] and list(kept["x"]) == [0, 2]
    assert drop_consumed(_batch("a"), {"a"}) is None


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

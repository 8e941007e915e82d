"""The Ray Data pipeline: sources -> normalised, validated, tokenised pairs -> Parquet -> workers.

``prepare_pairs`` runs one Ray Data job over the list of sources (files, shards of a ``datasets``
dataset): each source is read, validated and tokenised by a task of ``data.num_cpus_per_op`` CPUs,
so many shards are processed in parallel across the cluster and no node holds the whole dataset.
Every row read comes out exactly once, tagged ``train``, ``eval`` or ``rejected``, and the result
is written as Parquet partitioned by that tag in one pass. The driver then streams the rejected
partition into ``rejects.jsonl`` and counts the rest.

``train_dataset`` reads a prepared (or reference-annotated) split back for Ray Train, shuffled
deterministically by seed; Ray Train's ``streaming_split`` gives each worker an equal share. With
``data.preserve_order`` every stage keeps row order (:func:`apply_row_order`), so a run's pairs,
held-out split and per-rank batches are the same on every run with the same seed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data

from raypo.config import DataConfig, RaypoConfig
from raypo.data.readers import list_sources, read_pairs
from raypo.data.records import Rejection, Source
from raypo.data.tokenize import TokenizedPair, tokenize_pairs
from raypo.data.validate import DataSummary
from raypo.models import load_tokenizer, resolve_model_path
from raypo.run_layout import SPLIT_COLUMN, RunLayout

SPLITS = ("train", "eval", "rejected")
TOKENIZE_BATCH = 256
"""Pairs tokenised per call; batching amortises the tokenizer's per-call overhead."""
REJECT_COLUMNS = ("reason", "detail", "raw")
SOURCE_ORDER = "source_order"
"""Column: a row's place in source order, its source's place in the list of sources times
:data:`ROWS_PER_SOURCE` plus its place among that source's rows. Ascending in the prepared split
(with ``data.preserve_order``), so that a split rewritten out of order can be put back in it."""
ROWS_PER_SOURCE = 2**40
"""More rows than one source can hold: the :data:`SOURCE_ORDER` stride between sources."""
SHUFFLE_KEY = "__raypo_shuffle_key__"
"""Temporary column :func:`read_split` sorts a shuffled split by."""
SHUFFLE_BLOCK_ROWS = 4096
"""About this many rows per block of a shuffled split (at least 2 blocks)."""


@dataclass(frozen=True)
class PreparedData:
    """Where ``prepare_pairs`` wrote its outputs, and what it counted."""

    layout: RunLayout
    """The run directory it wrote into."""
    summary: DataSummary
    """Counts: rows read, accepted, rejected per reason and per source."""
    split_counts: dict[str, int]
    """Accepted rows per split (``train``, ``eval``)."""

    @property
    def directory(self) -> Path:
        """``RUN_DIR/prepared``: one Parquet directory per split (``split=train`` ...)."""
        return self.layout.prepared

    @property
    def rejects_path(self) -> Path:
        """``RUN_DIR/rejects.jsonl``: every rejected row with source, row, reason and detail."""
        return self.layout.rejects

    @property
    def summary_path(self) -> Path:
        """``RUN_DIR/data_summary.json``."""
        return self.layout.data_summary

    def split_path(self, split: str) -> Path:
        """Parquet directory of ``split``."""
        return self.layout.prepared_split(split)


def _unit_hash(text: str) -> float:
    """The first 8 bytes of ``text``'s sha256 as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def eval_assignment(pair_id: str, seed: int, eval_fraction: float) -> bool:
    """Whether a pair belongs to the held-out split: a hash of (seed, id), stable across runs,
    machines and the order rows arrive in."""
    return _unit_hash(f"{seed}:{pair_id}") < eval_fraction


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


def _empty_token_columns() -> dict[str, Any]:
    return {
        "prompt_ids": [],
        "chosen_ids": [],
        "rejected_ids": [],
        "prompt_length": 0,
        "chosen_length": 0,
        "rejected_length": 0,
        "prompt_truncated": False,
        "chosen_truncated": False,
        "rejected_truncated": False,
    }


def _rejected_row(rejection: Rejection) -> dict[str, Any]:
    return {
        SPLIT_COLUMN: "rejected",
        "id": f"{rejection.source}:{rejection.row}",
        "group": "",
        "source": rejection.source,
        "row": rejection.row,
        **_empty_token_columns(),
        "reason": rejection.reason,
        "detail": rejection.detail,
        "raw": rejection.raw,
    }


def _accepted_row(pair: TokenizedPair, split: str) -> dict[str, Any]:
    row = pair.to_row()
    row["group"] = row["group"] or ""
    return {SPLIT_COLUMN: split, **row, "reason": "", "detail": "", "raw": ""}


def _output_rows(
    results: list[Any], fixed_split: str | None, data: DataConfig, seed: int
) -> Iterator[dict[str, Any]]:
    for result in results:
        if isinstance(result, Rejection):
            yield _rejected_row(result)
            continue
        split = fixed_split
        if split is None:
            split = "eval" if eval_assignment(result.id, seed, data.eval_fraction) else "train"
        yield _accepted_row(result, split)


def _process_source(
    item: dict[str, Any],
    data: DataConfig,
    tokenizer_path: str,
    trust_remote_code: bool,
    seed: int,
    sft: bool,
) -> Iterator[dict[str, Any]]:
    """Read, validate and tokenise one source; one output row per row read, numbered in
    :data:`SOURCE_ORDER`."""
    source = Source(**json.loads(item["source"]))
    tokenizer = _tokenizer(tokenizer_path, trust_remote_code)
    rows = _source_rows(source, item, data, tokenizer, seed, sft)
    first = item["position"] * ROWS_PER_SOURCE
    for offset, row in enumerate(rows):
        row[SOURCE_ORDER] = first + offset
        yield row


def _source_rows(
    source: Source, item: dict[str, Any], data: DataConfig, tokenizer: Any, seed: int, sft: bool
) -> Iterator[dict[str, Any]]:
    """``source``'s rows in the order it holds them, tokenised in batches."""
    fixed_split = item["fixed_split"] or None
    pending: list[Any] = []
    for record in read_pairs(source, data, item["hf_split"] or None, sft=sft):
        pending.append(record)
        if len(pending) >= TOKENIZE_BATCH:
            yield from _output_rows(_tokenize(pending, tokenizer, data), fixed_split, data, seed)
            pending = []
    if pending:
        yield from _output_rows(_tokenize(pending, tokenizer, data), fixed_split, data, seed)


def _tokenize(records: list[Any], tokenizer: Any, data: DataConfig) -> list[Any]:
    """Tokenise the pairs among ``records`` and keep rejections in place."""
    pairs = [record for record in records if not isinstance(record, Rejection)]
    tokenized = iter(tokenize_pairs(pairs, tokenizer, data))
    return [record if isinstance(record, Rejection) else next(tokenized) for record in records]


def _source_items(data: DataConfig) -> list[dict[str, Any]]:
    """One work item per source, numbered in order; with ``data.eval_split`` its sources are all
    ``eval``."""
    items = [
        {"source": json.dumps(dataclasses.asdict(source)), "fixed_split": "", "hf_split": ""}
        for source in list_sources(data)
    ]
    if data.eval_split is not None:
        eval_data = dataclasses.replace(data, split=data.eval_split)
        items += [
            {
                "source": json.dumps(dataclasses.asdict(source)),
                "fixed_split": "eval",
                "hf_split": data.eval_split,
            }
            for source in list_sources(eval_data)
        ]
    return [{**item, "position": position} for position, item in enumerate(items)]


def _write_rejects(layout: RunLayout) -> DataSummary:
    """Stream the rejected partition into ``rejects.jsonl``; count reasons and sources."""
    summary = DataSummary()
    rejected_dir = layout.prepared_split("rejected")
    with layout.rejects.open("w", encoding="utf-8") as out:
        if not rejected_dir.exists():
            return summary
        columns = ["source", "row", *REJECT_COLUMNS]
        for row in ray.data.read_parquet(str(rejected_dir)).select_columns(columns).iter_rows():
            rejection = Rejection(
                source=row["source"],
                row=int(row["row"]),
                reason=row["reason"],
                detail=row["detail"],
                raw=row["raw"],
            )
            out.write(json.dumps(rejection.to_json(), ensure_ascii=False) + "\n")
            summary.add_rejection(rejection)
    return summary


def _count_accepted(layout: RunLayout, summary: DataSummary) -> dict[str, int]:
    """Accepted rows per split and per source, streamed from the Parquet ``source`` column
    (cheaper than a Ray Data groupby, which shuffles)."""
    counts = {}
    for split in ("train", "eval"):
        directory = layout.prepared_split(split)
        per_source: Counter[str] = Counter()
        if directory.exists():
            sources = ray.data.read_parquet(str(directory)).select_columns(["source"])
            for batch in sources.iter_batches(batch_size=65536, batch_format="numpy"):
                names, sizes = np.unique(batch["source"], return_counts=True)
                per_source.update(dict(zip(names.tolist(), sizes.tolist(), strict=True)))
        for source, count in per_source.items():
            summary.add_accepted(source, count)
        counts[split] = sum(per_source.values())
    return counts


def apply_row_order(data: DataConfig) -> None:
    """Have the Ray Data executions this process starts from now on keep row order when
    ``data.preserve_order`` (a dataset copies the current context when it is created).

    Without it a multi-source read comes out in the order its tasks finish (and ``max_rows``
    keeps whichever rows came first), and Ray Train's split over the workers follows block
    completion order (:func:`raypo.train.run.ingest_config`).
    """
    ray.data.DataContext.get_current().execution_options.preserve_order = data.preserve_order


def prepare_pairs(config: RaypoConfig, *, sft: bool = False) -> PreparedData:
    """Read, validate and tokenise ``config.data`` into ``RUN_DIR/prepared``; ``sft``: for
    ``raypo sft`` (:func:`raypo.data.formats.normalise_row`: rows with one completion are read,
    pairs lose their rejected completion, whose ids are then empty).

    Writes ``prepared/split=train|eval|rejected`` (Parquet), ``rejects.jsonl`` and
    ``data_summary.json``, then raises :class:`raypo.data.validate.DataQualityError` when more than
    ``data.max_reject_fraction`` of the rows were rejected (after writing the files, so the user
    can read why).
    """
    data = config.data
    layout = RunLayout(config.run_path)
    layout.root.mkdir(parents=True, exist_ok=True)
    prepared = layout.prepared
    if prepared.exists():
        shutil.rmtree(prepared)
    apply_row_order(data)
    items = _source_items(data)
    tokenizing = {
        "tokenizer_path": resolve_model_path(config.model.tokenizer_path),
        "trust_remote_code": config.model.trust_remote_code,
    }
    rows = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
        _process_source,
        fn_kwargs={"data": data, **tokenizing, "seed": config.seed, "sft": sft},
        num_cpus=data.num_cpus_per_op,
    )
    if data.max_rows is not None:
        # The first max_rows rows in source order (with data.preserve_order; else the first
        # to come out).
        rows = rows.limit(data.max_rows)
    rows.write_parquet(str(prepared), partition_cols=[SPLIT_COLUMN])

    summary = _write_rejects(layout)
    split_counts = _count_accepted(layout, summary)
    layout.data_summary.write_text(
        json.dumps({**summary.to_json(), "splits": split_counts}, indent=2) + "\n",
        encoding="utf-8",
    )
    result = PreparedData(layout, summary, split_counts)
    summary.check(data.max_reject_fraction, layout.rejects)
    return result


def shuffle_keys(pair_ids: Iterable[str], seed: int) -> np.ndarray:
    """Each pair's place in the seeded shuffle: a hash of (seed, id) in [0, 1), salted apart from
    :func:`eval_assignment`'s so the order says nothing about the held-out draw."""
    return np.array([_unit_hash(f"{seed}:shuffle:{pair_id}") for pair_id in pair_ids])


def _with_shuffle_key(table: pa.Table, seed: int) -> pa.Table:
    keys = shuffle_keys(map(str, table.column("id").to_pylist()), seed)
    return table.append_column(SHUFFLE_KEY, pa.array(keys))


def read_split(directory: Path, *, shuffle_seed: int | None = None) -> ray.data.Dataset:
    """A prepared or reference-annotated split as a Ray dataset, without the partition column.

    With ``shuffle_seed`` the rows come sorted by :func:`shuffle_keys` (a distributed sort, like
    a global shuffle), cut into blocks at fixed key boundaries: rows and block sizes are then a
    function of the seed and the set of pair ids alone. ``random_shuffle(seed)`` is not: its
    permutation depends on the order the rows were written in, and Ray Data's actor-pool
    reference pass writes them in a different order from run to run even with ``preserve_order``.
    """
    dataset = ray.data.read_parquet(str(directory), partitioning=None)
    present = set(dataset.columns())
    dataset = dataset.drop_columns([c for c in (SPLIT_COLUMN, *REJECT_COLUMNS) if c in present])
    if shuffle_seed is None:
        return dataset
    blocks = max(2, math.ceil(dataset.count() / SHUFFLE_BLOCK_ROWS))
    return (
        dataset.map_batches(
            _with_shuffle_key, fn_kwargs={"seed": shuffle_seed}, batch_format="pyarrow"
        )
        .sort(SHUFFLE_KEY, boundaries=[index / blocks for index in range(1, blocks)])
        .drop_columns([SHUFFLE_KEY])
    )

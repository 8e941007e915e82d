"""Which sources ``data.path`` names, and streaming one source's rows as pairs or rejections.

``data.path`` / ``data.format`` resolve (:func:`list_sources`) to:

- ``builtin:NAME``: a JSONL file shipped in the package (:func:`raypo.models.builtin_data_path`);
- a file, a glob (``data/train-*.parquet``, ``**`` allowed) or a directory: every ``*.jsonl``,
  ``*.json``, ``*.jsonl.gz``, ``*.json.gz`` (JSON Lines) and ``*.parquet`` file, recursively,
  sorted, hidden (``.x``/``_x``) files and folders left out. ``format: jsonl`` / ``parquet``
  reads a single file as that format whatever its suffix, and keeps only that format's files of a
  glob or directory;
- a directory written by ``save_to_disk`` (``format: hf_disk``, or ``auto`` when it holds a
  ``state.json`` or ``dataset_dict.json``); a dataset dict gives its ``data.split``;
- ``format: hf`` (or ``auto`` with a path that is neither local nor a data file name):
  ``datasets.load_dataset(path, hf_name, data_dir=hf_data_dir, split=split)``. When ``path`` is
  an existing local file or a glob of files it is given as ``data_files`` to the builder named by
  ``hf_name`` (``json``, ``parquet``, ``csv``; null = from the suffix), i.e. ``format: hf,
  hf_name: json, path: x.jsonl`` is ``load_dataset("json", data_files="x.jsonl", split=split)``.

With ``data.subsets`` each subset is listed as above with ``data_dir`` = the subset
(``format: hf``) or ``path/SUBSET`` as the path, and its sources carry the subset's name, the
group of their pairs (:attr:`Source.subset`).

Parquet files with several row groups and ``datasets`` splits larger than :data:`SHARD_ROWS` are
cut into shards that separate tasks read. A problem with the path itself raises
:class:`raypo.config.ConfigError` naming ``data.path`` and the fix.

:func:`read_pairs` streams one source and turns every row read into exactly one
:class:`PreferencePair` or :class:`Rejection` (:mod:`raypo.data.formats`). JSONL is read as bytes
line by line: a line that is not UTF-8 is rejected (``undecodable_bytes``), and so is every
empty or whitespace-only line (``blank_line``); only the newline ending the last line makes no
row. With ``data.id_field`` set, a repeated id within one source is ``duplicate_id``.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from raypo.config import ConfigError, DataConfig
from raypo.data.formats import normalise_row, raw_text
from raypo.data.records import RAW_CHARS, PreferencePair, Rejection, Source

SHARD_ROWS = 50_000
"""Rows per shard above which a Parquet file or ``datasets`` split is split for parallel reads."""
BATCH_ROWS = 1024
"""Rows decoded from Arrow at a time."""

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".parquet": "parquet",
}
_HF_BUILDERS = {"jsonl": "json", "parquet": "parquet", "csv": "csv"}
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")
_BUILTIN = "builtin:"


def list_sources(cfg: DataConfig) -> list[Source]:
    """The sources of ``cfg.path`` in a stable order (see the module docstring)."""
    if cfg.subsets:
        return [
            dataclasses.replace(source, subset=name)
            for name in cfg.subsets
            for source in list_sources(_subset_config(cfg, name))
        ]
    path = cfg.path
    if path.startswith(_BUILTIN):
        return [_builtin_source(cfg)]
    if _is_hub(cfg):
        return _hf_sources(cfg)
    local = Path(path).expanduser()
    saved = local.is_dir() and any((local / name).is_file() for name in _SAVED_DATASET_MARKERS)
    if cfg.format == "hf_disk" or (cfg.format == "auto" and saved):
        return _disk_sources(cfg, local)
    sources = []
    for file in _data_files(path, cfg.format):
        kind = cfg.format if cfg.format in ("jsonl", "parquet") else _kind_of(file)
        sources += _parquet_sources(file) if kind == "parquet" else [_jsonl_source(file)]
    return sources


def _is_hub(cfg: DataConfig) -> bool:
    """Whether ``cfg.path`` is read with ``datasets.load_dataset`` (see the module docstring)."""
    if cfg.format != "auto":
        return cfg.format == "hf"
    path = cfg.path
    return (
        not path.startswith(_BUILTIN)
        and not Path(path).expanduser().exists()
        and not (looks_local(path))
    )


def _subset_config(cfg: DataConfig, name: str) -> DataConfig:
    """``cfg`` reading subset ``name`` alone: its ``data_dir`` on the hub, else ``path/name``."""
    if _is_hub(cfg):
        return dataclasses.replace(cfg, subsets=[], hf_data_dir=name)
    return dataclasses.replace(cfg, subsets=[], path=str(Path(cfg.path) / name))


def read_pairs(
    source: Source, cfg: DataConfig, split: str | None = None, *, sft: bool = False
) -> Iterator[PreferencePair | Rejection]:
    """Every row of ``source``, in order, as one pair or one rejection. ``split`` (optional)
    replaces the split of a ``datasets`` source, e.g. ``data.eval_split``. ``sft``: read for
    ``raypo sft`` (:func:`raypo.data.formats.normalise_row`)."""
    if split is not None and (source.kind == "hf" or source.split is not None):
        source = dataclasses.replace(source, split=split)
    label = source.label
    seen: dict[str, int] = {}
    for number, row, raw in _rows(source, cfg):
        if isinstance(row, Rejection):
            yield row
            continue
        raw = raw if raw is not None else raw_text(row)
        record = normalise_row(row, cfg, label, number, raw, group=source.subset, sft=sft)
        if cfg.id_field is not None and isinstance(record, PreferencePair):
            first = seen.setdefault(record.id, number)
            if first != number:
                detail = f"id {record.id!r} was already used by row {first}"
                record = Rejection(label, number, "duplicate_id", detail, raw[:RAW_CHARS])
        yield record


def iter_pairs(cfg: DataConfig, *, sft: bool = False) -> Iterator[PreferencePair | Rejection]:
    """Every source of ``cfg`` read in turn, stopping after ``cfg.max_rows`` rows (one process;
    the Ray Data pipeline reads sources in parallel); ``sft`` as in :func:`read_pairs`."""
    count = 0
    for source in list_sources(cfg):
        for record in read_pairs(source, cfg, sft=sft):
            if cfg.max_rows is not None and count >= cfg.max_rows:
                return
            count += 1
            yield record


def _rows(source: Source, cfg: DataConfig) -> Iterator[tuple[int, Any, str | None]]:
    """``(row number, decoded row or Rejection, raw text or None = not kept)``."""
    if source.kind == "jsonl":
        return _jsonl_rows(source)
    if source.kind == "parquet":
        return _parquet_rows(source)
    return _dataset_rows(source, cfg)


def _jsonl_rows(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    opener = gzip.open if source.path.endswith(".gz") else open
    with opener(source.path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, *_decode_line(line.rstrip(b"\r\n"), number, source.label)


def _decode_line(line: bytes, number: int, label: str) -> tuple[Any, str | None]:
    """``(decoded JSON value, text)`` of one JSONL line, or ``(Rejection, None)``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        detail = (
            f"byte 0x{line[error.start]:02x} at column {error.start + 1} is not UTF-8 "
            f"({error.reason}); re-encode the file as UTF-8"
        )
        raw = line.decode("utf-8", "backslashreplace")[:RAW_CHARS]
        return Rejection(label, number, "undecodable_bytes", detail, raw), None
    if number == 1:
        text = text.removeprefix("\ufeff")
    if not text.strip():
        return Rejection(label, number, "blank_line", "the line is empty", text[:RAW_CHARS]), None
    try:
        return json.loads(text), text
    except json.JSONDecodeError as error:
        detail = f"{error.msg} at column {error.colno}"
        return Rejection(label, number, "malformed_json", detail, text[:RAW_CHARS]), None


def _parquet_rows(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(source.path) as parquet:
        groups = parquet.metadata.num_row_groups
        first, stop = _shard_range(groups, source)
        number = sum(parquet.metadata.row_group(g).num_rows for g in range(first))
        if first == stop:
            return
        row_groups = list(range(first, stop))
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=row_groups):
            for row in batch.to_pylist():
                yield number, row, None
                number += 1


def _dataset_rows(source: Source, cfg: DataConfig) -> Iterator[tuple[int, Any, str | None]]:
    dataset = _load_dataset(source, cfg).with_format("arrow")
    first, stop = _shard_range(len(dataset), source)
    for start in range(first, stop, BATCH_ROWS):
        table = dataset[start : min(start + BATCH_ROWS, stop)]
        for offset, row in enumerate(table.to_pylist()):
            yield start + offset, row, None


def _shard_range(count: int, source: Source) -> tuple[int, int]:
    """``[first, stop)`` of the ``count`` rows (or row groups) that ``source``'s shard holds."""
    index, shards = source.shard_index, source.num_shards
    return count * index // shards, count * (index + 1) // shards


def _load_dataset(source: Source, cfg: DataConfig) -> Any:
    """The ``datasets.Dataset`` of a ``hf`` / ``hf_disk`` source (memory-mapped Arrow)."""
    if source.kind == "hf_disk":
        return _load_from_disk(source.path, source.split)
    split = source.split if source.split is not None else cfg.split
    data_dir = source.subset if source.subset is not None else cfg.hf_data_dir
    return _load_hub_or_files(source.path, split, cfg.hf_name, data_dir)


@functools.lru_cache(maxsize=4)
def _load_from_disk(path: str, split: str | None) -> Any:
    import datasets

    loaded = datasets.load_from_disk(path)
    if split is None:
        return loaded
    if split not in loaded:
        problem = f"has no split {split!r} (it has: {', '.join(loaded)}); set data.split"
        raise ConfigError("data.path", path, problem)
    return loaded[split]


@functools.lru_cache(maxsize=4)
def _load_hub_or_files(path: str, split: str, name: str | None, data_dir: str | None) -> Any:
    import datasets

    expanded = str(Path(path).expanduser())
    if Path(expanded).is_file() or (glob.has_magic(expanded) and glob.glob(expanded)):
        builder = name if name is not None else _builder_of(expanded)
        return datasets.load_dataset(builder, data_files=expanded, split=split)
    return datasets.load_dataset(path, name, data_dir=data_dir, split=split)


def _builder_of(path: str) -> str:
    kind = "csv" if path.endswith((".csv", ".csv.gz")) else _kind_of(path, strict=False)
    builder = _HF_BUILDERS.get(kind or "")
    if builder is None:
        problem = "cannot tell its datasets builder from the suffix; set data.hf_name (json, csv)"
        raise ConfigError("data.path", path, problem)
    return builder


def _builtin_source(cfg: DataConfig) -> Source:
    from raypo.models import builtin_data_path

    if cfg.format not in ("auto", "jsonl"):
        problem = f"builtin data is JSONL; use data.format auto or jsonl, not {cfg.format}"
        raise ConfigError("data.format", cfg.format, problem)
    try:
        path = builtin_data_path(cfg.path.removeprefix(_BUILTIN))
    except ValueError as error:
        raise ConfigError("data.path", cfg.path, str(error)) from None
    return Source("jsonl", str(path), name=cfg.path)


def _hf_sources(cfg: DataConfig) -> list[Source]:
    """Shards of ``load_dataset``'s split (loading it once here, from then on from its cache)."""
    try:
        rows = len(_load_hub_or_files(cfg.path, cfg.split, cfg.hf_name, cfg.hf_data_dir))
    except ConfigError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        problem = f"datasets.load_dataset failed: {first_line}"
        raise ConfigError("data.path", cfg.path, problem) from error
    return _shards("hf", cfg.path, rows, cfg.split)


def _disk_sources(cfg: DataConfig, path: Path) -> list[Source]:
    if not path.is_dir():
        problem = "is not a directory written by datasets' save_to_disk"
        raise ConfigError("data.path", cfg.path, problem)
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and cfg.split != "train":
        problem = (
            f"holds a single dataset without splits, so data.split {cfg.split!r} does not exist; "
            "save a DatasetDict or hold out data.eval_fraction instead"
        )
        raise ConfigError("data.path", cfg.path, problem)
    split = cfg.split if is_dict else None
    try:
        rows = len(_load_from_disk(str(path), split))
    except FileNotFoundError as error:
        raise ConfigError("data.path", cfg.path, f"cannot be loaded: {error}") from None
    return _shards("hf_disk", str(path), rows, split)


def _shards(
    kind: Literal["hf", "hf_disk"], path: str, rows: int, split: str | None
) -> list[Source]:
    count = max(1, math.ceil(rows / SHARD_ROWS))
    return [Source(kind, path, index, count, split) for index in range(count)]


def _parquet_sources(file: str) -> list[Source]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(file)
    except OSError as error:
        raise ConfigError("data.path", file, f"is not a readable Parquet file: {error}") from None
    count = max(1, min(metadata.num_row_groups, math.ceil(metadata.num_rows / SHARD_ROWS)))
    return [Source("parquet", file, index, count) for index in range(count)]


def _jsonl_source(file: str) -> Source:
    opener = gzip.open if file.endswith(".gz") else open
    with opener(file, "rb") as handle:
        start = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if start.startswith(b"["):
        problem = (
            "holds one JSON array, not JSON Lines (one object per line); convert it with "
            "`jq -c '.[]'` or read it with data.format hf"
        )
        raise ConfigError("data.path", file, problem)
    return Source("jsonl", file)


def looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local file rather than a hub name."""
    return (
        path.startswith(("/", ".", "~"))
        or glob.has_magic(path)
        or _kind_of(path, strict=False) is not None
    )


def _kind_of(file: str, strict: bool = True) -> str | None:
    """``jsonl`` or ``parquet`` from a file name's suffix; unknown -> ConfigError or None."""
    name = Path(file).name
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    if strict:
        problem = "cannot tell its format from the suffix; set data.format jsonl or parquet"
        raise ConfigError("data.path", file, problem)
    return None


def _data_files(path: str, fmt: str) -> list[str]:
    """The files a local path, glob or directory names (see the module docstring)."""
    expanded = Path(path).expanduser()
    if glob.has_magic(path):
        matches = sorted(glob.glob(str(expanded), recursive=True))
        files = [m for m in matches if Path(m).is_file()]
    elif expanded.is_dir():
        files = sorted(
            str(p) for p in expanded.rglob("*") if p.is_file() and not _hidden(p, expanded)
        )
    elif expanded.is_file():
        return [str(expanded) if path.startswith("~") else path]
    else:
        problem = "no such file or directory; give a file, glob, directory or builtin:hh_sample"
        raise ConfigError("data.path", path, problem)
    wanted = {fmt} if fmt in ("jsonl", "parquet") else {"jsonl", "parquet"}
    files = [f for f in files if _kind_of(f, strict=False) in wanted]
    if not files:
        suffixes = ", ".join(f"*{s}" for s, kind in _SUFFIXES.items() if kind in wanted)
        raise ConfigError("data.path", path, f"no data files ({suffixes}) found there")
    return files


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in path.relative_to(root).parts)

"""The reference pass: the frozen reference model runs once over the prepared pairs.

A Ray Data ``map_batches`` actor pool (``reference.num_actors`` actors of ``cpus_per_actor`` CPUs
and ``gpus_per_actor`` GPUs, each holding one copy of the model) adds four columns to every pair:
``ref_chosen_logps``, ``ref_rejected_logps`` (summed completion log-probs) and ``ref_hn_chosen``,
``ref_hn_rejected`` (MallowsPO's normalised entropy Hn, docs/methods.md). They are written as
Parquet under ``reference.cache_dir/<fingerprint>`` and reused while the fingerprint of everything
they depend on (data files, data settings, seed, tokenizer, reference model, dtype) is unchanged.
The actors finish batches out of order; a split that training reads unshuffled (``eval``, and
``train`` with ``data.shuffle`` false) is sorted back into the tokenised split's order and blocks
before it is written, so that online and precomputed runs feed the workers the same pairs.
With ``model.lora.load_in_4bit`` (QLoRA) the actors hold the reference in 4 bits, as the policy's
base is held in training, so that the reference is the model training starts from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray.data
import torch

from raypo.config import ModelConfig, RaypoConfig
from raypo.data.collate import collate_pairs
from raypo.data.pipeline import SOURCE_ORDER, PreparedData, read_split
from raypo.data.readers import list_sources
from raypo.forward import reference_columns
from raypo.models import disable_dropout_in_model, load_policy, resolve_model_path

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_hn_chosen", "ref_hn_rejected")
FINGERPRINT_FILE = "fingerprint.json"
COMPLETE_MARKER = "_COMPLETE"
FORMAT_VERSION = 2
"""What a pass stores, in its fingerprint so that older passes are not reused: 2 = the
:data:`raypo.data.pipeline.SOURCE_ORDER` column, unshuffled splits in source order."""


@dataclass(frozen=True)
class ReferencePass:
    """Where the reference-annotated splits are, and whether they came from the cache."""

    directory: Path
    """``reference.cache_dir/<fingerprint>``, holding ``train/`` and ``eval/`` Parquet."""
    fingerprint: str
    """sha256 of the inputs the columns depend on."""
    cache_hit: bool
    """True when an earlier pass with the same fingerprint was reused."""

    def split_path(self, split: str) -> Path:
        """Parquet directory of one annotated split."""
        return self.directory / split


def path_state(path: str) -> Any:
    """What identifies a file or directory's content: names, sizes and modification times."""
    root = Path(path)
    if not root.exists():
        return path
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def reference_fingerprint(config: RaypoConfig) -> str:
    """sha256 over the data sources and settings, the seed (it picks the held-out split), the
    tokenizer, the reference model, the dtype and 4-bit loading: a change to any of them misses
    the cache."""
    sources = [(asdict(source), path_state(source.path)) for source in list_sources(config.data)]
    inputs = {
        "format": FORMAT_VERSION,
        "data": asdict(config.data),
        "sources": sources,
        "seed": config.seed,
        "tokenizer": path_state(resolve_model_path(config.model.tokenizer_path)),
        "reference_model": path_state(resolve_model_path(config.reference_model_path)),
        "dtype": config.model.dtype,
        "load_in_4bit": config.model.lora.load_in_4bit,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


class ReferenceScorer:
    """Ray Data actor: holds the reference model, annotates batches of tokenised pairs."""

    def __init__(
        self, model_path: str, model: ModelConfig, chunk_size: int, padding_free: str
    ) -> None:
        self.model, tokenizer = load_policy(
            model_path, **model.load_kwargs, load_in_4bit=model.lora.load_in_4bit
        )
        if model.disable_dropout:
            # As TRL does for its reference model (eval mode already stops transformers' own).
            disable_dropout_in_model(self.model)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.pad_token_id = tokenizer.pad_token_id
        self.chunk_size = chunk_size
        self.padding_free = padding_free

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = collate_pairs(batch, self.pad_token_id)
        inputs = {name: value.to(self.device) for name, value in tensors.items()}
        columns = reference_columns(
            self.model, inputs, self.chunk_size, padding_free=self.padding_free
        )
        return {**batch, **{name: value.cpu().numpy() for name, value in columns.items()}}


def _file_starts(directory: Path) -> list[int]:
    """The first :data:`SOURCE_ORDER` of each Parquet file of a tokenised split but the lowest:
    cut there, the annotated split holds the same rows in each block as the tokenised one, so
    that Ray Train's split over the workers (whole blocks to each) is the same too."""
    files = [pq.ParquetFile(path) for path in directory.glob("*.parquet")]
    starts = [
        file.read_row_group(0, columns=[SOURCE_ORDER]).column(0)[0].as_py()
        for file in files
        if file.metadata.num_rows
    ]
    return sorted(starts)[1:]


def run_reference_pass(config: RaypoConfig, prepared: PreparedData) -> ReferencePass:
    """Annotate the prepared ``train`` and ``eval`` splits, or reuse a matching earlier pass."""
    fingerprint = reference_fingerprint(config)
    directory = config.reference_cache_path / fingerprint[:16]
    if (directory / COMPLETE_MARKER).exists():
        return ReferencePass(directory, fingerprint, cache_hit=True)
    if directory.exists():
        shutil.rmtree(directory)
    reference = config.reference
    for split in ("train", "eval"):
        if prepared.split_counts.get(split, 0) == 0:
            continue
        annotated = read_split(prepared.split_path(split)).map_batches(
            ReferenceScorer,
            fn_constructor_kwargs={
                "model_path": resolve_model_path(config.reference_model_path),
                "model": config.model,
                "chunk_size": config.trainer.logits_chunk_size,
                "padding_free": config.trainer.padding_free,
            },
            batch_size=reference.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=reference.num_actors),
            num_cpus=reference.cpus_per_actor,
            num_gpus=reference.gpus_per_actor,
        )
        if split == "eval" or not config.data.shuffle:
            # Once here rather than at every run's read: a sort is a distributed shuffle. A
            # shuffled read sorts by its own key, whatever order the files hold.
            boundaries = _file_starts(prepared.split_path(split))
            annotated = annotated.sort(SOURCE_ORDER, boundaries=boundaries or None)
        annotated.write_parquet(str(directory / split))
    (directory / FINGERPRINT_FILE).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    (directory / COMPLETE_MARKER).touch()
    return ReferencePass(directory, fingerprint, cache_hit=False)

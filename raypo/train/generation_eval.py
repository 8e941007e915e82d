"""The small generation eval run during training (``eval.during_training_num_prompts``).

Every ``trainer.eval_steps`` each worker samples completions for its share of a fixed set of
held-out prompts with the policy being trained (transformers ``generate``, the ``eval`` section's
sampling settings), the texts are gathered on every rank, and the numbers are logged with the
training metrics as ``eval/gen/*``: mean completion length in tokens, the fraction of completions
that ended with EOS, distinct-1/2 over all completions, and the seconds the eval took. Rank 0
appends the completions to ``RUN_DIR/generations.jsonl`` (one line per completion, with its step,
:func:`raypo.train.records.append_records`) so that a user can read how the policy's answers
change over training.

Under ZeRO-3 every rank holds a slice of each weight and must take part in every forward pass:
the shares are padded to equal length (padding prompts are generated and dropped) and
``generate`` runs with ``synced_gpus`` so a rank that finishes early keeps stepping with the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raypo.generation import Generation, SamplingSettings, distinct_n, generate_batch
from raypo.train.records import gather_records


@dataclass(frozen=True)
class GenerationPrompt:
    """One held-out prompt of the during-training generation eval."""

    id: str
    """Pair id of the prompt's held-out pair."""
    prompt_ids: list[int]
    """Prompt token ids as the data pipeline tokenised them."""


def select_prompts(rows: list[dict[str, Any]], num_prompts: int) -> list[GenerationPrompt]:
    """The first ``num_prompts`` held-out rows by pair id (the same prompts at every eval and on
    every restart), as :class:`GenerationPrompt`."""
    ordered = sorted(rows, key=lambda row: str(row["id"]))[:num_prompts]
    return [
        GenerationPrompt(str(row["id"]), [int(t) for t in row["prompt_ids"]]) for row in ordered
    ]


def rank_share(num_prompts: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Indices of this rank's contiguous share of the prompts, padded to the longest share by
    repeating its last index (or index 0 for an empty share), and how many are real."""
    shares = np.array_split(np.arange(num_prompts), world_size)
    longest = max(len(share) for share in shares)
    own = [int(i) for i in shares[rank]]
    filler = own[-1] if own else 0
    return own + [filler] * (longest - len(own)), len(own)


def _sample_share(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[GenerationPrompt],
    indices: list[int],
    settings: SamplingSettings,
    batch_size: int,
    synced_gpus: bool,
) -> list[tuple[int, Generation]]:
    """(position in ``indices``, completion) for every index; a batch's completions are seeded
    from the index of its first prompt."""
    results: list[tuple[int, Generation]] = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        generations = generate_batch(
            model,
            tokenizer,
            [prompts[i].prompt_ids for i in batch],
            settings,
            first_index=batch[0],
            synced_gpus=synced_gpus,
        )
        results += [(start + g.prompt_index - batch[0], g) for g in generations]
    return results


def generation_metrics(records: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    """``eval/gen/*`` of all ranks' completions (records as written to generations.jsonl)."""
    texts = [record["completion"] for record in records]
    metrics = {
        "eval/gen/completions": float(len(records)),
        "eval/gen/mean_tokens": float(np.mean([record["tokens"] for record in records])),
        "eval/gen/stopped": float(np.mean([record["stopped"] for record in records])),
        "eval/gen/seconds": seconds,
    }
    for n in (1, 2):
        value = distinct_n(texts, n)
        if value is not None:
            metrics[f"eval/gen/distinct_{n}"] = value
    return metrics


def run_generation_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[GenerationPrompt],
    settings: SamplingSettings,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    synced_gpus: bool,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Sample this rank's share, gather every rank's completions; returns the ``eval/gen/*``
    metrics and all completions ordered by prompt (identical on every rank). Every rank must
    call this together."""
    started = time.perf_counter()
    indices, real = rank_share(len(prompts), rank, world_size)
    was_training = model.training
    model.eval()
    try:
        generations = _sample_share(
            model, tokenizer, prompts, indices, settings, batch_size, synced_gpus
        )
    finally:
        model.train(was_training)
    eos = tokenizer.eos_token_id
    records = [
        {
            "id": prompts[indices[position]].id,
            "sample": g.sample_index,
            "prompt": tokenizer.decode(prompts[indices[position]].prompt_ids),
            "completion": g.text,
            "tokens": len(g.token_ids),
            "stopped": bool(g.token_ids) and g.token_ids[-1] == eos,
        }
        for position, g in generations
        if position < real
    ]
    gathered = sorted(gather_records(records, world_size), key=_order)
    return generation_metrics(gathered, time.perf_counter() - started), gathered


def _order(record: dict[str, Any]) -> tuple[str, int]:
    return record["id"], record["sample"]

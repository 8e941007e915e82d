"""Padding-free layouts of a right-padded batch: the decoder runs on real tokens only.

A collated batch (:func:`raypo.data.collate.collate_pairs`) pads its ``2B`` sequences to the
longest one; on the HH pairs at ``max_length`` 512 more than half of the positions are padding,
and a decoder spends the same compute on a padded position as on a real one. Two layouts give
the decoder the same sequences without most of that padding, and map its last hidden states
back to the padded ``[2B, T, H]`` layout, so that everything after the decoder (the chunked
log-probs, the head's transform, the entropies) is unchanged:

- ``bucketed``: the sequences sorted by length and cut into consecutive groups, each a smaller
  right-padded batch of its own width (:func:`length_buckets` chooses the cut that minimises the
  positions computed plus a fixed cost per forward); one decoder forward per group. Exact for
  every model that handles right padding, whatever its attention kernel.
- ``packed``: the sequences laid end to end in rows no longer than the longest one (first fit,
  longest first), with ``position_ids`` restarting at each sequence and no attention mask, so
  that transformers builds a block-diagonal causal mask (SDPA, eager) or calls flash-attention's
  variable-length kernel (``flash_attention_2``), as TRL's ``padding_free`` and OpenRLHF's
  ``packing_samples`` do. One forward per step. Exact only for models whose attention honours
  packed ``position_ids``; :mod:`raypo.forward` checks that once per model.

Both return, besides the decoder inputs, a ``gather`` index ``[2B, T]`` into the concatenated
real hidden states, with which :func:`unpack_hidden` rebuilds the padded layout (padding
positions read an arbitrary real row; no loss reads them), and a ``real`` mask per forward that
selects the rows of a Mixture-of-Experts router's logits that belong to real tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BUCKET_OVERHEAD_TOKENS = 32
"""Fixed cost of one more decoder forward, in token positions, that :func:`length_buckets`
weighs against the padding it saves: on the CPU benchmark model (hidden 256, 4 layers) a forward
and backward cost about as much Python and kernel-launch time as 30 token positions."""

MAX_BUCKETS = 8
"""Most decoder forwards per batch in the ``bucketed`` layout."""


@dataclass(frozen=True)
class DecoderCall:
    """The inputs of one decoder forward and which of its positions are real tokens."""

    input_ids: Tensor
    """``[rows, width]`` token ids."""
    attention_mask: Tensor | None
    """``[rows, width]`` (bucketed) or None (packed: the positions say where sequences start)."""
    position_ids: Tensor | None
    """``[rows, width]`` restarting at 0 for each packed sequence; None (bucketed) = the model's
    default positions."""
    real: Tensor
    """``[rows * width]`` bool: the flattened positions that hold a real token."""


@dataclass(frozen=True)
class Layout:
    """A batch's decoder forwards and the way back to its padded layout."""

    calls: tuple[DecoderCall, ...]
    gather: Tensor
    """``[2B, T]`` int64: row of the concatenated flattened hidden states of all ``calls`` that
    holds each position of the padded batch (0 for padding)."""


def length_buckets(
    lengths: Sequence[int],
    overhead_tokens: int = BUCKET_OVERHEAD_TOKENS,
    max_buckets: int = MAX_BUCKETS,
) -> list[list[int]]:
    """Indices of ``lengths`` sorted by length and cut into at most ``max_buckets`` consecutive
    groups, the cut minimising ``sum(group size * longest in group) + overhead_tokens * groups``
    (dynamic programming over the sorted lengths, exact)."""
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    order = sorted(range(len(lengths)), key=lambda index: lengths[index])
    sorted_lengths = [lengths[index] for index in order]
    count = len(order)
    infinity = float("inf")
    # cost[k][j]: least cost of the first j sorted sequences in k groups; cut[k][j]: last group's
    # start. A group of sorted sequences costs its size times its last (longest) length.
    cost = [[infinity] * (count + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (count + 1) for _ in range(max_buckets + 1)]
    cost[0][0] = 0.0
    for groups in range(1, max_buckets + 1):
        for end in range(1, count + 1):
            for start in range(groups - 1, end):
                value = cost[groups - 1][start] + (end - start) * sorted_lengths[end - 1]
                if value < cost[groups][end]:
                    cost[groups][end], cut[groups][end] = value, start
    best = min(
        range(1, min(max_buckets, count) + 1),
        key=lambda groups: cost[groups][count] + overhead_tokens * groups,
    )
    bounds, end = [], count
    for groups in range(best, 0, -1):
        start = cut[groups][end]
        bounds.append((start, end))
        end = start
    return [order[start:end] for start, end in reversed(bounds)]


def bucketed_layout(input_ids: Tensor, attention_mask: Tensor, buckets: list[list[int]]) -> Layout:
    """One right-padded forward per bucket of row indices, each trimmed to its longest row."""
    lengths = attention_mask.sum(dim=1)
    gather = torch.zeros_like(input_ids)
    calls, offset = [], 0
    for bucket in buckets:
        rows = torch.tensor(bucket, dtype=torch.long, device=input_ids.device)
        longest = int(lengths[rows].max())
        mask = attention_mask[rows, :longest]
        calls.append(DecoderCall(input_ids[rows, :longest], mask, None, mask.reshape(-1).bool()))
        local = torch.arange(len(bucket) * longest, device=input_ids.device)
        gather[rows, :longest] = offset + local.view(len(bucket), longest)
        offset += len(bucket) * longest
    gather.masked_fill_(attention_mask == 0, 0)
    return Layout(tuple(calls), gather)


def packed_layout(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int) -> Layout:
    """The real tokens of every row laid end to end in rows of the longest row's length (first
    fit, longest first); each row's unused tail is one more segment of padding."""
    lengths = [int(length) for length in attention_mask.sum(dim=1).tolist()]
    capacity = max(lengths)
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        target = next((r for r, room in enumerate(free) if room >= lengths[index]), None)
        if target is None:
            rows.append([])
            free.append(capacity)
            target = len(rows) - 1
        rows[target].append(index)
        free[target] -= lengths[index]
    device = input_ids.device
    packed = torch.full((len(rows), capacity), pad_token_id, dtype=input_ids.dtype, device=device)
    positions = torch.zeros((len(rows), capacity), dtype=torch.long, device=device)
    real = torch.zeros((len(rows), capacity), dtype=torch.bool, device=device)
    gather = torch.zeros_like(input_ids)
    for row, members in enumerate(rows):
        column = 0
        for index in members:
            length = lengths[index]
            packed[row, column : column + length] = input_ids[index, :length]
            positions[row, column : column + length] = torch.arange(length, device=device)
            real[row, column : column + length] = True
            start = row * capacity + column
            gather[index, :length] = torch.arange(start, start + length, device=device)
            column += length
        positions[row, column:] = torch.arange(capacity - column, device=device)
    call = DecoderCall(packed, None, positions, real.reshape(-1))
    return Layout((call,), gather)


def unpack_hidden(hidden_states: Sequence[Tensor], layout: Layout) -> Tensor:
    """The ``[2B, T, H]`` padded layout of the calls' last hidden states (differentiable)."""
    flat = torch.cat([states.reshape(-1, states.shape[-1]) for states in hidden_states])
    return flat[layout.gather]


def real_router_logits(router_logits: Sequence[Sequence[Tensor]], layout: Layout) -> tuple:
    """Per MoE layer, the router logits of the real tokens of every call, concatenated: what
    ``load_balancing_loss_func`` needs with ``attention_mask=None`` to count exactly the tokens
    that the padded batch's attention mask counts."""
    layers = zip(*router_logits, strict=True)
    return tuple(
        torch.cat([logits[call.real] for logits, call in zip(per_call, layout.calls, strict=True)])
        for per_call in layers
    )

"""Padding-free layouts: the decoder's hidden states of every real position equal the padded
batch's, the bucket choice is the cheapest, and the packing never exceeds the padded width."""

from __future__ import annotations

import itertools

import pytest
import torch
from tiny_models import PAD, tiny_causal_lm

from raypo.forward import padding_free_layout
from raypo.padding_free import (
    bucketed_layout,
    length_buckets,
    packed_layout,
    real_router_logits,
    unpack_hidden,
)


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(3, 300, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def brute_force_cost(lengths: list[int], overhead: int, max_buckets: int) -> float:
    """Least cost over every cut of the sorted lengths into at most ``max_buckets`` groups."""
    ordered = sorted(lengths)
    best = float("inf")
    for groups in range(1, min(max_buckets, len(ordered)) + 1):
        for cuts in itertools.combinations(range(1, len(ordered)), groups - 1):
            bounds = [0, *cuts, len(ordered)]
            cost = sum((b - a) * ordered[b - 1] for a, b in itertools.pairwise(bounds))
            best = min(best, cost + overhead * groups)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_length_buckets_find_the_cheapest_cut(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 200, (int(torch.randint(1, 9, (1,), generator=generator)),))
    lengths = lengths.tolist()
    overhead = int(torch.randint(0, 100, (1,), generator=generator))
    buckets = length_buckets(lengths, overhead_tokens=overhead, max_buckets=4)
    assert sorted(i for bucket in buckets for i in bucket) == list(range(len(lengths)))
    cost = sum(len(b) * max(lengths[i] for i in b) for b in buckets) + overhead * len(buckets)
    assert cost == brute_force_cost(lengths, overhead, 4)
    assert len(buckets) <= 4


def test_no_overhead_means_one_bucket_per_distinct_length_up_to_the_cap() -> None:
    assert len(length_buckets([5, 5, 9, 9, 12], overhead_tokens=0, max_buckets=8)) == 3
    assert length_buckets([5, 9], overhead_tokens=10**6) == [[0, 1]]


@pytest.mark.parametrize("layout_name", ["bucketed", "packed"])
def test_hidden_states_of_real_positions_equal_the_padded_forward(layout_name: str) -> None:
    model = tiny_causal_lm("llama")
    lengths = [7, 19, 3, 19, 11, 5, 16, 2]
    ids, mask = padded_batch(lengths)
    with torch.no_grad():
        expected = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if layout_name == "bucketed":
            layout = bucketed_layout(ids, mask, length_buckets(lengths, overhead_tokens=0))
        else:
            layout = packed_layout(ids, mask, PAD)
        states = [
            model.model(
                input_ids=call.input_ids,
                attention_mask=call.attention_mask,
                position_ids=call.position_ids,
                use_cache=False,  # transformers detects packing only without a cache
            ).last_hidden_state
            for call in layout.calls
        ]
        got = unpack_hidden(states, layout)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-12, atol=1e-12)
    computed = sum(call.input_ids.numel() for call in layout.calls)
    assert sum(lengths) <= computed < ids.numel()
    assert sum(int(call.real.sum()) for call in layout.calls) == sum(lengths)


def test_packed_rows_are_no_longer_than_the_longest_sequence() -> None:
    lengths = [10, 9, 1, 5, 5, 4, 6]
    ids, mask = padded_batch(lengths)
    layout = packed_layout(ids, mask, PAD)
    (call,) = layout.calls
    assert call.input_ids.shape == (4, 10)  # 10 | 9+1 | 6+4 | 5+5
    assert call.attention_mask is None
    # every sequence restarts its positions at 0; its tokens are where the gather index says
    flat_ids = call.input_ids.reshape(-1)
    assert torch.equal(flat_ids[layout.gather][mask.bool()], ids[mask.bool()])
    flat_positions = call.position_ids.reshape(-1)[layout.gather]
    expected_positions = torch.arange(ids.shape[1]).expand_as(ids)
    assert torch.equal(flat_positions[mask.bool()], expected_positions[mask.bool()])


def test_router_logits_of_real_tokens_are_those_the_padded_mask_counts() -> None:
    lengths = [4, 2, 3]
    ids, mask = padded_batch(lengths)
    layout = bucketed_layout(ids, mask, [[1], [2, 0]])
    # one fake MoE layer whose "router logit" of a position is its token id
    per_call = [[call.input_ids.reshape(-1, 1).double()] for call in layout.calls]
    (layer,) = real_router_logits(per_call, layout)
    assert sorted(layer.squeeze(1).long().tolist()) == sorted(ids[mask.bool()].tolist())


@pytest.mark.parametrize(
    ("setting", "kernel", "zero3", "layout"),
    [
        ("auto", "sdpa", False, "bucketed"),
        ("auto", "eager", False, "bucketed"),
        ("auto", "flash_attention_2", False, "packed"),
        ("auto", "sdpa", True, "packed"),
        ("off", "flash_attention_2", True, "off"),
        ("bucketed", "sdpa", False, "bucketed"),
    ],
)
def test_auto_packs_for_flash_attention_and_zero3_else_buckets(
    setting: str, kernel: str, zero3: bool, layout: str
) -> None:
    assert padding_free_layout(setting, kernel, zero3) == layout


def test_bucketed_under_zero3_is_refused() -> None:
    with pytest.raises(ValueError, match="ZeRO-3"):
        padding_free_layout("bucketed", "sdpa", True)

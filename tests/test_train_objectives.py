"""Every registered objective, through the training path's forward and loss, lowers its loss on a
fixed small set of real HH pairs (single process, tiny model, plain Adam).

The Ray Train + DeepSpeed loop runs the same three pieces (collate_pairs, forward.sequence_stats,
losses.preference_loss); tests/test_train_e2e.py covers the distributed wiring.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hh_pairs import hh_columns

from raypo.config import LossConfig
from raypo.data.collate import collate_pairs
from raypo.forward import preference_batch, reference_columns, sequence_stats
from raypo.losses import OBJECTIVES, StrengthDistribution, preference_loss
from raypo.models import load_policy

DISPERSION_SCALE = 50.0
"""The untrained tiny reference is near-uniform (Hn ~ 0.999), so w = -c ln Hn is ~3e-4 at the
default c = 0.29 and the Mallows losses would barely move in 8 steps; c = 50 gives w ~ 0.05."""


@pytest.fixture(scope="module")
def fixed_batch(raypo_cache: str) -> dict[str, torch.Tensor]:
    model, tokenizer = load_policy("tiny")
    columns = hh_columns(tokenizer)
    batch = collate_pairs(columns, tokenizer.pad_token_id)
    batch |= reference_columns(model, batch)
    return batch


def _loss(model, batch, config: LossConfig, strength) -> torch.Tensor:
    stats = sequence_stats(model, batch, compute_entropy=False)
    inputs = preference_batch(stats, batch, DISPERSION_SCALE)
    return preference_loss(config, inputs, strength)[0]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_lowers_its_loss_on_a_fixed_set(name: str, fixed_batch) -> None:
    torch.manual_seed(0)
    model, _ = load_policy("tiny")
    # IPO's target margin 1/(2 beta) is 0.5 at beta 1, narrower than one Adam step moves a sum of
    # ~40 token log-probs; beta 0.1 puts it at 5.
    config = dataclasses.replace(LossConfig(), type=name, beta=0.1 if "ipo" in name else 1.0)
    strength = StrengthDistribution("lognormal", 1.0, 0.5) if name == "mixdpo" else None
    parameters = list(model.parameters()) + (list(strength.parameters()) if strength else [])
    optimizer = torch.optim.Adam(parameters, lr=3e-4)
    losses = []
    for _ in range(8):
        loss = _loss(model, fixed_batch, config, strength)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = _loss(model, fixed_batch, config, strength).item()
    assert final < losses[0] * (1 - 1e-3), (name, losses, final)

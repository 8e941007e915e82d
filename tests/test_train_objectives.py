"""Every registered objective, through the training path's forward and loss, lowers its loss on a
fixed small set of real HH pairs (single process, tiny model, plain Adam).

The Ray Train + DeepSpeed loop calls the same public step (collate_pairs, then
raypo.step.preference_step); tests/test_train_distributed.py and tests/test_train_e2e.py cover the
distributed wiring.
"""

from __future__ import annotations

import pytest
import torch
from hh_pairs import hh_columns

from raypo.config import LossConfig
from raypo.data.collate import collate_pairs
from raypo.forward import reference_columns
from raypo.mixdpo import StrengthDistribution
from raypo.models import load_policy
from raypo.objectives import OBJECTIVES
from raypo.step import preference_step

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
    return preference_step(model, batch, config, strength=strength).loss


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_lowers_its_loss_on_a_fixed_set(name: str, fixed_batch) -> None:
    torch.manual_seed(0)
    model, _ = load_policy("tiny")
    # IPO's target margin 1/(2 beta) is 0.5 at beta 1, narrower than one Adam step moves a sum of
    # ~40 token log-probs; beta 0.1 puts it at 5.
    beta = 0.1 if "ipo" in name else 1.0
    config = LossConfig(type=name, beta=beta, dispersion_scale=DISPERSION_SCALE)
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

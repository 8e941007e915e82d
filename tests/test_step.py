"""The public step :func:`raypo.step.preference_step` against an independent float64 computation
on the tiny model, and its choice of reference values."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
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


@pytest.fixture(scope="module")
def models_and_batch(raypo_cache: str):
    torch.manual_seed(0)
    policy, tokenizer = load_policy("tiny")
    reference, _ = load_policy("tiny")
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))  # a reference that differs from the policy
    columns = hh_columns(tokenizer, count=4)
    return policy.eval(), reference.eval(), columns, tokenizer.pad_token_id


def _float64_stats(model, columns) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs and normalised entropies Hn of each sequence (chosen first),
    one unpadded sequence at a time, from the model's own logits in float64."""
    logps, hns = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for prompt, completion in zip(columns["prompt_ids"], columns[half], strict=True):
            ids = torch.tensor([list(prompt) + list(completion)])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].double()
            start = len(prompt) - 1
            logp = torch.log_softmax(logits[start:-1], dim=-1)
            targets = ids[0, len(prompt) :]
            logps.append(float(logp.gather(1, targets[:, None]).sum()))
            entropy = -(logp.exp() * logp).sum(-1)
            hns.append(float(entropy.mean() / math.log(logits.shape[-1])))
    return np.array(logps), np.array(hns)


def _strength(name: str, mean: float) -> StrengthDistribution | None:
    """MixDPO's strength distribution (CV 0.5) for an objective that learns one, else None."""
    if not OBJECTIVES[name].learns_strength:
        return None
    return StrengthDistribution("lognormal", mean, 0.5)


def test_mallows_theta_step_equals_an_independent_float64_computation(models_and_batch) -> None:
    """loss = mean -log sigma(beta w h), w = -c ln((Hn_w + Hn_l) / 2) from the reference."""
    policy, reference, columns, pad = models_and_batch
    config = LossConfig(type="mallows_theta", beta=0.5, dispersion_scale=3.0)
    with torch.no_grad():
        result = preference_step(
            policy, collate_pairs(columns, pad), config, reference_model=reference
        )
    pol, _ = _float64_stats(policy, columns)
    ref, ref_hn = _float64_stats(reference, columns)
    size = len(columns["prompt_ids"])
    h = (pol[:size] - ref[:size]) - (pol[size:] - ref[size:])
    w = -3.0 * np.log((ref_hn[:size] + ref_hn[size:]) / 2)
    expected = np.mean(np.logaddexp(0.0, -0.5 * w * h))
    assert float(result.loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Hn ~ 0.996 here (random tiny model): fp32 Hn carries ~1e-7 absolute error, which c ln Hn
    # turns into ~3e-7 absolute on w ~ 0.012.
    assert float(result.metrics["dispersion/mean"]) == pytest.approx(w.mean(), abs=1e-6)
    assert float(result.metrics["reference/accuracies"]) == np.mean(ref[:size] > ref[size:])
    assert result.tokens == int(collate_pairs(columns, pad)["attention_mask"].sum())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_precomputed_columns_and_online_reference_give_the_same_step(
    models_and_batch, name: str
) -> None:
    policy, reference, columns, pad = models_and_batch
    config = LossConfig(type=name, dispersion_scale=3.0)
    strength = _strength(name, mean=0.1)
    batch = collate_pairs(columns, pad)
    with torch.no_grad():
        online = preference_step(
            policy, batch, config, reference_model=reference, strength=strength
        )
        precomputed = batch | reference_columns(reference, batch)
        stored = preference_step(policy, precomputed, config, strength=strength)
    assert float(online.loss) == pytest.approx(float(stored.loss), rel=1e-6, abs=1e-7)
    assert online.metrics.keys() == stored.metrics.keys()


def test_held_out_values_per_pair_equal_an_independent_float64_computation(
    models_and_batch,
) -> None:
    """held_out=True: per pair r_w, r_l = beta (logp - ref) and Hn(x) = (Hn(y_w) +
    Hn(y_l)) / 2 of policy and reference, as the held-out evaluation records them; the
    entropy/* metrics are their means. Without it neither the policy's Hn nor per_pair is
    computed."""
    policy, reference, columns, pad = models_and_batch
    config = LossConfig(type="dpo", beta=0.5)
    batch = collate_pairs(columns, pad)
    with torch.no_grad():
        result = preference_step(policy, batch, config, reference_model=reference, held_out=True)
        precomputed = batch | reference_columns(reference, batch)
        plain = preference_step(policy, precomputed, config)
        stored = preference_step(policy, precomputed, config, held_out=True)
    pol, pol_hn = _float64_stats(policy, columns)
    ref, ref_hn = _float64_stats(reference, columns)
    size = len(columns["prompt_ids"])
    values = {name: value.double().numpy() for name, value in result.per_pair.items()}
    # fp32 sums of some hundred log-probs of about -10 nats each: ~1e-4 absolute error.
    np.testing.assert_allclose(values["reward_chosen"], 0.5 * (pol - ref)[:size], atol=1e-4)
    np.testing.assert_allclose(values["reward_rejected"], 0.5 * (pol - ref)[size:], atol=1e-4)
    # An online reference computes its entropies for the held-out evaluation whatever the
    # objective, so that raypo report can bucket DPO runs by the reference's dispersion.
    np.testing.assert_allclose(
        values["reference_hn"], (ref_hn[:size] + ref_hn[size:]) / 2, atol=1e-6
    )
    policy_hn = (pol_hn[:size] + pol_hn[size:]) / 2
    np.testing.assert_allclose(values["policy_hn"], policy_hn, atol=1e-6)
    assert float(result.metrics["entropy/policy"]) == pytest.approx(policy_hn.mean(), abs=1e-6)
    # Precomputed columns carry the reference's entropies whatever the objective.
    reference_hn = stored.per_pair["reference_hn"].double().numpy()
    np.testing.assert_allclose(reference_hn, (ref_hn[:size] + ref_hn[size:]) / 2, atol=1e-6)
    # Training's step (held_out off) computes neither the policy's Hn nor any per-pair value.
    assert plain.per_pair == {} and "entropy/policy" not in plain.metrics
    assert float(result.loss) == pytest.approx(float(plain.loss), rel=1e-6)


def test_a_batch_without_the_reference_columns_is_refused(models_and_batch) -> None:
    policy, _, columns, pad = models_and_batch
    with pytest.raises(ValueError, match="ref_hn_chosen"):
        preference_step(policy, collate_pairs(columns, pad), LossConfig(type="mallows_phi"))
    # A reference-free objective needs nothing of the reference.
    simpo = preference_step(policy, collate_pairs(columns, pad), LossConfig(type="simpo"))
    assert "reference/accuracies" not in simpo.metrics


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_each_objective_reads_exactly_the_settings_it_declares(models_and_batch, name) -> None:
    """Changing a loss.* number changes the step's loss iff raypo.objectives declares it read
    (the MixDPO settings act through the StrengthDistribution the loop builds, not here)."""
    policy, reference, columns, pad = models_and_batch
    batch = collate_pairs(columns, pad)
    batch |= reference_columns(reference, batch)
    base = LossConfig(type=name, beta=0.5, gamma=0.3, label_smoothing=0.1, dispersion_scale=3.0)
    strength = _strength(name, mean=0.5)
    changed = {"beta": 0.7, "gamma": 0.6, "label_smoothing": 0.2, "dispersion_scale": 1.5}
    with torch.no_grad():
        reference_loss = float(preference_step(policy, batch, base, strength=strength).loss)
        for field, value in changed.items():
            config = dataclasses.replace(base, **{field: value})
            loss = float(preference_step(policy, batch, config, strength=strength).loss)
            assert (loss != reference_loss) == (field in OBJECTIVES[name].settings), field


def test_validating_a_config_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from raypo.config import load_config\n"
        "load_config(None, ['--loss.type', 'mallows_phi', '--reference.mode', 'online'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

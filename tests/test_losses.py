"""Checks of raypo.losses against independent computations (docs/methods.md, "Independent checks").

References are float64 numpy formulas or mpmath at 50 digits evaluating the papers' formulas
directly (not the stable rewrites the code uses), and brute-force permutation enumeration.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import mpmath
import numpy as np
import pytest
import torch

from raypo import losses
from raypo.losses import (
    LOSS_FUNCTIONS,
    PreferenceBatch,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    length_normalised_margin,
    mallows_phi_link,
    mallows_phi_loss,
    mallows_theta_ipo_loss,
    mallows_theta_loss,
    mallows_theta_simpo_loss,
    preference_loss,
    simpo_loss,
)
from raypo.objectives import OBJECTIVES

mpmath.mp.dps = 50

EDGE_MARGINS = np.array([0.0, 1e-8, -1e-8, 0.3, -0.7, 2.5, -4.0, 40.0, -60.0])


def _margins(seed: int = 0, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([EDGE_MARGINS, rng.normal(0.0, 5.0, n)])


def _weights(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(1e-3, 3.0, n)


def _torch(x: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def _value_and_grad(fn, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ht = _torch(h)
    out = fn(ht)
    out.sum().backward()
    return out.detach().numpy(), ht.grad.numpy()


def _np_log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


def _np_sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(_np_log_sigmoid(z))


# ---------------------------------------------------------------- hand-computed cases


def test_dpo_hand_computed() -> None:
    """h = 0: -log sigma(0) = ln 2 = 0.693147...; beta 0.5, h 2: -log sigma(1) = ln(1 + e^-1)
    = 0.313262; with eps 0.25: 0.75*0.313262 + 0.25*ln(1 + e) = 0.234947 + 0.328316 = 0.563262."""
    h = torch.tensor([0.0, 2.0, 2.0], dtype=torch.float64)
    got = torch.stack(
        [dpo_loss(h[:1], 1.0)[0], dpo_loss(h[1:2], 0.5)[0], dpo_loss(h[2:], 0.5, 0.25)[0]]
    )
    torch.testing.assert_close(
        got, torch.tensor([0.693147, 0.313262, 0.563262], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_ipo_hinge_simpo_hand_computed() -> None:
    """IPO beta 0.25, h 1: (1 - 2)^2 = 1. Hinge beta 0.5, h 1: relu(1 - 0.5) = 0.5.
    SimPO: logps -6 over 3 tokens vs -8 over 2 tokens: h = -2 - (-4) = 2; beta 2, gamma 1:
    -log sigma(4 - 1) = ln(1 + e^-3) = 0.048587."""
    one = torch.tensor([1.0], dtype=torch.float64)
    assert ipo_loss(one, 0.25).item() == pytest.approx(1.0, abs=1e-12)
    assert hinge_loss(one, 0.5).item() == pytest.approx(0.5, abs=1e-12)
    h = length_normalised_margin(
        torch.tensor([-6.0]), torch.tensor([-8.0]), torch.tensor([3]), torch.tensor([2])
    )
    got = simpo_loss(h, 2.0, 1.0)
    assert got.item() == pytest.approx(0.048587, abs=1e-6)


def test_mallows_theta_simpo_hand_computed() -> None:
    """The SimPO pair above (h = 2, beta 2, gamma 1: beta h - gamma = 3) with w = 0.5:
    -log sigma(0.5 * 3) = ln(1 + e^-1.5) = 0.201413; with w = 1 it is SimPO's 0.048587."""
    h = torch.tensor([2.0, 2.0], dtype=torch.float64)
    got = mallows_theta_simpo_loss(h, torch.tensor([0.5, 1.0], dtype=torch.float64), 2.0, 1.0)
    torch.testing.assert_close(
        got, torch.tensor([0.201413, 0.048587], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_mallows_phi_hand_computed() -> None:
    """phi = 0.5 (w = ln 2), s = 1: g(1) = 2/(1 - 1/4) - 1/(1 - 1/2) = 8/3 - 2 = 2/3, loss ln 1.5
    = 0.405465; s = -1: g = 1 - 2/3 = 1/3, loss ln 3 = 1.098612."""
    w = torch.full((2,), math.log(2.0), dtype=torch.float64)
    got = mallows_phi_loss(torch.tensor([1.0, -1.0], dtype=torch.float64), w, beta=1.0)
    torch.testing.assert_close(
        got, torch.tensor([math.log(1.5), math.log(3.0)], dtype=torch.float64), atol=1e-12, rtol=0
    )


# ---------------------------------------------------------------- float64 parity


@pytest.mark.parametrize("beta", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_numpy(beta: float, eps: float) -> None:
    h = _margins()
    value, grad = _value_and_grad(lambda t: dpo_loss(t, beta, eps), h)
    z = beta * h
    expected = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
    expected_grad = -beta * ((1 - eps) * _np_sigmoid(-z) - eps * _np_sigmoid(z))
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.05, 0.5, 3.0])
def test_ipo_and_hinge_match_numpy(beta: float) -> None:
    h = _margins()
    value, grad = _value_and_grad(lambda t: ipo_loss(t, beta), h)
    np.testing.assert_allclose(value, (h - 1 / (2 * beta)) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grad, 2 * (h - 1 / (2 * beta)), rtol=1e-12)
    value, grad = _value_and_grad(lambda t: hinge_loss(t, beta), h)
    np.testing.assert_allclose(value, np.maximum(0.0, 1 - beta * h), rtol=1e-12)
    np.testing.assert_allclose(grad, np.where(1 - beta * h > 0, -beta, 0.0), rtol=1e-12)


def test_simpo_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    lw, ll = -rng.uniform(1, 200, 32), -rng.uniform(1, 200, 32)
    nw, nl = rng.integers(1, 100, 32), rng.integers(1, 100, 32)
    beta, gamma = 2.0, 0.5
    lw_t, ll_t = _torch(lw), _torch(ll)
    h = length_normalised_margin(lw_t, ll_t, torch.tensor(nw), torch.tensor(nl))
    out = simpo_loss(h, beta, gamma)
    out.sum().backward()
    z = beta * (lw / nw - ll / nl) - gamma
    np.testing.assert_allclose(out.detach().numpy(), -_np_log_sigmoid(z), rtol=1e-12)
    np.testing.assert_allclose(lw_t.grad.numpy(), -_np_sigmoid(-z) * beta / nw, rtol=1e-10)
    np.testing.assert_allclose(ll_t.grad.numpy(), _np_sigmoid(-z) * beta / nl, rtol=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mallows_theta_matches_numpy(eps: float) -> None:
    h = _margins()
    w = _weights(len(h))
    beta = 0.3
    value, grad = _value_and_grad(lambda t: mallows_theta_loss(t, torch.tensor(w), beta, eps), h)
    z = beta * w * h
    expected = -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
    expected_grad = -beta * w * ((1 - eps) * _np_sigmoid(-z) - eps * _np_sigmoid(z))
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-14)


def test_mallows_theta_ipo_matches_numpy() -> None:
    h = _margins()
    w = _weights(len(h))
    beta = 0.3
    value, grad = _value_and_grad(lambda t: mallows_theta_ipo_loss(t, torch.tensor(w), beta), h)
    np.testing.assert_allclose(value, (w * h - 1 / (2 * beta)) ** 2, rtol=1e-12)
    np.testing.assert_allclose(grad, 2 * w * (w * h - 1 / (2 * beta)), rtol=1e-12)


def test_mallows_theta_simpo_matches_numpy() -> None:
    h = _margins()
    w = _weights(len(h))
    beta, gamma = 2.0, 0.5
    weight = torch.tensor(w)
    value, grad = _value_and_grad(lambda t: mallows_theta_simpo_loss(t, weight, beta, gamma), h)
    z = w * (beta * h - gamma)
    np.testing.assert_allclose(value, -_np_log_sigmoid(z), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, -beta * w * _np_sigmoid(-z), rtol=1e-12, atol=1e-14)


def test_mallows_theta_simpo_with_unit_weight_is_simpo() -> None:
    h = torch.tensor(_margins())
    torch.testing.assert_close(
        mallows_theta_simpo_loss(h, torch.ones_like(h), 1.5, 0.3), simpo_loss(h, 1.5, 0.3)
    )


def test_mallows_theta_with_unit_weight_is_dpo() -> None:
    h = torch.tensor(_margins())
    torch.testing.assert_close(
        mallows_theta_loss(h, torch.ones_like(h), 0.7, 0.1), dpo_loss(h, 0.7, 0.1)
    )


def _mp_link(s: float, w: float) -> mpmath.mpf:
    """g_phi(s) straight from the paper's formula at 50 digits; g(0) is the stated limit."""
    phi = mpmath.exp(-mpmath.mpf(w))
    s = mpmath.mpf(s)

    def g_pos(k):
        if k == 0:
            return 1 / (1 - phi) + 1 / mpmath.log(phi)
        return (k + 1) / (1 - phi ** (k + 1)) - k / (1 - phi**k)

    return g_pos(s) if s >= 0 else 1 - g_pos(-s)


def _mp_loss_and_grad(h: float, w: float, beta: float) -> tuple[float, float]:
    # 1 - g(t) ~ e^(-t w): enough digits that the direct formula does not cancel to 0.
    with mpmath.workdps(60 + int(abs(beta * h) * w / 2)):
        return _mp_loss_and_grad_at_precision(h, w, beta)


def _mp_loss_and_grad_at_precision(h: float, w: float, beta: float) -> tuple[float, float]:
    value = -mpmath.log(_mp_link(beta * h, w))
    if h == 0:  # the right-hand derivative: s = 0 belongs to the s >= 0 branch
        grad = mpmath.diff(
            lambda x: -mpmath.log(_mp_link(beta * x, w)),
            mpmath.mpf(0),
            h=mpmath.mpf("1e-20"),
            direction=1,
        )
    else:
        grad = mpmath.diff(lambda x: -mpmath.log(_mp_link(beta * x, w)), mpmath.mpf(h))
    return float(value), float(grad)


@pytest.mark.parametrize("w", [1e-4, 0.01, 0.29, 1.0, 3.0])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_mallows_phi_matches_mpmath(w: float, beta: float) -> None:
    h = np.concatenate([EDGE_MARGINS, [300.0, -500.0]])
    value, grad = _value_and_grad(lambda t: mallows_phi_loss(t, torch.full_like(t, w), beta), h)
    expected = np.array([_mp_loss_and_grad(x, w, beta) for x in h])
    np.testing.assert_allclose(value, expected[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grad, expected[:, 1], rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- Mallows-phi link properties


def _inversions(perm: tuple[int, ...]) -> int:
    return sum(1 for i, j in itertools.combinations(range(len(perm)), 2) if perm[i] > perm[j])


@pytest.mark.parametrize("phi", [0.2, 0.5, 0.9])
def test_phi_link_equals_brute_force_mallows(phi: float) -> None:
    """P(item 0 ranked above item k) under a Mallows-phi model over n = 6 items, by enumerating
    all 720 permutations weighted by phi^(inversions); k = 1..4 keeps n >= k + 2."""
    n = 6
    perms = list(itertools.permutations(range(n)))
    weights = np.array([phi ** _inversions(p) for p in perms])
    ks = np.arange(1, 5)
    brute = [
        sum(wt for p, wt in zip(perms, weights, strict=True) if p.index(0) < p.index(k))
        / weights.sum()
        for k in ks
    ]
    w = torch.full((len(ks),), -math.log(phi), dtype=torch.float64)
    got = mallows_phi_link(torch.tensor(ks, dtype=torch.float64), w)
    np.testing.assert_allclose(got.numpy(), brute, rtol=1e-12)
    np.testing.assert_allclose(
        mallows_phi_link(-torch.tensor(ks, dtype=torch.float64), w).numpy(),
        1 - np.array(brute),
        rtol=1e-10,
    )


@pytest.mark.parametrize("w", [1e-4, 0.05, 0.7, 2.0, 8.0])
def test_phi_link_is_a_probability_increasing_on_each_side(w: float) -> None:
    s = torch.linspace(-200, 200, 4001, dtype=torch.float64)
    g = mallows_phi_link(s, torch.full_like(s, w))
    # min(g, 1 - g) ~ e^(-|s| w) rounds to 0 in float64 past |s| w ~ 37: strict only below that;
    # the loss itself never forms g there (it works with ln(1 - g)).
    assert torch.all((g >= 0) & (g <= 1))
    representable = s.abs() * w < 30
    assert torch.all((g[representable] > 0) & (g[representable] < 1))
    neg, pos = g[s < 0], g[s >= 0]
    assert torch.all(torch.diff(neg) >= 0) and torch.all(torch.diff(pos) >= 0)
    big = mallows_phi_link(torch.tensor([1e6], dtype=torch.float64), torch.tensor([w]))
    assert big.item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("phi", "g0"),
    # docs/methods.md quotes g(0+) = 1/(1-phi) + 1/ln(phi) = 0.629, 0.557, 0.509 for these phi.
    [(0.2, 0.629), (0.5, 0.557), (0.9, 0.509)],
)
def test_phi_link_jumps_at_zero(phi: float, g0: float) -> None:
    w = torch.full((3,), -math.log(phi), dtype=torch.float64)
    g = mallows_phi_link(torch.tensor([0.0, 1e-8, -1e-8], dtype=torch.float64), w)
    assert g[0].item() == pytest.approx(g0, abs=5e-4)
    assert g[1].item() == pytest.approx(g[0].item(), abs=1e-7)
    assert g[2].item() == pytest.approx(1 - g[0].item(), abs=1e-7)


def test_phi_link_flat_limit() -> None:
    """phi -> 1 (w -> 0): g(0) = 1/(1-phi) + 1/ln(phi) -> 1/2."""
    g = mallows_phi_link(torch.zeros(1, dtype=torch.float64), torch.tensor([1e-4]))
    assert g.item() == pytest.approx(0.5, abs=1e-4)


# ---------------------------------------------------------------- gradcheck and stability


def _phi(h):
    return mallows_phi_loss(h, torch.linspace(0.05, 2.0, h.numel(), dtype=torch.float64), 0.9)


def _theta(h):
    return mallows_theta_loss(h, torch.linspace(0.05, 2.0, h.numel(), dtype=torch.float64), 0.9)


@pytest.mark.parametrize(
    "fn",
    [
        lambda h: dpo_loss(h, 0.5, 0.1),
        lambda h: ipo_loss(h, 0.5),
        _theta,
        lambda h: mallows_theta_ipo_loss(h, torch.full_like(h, 0.4), 0.5),
        lambda h: mallows_theta_simpo_loss(h, torch.full_like(h, 0.4), 1.5, 0.3),
        _phi,
    ],
)
def test_gradcheck(fn) -> None:
    h = torch.tensor([-3.1, -0.4, 0.25, 1.7, 8.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (h,))


def test_simpo_gradcheck() -> None:
    lw = torch.tensor([-5.0, -12.0], dtype=torch.float64, requires_grad=True)
    ll = torch.tensor([-7.0, -3.0], dtype=torch.float64, requires_grad=True)
    lengths = (torch.tensor([4, 9]), torch.tensor([5, 2]))

    def loss(a, b):
        return simpo_loss(length_normalised_margin(a, b, *lengths), 1.5, 0.3)

    assert torch.autograd.gradcheck(loss, (lw, ll))


PER_PAIR_WITH_WEIGHT = {
    "dpo": lambda h, w: dpo_loss(h, 1.0, 0.1),
    "ipo": lambda h, w: ipo_loss(h, 1.0),
    "hinge": lambda h, w: hinge_loss(h, 1.0),
    "mallows_theta": lambda h, w: mallows_theta_loss(h, w, 1.0, 0.1),
    "mallows_theta_ipo": lambda h, w: mallows_theta_ipo_loss(h, w, 1.0),
    "mallows_theta_simpo": lambda h, w: mallows_theta_simpo_loss(h, w, 1.0, 0.5),
    "simpo": lambda h, w: simpo_loss(h, 1.0, 0.5),
    "mallows_phi": lambda h, w: mallows_phi_loss(h, w, 1.0),
}


@pytest.mark.parametrize("name", sorted(PER_PAIR_WITH_WEIGHT))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_inputs_give_finite_values_and_gradients(name: str, dtype: torch.dtype) -> None:
    h = torch.tensor([-1e3, -1e2, -1e-8, 0.0, 1e-8, 1e2, 1e3], dtype=dtype, requires_grad=True)
    for w_value in (1e-4, 1.0, 10.0):
        w = torch.full((h.numel(),), w_value, dtype=dtype)
        out = PER_PAIR_WITH_WEIGHT[name](h, w)
        (grad,) = torch.autograd.grad(out.sum(), h)
        assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), (name, w_value)


def test_phi_gradient_at_zero_is_right_derivative_not_zero() -> None:
    """Training starts at h = 0; a reflection through abs() would give gradient 0 there."""
    h = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    mallows_phi_loss(h, torch.tensor([0.5], dtype=torch.float64), 1.0).sum().backward()
    expected = _mp_loss_and_grad(0.0, 0.5, 1.0)[1]
    assert h.grad.item() == pytest.approx(expected, rel=1e-6)
    assert h.grad.item() < 0


# ---------------------------------------------------------------- the entry point


@dataclass
class _LossConfig:
    type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.0
    dispersion_scale: float = 0.29


def _batch(requires_grad: bool = True) -> PreferenceBatch:
    g = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return (
            torch.randn(*shape, generator=g, dtype=torch.float64)
            .mul(10)
            .requires_grad_(requires_grad)
        )

    return PreferenceBatch(
        policy_chosen_logps=leaf(8),
        policy_rejected_logps=leaf(8),
        chosen_lengths=torch.randint(1, 50, (8,), generator=g),
        rejected_lengths=torch.randint(1, 50, (8,), generator=g),
        reference_chosen_logps=leaf(8),
        reference_rejected_logps=leaf(8),
        dispersion=torch.rand(8, generator=g, dtype=torch.float64)
        .add(0.1)
        .requires_grad_(requires_grad),
    )


def test_entry_point_loss_and_metrics_match_manual_computation() -> None:
    batch = _batch()
    cfg = _LossConfig(type="mallows_theta", beta=0.2)
    loss, metrics = preference_loss(cfg, batch)
    pc, pr = batch.policy_chosen_logps.detach(), batch.policy_rejected_logps.detach()
    rc, rr = batch.reference_chosen_logps.detach(), batch.reference_rejected_logps.detach()
    w = batch.dispersion.detach()
    h = (pc - rc - pr + rr).numpy()
    expected = np.mean(-_np_log_sigmoid(0.2 * w.numpy() * h))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    r_w, r_l = 0.2 * (pc - rc), 0.2 * (pr - rr)
    assert metrics["rewards/chosen"].item() == pytest.approx(r_w.mean().item(), rel=1e-6)
    assert metrics["rewards/rejected"].item() == pytest.approx(r_l.mean().item(), rel=1e-6)
    assert metrics["rewards/accuracies"].item() == pytest.approx((r_w > r_l).double().mean().item())
    assert metrics["rewards/margins"].item() == pytest.approx((r_w - r_l).mean().item(), rel=1e-6)
    assert metrics["logps/chosen"].item() == pytest.approx(pc.mean().item(), rel=1e-6)
    assert metrics["dispersion/mean"].item() == pytest.approx(w.mean().item(), rel=1e-6)
    assert metrics["dispersion/std"].item() == pytest.approx(w.std(unbiased=False).item(), rel=1e-5)


def test_gradient_flows_to_policy_only() -> None:
    batch = _batch()
    for name in ("dpo", "mallows_theta", "mallows_phi", "mallows_theta_ipo"):
        loss, _ = preference_loss(_LossConfig(type=name), batch)
        loss.backward()
    assert batch.policy_chosen_logps.grad is not None
    assert batch.policy_rejected_logps.grad is not None
    assert batch.reference_chosen_logps.grad is None
    assert batch.reference_rejected_logps.grad is None
    assert batch.dispersion.grad is None


def test_simpo_entry_point_is_reference_free_with_length_normalised_rewards() -> None:
    batch = _batch()
    cfg = _LossConfig(type="simpo", beta=2.0, gamma=0.5)
    loss, metrics = preference_loss(cfg, batch)
    h = length_normalised_margin(
        batch.policy_chosen_logps,
        batch.policy_rejected_logps,
        batch.chosen_lengths,
        batch.rejected_lengths,
    )
    expected = simpo_loss(h, 2.0, 0.5).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    reward = 2.0 * batch.policy_chosen_logps.detach() / batch.chosen_lengths
    assert metrics["rewards/chosen"].item() == pytest.approx(reward.mean().item(), rel=1e-6)


def test_target_margin_shifts_reference_objectives() -> None:
    """gamma enters every reference objective as h - gamma/beta, i.e. sigma(beta h - gamma)."""
    batch = _batch()
    shifted, _ = preference_loss(_LossConfig(type="dpo", beta=0.5, gamma=1.0), batch)
    h = (
        batch.policy_chosen_logps
        - batch.reference_chosen_logps
        - batch.policy_rejected_logps
        + batch.reference_rejected_logps
    ).detach()
    expected = np.mean(-_np_log_sigmoid(0.5 * h.numpy() - 1.0))
    assert shifted.item() == pytest.approx(expected, rel=1e-9)


def test_mallows_theta_simpo_scales_the_simpo_argument() -> None:
    batch = _batch()
    cfg = _LossConfig(type="mallows_theta_simpo", beta=2.0, gamma=0.5)
    loss, _ = preference_loss(cfg, batch)
    lw, ll = batch.policy_chosen_logps.detach(), batch.policy_rejected_logps.detach()
    h = (lw / batch.chosen_lengths - ll / batch.rejected_lengths).numpy()
    expected = np.mean(-_np_log_sigmoid(batch.dispersion.detach().numpy() * (2.0 * h - 0.5)))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_entry_point_errors_name_the_missing_input() -> None:
    batch = _batch()
    no_ref = PreferenceBatch(
        batch.policy_chosen_logps,
        batch.policy_rejected_logps,
        batch.chosen_lengths,
        batch.rejected_lengths,
    )
    with pytest.raises(ValueError, match="reference log-probs"):
        preference_loss(_LossConfig(type="dpo"), no_ref)
    with pytest.raises(ValueError, match="dispersion"):
        preference_loss(_LossConfig(type="mallows_phi"), no_ref)
    with pytest.raises(ValueError, match="StrengthDistribution"):
        preference_loss(_LossConfig(type="mixdpo"), batch)
    with pytest.raises(ValueError, match="unknown loss.type 'dop'.*mallows_theta"):
        preference_loss(_LossConfig(type="dop"), batch)


def test_mixdpo_entry_point_reports_strength_moments() -> None:
    batch = _batch()
    strength = losses.StrengthDistribution(family="lognormal", mean=0.1, cv=0.5)
    loss, metrics = preference_loss(_LossConfig(type="mixdpo", beta=0.1), batch, strength)
    loss.backward()
    assert all(p.grad is not None for p in strength.parameters())
    assert metrics["mixdpo/beta_mean"].item() == pytest.approx(0.1, rel=1e-6)
    assert metrics["mixdpo/beta_cv"].item() == pytest.approx(0.5, rel=1e-6)


def test_registry_covers_every_objective_and_nothing_else() -> None:
    assert set(LOSS_FUNCTIONS) == set(OBJECTIVES)
    assert set(OBJECTIVES) == {
        "dpo",
        "ipo",
        "hinge",
        "simpo",
        "mallows_theta",
        "mallows_theta_ipo",
        "mallows_theta_simpo",
        "mallows_phi",
        "mixdpo",
    }
    batch = _batch()
    strength = losses.StrengthDistribution(family="gamma", mean=0.1, cv=0.5)
    for name, spec in OBJECTIVES.items():
        loss, metrics = preference_loss(_LossConfig(type=name), batch, strength)
        assert torch.isfinite(loss) and metrics["loss"] == loss.detach(), name
        assert ("dispersion/mean" in metrics) == (batch.dispersion is not None)
        assert spec.summary

"""MixDPO (Sicilia et al., arXiv 2601.06180) checked against independent float64 computations.

References are computed here with scipy.integrate.quad of the lognormal / gamma density times the
logistic (cross-checked during development against mpmath at 25 digits: agreement to 5e-15
relative on the grid below), never with raypo's own estimators.
"""

import functools
import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from raypo import mixdpo
from raypo.mixdpo import StrengthDistribution, mixdpo_loss

pytestmark = pytest.mark.filterwarnings("ignore:MixDPO:UserWarning")

MEAN = 0.1
H_GRID = (-50.0, -20.0, -5.0, -1.0, -0.1, -1e-8, 0.0, 1e-8, 0.1, 1.0, 5.0, 20.0, 50.0)


def lognormal_ab(mean: float, sigma: float) -> tuple[float, float]:
    return math.log(mean) - sigma**2 / 2, sigma


def gamma_ab(mean: float, shape: float) -> tuple[float, float]:
    return shape, mean / shape


def _density(dist: str, a: float, b: float):
    """(density of the integration variable, map from it to beta): z-space for lognormal."""
    if dist == "lognormal":
        return (lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)), (
            lambda z: math.exp(a + b * z)
        )
    log_norm = -math.lgamma(a) - a * math.log(b)

    def pdf(x: float) -> float:
        return math.exp((a - 1) * math.log(x) - x / b + log_norm) if x > 0 else 0.0

    return pdf, (lambda x: x)


def _breakpoints(dist: str, a: float, b: float, t: float) -> tuple[float, list[float]]:
    """Finite integration range and interior points around the density bulk and beta ~ 1/t."""
    if dist == "lognormal":
        points = [-8.0, 0.0, 8.0]
        if t > 0:
            z_kink = (-math.log(t) - a) / b
            points += [z_kink + d / b for d in (-3, -1, 0, 1, 3)]
        return -38.0, sorted(p for p in points if -38.0 < p < 38.0) + [38.0]
    mean, sd = a * b, math.sqrt(a) * b
    upper = mean + 60 * sd
    points = [mean, mean + 10 * sd] + [c / t for c in (1, 10, 40) if t > 0 and c / t < upper]
    return 0.0, sorted(set(points)) + [upper]


def ref_expectation(dist: str, a: float, b: float, f) -> float:
    """E[f(beta)] by adaptive quadrature (f of beta; pieces split at the kink of f)."""
    pdf, beta_of = _density(dist, a, b)
    lower, edges = _breakpoints(dist, a, b, f.kink)
    total = 0.0
    for lo, hi in zip([lower] + edges[:-1], edges, strict=True):
        total += integrate.quad(
            lambda x: pdf(x) * f(beta_of(x)), lo, hi, epsabs=0, epsrel=1e-13, limit=400
        )[0]
    return total


class _Logistic:
    """beta -> sigma(-beta t)^power, remembering t for the breakpoints."""

    def __init__(self, t: float, sign: float = -1.0, power: int = 1) -> None:
        self.kink, self.sign, self.power = t, sign, power

    def __call__(self, beta: float) -> float:
        return special.expit(self.sign * beta * self.kink) ** self.power


@functools.cache
def ref_loss(h: float, dist: str, a: float, b: float) -> float:
    """-log E[sigma(beta h)] via the tail Q = E[sigma(-beta |h|)] (keeps relative accuracy)."""
    q = ref_expectation(dist, a, b, _Logistic(abs(h)))
    return -math.log1p(-q) if h >= 0 else -math.log(q)


def ref_losses(hs, dist, a, b) -> np.ndarray:
    return np.array([ref_loss(float(h), dist, a, b) for h in hs])


def loss64(hs, dist, a, b, estimator, n, generator=None) -> torch.Tensor:
    h = torch.tensor(hs, dtype=torch.float64)
    return mixdpo_loss(h, dist, a, b, estimator, n, generator)


# (distribution, (a, b), estimator, points, rtol). rtol are the spec's targets; measured maxima on
# this grid (this implementation vs ref_loss) are in the comments.
PARITY_CASES = [
    ("lognormal", lognormal_ab(MEAN, 0.25), "quadrature", 64, 1e-6),  # 6e-16
    ("lognormal", lognormal_ab(MEAN, 0.5), "quadrature", 64, 1e-6),  # 2e-16
    ("lognormal", lognormal_ab(MEAN, 0.25), "quadrature", 96, 1e-6),  # 4e-16
    ("lognormal", lognormal_ab(MEAN, 0.5), "quadrature", 96, 1e-6),  # 4e-16
    ("lognormal", lognormal_ab(MEAN, 1.5), "quadrature", 96, 1e-6),  # 6.5e-9
    ("gamma", gamma_ab(MEAN, 0.5), "series", 24, 1e-10),  # 3e-15
    ("gamma", gamma_ab(MEAN, 2.0), "series", 24, 1e-10),  # 5e-15
    ("gamma", gamma_ab(MEAN, 10.0), "series", 24, 1e-10),  # 4e-15
    # Generalized Gauss-Laguerre is poor at small shape (docs/methods.md): looser tolerances.
    ("gamma", gamma_ab(MEAN, 0.5), "quadrature", 64, 1e-4),  # 1.9e-5
    ("gamma", gamma_ab(MEAN, 2.0), "quadrature", 64, 1e-8),  # 6.1e-10
    ("gamma", gamma_ab(MEAN, 10.0), "quadrature", 64, 1e-12),  # 3.8e-15
]


@pytest.mark.parametrize(("dist", "ab", "estimator", "n", "rtol"), PARITY_CASES)
def test_loss_matches_scipy_quad(dist, ab, estimator, n, rtol):
    got = loss64(H_GRID, dist, *ab, estimator, n).numpy()
    np.testing.assert_allclose(got, ref_losses(H_GRID, dist, *ab), rtol=rtol, atol=0)


def test_gauss_hermite_16_nodes_is_visibly_worse_at_sigma_1_5():
    """The parity test can fail: 16 nodes miss 1e-6 at sigma = 1.5 (measured 5e-4 here)."""
    ab = lognormal_ab(MEAN, 1.5)
    got = loss64(H_GRID, "lognormal", *ab, "quadrature", 16).numpy()
    assert np.max(np.abs(got / ref_losses(H_GRID, "lognormal", *ab) - 1)) > 1e-6


@pytest.mark.parametrize(
    ("dist", "ab"), [("lognormal", lognormal_ab(MEAN, 1.0)), ("gamma", gamma_ab(MEAN, 2.0))]
)
def test_mc_matches_quad_within_standard_errors(dist, ab):
    hs, k = (-50.0, -5.0, 0.5, 20.0), 20_000
    got = loss64(hs, dist, *ab, "mc", k, torch.Generator().manual_seed(0)).numpy()
    for h, value in zip(hs, got, strict=True):
        p = math.exp(-ref_loss(h, dist, *ab))
        second = ref_expectation(dist, *ab, _Logistic(abs(h), math.copysign(1.0, h), power=2))
        # delta method: sd(-log p_hat) ~ sd(sigma(beta h)) / (sqrt(K) p); measured |z| <= 2.7
        se = math.sqrt(max(second - p * p, 0.0) / k) / p
        assert abs(value - ref_loss(h, dist, *ab)) < 4 * se + 1e-12, (h, value, se)


@pytest.mark.parametrize(
    ("dist", "ab"),
    [
        ("lognormal", lognormal_ab(1.0, math.sqrt(math.log1p(1.5**2)))),
        ("gamma", gamma_ab(1.0, 1 / 1.5**2)),
    ],
)
def test_mc_overestimates_loss_on_misranked_pairs(dist, ab):
    """docs/methods.md: with K = 16 samples the MC loss is biased upwards at h = -10.

    Both cases have E[beta] = 1 and CV 1.5. Measured bias over 4000 replicates (Jensen: it cannot
    be negative in expectation): +0.113 nats (lognormal, SE 0.008), +0.057 (gamma, SE 0.006).
    """
    reps = 4000
    got = loss64([-10.0] * reps, dist, *ab, "mc", 16, torch.Generator().manual_seed(1))
    bias = got.mean().item() - ref_loss(-10.0, dist, *ab)
    se = got.std().item() / math.sqrt(reps)
    assert bias > 5 * se, (bias, se)


# Deterministic estimators whose gradients are compared with finite differences of ref_loss;
# measured worst relative errors (|gradient| > 1e-9): 1.1e-6 (lognormal GH 96, the sigma
# gradient at h = -20), 8.6e-9 (series, shape 0.5), 5.1e-8 (shape 10, series and Laguerre).
GRAD_CASES = [
    ("lognormal", lognormal_ab(MEAN, 1.5), "quadrature", 96, 1e-5),
    ("gamma", gamma_ab(MEAN, 0.5), "series", 24, 1e-6),
    ("gamma", gamma_ab(MEAN, 10.0), "series", 24, 1e-6),
    ("gamma", gamma_ab(MEAN, 10.0), "quadrature", 64, 1e-6),
]


@pytest.mark.parametrize(("dist", "ab", "estimator", "n", "rtol"), GRAD_CASES)
def test_gradients_match_finite_differences_of_quad(dist, ab, estimator, n, rtol):
    """Per-pair d loss / d(h, a, b) against central differences (step 1e-5 relative) of quad."""

    def central(f, x):
        step = 1e-5 * max(1.0, abs(x))
        return (f(x + step) - f(x - step)) / (2 * step)

    a0, b0 = ab
    for x in (-20.0, 0.0, 3.0):
        h = torch.tensor([x], dtype=torch.float64, requires_grad=True)
        a, b = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ab)
        mixdpo_loss(h, dist, a, b, estimator, n).sum().backward()
        want = [
            central(lambda v, x=x: ref_loss(v, dist, a0, b0), x),
            central(lambda v, x=x: ref_loss(x, dist, v, b0), a0),
            central(lambda v, x=x: ref_loss(x, dist, a0, v), b0),
        ]
        got = [h.grad.item(), a.grad.item(), b.grad.item()]
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-9, err_msg=f"h={x}")


@pytest.mark.parametrize(
    ("dist", "ab", "estimator", "n", "wrt_shape"),
    [
        ("lognormal", lognormal_ab(MEAN, 0.7), "quadrature", 64, True),
        ("gamma", gamma_ab(MEAN, 3.0), "series", 24, True),
        # Laguerre nodes move with the shape: its shape gradient is checked against quad above.
        ("gamma", gamma_ab(MEAN, 3.0), "quadrature", 64, False),
    ],
)
def test_gradcheck_float64(dist, ab, estimator, n, wrt_shape):
    h = torch.tensor([-30.0, -2.0, -1e-8, 0.0, 1e-8, 0.7, 40.0], dtype=torch.float64)
    a, b = (torch.tensor(v, dtype=torch.float64) for v in ab)
    inputs = (h.requires_grad_(), a.requires_grad_(wrt_shape), b.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda h, a, b: mixdpo_loss(h, dist, a, b, estimator, n), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("dist", "ab", "estimator", "n", "rtol"),
    [
        ("lognormal", lognormal_ab(MEAN, 1.5), "quadrature", 96, 1e-9),
        ("gamma", gamma_ab(MEAN, 0.5), "series", 24, 1e-9),
        ("gamma", gamma_ab(MEAN, 0.5), "quadrature", 64, 1e-9),
        ("gamma", gamma_ab(MEAN, 1e4), "series", 24, 1e-9),
        # MC: the sample mean of beta, within 5 standard errors (CV 0.5 / sqrt(20000) = 0.35%).
        ("lognormal", lognormal_ab(MEAN, math.sqrt(math.log1p(0.5**2))), "mc", 20_000, 0.018),
        ("gamma", gamma_ab(MEAN, 4.0), "mc", 20_000, 0.018),
    ],
)
def test_gradient_at_zero_is_minus_half_mean(dist, ab, estimator, n, rtol):
    """d/dh -log E[sigma(beta h)] at h = 0 is -(E[beta]/4)/(1/2) = -E[beta]/2; E[beta] = 0.1."""
    h = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    loss = mixdpo_loss(h, dist, *ab, estimator, n, torch.Generator().manual_seed(2))
    loss.sum().backward()
    np.testing.assert_allclose(loss.detach().numpy(), math.log(2), rtol=1e-12)
    np.testing.assert_allclose(h.grad.numpy(), -MEAN / 2, rtol=rtol)


@pytest.mark.parametrize(
    ("dist", "ab", "estimator"),
    [
        ("lognormal", lognormal_ab(MEAN, 1e-4), "quadrature"),
        ("gamma", gamma_ab(MEAN, 1e8), "series"),
        ("gamma", gamma_ab(MEAN, 1e8), "quadrature"),
    ],
)
def test_vanishing_variance_approaches_dpo(dist, ab, estimator):
    """CV 1e-4 is DPO at beta = E[beta] up to the variance: on the far tail the relative shift is
    about var(beta) h^2 / 2 = (1e-5)^2 * 300^2 / 2 = 4.5e-6 (measured 4.5e-6 to 4.7e-6)."""
    hs = np.array([-300.0, -50.0, -1.0, 0.0, 1e-8, 2.0, 50.0, 300.0])
    dpo = np.logaddexp(0.0, -MEAN * hs)  # -log sigma(x) = log(1 + exp(-x))
    got = loss64(hs, dist, *ab, estimator, 64).numpy()
    np.testing.assert_allclose(got, dpo, rtol=1e-5)


STABILITY_CASES = [
    ("lognormal", lognormal_ab(MEAN, 1.5), "quadrature", 96),
    ("lognormal", lognormal_ab(MEAN, 1.5), "mc", 16),
    ("gamma", gamma_ab(MEAN, 0.5), "series", 24),
    ("gamma", gamma_ab(MEAN, 1e4), "series", 24),
    ("gamma", gamma_ab(MEAN, 1e4), "quadrature", 64),
    ("gamma", gamma_ab(MEAN, 2.0), "mc", 16),
]


@pytest.mark.parametrize(("dist", "ab", "estimator", "n"), STABILITY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_margins_finite_in_low_precision(dist, ab, estimator, n, dtype):
    """|beta h| up to 1e3 at E[beta] = 0.1 means |h| up to 1e4."""
    hs = [-1e4, -1e3, -10.0, 0.0, 10.0, 1e3, 1e4]
    h = torch.tensor(hs, dtype=dtype, requires_grad=True)
    a, b = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ab)
    loss = mixdpo_loss(h, dist, a, b, estimator, n, torch.Generator().manual_seed(3))
    loss.sum().backward()
    assert loss.dtype == torch.float32
    grads = torch.stack([a.grad, b.grad])
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    assert torch.isfinite(grads).all()
    assert (loss >= 0).all() and (h.grad <= 0).all()
    # misranked pairs cost more the more they are misranked
    assert loss[0] > loss[1] > loss[2] > loss[3] > loss[4]


@pytest.mark.parametrize(("dist", "ab", "estimator", "n"), STABILITY_CASES[:3])
def test_bfloat16_input_only_rounds_the_margin(dist, ab, estimator, n):
    h16 = torch.tensor([-700.0, -3.3, 0.0, 1e-3, 17.0, 900.0], dtype=torch.bfloat16)
    got = mixdpo_loss(h16, dist, *ab, estimator, n, torch.Generator().manual_seed(4))
    want = mixdpo_loss(h16.double(), dist, *ab, estimator, n, torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert mixdpo_loss(h16.double(), dist, *ab, estimator, n).dtype == torch.float64


def test_loss_is_continuous_across_zero_for_short_series():
    """The series weights are normalised so that Q(0) = 1/2 exactly, even with 4 terms."""
    h = torch.tensor([-1e-12, 0.0, 1e-12], dtype=torch.float64)
    got = mixdpo_loss(h, "gamma", 2.0, 0.05, "series", 4)
    np.testing.assert_allclose(got.numpy(), math.log(2), rtol=1e-10)


@pytest.mark.parametrize(
    ("family", "estimator", "dist"),
    [("lognormal", "mc", stats.lognorm), ("gamma", "series", stats.gamma)],
)
@pytest.mark.parametrize("cv", [0.3, 1.5])
def test_moments_match_scipy_and_init(family, estimator, dist, cv):
    module = StrengthDistribution(family, mean=0.2, cv=cv, estimator=estimator)
    a, b = (v.item() for v in module.params())
    frozen = dist(s=b, scale=math.exp(a)) if family == "lognormal" else dist(a, scale=b)
    moments = {k: v.item() for k, v in module.moments().items()}
    np.testing.assert_allclose(moments["mean"], frozen.mean(), rtol=1e-12)
    np.testing.assert_allclose(moments["variance"], frozen.var(), rtol=1e-12)
    np.testing.assert_allclose(moments["cv"], frozen.std() / frozen.mean(), rtol=1e-12)
    # float32 parameters: init recovered to float32 precision
    np.testing.assert_allclose([moments["mean"], moments["cv"]], [0.2, cv], rtol=1e-6)
    assert all(v.dim() == 0 for v in module.moments().values())


@pytest.mark.parametrize("family", ["lognormal", "gamma"])
def test_fixed_mean_survives_an_optimizer_step_learned_mean_moves(family):
    h = torch.linspace(-30.0, 30.0, 64)
    for learn_mean in (False, True):
        module = StrengthDistribution(family, mean=0.1, cv=0.8, learn_mean=learn_mean)
        opt = torch.optim.Adam(module.parameters(), lr=0.1)
        before = {k: v.item() for k, v in module.moments().items()}
        module(h).mean().backward()
        opt.step()
        after = {k: v.item() for k, v in module.moments().items()}
        assert after["cv"] != pytest.approx(before["cv"], rel=1e-3)
        assert len(list(module.parameters())) == 1 + learn_mean
        if learn_mean:
            assert after["mean"] != pytest.approx(before["mean"], rel=1e-3)
        else:
            assert after["mean"] == pytest.approx(0.1, rel=1e-12)


def test_fit_recovers_heterogeneous_strengths():
    """Pairs labelled with lognormal strengths (E[beta] = 0.1, CV 1.5): the fit moves CV 0.5 ->
    about 1.5 (measured 1.52-1.55 over seeds 0-3 with 8000 pairs)."""
    gen = torch.Generator().manual_seed(0)
    n, (mu, sigma) = 8000, lognormal_ab(0.1, math.sqrt(math.log1p(1.5**2)))
    h = 40.0 * torch.randn(n, generator=gen, dtype=torch.float64)
    beta = torch.exp(mu + sigma * torch.randn(n, generator=gen, dtype=torch.float64))
    chosen_first = torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(beta * h)
    observed = torch.where(chosen_first, h, -h)
    module = StrengthDistribution("lognormal", mean=0.1, cv=0.5)
    opt = torch.optim.LBFGS(module.parameters(), max_iter=30, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = module(observed).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert abs(module.moments()["cv"].item() - 1.5) < 0.2


def test_forward_is_mixdpo_loss_with_defaults():
    h = torch.linspace(-40.0, 40.0, 9)
    gamma = StrengthDistribution("gamma", mean=0.1, cv=0.5)
    assert (gamma.estimator, gamma.resolved_num_points()) == ("series", 24)
    torch.testing.assert_close(gamma(h), mixdpo_loss(h, "gamma", *gamma.params(), "series", 24))
    # docs/methods.md: enough Gauss-Hermite nodes for the current sigma (1e-6 needs 96 at 1.5).
    wide = StrengthDistribution("lognormal", mean=0.1, cv=math.sqrt(math.expm1(1.5**2)))
    assert wide.resolved_num_points() == 96
    assert StrengthDistribution("lognormal", cv=0.3).resolved_num_points() == 64
    assert StrengthDistribution("gamma", estimator="mc").resolved_num_points() == 16
    a, b = (v.item() for v in wide.params())
    np.testing.assert_allclose(
        wide(h.double()).detach().numpy(), ref_losses(h.tolist(), "lognormal", a, b), rtol=1e-6
    )
    assert "family='lognormal'" in repr(wide) and "learn_mean=False" in repr(wide)


def test_biased_estimators_warn():
    mixdpo._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="biased"):
        mixdpo_loss(torch.zeros(2), "lognormal", -2.0, 0.5, "mc")
    with pytest.warns(UserWarning, match="shape < 2"):
        mixdpo_loss(torch.zeros(2), "gamma", 0.5, 0.2, "quadrature")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"distribution": "weibull"}, "distribution must be one of .*'gamma'.*weibull"),
        ({"estimator": "laplace"}, "estimator must be one of .*'series'.*laplace"),
        ({"estimator": "series"}, "estimator='series' is only available"),
        ({"num_points": 1}, "num_points=1"),
        ({"num_points": 2.5}, "num_points=2.5"),
        ({"b": -0.1}, "sigma=-0.1"),
        ({"distribution": "gamma", "a": 0.0}, "shape=0.0"),
        ({"distribution": "gamma", "a": 2.0, "b": math.nan}, "scale=nan"),
        ({"a": torch.zeros(3)}, "a must be a scalar"),
    ],
)
def test_mixdpo_loss_rejects_bad_arguments(kwargs, message):
    args = {"h": torch.zeros(3), "distribution": "lognormal", "a": -2.0, "b": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        mixdpo_loss(**args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "beta"}, "family must be one of .*family='beta'"),
        ({"estimator": "exact"}, "estimator must be one of .*estimator='exact'"),
        ({"estimator": "series"}, "estimator='series' is only available"),
        ({"mean": 0.0}, "mean=0.0"),
        ({"mean": -1.0}, "mean=-1.0"),
        ({"cv": 0.0}, "cv=0.0"),
        ({"cv": math.inf}, "cv=inf"),
        ({"num_points": 0}, "num_points=0"),
        ({"family": "gamma", "num_points": 1000}, "num_points=1000"),
    ],
)
def test_strength_distribution_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StrengthDistribution(**kwargs)

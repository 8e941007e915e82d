"""MixDPO: DPO with a random, learned preference strength (mixed logit).

Sicilia et al., "MixDPO", arXiv 2601.06180. DPO scores a pair with ``sigma(beta * h)`` for one
fixed strength ``beta``; MixDPO draws the strength per pair, ``beta ~ D_theta``, and minimises the
negative marginal log-likelihood (the mixed-logit likelihood)::

    loss(h) = -log P(h),   P(h) = E_{beta ~ D_theta}[ sigma(beta * h) ]

with ``h = (logp_w - ref_w) - (logp_l - ref_l)`` the unscaled log-ratio margin. DPO is the limit of
zero variance of ``D_theta``. Families (parameters ``(a, b)`` in :func:`mixdpo_loss`):

- ``lognormal``: ``beta = exp(mu + sigma z)``, ``z ~ N(0, 1)``; ``a = mu``, ``b = sigma``.
- ``gamma``: density ``beta^(a-1) exp(-beta/b) / (Gamma(a) b^a)``; ``a = shape``, ``b = scale``.
  For ``t > 0``, ``E[sigma(-beta t)] = sum_{n>=1} (-1)^(n-1) (1 + n b t)^(-a)`` (expand the
  logistic in ``exp(-n beta t)`` and use the Laplace transform ``E[exp(-s beta)] = (1+b s)^(-a)``).

Stable construction (docs/methods.md): the tail ``Q = E[sigma(-beta |h|)] <= 1/2`` is computed in
log space by every estimator, then ``log P = log Q`` for ``h < 0`` and ``log P = log(1 - Q)`` (via
``log1p(-exp(log Q))``) for ``h >= 0``. ``|h|`` is formed with ``torch.where(h >= 0, h, -h)``, not
``abs``, so that the gradient at ``h = 0`` is ``-E[beta]/2`` (``abs`` has derivative 0 there).

Estimators of ``Q`` (accuracy: relative error of the loss for ``h`` in [-50, 50]):

- ``"quadrature"``: lognormal uses Gauss-Hermite in ``z``: 64 nodes suffice for ``sigma <= 0.5``;
  at ``sigma = 1.5`` the error grows with ``E[beta]`` (64 nodes: 5e-7 at E[beta] = 0.1, 8e-6 at
  10; 96 nodes: 7e-9 and 2e-7; docs/methods.md: 96 for 1e-6, 32 give 3e-4). Gamma uses generalized
  Gauss-Laguerre with ``alpha = shape - 1``, which is poor for shape < 2 and for large
  ``E[beta] |h|``: the integrand's kink at ``beta ~ 1/|h|`` falls between the few nodes near 0
  (shape 0.5: 1.8e-3 at 256 nodes for E[beta] = 1, 2e-5 at 64 nodes for E[beta] = 0.1). Laguerre
  nodes are recomputed for the current shape and reweighted so that the shape gradient is the
  quadrature of the true derivative (not the derivative of the quadrature value, whose nodes
  move with the shape).
- ``"series"`` (gamma only): the alternating series accelerated with Cohen, Rodriguez Villegas and
  Zagier (Experimental Math. 9, 2000), Algorithm 1; the terms are moments of a positive measure on
  [0, 1], so the error falls like 5.83^-n: 2e-6 at 8 terms, 3e-9 at 12, 1e-14 at 20-24.
- ``"mc"``: K reparameterised samples, ``Q ~ mean_k sigma(-beta_k |h|)``. It is biased: the loss
  is overestimated on misranked pairs (at h = -10, K = 16: +0.3 nats in docs/methods.md, +0.11 for a
  lognormal with E[beta] = 1, CV 1.5 in tests/test_mixdpo.py) and its optimum has a
  smaller spread (learned CV 1.5 -> 0.90 at K = 16; K = 8 collapses to DPO). Offered, warned
  about, never a default. Gamma samples come from ``torch._standard_gamma``, which takes a
  ``generator`` and is differentiable in the shape (implicit reparameterisation).

Identifiability: the loss is unchanged by ``(h, beta) -> (c h, beta / c)``, so only the shape of
``D_theta`` is learnable. :class:`StrengthDistribution` therefore fixes ``E[beta]`` (to the
config's ``beta``) and learns the dispersion unless asked to learn the mean too. The learned CV is
family-specific (a lognormal fit to gamma data reports a different CV at the same likelihood):
always report it with the family.

Deviation from the paper: besides the paper's Monte Carlo estimator, deterministic quadrature and
an accelerated series are offered and are the defaults, because the Monte Carlo objective is
biased (above). All computation is in float64; the loss is returned as float32 for bf16/fp16/fp32
inputs and float64 for float64 inputs.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DISTRIBUTIONS = ("lognormal", "gamma")
ESTIMATORS = ("quadrature", "mc", "series")

# (3 + sqrt 8)^n overflows float64 near n = 402; far beyond the 24 terms that reach float64.
_MAX_SERIES_TERMS = 256
# Nodes per estimator when StrengthDistribution is given num_points=None.
_DEFAULT_POINTS = {"quadrature": 64, "series": 24, "mc": 16}
# Gauss-Hermite nodes needed for 1e-6 relative loss error at a lognormal sigma up to the key.
_HERMITE_NODES_FOR_SIGMA = ((0.5, 64), (1.5, 96), (2.5, 160), (math.inf, 320))

_LogTail = Callable[[Tensor, Tensor, Tensor, int, "torch.Generator | None"], Tensor]


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {name}={value!r}")


def _check_num_points(num_points: int, estimator: str) -> None:
    upper = _MAX_SERIES_TERMS if estimator == "series" else 100_000
    if isinstance(num_points, bool) or not isinstance(num_points, int):
        raise ValueError(f"num_points must be an int, got num_points={num_points!r}")
    if not 2 <= num_points <= upper:
        raise ValueError(
            f"num_points must be in [2, {upper}] for estimator={estimator!r}, "
            f"got num_points={num_points}"
        )


def _gauss_rule(diag: np.ndarray, off: np.ndarray) -> tuple[Tensor, Tensor]:
    """Nodes and log-weights (normalised to sum 1) of the Gauss rule with Jacobi matrix (diag, off).

    Golub-Welsch for the nodes; the weights are the Christoffel numbers ``1 / sum_k p_k(x)^2``
    of the orthonormal polynomials (relative accuracy even for weights of 1e-200, unlike the
    squared eigenvector components), with the recurrence rescaled to avoid overflow.
    """
    n = diag.size
    nodes = np.linalg.eigvalsh(np.diag(diag) + np.diag(off, 1) + np.diag(off, -1))
    p_prev, p = np.zeros(n), np.ones(n)
    total, log_scale = np.ones(n), np.zeros(n)
    for k in range(n - 1):
        p_next = ((nodes - diag[k]) * p - (off[k - 1] * p_prev if k else 0.0)) / off[k]
        p_prev, p = p, p_next
        total += p * p
        big = np.maximum(np.abs(p), np.abs(p_prev))
        scale = np.where(big > 1e100, big, 1.0)
        p, p_prev, total = p / scale, p_prev / scale, total / scale**2
        log_scale += 2.0 * np.log(scale)
    log_w = torch.from_numpy(-(np.log(total) + log_scale))
    return torch.from_numpy(nodes), log_w - torch.logsumexp(log_w, 0)


@functools.lru_cache(maxsize=32)
def _hermite_rule(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite rule for ``E_{z ~ N(0,1)}``: nodes z [n], log-weights [n] (float64, CPU)."""
    return _gauss_rule(np.zeros(n), np.sqrt(np.arange(1.0, n)))


@functools.lru_cache(maxsize=64)
def _laguerre_rule(n: int, alpha: float) -> tuple[Tensor, Tensor]:
    """Generalized Gauss-Laguerre rule for ``E_{x ~ Gamma(alpha + 1, 1)}``: nodes, log-weights."""
    k = np.arange(n, dtype=np.float64)
    return _gauss_rule(2.0 * k + alpha + 1.0, np.sqrt(k[1:] * (k[1:] + alpha)))


@functools.lru_cache(maxsize=32)
def _crvz_weights(n: int) -> Tensor:
    """Weights ``w_k`` with ``sum_k (-1)^k a_k ~ sum_k w_k a_k`` (CRVZ 2000, Algorithm 1) [n].

    Rescaled so that they sum to exactly 1/2 (the value for a constant sequence), which makes
    ``Q(0) = 1/2`` exactly and the loss continuous at ``h = 0`` for any n.
    """
    d = (3.0 + math.sqrt(8.0)) ** n
    d = (d + 1.0 / d) / 2.0
    b, c, weights = -1.0, -d, []
    for k in range(n):
        c = b - c
        weights.append(c / d)
        b = (k + n) * (k - n) * b / ((k + 0.5) * (k + 1.0))
    w = torch.tensor(weights, dtype=torch.float64)
    return w * (0.5 / w.sum())


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= -log 2``, where ``log1p(-exp(x))`` is the accurate form."""
    return torch.log1p(-torch.exp(x))


def _lognormal_quadrature(
    t: Tensor, mu: Tensor, sigma: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    z, log_w = (v.to(t.device) for v in _hermite_rule(n))
    beta = torch.exp(mu + sigma * z)
    return torch.logsumexp(log_w + F.logsigmoid(-beta * t[..., None]), dim=-1)


def _lognormal_mc(
    t: Tensor, mu: Tensor, sigma: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    _warn_once(
        "MixDPO Monte Carlo estimator is biased (docs/methods.md): it overestimates the loss on "
        "misranked pairs and shrinks the learned spread; prefer estimator='quadrature'."
    )
    z = torch.randn(t.shape + (n,), generator=generator, dtype=t.dtype, device=t.device)
    beta = torch.exp(mu + sigma * z)
    return torch.logsumexp(F.logsigmoid(-beta * t[..., None]), dim=-1) - math.log(n)


def _gamma_quadrature(
    t: Tensor, shape: Tensor, scale: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    shape0 = float(shape.detach())
    if shape0 < 2.0:
        _warn_once(
            "MixDPO gamma quadrature (generalized Gauss-Laguerre) is inaccurate for shape < 2 "
            "and large E[beta]*|h| (1e-3 relative and worse); prefer estimator='series'."
        )
    x, log_w = (v.to(t.device) for v in _laguerre_rule(n, shape0 - 1.0))
    # Value-neutral reweighting (the factor is 1 at shape == shape0): carries d/dshape of the
    # Gamma density at the fixed nodes, so the gradient is the quadrature of the derivative.
    log_w = log_w + (shape - shape0) * torch.log(x) + (math.lgamma(shape0) - torch.lgamma(shape))
    return torch.logsumexp(log_w + F.logsigmoid(-scale * x * t[..., None]), dim=-1)


def _gamma_mc(
    t: Tensor, shape: Tensor, scale: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    _warn_once(
        "MixDPO Monte Carlo estimator is biased (docs/methods.md): it overestimates the loss on "
        "misranked pairs and shrinks the learned spread; prefer estimator='series'."
    )
    draws = torch._standard_gamma(shape.expand(t.shape + (n,)), generator=generator)
    beta = scale * draws
    return torch.logsumexp(F.logsigmoid(-beta * t[..., None]), dim=-1) - math.log(n)


def _gamma_series(
    t: Tensor, shape: Tensor, scale: Tensor, n: int, generator: torch.Generator | None
) -> Tensor:
    w = _crvz_weights(n).to(t.device)
    k = torch.arange(1, n + 1, dtype=t.dtype, device=t.device)
    log_terms = -shape * torch.log1p(k * (scale * t[..., None]))
    lead = log_terms[..., :1]
    # terms / lead lie in (0, 1] and the accelerated sum of them in [1/2, 1]: no cancellation.
    return lead[..., 0] + torch.log((w * torch.exp(log_terms - lead)).sum(dim=-1))


# (name, lower bound, strict) of mixdpo_loss's a and b per distribution.
_PARAM_RULES = {
    "lognormal": (("mu", -math.inf, True), ("sigma", 0.0, False)),
    "gamma": (("shape", 0.0, True), ("scale", 0.0, True)),
}

_LOG_TAIL: dict[tuple[str, str], _LogTail] = {
    ("lognormal", "quadrature"): _lognormal_quadrature,
    ("lognormal", "mc"): _lognormal_mc,
    ("gamma", "quadrature"): _gamma_quadrature,
    ("gamma", "mc"): _gamma_mc,
    ("gamma", "series"): _gamma_series,
}


def _as_float64(value: Tensor | float, name: str, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.to(device=device, dtype=torch.float64).reshape(())
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _check_params(distribution: str, a: Tensor | float, b: Tensor | float) -> None:
    """Range checks for plain floats (tensors are left unchecked to avoid a device sync)."""
    for (name, lower, strict), value in zip(_PARAM_RULES[distribution], (a, b), strict=True):
        if isinstance(value, Tensor):
            continue
        ok = math.isfinite(value) and (value > lower if strict else value >= lower)
        if not ok:
            bound = f"{'>' if strict else '>='} {lower}"
            raise ValueError(
                f"{distribution} {name} must be finite and {bound}, got {name}={value}"
            )


def mixdpo_loss(
    h: Tensor,
    distribution: str,
    a: Tensor | float,
    b: Tensor | float,
    estimator: str = "quadrature",
    num_points: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-pair MixDPO loss ``-log E_{beta ~ D}[sigma(beta h)]`` (Sicilia et al. 2601.06180).

    Args:
        h: log-ratio margins ``(logp_w - ref_w) - (logp_l - ref_l)``, any shape, usually [B].
        distribution: ``"lognormal"`` (a = mu, b = sigma of log beta; sigma >= 0) or ``"gamma"``
            (a = shape, b = scale; both > 0).
        a, b: python floats or 0-dim tensors (gradients flow to tensors).
        estimator: ``"quadrature"``, ``"mc"`` (biased, warns) or ``"series"`` (gamma only).
        num_points: quadrature nodes, Monte Carlo samples per pair, or series terms.
        generator: random generator for ``"mc"`` (on h's device); ignored otherwise.

    Returns:
        Loss of h's shape: float64 for float64 h, else float32. Gradient at ``h = 0`` is
        ``-E[beta] / 2`` (the estimator's E[beta]: sample mean for ``"mc"``).
    """
    _check_choice("distribution", distribution, DISTRIBUTIONS)
    _check_choice("estimator", estimator, ESTIMATORS)
    if (distribution, estimator) not in _LOG_TAIL:
        raise ValueError(f"estimator={estimator!r} is only available for distribution='gamma'")
    _check_num_points(num_points, estimator)
    _check_params(distribution, a, b)
    out_dtype = torch.promote_types(h.dtype, torch.float32)
    h64 = h.to(torch.float64)
    a64 = _as_float64(a, "a", h.device)
    b64 = _as_float64(b, "b", h.device)
    positive = h64 >= 0
    # where() instead of abs(): at h = 0 the h-branch passes gradient 1, abs() would pass 0.
    t = torch.where(positive, h64, -h64)
    log_q = _LOG_TAIL[(distribution, estimator)](t, a64, b64, num_points, generator)
    log_p = torch.where(positive, _log1mexp(log_q), log_q)
    return (-log_p).to(out_dtype)


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _lognormal_params(mean: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    return torch.log(mean) - sigma**2 / 2, sigma


def _gamma_params(mean: Tensor, shape: Tensor) -> tuple[Tensor, Tensor]:
    return shape, mean / shape


def _lognormal_moments(mu: Tensor, sigma: Tensor) -> dict[str, Tensor]:
    mean = torch.exp(mu + sigma**2 / 2)
    excess = torch.expm1(sigma**2)
    return {"mean": mean, "variance": excess * mean**2, "cv": torch.sqrt(excess)}


def _gamma_moments(shape: Tensor, scale: Tensor) -> dict[str, Tensor]:
    return {"mean": shape * scale, "variance": shape * scale**2, "cv": torch.rsqrt(shape)}


@dataclass(frozen=True)
class _Family:
    """How a family maps (mean, dispersion) to mixdpo_loss's (a, b) and back to moments."""

    dispersion_from_cv: Callable[[float], float]
    params: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    moments: Callable[[Tensor, Tensor], dict[str, Tensor]]
    auto_estimator: str


_FAMILIES = {
    "lognormal": _Family(
        lambda cv: math.sqrt(math.log1p(cv**2)), _lognormal_params, _lognormal_moments, "quadrature"
    ),
    "gamma": _Family(lambda cv: cv**-2, _gamma_params, _gamma_moments, "series"),
}


def _hermite_nodes_for(sigma: float) -> int:
    return next(nodes for max_sigma, nodes in _HERMITE_NODES_FOR_SIGMA if sigma <= max_sigma)


class StrengthDistribution(nn.Module):
    """Learned distribution ``D_theta`` of the MixDPO preference strength beta (2601.06180).

    Parameters are unconstrained and mapped through softplus. With ``learn_mean=False`` (default,
    see the identifiability note in the module docstring) ``E[beta]`` stays at ``mean`` and only
    the dispersion is learned: lognormal ``sigma = softplus(rho)``, ``mu = log(mean) - sigma^2/2``;
    gamma ``shape = softplus(rho)``, ``scale = mean / shape``. With ``learn_mean=True`` the mean is
    ``softplus(raw_mean)`` as well.

    ``estimator="auto"`` is the series for gamma and Gauss-Hermite for lognormal. ``num_points``
    None picks per estimator: 24 series terms, 16 Monte Carlo samples, 64 gamma quadrature nodes,
    and for lognormal quadrature 64 nodes while sigma <= 0.5, 96 up to 1.5, 160 up to 2.5 and 320
    beyond (chosen from the current sigma, for about 1e-6 relative accuracy of the loss).
    """

    def __init__(
        self,
        family: str = "lognormal",
        mean: float = 0.1,
        cv: float = 0.5,
        learn_mean: bool = False,
        estimator: str = "auto",
        num_points: int | None = None,
    ) -> None:
        super().__init__()
        _check_choice("family", family, DISTRIBUTIONS)
        _check_choice("estimator", estimator, ("auto",) + ESTIMATORS)
        for name, value in (("mean", mean), ("cv", cv)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {name}={value!r}")
        spec = _FAMILIES[family]
        resolved = spec.auto_estimator if estimator == "auto" else estimator
        if (family, resolved) not in _LOG_TAIL:
            raise ValueError(f"estimator={resolved!r} is only available for family='gamma'")
        if num_points is not None:
            _check_num_points(num_points, resolved)
        self.family = family
        self.estimator = resolved
        self.num_points = num_points
        self.learn_mean = learn_mean
        self.fixed_mean = float(mean)
        rho = _inverse_softplus(spec.dispersion_from_cv(float(cv)))
        self.rho = nn.Parameter(torch.tensor(rho))
        self.raw_mean = nn.Parameter(torch.tensor(_inverse_softplus(mean))) if learn_mean else None

    def params(self) -> tuple[Tensor, Tensor]:
        """(a, b) in :func:`mixdpo_loss`'s convention, float64 0-dim tensors carrying gradients."""
        dispersion = F.softplus(self.rho.double())
        if self.raw_mean is None:
            mean = torch.tensor(self.fixed_mean, dtype=torch.float64, device=self.rho.device)
        else:
            mean = F.softplus(self.raw_mean.double())
        return _FAMILIES[self.family].params(mean, dispersion)

    def resolved_num_points(self) -> int:
        """Nodes, samples or terms the next forward uses (see the class docstring)."""
        if self.num_points is not None:
            return self.num_points
        if (self.family, self.estimator) == ("lognormal", "quadrature"):
            return _hermite_nodes_for(float(F.softplus(self.rho.detach())))
        return _DEFAULT_POINTS[self.estimator]

    def forward(self, h: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Per-pair MixDPO loss for margins h [B] -> [B] (see :func:`mixdpo_loss`)."""
        a, b = self.params()
        return mixdpo_loss(
            h, self.family, a, b, self.estimator, self.resolved_num_points(), generator
        )

    def moments(self) -> dict[str, Tensor]:
        """Closed-form ``mean``, ``variance`` and ``cv`` of beta (0-dim float64 tensors)."""
        return _FAMILIES[self.family].moments(*self.params())

    def extra_repr(self) -> str:
        return (
            f"family={self.family!r}, estimator={self.estimator!r}, "
            f"num_points={self.num_points}, learn_mean={self.learn_mean}"
        )

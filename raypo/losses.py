"""Preference objectives as pure functions of tensors (no model, no Ray).

Every function returns the per-pair loss, shape ``[B]``. ``h`` is the unscaled log-ratio margin of
docs/methods.md, ``h = (logp_w - ref_w) - (logp_l - ref_l)``; ``w`` is the MallowsPO dispersion
weight ``w(x) = -c ln Hn(x)`` of :mod:`raypo.dispersion`. Inputs may be bf16/fp16/fp32/fp64; the
arithmetic runs in at least float32 (float64 for the Mallows-phi link) and the result has the
input's dtype when that is float32 or wider, float32 otherwise.

The objectives' names and what each needs are registered in :data:`raypo.objectives.OBJECTIVES`
(torch-free, so validating a config imports no torch); ``LOSS_FUNCTIONS`` maps each name to its
per-pair function here, and :func:`preference_loss` dispatches through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from raypo.mixdpo import StrengthDistribution, mixdpo_loss
from raypo.objectives import Objective, objective

if TYPE_CHECKING:
    from raypo.config import LossConfig

__all__ = [
    "LOSS_FUNCTIONS",
    "PreferenceBatch",
    "StrengthDistribution",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "length_normalised_margin",
    "mallows_phi_link",
    "mallows_phi_loss",
    "mallows_theta_ipo_loss",
    "mallows_theta_loss",
    "mallows_theta_simpo_loss",
    "mixdpo_loss",
    "preference_loss",
    "simpo_loss",
]

_MIN_DISPERSION = 1e-6
"""Floor on w(x) = -ln phi(x) inside the phi link: w = 0 (phi = 1, Hn = 1) divides by zero, and the
link is flat (g = 1/2 everywhere) in that limit anyway."""

_SERIES_BELOW = 1e-4
"""Below this x = s*w the phi link uses the Taylor series of ln(expm1(x)/x) (error < x^4/2880)."""


def _compute_dtype(x: Tensor, at_least: torch.dtype = torch.float32) -> torch.dtype:
    return torch.promote_types(x.dtype, at_least) if x.is_floating_point() else at_least


def _result_dtype(x: Tensor) -> torch.dtype:
    return _compute_dtype(x, torch.float32)


def dpo_loss(h: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (cDPO, Mitchell 2023).

    ``loss = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)``, computed with ``logsigmoid``.

    Args:
        h: log-ratio margin ``[B]``.
        beta: preference strength, > 0.
        label_smoothing: eps in ``[0, 0.5)``, the assumed probability that a label is flipped.
    Returns:
        per-pair loss ``[B]``.
    """
    z = beta * h.to(_compute_dtype(h))
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.to(_result_dtype(h))


def ipo_loss(h: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2024, eq. 17): ``(h - 1/(2 beta))^2``, regressing h to a fixed target.

    Args:
        h: log-ratio margin ``[B]``.
        beta: regularisation strength tau of the paper, > 0.
    Returns:
        per-pair loss ``[B]``.
    """
    return ((h.to(_compute_dtype(h)) - 1.0 / (2.0 * beta)) ** 2).to(_result_dtype(h))


def hinge_loss(h: Tensor, beta: float) -> Tensor:
    """SLiC hinge (Zhao et al. 2023, eq. 3 with delta = 1/beta): ``relu(1 - beta h)``.

    Args:
        h: log-ratio margin ``[B]``.
        beta: inverse margin, > 0.
    Returns:
        per-pair loss ``[B]``.
    """
    return torch.relu(1.0 - beta * h.to(_compute_dtype(h))).to(_result_dtype(h))


def length_normalised_margin(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor
) -> Tensor:
    """SimPO's reference-free margin ``logp_w/|y_w| - logp_l/|y_l|`` (Meng et al. 2024, eq. 4).

    Args:
        chosen_logps, rejected_logps: summed completion log-probs of the policy ``[B]``.
        chosen_lengths, rejected_lengths: completion token counts ``[B]``, >= 1.
    Returns:
        the margin ``[B]`` in at least float32.
    """
    dtype = _compute_dtype(chosen_logps)
    return chosen_logps.to(dtype) / chosen_lengths.to(dtype) - rejected_logps.to(
        dtype
    ) / rejected_lengths.to(dtype)


def simpo_loss(h: Tensor, beta: float, gamma: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6): ``-log sigma(beta h - gamma)``.

    Args:
        h: SimPO's length-normalised margin ``[B]`` (:func:`length_normalised_margin`).
        beta: reward scale, > 0.
        gamma: target reward margin, >= 0.
    Returns:
        per-pair loss ``[B]``.
    """
    scaled = beta * h.to(_compute_dtype(h)) - gamma
    return (-F.logsigmoid(scaled)).to(_result_dtype(h))


def mallows_theta_loss(h: Tensor, w: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """MallowsPO-theta (Chen et al., ICLR 2025, eq. 9): DPO with the margin scaled by ``w(x)``.

    ``loss = -(1-eps) log sigma(beta w h) - eps log sigma(-beta w h)``. With ``w == 1`` this is
    :func:`dpo_loss`. ``w`` is a per-pair constant from the reference model and gets no gradient.

    Args:
        h: log-ratio margin ``[B]``.
        w: dispersion weight ``[B]``, >= 0 (``-c ln Hn(x)``).
        beta: preference strength, > 0.
        label_smoothing: eps in ``[0, 0.5)`` as in cDPO (an extension; the paper has none).
    Returns:
        per-pair loss ``[B]``.
    """
    scaled = h.to(_compute_dtype(h)) * w.detach().to(_compute_dtype(h))
    return dpo_loss(scaled, beta, label_smoothing).to(_result_dtype(h))


def mallows_theta_ipo_loss(h: Tensor, w: Tensor, beta: float) -> Tensor:
    """MallowsPO-theta with IPO (Chen et al., ICLR 2025, Sec. 4.3): ``(w h - 1/(2 beta))^2``.

    Args:
        h: log-ratio margin ``[B]``.
        w: dispersion weight ``[B]`` (no gradient).
        beta: IPO's tau, > 0.
    Returns:
        per-pair loss ``[B]``.
    """
    scaled = h.to(_compute_dtype(h)) * w.detach().to(_compute_dtype(h))
    return ipo_loss(scaled, beta).to(_result_dtype(h))


def mallows_theta_simpo_loss(h: Tensor, w: Tensor, beta: float, gamma: float = 0.0) -> Tensor:
    """MallowsPO-theta with SimPO's margin: ``-log sigma(w (beta h - gamma))``.

    The dispersion weight scales SimPO's argument as it scales DPO's in MallowsPO-theta (Chen et
    al., ICLR 2025, eq. 9, with SimPO's reference-free margin of Meng et al. 2024, eq. 6; the
    combination is raypo's, not either paper's). With ``w == 1`` this is :func:`simpo_loss`.

    Args:
        h: SimPO's length-normalised margin ``[B]`` (:func:`length_normalised_margin`).
        w: dispersion weight ``[B]`` (no gradient).
        beta: reward scale, > 0.
        gamma: target reward margin, >= 0.
    Returns:
        per-pair loss ``[B]``.
    """
    dtype = _compute_dtype(h)
    scaled = w.detach().to(dtype) * (beta * h.to(dtype) - gamma)
    return (-F.logsigmoid(scaled)).to(_result_dtype(h))


def _log_q(t: Tensor, u: Tensor) -> Tensor:
    """``ln q(t)`` with ``q(t) = t / expm1(t u)`` and ``q(0) = 1/u``, for ``t >= 0``, float64.

    ``ln q = -ln u - ln(expm1(x)/x)`` with ``x = t u``;
    ``ln(expm1(x)/x) = x + ln(-expm1(-x)) - ln x`` never overflows, and below ``_SERIES_BELOW``
    its series ``x/2 + x^2/24`` keeps the value and the gradient exact at ``t = 0`` (where the
    closed form is 0/0).
    """
    x = t * u
    small = x < _SERIES_BELOW
    x_safe = torch.where(small, torch.ones_like(x), x)
    closed = x_safe + torch.log(-torch.expm1(-x_safe)) - torch.log(x_safe)
    series = x / 2.0 + x * x / 24.0
    return -torch.log(u) - torch.where(small, series, closed)


def _log_tail(t: Tensor, u: Tensor) -> Tensor:
    """``ln D(t)`` with ``D(t) = q(t) - q(t+1) = 1 - g_phi(t)`` for ``t >= 0`` (float64, stable).

    ``D`` is computed as ``q(t) (1 - q(t+1)/q(t))`` in log space: ``q(t)`` underflows for large
    ``t u`` and the plain difference cancels for small ``u``.
    """
    log_q_t = _log_q(t, u)
    return log_q_t + torch.log(-torch.expm1(_log_q(t + 1.0, u) - log_q_t))


def _phi_link_parts(s: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``s`` in float64 and ``ln D(t)`` at the reflected argument ``t = s`` (s >= 0) or ``-s``.

    The reflection uses ``where`` rather than ``abs`` so that ``dt/ds = +1`` at ``s = 0`` (torch's
    derivative of ``abs`` at 0 is 0, which would kill the gradient where training starts).
    """
    s64 = s.to(torch.float64)
    u = w.detach().to(torch.float64).clamp_min(_MIN_DISPERSION)
    t = torch.where(s64 >= 0, s64, -s64)
    return s64, _log_tail(t, u)


def mallows_phi_link(s: Tensor, w: Tensor) -> Tensor:
    """The MallowsPO-phi link ``g_{phi(x)}(s)`` (Chen et al., ICLR 2025, eq. 12 and Prop. 3).

    For integer ``k >= 1``, ``g_phi(k) = (k+1)/(1-phi^(k+1)) - k/(1-phi^k)`` is the probability
    that the item at central rank i beats the one at rank i+k under a Mallows-phi model; it is
    extended to real ``s >= 0`` by the same formula, and to ``s < 0`` by ``g(s) = 1 - g(-s)``.
    With ``u = w = -ln phi`` and ``q(s) = s/expm1(s u)``: ``g(s) = 1 + q(s+1) - q(s)`` for s >= 0.
    ``g(0) = g(0+) = 1/(1-phi) + 1/ln(phi)``, which is above 1/2: the link jumps at 0
    (docs/methods.md, "MallowsPO-phi").

    Args:
        s: scaled margin ``beta h`` ``[B]``.
        w: dispersion weight ``[B]``, clamped below at 1e-6 (phi = 1 is the flat limit g = 1/2).
    Returns:
        g ``[B]`` in ``(0, 1)``, computed in float64, returned in the dtype of ``s`` (>= float32).
    """
    s64, log_tail = _phi_link_parts(s, w)
    tail = torch.exp(log_tail)
    return torch.where(s64 >= 0, 1.0 - tail, tail).to(_result_dtype(s))


def mallows_phi_loss(h: Tensor, w: Tensor, beta: float) -> Tensor:
    """MallowsPO-phi (Chen et al., ICLR 2025, eq. 13): ``-ln g_{phi(x)}(beta h)``.

    ``ln g`` is ``log1p(-D)`` for ``beta h >= 0`` and ``ln D`` for ``beta h < 0`` with
    ``D = q(t) - q(t+1)`` evaluated in log space, so the loss and its gradient stay finite for
    ``|beta h|`` up to 1e3 and beyond and for ``w`` down to 1e-4.

    Args:
        h: log-ratio margin ``[B]``.
        w: dispersion weight ``[B]`` (no gradient).
        beta: preference strength, > 0.
    Returns:
        per-pair loss ``[B]``.
    """
    s, log_tail = _phi_link_parts(beta * h.to(torch.float64), w)
    log_g = torch.where(s >= 0, torch.log1p(-torch.exp(log_tail)), log_tail)
    return (-log_g).to(_result_dtype(h))


@dataclass(frozen=True)
class PreferenceBatch:
    """Per-pair quantities of one batch, each ``[B]``; what :func:`preference_loss` consumes."""

    policy_chosen_logps: Tensor
    """Summed log-probs of the chosen completion under the policy (carries the gradient)."""
    policy_rejected_logps: Tensor
    """Summed log-probs of the rejected completion under the policy (carries the gradient)."""
    chosen_lengths: Tensor
    """Number of completion tokens of the chosen response."""
    rejected_lengths: Tensor
    """Number of completion tokens of the rejected response."""
    reference_chosen_logps: Tensor | None = None
    """Summed log-probs of the chosen completion under the frozen reference (no gradient)."""
    reference_rejected_logps: Tensor | None = None
    """Summed log-probs of the rejected completion under the frozen reference (no gradient)."""
    dispersion: Tensor | None = None
    """MallowsPO dispersion weight w(x) (no gradient)."""


PerPairLoss = Callable[
    [Tensor, "Tensor | None", "LossConfig", "StrengthDistribution | None"], Tensor
]
"""``(h, w, loss_config, strength) -> loss [B]``; h already has the target margin removed (the
SimPO-type objectives subtract gamma themselves)."""


def _require_strength(strength: StrengthDistribution | None) -> StrengthDistribution:
    if strength is None:
        raise ValueError("loss.type mixdpo needs a StrengthDistribution; none was given")
    return strength


LOSS_FUNCTIONS: dict[str, PerPairLoss] = {
    "dpo": lambda h, w, cfg, _: dpo_loss(h, cfg.beta, cfg.label_smoothing),
    "ipo": lambda h, w, cfg, _: ipo_loss(h, cfg.beta),
    "hinge": lambda h, w, cfg, _: hinge_loss(h, cfg.beta),
    "simpo": lambda h, w, cfg, _: simpo_loss(h, cfg.beta, cfg.gamma),
    "mallows_theta": lambda h, w, cfg, _: mallows_theta_loss(h, w, cfg.beta, cfg.label_smoothing),
    "mallows_theta_ipo": lambda h, w, cfg, _: mallows_theta_ipo_loss(h, w, cfg.beta),
    "mallows_theta_simpo": lambda h, w, cfg, _: mallows_theta_simpo_loss(h, w, cfg.beta, cfg.gamma),
    "mallows_phi": lambda h, w, cfg, _: mallows_phi_loss(h, w, cfg.beta),
    "mixdpo": lambda h, w, cfg, strength: _require_strength(strength)(h),
}
"""The per-pair function of every objective of :data:`raypo.objectives.OBJECTIVES`, by name."""


def _margin(batch: PreferenceBatch, spec: Objective, name: str) -> Tensor:
    if not spec.uses_reference:
        return length_normalised_margin(
            batch.policy_chosen_logps,
            batch.policy_rejected_logps,
            batch.chosen_lengths,
            batch.rejected_lengths,
        )
    if batch.reference_chosen_logps is None or batch.reference_rejected_logps is None:
        raise ValueError(f"loss.type {name} needs reference log-probs; the batch has none")
    dtype = _compute_dtype(batch.policy_chosen_logps)
    chosen = batch.policy_chosen_logps.to(dtype) - batch.reference_chosen_logps.detach().to(dtype)
    rejected = batch.policy_rejected_logps.to(dtype) - batch.reference_rejected_logps.detach().to(
        dtype
    )
    return chosen - rejected


def implicit_rewards(config: LossConfig, batch: PreferenceBatch) -> tuple[Tensor, Tensor]:
    """Per-pair detached implicit rewards ``[B]`` float32 of the chosen and the rejected
    completions: ``beta (logp - ref)`` (DPO, Rafailov et al. 2023, eq. 5), ``beta logp/|y|`` for
    reference-free objectives; never scaled by the dispersion ``w(x)``."""
    spec, beta = objective(config.type), config.beta
    chosen = batch.policy_chosen_logps.detach().float()
    rejected = batch.policy_rejected_logps.detach().float()
    if spec.uses_reference:
        chosen = chosen - batch.reference_chosen_logps.detach().float()
        rejected = rejected - batch.reference_rejected_logps.detach().float()
    else:
        chosen = chosen / batch.chosen_lengths.float()
        rejected = rejected / batch.rejected_lengths.float()
    return beta * chosen, beta * rejected


def preference_loss(
    config: LossConfig,
    batch: PreferenceBatch,
    strength: StrengthDistribution | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss of ``config.type`` over the batch, and the TRL-named metrics (detached, 0-dim).

    The target margin ``gamma`` is removed from the margin before the link as ``h - gamma/beta``
    (for SimPO-type objectives the link subtracts it from ``beta h`` itself, which is the same).
    Rewards are logged unscaled by ``w``. Metrics: ``loss``, ``rewards/chosen``,
    ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
    ``logps/rejected``, and when present ``dispersion/mean``, ``dispersion/std``,
    ``mixdpo/beta_mean``, ``mixdpo/beta_variance``, ``mixdpo/beta_cv``.
    """
    spec = objective(config.type)
    if spec.uses_dispersion and batch.dispersion is None:
        raise ValueError(f"loss.type {config.type} needs the dispersion w(x); the batch has none")
    h = _margin(batch, spec, config.type)
    if spec.uses_reference and config.gamma:
        h = h - config.gamma / config.beta
    per_pair = LOSS_FUNCTIONS[config.type](h, batch.dispersion, config, strength)
    loss = per_pair.mean()

    reward_chosen, reward_rejected = implicit_rewards(config, batch)
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": reward_chosen.mean(),
        "rewards/rejected": reward_rejected.mean(),
        "rewards/accuracies": (reward_chosen > reward_rejected).float().mean(),
        "rewards/margins": (reward_chosen - reward_rejected).mean(),
        "logps/chosen": batch.policy_chosen_logps.detach().float().mean(),
        "logps/rejected": batch.policy_rejected_logps.detach().float().mean(),
    }
    if batch.dispersion is not None:
        w = batch.dispersion.detach().float()
        metrics["dispersion/mean"] = w.mean()
        metrics["dispersion/std"] = w.std(unbiased=False)
    if spec.learns_strength and strength is not None:
        moments = strength.moments()
        metrics["mixdpo/beta_mean"] = moments["mean"].detach()
        metrics["mixdpo/beta_variance"] = moments["variance"].detach()
        metrics["mixdpo/beta_cv"] = moments["cv"].detach()
    return loss, metrics

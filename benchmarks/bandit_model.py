"""The synthetic Mallows bandit of ``mallows_bandit.py``: problems, comparisons, fits, metrics.

A prompt ``x`` has ``K`` arms; arm ``a`` has consensus rank ``a`` (0 = best). Annotators of
prompt ``x`` rank the arms by a Mallows(Kendall) model centred on the consensus with dispersion
``phi(x)``; each annotator compares one uniformly drawn pair. Only the pairwise marginal of a
ranking enters one comparison, and under Mallows(Kendall) the item ``d`` consensus ranks better
wins with probability ``g_phi(d)``, raypo's MallowsPO-phi link at integer distances
(``raypo.losses.mallows_phi_link``; tests check it against enumerating all rankings). Data are
kept as the fraction of a prompt's comparisons won by each side of each unordered pair, so a fit
costs the same for 20 or 2,000 comparisons.

Policies are tabular logits. Every objective depends on the logits only through
``beta * h``, so a fit run to convergence at strength ``beta`` is ``log pi = log pi_ref + S/beta``
(normalised) for scores ``S`` fitted once at ``beta = 1``: matching an exact KL budget is a 1-D
search over ``beta`` with no refit (:func:`policy_at_kl`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from raypo.dispersion import dispersion_weight
from raypo.losses import dpo_loss, mallows_phi_link, mallows_phi_loss, mallows_theta_loss

REFERENCES = ("uniform", "top_choice")


@dataclass(frozen=True)
class Problem:
    """One bandit: per-prompt dispersion, reference policy, weights and pairwise probabilities."""

    phi: np.ndarray
    """[M] true Mallows dispersion per prompt."""
    ref_logp: torch.Tensor
    """[M, K] log pi_ref (uniform, or the annotators' top-choice distribution)."""
    w_true: torch.Tensor
    """[M] -ln phi(x), the paper's dispersion weight."""
    w_est: torch.Tensor
    """[M] -c ln Hn(pi_ref), raypo.dispersion's estimate (0 for a uniform reference)."""
    win_prob: torch.Tensor
    """[M, K, K] P(arm a preferred to arm b) by one annotator; 1/2 on the diagonal."""

    @property
    def low(self) -> np.ndarray:
        """[M] True on the prompts of the lowest dispersion (the near-unanimous group)."""
        return self.phi == self.phi.min()

    @property
    def arms(self) -> int:
        return self.ref_logp.shape[1]


@dataclass(frozen=True)
class Comparisons:
    """Per seed and prompt, the fraction of comparisons won by each side of each pair (a < b)."""

    wins: torch.Tensor
    """[S, M, P] won by the consensus-better arm a; with ``losses`` sums to 1 per prompt."""
    losses: torch.Tensor
    """[S, M, P] won by the consensus-worse arm b."""


def pairs(arms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (a, b), a < b, of the ``arms * (arms - 1) / 2`` unordered pairs."""
    a, b = np.triu_indices(arms, 1)
    return torch.from_numpy(a), torch.from_numpy(b)


def pairwise_probs(phi: float, arms: int) -> torch.Tensor:
    """[K, K] P(a ranked before b) under Mallows(Kendall): ``g_phi(b - a)`` for a < b."""
    if not 0 < phi < 1:
        raise ValueError(f"Mallows dispersion phi must be in (0, 1), got {phi}")
    rank = torch.arange(arms, dtype=torch.float64)
    distance = rank[None, :] - rank[:, None]
    link = mallows_phi_link(distance, torch.full_like(distance, -math.log(phi)))
    return torch.where(distance == 0, torch.full_like(link, 0.5), link)


def top_choice_probs(phi: np.ndarray, arms: int) -> np.ndarray:
    """``P(arm a ranked first) = phi^a / sum_b phi^b`` under Mallows(Kendall): [M, K]."""
    weights = np.asarray(phi, dtype=np.float64)[:, None] ** np.arange(arms)
    return weights / weights.sum(axis=1, keepdims=True)


def make_problem(
    phis: Sequence[float], prompts: int, arms: int, scale: float, reference: str
) -> Problem:
    """Prompts split evenly over ``phis``; ``reference`` is ``uniform`` or ``top_choice``."""
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    if prompts < len(phis):
        raise ValueError(f"{prompts} prompts are fewer than the {len(phis)} dispersion values")
    phi = np.array([phis[i * len(phis) // prompts] for i in range(prompts)], dtype=np.float64)
    if reference == "uniform":
        ref = np.full((prompts, arms), 1.0 / arms)
    else:
        ref = top_choice_probs(phi, arms)
    hn = torch.from_numpy(-(ref * np.log(ref)).sum(axis=1) / math.log(arms))
    w_est = dispersion_weight(hn, hn, scale).double()
    win_prob = torch.stack([pairwise_probs(float(p), arms) for p in phi])
    return Problem(
        phi, torch.from_numpy(np.log(ref)), torch.from_numpy(-np.log(phi)), w_est, win_prob
    )


def sample_comparisons(
    problem: Problem, per_prompt: int | None, seeds: Sequence[int], prior: float
) -> Comparisons:
    """``per_prompt`` annotators per prompt each compare a uniformly drawn pair, one data set per
    seed; ``None`` gives the population fractions (one data set: no sampling noise).

    ``prior`` comparisons per pair are added as half a win to each side (a tie): without them a
    prompt whose comparisons are separable (some arm never loses) has no finite fit.
    """
    a, b = pairs(problem.arms)
    better = problem.win_prob[:, a, b]  # [M, P]
    if per_prompt is None:
        return Comparisons(better[None] / a.numel(), (1 - better)[None] / a.numel())
    wins, losses = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        shape = (problem.phi.size, per_prompt)
        pair = torch.randint(a.numel(), shape, generator=generator)
        won = torch.rand(shape, generator=generator, dtype=torch.float64) < better.gather(1, pair)
        count_w = torch.zeros_like(better).scatter_add_(1, pair, won.double()) + prior / 2
        count_l = torch.zeros_like(better).scatter_add_(1, pair, (~won).double()) + prior / 2
        total = count_w.sum(1, keepdim=True) + count_l.sum(1, keepdim=True)
        wins.append(count_w / total)
        losses.append(count_l / total)
    return Comparisons(torch.stack(wins), torch.stack(losses))


def finite_fit(wins: torch.Tensor, losses: torch.Tensor, arms: int) -> np.ndarray:
    """[...] True where comparisons *without* a prior (``wins`` / ``losses`` [..., P], each pair's
    count or fraction won by the consensus-better / -worse arm) have a finite fit.

    The tabular logistic fit (DPO's, and MallowsPO-theta's, a rescaling of it) is finite iff the
    graph "a beat b at least once" is strongly connected (Zermelo): otherwise a group of arms
    never loses to the rest and its margin grows without bound, so a prior alone sets it.
    """
    a, b = pairs(arms)
    beat = torch.zeros(*wins.shape[:-1], arms, arms, dtype=torch.bool)
    beat[..., a, b] = wins > 0
    beat[..., b, a] = losses > 0
    reach = beat | torch.eye(arms, dtype=torch.bool)
    for k in range(arms):  # transitive closure (Warshall)
        reach = reach | (reach[..., :, k : k + 1] & reach[..., k : k + 1, :])
    return reach.all(-1).all(-1).numpy()


def finite_fit_share(problem: Problem, per_prompt: int | None, seeds: Sequence[int]) -> np.ndarray:
    """[S, M] :func:`finite_fit` of the data sets ``sample_comparisons`` draws for these seeds,
    without the prior; the population (``None``, every probability in (0, 1)) is always finite."""
    if per_prompt is None:
        return np.ones((1, problem.phi.size), dtype=bool)
    data = sample_comparisons(problem, per_prompt, seeds, prior=0.0)
    return finite_fit(data.wins, data.losses, problem.arms)


def subproblem(problem: Problem, mask: np.ndarray) -> Problem:
    """The prompts where ``mask`` [M] is True, as a problem of their own."""
    keep = torch.from_numpy(np.asarray(mask, dtype=bool))
    return replace(
        problem,
        phi=problem.phi[mask],
        ref_logp=problem.ref_logp[keep],
        w_true=problem.w_true[keep],
        w_est=problem.w_est[keep],
        win_prob=problem.win_prob[keep],
    )


def group_u_rank(problem: Problem, scores: torch.Tensor, kl: float) -> dict[str, np.ndarray]:
    """U_rank [S] of the low- and of the high-dispersion prompts when each group alone spends a
    mean ``kl`` nats per prompt along the fitted ``scores`` [S, M, K] (one beta per group).

    This is the quality of the direction the data give each group, apart from how a method
    shares the KL between groups: MallowsPO-theta's converged scores on a prompt are DPO's
    divided by ``w(x)``, so per prompt both move along the same direction.
    """
    out = {}
    for name, mask in (("low", problem.low), ("high", ~problem.low)):
        part = subproblem(problem, mask)
        out[name] = metrics(part, policy_at_kl(part, scores[:, torch.from_numpy(mask)], kl))[
            "u_rank"
        ]
    return out


def pair_loss(method: str, s: torch.Tensor, problem: Problem) -> torch.Tensor:
    """raypo's per-pair loss of ``method`` at scaled margins ``s = beta h`` [..., M, P]."""
    if method == "dpo":
        return dpo_loss(s, 1.0)
    w = problem.w_true if method.endswith("_true") else problem.w_est
    w = w[:, None].expand(s.shape)
    if method.startswith("theta"):
        return mallows_theta_loss(s, w, 1.0)
    if method.startswith("phi"):
        return mallows_phi_loss(s, w, 1.0)
    raise ValueError(f"unknown bandit method {method!r}")


def expected_loss(
    method: str,
    logratio: torch.Tensor,
    beta: torch.Tensor | float,
    problem: Problem,
    data: Comparisons,
) -> torch.Tensor:
    """Sum over the leading dimensions of the mean over prompts of each prompt's data loss.

    ``logratio`` [..., S, M, K] is ``log pi - log pi_ref``; ``beta`` broadcasts against [..., S, M].
    """
    a, b = pairs(problem.arms)
    s = torch.as_tensor(beta, dtype=torch.float64)[..., None] * (
        logratio[..., a] - logratio[..., b]
    )
    per_prompt = (data.wins * pair_loss(method, s, problem)).sum(-1) + (
        data.losses * pair_loss(method, -s, problem)
    ).sum(-1)
    return per_prompt.mean(-1).sum()


def seed_losses(
    method: str, scores: torch.Tensor, problem: Problem, data: Comparisons
) -> torch.Tensor:
    """[S] the ``beta = 1`` objective of each seed's fit: the mean over prompts of the data loss."""
    return torch.stack(
        [
            expected_loss(
                method, scores[i], 1.0, problem, Comparisons(data.wins[i], data.losses[i])
            )
            for i in range(scores.shape[0])
        ]
    ).detach()


def lbfgs_scores(
    method: str, problem: Problem, data: Comparisons, start: torch.Tensor
) -> torch.Tensor:
    """One L-BFGS run (strong Wolfe, float64) on the ``beta = 1`` objective from ``start``."""
    scores = start.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [scores],
        lr=1.0,
        max_iter=1000,
        history_size=50,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = expected_loss(method, scores, 1.0, problem, data) * problem.phi.size
        loss.backward()
        return loss

    optimizer.step(closure)
    return scores.detach()


def _adam(
    method: str, problem: Problem, data: Comparisons, start: torch.Tensor, steps: int, lr: float
) -> torch.Tensor:
    scores = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([scores], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        (expected_loss(method, scores, 1.0, problem, data) * problem.phi.size).backward()
        optimizer.step()
    return scores.detach()


PHI_ADAM_STEPS = 3000
"""Adam steps (lr 0.01) before L-BFGS in MallowsPO-phi's second fit (see converged_scores)."""


def converged_scores(
    method: str, problem: Problem, data: Comparisons, start: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Scores ``S`` [S, M, K] minimising the ``beta = 1`` objective (L-BFGS, float64), and the
    largest absolute gradient left. ``start`` (e.g. DPO's scores) matters for MallowsPO-phi,
    whose link jumps at ``h = 0``: from all-equal scores every pair starts on the jump.

    MallowsPO-phi's loss is discontinuous where a margin crosses 0, and L-BFGS's line search
    can stall there far from the minimum (on the N = 100 bandit after about 10 iterations,
    0.015 nats per prompt above what Adam then L-BFGS reaches, with a very different policy).
    For ``phi`` methods the fit is therefore also run as Adam (``PHI_ADAM_STEPS`` steps) from the
    same start followed by L-BFGS, and each seed keeps whichever of the two fits has the lower
    loss.
    """
    seeds = data.wins.shape[0]
    init = torch.zeros(seeds, *problem.ref_logp.shape, dtype=torch.float64)
    init = init if start is None else start.clone()
    scores = lbfgs_scores(method, problem, data, init)
    if method.startswith("phi"):
        second = lbfgs_scores(
            method, problem, data, _adam(method, problem, data, init, PHI_ADAM_STEPS, 0.01)
        )
        lower = seed_losses(method, second, problem, data) < seed_losses(
            method, scores, problem, data
        )
        scores = torch.where(lower[:, None, None], second, scores)
    scores.requires_grad_(True)
    (expected_loss(method, scores, 1.0, problem, data) * problem.phi.size).backward()
    return scores.detach(), float(scores.grad.abs().max())


def policy_logp(problem: Problem, scores: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``log pi`` [..., M, K] of the converged fit at ``beta`` [...] (see the module docstring)."""
    return torch.log_softmax(problem.ref_logp + scores / beta[..., None, None], dim=-1)


def mean_kl(problem: Problem, logp: torch.Tensor) -> torch.Tensor:
    """``KL(pi || pi_ref)`` averaged over prompts: [...]."""
    return (logp.exp() * (logp - problem.ref_logp)).sum(-1).mean(-1)


def policy_at_kl(problem: Problem, scores: torch.Tensor, target: float) -> torch.Tensor:
    """The converged fits' ``log pi`` [S, M, K] whose mean KL equals ``target`` (per seed).

    KL falls monotonically as beta grows (the policy's temperature); bisection on ``ln beta``
    over [-20, 20] to float64 resolution. A target above the KL of the scores' argmax policies
    (beta -> 0) is unreachable and is an error.
    """
    low = torch.full(scores.shape[:1], -20.0, dtype=torch.float64)
    high = torch.full_like(low, 20.0)
    if bool((mean_kl(problem, policy_logp(problem, scores, low.exp())) < target).any()):
        raise ValueError(f"KL budget {target} exceeds what a policy from these scores can spend")
    for _ in range(80):
        mid = (low + high) / 2
        above = mean_kl(problem, policy_logp(problem, scores, mid.exp())) > target
        low, high = torch.where(above, mid, low), torch.where(above, high, mid)
    return policy_logp(problem, scores, ((low + high) / 2).exp())


def metrics(problem: Problem, logp: torch.Tensor) -> dict[str, np.ndarray]:
    """Per policy [...] (x100 where a percentage): ``u_rank`` (expected consensus-rank utility
    ``1 - rank/(K-1)``: 100 = always the consensus best, 50 = uniform), ``win_rate`` (probability
    that a random annotator prefers the policy's arm to the reference's, ties half), both overall
    and per dispersion group, ``kl`` and ``kl_low_share`` (share of the KL spent on the
    low-dispersion prompts)."""
    probs = logp.exp()
    utility = 1.0 - torch.arange(problem.arms, dtype=torch.float64) / (problem.arms - 1)
    u_rank = (probs * utility).sum(-1) * 100
    ref = problem.ref_logp.exp()
    win = torch.einsum("...xa,xab,xb->...x", probs, problem.win_prob, ref) * 100
    kl = (probs * (logp - problem.ref_logp)).sum(-1)
    low = torch.from_numpy(problem.low)
    high = ~low if bool((~low).any()) else low
    out = {
        "u_rank": u_rank.mean(-1),
        "win_rate": win.mean(-1),
        "u_rank_low": u_rank[..., low].mean(-1),
        "u_rank_high": u_rank[..., high].mean(-1),
        "kl": kl.mean(-1),
        "kl_low_share": kl[..., low].sum(-1) / kl.sum(-1).clamp_min(1e-300),
    }
    return {key: value.numpy() for key, value in out.items()}


@dataclass(frozen=True)
class AdamSettings:
    """The earlier protocol's training: Adam from ``pi_ref`` over a grid of beta."""

    betas: tuple[float, ...]
    """Strengths trained side by side."""
    lr: float = 0.02
    """Adam's learning rate on the logits."""
    steps: int = 600
    """Full-batch steps per run."""
    eval_every: int = 20
    """Steps between the checkpoints a KL budget may pick from."""


def adam_frontier(
    method: str,
    problem: Problem,
    data: Comparisons,
    settings: AdamSettings,
    targets: Sequence[float],
) -> dict[str, np.ndarray]:
    """Best checkpoint under each KL budget (oracle early stopping): metrics [T, S].

    Every (beta, checkpoint) of the Adam runs is a candidate; per seed and budget the one with
    the highest ``u_rank`` among those with mean KL at most the budget is kept.
    """
    seeds = data.wins.shape[0]
    ref = problem.ref_logp
    beta = torch.tensor(settings.betas, dtype=torch.float64)[:, None, None]
    logits = ref.expand(len(settings.betas), seeds, *ref.shape).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=settings.lr)
    checkpoints = [metrics(problem, torch.log_softmax(logits.detach(), -1))]
    for step in range(1, settings.steps + 1):
        logratio = torch.log_softmax(logits, -1) - ref
        loss = expected_loss(method, logratio, beta, problem, data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % settings.eval_every == 0:
            checkpoints.append(metrics(problem, torch.log_softmax(logits.detach(), -1)))
    # [checkpoints * betas, seeds] per metric
    stacked = {k: np.stack([c[k] for c in checkpoints]).reshape(-1, seeds) for k in checkpoints[0]}
    out: dict[str, list[np.ndarray]] = {k: [] for k in stacked}
    for target in targets:
        masked = np.where(stacked["kl"] <= target, stacked["u_rank"], -np.inf)
        best = masked.argmax(axis=0)
        for key, values in stacked.items():
            out[key].append(values[best, np.arange(seeds)])
    return {key: np.stack(values) for key, values in out.items()}


def converged_at_kl(
    method: str,
    problem: Problem,
    data: Comparisons,
    targets: Sequence[float],
    start: torch.Tensor | None = None,
) -> tuple[dict[str, np.ndarray], torch.Tensor, float]:
    """Converged fit matched to each exact KL budget: metrics [T, S], the scores, the largest
    gradient left by the fit."""
    scores, grad = converged_scores(method, problem, data, start)
    per_target = [metrics(problem, policy_at_kl(problem, scores, t)) for t in targets]
    stacked = {key: np.stack([m[key] for m in per_target]) for key in per_target[0]}
    return stacked, scores, grad

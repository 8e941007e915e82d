"""MallowsPO's synthetic bandit: DPO vs MallowsPO-theta/-phi when dispersion varies by prompt.

Set-up (after Chen et al., ICLR 2025, synthetic bandit experiment; designed from docs/methods.md
since the paper's exact protocol is not stored here):

- ``M`` prompts, each with ``K`` arms; arm ``a`` has consensus rank ``a`` (0 = best) and reward
  ``r(x, a) = 1 - a/(K-1)`` (reported x100: 100 = always the consensus-best arm). The arm order is
  the same for every prompt: a tabular policy is symmetric in the arms, so a shuffle changes
  nothing.
- Each prompt has a true Mallows dispersion ``phi(x)``: half the prompts get the first value of
  ``--phis`` (near-unanimous annotators), half the last (near-random ones).
- Preference data: per prompt, ``--comparisons`` annotators each draw a ranking from the
  Mallows(Kendall) model centred on the consensus with ``phi(x)`` (exact repeated-insertion
  sampler) and compare one uniformly drawn pair of arms.
- Reference policy: the annotators' top-choice distribution, ``pi_ref(a|x) ∝ phi(x)^a`` (what
  supervised fine-tuning on their favourite answers would give). This is what makes the entropy
  proxy meaningful in a bandit: its normalised entropy ``Hn(x) = H(pi_ref(.|x)) / ln K`` grows
  with ``phi(x)``, and the estimate ``w_est(x) = -c ln Hn(x)`` (raypo.dispersion, c = 0.29) stands
  for ``-ln phi(x)``. With a uniform reference ``Hn = 1`` for every prompt and the estimate
  carries no information.
- Policy: tabular logits ``theta[x, a]`` initialised at ``log pi_ref``, trained full-batch with
  Adam (``--optimizer adam``, the default; ``gd`` is plain gradient descent at ``lr / beta^2``) on
  the raypo.losses objectives: DPO, MallowsPO-theta and MallowsPO-phi with the true weight
  ``w(x) = -ln phi(x)`` and with the entropy estimate ``w_est(x)``.
- Evaluation: expected reward of the learned policy and ``KL(pi || pi_ref)`` (mean over prompts)
  at checkpoints of every run over a grid of beta; a method's reward/KL frontier is the best
  reward reached by any (beta, checkpoint) with KL at most k (the DPO paper's frontier).
  Frontiers are compared at fixed KL levels across seeds (Student-t 95% intervals).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from common import Column, Table, add_output_argument, mean_ci, new_figure, write_results

from raypo.dispersion import dispersion_weight
from raypo.losses import dpo_loss, mallows_phi_loss, mallows_theta_loss

METHODS = ("dpo", "theta_true", "theta_est", "phi_true", "phi_est")
MIN_GAIN = 0.1
"""Reward points (of 100) below which a difference counts as a tie even if its CI excludes 0."""
PLOT_KL = np.concatenate([[0.0], np.geomspace(0.005, 2.0, 40)])
LABELS = {
    "dpo": "DPO",
    "theta_true": "MallowsPO-theta, true phi",
    "theta_est": "MallowsPO-theta, entropy estimate",
    "phi_true": "MallowsPO-phi, true phi",
    "phi_est": "MallowsPO-phi, entropy estimate",
}


@dataclass(frozen=True)
class Problem:
    """One bandit: per-prompt dispersion, rewards, reference policy and dispersion weights."""

    phi: np.ndarray
    """[M] true Mallows dispersion per prompt."""
    reward: np.ndarray
    """[M, K] reward of each arm, 1 for the consensus best, 0 for the worst."""
    ref_logp: np.ndarray
    """[M, K] log pi_ref, the annotators' top-choice distribution."""
    hn: np.ndarray
    """[M] normalised entropy of pi_ref."""
    w_true: np.ndarray
    """[M] -ln phi(x), the paper's dispersion weight."""
    w_est: np.ndarray
    """[M] -c ln Hn(x), raypo.dispersion's estimate."""


@dataclass(frozen=True)
class Comparisons:
    """Pairwise preferences: prompt index, preferred arm and other arm, each [N]."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


@dataclass(frozen=True)
class TrainSettings:
    """How each policy is trained."""

    optimizer: str = "adam"
    """``adam`` (learning rate ``lr``) or ``gd`` (learning rate ``lr / beta^2``)."""
    lr: float = 0.01
    steps: int = 2000
    eval_every: int = 50
    """Steps between the checkpoints whose (KL, reward) enter the frontier."""


@dataclass(frozen=True)
class Trajectory:
    """Metrics of one method's runs at each checkpoint: arrays [checkpoints, betas]."""

    kl: np.ndarray
    reward: np.ndarray
    reward_low: np.ndarray
    """Reward on the low-dispersion (most unanimous) prompts."""
    reward_high: np.ndarray
    """Reward on the high-dispersion prompts."""
    kl_low: np.ndarray
    """KL spent on the low-dispersion prompts (mean over those prompts)."""


def sample_mallows(phi: float, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rankings of ``k`` items from the Mallows(Kendall) model centred on ``0, 1, ..., k-1``.

    Repeated insertion: item ``i`` is inserted among the ``i`` items placed before it at position
    ``j`` (0 = top) with probability proportional to ``phi^(i - j)``, i.e. creating ``i - j``
    inversions; the result has ``P(ranking) ∝ phi^inversions``. Row ``r`` lists the items from
    most to least preferred.
    """
    if not 0 < phi <= 1:
        raise ValueError(f"Mallows dispersion phi must be in (0, 1], got {phi}")
    slots = []
    for item in range(k):
        weights = phi ** np.arange(item, -1, -1, dtype=np.float64)
        slots.append(rng.choice(item + 1, size=n, p=weights / weights.sum()))
    rankings = np.empty((n, k), dtype=np.int64)
    for row in range(n):
        order: list[int] = []
        for item in range(k):
            order.insert(int(slots[item][row]), item)
        rankings[row] = order
    return rankings


def top_choice_probs(phi: np.ndarray, k: int) -> np.ndarray:
    """``P(item a ranked first) = phi^a / sum_b phi^b`` under Mallows(Kendall): [M, k]."""
    weights = np.asarray(phi, dtype=np.float64)[:, None] ** np.arange(k)
    return weights / weights.sum(axis=1, keepdims=True)


def make_problem(phis: tuple[float, ...], prompts: int, arms: int, scale: float) -> Problem:
    """Prompts split evenly over ``phis``; reference = top-choice distribution; both weights."""
    phi = np.array([phis[i * len(phis) // prompts] for i in range(prompts)], dtype=np.float64)
    ref = top_choice_probs(phi, arms)
    hn = -(ref * np.log(ref)).sum(axis=1) / np.log(arms)
    hn_t = torch.from_numpy(hn)
    w_est = dispersion_weight(hn_t, hn_t, scale).numpy()
    reward = np.tile(1.0 - np.arange(arms) / (arms - 1), (prompts, 1))
    return Problem(phi, reward, np.log(ref), hn, -np.log(phi), w_est)


def sample_comparisons(problem: Problem, per_prompt: int, rng: np.random.Generator) -> Comparisons:
    """Per prompt, ``per_prompt`` annotators each rank the arms and compare one random pair."""
    arms = problem.reward.shape[1]
    prompt, chosen, rejected = [], [], []
    for x, phi in enumerate(problem.phi):
        rankings = sample_mallows(float(phi), per_prompt, arms, rng)
        position = np.argsort(rankings, axis=1)
        for row in range(per_prompt):
            a, b = rng.choice(arms, size=2, replace=False)
            first = position[row, a] < position[row, b]
            prompt.append(x)
            chosen.append(a if first else b)
            rejected.append(b if first else a)
    return Comparisons(np.array(prompt), np.array(chosen), np.array(rejected))


def _loss(method: str, s: torch.Tensor, w_true: torch.Tensor, w_est: torch.Tensor) -> torch.Tensor:
    """Per-comparison loss [B, N] of ``method`` at scaled margins ``s = beta h`` [B, N]."""
    if method == "dpo":
        return dpo_loss(s, 1.0)
    w = w_true if method.endswith("_true") else w_est
    if method.startswith("theta"):
        return mallows_theta_loss(s, w, 1.0)
    return mallows_phi_loss(s, w, 1.0)


def _metrics(theta: torch.Tensor, problem: Problem, low: np.ndarray) -> dict[str, np.ndarray]:
    """Mean reward (x100) and KL over prompts, all and per dispersion group: [methods, betas]."""
    logp = torch.log_softmax(theta, dim=-1).double().numpy()
    probs = np.exp(logp)
    reward = (probs * problem.reward).sum(-1) * 100
    kl = (probs * (logp - problem.ref_logp)).sum(-1)
    high = ~low if (~low).any() else low  # one group only (equal dispersion): both are all
    return {
        "kl": kl.mean(-1),
        "reward": reward.mean(-1),
        "reward_low": reward[..., low].mean(-1),
        "reward_high": reward[..., high].mean(-1),
        "kl_low": kl[..., low].mean(-1),
    }


def train(
    problem: Problem,
    data: Comparisons,
    betas: np.ndarray,
    settings: TrainSettings,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, Trajectory]:
    """Full-batch training of one tabular policy per (method, beta), all in one tensor.

    ``adam``: torch Adam at learning rate ``lr`` (what DPO training uses in practice; it moves
    every logit at a similar speed whatever the gradient's scale). ``gd``: gradient descent at
    ``lr / beta^2``, under which the path of ``beta h`` does not depend on beta for DPO, and the
    dispersion weight scales each prompt's speed as it scales its gradient.
    """
    ref = torch.from_numpy(problem.ref_logp)
    theta = ref.expand(len(methods), len(betas), *ref.shape).clone().requires_grad_(True)
    beta = torch.from_numpy(betas)[:, None]
    x, c, r = (torch.from_numpy(v) for v in (data.prompt, data.chosen, data.rejected))
    w_true = torch.from_numpy(problem.w_true)[x]
    w_est = torch.from_numpy(problem.w_est)[x]
    low = problem.phi == problem.phi.min()
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam([theta], lr=settings.lr)
    else:
        optimizer = torch.optim.SGD([theta], lr=1.0)
        theta.register_hook(lambda grad: grad * (settings.lr / beta**2)[:, :, None])
    checkpoints = [_metrics(theta.detach(), problem, low)]
    for step in range(1, settings.steps + 1):
        logratio = torch.log_softmax(theta, dim=-1) - ref
        s = beta * (logratio[..., x, c] - logratio[..., x, r])
        loss = sum(
            _loss(method, s[i], w_true, w_est).mean(dim=1).sum() for i, method in enumerate(methods)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % settings.eval_every == 0:
            checkpoints.append(_metrics(theta.detach(), problem, low))
    stacked = {key: np.stack([c[key] for c in checkpoints]) for key in checkpoints[0]}
    return {
        method: Trajectory(**{key: value[:, i] for key, value in stacked.items()})
        for i, method in enumerate(methods)
    }


def frontier(
    trajectory: Trajectory, targets: np.ndarray, low_fraction: float
) -> dict[str, np.ndarray]:
    """Best reward over (checkpoint, beta) with KL <= each target, and that point's metrics.

    ``kl_low_share`` is the share of that point's KL spent on the low-dispersion prompts, which
    make up ``low_fraction`` of the prompts.
    """
    kl = trajectory.kl.ravel()
    out: dict[str, list[float]] = {key: [] for key in ("reward", "reward_low", "reward_high")}
    out["kl_low_share"] = []
    for target in targets:
        allowed = np.flatnonzero(kl <= target)
        best = allowed[np.argmax(trajectory.reward.ravel()[allowed])]
        for key in ("reward", "reward_low", "reward_high"):
            out[key].append(getattr(trajectory, key).ravel()[best])
        total = kl[best]
        out["kl_low_share"].append(
            trajectory.kl_low.ravel()[best] * low_fraction / total if total else 0.0
        )
    return {key: np.array(values) for key, values in out.items()}


def run_seed(
    args: argparse.Namespace, phis: tuple[float, ...], seed: int
) -> dict[str, dict[str, np.ndarray]]:
    """One seed of one setting: fresh comparisons, all methods; frontier and final points."""
    problem = make_problem(phis, args.prompts, args.arms, args.scale)
    data = sample_comparisons(problem, args.comparisons, np.random.default_rng(seed))
    settings = TrainSettings(args.optimizer, args.lr, args.steps, args.eval_every)
    trajectories = train(problem, data, np.array(args.betas), settings)
    low_fraction = float(np.mean(problem.phi == problem.phi.min()))
    targets = np.array(args.kl_levels)
    return {
        method: {
            **{f"frontier_{k}": v for k, v in frontier(t, targets, low_fraction).items()},
            "final_kl": t.kl[-1],
            "final_reward": t.reward[-1],
            "plot_frontier": frontier(t, PLOT_KL, low_fraction)["reward"],
        }
        for method, t in trajectories.items()
    }


def _ci_text(values: np.ndarray) -> str:
    return mean_ci(values).text(".2f")


def _setting_tables(name: str, phis: tuple[float, ...], runs: list[dict], args) -> list[Table]:
    levels = args.kl_levels
    rows, diffs = [], []
    for method in METHODS:
        rows.append(
            {"method": LABELS[method]}
            | {
                f"kl{k}": _ci_text(np.array([r[method]["frontier_reward"][i] for r in runs]))
                for i, k in enumerate(levels)
            }
        )
        if method != "dpo":
            diffs.append(
                {"method": LABELS[method]}
                | {
                    f"kl{k}": _ci_text(
                        np.array(
                            [
                                r[method]["frontier_reward"][i] - r["dpo"]["frontier_reward"][i]
                                for r in runs
                            ]
                        )
                    )
                    for i, k in enumerate(levels)
                }
            )
    columns = [Column("method")] + [Column(f"kl{k}", f"KL <= {k}") for k in levels]
    where = f"setting {name!r} (phi = {', '.join(map(str, phis))})"
    share = {
        "method": "KL share on low-dispersion prompts",
    } | {
        f"kl{k}": " / ".join(
            f"{np.mean([r[m]['frontier_kl_low_share'][i] for r in runs]):.2f}"
            for m in ("dpo", "theta_true", "phi_true")
        )
        for i, k in enumerate(levels)
    }
    return [
        Table(
            f"Frontier reward (x100) at a KL budget, {where}",
            rows,
            columns,
            note=f"Best expected reward over all (beta, checkpoint) with mean KL(pi||pi_ref) at "
            f"most the budget (nats); mean ± 95% CI over {len(runs)} seeds. Optimum 100.",
        ),
        Table(
            f"Frontier reward minus DPO's (x100, paired by seed), {where}",
            diffs + [share],
            columns,
            note="Positive = better than DPO at the same KL budget. Last row: share of that "
            "frontier point's KL spent on the low-dispersion prompts, DPO / theta-true / "
            "phi-true (seed mean).",
        ),
    ]


def _dispersion_table(args: argparse.Namespace) -> Table:
    phis = tuple(sorted(set(args.phis) | {args.control_phi}))
    problem = make_problem(phis, len(phis), args.arms, args.scale)
    rows = [
        {
            "phi": problem.phi[i],
            "w_true": problem.w_true[i],
            "hn": problem.hn[i],
            "w_est": problem.w_est[i],
            "phi_est": float(np.exp(-problem.w_est[i])),
            "ref_reward": float((np.exp(problem.ref_logp[i]) * problem.reward[i]).sum() * 100),
        }
        for i in range(len(phis))
    ]
    columns = [
        Column("phi", "true phi"),
        Column("w_true", "w = -ln phi", ".3f"),
        Column("hn", "Hn(pi_ref)", ".3f"),
        Column("w_est", "w_est = -c ln Hn", ".4f"),
        Column("phi_est", "phi_est = exp(-w_est)", ".3f"),
        Column("ref_reward", "reward of pi_ref (x100)", ".1f"),
    ]
    return Table(
        "True and estimated dispersion per prompt group",
        rows,
        columns,
        note=f"K = {args.arms} arms, c = {args.scale}. The estimate keeps the order of phi but "
        "not its scale: its ratio between groups differs from the true one.",
    )


def _findings(results: dict[str, list[dict]], args: argparse.Namespace) -> list[str]:
    lines = []
    for setting, runs in results.items():
        for method in METHODS[1:]:
            wins, losses = [], []
            for i, level in enumerate(args.kl_levels):
                diff = mean_ci(
                    [r[method]["frontier_reward"][i] - r["dpo"]["frontier_reward"][i] for r in runs]
                )
                if diff.low > 0 and diff.mean >= MIN_GAIN:
                    wins.append(f"KL <= {level}: +{diff.mean:.2f}")
                elif diff.high < 0 and diff.mean <= -MIN_GAIN:
                    losses.append(f"KL <= {level}: {diff.mean:.2f}")
            verdict = "beats DPO" if wins and not losses else "does not beat DPO"
            if wins and losses:
                verdict = "is mixed against DPO"
            detail = "; ".join(wins + losses) or (
                f"no difference of {MIN_GAIN} points or more outside the 95% CI"
            )
            lines.append(f"{setting}: {LABELS[method]} {verdict} ({detail}).")
    runs = results["varied"]
    best = max(
        mean_ci([r[m]["frontier_reward"][i] - r["dpo"]["frontier_reward"][i] for r in runs]).mean
        for m in METHODS[1:]
        for i in range(len(args.kl_levels))
    )
    lines.append(
        f"Size: the largest mean gain over DPO at equal KL is {best:+.2f} reward points (of 100) "
        "here; docs/methods.md reports about 7-8 points on consensus agreement for an independent "
        "bandit (20 prompts x 10 arms, phi 0.2 vs 0.9)"
        + (": the size is not reproduced." if best < 3 else ": the size is comparable.")
    )
    return lines


def _figure(results: dict[str, list[dict]], settings: dict[str, tuple[float, ...]]):
    figure, axes = new_figure(ncols=len(results))
    for ax, (setting, runs) in zip(axes[0], results.items(), strict=True):
        for method in METHODS:
            curves = np.array([r[method]["plot_frontier"] for r in runs])
            mean = curves.mean(0)
            half = np.array([mean_ci(col).half_width for col in curves.T])
            (line,) = ax.plot(PLOT_KL, mean, label=LABELS[method])
            ax.fill_between(PLOT_KL, mean - half, mean + half, color=line.get_color(), alpha=0.15)
            final_kl = np.mean([r[method]["final_kl"] for r in runs], axis=0)
            final_reward = np.mean([r[method]["final_reward"] for r in runs], axis=0)
            ax.scatter(final_kl, final_reward, s=10, color=line.get_color())
        phis = ", ".join(map(str, settings[setting]))
        ax.set_title(f"{setting} dispersion (phi = {phis}), {len(runs)} seeds")
        ax.set_xlabel("KL(pi || pi_ref), nats (mean over prompts)")
        ax.set_ylabel("expected reward x100 (optimum 100)")
        ax.set_xlim(0, max(PLOT_KL))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    figure.suptitle("Reward/KL frontier (lines, 95% CI bands); end-of-training points per beta")
    return figure


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=5, help="independent data sets")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--arms", type=int, default=10)
    parser.add_argument("--comparisons", type=int, default=20, help="comparisons per prompt")
    parser.add_argument("--phis", type=float, nargs="+", default=[0.2, 0.9])
    parser.add_argument("--control-phi", type=float, default=0.5, help="equal-dispersion control")
    parser.add_argument("--scale", type=float, default=0.29, help="dispersion scale c")
    parser.add_argument(
        "--betas", type=float, nargs="+", default=list(np.geomspace(0.03, 10, 8).round(4))
    )
    parser.add_argument("--optimizer", choices=["adam", "gd"], default="adam")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--kl-levels", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4, 0.8])
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests/CI")
    add_output_argument(parser, "mallows_bandit")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.prompts, args.arms, args.comparisons = 2, 4, 5, 8
        args.betas, args.steps, args.eval_every = [0.1, 1.0], 40, 10
    if args.prompts < len(args.phis):
        parser.error(f"--prompts {args.prompts} is fewer than the {len(args.phis)} --phis values")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run both settings over all seeds and write results/mallows_bandit.{json,md,png}."""
    args = _parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = {"varied": tuple(args.phis), "equal": (args.control_phi,)}
    results: dict[str, list[dict]] = {}
    for name, phis in settings.items():
        results[name] = []
        for seed in range(args.seeds):
            results[name].append(run_seed(args, phis, seed))
            print(f"{name} seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    tables = [_dispersion_table(args)]
    for name, phis in settings.items():
        tables += _setting_tables(name, phis, results[name], args)
    files = write_results(
        "mallows_bandit",
        title="MallowsPO synthetic bandit: reward/KL frontier, DPO vs MallowsPO",
        description=__doc__.split("\n\n", 1)[1],
        tables=tables,
        settings=args,
        findings=_findings(results, args),
        data={"plot_kl": PLOT_KL, "runs": results},
        figure=_figure(results, settings),
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

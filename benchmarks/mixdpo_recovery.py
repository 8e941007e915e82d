"""MixDPO recovery: does MixDPO recover a known strength distribution, and does it calibrate better?

Data (per seed and per true CV): pairs with features ``x_a, x_b`` in R^d (standard normal), a
true linear reward ``r(x) = theta* . x`` with ``|theta*|`` chosen so that the reward difference
``Delta = r(x_a) - r(x_b)`` has standard deviation ``--delta-std``, and per-pair strengths
``beta_i ~ LogNormal`` with mean ``--mean`` and coefficient of variation ``cv`` (``cv = 0``:
``beta_i = mean`` exactly). The label is ``a`` preferred with probability
``sigma(beta_i Delta_i)``; training pairs are then oriented chosen/rejected by their label.

Two fits, each of DPO (one strength) and MixDPO (raypo.losses.StrengthDistribution, lognormal,
Gauss-Hermite quadrature, trained with L-BFGS on the full training set):

- ``known reward``: the margin is the true ``Delta`` (oriented), so only the strength is learned:
  DPO learns one beta, MixDPO the mean and CV (``learn_mean=True``). Here the mean is
  identifiable because the reward scale is fixed.
- ``joint``: the reward weights ``theta`` are learned too. The likelihood is unchanged by
  ``(theta, beta) -> (c theta, beta / c)``, so the mean strength is not identifiable: MixDPO fixes
  ``E[beta] = --mean`` and learns the CV (raypo's default), DPO fixes ``beta = --mean``.
  Only the CV (the shape of the mixture) can be compared with the truth.

Held-out metrics on fresh pairs (unoriented, label = which of ``a, b`` won): accuracy, log-loss
and expected calibration error (10 equal-width bins of the predicted ``P(a > b)``). MixDPO
predicts ``E[sigma(beta h)]`` by quadrature; "true model" uses the data-generating distribution.

``--estimators`` runs the estimator study of ``mixdpo_estimators.py`` instead and writes
``results/mixdpo_recovery_estimators.*``.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mixdpo_estimators
import numpy as np
import torch
import torch.nn.functional as F
from common import Column, Table, add_output_argument, mean_ci, new_figure, write_results
from mixdpo_estimators import add_arguments, figure, findings, run_bias, run_fits, tables

from raypo.losses import StrengthDistribution, dpo_loss, mixdpo_loss

FITS = ("known reward", "joint")


@dataclass(frozen=True)
class Pairs:
    """Synthetic comparisons: feature differences [n, d], true margins [n], labels [n]."""

    dx: torch.Tensor
    """``x_a - x_b``, float64."""
    delta: torch.Tensor
    """``r(x_a) - r(x_b)`` under the true reward."""
    label: torch.Tensor
    """1.0 where ``a`` was preferred."""
    beta: torch.Tensor
    """The per-pair strengths that generated the labels."""


@dataclass(frozen=True)
class Fit:
    """A fitted model's strength summary and held-out metrics."""

    mean: float
    """Learned (or fixed) E[beta]."""
    cv: float
    """Learned CV of beta (0 for DPO)."""
    accuracy: float
    log_loss: float
    ece: float


def lognormal_params(mean: float, cv: float) -> tuple[float, float]:
    """``(mu, sigma)`` of the lognormal with the given mean and coefficient of variation."""
    sigma = math.sqrt(math.log1p(cv**2))
    return math.log(mean) - sigma**2 / 2, sigma


def make_pairs(
    n: int, dim: int, mean: float, cv: float, theta: torch.Tensor, generator: torch.Generator
) -> Pairs:
    """``n`` pairs with lognormal(mean, cv) strengths (constant for cv = 0) under ``theta``."""
    dx = torch.randn(n, dim, generator=generator, dtype=torch.float64) * math.sqrt(2.0)
    delta = dx @ theta
    mu, sigma = lognormal_params(mean, cv)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    beta = torch.exp(mu + sigma * z)
    label = torch.rand(n, generator=generator, dtype=torch.float64) < torch.sigmoid(beta * delta)
    return Pairs(dx, delta, label.double(), beta)


def true_theta(dim: int, delta_std: float, generator: torch.Generator) -> torch.Tensor:
    """A random direction scaled so that ``Delta`` has standard deviation ``delta_std``."""
    theta = torch.randn(dim, generator=generator, dtype=torch.float64)
    return theta / theta.norm() * delta_std / math.sqrt(2.0)


def expected_calibration_error(p: torch.Tensor, label: torch.Tensor, bins: int = 10) -> float:
    """``sum_b n_b/n |mean(label_b) - mean(p_b)|`` over ``bins`` equal-width bins of p."""
    index = torch.clamp((p * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += float(mask.double().mean() * (label[mask].mean() - p[mask].mean()).abs())
    return total


def held_out_metrics(log_p: torch.Tensor, log_q: torch.Tensor, label: torch.Tensor) -> dict:
    """Accuracy, log-loss and ECE of predictions ``log P(a > b)`` and ``log P(b > a)``."""
    p = log_p.exp()
    log_lik = label * log_p + (1 - label) * log_q
    return {
        "accuracy": float(((p > 0.5).double() == label).double().mean()),
        "log_loss": float(-log_lik.mean()),
        "ece": expected_calibration_error(p, label),
    }


def _lbfgs(params: list[torch.Tensor], objective: Callable[[], torch.Tensor], iters: int) -> None:
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)


def _oriented(pairs: Pairs) -> torch.Tensor:
    """+1 where ``a`` was chosen, -1 where ``b`` was: chosen-minus-rejected margins are sign*."""
    return 2 * pairs.label - 1


def fit_dpo(train: Pairs, test: Pairs, fit: str, mean: float, iters: int) -> Fit:
    """DPO: known reward learns one beta; joint learns theta at ``beta = mean``."""
    sign = _oriented(train)
    if fit == "known reward":
        log_beta = torch.tensor(math.log(mean), dtype=torch.float64, requires_grad=True)
        _lbfgs([log_beta], lambda: dpo_loss(log_beta.exp() * sign * train.delta, 1.0).mean(), iters)
        beta, test_margin = float(log_beta.detach().exp()), test.delta
    else:
        theta = torch.zeros(train.dx.shape[1], dtype=torch.float64, requires_grad=True)
        _lbfgs([theta], lambda: dpo_loss(sign * (train.dx @ theta), mean).mean(), iters)
        beta, test_margin = mean, test.dx @ theta.detach()
    logits = beta * test_margin
    metrics = held_out_metrics(F.logsigmoid(logits), F.logsigmoid(-logits), test.label)
    return Fit(beta, 0.0, **metrics)


def _mixture_log_probs(strength: StrengthDistribution, margin: torch.Tensor) -> tuple:
    """``log E[sigma(beta m)]`` and ``log E[sigma(-beta m)]`` with quadrature (no sampling)."""
    with torch.no_grad():
        return -strength(margin), -strength(-margin)


def fit_mixdpo(train: Pairs, test: Pairs, fit: str, mean: float, iters: int) -> Fit:
    """MixDPO (lognormal, quadrature): mean and CV with the true reward, or CV and theta."""
    sign = _oriented(train)
    known = fit == "known reward"
    strength = StrengthDistribution("lognormal", mean=mean, cv=0.5, learn_mean=known).double()
    params = list(strength.parameters())
    if known:
        margin_fn = lambda: sign * train.delta  # noqa: E731
    else:
        theta = torch.zeros(train.dx.shape[1], dtype=torch.float64, requires_grad=True)
        params.append(theta)
        margin_fn = lambda: sign * (train.dx @ theta)  # noqa: E731
    _lbfgs(params, lambda: strength(margin_fn()).mean(), iters)
    test_margin = test.delta if known else test.dx @ theta.detach()
    log_p, log_q = _mixture_log_probs(strength, test_margin)
    moments = strength.moments()
    metrics = held_out_metrics(log_p, log_q, test.label)
    return Fit(float(moments["mean"].detach()), float(moments["cv"].detach()), **metrics)


def true_model(test: Pairs, mean: float, cv: float) -> Fit:
    """The data-generating model's held-out metrics (the best any fit can do on average)."""
    mu, sigma = lognormal_params(mean, cv)
    log_p = -mixdpo_loss(test.delta, "lognormal", mu, sigma, num_points=160)
    log_q = -mixdpo_loss(-test.delta, "lognormal", mu, sigma, num_points=160)
    return Fit(mean, cv, **held_out_metrics(log_p, log_q, test.label))


def run_seed(args: argparse.Namespace, cv: float, seed: int) -> dict[str, dict]:
    """All fits for one seed and one true CV: ``{"<fit>/<model>": Fit as dict}``."""
    generator = torch.Generator().manual_seed(1000 * seed + int(100 * cv))
    theta = true_theta(args.dim, args.delta_std, generator)
    train = make_pairs(args.train_pairs, args.dim, args.mean, cv, theta, generator)
    test = make_pairs(args.test_pairs, args.dim, args.mean, cv, theta, generator)
    out = {"true model": true_model(test, args.mean, cv).__dict__}
    for fit in FITS:
        out[f"{fit}/DPO"] = fit_dpo(train, test, fit, args.mean, args.iters).__dict__
        out[f"{fit}/MixDPO"] = fit_mixdpo(train, test, fit, args.mean, args.iters).__dict__
    return out


def _stat(runs: list[dict], key: str, field: str) -> str:
    return mean_ci([run[key][field] for run in runs]).text(".3f")


def _tables(results: dict[float, list[dict]], args: argparse.Namespace) -> list[Table]:
    recovery, metrics = [], []
    for cv, runs in results.items():
        recovery.append(
            {
                "cv": cv,
                "known_mean": _stat(runs, "known reward/MixDPO", "mean"),
                "known_cv": _stat(runs, "known reward/MixDPO", "cv"),
                "joint_cv": _stat(runs, "joint/MixDPO", "cv"),
                "dpo_beta": _stat(runs, "known reward/DPO", "mean"),
            }
        )
        for key in ("true model", *(f"{f}/{m}" for f in FITS for m in ("DPO", "MixDPO"))):
            metrics.append(
                {"cv": cv, "model": key}
                | {f: _stat(runs, key, f) for f in ("accuracy", "log_loss", "ece")}
            )
    n = len(next(iter(results.values())))
    return [
        Table(
            "Recovered strength distribution (lognormal family)",
            recovery,
            [
                Column("cv", "true CV"),
                Column("known_mean", f"MixDPO mean, known reward (true {args.mean})"),
                Column("known_cv", "MixDPO CV, known reward"),
                Column("joint_cv", "MixDPO CV, joint (mean fixed)"),
                Column("dpo_beta", "DPO beta, known reward"),
            ],
            note=f"Mean ± 95% CI over {n} seeds; {args.train_pairs} training pairs. DPO's single "
            "beta is what a fixed-strength model makes of heterogeneous strengths.",
        ),
        Table(
            "Held-out accuracy, log-loss and calibration",
            metrics,
            [
                Column("cv", "true CV"),
                Column("model"),
                Column("accuracy"),
                Column("log_loss", "log-loss"),
                Column("ece", "ECE"),
            ],
            note=f"{args.test_pairs} fresh pairs per seed; mean ± 95% CI over {n} seeds.",
        ),
    ]


def _paired(runs: list[dict], a: str, b: str, field: str):
    return mean_ci([run[a][field] - run[b][field] for run in runs])


def _findings(results: dict[float, list[dict]]) -> list[str]:
    lines = []
    for cv, runs in results.items():
        cv_fit = mean_ci([run["joint/MixDPO"]["cv"] for run in runs])
        ece = _paired(runs, "joint/MixDPO", "joint/DPO", "ece")
        loss = _paired(runs, "joint/MixDPO", "joint/DPO", "log_loss")
        acc = _paired(runs, "joint/MixDPO", "joint/DPO", "accuracy")
        lines.append(
            f"true CV {cv}: joint MixDPO learns CV {cv_fit.text('.2f')}; MixDPO minus DPO on "
            f"held-out data: ECE {ece.text('+.4f')}, log-loss {loss.text('+.4f')}, accuracy "
            f"{acc.text('+.4f')} (paired over seeds)."
        )
    return lines


def _figure(results: dict[float, list[dict]]):
    figure, axes = new_figure(ncols=2)
    cvs = np.array(list(results))
    for offset, (key, label) in enumerate(
        (("known reward/MixDPO", "known reward"), ("joint/MixDPO", "joint (mean fixed)"))
    ):
        stats = [mean_ci([r[key]["cv"] for r in runs]) for runs in results.values()]
        axes[0][0].errorbar(
            cvs + 0.03 * (offset - 0.5),
            [s.mean for s in stats],
            yerr=[s.half_width for s in stats],
            marker="o",
            capsize=3,
            label=label,
        )
    axes[0][0].plot([0, cvs.max()], [0, cvs.max()], "k--", lw=1, label="truth")
    axes[0][0].set(xlabel="true CV of beta", ylabel="learned CV (lognormal)")
    axes[0][0].set_title("CV recovery (95% CI over seeds)")
    width = 0.12
    for offset, key in enumerate(("joint/DPO", "joint/MixDPO", "true model")):
        stats = [mean_ci([r[key]["ece"] * 100 for r in runs]) for runs in results.values()]
        axes[0][1].bar(
            np.arange(len(cvs)) + (offset - 1) * width * 1.1,
            [s.mean for s in stats],
            width,
            yerr=[s.half_width for s in stats],
            capsize=3,
            label=key.replace("joint/", "joint "),
        )
    axes[0][1].set_xticks(np.arange(len(cvs)), [str(cv) for cv in cvs])
    axes[0][1].set(xlabel="true CV of beta", ylabel="held-out ECE (%)")
    axes[0][1].set_title("Calibration on held-out pairs")
    for ax in axes[0]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cvs", type=float, nargs="+", default=[0.0, 0.5, 1.5])
    parser.add_argument("--mean", type=float, default=1.0, help="true E[beta]")
    parser.add_argument("--dim", type=int, default=8, help="feature dimension")
    parser.add_argument("--delta-std", type=float, default=3.0, help="std of the true margin")
    parser.add_argument("--train-pairs", type=int, default=10000)
    parser.add_argument("--test-pairs", type=int, default=10000)
    parser.add_argument("--iters", type=int, default=100, help="L-BFGS iterations per fit")
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests/CI")
    parser.add_argument(
        "--estimators",
        action="store_true",
        help="run the estimator study instead (MC bias for K = 8/16/64 against quadrature and "
        "the series, lognormal and gamma, several starting CVs); writes "
        "mixdpo_recovery_estimators.*",
    )
    add_arguments(parser)
    add_output_argument(parser, "mixdpo_recovery")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.train_pairs, args.test_pairs, args.iters = 2, 500, 500, 20
        args.est_seeds, args.est_pairs, args.est_steps, args.bias_repeats = 2, 300, 20, 50
    if any(cv < 0 for cv in args.cvs) or args.mean <= 0:
        parser.error("--cvs must be >= 0 and --mean > 0")
    return args


def estimator_study(args: argparse.Namespace) -> None:
    """MC bias and learned CV per estimator; writes results/mixdpo_recovery_estimators.*."""
    started = time.perf_counter()
    # The study measures the Monte Carlo estimator's bias on purpose: its warning is expected.
    warnings.filterwarnings("ignore", message="MixDPO Monte Carlo estimator is biased")
    bias = run_bias(args)
    print(f"bias done ({time.perf_counter() - started:.0f} s)", flush=True)
    fits = run_fits(args)
    files = write_results(
        "mixdpo_recovery_estimators",
        title="MixDPO estimators: Monte Carlo bias against quadrature and the series",
        description=mixdpo_estimators.__doc__.split("\n\n", 1)[1],
        tables=tables(bias, fits, args),
        settings=args,
        findings=findings(bias, fits, args),
        data={"bias": bias, "fits": fits},
        figure=figure(bias, fits, args),
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


def main(argv: list[str] | None = None) -> None:
    """Fit every (CV, seed) and write results/mixdpo_recovery.{json,md,png} (or, with
    ``--estimators``, the estimator study)."""
    args = _parse_args(argv)
    torch.set_num_threads(1)
    if args.estimators:
        estimator_study(args)
        return
    started = time.perf_counter()
    results: dict[float, list[dict]] = {}
    for cv in args.cvs:
        results[cv] = []
        for seed in range(args.seeds):
            results[cv].append(run_seed(args, cv, seed))
            print(f"cv {cv} seed {seed} done ({time.perf_counter() - started:.0f} s)", flush=True)
    files = write_results(
        "mixdpo_recovery",
        title="MixDPO recovery of a known strength distribution, and calibration vs DPO",
        description=__doc__.split("\n\n", 1)[1],
        tables=_tables(results, args),
        settings=args,
        findings=_findings(results),
        data={"runs": {str(cv): runs for cv, runs in results.items()}},
        figure=_figure(results),
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

"""MixDPO's Monte Carlo estimator against the deterministic ones (used by mixdpo_recovery.py).

Two measurements, both with raypo.mixdpo's own ``StrengthDistribution``:

- the bias of the Monte Carlo loss ``-log mean_k sigma(beta_k h)`` (K samples) against the
  deterministic estimator (Gauss-Hermite quadrature for lognormal, the accelerated series for
  gamma) at fixed margins, averaged over many independent draws;
- the strength distribution each estimator learns: known reward (the margin is the true reward
  difference), ``E[beta]`` fixed at the truth, the dispersion learned by Adam with fresh samples
  every step (as in training) and a learning rate decaying linearly to 0, so that a Monte Carlo
  fit ends at the minimum of the expected Monte Carlo loss; from several starting CVs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import numpy as np
import torch
from common import Column, Table, mean_ci, new_figure

from raypo.mixdpo import StrengthDistribution

FAMILIES = ("lognormal", "gamma")
EXACT = {"lognormal": "quadrature", "gamma": "series"}
"""The deterministic estimator of each family (raypo's defaults)."""
ESTIMATOR_SAMPLES = (8, 16, 64)
"""Monte Carlo sample counts compared (raypo's default is 16)."""


@dataclass(frozen=True)
class FitSettings:
    """How one strength distribution is fitted."""

    steps: int = 200
    """Adam steps on the full training set."""
    lr: float = 0.1
    """Initial learning rate on the unconstrained dispersion parameter."""


def strength(family: str, mean: float, cv: float, samples: int | None) -> StrengthDistribution:
    """A float64 distribution with the deterministic estimator (``samples`` None) or Monte Carlo."""
    if samples is None:
        return StrengthDistribution(family, mean=mean, cv=cv).double()
    return StrengthDistribution(
        family, mean=mean, cv=cv, estimator="mc", num_points=samples
    ).double()


def sample_strengths(
    family: str, mean: float, cv: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` strengths with the given mean and CV (``cv = 0``: all equal to the mean), float64."""
    if cv == 0:
        return torch.full((n,), mean, dtype=torch.float64)
    if family == "lognormal":
        sigma = math.sqrt(math.log1p(cv**2))
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.exp(math.log(mean) - sigma**2 / 2 + sigma * z)
    if family == "gamma":
        seed = int(torch.randint(2**62, (1,), generator=generator))
        shape = cv**-2
        draws = np.random.default_rng(seed).gamma(shape, mean / shape, n)
        return torch.from_numpy(draws)
    raise ValueError(f"family must be 'lognormal' or 'gamma', got {family!r}")


def loss_bias(
    family: str,
    mean: float,
    cv: float,
    margins: list[float],
    samples: int,
    repeats: int,
    seed: int,
) -> dict[str, list[float]]:
    """Mean Monte Carlo loss minus the deterministic loss at each margin, with its standard error
    over ``repeats`` independent draws of ``samples`` strengths (nats)."""
    h = torch.tensor(margins, dtype=torch.float64)
    with torch.no_grad():
        exact = strength(family, mean, cv, None)(h)
        draws = strength(family, mean, cv, samples)(
            h.repeat(repeats), torch.Generator().manual_seed(seed)
        ).view(repeats, h.numel())
    return {
        "exact": exact.tolist(),
        "bias": (draws.mean(0) - exact).tolist(),
        "se": (draws.std(0) / math.sqrt(repeats)).tolist(),
    }


def fit_dispersion(
    margins: torch.Tensor,
    family: str,
    mean: float,
    start_cv: float,
    samples: int | None,
    settings: FitSettings,
    seed: int,
) -> dict[str, float]:
    """Learned CV of ``family`` on oriented margins (chosen minus rejected) with ``E[beta]`` fixed
    at ``mean``, and the deterministic mean loss at the learned distribution."""
    model = strength(family, mean, start_cv, samples)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / settings.steps
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.steps):
        loss = model(margins, generator).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    cv = float(model.moments()["cv"].detach())
    return {"cv": cv, "loss": exact_mean_loss(margins, family, mean, cv)}


def exact_mean_loss(margins: torch.Tensor, family: str, mean: float, cv: float) -> float:
    """Mean deterministic MixDPO loss of ``family`` (mean, cv) on the margins (nats per pair)."""
    with torch.no_grad():
        return float(strength(family, mean, cv, None)(margins).mean())


def estimator_label(family: str, samples: int | None) -> str:
    """``quadrature`` / ``series`` for the deterministic estimator, else ``MC K=<samples>``."""
    return EXACT[family] if samples is None else f"MC K={samples}"


def run_bias(args: argparse.Namespace) -> list[dict]:
    """One row per (family, CV, K): the Monte Carlo bias at each of ``--bias-margins``."""
    rows = []
    for family in FAMILIES:
        for cv in args.est_cvs:
            for samples in args.mc_samples:
                result = loss_bias(
                    family, args.mean, cv, args.bias_margins, samples, args.bias_repeats, 0
                )
                rows.append({"family": family, "cv": cv, "samples": samples} | result)
    return rows


def _fits_for(family: str, args: argparse.Namespace) -> list[tuple[str, int | None]]:
    """(fit family, samples) run on data of ``family``: every estimator of the same family, and
    with ``--cross-family`` the other family's deterministic estimator (the learned CV is
    family-specific)."""
    other = next(f for f in FAMILIES if f != family)
    cross = [(other, None)] if args.cross_family else []
    return [(family, None)] + [(family, k) for k in args.mc_samples] + cross


def run_fits(args: argparse.Namespace) -> list[dict]:
    """One record per (data family, true CV, fit, start, seed): learned CV and loss excess."""
    settings = FitSettings(args.est_steps, args.est_lr)
    records = []
    for family in FAMILIES:
        for cv in args.est_cvs:
            for seed in range(args.est_seeds):
                generator = torch.Generator().manual_seed(10_000 + 100 * seed + int(10 * cv))
                delta = args.delta_std * torch.randn(
                    args.est_pairs, generator=generator, dtype=torch.float64
                )
                beta = sample_strengths(family, args.mean, cv, args.est_pairs, generator)
                won = torch.rand(args.est_pairs, generator=generator, dtype=torch.float64)
                margins = torch.where(won < torch.sigmoid(beta * delta), delta, -delta)
                truth = exact_mean_loss(margins, family, args.mean, cv)
                for fit_family, samples in _fits_for(family, args):
                    for start in args.starts:
                        fit = fit_dispersion(
                            margins, fit_family, args.mean, start, samples, settings, seed
                        )
                        records.append(
                            {
                                "family": family,
                                "cv": cv,
                                "fit": f"{fit_family}, {estimator_label(fit_family, samples)}",
                                "start": start,
                                "seed": seed,
                                "learned_cv": fit["cv"],
                                "excess": fit["loss"] - truth,
                            }
                        )
    return records


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--estimators`` study's settings."""
    group = parser.add_argument_group("--estimators study")
    group.add_argument("--est-cvs", type=float, nargs="+", default=[0.5, 1.5])
    group.add_argument("--mc-samples", type=int, nargs="+", default=list(ESTIMATOR_SAMPLES))
    group.add_argument(
        "--bias-margins", type=float, nargs="+", default=[-10.0, -3.0, -1.0, 0.0, 1.0, 3.0, 10.0]
    )
    group.add_argument("--bias-repeats", type=int, default=2000, help="MC draws per margin")
    group.add_argument("--est-seeds", type=int, default=3)
    group.add_argument("--est-pairs", type=int, default=1500)
    group.add_argument("--starts", type=float, nargs="+", default=[0.25, 3.0], help="start CVs")
    group.add_argument("--est-steps", type=int, default=100, help="Adam steps per fit")
    group.add_argument(
        "--cross-family", action="store_true", help="also fit the other family (deterministic)"
    )
    group.add_argument("--est-lr", type=float, default=0.5)


def _grouped(records: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["family"], r["cv"], r["fit"], r["start"]), []).append(r)
    return groups


def tables(bias: list[dict], fits: list[dict], args: argparse.Namespace) -> list[Table]:
    """The bias table and the learned-CV table."""
    margin_columns = [Column(f"h{h:g}", f"h = {h:g}") for h in args.bias_margins]
    bias_rows = [
        {"family": r["family"], "cv": r["cv"], "samples": r["samples"]}
        | {
            f"h{h:g}": f"{b:+.4f} ± {2 * se:.4f}"
            for h, b, se in zip(args.bias_margins, r["bias"], r["se"], strict=True)
        }
        for r in bias
    ]
    fit_rows = [
        {"family": key[0], "cv": key[1], "fit": key[2], "start": key[3]}
        | {
            "learned": mean_ci([r["learned_cv"] for r in group]).text(".3f"),
            "excess": mean_ci([1000 * r["excess"] for r in group]).text(".3f"),
        }
        for key, group in _grouped(fits).items()
    ]
    return [
        Table(
            f"Monte Carlo loss minus the deterministic loss (nats), E[beta] = {args.mean}",
            bias_rows,
            [Column("family"), Column("cv", "CV"), Column("samples", "K")] + margin_columns,
            note=f"Mean over {args.bias_repeats} independent draws of K strengths at each margin "
            "h, ± 2 standard errors. The deterministic loss is Gauss-Hermite quadrature "
            "(lognormal) or the accelerated series (gamma), raypo's defaults.",
        ),
        Table(
            "Learned CV by estimator, family and starting CV (known reward, E[beta] fixed)",
            fit_rows,
            [
                Column("family", "data family"),
                Column("cv", "true CV"),
                Column("fit", "fitted family, estimator"),
                Column("start", "starting CV"),
                Column("learned", "learned CV"),
                Column("excess", "loss minus the true model's (1e-3 nats/pair)"),
            ],
            note=f"{args.est_pairs} training pairs with true margins of std {args.delta_std}; "
            f"Adam (lr {args.est_lr} decaying linearly to 0, {args.est_steps} full-batch steps, "
            f"fresh Monte Carlo samples each step); mean ± 95% CI over {args.est_seeds} seeds. "
            "The loss column is the deterministic loss at the learned distribution minus that "
            "at the data-generating one, on the training pairs.",
        ),
    ]


def findings(bias: list[dict], fits: list[dict], args: argparse.Namespace) -> list[str]:
    """Plain-language results, every number read from ``bias`` and ``fits``."""
    lines = []
    worst = min(range(len(args.bias_margins)), key=lambda i: args.bias_margins[i])
    for family in FAMILIES:
        for cv in args.est_cvs:
            parts = [
                f"K={r['samples']} {r['bias'][worst]:+.3f}"
                for r in bias
                if r["family"] == family and r["cv"] == cv
            ]
            lines.append(
                f"MC bias of the loss at h = {args.bias_margins[worst]:g}, {family} CV {cv}: "
                + ", ".join(parts)
                + " nats."
            )
    groups = _grouped(fits)
    for family in FAMILIES:
        for cv in args.est_cvs:
            parts = []
            for fit_family, samples in _fits_for(family, args):
                fit = f"{fit_family}, {estimator_label(fit_family, samples)}"
                values = [
                    np.mean([r["learned_cv"] for r in groups[(family, cv, fit, s)]])
                    for s in args.starts
                ]
                parts.append(f"{fit} " + "/".join(f"{v:.2f}" for v in values))
            starts = "/".join(f"{s:g}" for s in args.starts)
            lines.append(
                f"{family} data, true CV {cv}: learned CV from starts {starts}: "
                + "; ".join(parts)
                + "."
            )
    return lines


def figure(bias: list[dict], fits: list[dict], args: argparse.Namespace):
    """Bias against the margin per K; learned CV per estimator."""
    fig, axes = new_figure(ncols=2)
    cv = max(args.est_cvs)
    for r in bias:
        if r["cv"] == cv:
            style = "-" if r["family"] == "lognormal" else "--"
            axes[0][0].plot(
                args.bias_margins,
                r["bias"],
                style,
                marker="o",
                label=f"{r['family']}, K={r['samples']}",
            )
    axes[0][0].axhline(0, color="k", lw=0.8)
    axes[0][0].set(xlabel="margin h", ylabel="MC loss minus exact (nats)")
    axes[0][0].set_title(f"Monte Carlo bias, CV {cv}")
    groups = _grouped(fits)
    labels = sorted({k[2] for k in groups})
    for family in FAMILIES:
        for cv_true in args.est_cvs:
            xs, ys = [], []
            for i, fit in enumerate(labels):
                values = [
                    r["learned_cv"]
                    for s in args.starts
                    for r in groups.get((family, cv_true, fit, s), [])
                ]
                if values:
                    xs.append(i)
                    ys.append(np.mean(values))
            axes[0][1].plot(xs, ys, marker="o", label=f"{family} data, true CV {cv_true}")
            axes[0][1].axhline(cv_true, color="gray", lw=0.6, ls=":")
    axes[0][1].set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    axes[0][1].set(ylabel="learned CV (mean over seeds and starts)")
    axes[0][1].set_title("Learned CV by fitted family and estimator")
    for ax in axes[0]:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return fig

"""MallowsPO's synthetic bandit: DPO vs MallowsPO-theta/-phi when dispersion varies by prompt.

After Chen et al. (ICLR 2025), synthetic bandit; the model and fits are in ``bandit_model.py``.
``--prompts`` prompts x ``--arms`` arms; half the prompts have Mallows dispersion
``phi = 0.2`` (near-unanimous annotators), half ``phi = 0.9`` (near-random ones); the control
gives every prompt ``phi = 0.5``. Objectives are raypo's own (``raypo.losses``: ``dpo_loss``,
``mallows_theta_loss``, ``mallows_phi_loss``) with the true weight ``w(x) = -ln phi(x)``.

The paper's protocol (the headline):

- reference policy uniform over the arms;
- comparisons from the population: each of ``N`` annotators per prompt (N = 100, 300, 2000)
  draws a Mallows ranking and compares one uniformly drawn pair; ``population`` is the limit
  N -> infinity (the exact pairwise probabilities, no sampling noise);
- fits run to convergence (L-BFGS, float64; MallowsPO-phi, whose loss jumps at h = 0 where
  L-BFGS can stall, also Adam then L-BFGS, keeping the lower loss), each method at the beta
  whose fit has mean
  ``KL(pi || pi_ref)`` exactly the budget (0.5 nats in the headline), so the methods differ only
  in how they spend the same KL; ``--prior`` comparisons per pair are added as a tie (half a win
  each side), without which a prompt whose data never sees some arm lose has no finite fit;
- metrics: ``U_rank``, the expected consensus-rank utility of the policy's arm
  (``100 (1 - rank/(K-1))``: 100 = always the consensus best, 50 = the uniform reference), the
  average annotator's win rate against the reference, and the share of the KL spent on the
  low-dispersion prompts; paired differences against DPO over seeds (Student-t 95% intervals).

The earlier protocol (second table): the reference is the annotators' top-choice distribution
(``pi_ref ∝ phi^rank``), 20 comparisons per prompt, Adam from the reference over a beta grid and
the best checkpoint under the KL budget (oracle early stopping); it also runs MallowsPO with
raypo.dispersion's entropy estimate ``w_est = -c ln Hn(pi_ref)`` (a uniform reference has
``Hn = 1`` everywhere, so the estimate carries no information there). The diagnosis changes one
factor of the paper's protocol at a time to the earlier one's.

Why the smallest N differs (the last two tables): MallowsPO-theta's converged scores on a
prompt are DPO's divided by ``w(x)``, so per prompt both move along the same fitted direction and
differ only in how they share the KL. Per N, the tables give the share of prompts whose data
(without the prior) have a finite fit, the U_rank each dispersion group reaches when it alone
spends the budget along the fitted direction (how much signal the data give each group), and the
gain over DPO when DPO's scores are divided by ``w(x)^alpha`` (alpha = 0 is DPO, 1 is
MallowsPO-theta); and, at the smallest N, the fits again with other ``--prior`` strengths.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from bandit_model import (
    AdamSettings,
    Comparisons,
    Problem,
    adam_frontier,
    converged_at_kl,
    finite_fit_share,
    group_u_rank,
    lbfgs_scores,
    make_problem,
    metrics,
    policy_at_kl,
    sample_comparisons,
    seed_losses,
)
from common import Column, Table, add_output_argument, mean_ci, new_figure, write_results

LABELS = {
    "dpo": "DPO",
    "theta_true": "MallowsPO-theta",
    "phi_true": "MallowsPO-phi",
    "theta_est": "MallowsPO-theta, entropy estimate",
    "phi_est": "MallowsPO-phi, entropy estimate",
}
PAPER_METHODS = ("dpo", "theta_true", "phi_true")
POPULATION = "population"


@dataclass(frozen=True)
class Protocol:
    """How one row's data are drawn and fitted."""

    label: str
    reference: str
    """``uniform`` or ``top_choice``."""
    per_prompt: int | None
    """Comparisons per prompt; None = the population fractions."""
    fit: str
    """``converged`` (exact KL) or ``adam`` (best checkpoint under the KL budget)."""
    methods: tuple[str, ...] = PAPER_METHODS
    prior: float | None = None
    """Tie comparisons per pair; None = ``--prior``."""


def run_protocol(
    protocol: Protocol,
    phis: tuple[float, ...],
    seeds: int,
    levels: list[float],
    args: argparse.Namespace,
    explain: bool = False,
) -> dict:
    """Metrics [KL levels, seeds] per method, and the largest gradient each converged fit left;
    with ``explain`` (converged fits, varied dispersion) also :func:`_explain` at the headline KL.
    """
    problem = make_problem(phis, args.prompts, args.arms, args.scale, protocol.reference)
    prior = args.prior if protocol.prior is None else protocol.prior
    data = sample_comparisons(problem, protocol.per_prompt, range(seeds), prior)
    out: dict = {"metrics": {}, "max_grad": {}}
    if protocol.fit == "adam":
        settings = AdamSettings(tuple(args.betas), args.lr, args.steps, args.eval_every)
        for method in protocol.methods:
            out["metrics"][method] = adam_frontier(method, problem, data, settings, levels)
        return out
    fitted = {}
    for method in protocol.methods:
        start = fitted.get("dpo") if method.startswith("phi") else None
        result, fitted[method], grad = converged_at_kl(method, problem, data, levels, start)
        out["metrics"][method], out["max_grad"][method] = result, grad
    if explain:
        out["explain"] = _explain(problem, data, fitted, protocol.per_prompt, seeds, args)
    return out


def _explain(
    problem: Problem,
    data: Comparisons,
    fitted: dict,
    per_prompt: int | None,
    seeds: int,
    args: argparse.Namespace,
) -> dict:
    """What drives one varied-dispersion row at the headline KL, per seed: the share of each
    group's prompts with a finite fit without the prior, each group's U_rank along the fitted
    direction when it alone spends the budget, the U_rank gain over DPO of DPO's scores divided
    by ``w^alpha`` per weight exponent alpha (1 = MallowsPO-theta), and how far MallowsPO-theta's
    converged scores are from DPO's divided by w (largest difference of ``w S_theta`` and
    ``S_dpo``, each centred per prompt, relative to the largest ``|S_dpo|``), and by how much
    plain L-BFGS from DPO's scores stops above MallowsPO-phi's fit (loss per prompt)."""
    kl = args.headline_kl
    dpo_scores = fitted["dpo"]
    centred = {m: fitted[m] - fitted[m].mean(-1, keepdim=True) for m in ("dpo", "theta_true")}
    identity = (centred["theta_true"] * problem.w_true[None, :, None] - centred["dpo"]).abs().max()
    finite = finite_fit_share(problem, per_prompt, range(seeds))
    direction = group_u_rank(problem, dpo_scores, kl)
    base = metrics(problem, policy_at_kl(problem, dpo_scores, kl))["u_rank"]
    exponent = {}
    for alpha in args.weight_exponents:
        scaled = dpo_scores / problem.w_true[None, :, None] ** alpha
        exponent[str(alpha)] = metrics(problem, policy_at_kl(problem, scaled, kl))["u_rank"] - base
    return {
        "finite_low": finite[:, problem.low].mean(1),
        "finite_high": finite[:, ~problem.low].mean(1),
        "direction_low": direction["low"],
        "direction_high": direction["high"],
        "weight_ratio": float(problem.w_true.max() / problem.w_true.min()),
        "theta_vs_dpo_over_w": float(identity / centred["dpo"].abs().max()),
        "phi_lbfgs_excess": (
            seed_losses(
                "phi_true", lbfgs_scores("phi_true", problem, data, dpo_scores), problem, data
            )
            - seed_losses("phi_true", fitted["phi_true"], problem, data)
        ).numpy(),
        "exponent_gain": exponent,
    }


def _n_label(n: int | None) -> str:
    return POPULATION if n is None else str(n)


def _diff(run: dict, method: str, key: str, level: int) -> np.ndarray:
    m = run["metrics"]
    return m[method][key][level] - m["dpo"][key][level]


def _ci(values) -> str:
    values = np.asarray(values, dtype=float)
    return f"{values[0]:.2f} (exact)" if values.size == 1 else mean_ci(values).text(".2f")


def _verdict(values: np.ndarray) -> str:
    if values.size == 1:
        return "ahead of DPO" if values[0] > 0 else "behind DPO" if values[0] < 0 else "equal"
    interval = mean_ci(values)
    if interval.low > 0:
        return "ahead of DPO (95% CI above 0)"
    if interval.high < 0:
        return "behind DPO (95% CI below 0)"
    return "not different from DPO (95% CI covers 0)"


def _headline_rows(headline: dict, level: int) -> list[dict]:
    rows = []
    for setting, by_n in headline.items():
        for n, run in by_n.items():
            for method in PAPER_METHODS:
                m = run["metrics"][method]
                rows.append(
                    {
                        "setting": setting,
                        "n": n,
                        "method": LABELS[method],
                        "u_rank": _ci(m["u_rank"][level]),
                        "u_gain": "-"
                        if method == "dpo"
                        else _ci(_diff(run, method, "u_rank", level)),
                        "u_low": f"{m['u_rank_low'][level].mean():.1f}",
                        "u_high": f"{m['u_rank_high'][level].mean():.1f}",
                        "win": _ci(m["win_rate"][level]),
                        "win_gain": "-"
                        if method == "dpo"
                        else _ci(_diff(run, method, "win_rate", level)),
                        "share": f"{m['kl_low_share'][level].mean():.2f}",
                        "grad": run["max_grad"][method],
                    }
                )
    return rows


def _gain_rows(headline: dict, levels: list[float]) -> list[dict]:
    return [
        {"setting": setting, "n": n, "method": LABELS[method]}
        | {f"kl{k}": _ci(_diff(run, method, "u_rank", i)) for i, k in enumerate(levels)}
        for setting, by_n in headline.items()
        for n, run in by_n.items()
        for method in PAPER_METHODS[1:]
    ]


def _diagnosis_rows(diagnosis: dict, level: int) -> list[dict]:
    rows = []
    for label, run in diagnosis.items():
        m = run["metrics"]
        for method in m:
            rows.append(
                {
                    "protocol": label,
                    "method": LABELS[method],
                    "u_rank": _ci(m[method]["u_rank"][level]),
                    "u_gain": "-" if method == "dpo" else _ci(_diff(run, method, "u_rank", level)),
                    "win_gain": "-"
                    if method == "dpo"
                    else _ci(_diff(run, method, "win_rate", level)),
                    "kl": f"{m[method]['kl'][level].mean():.3f}",
                    "share": f"{m[method]['kl_low_share'][level].mean():.2f}",
                }
            )
    return rows


def _explain_rows(headline: dict, args: argparse.Namespace) -> list[dict]:
    level = args.kl_levels.index(args.headline_kl)
    rows = []
    for n, run in headline["varied"].items():
        e = run["explain"]
        rows.append(
            {
                "n": n,
                "finite": f"{np.mean(e['finite_low']):.2f} / {np.mean(e['finite_high']):.2f}",
                "dir_low": _ci(e["direction_low"]),
                "dir_high": _ci(e["direction_high"]),
                "share": f"{run['metrics']['theta_true']['kl_low_share'][level].mean():.2f}",
            }
            | {f"a{alpha}": _ci(e["exponent_gain"][str(alpha)]) for alpha in args.weight_exponents}
        )
    return rows


def _prior_rows(sweep: dict) -> list[dict]:
    rows = []
    for prior, run in sweep.items():
        m, e = run["metrics"], run["explain"]
        rows.append(
            {
                "prior": prior,
                "dpo": _ci(m["dpo"]["u_rank"][0]),
                "dpo_share": f"{m['dpo']['kl_low_share'][0].mean():.2f}",
                "theta": _ci(_diff(run, "theta_true", "u_rank", 0)),
                "theta_share": f"{m['theta_true']['kl_low_share'][0].mean():.2f}",
                "phi": _ci(_diff(run, "phi_true", "u_rank", 0)),
                "phi_share": f"{m['phi_true']['kl_low_share'][0].mean():.2f}",
                "dir": f"{np.mean(e['direction_low']):.1f} / {np.mean(e['direction_high']):.1f}",
            }
        )
    return rows


def _tables(results: dict, args: argparse.Namespace) -> list[Table]:
    level = args.kl_levels.index(args.headline_kl)
    kl = args.headline_kl
    gain_columns = [Column(f"kl{k}", f"KL = {k}") for k in args.kl_levels]
    return [
        Table(
            f"Paper's protocol: converged fits at KL(pi || pi_ref) = {kl} exactly",
            _headline_rows(results["headline"], level),
            [
                Column("setting"),
                Column("n", "comparisons per prompt"),
                Column("method"),
                Column("u_rank", "U_rank"),
                Column("u_gain", "U_rank minus DPO"),
                Column("u_low", "U_rank, low-dispersion prompts"),
                Column("u_high", "U_rank, high-dispersion prompts"),
                Column("win", "win rate vs reference"),
                Column("win_gain", "win rate minus DPO"),
                Column("share", "KL share on low-dispersion prompts"),
                Column("grad", "largest gradient left", ".1e"),
            ],
            note=f"Uniform reference, mean ± 95% CI over {args.seeds} seeds (differences paired "
            f"by seed; the population row has no sampling noise). U_rank and win rate x100; the "
            f"reference scores 50 on both. {args.prior} prior comparisons per pair (a tie).",
        ),
        Table(
            "Paper's protocol: U_rank gain over DPO at each exact KL budget",
            _gain_rows(results["headline"], args.kl_levels),
            [Column("setting"), Column("n", "comparisons per prompt"), Column("method")]
            + gain_columns,
            note=f"Paired by seed, mean ± 95% CI over {args.seeds} seeds; KL in nats.",
        ),
        Table(
            f"Earlier protocol and its diagnosis at KL {kl}, varied dispersion",
            _diagnosis_rows(results["diagnosis"], 0),
            [
                Column("protocol"),
                Column("method"),
                Column("u_rank", "U_rank"),
                Column("u_gain", "U_rank minus DPO"),
                Column("win_gain", "win rate minus DPO"),
                Column("kl", "KL spent"),
                Column("share", "KL share on low-dispersion prompts"),
            ],
            note=f"Each row but the last changes one factor of the paper's protocol (uniform "
            f"reference, {args.diagnosis_comparisons} comparisons per prompt, converged fit at "
            f"KL = {kl}) to the earlier protocol's; the last row is the earlier protocol "
            f"(top-choice reference, {args.earlier_comparisons} comparisons, Adam lr {args.lr} "
            f"for {args.steps} steps over beta in {args.betas}, best checkpoint with KL <= {kl}). "
            f"Mean ± 95% CI over {args.diagnosis_seeds} seeds.",
        ),
        Table(
            f"Why the gain depends on N: signal per dispersion group and the weight's reach, "
            f"varied dispersion, KL = {kl}",
            _explain_rows(results["headline"], args),
            [
                Column("n", "comparisons per prompt"),
                Column("finite", "prompts with a finite fit without the prior, low / high"),
                Column("dir_low", f"U_rank, low-dispersion prompts alone at KL {kl}"),
                Column("dir_high", f"U_rank, high-dispersion prompts alone at KL {kl}"),
                Column("share", "MallowsPO-theta KL share on low-dispersion prompts"),
            ]
            + [
                Column(f"a{alpha}", f"gain over DPO, weight w^{alpha}")
                for alpha in args.weight_exponents
            ],
            note=f"Same fits as the first table ({args.seeds} seeds, {args.prior} prior "
            "comparisons per pair). 'Alone': each dispersion group spends a mean of "
            f"{kl} nats per prompt along the converged DPO fit (MallowsPO-theta's fit is the "
            "same direction per prompt, scaled by 1/w(x)). 'Weight w^alpha': DPO's scores "
            "divided by w(x)^alpha, "
            "matched to the same mean KL, minus DPO (alpha = 1 is MallowsPO-theta; w = -ln phi "
            f"is {results['headline']['varied'][POPULATION]['explain']['weight_ratio']:.1f}x "
            "larger on the low-dispersion prompts).",
        ),
        Table(
            f"Tie prior at N = {results['prior_comparisons']}, varied dispersion, KL = {kl}",
            _prior_rows(results["prior_sweep"]),
            [
                Column("prior", "prior comparisons per pair"),
                Column("dpo", "DPO U_rank"),
                Column("dpo_share", "DPO KL share on low-dispersion prompts"),
                Column("theta", "MallowsPO-theta U_rank minus DPO"),
                Column("theta_share", "MallowsPO-theta KL share on low-dispersion prompts"),
                Column("phi", "MallowsPO-phi U_rank minus DPO"),
                Column("phi_share", "MallowsPO-phi KL share on low-dispersion prompts"),
                Column("dir", f"U_rank alone at KL {kl}, low / high prompts"),
            ],
            note=f"The same {args.seeds} data sets as the first table's N = "
            f"{results['prior_comparisons']} row, fitted with each tie prior (half a win each "
            "side per pair). Without a prior the fit is not finite on most low-dispersion "
            "prompts (previous table).",
        ),
    ]


def _findings(results: dict, args: argparse.Namespace) -> list[str]:
    level = args.kl_levels.index(args.headline_kl)
    kl = args.headline_kl
    lines = []
    varied = results["headline"]["varied"]
    for n, run in varied.items():
        parts = []
        for method in PAPER_METHODS[1:]:
            u = _diff(run, method, "u_rank", level)
            w = _diff(run, method, "win_rate", level)
            parts.append(
                f"{LABELS[method]} U_rank {_ci(u)} ({_verdict(u)}), win rate {_ci(w)} "
                f"({_verdict(w)})"
            )
        lines.append(f"Varied dispersion, N = {n}, KL = {kl}: " + "; ".join(parts) + ".")
    top = varied[str(max(args.comparisons))]["metrics"]
    shares = ", ".join(
        f"{LABELS[m]} {top[m]['kl_low_share'][level].mean():.2f}" for m in PAPER_METHODS
    )
    lines.append(
        f"KL allocation (N = {max(args.comparisons)}): share of the KL spent on the "
        f"low-dispersion half of the prompts: {shares}."
    )
    lines += _small_n_lines(results, args)
    equal = results["headline"]["equal"]
    largest = max(
        (abs(_diff(run, m, "u_rank", level).mean()), m, n)
        for n, run in equal.items()
        for m in PAPER_METHODS[1:]
    )
    lines.append(
        f"Equal dispersion (phi = {args.control_phi}): the largest mean U_rank difference from "
        f"DPO over all N and both MallowsPO variants is {largest[0]:.3f} points "
        f"({LABELS[largest[1]]}, N = {largest[2]}); MallowsPO-theta with one weight is DPO at a "
        "rescaled beta, the same policy at equal KL."
    )
    for label, run in results["diagnosis"].items():
        gains = ", ".join(
            f"{LABELS[m]} {_ci(_diff(run, m, 'u_rank', 0))}" for m in PAPER_METHODS[1:]
        )
        share = run["metrics"]["dpo"]["kl_low_share"][0].mean()
        lines.append(
            f"Diagnosis, {label}: U_rank minus DPO: {gains}; DPO spends {share:.2f} of its KL on "
            "the low-dispersion prompts."
        )
    lines.append(_against_methods(results, level))
    grads = {
        LABELS[m]: max(
            r["max_grad"][m] for by_n in results["headline"].values() for r in by_n.values()
        )
        for m in PAPER_METHODS
    }
    excess = {n: run["explain"]["phi_lbfgs_excess"] for n, run in varied.items()}
    lines.append(
        "Convergence: the largest gradient left by a headline fit: "
        + ", ".join(f"{label} {g:.1e}" for label, g in grads.items())
        + ". MallowsPO-phi's link jumps at h = 0, and a pair of near-tied arms can sit at the "
        "jump (a local minimum of a pair seen with both labels), where the gradient does not "
        "vanish. The loss is discontinuous there and L-BFGS alone can stall: from DPO's scores "
        "it stops above the MallowsPO-phi fit kept here (Adam then L-BFGS, the lower loss per "
        "seed) by "
        + ", ".join(
            f"{np.mean(v):.1e} (N = {n}, lower on {int(np.sum(np.asarray(v) > 1e-9))}/"
            f"{np.size(v)} seeds)"
            for n, v in excess.items()
        )
        + " nats per prompt."
    )
    return lines


def _small_n_lines(results: dict, args: argparse.Namespace) -> list[str]:
    """What the smallest N's row says and what drives it (the last two tables)."""
    level = args.kl_levels.index(args.headline_kl)
    kl = args.headline_kl
    varied = results["headline"]["varied"]
    n = str(results["prior_comparisons"])
    run, pop = varied[n], varied[POPULATION]
    e, e_pop = run["explain"], pop["explain"]
    theta = _diff(run, "theta_true", "u_rank", level)
    phi = _diff(run, "phi_true", "u_rank", level)
    share = run["metrics"]["theta_true"]["kl_low_share"][level].mean()
    phi_share = run["metrics"]["phi_true"]["kl_low_share"][level].mean()
    dpo_share = run["metrics"]["dpo"]["kl_low_share"][level].mean()

    def best(explain: dict) -> tuple[float, str]:
        return max((np.mean(g), a) for a, g in explain["exponent_gain"].items())

    gain_n, alpha_n = best(e)
    gain_pop, alpha_pop = best(e_pop)
    sweep = results["prior_sweep"]
    gains = {p: _diff(r, "theta_true", "u_rank", 0) for p, r in sweep.items()}
    means = [float(np.mean(g)) for g in gains.values()]
    sign = (
        "behind DPO at every prior tried"
        if max(means) < 0
        else "ahead of DPO at every prior tried"
        if min(means) > 0
        else "of either sign depending on the prior"
    )
    shares = {
        m: " / ".join(f"{r['metrics'][m]['kl_low_share'][0].mean():.2f}" for r in sweep.values())
        for m in ("dpo", "theta_true")
    }
    moved = {
        g: np.ptp([np.mean(r["explain"][f"direction_{g}"]) for r in sweep.values()])
        for g in ("low", "high")
    }
    phi_gains = " / ".join(
        f"{np.mean(_diff(r, 'phi_true', 'u_rank', 0)):+.2f}" for r in sweep.values()
    )
    calibrated = float(alpha_n) < 1 <= float(alpha_pop)
    return [
        f"What the N = {n} row says: with {n} comparisons per prompt MallowsPO-theta is "
        f"{_ci(theta)} U_rank points from DPO ({_verdict(theta)}) and MallowsPO-phi {_ci(phi)} "
        f"({_verdict(phi)}); docs/methods.md reports about +1 at 100. MallowsPO-theta's "
        "converged fit on each prompt is DPO's divided by w(x) "
        f"(to {e['theta_vs_dpo_over_w']:.0e} of the scores' size), so the two differ only in "
        f"how they share the KL between prompts; w = -ln phi is {e['weight_ratio']:.1f}x larger "
        f"on the low-dispersion prompts, so it moves the KL to the high-dispersion ones: "
        f"MallowsPO-theta spends {1 - share:.2f} of its KL there at N = {n}, DPO "
        f"{1 - dpo_share:.2f}. Spending {kl} nats per prompt along the fit, the high-dispersion "
        f"prompts alone reach U_rank {np.mean(e['direction_high']):.1f} and the low-dispersion "
        f"ones alone {np.mean(e['direction_low']):.1f} at N = {n} (population: "
        f"{np.mean(e_pop['direction_high']):.1f} and {np.mean(e_pop['direction_low']):.1f}). "
        f"Dividing DPO's scores by w^alpha, the best exponent at N = {n} is {alpha_n} "
        f"({gain_n:+.2f}), in the population {alpha_pop} ({gain_pop:+.2f})"
        + (
            f": the full weight (alpha = 1) suits the population's signal but overshoots at "
            f"N = {n}, where the high-dispersion prompts' fitted margins are mostly sampling "
            "noise. A property of the finite-sample regime, not a defect of the fit."
            if calibrated
            else "."
        )
        + f" MallowsPO-phi, whose link is nearly flat at phi = 0.9, spends {1 - phi_share:.2f} "
        "of its KL on the high-dispersion prompts.",
        f"The tie prior ({args.prior} comparisons per pair in the headline) "
        + ("sets the size of" if max(means) < 0 or min(means) > 0 else "changes the sign of")
        + f" the N = {n} result: without a prior {np.mean(e['finite_low']):.0%} of the "
        f"low-dispersion prompts have a finite fit (high-dispersion: "
        f"{np.mean(e['finite_high']):.0%}), so on the others the prior alone sets the margins. "
        f"MallowsPO-theta's U_rank minus DPO at prior {' / '.join(sweep)}: "
        + " / ".join(f"{m:+.2f}" for m in means)
        + f"; KL share on the low-dispersion prompts, DPO {shares['dpo']}, MallowsPO-theta "
        f"{shares['theta_true']}: {sign} (MallowsPO-phi: {phi_gains}). Across these priors "
        "each group's U_rank along the fit when it alone spends the budget moves by at most "
        f"{moved['low']:.1f} (low-dispersion) and {moved['high']:.1f} (high-dispersion) points.",
    ]


def _against_methods(results: dict, level: int) -> str:
    """The measured sizes next to what docs/methods.md reports for an independent bandit."""
    varied = results["headline"]["varied"]
    small, large = str(min(int(n) for n in varied if n != POPULATION)), POPULATION

    def gains(n: str, key: str) -> str:
        return " / ".join(
            f"{_diff(varied[n], m, key, level).mean():+.2f}" for m in PAPER_METHODS[1:]
        )

    behind = [
        LABELS[m] for m in PAPER_METHODS[1:] if _diff(varied[small], m, "u_rank", level).mean() < 0
    ]
    small_text = (
        f" At N = {small} {' and '.join(behind)} {'is' if len(behind) == 1 else 'are'} "
        f"behind DPO, not about +1 ahead: see what the N = {small} row says above."
        if behind
        else ""
    )
    return (
        "Against docs/methods.md (independent bandit, 20 prompts x 10 arms, phi 0.2 vs 0.9: "
        "about +7-8 points on consensus agreement at equal KL, about +1 with 100 comparisons per "
        "prompt, none with equal dispersion, none in the average annotator's win rate): "
        f"MallowsPO-theta / -phi U_rank gains {gains(large, 'u_rank')} ({large}), "
        f"{gains(small, 'u_rank')} (N = {small}); win-rate gains {gains(large, 'win_rate')} "
        f"({large})." + small_text
    )


def _figure(results: dict, args: argparse.Namespace):
    level = args.kl_levels.index(args.headline_kl)
    figure, axes = new_figure(ncols=3)
    for ax, key, name in zip(
        axes[0][:2], ("u_rank", "win_rate"), ("U_rank", "win rate"), strict=True
    ):
        for setting, by_n in results["headline"].items():
            for offset, method in enumerate(PAPER_METHODS[1:]):
                stats = [mean_ci(_diff(run, method, key, level)) for run in by_n.values()]
                x = (
                    np.arange(len(stats))
                    + 0.08 * (offset - 0.5)
                    + (0.2 if setting == "equal" else 0)
                )
                ax.errorbar(
                    x,
                    [s.mean for s in stats],
                    yerr=[s.half_width for s in stats],
                    marker="o" if setting == "varied" else "s",
                    capsize=3,
                    linestyle="none",
                    label=f"{LABELS[method]}, {setting}",
                )
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(by_n)), list(by_n))
        ax.set(xlabel="comparisons per prompt", ylabel=f"{name} minus DPO (x100)")
        ax.set_title(f"{name} gain over DPO at KL = {args.headline_kl} (95% CI)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][2]
    alphas = args.weight_exponents
    for n, run in results["headline"]["varied"].items():
        stats = [mean_ci(run["explain"]["exponent_gain"][str(a)]) for a in alphas]
        ax.errorbar(
            alphas,
            [s.mean for s in stats],
            yerr=[s.half_width for s in stats],
            marker="o",
            capsize=3,
            label=f"N = {n}",
        )
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xlabel="alpha (0 = DPO, 1 = MallowsPO-theta)", ylabel="U_rank minus DPO (x100)")
    ax.set_title(f"DPO's scores / w(x)^alpha at KL = {args.headline_kl}, varied")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return figure


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=10, help="data sets per finite N")
    parser.add_argument("--diagnosis-seeds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--arms", type=int, default=10)
    parser.add_argument("--comparisons", type=int, nargs="+", default=[100, 300, 2000])
    parser.add_argument("--diagnosis-comparisons", type=int, default=2000)
    parser.add_argument("--earlier-comparisons", type=int, default=20)
    parser.add_argument("--prior", type=float, default=0.5, help="tie comparisons per pair")
    parser.add_argument(
        "--diagnosis-priors",
        type=float,
        nargs="+",
        default=[0.02, 0.1, 0.5, 2.0],
        help="tie priors refitted at the smallest --comparisons",
    )
    parser.add_argument(
        "--weight-exponents",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5, 0.75, 1.0, 1.25],
        help="alpha of DPO's scores / w^alpha (1 = MallowsPO-theta)",
    )
    parser.add_argument("--phis", type=float, nargs="+", default=[0.2, 0.9])
    parser.add_argument("--control-phi", type=float, default=0.5, help="equal-dispersion control")
    parser.add_argument("--scale", type=float, default=0.29, help="dispersion scale c (estimate)")
    parser.add_argument("--kl-levels", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--headline-kl", type=float, default=0.5)
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[float(b) for b in np.geomspace(0.03, 10, 8).round(4)],
    )
    parser.add_argument("--lr", type=float, default=0.02, help="Adam (earlier protocol)")
    parser.add_argument("--steps", type=int, default=600, help="Adam steps (earlier protocol)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="tiny settings for tests/CI")
    add_output_argument(parser, "mallows_bandit")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.diagnosis_seeds, args.prompts, args.arms = 3, 2, 4, 5
        args.comparisons, args.diagnosis_comparisons = [30, 200], 200
        args.betas, args.steps, args.eval_every = [0.1, 1.0], 40, 10
    if args.headline_kl not in args.kl_levels:
        parser.error(f"--headline-kl {args.headline_kl} is not among --kl-levels {args.kl_levels}")
    if args.seeds < 2 or args.diagnosis_seeds < 2:
        parser.error("--seeds and --diagnosis-seeds need at least 2 for a confidence interval")
    return args


def _diagnosis_protocols(args: argparse.Namespace) -> list[Protocol]:
    n, earlier = args.diagnosis_comparisons, args.earlier_comparisons
    return [
        Protocol("paper's protocol", "uniform", n, "converged"),
        Protocol("top-choice reference", "top_choice", n, "converged"),
        Protocol(f"{earlier} comparisons per prompt", "uniform", earlier, "converged"),
        Protocol("Adam, best checkpoint under the budget", "uniform", n, "adam"),
        Protocol(
            "earlier protocol (all three)",
            "top_choice",
            earlier,
            "adam",
            PAPER_METHODS + ("theta_est", "phi_est"),
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """Run the paper's protocol and the diagnosis; write results/mallows_bandit.{json,md,png}."""
    args = _parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = {"varied": tuple(args.phis), "equal": (args.control_phi,)}
    results: dict = {"headline": {}, "diagnosis": {}}
    for name, phis in settings.items():
        results["headline"][name] = {}
        for n in [*args.comparisons, None]:
            protocol = Protocol(f"N = {_n_label(n)}", "uniform", n, "converged")
            results["headline"][name][_n_label(n)] = run_protocol(
                protocol, phis, args.seeds, args.kl_levels, args, explain=name == "varied"
            )
            print(f"{name} N={_n_label(n)} ({time.perf_counter() - started:.0f} s)", flush=True)
    n = min(args.comparisons)
    results["prior_comparisons"], results["prior_sweep"] = n, {}
    for prior in args.diagnosis_priors:
        protocol = Protocol(f"prior {prior}", "uniform", n, "converged", prior=prior)
        results["prior_sweep"][str(prior)] = run_protocol(
            protocol, settings["varied"], args.seeds, [args.headline_kl], args, explain=True
        )
    print(f"prior sweep at N={n} ({time.perf_counter() - started:.0f} s)", flush=True)
    for protocol in _diagnosis_protocols(args):
        run = run_protocol(
            protocol, settings["varied"], args.diagnosis_seeds, [args.headline_kl], args
        )
        results["diagnosis"][protocol.label] = run
        print(f"{protocol.label} ({time.perf_counter() - started:.0f} s)", flush=True)
    files = write_results(
        "mallows_bandit",
        title="MallowsPO synthetic bandit: DPO vs MallowsPO at equal KL, the paper's protocol",
        description=__doc__.split("\n\n", 1)[1],
        tables=_tables(results, args),
        settings=args,
        findings=_findings(results, args),
        data=results,
        figure=_figure(results, args),
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

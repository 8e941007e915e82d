"""Smoke and property tests of the benchmark scripts' building blocks (tiny settings)."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bandit_model  # noqa: E402
import common  # noqa: E402
import loss_timing  # noqa: E402
import mixdpo_estimators  # noqa: E402
import mixdpo_recovery  # noqa: E402
import summarize  # noqa: E402
import tune_overhead  # noqa: E402

from raypo.config import load_config  # noqa: E402
from raypo.objectives import OBJECTIVES  # noqa: E402
from raypo.tune.results import TrialRow, write_tables  # noqa: E402


def _exact_mallows(phi: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """P(item i ranked before item j) [k, k] and P(item i first) [k] by enumerating k! rankings
    weighted by phi^(inversions against 0, 1, ..., k-1)."""
    before, first, total = np.zeros((k, k)), np.zeros(k), 0.0
    for ranking in itertools.permutations(range(k)):
        inversions = sum(a > b for a, b in itertools.combinations(ranking, 2))
        weight = phi**inversions
        total += weight
        first[ranking[0]] += weight
        position = np.argsort(ranking)
        before += weight * (position[:, None] < position[None, :])
    return before / total, first / total


@pytest.mark.parametrize("phi", [0.3, 0.8])
def test_bandit_pairwise_and_top_choice_probs_match_enumeration(phi: float) -> None:
    """raypo's g_phi link at integer distances gives P(a before b) for every pair a < b of K = 5
    Mallows-ranked items, and phi^a / sum gives P(a first), both as enumerating all 120 rankings
    does (to rounding); 40,000 sampled comparisons per prompt reproduce the pairwise
    probabilities within 0.04 (4.5 binomial standard errors at ~890 comparisons per pair)."""
    k = 5
    exact, first = _exact_mallows(phi, k)
    np.testing.assert_allclose(bandit_model.pairwise_probs(phi, k).numpy(), exact + np.eye(k) / 2)
    np.testing.assert_allclose(bandit_model.top_choice_probs(np.array([phi]), k)[0], first)
    problem = bandit_model.make_problem((phi,), 1, k, 0.29, "uniform")
    data = bandit_model.sample_comparisons(problem, 40_000, [0], prior=0.0)
    a, b = bandit_model.pairs(k)
    sampled = data.wins[0, 0] / (data.wins[0, 0] + data.losses[0, 0])
    np.testing.assert_allclose(sampled.numpy(), exact[a, b], atol=0.04)


def _bandit(phis: tuple[float, ...], reference: str = "uniform"):
    problem = bandit_model.make_problem(phis, 4, 5, 0.29, reference)
    return problem, bandit_model.sample_comparisons(problem, 60, [0, 1], prior=0.5)


def test_bandit_converged_fit_at_any_beta_is_scores_over_beta() -> None:
    """The objectives depend on the logits only through beta * h, so S / beta (S fitted at beta 1)
    is a stationary point of the beta = 2.5 objective: its gradient vanishes (to 1e-6) for DPO
    and MallowsPO-theta, and the policy at an exact KL budget spends that KL (to 1e-9)."""
    problem, data = _bandit((0.2, 0.9))
    for method in ("dpo", "theta_true"):
        scores, grad = bandit_model.converged_scores(method, problem, data)
        assert grad < 1e-6
        logratio = (scores / 2.5).requires_grad_(True)
        bandit_model.expected_loss(method, logratio, 2.5, problem, data).backward()
        assert float(logratio.grad.abs().max()) < 1e-6
        logp = bandit_model.policy_at_kl(problem, scores, 0.3)
        np.testing.assert_allclose(bandit_model.mean_kl(problem, logp).numpy(), 0.3, atol=1e-9)
    with pytest.raises(ValueError, match="exceeds"):
        bandit_model.policy_at_kl(problem, scores, 5.0)  # above ln 5, the most any policy spends


def test_bandit_theta_with_one_dispersion_is_dpo_at_equal_kl() -> None:
    """With one dispersion for every prompt MallowsPO-theta's scores are DPO's divided by w, so at
    the same KL budget the two policies coincide; with two dispersions they differ."""
    problem, data = _bandit((0.5,))
    dpo, _ = bandit_model.converged_scores("dpo", problem, data)
    theta, _ = bandit_model.converged_scores("theta_true", problem, data)
    np.testing.assert_allclose(theta.numpy(), dpo.numpy() / problem.w_true[0].item(), atol=1e-4)
    same = [bandit_model.policy_at_kl(problem, s, 0.2) for s in (dpo, theta)]
    np.testing.assert_allclose(same[0].numpy(), same[1].numpy(), atol=1e-5)
    problem, data = _bandit((0.2, 0.9))
    policies = [
        bandit_model.policy_at_kl(problem, bandit_model.converged_scores(m, problem, data)[0], 0.2)
        for m in ("dpo", "theta_true")
    ]
    assert float((policies[0] - policies[1]).abs().max()) > 0.1


def test_bandit_finite_fit_by_hand() -> None:
    """Three arms: a cycle of wins (0 > 1 > 2 > 0) has a finite fit; data where arm 0 never
    loses has none (its margins grow without bound), and the fit confirms both."""
    # pairs (0, 1), (0, 2), (1, 2); wins by the lower index, losses by the higher
    cycle = (torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]))
    top = (torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0]))
    found = bandit_model.finite_fit(
        torch.stack([cycle[0], top[0]]), torch.stack([cycle[1], top[1]]), 3
    )
    assert found.tolist() == [True, False]
    problem = bandit_model.make_problem((0.5,), 2, 3, 0.29, "uniform")
    data = bandit_model.Comparisons(
        torch.stack([cycle[0], top[0]])[None] / 3, torch.stack([cycle[1], top[1]])[None] / 3
    )
    scores, _ = bandit_model.converged_scores("dpo", problem, data)
    spread = (scores.amax(-1) - scores.amin(-1))[0]
    assert spread[0] < 1.0 and spread[1] > 10.0
    # the sampled data of a large N always has a finite fit; the population too
    assert bandit_model.finite_fit_share(problem, 2000, [0, 1]).all()
    assert bandit_model.finite_fit_share(problem, None, [0]).all()


def test_bandit_theta_scores_are_dpo_over_w_and_group_u_rank() -> None:
    """Per prompt MallowsPO-theta's converged scores are DPO's divided by w(x) (the objective is
    DPO's at the margin w h), so the two share each prompt's direction; group_u_rank spends the
    budget on each dispersion group alone."""
    problem, data = _bandit((0.2, 0.9))
    dpo, _ = bandit_model.converged_scores("dpo", problem, data)
    theta, _ = bandit_model.converged_scores("theta_true", problem, data)
    dpo, theta = dpo - dpo.mean(-1, keepdim=True), theta - theta.mean(-1, keepdim=True)
    torch.testing.assert_close(theta * problem.w_true[None, :, None], dpo, atol=1e-5, rtol=1e-5)
    by_group = bandit_model.group_u_rank(problem, dpo, 0.2)
    for name, mask in (("low", problem.low), ("high", ~problem.low)):
        part = bandit_model.subproblem(problem, mask)
        logp = bandit_model.policy_at_kl(part, dpo[:, torch.from_numpy(mask)], 0.2)
        np.testing.assert_allclose(bandit_model.mean_kl(part, logp).numpy(), 0.2, atol=1e-9)
        np.testing.assert_allclose(by_group[name], bandit_model.metrics(part, logp)["u_rank"])
    assert problem.low.sum() == 2 and np.all(by_group["low"] > 50)


def test_bandit_phi_fit_is_not_left_where_l_bfgs_stalls() -> None:
    """MallowsPO-phi's loss is discontinuous at h = 0 and L-BFGS alone stalls there: on these
    data it stopped above the phi loss of MallowsPO-theta's scores (a point it could have
    reached). The fit must reach, per seed, no more than the loss of plain L-BFGS from the same
    start, of MallowsPO-theta's scores and of DPO's."""
    problem, data = _bandit((0.2, 0.9))
    dpo, _ = bandit_model.converged_scores("dpo", problem, data)
    theta, _ = bandit_model.converged_scores("theta_true", problem, data)
    phi, _ = bandit_model.converged_scores("phi_true", problem, data, dpo)

    def loss(scores):
        return bandit_model.seed_losses("phi_true", scores, problem, data).numpy()

    plain = bandit_model.lbfgs_scores("phi_true", problem, data, dpo)
    assert np.all(loss(phi) <= loss(plain))
    assert np.all(loss(phi) < loss(theta)) and np.all(loss(phi) < loss(dpo))


def test_bandit_metrics_by_hand() -> None:
    """Uniform reference, K = 5: the uniform policy scores U_rank 50, win rate 50 and KL 0; always
    playing the consensus best scores U_rank 100, KL ln 5 and win rate 100 * mean_b P(0 beats b)
    (P(0 beats 0) = 1/2)."""
    problem = bandit_model.make_problem((0.4,), 1, 5, 0.29, "uniform")
    uniform = bandit_model.metrics(problem, problem.ref_logp)
    assert uniform["u_rank"] == pytest.approx(50.0)
    assert uniform["win_rate"] == pytest.approx(50.0)
    assert uniform["kl"] == pytest.approx(0.0, abs=1e-12)
    best = torch.log(torch.tensor([[1.0, 1e-300, 1e-300, 1e-300, 1e-300]], dtype=torch.float64))
    result = bandit_model.metrics(problem, best)
    assert result["u_rank"] == pytest.approx(100.0)
    assert result["kl"] == pytest.approx(math.log(5))
    p_best = bandit_model.pairwise_probs(0.4, 5)[0].numpy()
    assert result["win_rate"] == pytest.approx(100 * p_best.mean())


def test_bandit_adam_frontier_respects_the_budget() -> None:
    """The oracle checkpoint under each budget spends at most that KL, and a larger budget never
    gives a lower U_rank (its candidates include the smaller budget's)."""
    problem, data = _bandit((0.2, 0.9), "top_choice")
    settings = bandit_model.AdamSettings((0.1, 1.0), lr=0.05, steps=40, eval_every=10)
    result = bandit_model.adam_frontier("theta_true", problem, data, settings, [0.01, 0.05, 1.0])
    assert np.all(result["kl"] <= np.array([[0.01], [0.05], [1.0]]))
    assert np.all(np.diff(result["u_rank"], axis=0) >= 0)
    assert result["u_rank"][-1].min() > result["u_rank"][0].min()


@pytest.mark.filterwarnings("ignore:MixDPO Monte Carlo estimator is biased")
def test_mixdpo_mc_bias_is_zero_at_a_tie_and_shrinks_with_k() -> None:
    """At h = 0 every draw gives sigma(0) = 1/2 and the loss ln 2 exactly (bias 0); at h = -10 the
    Monte Carlo loss overestimates (lognormal CV 1.5), less with 64 samples than with 8."""
    small = mixdpo_estimators.loss_bias("lognormal", 1.0, 1.5, [-10.0, 0.0], 8, 400, 0)
    large = mixdpo_estimators.loss_bias("lognormal", 1.0, 1.5, [-10.0, 0.0], 64, 400, 0)
    assert small["bias"][1] == 0.0 and large["bias"][1] == 0.0
    assert small["bias"][0] > 3 * small["se"][0]
    assert small["bias"][0] > large["bias"][0] + 2 * (small["se"][0] + large["se"][0])


@pytest.mark.parametrize("family", ["lognormal", "gamma"])
def test_mixdpo_estimator_strengths_have_requested_mean_and_cv(family: str) -> None:
    """200,000 strengths of each family: mean within 0.02 of 1.0 and CV within 0.05 of 0.5."""
    beta = mixdpo_estimators.sample_strengths(
        family, 1.0, 0.5, 200_000, torch.Generator().manual_seed(0)
    )
    assert float(beta.mean()) == pytest.approx(1.0, abs=0.02)
    assert float(beta.std() / beta.mean()) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("cv", [0.0, 0.5, 1.5])
def test_mixdpo_generator_strengths_have_requested_mean_and_cv(cv: float) -> None:
    """200,000 strengths: mean within 0.02 of 2.0 (standard error <= 1.5*2/447 = 0.007) and CV
    within 0.1 (lognormal CV 1.5 has heavy tails); cv = 0 gives exactly constant strengths."""
    generator = torch.Generator().manual_seed(0)
    theta = mixdpo_recovery.true_theta(4, 3.0, generator)
    pairs = mixdpo_recovery.make_pairs(200_000, 4, 2.0, cv, theta, generator)
    assert float(pairs.beta.mean()) == pytest.approx(2.0, abs=0.02)
    assert float(pairs.beta.std() / pairs.beta.mean()) == pytest.approx(cv, abs=0.1)
    assert float(pairs.delta.std()) == pytest.approx(3.0, rel=0.02)
    if cv == 0.0:
        assert torch.all(pairs.beta == pairs.beta[0])


def test_mixdpo_recovers_cv_and_calibrates_better_than_dpo() -> None:
    """Known reward, 4,000 pairs at CV 1.5: the learned CV lies in [1.0, 3.0] and MixDPO's
    held-out log-loss is below DPO's. 4,000 pairs pin mean and CV down only loosely (this seed
    learns mean 1.50, CV 2.19; the default run's 10,000 pairs give CV 1.3)."""
    generator = torch.Generator().manual_seed(3)
    theta = mixdpo_recovery.true_theta(4, 3.0, generator)
    train = mixdpo_recovery.make_pairs(4000, 4, 1.0, 1.5, theta, generator)
    test = mixdpo_recovery.make_pairs(4000, 4, 1.0, 1.5, theta, generator)
    mix = mixdpo_recovery.fit_mixdpo(train, test, "known reward", 1.0, 50)
    dpo = mixdpo_recovery.fit_dpo(train, test, "known reward", 1.0, 50)
    assert 1.0 <= mix.cv <= 3.0
    assert mix.log_loss < dpo.log_loss
    assert dpo.mean < 0.8  # a fixed-strength fit attenuates beta under heterogeneity


def test_expected_calibration_error_by_hand() -> None:
    """p = (.05, .05, .95, .95), labels (0, 1, 1, 1): bin 0 |0.5 - 0.05| * 1/2 + bin 9
    |1 - 0.95| * 1/2 = 0.25."""
    p = torch.tensor([0.05, 0.05, 0.95, 0.95], dtype=torch.float64)
    label = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    assert mixdpo_recovery.expected_calibration_error(p, label) == pytest.approx(0.25)


def test_mean_ci_uses_student_t() -> None:
    """(1, 2, 3): mean 2, sd 1, t(0.975, 2 df) = 4.303 from printed t tables: half 2.484."""
    interval = common.mean_ci([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert common.mean_ci([5.0]).half_width == 0.0
    with pytest.raises(ValueError, match="at least one value"):
        common.mean_ci([])


def test_summarize_renders_results_into_readme(tmp_path: Path) -> None:
    """A record written by write_results appears as a table between the README markers; a
    legacy file is converted; --check reports a stale README; no markers is an error."""
    results = tmp_path / "results"
    table = common.Table("t", [{"objective": "dpo", "ms": 0.125}], [common.Column("ms", "ms")])
    files = common.write_results(
        "toy", title="Toy", tables=[table], settings={"a": 1}, out=results / "toy"
    )
    record = json.loads(files.json.read_text())
    assert record["environment"]["versions"]["torch"] == torch.__version__
    assert "| 0.125 |" in files.markdown.read_text()
    legacy = {"date": "2026-01-01", "machine": "m", "results": [{"stage": "x", "rows": 3}]}
    (results / "old.json").write_text(json.dumps(legacy))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nstale\n<!-- results:end -->\ntail\n")
    assert summarize.main(["--readme", str(readme), "--results", str(results), "--check"]) == 1
    assert summarize.main(["--readme", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "stale" not in text
    assert "| ms |\n|---|\n| 0.125 |" in text
    assert "| stage | rows |\n|---|---|\n| x | 3 |" in text
    assert summarize.main(["--readme", str(readme), "--results", str(results), "--check"]) == 0
    readme.write_text("no markers\n")
    assert summarize.main(["--readme", str(readme), "--results", str(results)]) == 2


def test_tune_overhead_reads_the_trials_and_searched_keys_of_a_sweep(tmp_path: Path) -> None:
    space = {"loss.beta": "loguniform(0.02, 1.0)", "loss.dispersion_scale": "uniform(0.05, 1)"}
    overrides = [f"--run_dir={tmp_path}", f"--tune.search_space={json.dumps(space)}"]
    config = load_config(None, overrides)
    params = {"loss.beta": 0.0123456789, "loss.dispersion_scale": 0.5}
    write_tables(config, [TrialRow("a_00001", "completed", 0.625, params, 24, "")])
    trials, keys = tune_overhead._trials(tmp_path)
    assert keys == list(space)
    assert tune_overhead._overrides(trials[0], keys) == [
        "--loss.beta=0.0123456789",
        "--loss.dispersion_scale=0.5",
    ]
    assert float(trials[0][tune_overhead.METRIC]) == 0.625 and trials[0]["trial"] == "a_00001"


def test_loss_timing_times_every_registered_objective() -> None:
    cases = loss_timing._cases(16)
    assert {name.split(" ")[0] for name in cases} == set(OBJECTIVES)
    assert sum(name.startswith("mixdpo") for name in cases) == len(loss_timing.MIXDPO_POINTS)
    for name, (loss, h) in cases.items():
        leaf = h.clone().requires_grad_(True)
        loss(leaf).mean().backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), name

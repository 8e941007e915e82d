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

import common  # noqa: E402
import loss_timing  # noqa: E402
import mallows_bandit  # noqa: E402
import mixdpo_recovery  # noqa: E402
import summarize  # noqa: E402
import tune_overhead  # noqa: E402

from raypo.config import load_config  # noqa: E402
from raypo.losses import mallows_phi_link  # noqa: E402
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
def test_mallows_sampler_matches_enumeration(phi: float) -> None:
    """Pairwise and top-choice frequencies of 10,000 sampled rankings (K = 5) agree with exact
    enumeration within 0.02 (4 binomial standard errors at p = 1/2); the exact pairwise
    probability of items k apart is raypo's g_phi(k) link."""
    k, n = 5, 10_000
    rankings = mallows_bandit.sample_mallows(phi, n, k, np.random.default_rng(0))
    position = np.argsort(rankings, axis=1)
    sampled = (position[:, :, None] < position[:, None, :]).mean(axis=0)
    exact, first = _exact_mallows(phi, k)
    np.testing.assert_allclose(sampled, exact, atol=0.02)
    np.testing.assert_allclose(np.bincount(rankings[:, 0], minlength=k) / n, first, atol=0.02)
    np.testing.assert_allclose(mallows_bandit.top_choice_probs(np.array([phi]), k)[0], first)
    w = torch.full((k - 1,), -math.log(phi), dtype=torch.float64)
    distances = torch.arange(1, k, dtype=torch.float64)
    link = mallows_phi_link(distances, w).numpy()
    np.testing.assert_allclose([exact[0, d] for d in range(1, k)], link, rtol=1e-9)


def test_bandit_theta_with_constant_weight_is_dpo_at_scaled_beta() -> None:
    """With one dispersion for every prompt, MallowsPO-theta at beta equals DPO at beta * w:
    the two losses are the same function, so the whole training trajectory must coincide."""
    problem = mallows_bandit.make_problem((0.5,), 3, 4, 0.29)
    data = mallows_bandit.sample_comparisons(problem, 6, np.random.default_rng(1))
    settings = mallows_bandit.TrainSettings(steps=30, eval_every=10, lr=0.05)
    w = float(problem.w_true[0])
    theta = mallows_bandit.train(problem, data, np.array([0.7]), settings, ("theta_true",))
    dpo = mallows_bandit.train(problem, data, np.array([0.7 * w]), settings, ("dpo",))
    np.testing.assert_allclose(theta["theta_true"].kl, dpo["dpo"].kl, rtol=1e-6, atol=1e-12)
    assert theta["theta_true"].kl[-1, 0] > 0.01  # the policy moved away from the reference


def test_bandit_frontier_takes_best_reward_within_budget() -> None:
    """Hand-made points (KL, reward): (0, 50), (0.1, 60), (0.3, 55), (0.5, 80); budgets 0.05,
    0.2, 1.0 give 50, 60, 80."""
    kl = np.array([[0.0], [0.1], [0.3], [0.5]])
    reward = np.array([[50.0], [60.0], [55.0], [80.0]])
    trajectory = mallows_bandit.Trajectory(kl, reward, reward, reward, kl)
    result = mallows_bandit.frontier(trajectory, np.array([0.05, 0.2, 1.0]), 0.5)
    np.testing.assert_array_equal(result["reward"], [50.0, 60.0, 80.0])


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

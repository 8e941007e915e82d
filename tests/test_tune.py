"""``raypo tune``: search-space translation, trial configs, result tables, and a real sweep of the
tiny model on Ray Tune + Ray Train V2 (an ASHA sweep with a failed trial, then resumed)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from faults import KillOnce, ship_by_value
from ray import tune

from raypo import cli
from raypo.config import ConfigError, load_config
from raypo.run_layout import RunLayout
from raypo.train.metrics import read_metrics
from raypo.tune.results import TrialRow, best_trial
from raypo.tune.run import run_sweep
from raypo.tune.space import apply_params, search_domains

TINY_FIT_STEPS = 2
"""Enough for a fitted model that the trials must share, not fit again."""
TINY_SWEEP = {
    "name": "tiny-sweep",
    "model": {"tiny_fit_steps": TINY_FIT_STEPS},
    "data": {
        "schema": "hh",
        "max_rows": 48,
        "max_length": 96,
        "max_prompt_length": 64,
        "eval_fraction": 0.2,
    },
    "loss": {"type": "mallows_theta"},
    "reference": {"batch_size": 16, "cpus_per_actor": 0.5},
    "trainer": {
        "num_workers": 1,
        "cpus_per_worker": 0.5,
        "torch_adam": True,
        "per_device_batch_size": 4,
        "learning_rate": 1e-3,
        "max_steps": 6,
        "logging_steps": 2,
        "eval_steps": 2,
        "save_steps": 2,
        "save_total_limit": 1,
    },
}
"""48 pairs, 1 worker, 6 steps with a held-out evaluation every 2: three reports per trial."""


def _write_sweep(tmp_path: Path, tune_section: dict, **top: object) -> Path:
    path = tmp_path / "sweep.yaml"
    data = {**TINY_SWEEP, "run_dir": str(tmp_path / "sweep"), "tune": tune_section, **top}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_search_space_becomes_tune_domains() -> None:
    space = {
        "loss.beta": "loguniform(0.01, 1.0)",
        "loss.dispersion_scale": "uniform(0.05, 1.0)",
        "trainer.per_device_batch_size": "randint(2, 9)",
        "loss.type": "choice([dpo, mallows_phi])",
    }
    config = load_config(None, [f"--tune.search_space={space}"])
    domains = search_domains(config.tune)
    assert isinstance(domains["loss.beta"].get_sampler(), tune.search.sample.LogUniform)
    assert (domains["loss.beta"].lower, domains["loss.beta"].upper) == (0.01, 1.0)
    assert isinstance(domains["loss.dispersion_scale"].get_sampler(), tune.search.sample.Uniform)
    batch = domains["trainer.per_device_batch_size"]
    assert isinstance(batch, tune.search.sample.Integer) and (batch.lower, batch.upper) == (2, 9)
    assert domains["loss.type"].categories == ["dpo", "mallows_phi"]
    grid = load_config(
        None, ["--tune.search_alg=grid", "--tune.search_space.loss.type=choice([dpo, ipo])"]
    )
    assert search_domains(grid.tune) == {"loss.type": {"grid_search": ["dpo", "ipo"]}}


def test_trial_config_applies_sampled_values(tmp_path: Path) -> None:
    base = load_config(_write_sweep(tmp_path, {"search_space": {"loss.beta": "uniform(0.1, 1)"}}))
    # Tune's samplers return numpy scalars; the config takes them as Python numbers.
    params = {"loss.beta": np.float64(0.25), "trainer.per_device_batch_size": np.int64(2)}
    trial = apply_params(base, params, "t-1", str(tmp_path / "t1"))
    assert (trial.loss.beta, trial.trainer.per_device_batch_size) == (0.25, 2)
    assert (trial.name, trial.run_dir, trial.tune.search_space) == ("t-1", str(tmp_path / "t1"), {})
    assert trial.data == base.data
    with pytest.raises(ConfigError, match="loss.beta"):
        apply_params(base, {"loss.beta": -1.0}, "t-2", str(tmp_path / "t2"))


def test_sweep_settings_are_checked_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tune.search_space"):
        run_sweep(load_config(_write_sweep(tmp_path, {})))
    space = {"search_space": {"loss.beta": "uniform(0.1, 1)"}}
    no_eval = load_config(_write_sweep(tmp_path, space), ["--trainer.eval_steps=0"])
    with pytest.raises(ConfigError, match="trainer.eval_steps"):
        run_sweep(no_eval)
    assert not (tmp_path / "sweep").exists()


def test_best_trial_prefers_trials_that_trained_to_the_end() -> None:
    def row(trial_id: str, status: str, metric: float | None) -> TrialRow:
        return TrialRow(trial_id, status, metric, {"loss.beta": 0.1}, 6, "")

    early = row("a", "stopped early", 0.9)
    done = row("b", "completed", 0.7)
    # Rows arrive best first, as trial_rows sorts them.
    assert best_trial([early, done, row("c", "error", None)]) == done
    assert best_trial([early, row("c", "error", None)]) == early
    assert best_trial([row("c", "error", None)]) is None


@pytest.mark.slow
def test_asha_sweep_shares_preparation_reports_a_failed_trial_then_resumes(
    ray_session, tmp_path: Path
) -> None:
    """One sweep on the session's Ray: two ASHA trials of 2 and 6 steps on one prepared data
    set, tiny fit and reference pass; a worker dies at step 4 (tests/faults.py), so only the
    second trial fails; it is reported, then ``raypo tune --resume`` (the command's entry,
    in this process) continues it from its step-4 checkpoint."""
    ship_by_value()
    space = {"trainer.max_steps": "choice([2, 6])", "loss.beta": "choice([0.3])"}
    # grace_period 3 = every report of a 6-step trial: ASHA must not stop the trial meant to fail.
    tune_section = {"search_space": space, "search_alg": "grid", "num_samples": 1}
    path = _write_sweep(tmp_path, {**tune_section, "scheduler": "asha", "grace_period": 3})
    sweep = tmp_path / "sweep"
    first = run_sweep(load_config(path), step_callbacks=(KillOnce(4, str(sweep)),))
    assert (first.failed, first.unfinished) == (1, 0), first.table
    with (sweep / "trials.csv").open(encoding="utf-8") as handle:
        rows = {r["trainer.max_steps"]: r for r in csv.DictReader(handle)}
    assert rows["2"]["status"] == "completed" and rows["2"]["error"] == ""
    assert rows["6"]["status"] == "error" and rows["6"]["error"]
    done_dir = RunLayout(sweep).trial(rows["2"]["trial"]).root
    done_stamp = (done_dir / "metrics.jsonl").stat().st_mtime_ns

    assert cli.main(["tune", "--resume", str(sweep)]) == 0
    with (sweep / "trials.csv").open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    rows = {r["trainer.max_steps"]: r for r in table}
    assert rows["6"]["status"] == "completed" and rows["6"]["error"] == ""
    # The finished trial was not run again; the failed one went on from its step-4 checkpoint.
    assert (done_dir / "metrics.jsonl").stat().st_mtime_ns == done_stamp
    for steps, expected in (("2", [2]), ("6", [2, 4, 6])):
        run_dir = RunLayout(sweep).trial(rows[steps]["trial"]).root
        # The trial trained on the sweep's prepared pairs and reference: nothing of its own.
        assert not (run_dir / "prepared").exists() and not (run_dir / "tiny-fit").exists()
        evals = [m for m in read_metrics(run_dir) if "eval/rewards/accuracies" in m]
        assert [m["step"] for m in evals] == expected
        assert float(rows[steps]["eval/rewards/accuracies"]) == pytest.approx(
            evals[-1]["eval/rewards/accuracies"]
        )
    assert len(list((sweep / "reference").iterdir())) == 1
    assert set(space) <= set(table[0])
    best = load_config(sweep / "best_config.yaml")
    assert best.trainer.max_steps == int(table[0]["trainer.max_steps"])
    assert best.model.tiny_fit_steps == TINY_FIT_STEPS and best.tune.search_space == {}
    assert best.run_dir == f"{sweep}-best"
    assert (sweep / "metric_vs_beta.png").read_bytes()[:4] == b"\x89PNG"

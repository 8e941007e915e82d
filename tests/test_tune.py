"""``raypo tune``: search-space translation, trial configs, result tables, and real sweeps of the
tiny model on Ray Tune + Ray Train V2 (an ASHA sweep in-process, a failed-and-resumed sweep in
subprocesses)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray import tune
from ray.util import placement_group_table

from raypo.config import ConfigError, load_config
from raypo.train.metrics import read_metrics
from raypo.train.run import FAULT_ENV
from raypo.tune import run_sweep
from raypo.tune_results import TrialRow, best_trial
from raypo.tune_space import TRIALS, apply_params, search_domains

TINY_SWEEP = {
    "name": "tiny-sweep",
    "model": {"tiny_fit_steps": 20},
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
def _reserved_placement_groups() -> set[str]:
    return {pg for pg, info in placement_group_table().items() if info["state"] == "CREATED"}


def _assert_released(before: set[str], timeout_s: float = 60.0) -> None:
    """Every placement group the sweep's trials reserved is removed, also those of a trial ASHA
    stopped (Ray Train's cleaner removes them once it sees the trial's controller is gone);
    a leaked one would hold its CPUs and stall the next trial on a small machine."""
    deadline = time.monotonic() + timeout_s
    while (left := _reserved_placement_groups() - before) and time.monotonic() < deadline:
        time.sleep(1.0)
    assert not left, f"placement groups still reserved after the sweep: {left}"


def test_asha_sweep_of_two_trials_shares_preparation(ray_session, tmp_path: Path) -> None:
    space = {"loss.beta": "loguniform(0.05, 1.0)", "loss.dispersion_scale": "uniform(0.1, 1.0)"}
    config = load_config(
        _write_sweep(
            tmp_path,
            {"search_space": space, "scheduler": "asha", "num_samples": 2, "grace_period": 1},
        )
    )
    before = _reserved_placement_groups()
    result = run_sweep(config)
    sweep = tmp_path / "sweep"
    assert len(result.rows) == 2 and result.failed == 0
    _assert_released(before)
    assert {row.status for row in result.rows} <= {"completed", "stopped early"}
    assert result.best is not None and result.best.status == "completed"
    for row in result.rows:
        run_dir = sweep / TRIALS / row.trial_id
        # The trial trained on the sweep's prepared pairs and reference: nothing of its own.
        assert not (run_dir / "prepared").exists() and not (run_dir / "tiny-fit").exists()
        evals = [m for m in read_metrics(run_dir) if "eval/rewards/accuracies" in m]
        assert row.metric == evals[-1]["eval/rewards/accuracies"]
        assert 0.0 <= row.metric <= 1.0
        # Completed trials reported at steps 2, 4 and 6; ASHA can stop the other after 1 report.
        expected = [2, 4, 6] if row.status == "completed" else [2, 4, 6][: len(evals)]
        assert [m["step"] for m in evals] == expected
    assert len(list((sweep / "reference").iterdir())) == 1
    with (sweep / "trials.csv").open(encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table] == [row.trial_id for row in result.rows]
    assert set(space) <= set(table[0])
    best = load_config(result.best_config)
    assert best.loss.beta == pytest.approx(result.best.params["loss.beta"])
    assert best.model.tiny_fit_steps == 20 and best.tune.search_space == {}
    assert best.run_dir == f"{sweep}-best"
    for name in ("metric_vs_beta.png", "metric_vs_dispersion_scale.png"):
        assert (sweep / name).read_bytes()[:4] == b"\x89PNG"


def _tune_command(*args: str, fault_at: int | None = None) -> subprocess.CompletedProcess:
    """``raypo tune`` in its own process, which starts its own local Ray."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", FAULT_ENV)}
    if fault_at is not None:
        env[FAULT_ENV] = str(fault_at)
    command = [sys.executable, "-m", "raypo", "tune", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_failed_trial_is_reported_then_resumed(raypo_cache, tmp_path: Path) -> None:
    # Two trials, of 2 and 6 steps; a worker dies at step 4, so only the second one fails.
    space = {"trainer.max_steps": "choice([2, 6])"}
    path = _write_sweep(tmp_path, {"search_space": space, "search_alg": "grid", "num_samples": 1})
    sweep = tmp_path / "sweep"
    first = _tune_command(str(path), fault_at=4)
    assert first.returncode == 1, first.stderr[-3000:]
    with (sweep / "trials.csv").open(encoding="utf-8") as handle:
        rows = {r["trainer.max_steps"]: r for r in csv.DictReader(handle)}
    assert rows["2"]["status"] == "completed" and rows["2"]["error"] == ""
    assert rows["6"]["status"] == "error" and rows["6"]["error"]
    done_dir = sweep / TRIALS / rows["2"]["trial"]
    done_stamp = (done_dir / "metrics.jsonl").stat().st_mtime_ns

    second = _tune_command("--resume", str(sweep))
    assert second.returncode == 0, second.stderr[-3000:]
    with (sweep / "trials.csv").open(encoding="utf-8") as handle:
        rows = {r["trainer.max_steps"]: r for r in csv.DictReader(handle)}
    assert rows["6"]["status"] == "completed" and rows["6"]["error"] == ""
    # The finished trial was not run again; the failed one went on from its step-4 checkpoint.
    assert (done_dir / "metrics.jsonl").stat().st_mtime_ns == done_stamp
    resumed = read_metrics(sweep / TRIALS / rows["6"]["trial"])
    assert [m["step"] for m in resumed if "eval/rewards/accuracies" in m] == [2, 4, 6]

"""What raypo prints: the training progress from metrics.jsonl, the held-out summary with its
intervals, the console switches, and the checks that fail a run before any work."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from raypo import console
from raypo.config import ConfigError, load_config
from raypo.preflight import (
    check_inputs,
    check_resources,
    model_named,
    model_problem,
    resource_warnings,
)
from raypo.train.progress import (
    EtaClock,
    ProgressMonitor,
    held_out_line,
    progress_line,
    summary_lines,
    wilson_interval,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_the_first_eta_comes_from_the_first_interval_then_from_wall_time() -> None:
    clock = EtaClock(total_steps=100)
    # Steps 1-10 took 30 s (step_time_s): 3 s/step x 90 steps left; never 0 at the first step.
    assert clock.update({"step": 10, "time": 1000.0, "step_time_s": 30.0}) == pytest.approx(270)
    # 50 s of wall time from step 10 to step 20 (an evaluation included): 5 s/step x 80 left.
    assert clock.update({"step": 20, "time": 1050.0, "step_time_s": 20.0}) == pytest.approx(400)


def test_an_eta_without_any_timing_is_unknown() -> None:
    assert EtaClock(total_steps=10).update({"step": 5}) is None
    assert progress_line(5, 10, {"loss": 0.5}, None) == "step 5/10 (50%) | loss 0.5000 | ETA ?"


def test_progress_line_shows_the_known_metrics_in_order() -> None:
    values = {
        "loss": 0.693147,
        "rewards/accuracies": 0.625,
        "tokens_per_s": 1234.4,
        "learning_rate": 5e-7,
        "grad_norm": 3.0,
    }
    assert progress_line(10, 100, values, 270.0) == (
        "step 10/100 (10%) | loss 0.6931 | rewards/accuracies 0.6250 | learning_rate 5.00e-07 "
        "| tokens_per_s 1234 | ETA 4m30s"
    )


def _record(step: int, time: float, **extra: float) -> dict:
    return {"step": step, "time": time, "loss": 0.7 - step / 100, "step_time_s": 2.0, **extra}


def test_the_monitor_prints_periodic_lines_the_last_step_and_each_evaluation(
    tmp_path: Path,
) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps(_record(1, 0.0)) + "\n")  # an earlier attempt's line: skipped
    out = io.StringIO()
    monitor = ProgressMonitor(metrics, total_steps=8, live=False, interval_s=10.0, out=out)
    records = [
        _record(2, 100.0),
        _record(4, 104.0),  # 4 s after the last printed line: held back
        _record(6, 111.0),  # 11 s: printed
        {"step": 6, "time": 111.5, "eval/loss": 0.65, "eval/pairs": 41.0},
        _record(8, 113.0, **{"eval/pairs": 41.0, "eval/rewards/accuracies": 0.6}),
    ]
    with metrics.open("a") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
        handle.write('{"step": 9, "ti')  # a line being written is left for the next poll
    monitor.poll()
    lines = out.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "step 2/8 (25%)",
        "step 6/8 (75%)",
        "held-out at step 6 (41 pairs): eval/loss 0.6500",
        "step 8/8 (100%)",
        "held-out at step 8 (41 pairs): eval/rewards/accuracies 0.6000",
    ]
    # Step 2's ETA: 2 s over the 1 step since the earlier attempt's step 1, x 6 left = 12 s.
    assert lines[0].endswith("ETA 12s")


def test_held_out_line_names_the_pairs() -> None:
    line = held_out_line(
        20, {"eval/loss": 0.69, "eval/likelihood/accuracies": 0.5, "eval/pairs": 8}
    )
    assert (
        line
        == "held-out at step 20 (8 pairs): eval/loss 0.6900 | eval/likelihood/accuracies 0.5000"
    )


def test_wilson_interval_matches_the_textbook_values() -> None:
    # 50 of 100: centre 0.5, half-width 1.96 * sqrt(0.25/100 + 1.96^2/40000) / (1 + 1.96^2/100)
    # = 0.0962: (0.4038, 0.5962). 0 of 10: (0, 1.96^2/(10 + 1.96^2)) = (0, 0.2775).
    assert wilson_interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_the_summary_compares_the_same_measure_before_and_after_with_intervals() -> None:
    metrics = {
        "eval/pairs": 100.0,
        "eval/reference/accuracies": 0.5,
        "eval/likelihood/accuracies": 0.5,
        "eval/rewards/accuracies": 0.5,
    }
    title, likelihood, reward = summary_lines(metrics)
    assert title == "held-out result on 100 pairs (95% intervals):"
    assert (
        "before (reference) 0.500 [0.40, 0.60] -> after (policy) 0.500 [0.40, 0.60]" in likelihood
    )
    assert "implicit-reward accuracy: 0.500 [0.40, 0.60]" in reward
    assert reward.endswith("which the interval includes")
    assert summary_lines({"eval/pairs": 100.0, "eval/rewards/accuracies": 0.7})[1].endswith(
        "which the interval excludes"
    )
    assert summary_lines({"loss": 0.5}) == []


def test_quiet_console_switches_are_set_for_ray_and_the_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("RAY_DATA_LOGGING_CONFIG", "DS_ACCELERATOR", console.VERBOSE_ENV):
        monkeypatch.delenv(name, raising=False)
    console.configure(verbose=False, use_gpu=False)
    assert Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).is_file()
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert not console.verbose() and console.ray_train_log_level() == "WARNING"
    monkeypatch.delenv("DS_ACCELERATOR")
    console.configure(verbose=False, use_gpu=True)
    assert "DS_ACCELERATOR" not in os.environ  # a GPU run keeps DeepSpeed's own detection
    console.configure(verbose=True, use_gpu=False)
    assert console.verbose() and console.ray_train_log_level() == "INFO"


def test_ray_data_quiet_logging_keeps_the_file_and_raises_the_console_level() -> None:
    import yaml

    config = yaml.safe_load(console.RAY_DATA_QUIET_LOGGING.read_text())
    assert config["handlers"]["console"]["level"] == "WARNING"
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]


def test_a_gpu_request_on_a_cpu_cluster_names_the_field_and_the_totals() -> None:
    config = load_config(QUICKSTART, ["--trainer.use_gpu=true"])
    with pytest.raises(ConfigError) as raised:
        check_resources(config, {"CPU": 2.0})
    assert str(raised.value) == (
        "trainer.use_gpu = True: asks for 2 GPU(s), one per worker (trainer.num_workers), but "
        "the cluster has 0 GPU(s) and 2 CPU(s) in all; set trainer.use_gpu false or fewer "
        "trainer.num_workers"
    )
    check_resources(config, {"CPU": 2.0, "GPU": 2.0})


def test_every_request_beyond_the_cluster_is_reported_at_once() -> None:
    config = load_config(
        QUICKSTART, ["--trainer.cpus_per_worker=2", "--reference.gpus_per_actor=1"]
    )
    with pytest.raises(ConfigError) as raised:
        check_resources(config, {"CPU": 2.0})
    keys = [error.key for error in raised.value.errors]
    assert keys == ["trainer.cpus_per_worker", "reference.gpus_per_actor"]
    assert "2 workers x 2 = 4 CPUs" in str(raised.value)


def test_a_gpu_run_with_a_cpu_reference_pass_is_warned_about() -> None:
    config = load_config(QUICKSTART, ["--trainer.use_gpu=true"])
    assert "reference.gpus_per_actor is 0" in resource_warnings(config)[0]
    config = load_config(QUICKSTART, ["--trainer.use_gpu=true", "--reference.gpus_per_actor=1"])
    assert resource_warnings(config) == []


def test_missing_inputs_are_reported_together(tmp_path: Path) -> None:
    config = load_config(
        QUICKSTART,
        [f"--data.path={tmp_path / 'none.jsonl'}", f"--model.name_or_path={tmp_path / 'model'}"],
    )
    with pytest.raises(ConfigError) as raised:
        check_inputs(config)
    assert [error.key for error in raised.value.errors] == ["data.path", "model.name_or_path"]
    assert "no such file or directory" in raised.value.errors[0].problem
    assert "no such directory" in raised.value.errors[1].problem


def test_a_model_left_out_on_own_data_is_an_error_that_names_the_tiny_model(
    tmp_path: Path,
) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"data:\n  path: {data}\n")
    assert not model_named(config_file, [])
    with pytest.raises(ConfigError, match="--model.name_or_path tiny"):
        check_inputs(load_config(config_file), named_model=False)
    # Asking for the tiny model explicitly, or training on the bundled sample, is fine.
    assert model_named(config_file, ["--model.name_or_path", "tiny"])
    assert model_named(QUICKSTART, [])
    check_inputs(load_config(None), named_model=False)


def test_a_hub_id_missing_offline_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "HF_HUB_OFFLINE is set" in model_problem("nobody-here/no-such-model")
    assert model_problem("tiny") is None


def test_the_data_stage_line_gives_counts_reasons_split_and_where_rejects_are(
    tmp_path: Path,
) -> None:
    from raypo.data.pipeline import PreparedData
    from raypo.data.prepare import data_line
    from raypo.data.validate import DataSummary
    from raypo.run_layout import RunLayout

    summary = DataSummary(
        total=400, accepted=397, rejected=3, per_reason={"empty_completion": 1, "identical": 2}
    )
    data = PreparedData(RunLayout(tmp_path), summary, {"train": 357, "eval": 40})
    assert data_line(load_config(QUICKSTART), data, 12.34) == (
        "data: read 400 rows from builtin:hh_sample, accepted 397, rejected 3 (identical 2, "
        f"empty_completion 1; see {tmp_path / 'rejects.jsonl'}); split 357 train / 40 held out; "
        "tokenised in 12.3 s"
    )


def test_a_sweep_prints_one_line_per_trial_as_it_ends(capsys: pytest.CaptureFixture) -> None:
    from types import SimpleNamespace

    from raypo.tune.run import TrialLines

    capsys.readouterr()  # what importing DeepSpeed printed
    lines = TrialLines("eval/rewards/accuracies")
    done = SimpleNamespace(
        trial_id="a1",
        config={"loss.beta": 0.123456, "loss.type": "dpo"},
        last_result={"eval/rewards/accuracies": 0.6, "training_iteration": 2},
        path="/runs/sweep/tune/a1",
    )
    lines.on_trial_complete(5, [done], done)
    lines.on_trial_error(6, [done], done)
    assert capsys.readouterr().out.splitlines() == [
        "raypo tune: trial 1 (a1) ended after 2 evaluation(s): eval/rewards/accuracies 0.6000 "
        "| loss.beta=0.1235 loss.type=dpo",
        "raypo tune: trial 2 (a1) failed (see /runs/sweep/tune/a1) | loss.beta=0.1235 "
        "loss.type=dpo",
    ]

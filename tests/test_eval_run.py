"""``raypo eval`` end to end on tiny models (transformers backend): a policy with other weights
than the reference, a tiny reward model, grouped held-out pairs; results.json and samples.jsonl
checked against the evaluation contract and against each other."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from raypo.config import RaypoConfig, load_config
from raypo.eval.run import evaluate, main
from raypo.eval.scorers import save_tiny_reward_model
from raypo.models import TinyModelSpec, resolve_model_path, save_tiny_model
from raypo.run_layout import RunLayout

pytestmark = pytest.mark.slow

RESULT_KEYS = {
    "policy", "baseline", "reference", "backend", "backend_reason", "sampling", "num_prompts",
    "num_samples", "generation", "kl", "reward_model", "rewards", "win_rate", "implicit_reward",
    "seconds",
}  # fmt: skip
SAMPLE_KEYS = {
    "prompt_id", "prompt", "group", "sample_index", "policy_completion", "baseline_completion",
    "policy_tokens", "baseline_tokens", "policy_reward", "baseline_reward", "policy_logp",
    "reference_logp",
}  # fmt: skip
STAT_KEYS = {"accuracy", "margin_mean", "margin_std", "pairs"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, raypo_cache: str) -> dict[str, Path]:
    """Grouped pairs (JSONL), a policy = the tiny model with other initial weights (same
    tokenizer), and a tiny one-label reward model."""
    root = tmp_path_factory.mktemp("eval-run")
    data = root / "pairs.jsonl"
    with data.open("w") as out:
        for i in range(24):
            row = {
                "prompt": f"\n\nHuman: question number {i}?\n\nAssistant:",
                "chosen": f" a helpful answer {i}",
                "rejected": f" no {i}",
                "group": "even" if i % 2 == 0 else "odd",
            }
            out.write(json.dumps(row) + "\n")
    policy = save_tiny_model(root / "policy", spec=TinyModelSpec(seed=1))
    reward = save_tiny_reward_model(root / "reward", resolve_model_path("tiny"), seed=2)
    return {"root": root, "data": data, "policy": policy, "reward": reward}


def _config(models: dict[str, Path], *overrides: str) -> RaypoConfig:
    return load_config(
        None,
        [
            f"--run_dir={models['root'] / 'run'}",
            f"--data.path={models['data']}",
            "--data.schema=pairs",
            "--data.group_field=group",
            "--data.eval_fraction=0.5",
            "--data.max_length=64",
            "--data.max_prompt_length=32",
            "--data.num_cpus_per_op=0.25",
            "--eval.backend=hf",
            "--eval.num_prompts=3",
            "--eval.max_tokens=8",
            "--eval.batch_size=4",
            "--eval.cpus_per_actor=0.5",
            "--eval.bootstrap_samples=200",
            *overrides,
        ],
    )


def _read(run: Path) -> tuple[dict, list[dict]]:
    results = json.loads(RunLayout(run).eval_results.read_text())
    lines = RunLayout(run).eval_samples.read_text().splitlines()
    return results, [json.loads(line) for line in lines]


def test_eval_with_reward_model_follows_the_contract(models, ray_session) -> None:
    config = _config(
        models, f"--eval.policy={models['policy']}", f"--eval.reward_model={models['reward']}",
        "--eval.n=2", "--eval.temperature=1.0",
    )  # fmt: skip
    returned = evaluate(config)
    results, samples = _read(config.run_path)
    assert returned == results
    assert set(results) == RESULT_KEYS
    assert results["backend"] == "hf" and results["baseline"] == "reference"
    assert results["reference"] == resolve_model_path("tiny")
    assert results["sampling"] == {
        "temperature": 1.0, "top_p": 1.0, "max_tokens": 8, "n": 2, "seed": 0,
    }  # fmt: skip
    assert (results["num_prompts"], results["num_samples"]) == (3, 6)
    assert len(samples) == 6 and all(set(s) == SAMPLE_KEYS for s in samples)
    assert [s["sample_index"] for s in samples] == [0, 1] * 3
    ids = [s["prompt_id"] for s in samples[::2]]
    assert ids == sorted(ids) and {s["group"] for s in samples} <= {"even", "odd"}
    for side in ("policy", "baseline"):
        stats = results["generation"][side]
        tokens = [s[f"{side}_tokens"] for s in samples]
        assert stats["mean_tokens"] == pytest.approx(np.mean(tokens))
        assert all(1 <= t <= 8 for t in tokens) and stats["generations_per_s"] > 0

    ratios = [s["policy_logp"] - s["reference_logp"] for s in samples]
    assert results["kl"]["mean"] == pytest.approx(np.mean(ratios))
    assert results["kl"]["num_samples"] == 6 and results["kl"]["mean"] != 0.0

    policy_rewards = np.array([s["policy_reward"] for s in samples])
    baseline_rewards = np.array([s["baseline_reward"] for s in samples])
    assert results["rewards"]["policy"]["mean"] == pytest.approx(policy_rewards.mean())
    assert results["rewards"]["baseline"]["std"] == pytest.approx(baseline_rewards.std())
    outcomes = (policy_rewards > baseline_rewards) + 0.5 * (policy_rewards == baseline_rewards)
    rate = results["win_rate"]
    assert rate["value"] == pytest.approx(outcomes.mean())
    assert rate["ci_low"] <= rate["value"] <= rate["ci_high"]
    assert (rate["num_pairs"], rate["bootstrap_samples"]) == (6, 200)

    implicit = results["implicit_reward"]
    assert set(implicit["overall"]) == STAT_KEYS and sorted(implicit["groups"]) == ["even", "odd"]
    groups = implicit["groups"].values()
    assert sum(g["pairs"] for g in groups) == implicit["overall"]["pairs"] >= 3
    weighted = sum(g["margin_mean"] * g["pairs"] for g in groups) / implicit["overall"]["pairs"]
    assert weighted == pytest.approx(implicit["overall"]["margin_mean"])
    assert set(results["seconds"]) == {"sampling", "scoring", "total"}


def test_policy_equal_to_reference_scores_zero(models, ray_session, capsys) -> None:
    """Policy = reference = baseline (given as a path): identical greedy completions, KL exactly
    0, every implicit margin 0 (accuracy 0: a tie is no correct ranking), no reward model ->
    rewards and win rate null. Runs through main(), the CLI entry."""
    tiny = resolve_model_path("tiny")
    config = _config(models, f"--eval.policy={tiny}", f"--eval.baseline={tiny}",
                     "--eval.temperature=0")  # fmt: skip
    assert main(config, argparse.Namespace()) == 0
    printed = capsys.readouterr().out
    assert "sampling backend: hf (eval.backend is hf)" in printed
    assert "implicit-reward accuracy 0.000" in printed
    results, samples = _read(config.run_path)
    assert results["baseline"] == tiny
    assert all(s["policy_completion"] == s["baseline_completion"] for s in samples)
    assert results["kl"]["mean"] == 0.0 and results["kl"]["std_error"] == 0.0
    overall = results["implicit_reward"]["overall"]
    assert (overall["accuracy"], overall["margin_mean"], overall["margin_std"]) == (0.0, 0.0, 0.0)
    assert results["rewards"] is None and results["win_rate"] is None
    assert results["reward_model"] is None
    assert all(s["policy_reward"] is None for s in samples)


def test_missing_final_policy_is_one_clear_error(tmp_path, raypo_cache, capsys) -> None:
    config = load_config(None, [f"--run_dir={tmp_path / 'empty'}"])
    assert main(config, argparse.Namespace()) == 1
    error = capsys.readouterr().err
    assert "no trained policy at" in error and "--policy PATH" in error

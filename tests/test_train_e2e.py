"""End-to-end training on real Ray Train workers with real DeepSpeed on the tiny model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from faults import MARKER, KillOnce, SecondRun, ship_by_value
from transformers import AutoModelForCausalLM

from raypo.config import load_config
from raypo.data.pipeline import read_split
from raypo.data.prepare import prepare
from raypo.eval.report import build_report
from raypo.generation import SamplingSettings
from raypo.models import load_policy, load_tokenizer, resolve_model_path
from raypo.run_layout import ExportLayout, RunLayout
from raypo.train.checkpoint import trained_ids
from raypo.train.generation_eval import GenerationPrompt, run_generation_eval
from raypo.train.metrics import read_metrics
from raypo.train.run import fit_tiny_model, train
from raypo.train.sft import read_tiny_fit

pytestmark = pytest.mark.slow

TRL_NAMES = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "tokens_per_s",
    "samples_per_s",
    "learning_rate",
    "grad_norm",
}


def _config(run_dir: Path, *overrides: str):
    return load_config(
        None,
        [
            f"--run_dir={run_dir}",
            "--data.max_rows=48",
            "--data.max_length=96",
            "--data.max_prompt_length=64",
            "--data.eval_fraction=0.2",
            "--data.num_cpus_per_op=0.25",
            "--reference.batch_size=16",
            "--reference.cpus_per_actor=0.5",
            "--trainer.num_workers=2",
            "--trainer.cpus_per_worker=0.5",
            "--trainer.torch_adam=true",
            "--trainer.per_device_batch_size=4",
            "--trainer.learning_rate=1e-3",
            "--trainer.logging_steps=1",
            *overrides,
        ],
    )


def test_mallows_theta_trains_logs_checkpoints_and_exports_under_zero3(
    ray_session, tmp_path: Path
) -> None:
    """ZeRO-3, where the export gathers sharded weights and generation runs on them (ZeRO-2
    trains and exports in the restart tests below; every objective steps under both stages in
    tests/test_train_distributed.py)."""
    config = _config(
        tmp_path / "run",
        "--loss.type=mallows_theta",
        "--loss.beta=1.0",
        "--trainer.zero_stage=3",
        "--trainer.max_steps=4",
        "--trainer.save_steps=2",
        "--trainer.save_total_limit=1",
        "--trainer.eval_steps=2",
        "--eval.during_training_num_prompts=5",  # odd: one worker's share is padded
        "--eval.temperature=0",
        "--eval.max_tokens=8",
        "--eval.batch_size=2",
    )
    result = train(config)
    metrics = read_metrics(result.run_path)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert TRL_NAMES | {"dispersion/mean", "dispersion/std"} <= set(metrics[-1])
    assert metrics[-1]["eval/pairs"] > 0 and "eval/rewards/accuracies" in metrics[-1]
    _check_generation_eval(result.run_path, result.final_dir, metrics)
    _check_held_out_pairs(result.run_path, metrics)
    checkpoints = [
        p for p in (RunLayout(result.run_path).ray / config.name).glob("checkpoint_*") if p.is_dir()
    ]
    assert len(checkpoints) == 1  # save_total_limit = 1
    assert (checkpoints[0] / "train_state_rank0.pt").exists()
    assert (checkpoints[0] / "train_state_rank1.pt").exists()

    policy = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)
    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    changed = [
        not torch.equal(a, b)
        for a, b in zip(policy.parameters(), initial.parameters(), strict=True)
    ]
    assert all(changed)
    tokenizer = load_tokenizer(str(result.final_dir))
    assert tokenizer.pad_token_id is not None
    saved = json.loads((result.run_path / "data_summary.json").read_text())
    assert saved["total"] == 48


def _check_held_out_pairs(run_path: Path, metrics: list[dict]) -> None:
    """Both ranks' held-out pairs at steps 2 and 4, each once, with rewards and entropies whose
    means are the logged eval/* means (pairs weigh equally in both; float32 values of rewards
    of a few nats and of Hn below 1: 1e-5 and 1e-6 absolute); the report reads them."""
    lines = [
        json.loads(line) for line in RunLayout(run_path).heldout_pairs.read_text().splitlines()
    ]
    held_out = sorted(
        str(row["id"]) for row in read_split(RunLayout(run_path).prepared_split("eval")).take_all()
    )
    evals = {m["step"]: m for m in metrics if "eval/pairs" in m}
    assert sorted(evals) == [2, 4]
    for step, logged in evals.items():
        rows = [line for line in lines if line["step"] == step]
        assert sorted(row["id"] for row in rows) == held_out
        margins = [row["reward_chosen"] - row["reward_rejected"] for row in rows]
        assert logged["eval/rewards/margins"] == pytest.approx(sum(margins) / len(rows), abs=1e-5)
        for name, column in (("policy", "policy_hn"), ("reference", "reference_hn")):
            mean = sum(row[column] for row in rows) / len(rows)
            assert logged[f"eval/entropy/{name}"] == pytest.approx(mean, abs=1e-6)
    text = build_report(run_path).read_text()
    for plot in ("policy_dynamics.png", "dispersion_buckets.png", "implicit_rewards.png"):
        assert f"](plots/{plot})" in text, plot
    assert "| Q1 |" in text and "Policy entropy over training" not in text


def _check_generation_eval(run_path: Path, final_dir: Path, metrics: list[dict]) -> None:
    """Generation evals at steps 2 and 4 on the first 5 held-out prompts; the last one's greedy
    completions (sampled by both workers from their shares, under ZeRO-3 from sharded weights)
    equal one process generating from the exported policy."""
    evals = {m["step"]: m for m in metrics if "eval/gen/mean_tokens" in m}
    assert sorted(evals) == [2, 4]
    assert all(m["eval/gen/completions"] == 5 for m in evals.values())
    lines = [json.loads(line) for line in (run_path / "generations.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2] * 5 + [4] * 5
    held_out = read_split(RunLayout(run_path).prepared_split("eval")).take_all()
    prompt_ids = {str(row["id"]): [int(t) for t in row["prompt_ids"]] for row in held_out}
    last = lines[5:]
    assert [line["id"] for line in last] == sorted(prompt_ids)[:5]
    assert evals[4]["eval/gen/mean_tokens"] == pytest.approx(sum(r["tokens"] for r in last) / 5)
    model, tokenizer = load_policy(str(final_dir), "fp32")
    prompts = [GenerationPrompt(r["id"], prompt_ids[r["id"]]) for r in last]
    greedy = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=8, n=1, seed=0)
    _, expected = run_generation_eval(
        model, tokenizer, prompts, greedy, rank=0, world_size=1, batch_size=1, synced_gpus=False
    )
    assert [r["completion"] for r in last] == [r["completion"] for r in expected]


def test_precomputed_and_online_reference_give_the_same_first_step(ray_session, tmp_path: Path):
    """The reference differs from the policy (a copy with noise on every weight), so h != 0 at
    step 1 and the first loss depends on the reference log-probs; one worker keeps the pair
    order identical. The two runs also take the two padding-free layouts (``auto``): bucketed
    under ZeRO-2 (and in the reference pass), packed under ZeRO-3."""
    model, tokenizer = load_policy("tiny", "fp32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    reference = tmp_path / "ref"
    model.save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    losses = {}
    for mode, stage in (("precomputed", 2), ("online", 3)):
        config = _config(
            tmp_path / mode,
            "--loss.type=mallows_theta",
            "--loss.beta=1.0",
            "--loss.dispersion_scale=20",
            f"--reference.mode={mode}",
            f"--reference.model_name_or_path={reference}",
            f"--trainer.zero_stage={stage}",
            "--trainer.num_workers=1",
            "--trainer.max_steps=1",
            "--trainer.save_steps=0",
        )
        metrics = read_metrics(train(config).run_path)
        losses[mode] = metrics[0]["loss"]
    assert losses["precomputed"] == pytest.approx(losses["online"], rel=1e-5), losses
    assert abs(losses["precomputed"] - 0.6931) > 1e-3, losses  # ln 2 would mean h = 0


def test_padding_free_layouts_train_as_the_padded_batch_does(ray_session, tmp_path: Path):
    """The same config with the padded forward and bucketed (``auto`` on CPU): every step's
    loss within 1e-5 (the layouts differ only in rounding), on 2 workers x 4 pairs of lengths
    30 to 96. ``packed`` is what ZeRO-3 picks: the online reference test above compares it."""
    losses, prepared = {}, None
    for layout in ("off", "bucketed"):
        config = _config(
            tmp_path / layout,
            "--loss.type=mallows_theta",
            f"--trainer.padding_free={layout}",
            "--trainer.max_steps=4",
            "--trainer.save_steps=0",
            "--trainer.eval_steps=0",
        )
        prepared = prepared or prepare(config)  # the data and reference pass, once
        result = train(config, prepared=prepared)
        losses[layout] = [row["loss"] for row in read_metrics(result.run_path)]
    assert len(losses["off"]) == 4
    assert losses["bucketed"] == pytest.approx(losses["off"], abs=1e-5), losses


def _latest_checkpoint(run_path: Path, name: str) -> Path:
    directories = [p for p in (RunLayout(run_path).ray / name).glob("checkpoint_*") if p.is_dir()]
    return max(directories, key=lambda p: p.name)


def _epoch_config(run_dir: Path, *overrides: str):
    """One whole epoch of 47 pairs (no held-out split) on 2 workers: 6 steps of up to 8 pairs. An
    odd count: Ray Train's equal split would drop a pair if the split were not padded."""
    return _config(
        run_dir,
        "--data.max_rows=47",
        "--data.eval_fraction=0",
        "--loss.type=dpo",
        "--trainer.zero_stage=2",
        "--trainer.num_epochs=1",
        "--trainer.save_steps=2",
        *overrides,
    )


def _train_ids(run_path: Path) -> list[str]:
    rows = read_split(run_path / "prepared" / "split=train").take_all()
    return sorted(row["id"] for row in rows)


def test_killed_worker_restarts_from_checkpoint_without_losing_or_repeating_pairs(
    ray_session, tmp_path: Path
) -> None:
    ship_by_value()
    config = _epoch_config(tmp_path / "run", "--trainer.max_failures=1")
    fault = KillOnce(3, str(config.run_path))  # after the step-2 checkpoint
    result = train(config, step_callbacks=[fault])
    assert (result.run_path / MARKER).exists()
    ids = _train_ids(result.run_path)
    assert len(ids) == 47
    assert trained_ids(_latest_checkpoint(result.run_path, config.name)) == ids
    assert (result.final_dir / "model.safetensors").exists()


def _corrupt_the_two_newest(run_path: Path, name: str) -> list[str]:
    """The newest checkpoint loses rank 1's train state, the one before gets its rank-1
    optimizer shard cut short (a full disk); returns their names, newest first."""
    directories = sorted(
        p for p in (RunLayout(run_path).ray / name).glob("checkpoint_*") if p.is_dir()
    )
    assert len(directories) == 3, directories  # trainer.save_total_limit
    newest, before = directories[-1], directories[-2]
    (newest / "train_state_rank1.pt").unlink()
    shard = next((before / "engine").glob("*rank_1*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    return [newest.name, before.name]


def test_resume_after_the_whole_job_stopped_trains_each_pair_once(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job dies at step 5 with checkpoints at steps 3, 4 and 5; the step-5 one misses a rank's
    train state and the step-4 one has a truncated file. The resume refuses other settings,
    falls back to step 3 naming both skipped checkpoints, refuses a second run into its directory
    while it trains, and still trains every pair of the epoch exactly once."""
    ship_by_value()
    config = _epoch_config(
        tmp_path / "run",
        "--trainer.max_failures=0",
        "--trainer.save_steps=1",
        "--trainer.save_total_limit=3",
    )
    with pytest.raises(Exception, match="(?i)fail|error"):
        train(config, step_callbacks=[KillOnce(5, str(config.run_path))])
    with pytest.raises(SystemExit, match="--resume"):
        train(config)  # a fresh start would silently resume: refused
    skipped = _corrupt_the_two_newest(config.run_path, config.name)
    longer = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, max_steps=9))
    with pytest.raises(SystemExit, match="trainer.max_steps: None -> 9"):
        train(longer, resume=True)
    capsys.readouterr()
    second = SecondRun(4, str(config.run_path.resolve()))
    result = train(config, resume=True, step_callbacks=[second])
    printed = capsys.readouterr().out
    assert all(f"skipped checkpoint {name}" in printed for name in skipped), printed
    assert re.search(r"\(step 3, epoch 0, \d+ pairs trained, 2 workers\)", printed), printed
    assert trained_ids(_latest_checkpoint(result.run_path, config.name)) == _train_ids(
        result.run_path
    )
    refused = json.loads((config.run_path.parent / "second_run.json").read_text())
    assert refused["returncode"] != 0 and "is in use by another run" in refused["stderr"]
    assert refused["seconds"] < 30, refused
    # The pairs left after the restart can take an extra lock-step step; the schedule follows the
    # pairs trained, so only the update that trains the last pairs reaches learning rate 0.
    records = [m for m in read_metrics(result.run_path) if "learning_rate" in m]
    by_step = {m["step"]: m["learning_rate"] for m in records}
    rates = [by_step[step] for step in sorted(by_step)]
    assert rates[-1] == pytest.approx(0.0, abs=1e-12) and min(rates[:-1]) > 0, by_step


def test_mixdpo_whole_run_learns_its_strength_and_exports_it(ray_session, tmp_path: Path) -> None:
    """16 pairs, 2 workers x 4 pairs: each epoch is 2 steps on the same pairs; 4 epochs, through
    raypo.train.run.train (every objective on both ZeRO stages: tests/test_train_distributed.py).
    The reference is the tiny model fitted for 30 steps by raypo sft (``model.tiny_fit_steps``)."""
    objective, stage = "mixdpo", 3
    config = _config(
        tmp_path / "run",
        f"--loss.type={objective}",
        "--loss.beta=1.0",
        "--loss.dispersion_scale=5",
        "--model.tiny_fit_steps=30",
        "--data.max_rows=16",
        "--data.eval_fraction=0",
        f"--trainer.zero_stage={stage}",
        "--trainer.num_epochs=4",
        "--trainer.lr_scheduler=constant",
        "--trainer.warmup_ratio=0",
        "--trainer.logging_steps=2",
        "--trainer.save_steps=0",
        "--trainer.eval_steps=2",  # with no held-out split: evaluation is skipped, not an error
    )
    result = train(config)
    epochs = [m for m in read_metrics(result.run_path) if "loss" in m and m["samples_per_s"] > 0]
    assert len(epochs) == 4, epochs
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 1e-3, [e["loss"] for e in epochs]
    assert epochs[0]["mixdpo/beta_mean"] == pytest.approx(1.0, rel=1e-6)  # E[beta] fixed
    exported = json.loads(ExportLayout(result.final_dir).strength.read_text())
    assert exported["family"] == "lognormal"
    assert exported["moments"]["mean"] == pytest.approx(1.0, rel=1e-6)
    assert exported["moments"]["cv"] == pytest.approx(epochs[-1]["mixdpo/beta_cv"], rel=0.05)
    assert exported["moments"]["cv"] != pytest.approx(0.5, rel=1e-4)  # learned from the init
    # The reference is the tiny fit's final/: a raypo sft run of its own on the same ZeRO-3
    # workers, which lowers the completion loss; asked again, it is reused without training.
    fit = RunLayout(config.run_path).tiny_fit
    report = read_tiny_fit(fit)
    assert report is not None and report["steps"] == 30, report
    assert report["losses"][-1] < report["losses"][0] - 0.5, report
    final = RunLayout(fit).final
    assert load_config(RunLayout(result.run_path).config).model.name_or_path == str(final)
    weights = (final / "model.safetensors").stat().st_mtime_ns
    assert fit_tiny_model(config).model.name_or_path == str(final)
    assert (final / "model.safetensors").stat().st_mtime_ns == weights

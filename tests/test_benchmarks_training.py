"""Smoke tests of the training benchmarks' pieces that can silently make a comparison unfair:
TRL and raypo must see the same token ids in the same batches and reach the same loss from the
same weights; raypo's jobs must run the product's settings on the selected pairs; throughput
arithmetic must skip warm-up and take ratios per round."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hh_tiny  # noqa: E402
import scaling  # noqa: E402
import throughput_vs_trl as tvt  # noqa: E402

SETTINGS = tvt.Settings(pairs=4, max_length=96, warmup=1, steps=2, logging_steps=1, threads=1)


@pytest.fixture(scope="module")
def micro(raypo_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded tiny model as policy, a second seed of it as reference, and 8 HH rows."""
    from raypo.config import DataConfig
    from raypo.models import TinyModelSpec, load_tokenizer, resolve_model_path, save_tiny_model

    policy = Path(resolve_model_path("tiny"))
    reference = save_tiny_model(tmp_path_factory.mktemp("ref") / "m", TinyModelSpec(seed=1))
    tokenizer = load_tokenizer(str(policy))
    data = DataConfig(
        path=str(scaling.HH_PATH), schema="hh", max_length=96, max_prompt_length=48, max_rows=12
    )
    rows = tvt.tokenized_rows(data, tokenizer)[:8]
    return {"policy": policy, "reference": reference, "rows": rows, "tokenizer": tokenizer}


@pytest.mark.slow
def test_trl_dataloader_yields_raypo_token_ids_in_order(micro: dict, tmp_path: Path) -> None:
    trainer = tvt.trl_trainer(
        micro["policy"], micro["reference"], micro["rows"], SETTINGS, tmp_path
    )
    ours = tvt.raypo_batches(micro["rows"], SETTINGS.pairs, micro["tokenizer"].pad_token_id)
    theirs = list(trainer.get_train_dataloader())
    assert len(theirs) == len(ours) == 2
    for trl_batch, batch in zip(theirs, ours, strict=True):
        real = batch["attention_mask"].bool()
        assert torch.equal(trl_batch["attention_mask"].bool(), real)
        assert torch.equal(trl_batch["input_ids"][real], batch["input_ids"][real])
        # TRL marks completion tokens; raypo marks the positions that predict one.
        assert torch.equal(trl_batch["completion_mask"][:, 1:].bool(), batch["target_mask"][:, :-1])


@pytest.mark.slow
@pytest.mark.parametrize("pairs, accumulation", [(4, 1), (2, 2)])
def test_raypo_step_and_trl_reach_the_same_losses(
    micro: dict, pairs: int, accumulation: int
) -> None:
    settings = dataclasses.replace(SETTINGS, pairs=pairs, accumulation=accumulation)
    args = (micro["policy"], micro["reference"], micro["rows"], settings)
    trl = tvt.run_trl(*args)
    online = tvt.run_step_alone(*args, online=True)
    precomputed = tvt.run_step_alone(*args, online=False)
    # One loss per micro-step; step 2's follow one clipped AdamW step on each side.
    assert len(trl.losses) == len(online.losses) == 2 * accumulation
    assert len(trl.step_s) == len(online.step_s) == 2
    # A distinct reference makes the first loss differ from ln 2 (policy == reference).
    assert abs(trl.losses[0] - math.log(2)) > 1e-4
    for ours in (online.losses, precomputed.losses):
        assert ours == pytest.approx(trl.losses, abs=1e-5)
    assert precomputed.reference_pass_s > 0 and online.reference_pass_s == 0


def test_throughput_vs_trl_steady_rates_skip_the_warmup() -> None:
    settings = tvt.Settings(pairs=2, accumulation=2, warmup=1, steps=3, logging_steps=1)
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}] * 12
    result = tvt.steady_from_steps([9.0, 1.0, 3.0], rows, settings)
    # 4 pairs x 2 timed steps in 1 + 3 s; 8 timed rows x (2*2 + 1 + 2) tokens = 56 in 4 s.
    assert result == pytest.approx({"pairs_per_s": 2.0, "tokens_per_s": 14.0, "step_s": 2.0})
    # The first logging interval (1 step) holds 2 micro-steps.
    assert tvt.first_interval_loss([0.5, 0.7, 9.0], settings) == pytest.approx(0.6)


def test_ray_config_splits_the_global_batch_and_validates(tmp_path: Path) -> None:
    from raypo.config import config_from_dict

    data = scaling.ray_train_config(
        tmp_path / "run",
        tmp_path / "p",
        tmp_path / "r",
        workers=2,
        cpus_per_worker=1.0,
        global_batch=8,
        steps=3,
        max_length=128,
        **{"trainer.zero_stage": 3},
    )
    config = config_from_dict(data)
    assert config.trainer.per_device_batch_size == 4
    assert config.trainer.zero_stage == 3 and config.reference.mode == "precomputed"
    with pytest.raises(ValueError, match="does not split over 3 workers"):
        scaling.ray_train_config(
            tmp_path,
            tmp_path,
            tmp_path,
            workers=3,
            cpus_per_worker=1,
            global_batch=8,
            steps=1,
            max_length=64,
        )


def test_steady_throughput_reads_metrics_after_warmup(tmp_path: Path) -> None:
    from raypo.config import config_from_dict

    config = config_from_dict({"run_dir": str(tmp_path), "trainer": {"num_workers": 2}})
    lines = [
        {"step": 1, "loss": 0.69, "step_time_s": 10.0, "samples_per_s": 0.8, "tokens_per_s": 50},
        {"step": 2, "loss": 0.68, "step_time_s": 2.0, "samples_per_s": 4.0, "tokens_per_s": 1000},
        {"step": 3, "loss": 0.67, "step_time_s": 6.0, "samples_per_s": 4 / 3, "tokens_per_s": 500},
        {"step": 3, "eval/loss": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    result = scaling.steady_throughput("x", config, warmup=1, wall_s=1.0)
    # Steps 2-3: 8 + 8 pairs and 2000 + 3000 tokens in 8 s.
    assert result.pairs_per_s == pytest.approx(2.0)
    assert result.tokens_per_s == pytest.approx(625.0)
    assert result.steps_measured == 2 and result.first_loss == pytest.approx(0.69)


def test_hh_split_is_disjoint_and_fixed(raypo_cache: str) -> None:
    from raypo.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    settings = hh_tiny.Settings(test_pairs=20)
    train, test, records = hh_tiny.split_pairs(tokenizer, settings, limit=80)
    again, _, _ = hh_tiny.split_pairs(tokenizer, settings, limit=80)
    keys = {json.dumps(row, sort_keys=True) for row in train}
    assert len(test) == 20 and len(train) > 40
    assert not keys & {json.dumps(row, sort_keys=True) for row in test}
    assert train == again
    # The raw records the fit reads are the training pairs', in the same order.
    assert len(records) == len(train)
    for row, record in zip(train, records, strict=True):
        chosen = tokenizer.decode(row["chosen_ids"], skip_special_tokens=True).strip()
        assert chosen[:20] in record["chosen"], (chosen, record["chosen"])


def test_throughput_vs_trl_padding_share_counts_positions() -> None:
    rows = [
        {"prompt_ids": [1], "chosen_ids": [2] * 3, "rejected_ids": [3]},
        {"prompt_ids": [1], "chosen_ids": [2] * 7, "rejected_ids": [3] * 5},
    ]
    # Lengths 4, 2 and 8, 6: one batch pads 4 sequences to 8 = 32 positions for 20 tokens.
    assert tvt.padding_share(rows, 2) == pytest.approx(1 - 20 / 32)


def test_throughput_vs_trl_variants_name_their_results_and_defaults() -> None:
    assert tvt.variant_name(tvt.Settings()) == "throughput_vs_trl"
    assert (
        tvt.variant_name(tvt.Settings(long_tail=True, max_length=1024)) == "throughput_vs_trl_long"
    )
    assert tvt.variant_name(tvt.Settings(accumulation=4)) == "throughput_vs_trl_accum4"
    assert tvt.variant_name(tvt.Settings(max_length=1024)) == "throughput_vs_trl_len1024"
    # 100 steps (25 of the long tail), as many pairs with accumulation, >= 2 intervals.
    assert tvt.default_steps(False, 1, 5) == 100 and tvt.default_steps(False, 4, 5) == 25
    assert tvt.default_steps(True, 1, 5) == 25 and tvt.default_steps(True, 4, 5) == 10
    assert tvt.default_warmup(100, 5) == 10 and tvt.default_warmup(25, 5) == 5
    tvt.Settings().check()
    for warmup in (0, 7, 100):
        with pytest.raises(ValueError, match="multiple of logging_steps"):
            tvt.Settings(warmup=warmup).check()


def test_throughput_vs_trl_runs_the_product_config(tmp_path: Path) -> None:
    from raypo.config import config_from_dict

    settings = tvt.Settings(accumulation=4)
    config = config_from_dict(tvt.raypo_config(settings, tmp_path / "run", tmp_path, False))
    trainer, data = config.trainer, config.data
    assert (trainer.num_workers, trainer.cpus_per_worker, trainer.zero_stage) == (1, 1.5, 2)
    assert trainer.torch_adam and trainer.lr_scheduler == "constant"
    assert (trainer.per_device_batch_size, trainer.gradient_accumulation_steps) == (8, 4)
    assert (trainer.max_steps, trainer.logging_steps, trainer.save_steps) == (100, 5, 0)
    assert trainer.eval_steps == 0 and trainer.padding_free == "auto"
    assert (trainer.learning_rate, config.loss.beta, config.loss.type) == (1e-5, 0.1, "dpo")
    assert config.reference.mode == "precomputed" and config.model.dtype == "fp32"
    assert data.path == str(tmp_path / "pairs.jsonl") and data.max_rows is None
    assert not data.shuffle and data.eval_fraction == 0 and data.max_length == 512
    assert config.run_path == tmp_path / "run"


def test_throughput_vs_trl_selects_the_first_or_the_longest_pairs(
    raypo_cache: str, tmp_path: Path
) -> None:
    from raypo.config import DataConfig
    from raypo.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    data = DataConfig(
        path=str(tmp_path / "p.jsonl"), schema="hh", max_length=256, max_prompt_length=128
    )
    everything = tvt.accepted_pairs(dataclasses.replace(data, path=str(scaling.HH_PATH)), tokenizer)
    hh_lines = gzip.decompress(scaling.HH_PATH.read_bytes()).split(b"\n")
    first = tvt.select_lines(data, tokenizer, tvt.Settings(pairs=2, steps=3))
    assert first == [hh_lines[pair.row - 1] for pair in everything[:6]]
    longest = tvt.select_lines(data, tokenizer, tvt.Settings(pairs=4, steps=5, long_tail=True))
    numbers = [hh_lines.index(line) for line in longest]
    assert len(numbers) == 20 and numbers == sorted(numbers)
    Path(data.path).write_bytes(b"\n".join(longest) + b"\n")
    selected = [tvt.longest_sequence(pair) for pair in tvt.accepted_pairs(data, tokenizer)]
    threshold = sorted((tvt.longest_sequence(pair) for pair in everything), reverse=True)[19]
    assert len(selected) == 20 and min(selected) >= threshold


def test_throughput_vs_trl_tree_memory_finds_a_titled_descendant() -> None:
    # The child touches every page of 160 MiB, then idles while the sampler reads it.
    child = "import time; block = bytearray(160 * 2**20); block[:] = b'x' * len(block); "
    child += "time.sleep(1.5)"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    process = subprocess.Popen([sys.executable, "-c", parent])
    with tvt.TreeMemory(process.pid, interval=0.05) as memory:
        process.wait()
    assert memory.peak_of("bytearray") >= 160 * 2**20
    assert memory.tree_peak >= 160 * 2**20
    assert memory.processes()[0][1] >= 160
    with pytest.raises(RuntimeError, match="RayTrainWorker"):
        memory.peak_of("RayTrainWorker")


def test_throughput_vs_trl_reads_the_trained_pair_order(tmp_path: Path) -> None:
    for step, ids in ((5, ["a"]), (10, ["b", "a", "c"])):
        directory = tmp_path / "ray" / "run" / f"checkpoint_{step:06d}"
        directory.mkdir(parents=True)
        torch.save({"trained": ids}, directory / "train_state_rank0.pt")
    assert tvt.trained_pair_ids(tmp_path) == ["b", "a", "c"]


def _side_run(
    side: str, pairs_per_s: float, wall_s: float, peak: float, loss: float
) -> tvt.SideRun:
    return tvt.SideRun(
        side=side,
        pairs_per_s=pairs_per_s,
        tokens_per_s=100 * pairs_per_s,
        step_s=8 / pairs_per_s,
        wall_s=wall_s,
        process_peak_mib=peak,
        tree_peak_mib=3 * peak,
        first_loss=loss,
        same_pairs_in_order=True if side.startswith("raypo") else None,
        times_s=[],
        losses=[],
        processes=[],
    )


def test_throughput_vs_trl_ratios_are_taken_per_round_and_judged() -> None:
    rounds = [
        {
            "trl": _side_run("trl", 2.0, 400.0, 1000.0, 0.70),
            "raypo-online": _side_run("raypo-online", 7.0, 150.0, 900.0, 0.70001),
            "raypo-precomputed": _side_run("raypo-precomputed", 9.0, 210.0, 800.0, 0.70),
        },
        {
            "trl": _side_run("trl", 1.0, 500.0, 1100.0, 0.70),
            "raypo-online": _side_run("raypo-online", 3.0, 300.0, 950.0, 0.70),
            "raypo-precomputed": _side_run("raypo-precomputed", 3.0, 200.0, 850.0, 0.70),
        },
    ]
    table = tvt.summary_rows(rounds)
    online = table[1]
    # Per round 3.5x and 3x: median 3.25x, not 5 / 1.5 of the medians.
    assert online["ratio_vs_trl"] == pytest.approx(3.25)
    assert online["wall_vs_trl"] == pytest.approx((150 / 400 + 300 / 500) / 2)
    assert online["process_peak_mib"] == 950.0 and online["first_loss_gap"] == pytest.approx(1e-5)
    rows = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3, 4]}] * 16
    args = (tvt.Settings(pairs=2, steps=4, warmup=2, logging_steps=2), rows)
    lines = tvt.findings(table, *args)
    text = "\n".join(lines)
    assert "online reference: 3.25x TRL's pairs/s in the steady state (target >= 3x: met)" in text
    assert (
        "precomputed reference: 3.75x TRL's pairs/s in the steady state (target >= 4x: NOT" in text
    )
    assert "precomputed reference: 205 s against TRL's 450 s (0.46x; target <= 0.5x: met)" in text
    assert "Peak RSS: raypo's Ray Train worker 950 MiB against TRL's process 1100 MiB" in text
    assert "in TRL's order: True" in text and "C++" not in text
    rounds[1]["raypo-online"] = dataclasses.replace(rounds[1]["raypo-online"], compiled=True)
    table = tvt.summary_rows(rounds)
    assert table[1]["compiled_runs"] == 1
    assert "1 raypo train job(s) ran the C++ compiler" in "\n".join(tvt.findings(table, *args))


def test_hh_tiny_matches_each_objective_to_dpos_initial_strength() -> None:
    settings = hh_tiny.Settings()
    rows = [{"ref_hn_chosen": hn, "ref_hn_rejected": hn / 2} for hn in (0.05, 0.2, 0.4, 0.7, 0.9)]
    weights = hh_tiny.dispersion_weights(rows, settings)
    # MallowsPO-theta's loss is DPO's with beta w(x): matched, its beta is beta / mean w.
    theta = hh_tiny.matched_beta("mallows_theta", 0.1, weights, settings)
    assert theta == pytest.approx(0.1 / float(weights.mean()), rel=1e-9)
    assert hh_tiny.matched_beta("mixdpo", 0.1, weights, settings) == pytest.approx(0.1, rel=1e-6)
    target = hh_tiny.initial_slope("dpo", 0.1, weights, settings)
    assert target == pytest.approx(0.05, rel=1e-9)
    phi = hh_tiny.matched_beta("mallows_phi", 0.1, weights, settings)
    assert hh_tiny.initial_slope("mallows_phi", phi, weights, settings) == pytest.approx(target)


def _run(objective: str, seed: int, margins: list[float]) -> hh_tiny.RunResult:
    return hh_tiny.RunResult(objective, seed, 0.1, 0.1, margins, 0.6, None, 1, 0.0)


def test_hh_tiny_paired_difference_covers_seeds_and_test_pairs() -> None:
    dpo = [_run("dpo", s, [1.0, -1.0, 1.0, -1.0]) for s in range(3)]
    same = hh_tiny.paired_difference(
        [_run("x", s, [1.0, -1.0, 1.0, -1.0]) for s in range(3)], dpo, 200
    )
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0)
    # One more pair right in every seed: +25 points, and the pair resampling widens the interval.
    better = hh_tiny.paired_difference(
        [_run("x", s, [1.0, 1.0, 1.0, -1.0]) for s in range(3)], dpo, 500
    )
    assert better.mean == pytest.approx(0.25) and better.n == 3
    assert better.low < 0.25 < better.high and better.low >= 0.0


def test_hh_tiny_quintiles_split_the_test_pairs_by_reference_entropy() -> None:
    test = [{"ref_hn_chosen": v, "ref_hn_rejected": v} for v in [0.9, 0.1, 0.5, 0.3, 0.7] * 2]
    assert hh_tiny.dispersion_quintiles(test) == [4, 0, 2, 1, 3] * 2

"""Smoke tests of the training benchmarks' pieces that can silently make a comparison unfair:
TRL and raypo must see the same token ids in the same batches and reach the same loss from the
same weights; throughput arithmetic must skip warm-up and amortise the reference pass."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hh_tiny  # noqa: E402
import scaling  # noqa: E402
import throughput_vs_trl as tvt  # noqa: E402

SETTINGS = tvt.Settings(pairs=4, max_length=96, warmup=1, steps=1, threads=1)


@pytest.fixture(scope="module")
def micro(raypo_cache: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The embedded tiny model as policy, a second seed of it as reference, and 8 HH rows."""
    from raypo.models import TinyModelSpec, load_tokenizer, resolve_model_path, save_tiny_model

    policy = Path(resolve_model_path("tiny"))
    reference = save_tiny_model(tmp_path_factory.mktemp("ref") / "m", TinyModelSpec(seed=1))
    tokenizer = load_tokenizer(str(policy))
    rows = tvt.tokenized_rows(tokenizer, 2 * SETTINGS.pairs, SETTINGS.max_length)
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
def test_raypo_and_trl_reach_the_same_loss_on_steps_1_and_2(micro: dict) -> None:
    args = (micro["policy"], micro["reference"], micro["rows"], SETTINGS)
    trl = tvt.run_trl(*args)
    online = tvt.run_raypo(*args, online=True)
    precomputed = tvt.run_raypo(*args, online=False)
    assert len(trl.losses) == len(online.losses) == 2
    # A distinct reference makes the first loss differ from ln 2 (policy == reference).
    assert abs(trl.losses[0] - math.log(2)) > 1e-4
    # Step 2 follows one clipped AdamW step on each side.
    for ours in (online.losses, precomputed.losses):
        assert ours == pytest.approx(trl.losses, abs=1e-5)
    assert precomputed.reference_pass_s > 0 and online.reference_pass_s == 0


def test_steady_skips_warmup_and_amortises_the_reference_pass() -> None:
    settings = tvt.Settings(pairs=2, warmup=1, steps=2)
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}] * 6
    run = tvt.SideRun("raypo-precomputed", [9.0, 1.0, 3.0], [0.7] * 3, 6.0, 1.0, 2.0)
    result = tvt.steady(run, settings, rows)
    # 2 pairs x 2 timed steps in 1 + 3 s; 4 timed rows x (2*2 + 1 + 2) tokens = 28 in 4 s.
    assert result["pairs_per_s"] == pytest.approx(1.0)
    assert result["tokens_per_s"] == pytest.approx(7.0)
    # Mean step 2 s + 6 s pass / 3 steps = 4 s per 2 pairs.
    assert result["pairs_per_s_with_pass"] == pytest.approx(0.5)


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
    train, test = hh_tiny.split_pairs(tokenizer, settings, limit=80)
    again, _ = hh_tiny.split_pairs(tokenizer, settings, limit=80)
    keys = {json.dumps(row, sort_keys=True) for row in train}
    assert len(test) == 20 and len(train) > 40
    assert not keys & {json.dumps(row, sort_keys=True) for row in test}
    assert train == again


def test_bucketed_prototype_matches_one_step_on_the_whole_batch(micro: dict) -> None:
    from raypo.config import LossConfig
    from raypo.forward import reference_columns
    from raypo.models import load_policy
    from raypo.step import preference_step

    pad = micro["tokenizer"].pad_token_id
    rows = micro["rows"][:4]
    reference, _ = load_policy(str(micro["reference"]), "fp32")
    batch = tvt.raypo_batches(rows, 4, pad)[0]
    columns = reference_columns(reference, batch)
    config = LossConfig(type="dpo", beta=0.1)
    gradients = []
    for bucketed in (False, True):
        model, _ = load_policy(str(micro["policy"]), "fp32")
        if bucketed:
            rows_with_ref = tvt.with_reference_values(rows, columns)
            loss = tvt.bucketed_step(model, rows_with_ref, config, pad, groups=3)
        else:
            result = preference_step(model, batch | columns, config)
            result.loss.backward()
            loss = float(result.loss.detach())
        gradients.append((loss, [p.grad for p in model.parameters()]))
    (whole, whole_grads), (bucketed, bucketed_grads) = gradients
    assert bucketed == pytest.approx(whole, abs=1e-6)
    for ours, theirs in zip(bucketed_grads, whole_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_length_groups_sort_pairs_by_their_longer_sequence() -> None:
    rows = [
        {"prompt_ids": [1] * p, "chosen_ids": [2] * c, "rejected_ids": [3] * r}
        for p, c, r in [(1, 9, 1), (1, 1, 2), (2, 3, 1), (1, 1, 1), (1, 2, 6)]
    ]
    # Longer sequences 10, 3, 5, 2, 7: sorted 3, 1, 2, 4, 0; five pairs in 2 groups of 3 + 2.
    assert tvt.length_groups(rows, 2) == [[3, 1, 2], [4, 0]]
    assert tvt.length_groups(rows[:2], 4) == [[1], [0]]


def test_padding_share_counts_positions_per_group() -> None:
    rows = [
        {"prompt_ids": [1], "chosen_ids": [2] * 3, "rejected_ids": [3]},
        {"prompt_ids": [1], "chosen_ids": [2] * 7, "rejected_ids": [3] * 5},
    ]
    # Lengths 4, 2 and 8, 6: one group pads 4 sequences to 8 = 32 positions for 20 tokens; a
    # micro-batch per pair pads 2 x 4 + 2 x 8 = 24.
    assert tvt.padding_share(rows, 2) == pytest.approx(1 - 20 / 32)
    assert tvt.padding_share(rows, 2, groups=2) == pytest.approx(1 - 20 / 24)
    # A pair's chosen and rejected share a micro-batch: lengths 2, 8 and 4, 6 pad to
    # 2 x 6 + 2 x 8 = 28, not the 24 of sorting the sequences on their own.
    crossed = [
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3] * 7},
        {"prompt_ids": [1], "chosen_ids": [2] * 3, "rejected_ids": [3] * 5},
    ]
    assert tvt.padding_share(crossed, 2, groups=2) == pytest.approx(1 - 20 / 28)

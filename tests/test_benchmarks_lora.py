"""Smoke tests of ``benchmarks/lora_vs_full.py``'s pieces that could make its comparison unfair
or misread: the two sides' jobs differ in ``model.lora`` alone, the parameter counts are those of
the policy a worker builds, the optimizer state is read from DeepSpeed's file, the sides' order
rotates and the ratios are taken per round. No training here: the script's ``--quick`` runs it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import lora_vs_full as lvf  # noqa: E402
import throughput_vs_trl as tvt  # noqa: E402

SETTINGS = tvt.Settings(pairs=4, max_length=96, warmup=5, steps=10)


def test_the_two_jobs_differ_in_the_lora_section_alone(tmp_path: Path) -> None:
    from raypo.config import config_from_dict

    full, lora = (
        config_from_dict(lvf.side_config(side, SETTINGS, tmp_path / side, tmp_path))
        for side in lvf.SIDES
    )
    assert not full.model.lora.enabled
    assert lora.model.lora.enabled and lora.model.lora.rank == 16
    assert lora.model.lora.alpha == 32.0 and lora.model.lora.target_modules == ["all-linear"]
    same_model = dataclasses.replace(lora.model, lora=full.model.lora)
    assert dataclasses.replace(lora, model=same_model, name=full.name, run_dir=full.run_dir) == full
    # one reference pass for every run: the cache is shared and its fingerprint is the same
    assert full.reference.mode == "precomputed"
    assert full.reference_cache_path == lora.reference_cache_path == tmp_path / "reference-cache"


def test_parameter_counts_are_those_of_the_adapted_policy(raypo_cache: str) -> None:
    """The tiny model (2 blocks of hidden 64, heads 2 x 32, FFN 128): rank r adds r x (in + out)
    per linear layer, r x (4 x (64 + 64) + 2 x (64 + 128) + (128 + 64)) = r x 1,088 per block."""
    from raypo.config import load_config

    full = lvf.parameter_counts(load_config(None))
    lora = lvf.parameter_counts(load_config(None, ["--model.lora.enabled=true"]))
    assert full["trainable_params"] == full["total_params"]
    assert lora["trainable_params"] == 16 * 1088 * 2
    assert lora["total_params"] == full["total_params"] + lora["trainable_params"]


def test_checkpoint_sizes_read_the_last_checkpoint_s_optimizer_files(tmp_path: Path) -> None:
    for name, size in (("checkpoint_000000", 5), ("checkpoint_000001", 7)):
        engine = tmp_path / "ray" / "run" / name / "engine"
        engine.mkdir(parents=True)
        (engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"o" * size)
        (engine / "mp_rank_00_model_states.pt").write_bytes(b"m" * 3)
    assert lvf.checkpoint_sizes(tmp_path) == (7, 10)
    with pytest.raises(RuntimeError, match="no checkpoint"):
        lvf.checkpoint_sizes(tmp_path / "elsewhere")


def test_the_order_rotates_and_ratios_are_taken_per_round() -> None:
    assert [lvf.round_order(r) for r in (1, 2, 3)] == [
        ["full", "lora"],
        ["lora", "full"],
        ["full", "lora"],
    ]

    def run(side: str, pairs_per_s: float, peak: float) -> lvf.SideRun:
        return lvf.SideRun(
            side, pairs_per_s, 100 * pairs_per_s, 60.0, peak, 2 * peak, 1.0, 2.0, 0.7
        )

    # a loaded second round halves both sides: the per-round ratios stay 1.5 and 2.0
    rounds = [
        {"full": run("full", 4.0, 900), "lora": run("lora", 6.0, 850)},
        {"lora": run("lora", 4.0, 860), "full": run("full", 2.0, 910)},
    ]
    counts = {
        "full": {"trainable_params": 100, "total_params": 100},
        "lora": {"trainable_params": 5, "total_params": 105},
    }
    rows = {row["key"]: row for row in lvf.summary_rows(rounds, counts)}
    assert rows["lora"]["pairs_per_s_vs_full"] == pytest.approx(1.75)
    assert rows["full"]["pairs_per_s_vs_full"] == 1.0
    assert (rows["lora"]["worker_peak_mib"], rows["full"]["worker_peak_mib"]) == (860, 910)
    assert rows["lora"]["trainable_share"] == pytest.approx(5 / 105)
    assert "LoRA trains 5 of 105 parameters (4.76%)" in lvf.findings(list(rows.values()))[0]


def test_quick_mode_is_a_valid_small_run() -> None:
    args = lvf._parse_args(["--quick", "--out", "/tmp/x"])
    settings = lvf.settings_from(args)
    assert (settings.pairs, settings.steps, settings.warmup, args.rounds) == (4, 10, 5, 1)
    assert lvf.settings_from(lvf._parse_args([])).steps == 100

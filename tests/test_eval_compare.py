"""Runs side by side (raypo.eval.compare, ``raypo report RUN_A RUN_B``) and the held-out pairs'
dispersion buckets (raypo.eval.heldout), on synthetic run directories: config.yaml by
save_config, metrics.jsonl and heldout_pairs.jsonl by tests/synthetic_runs.py. No Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from synthetic_runs import REFERENCE_HN, png_size, table_rows, write_heldout_pairs, write_metrics

from raypo.cli import main as cli_main
from raypo.config import config_from_dict, save_config
from raypo.eval.compare import default_output
from raypo.eval.heldout import dispersion_buckets, last_evaluation

COMPARISON_PLOTS = (
    "training_curves.png",
    "policy_dynamics.png",
    "dispersion_buckets.png",
    "implicit_rewards.png",
)

DPO_MARGINS = [0.2, 0.1, 0.1, -0.1, 0.0, 0.1, -0.3, 0.2, -0.1, -0.1]
"""Per quintile of REFERENCE_HN (pairs p0, p1 | p2, p3 | ...): accuracy 100%, 50%, 50%, 50%, 0%."""
MALLOWS_MARGINS = [0.4, 0.3, 0.2, 0.1, 0.1, -0.1, 0.2, 0.1, 0.1, -0.2]
"""Per quintile: accuracy 100%, 100%, 50%, 100%, 50%."""


def _run(root: Path, name: str, loss_type: str, margins: list[float], shift: float) -> Path:
    run = root / name
    config = config_from_dict(
        {
            "name": "quickstart",
            "run_dir": str(run),
            "model": {"name_or_path": "test-org/tiny-model"},
            "loss": {"type": loss_type, "beta": 0.1, "dispersion_scale": 0.29},
            "trainer": {"max_steps": 8, "eval_steps": 4},
            "eval": {"during_training_num_prompts": 8},
        }
    )
    save_config(config, run / "config.yaml")
    write_metrics(run, shift=shift)
    write_heldout_pairs(run, {4: [0.0] * 10, 8: margins})
    return run


def test_last_evaluation_takes_the_last_step_once_per_pair() -> None:
    """A pair written twice at the last step (a resumed run) counts once, with its last line."""
    records = [
        {"step": 4, "id": "b", "reward_chosen": 9.0, "reward_rejected": 0.0},
        {"step": 8, "id": "b", "reward_chosen": 1.0, "reward_rejected": 0.5, "policy_hn": 0.4},
        {"step": 8, "id": "a", "reward_chosen": 0.0, "reward_rejected": 0.5, "policy_hn": 0.6},
        {"step": 8, "id": "b", "reward_chosen": 2.0, "reward_rejected": 0.5, "policy_hn": 0.4},
    ]
    held_out = last_evaluation(records)
    assert held_out is not None and held_out.step == 8 and held_out.ids == ["a", "b"]
    np.testing.assert_array_equal(held_out.margins, [-0.5, 1.5])
    np.testing.assert_array_equal(held_out.policy_hn, [0.6, 0.4])
    assert held_out.reference_hn is None
    assert last_evaluation([]) is None
    with pytest.raises(ValueError, match="no reference entropies"):
        dispersion_buckets(held_out)


def test_dispersion_buckets_are_the_quintiles_of_the_reference_entropy() -> None:
    """REFERENCE_HN puts two pairs in each quintile (its docstring); the accuracies are those of
    DPO_MARGINS' docstring, a zero margin counting as wrong."""
    rows = [
        {"step": 1, "id": f"p{i}", "reward_chosen": m, "reward_rejected": 0.0, "reference_hn": hn}
        for i, (m, hn) in enumerate(zip(DPO_MARGINS, REFERENCE_HN, strict=True))
    ]
    buckets = dispersion_buckets(last_evaluation(rows))
    assert [b.pairs for b in buckets] == [2] * 5
    assert [(b.hn_low, b.hn_high) for b in buckets] == [
        (0.1, 0.2), (0.3, 0.4), (0.5, 0.6), (0.7, 0.8), (0.9, 1.0)
    ]  # fmt: skip
    assert [b.accuracy for b in buckets] == [1.0, 0.5, 0.5, 0.5, 0.0]
    # Q4 holds -0.3 and 0.2: mean -0.05, s.e. = sample std / sqrt 2 = |a - b| / 2 = 0.25.
    assert buckets[3].margin_mean == pytest.approx(-0.05)
    assert buckets[3].margin_sem == pytest.approx(0.25)


def test_report_of_two_runs_writes_the_comparison_beside_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dpo = _run(tmp_path, "dpo-run", "dpo", DPO_MARGINS, shift=0.0)
    mallows = _run(tmp_path, "mallows-run", "mallows_theta", MALLOWS_MARGINS, shift=0.0625)
    assert cli_main(["report", str(dpo), str(mallows)]) == 0
    report = tmp_path / "compare-dpo-run-vs-mallows-run" / "report.md"
    assert capsys.readouterr().out.strip() == str(report)
    assert default_output([dpo, mallows]) == report.parent
    text = report.read_text()
    for name in COMPARISON_PLOTS:
        width, height = png_size(report.parent / "plots" / name)
        assert width >= 800 and height >= 300, name
        assert f"](plots/{name})" in text, name
    labels = ["dpo-run (dpo)", "mallows-run (mallows_theta)"]
    assert text.startswith(f"# raypo comparison: {labels[0]} vs {labels[1]}")
    headline = {row[0]: row[1:] for row in table_rows(text, "| quantity |")}
    assert headline["objective"] == [
        "dpo, beta 0.1",
        "mallows_theta, beta 0.1, dispersion scale 0.29",
    ]
    # write_metrics: held-out accuracy 0.5625 + shift, entropy 0.5 - 0.08 + shift at step 8.
    assert headline["held-out implicit-reward accuracy"] == ["56.2% (step 8)", "62.5% (step 8)"]
    assert headline["policy entropy Hn, held-out"] == [
        "0.42 (step 8; reference 0.55)", "0.4825 (step 8; reference 0.55)"
    ]  # fmt: skip
    assert headline["held-out accuracy, lowest / highest Hn(x) quintile"] == [
        "100.0% / 0.0%", "100.0% / 50.0%"
    ]  # fmt: skip
    quintiles = table_rows(text, "| quintile | Hn(x) range | pairs |")
    accuracy = [[row[3], row[5]] for row in quintiles]
    assert accuracy == [
        ["100.0%", "100.0%"], ["50.0%", "100.0%"], ["50.0%", "50.0%"], ["50.0%", "100.0%"],
        ["0.0%", "50.0%"],
    ]  # fmt: skip
    assert all(row[1:3] == [f"{lo:.3f}-{hi:.3f}", "2"] for row, lo, hi in _ranges(quintiles))
    missing = text.split("## Missing\n", 1)[1]
    assert f"**Reward-model scores**: {labels[0]}: no {dpo / 'eval' / 'samples.jsonl'}" in missing
    assert "Policy entropy" not in missing and "dispersion bucket" not in missing


def _ranges(rows: list[list[str]]) -> list[tuple[list[str], float, float]]:
    return [(row, REFERENCE_HN[2 * i], REFERENCE_HN[2 * i + 1]) for i, row in enumerate(rows)]


def test_a_run_without_the_new_records_is_compared_with_what_it_has(tmp_path: Path) -> None:
    """A run trained before the held-out pairs and the entropy were recorded: its curves are
    drawn, the rest is listed as missing under its label; --out chooses the directory."""
    dpo = _run(tmp_path, "new", "dpo", DPO_MARGINS, shift=0.0)
    old = tmp_path / "old"
    save_config(
        config_from_dict({"run_dir": str(old), "loss": {"type": "mixdpo"}}), old / "config.yaml"
    )
    write_metrics(old, dynamics=False)
    out = tmp_path / "side-by-side"
    assert cli_main(["report", str(dpo), str(old), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    missing = text.split("## Missing\n", 1)[1]
    assert "**Policy entropy over training**: old (mixdpo): metrics.jsonl has no" in missing
    assert (
        f"**Accuracy by dispersion bucket**: old (mixdpo): no heldout_pairs.jsonl in {old}"
        in missing
    )
    assert (
        "**Completion length over training**: old (mixdpo): no completions were sampled" in missing
    )
    quintiles = table_rows(text, "| quintile | Hn(x) range | pairs |")
    assert len(quintiles) == 5 and len(quintiles[0]) == 5  # only the run that has them
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(COMPARISON_PLOTS)


def test_settings_and_out_are_refused_where_they_do_not_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _run(tmp_path, "a", "dpo", DPO_MARGINS, shift=0.0)
    second = _run(tmp_path, "b", "dpo", DPO_MARGINS, shift=0.0)
    with pytest.raises(SystemExit) as caught:
        cli_main(["report", str(first), str(second), "--loss.beta", "0.2"])
    assert caught.value.code == 2
    assert "give them with a single RUN_DIR" in capsys.readouterr().err
    assert cli_main(["report", str(first), "--out", str(tmp_path / "x")]) == 2
    assert "--out is for a comparison" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_reward_model_figure_without_baseline_scores(tmp_path: Path) -> None:
    """Samples scored for the policy only: the histogram shows the policy's scores and leaves
    the baseline out instead of failing."""
    from types import SimpleNamespace

    from raypo.eval.compare import LabelledRun, reward_model_figure

    samples = [{"policy_reward": value, "baseline_reward": None} for value in (0.5, 1.0, 2.0)]
    run = SimpleNamespace(samples=samples, results={"baseline": "reference"})
    missing: list[tuple[str, str]] = []
    path = reward_model_figure([LabelledRun("dpo", run, 0)], tmp_path / "rm.png", missing)
    assert path is not None and path.is_file() and missing == []

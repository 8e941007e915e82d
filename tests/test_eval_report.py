"""The run report (raypo.eval.report): plots and report.md from a synthetic run directory.

The run directory is written with the real writers where they exist (save_config, the MixDPO
strength summary of raypo.train.export, Parquet at the path the reference pass uses) and
hand-made files where the writer is ``raypo eval`` (results.json and samples.jsonl as the
evaluation contract describes them). No Ray cluster is started.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats
from synthetic_runs import png_size, table_rows, write_heldout_pairs, write_metrics

from raypo.cli import main as cli_main
from raypo.config import RaypoConfig, config_from_dict, save_config
from raypo.data.reference import COMPLETE_MARKER, reference_fingerprint
from raypo.eval import plots
from raypo.eval.report import build_report
from raypo.mixdpo import StrengthDistribution
from raypo.train.export import export_strength, strength_summary

ALL_PLOTS = (
    "training_curves.png",
    "policy_dynamics.png",
    "dispersion_buckets.png",
    "implicit_rewards.png",
    "dispersion.png",
    "mixdpo_beta.png",
    "rewards.png",
    "groups.png",
)

GROUPS = {
    "harmless": {"accuracy": 0.75, "margin_mean": 0.125, "margin_std": 0.5, "pairs": 8},
    "helpful": {"accuracy": 0.5, "margin_mean": -0.03125, "margin_std": 0.25, "pairs": 6},
    "other": {"accuracy": 0.4, "margin_mean": -0.2, "margin_std": 0.3, "pairs": 5},
}
OVERALL = {"accuracy": 0.5789, "margin_mean": 0.0, "margin_std": 0.4, "pairs": 19}


def _config(run: Path, loss_type: str, reference_mode: str = "precomputed") -> RaypoConfig:
    # A hub-id-like model name: the fingerprint uses it as a string, nothing is built or loaded.
    return config_from_dict(
        {
            "name": "synthetic",
            "run_dir": str(run),
            "model": {"name_or_path": "test-org/tiny-model"},
            "loss": {"type": loss_type, "beta": 0.1, "dispersion_scale": 0.29},
            "reference": {"mode": reference_mode},
            "trainer": {"max_steps": 8},
        }
    )


FINAL_MARGINS = [0.3, -0.1, 0.2, 0.2, -0.4, 0.1, 0.5, 0.3, 0.0, -0.2]
"""Held-out margins of pairs p0..p9 at the last evaluation (step 8): two per quintile of
synthetic_runs.REFERENCE_HN. Per quintile (accuracy: margins > 0; s.e. = sample std / sqrt 2 =
|a - b| / 2): Q1 50%, mean 0.1, s.e. 0.2; Q2 100%, 0.2, 0; Q3 50%, -0.15, 0.25; Q4 100%, 0.4,
0.1; Q5 0% (a zero margin is not a win), -0.1, 0.1."""

QUINTILES = [
    ("0.100-0.200", 0.5, 0.1, 0.2),
    ("0.300-0.400", 1.0, 0.2, 0.0),
    ("0.500-0.600", 0.5, -0.15, 0.25),
    ("0.700-0.800", 1.0, 0.4, 0.1),
    ("0.900-1.000", 0.0, -0.1, 0.1),
]
"""(Hn(x) range, accuracy, mean margin, its standard error) per quintile of FINAL_MARGINS."""


def _reference_pass(config: RaypoConfig, name: str | None = None) -> dict[str, np.ndarray]:
    """Parquet ref_hn_* columns where the reference pass of ``config`` lives; returns Hn(x)."""
    directory = config.reference_cache_path / (name or reference_fingerprint(config)[:16])
    rng = np.random.default_rng(0)
    hn_pairs = {}
    for split, pairs in (("train", 40), ("eval", 10)):
        chosen, rejected = rng.uniform(0.4, 0.8, pairs), rng.uniform(0.4, 0.8, pairs)
        table = pa.table({"id": np.arange(pairs), "ref_hn_chosen": chosen.astype(np.float32)})
        table = table.append_column("ref_hn_rejected", pa.array(rejected.astype(np.float32)))
        (directory / split).mkdir(parents=True)
        pq.write_table(table, directory / split / "part-0.parquet")
        hn_pairs[split] = (chosen.astype(np.float32) + rejected.astype(np.float32)) / 2
    (directory / COMPLETE_MARKER).touch()
    return hn_pairs


def _results(reward_model: str | None, groups: dict[str, Any]) -> dict[str, Any]:
    side = {"mean_tokens": 21.5, "distinct_1": 0.41, "distinct_2": 0.77, "generations_per_s": 3.0}
    win = {"value": 0.625, "ci_low": 0.55, "ci_high": 0.7, "confidence_level": 0.95}
    win.update({"ties": 0.0625, "num_pairs": 16, "bootstrap_samples": 1000})
    rewards = {"policy": {"mean": 0.3, "std": 1.0}, "baseline": {"mean": -0.1, "std": 1.1}}
    return {
        "policy": "final",
        "baseline": "reference",
        "reference": "test-org/tiny-model",
        "backend": "hf",
        "backend_reason": "vllm is not installed",
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 32, "n": 1, "seed": 0},
        "num_prompts": 16,
        "num_samples": 16,
        "generation": {"policy": side, "baseline": {**side, "mean_tokens": 19.25}},
        "kl": {"mean": 1.234, "std_error": 0.05, "num_samples": 16},
        "reward_model": reward_model,
        "rewards": rewards if reward_model else None,
        "win_rate": win if reward_model else None,
        "implicit_reward": {"overall": OVERALL, "groups": groups},
        "seconds": {"sampling": 4.0, "scoring": 1.0, "total": 5.0},
    }


def _eval_files(eval_dir: Path, reward_model: str | None, groups: dict[str, Any]) -> None:
    eval_dir.mkdir(parents=True)
    (eval_dir / "results.json").write_text(json.dumps(_results(reward_model, groups)))
    rng = np.random.default_rng(1)
    lines = []
    for index in range(16):
        scores = rng.normal(0.3, 1.0), rng.normal(-0.1, 1.1)
        lines.append(
            {
                "prompt_id": f"p{index}",
                "prompt": "Human: hi\n\nAssistant:",
                "group": list(GROUPS)[index % 3],
                "sample_index": 0,
                "policy_completion": "hello",
                "baseline_completion": "hi",
                "policy_tokens": 2,
                "baseline_tokens": 1,
                "policy_reward": float(scores[0]) if reward_model else None,
                "baseline_reward": float(scores[1]) if reward_model else None,
                "policy_logp": -3.0,
                "reference_logp": -4.0,
            }
        )
    (eval_dir / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lines))


@pytest.fixture
def full_run(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A finished mixdpo run with the reference pass, the strength json and eval results."""
    run = tmp_path / "run"
    config = _config(run, "mixdpo")
    save_config(config, run / "config.yaml")
    write_metrics(run)
    write_heldout_pairs(run, {4: [0.0] * 10, 8: FINAL_MARGINS})
    hn_pairs = _reference_pass(config)
    export_strength(StrengthDistribution("lognormal", mean=0.1, cv=0.7), run / "final")
    _eval_files(run / "eval", "test-org/reward", GROUPS)
    return run, hn_pairs


def _section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_full_report_has_every_plot_and_the_numbers(full_run: tuple[Path, Any]) -> None:
    run, hn_pairs = full_run
    report = build_report(run)
    assert report == run / "eval" / "report.md"
    for name in ALL_PLOTS:
        width, height = png_size(run / "eval" / "plots" / name)
        assert width >= 400 and height >= 300, name
        assert (run / "eval" / "plots" / name).stat().st_size > 10_000, name
    text = report.read_text()
    for name in ALL_PLOTS:
        assert f"](plots/{name})" in text, name
    assert "# raypo report: synthetic" in text and "mixdpo" in text
    # 0.625 / 0.55 / 0.7 / 0.0625 of results.json, as percentages with one decimal.
    assert "62.5% (95% CI 55.0% to 70.0%; ties 6.2%; 16 pairs)" in text
    assert "1.234 nats per completion (± 0.05 standard error; 16 completions)" in text
    assert "| Mean completion tokens, policy / baseline | 21.5 / 19.25 |" in text
    assert "57.9% (19 pairs, results.json)" in text  # overall accuracy 0.5789
    assert "| Reference likelihood accuracy (held-out) | 62.5% (step 8) |" in text
    assert "hf (vllm is not installed)" in text
    # The caption's means of w(x) = -0.29 ln Hn(x), computed here from the same Hn values.
    for split, hn in hn_pairs.items():
        assert f"{split} {float(np.mean(-0.29 * np.log(hn))):.4g}" in text
    assert _section(text, "Missing").strip() == "Nothing."
    _check_group_table(text)
    _check_quintile_table(text)
    # The last held-out evaluation's entropy 0.5 - 0.01 * 8 and the reference's 0.55.
    assert (
        "| Policy entropy Hn on the held-out completions | 0.42 (step 8; reference 0.55) |" in text
    )
    assert "| Mean tokens of the completions sampled during training | 28 (step 8) |" in text


def _check_quintile_table(text: str) -> None:
    """One row per quintile with the numbers worked out in FINAL_MARGINS' docstring."""
    rows = table_rows(text, "| quintile | Hn(x) range | pairs |")
    assert [row[0] for row in rows] == ["Q1", "Q2", "Q3", "Q4", "Q5"]
    for row, (hn_range, accuracy, margin, sem) in zip(rows, QUINTILES, strict=True):
        assert row[1:3] == [hn_range, "2"]
        assert float(row[3].rstrip("%")) / 100 == pytest.approx(accuracy)
        mean, _, error = row[4].partition(" ± ")
        assert float(mean) == pytest.approx(margin, abs=1e-12)
        assert float(error) == pytest.approx(sem, abs=1e-12)


def _check_group_table(text: str) -> None:
    """The per-group table has one row per group of results.json, then overall, same numbers."""
    rows = table_rows(text, "| group | pairs |")
    expected = {**GROUPS, "**overall**": OVERALL}
    assert [row[0] for row in rows] == list(expected)
    for name, pairs, accuracy, margin_mean, margin_std in rows:
        stats = expected[name]
        assert int(pairs) == stats["pairs"]
        assert float(accuracy.rstrip("%")) / 100 == pytest.approx(stats["accuracy"], abs=5e-4)
        assert float(margin_mean) == pytest.approx(stats["margin_mean"], rel=1e-3)
        assert float(margin_std) == pytest.approx(stats["margin_std"], rel=1e-3)


def test_no_reward_model_and_no_groups(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config(run, "mallows_theta")
    save_config(config, run / "config.yaml")
    _reference_pass(config)
    _eval_files(run / "eval", None, {})
    results = json.loads((run / "eval" / "results.json").read_text())
    results["kl"]["std_error"] = None  # what raypo eval writes for a single prompt
    results["generation"]["baseline"]["distinct_2"] = None
    (run / "eval" / "results.json").write_text(json.dumps(results))
    text = build_report(run).read_text()
    assert "1.234 nats per completion (standard error n/a (one prompt); 16 completions)" in text
    assert "| distinct-2, policy / baseline | 0.77 / n/a (not computed) |" in text
    reason = "no reward model configured (eval.reward_model is null)"
    assert f"| Win rate vs baseline | n/a ({reason}) |" in text
    assert f"**Reward distributions**: {reason}" in _section(text, "Missing")
    assert "**Per-group bar plot**: 0 group(s)" in text
    assert [row[0] for row in table_rows(text, "| group | pairs |")] == ["**overall**"]
    assert "the weight the loss applied to each pair" in text
    assert f"**Training curves**: no metrics.jsonl in {run}" in text
    assert "| Held-out implicit-reward accuracy (policy vs reference) | 57.9% (19 pairs" in text
    assert "| Reference likelihood accuracy (held-out) | n/a (eval/reference/accuracies" in text


def test_reference_pass_found_when_the_fingerprint_changed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = _config(run, "dpo")
    save_config(config, run / "config.yaml")
    _reference_pass(config, name="0123456789abcdef")
    text = build_report(run).read_text()
    assert (run / "eval" / "plots" / "dispersion.png").is_file()
    assert "used the only pass there, 0123456789abcdef" in _section(text, "Notes")
    assert "not used by loss dpo" in text
    _reference_pass(config, name="fedcba9876543210")
    missing = _section(build_report(run).read_text(), "Missing")
    assert "**Dispersion histogram**: no reference pass" in missing
    assert "(found 2 complete passes)" in missing


@pytest.mark.parametrize(
    ("family", "cv"), [("lognormal", 0.5), ("lognormal", 1.5), ("gamma", 0.5), ("gamma", 0.9)]
)
def test_strength_density_matches_the_closed_form(family: str, cv: float) -> None:
    summary = strength_summary(StrengthDistribution(family, mean=0.1, cv=cv))
    a, b = summary["a"], summary["b"]
    grid = plots.strength_grid(family, a, b)
    density = plots.strength_density(family, a, b, grid)
    reference = (
        scipy.stats.lognorm.pdf(grid, s=b, scale=math.exp(a))
        if family == "lognormal"
        else scipy.stats.gamma.pdf(grid, a, scale=b)
    )
    np.testing.assert_allclose(density, reference, rtol=1e-9, atol=1e-12)
    # Trapezoid rule on 2001 points; the grid's uncovered tail mass is < 1e-4 (scipy cdf).
    assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
    mean = np.trapezoid(grid * density, grid)
    assert mean == pytest.approx(summary["moments"]["mean"], rel=2e-3)


def test_cli_report_lists_missing_inputs_and_rejects_bad_run_dirs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    save_config(_config(run, "dpo", reference_mode="online"), run / "config.yaml")
    write_metrics(run, dynamics=False)
    assert cli_main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "eval" / "report.md")
    text = (run / "eval" / "report.md").read_text()
    assert sorted(p.name for p in (run / "eval" / "plots").iterdir()) == ["training_curves.png"]
    missing = _section(text, "Missing")
    assert "**Dispersion histogram**: not available: reference.mode is online" in missing
    assert "**Learned MixDPO beta distribution**: loss.type is dpo" in missing
    assert f"**Reward distributions**: no {run / 'eval' / 'results.json'}" in missing
    assert "**Per-group table**: no " in missing
    assert "| Win rate vs baseline | n/a (no results.json: run `raypo eval`) |" in text

    no_metrics = tmp_path / "no-metrics"
    save_config(_config(no_metrics, "dpo"), no_metrics / "config.yaml")
    assert cli_main(["report", str(no_metrics)]) == 1
    assert re.search(r"has no metrics\.jsonl; pass a run directory", capsys.readouterr().err)
    # No config.yaml: the CLI fails while loading the config, before the report runs.
    assert cli_main(["report", str(tmp_path / "absent")]) == 2
    assert "config.yaml: no such config file" in capsys.readouterr().err


def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    """append_records' lines read back; a truncated line is a ValueError naming the file and
    its line, not a bare JSONDecodeError."""
    from raypo.eval.run_files import read_jsonl
    from raypo.train.records import append_records

    path = tmp_path / "heldout_pairs.jsonl"
    append_records(path, 3, [{"id": "a"}, {"id": "b"}])
    assert read_jsonl(path) == [{"step": 3, "id": "a"}, {"step": 3, "id": "b"}]
    with path.open("a", encoding="utf-8") as handle:
        handle.write('\n{"step": 4, "id"\n')
    with pytest.raises(ValueError, match=r"heldout_pairs\.jsonl:4: not valid JSON"):
        read_jsonl(path)

"""Hand-made training outputs for the report tests: metrics.jsonl and heldout_pairs.jsonl as
raypo train writes them (raypo.train.metrics, raypo.train.records), with chosen numbers; and the
readers those tests check the report's PNGs and markdown tables with."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REFERENCE_HN = [0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70, 0.80, 0.90, 1.00]
"""The reference's Hn(x) of the 10 held-out pairs p0..p9: numpy's quintile edges of these are
0.28, 0.46, 0.64, 0.82 (linear interpolation at positions 1.8, 3.6, 5.4, 7.2 of the sorted
values), so quintile k holds p{2k} and p{2k+1}."""


def write_heldout_pairs(
    run: Path,
    margins: Mapping[int, Sequence[float]],
    policy_hn: float = 0.5,
    reference_hn: Sequence[float] | None = REFERENCE_HN,
) -> None:
    """heldout_pairs.jsonl with, at each step, pair p{i} of margin ``margins[step][i]``: chosen
    reward 0.1 i, rejected reward 0.1 i - margin; ``reference_hn`` None: an evaluation without
    the reference's entropies."""
    lines = []
    for step, values in margins.items():
        for index, margin in enumerate(values):
            row: dict[str, Any] = {"step": step, "id": f"p{index}"}
            row |= {"reward_chosen": 0.1 * index, "reward_rejected": 0.1 * index - margin}
            if reference_hn is not None:
                row["reference_hn"] = reference_hn[index]
            row["policy_hn"] = policy_hn
            lines.append(json.dumps(row) + "\n")
    with (run / "heldout_pairs.jsonl").open("a") as handle:
        handle.writelines(lines)


def dynamics_records(step: int, entropy: float, tokens: float) -> dict[str, Any]:
    """The held-out evaluation's entropy and the generation eval's length at ``step``."""
    return {
        "eval/entropy/policy": entropy,
        "eval/entropy/reference": 0.55,
        "eval/gen/mean_tokens": tokens,
        "eval/gen/completions": 8.0,
    }


def write_metrics(
    run: Path, steps: int = 8, eval_every: int = 4, shift: float = 0.0, dynamics: bool = True
) -> None:
    """metrics.jsonl: training records every step, held-out records every ``eval_every`` steps
    (accuracy 0.5625 + shift, entropy 0.5 - 0.01 step + shift, 20 + step tokens)."""
    rows = []
    for step in range(1, steps + 1):
        row: dict[str, Any] = {"step": step, "epoch": 0, "time": 1.7e9 + 10 * step}
        row |= {"loss": 0.69 - 0.01 * step, "rewards/accuracies": 0.5 + 0.03 * step + shift}
        row |= {"rewards/margins": 0.02 * step, "mixdpo/cv": 0.5 + 0.01 * step}
        rows.append(row)
        if step % eval_every == 0:
            held_out = {"eval/loss": 0.7 - 0.01 * step, "eval/rewards/accuracies": 0.5625 + shift}
            held_out |= {"eval/rewards/margins": 0.01 * step, "eval/reference/accuracies": 0.625}
            held_out["eval/pairs"] = 16.0
            if dynamics:
                held_out |= dynamics_records(step, 0.5 - 0.01 * step + shift, 20.0 + step)
            rows.append({"step": step, "epoch": 0, "time": 1.7e9 + 10 * step + 5, **held_out})
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows

"""Wall time of a ``raypo tune`` sweep against running the same trials one after another with
``raypo train``, and whether the best trial's config reproduces its metric when run alone.

Runs, one at a time, each as its own ``raypo`` process (each starts its own local Ray): the sweep
(default ``configs/sweep-quickstart.yaml`` with ``tune.scheduler none``, so every trial trains to
the end and both sides do the same training); then ``raypo train`` of the same config once per
trial with that trial's searched values, each preparing its data, fitting the tiny model and
running the reference pass as a user running trials by hand would; then ``raypo train
SWEEP/best_config.yaml``. The sweep prepares those once for all trials, so "Tune's overhead"
is the sweep's wall time against the sequential total; the per-trial times inside the sweep come
from each trial's ``metrics.jsonl`` (first to last line) and the ``raypo train`` runs from the
same lines of theirs.

    python benchmarks/tune_overhead.py
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO_ROOT, Column, Table, add_output_argument, write_results

METRIC = "eval/rewards/accuracies"


def _raypo(args: list[str], log: Path) -> float:
    """Run ``raypo ARGS`` (output to ``log``), fail loudly, return its wall seconds."""
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "raypo", *args],
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        raise SystemExit(f"raypo {' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _last_metric(run_dir: Path) -> float:
    return [m[METRIC] for m in _metrics(run_dir) if m.get(METRIC) is not None][-1]


def _training_seconds(run_dir: Path) -> float:
    """From the first to the last metrics line: the training itself, start-up excluded."""
    records = _metrics(run_dir)
    return records[-1]["time"] - records[0]["time"]


def _trials(sweep_dir: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of the sweep's trials.csv and its searched keys (the columns between the metric
    and ``step``)."""
    with (sweep_dir / "trials.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    header = list(reader.fieldnames or [])
    return rows, header[header.index(METRIC) + 1 : header.index("step")]


def _overrides(trial: dict[str, str], keys: list[str]) -> list[str]:
    return [f"--{key}={trial[key]}" for key in keys]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default="configs/sweep-quickstart.yaml")
    parser.add_argument("--scheduler", default="none", choices=["none", "asha"])
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary dir")
    add_output_argument(parser, "tune_overhead")
    args = parser.parse_args()
    started = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="raypo-tune-overhead-"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    sweep_dir = work / "sweep"
    sweep_args = [f"--run_dir={sweep_dir}", f"--tune.scheduler={args.scheduler}"]
    sweep_s = _raypo(["tune", args.config, *sweep_args], work / "sweep.log")
    trials, keys = _trials(sweep_dir)

    rows = []
    for index, trial in enumerate(trials):
        alone = work / f"alone-{index}"
        run_args = ["train", args.config, f"--run_dir={alone}", f"--name=alone-{index}"]
        alone_s = _raypo([*run_args, *_overrides(trial, keys)], work / f"alone-{index}.log")
        in_sweep = sweep_dir / "trials" / trial["trial"]
        rows.append(
            {
                "trial": trial["trial"],
                **{key: trial[key] for key in keys},
                "metric_sweep": float(trial[METRIC]),
                "metric_alone": _last_metric(alone),
                "train_s_sweep": round(_training_seconds(in_sweep), 1),
                "train_s_alone": round(_training_seconds(alone), 1),
                "wall_s_alone": round(alone_s, 1),
            }
        )
    sequential_s = sum(row["wall_s_alone"] for row in rows)

    best_dir = work / "best"
    best_args = ["train", str(sweep_dir / "best_config.yaml"), f"--run_dir={best_dir}"]
    best_s = _raypo([*best_args, "--name=best"], work / "best.log")
    best_trial = max(rows, key=lambda row: row["metric_sweep"])
    best_alone = _last_metric(best_dir)

    summary = [
        {"what": "raypo tune (all trials)", "seconds": round(sweep_s, 1)},
        {"what": "raypo train per trial, in sequence", "seconds": round(sequential_s, 1)},
        {"what": "raypo train best_config.yaml", "seconds": round(best_s, 1)},
    ]
    ratio = sweep_s / sequential_s
    train_sweep = sum(row["train_s_sweep"] for row in rows)
    train_alone = sum(row["train_s_alone"] for row in rows)
    findings = [
        f"The sweep of {len(rows)} trials took {sweep_s:.0f} s; the same trials run one after "
        f"another with raypo train took {sequential_s:.0f} s: the sweep needs {ratio:.2f}x the "
        f"time ({100 * (ratio - 1):+.0f}%). It prepares the data, the tiny fit and the reference "
        "pass once where each raypo train run does them again.",
        f"Training inside the sweep (first to last metrics line of each trial) took "
        f"{train_sweep:.0f} s in all against {train_alone:.0f} s alone "
        f"({100 * (train_sweep / train_alone - 1):+.0f}%).",
        f"Best trial {best_trial['trial']}: {METRIC} {best_trial['metric_sweep']:.4f} in the "
        f"sweep; raypo train of best_config.yaml gives {best_alone:.4f} "
        f"({'the same' if abs(best_alone - best_trial['metric_sweep']) < 1e-9 else 'different'}); "
        f"the same values in the alone run gave {best_trial['metric_alone']:.4f}. Repeated runs "
        f"of one config differ by as much as the trials do (largest sweep-vs-alone gap "
        f"{max(abs(r['metric_sweep'] - r['metric_alone']) for r in rows):.4f}): the Train workers "
        "do not receive the same pairs at the same steps on every run.",
    ]
    tables = [
        Table(
            "Trials: in the sweep and alone",
            rows,
            [
                Column("trial"),
                *[Column(key) for key in keys],
                Column("metric_sweep", f"{METRIC} (sweep)", ".4f"),
                Column("metric_alone", f"{METRIC} (alone)", ".4f"),
                Column("train_s_sweep", "training s (sweep)"),
                Column("train_s_alone", "training s (alone)"),
                Column("wall_s_alone", "raypo train wall s"),
            ],
            note=f"{args.config} with tune.scheduler {args.scheduler}; each alone run is a fresh "
            "raypo train process with the trial's values.",
        ),
        Table("Wall time", summary, [Column("what"), Column("seconds")]),
    ]
    files = write_results(
        "tune_overhead",
        title="Ray Tune sweep vs the same trials run one by one",
        description=__doc__.split("\n\n")[1],
        tables=tables,
        settings=args,
        findings=findings,
        data={"best_metric_alone": best_alone, "sweep_s": sweep_s, "work_dir": str(work)},
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

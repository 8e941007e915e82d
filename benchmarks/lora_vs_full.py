"""`raypo train` with LoRA against full fine-tuning: pairs/s, Train worker memory, trainable
parameters and optimizer state, in one run.

Both sides are whole ``raypo train CONFIG.yaml`` jobs in subprocesses, set up as
``throughput_vs_trl.py``'s raypo side: the standard CPU Llama (hidden 256, 4 layers, 4 heads, FFN
688, a BPE of 8,192 tokens trained on the 1,800 HH pairs) on the first HH pairs in file order,
fp32, DPO with beta 0.1, 1 Ray Train worker of 1.5 CPUs (2 torch threads), DeepSpeed ZeRO-2 with
torch AdamW at a constant learning rate of 1e-5, 8 pairs per step, the reference precomputed
(one pass by ``raypo prepare`` before the rounds, cached and shared by every run: it is the same
for both sides, and no run's memory or time includes it). They differ in
``model.lora`` alone: off (every weight trained) or rank 16, alpha 32, on every linear layer of
the decoder (``target_modules: [all-linear]``; the embeddings and the output layer stay frozen).
The two sides alternate within each round, their order rotating from round to round, so that
load on a shared machine hits them alike; the LoRA/full ratios are taken within each round.

Measured per run: steady-state pairs/s and tokens/s after the warm-up steps (from the run's
``metrics.jsonl``); the Ray Train worker's peak RSS (its VmHWM) and the largest summed RSS of the
whole process tree (driver, Ray's processes, the worker), sampled every 0.2 s; the optimizer
state (the size of DeepSpeed's optimizer file in the final checkpoint: the fp32 master copy and
the two Adam moments of the trained parameters) and the whole checkpoint. Per side, once: the
trainable and total parameter counts of the policy built as the worker builds it.

    python benchmarks/lora_vs_full.py                              # results/lora_vs_full.*
    python benchmarks/lora_vs_full.py --quick --out /tmp/lora_vs_full  # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import throughput_vs_trl as tvt
from common import Column, Table, add_output_argument, write_results
from scaling import QUICK, STANDARD, steady_throughput

NAME = "lora_vs_full"
SIDES = {"full": "full fine-tuning", "lora": "LoRA r=16 on every linear layer"}
"""Side key -> the label its table row carries; the first is the baseline of the ratios."""
LORA = {"enabled": True, "rank": 16, "alpha": 32.0, "target_modules": ["all-linear"]}
"""The LoRA side's ``model.lora`` section."""
OPTIMIZER_FILES = "*optim_states.pt"
"""DeepSpeed's optimizer state files in a checkpoint's ``engine/`` (one per rank under ZeRO)."""
MIB = 2**20


@dataclass(frozen=True)
class SideRun:
    """One ``raypo train`` job of one side."""

    side: str
    pairs_per_s: float
    """Steady state: after the warm-up steps."""
    tokens_per_s: float
    wall_s: float
    """The whole job, start to exit (start-up, tokenisation, training, checkpoint, export)."""
    worker_peak_mib: float
    """The Ray Train worker's peak RSS (VmHWM)."""
    tree_peak_mib: float
    """Largest summed RSS of the job's process tree (sampled)."""
    optimizer_state_mib: float
    """DeepSpeed's optimizer file(s) of the final checkpoint."""
    checkpoint_mib: float
    """The final checkpoint's engine directory (model states, optimizer, scheduler)."""
    first_loss: float
    """Mean loss of the first logging interval."""


def side_config(side: str, settings: tvt.Settings, run_dir: Path, work: Path) -> dict[str, Any]:
    """The config dict of one job: throughput_vs_trl's precomputed-reference job with the
    reference cache shared by every run under ``work``, and :data:`LORA` on the LoRA side."""
    config = tvt.raypo_config(settings, run_dir, work, online=False)
    config["reference"]["cache_dir"] = str(work / "reference-cache")
    if side == "lora":
        config["model"]["lora"] = dict(LORA)
    return config


def job(command: str, config: Any, work: Path, label: str, timeout_s: float) -> Any:
    """``raypo COMMAND CONFIG`` as a user runs it, in a subprocess of its own (its own local
    Ray); its wall time and process-tree memory (:class:`throughput_vs_trl.TreeMemory`)."""
    from raypo.config import save_config

    path = save_config(config, work / "configs" / f"{label}.yaml")
    command_line = [sys.executable, "-m", "raypo.cli", command, str(path)]
    log = work / "logs" / f"{label}.log"
    return tvt.run_process(command_line, tvt.raypo_env(), log, timeout_s)


def parameter_counts(config: Any) -> dict[str, int]:
    """Trainable and total parameters of ``config``'s policy, built as a worker builds it."""
    from raypo.lora import add_adapters, trainable_counts
    from raypo.models import load_policy

    model, _ = load_policy(config.model.name_or_path, **config.model.load_kwargs)
    if config.model.lora.enabled:
        model = add_adapters(model, config.model.lora)
    trainable, total = trainable_counts(model)
    return {"trainable_params": trainable, "total_params": total}


def checkpoint_sizes(run_dir: Path) -> tuple[int, int]:
    """Bytes of the optimizer files and of the whole ``engine/`` directory of the run's last
    checkpoint."""
    checkpoints = sorted(run_dir.glob("ray/*/checkpoint_*/engine"))
    if not checkpoints:
        raise RuntimeError(f"{run_dir}: no checkpoint with an engine directory")
    engine = checkpoints[-1]
    optimizer = sum(path.stat().st_size for path in engine.glob(OPTIMIZER_FILES))
    if not optimizer:
        raise RuntimeError(f"{engine}: no {OPTIMIZER_FILES}")
    whole = sum(path.stat().st_size for path in engine.rglob("*") if path.is_file())
    return optimizer, whole


def run_side(
    side: str, work: Path, settings: tvt.Settings, timeout_s: float, round_: int
) -> SideRun:
    """One whole ``raypo train`` job of ``side`` in a subprocess, read back from its run
    directory."""
    from raypo.config import config_from_dict
    from raypo.train.metrics import read_metrics

    run_dir = work / f"{side}-{round_}"
    config = config_from_dict(side_config(side, settings, run_dir, work))
    wall_s, memory = job("train", config, work, f"{side}-{round_}", timeout_s)
    steady = steady_throughput(side, config, settings.warmup, wall_s)
    logged = [record for record in read_metrics(run_dir) if "step_time_s" in record]
    optimizer, whole = checkpoint_sizes(run_dir)
    return SideRun(
        side=side,
        pairs_per_s=steady.pairs_per_s,
        tokens_per_s=steady.tokens_per_s,
        wall_s=wall_s,
        worker_peak_mib=memory.peak_of(tvt.TRAIN_WORKER_TITLE) / MIB,
        tree_peak_mib=memory.tree_peak / MIB,
        optimizer_state_mib=optimizer / MIB,
        checkpoint_mib=whole / MIB,
        first_loss=logged[0]["loss"],
    )


def round_order(round_: int) -> list[str]:
    """The sides of round ``round_`` (1-based): the order rotates by one each round."""
    sides = list(SIDES)
    shift = (round_ - 1) % len(sides)
    return sides[shift:] + sides[:shift]


def summary_rows(rounds: list[dict[str, SideRun]], counts: dict[str, dict]) -> list[dict]:
    """One row per side: medians over rounds, ratios to full fine-tuning taken per round,
    peaks the largest of any round, parameter counts."""
    baseline = next(iter(SIDES))
    rows = []
    for side in SIDES:
        runs = [r[side] for r in rounds]
        ratios = [r[side].pairs_per_s / r[baseline].pairs_per_s for r in rounds]
        rows.append(
            {
                "key": side,
                "side": SIDES[side],
                **counts[side],
                "trainable_share": counts[side]["trainable_params"] / counts[side]["total_params"],
                "pairs_per_s": statistics.median(run.pairs_per_s for run in runs),
                "tokens_per_s": statistics.median(run.tokens_per_s for run in runs),
                "pairs_per_s_vs_full": statistics.median(ratios),
                "worker_peak_mib": max(run.worker_peak_mib for run in runs),
                "tree_peak_mib": max(run.tree_peak_mib for run in runs),
                "optimizer_state_mib": statistics.median(run.optimizer_state_mib for run in runs),
                "checkpoint_mib": statistics.median(run.checkpoint_mib for run in runs),
                "wall_s": statistics.median(run.wall_s for run in runs),
            }
        )
    return rows


COLUMNS = [
    Column("side"),
    Column("trainable_params", "trainable parameters", ","),
    Column("trainable_share", "of all", ".2%"),
    Column("pairs_per_s", "pairs/s", ".3f"),
    Column("pairs_per_s_vs_full", "pairs/s vs full", ".2f"),
    Column("tokens_per_s", "tokens/s", ".0f"),
    Column("worker_peak_mib", "Train worker peak RSS MiB", ".0f"),
    Column("tree_peak_mib", "process tree peak RSS MiB", ".0f"),
    Column("optimizer_state_mib", "optimizer state MiB", ".2f"),
    Column("checkpoint_mib", "checkpoint MiB", ".1f"),
    Column("wall_s", "whole job s", ".0f"),
]


def findings(rows: list[dict]) -> list[str]:
    """The comparison in words: what LoRA trains, stores and costs against full training."""
    full, lora = (next(row for row in rows if row["key"] == key) for key in SIDES)
    return [
        f"LoRA trains {lora['trainable_params']:,} of {lora['total_params']:,} parameters "
        f"({lora['trainable_share']:.2%}); full fine-tuning all {full['trainable_params']:,}.",
        f"Optimizer state (DeepSpeed's fp32 master copy and Adam moments, from the checkpoint): "
        f"{lora['optimizer_state_mib']:.2f} MiB against {full['optimizer_state_mib']:.2f} MiB "
        f"({full['optimizer_state_mib'] / lora['optimizer_state_mib']:.0f}x less); the "
        f"checkpoint {lora['checkpoint_mib']:.1f} MiB against {full['checkpoint_mib']:.1f} MiB "
        "(a LoRA checkpoint keeps the frozen base too).",
        f"Ray Train worker peak RSS: {lora['worker_peak_mib']:.0f} MiB with LoRA, "
        f"{full['worker_peak_mib']:.0f} MiB with full fine-tuning "
        f"({lora['worker_peak_mib'] - full['worker_peak_mib']:+.0f} MiB); most of a worker's "
        "memory on this small model is torch, Ray and DeepSpeed themselves.",
        f"Steady-state pairs/s: {lora['pairs_per_s']:.3f} with LoRA, {full['pairs_per_s']:.3f} "
        f"with full fine-tuning ({lora['pairs_per_s_vs_full']:.2f}x, the median of the per-round "
        "ratios): LoRA skips the frozen weights' gradients and their optimizer step but adds the "
        "adapters' matmuls to every forward and backward.",
    ]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the rates")
    parser.add_argument("--max-length", type=int, default=512, help="data.max_length")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two sides")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="small model and steps (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep models, runs and logs here")
    add_output_argument(parser, NAME)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.warmup, args.max_length, args.rounds = 4, 10, 5, 128, 1
    return args


def settings_from(args: argparse.Namespace) -> tvt.Settings:
    """throughput_vs_trl's :class:`~throughput_vs_trl.Settings` of the command line, checked."""
    from raypo.train.loop import torch_threads

    settings = tvt.Settings(
        pairs=args.pairs,
        max_length=args.max_length,
        steps=args.steps,
        warmup=args.warmup,
        threads=torch_threads(tvt.Settings.cpus_per_worker),
    )
    settings.check()
    return settings


def main(argv: list[str] | None = None) -> None:
    """Alternate the two sides over ``--rounds`` rounds; write the results."""
    from raypo.config import config_from_dict

    args = _parse_args(argv)
    started = time.perf_counter()
    shape = QUICK if args.quick else STANDARD
    settings = settings_from(args)
    rounds: list[dict[str, SideRun]] = []
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        tvt.prepare_setup(shape, settings, work)
        prepare = config_from_dict(side_config("full", settings, work / "prepare", work))
        job("prepare", prepare, work, "prepare", args.timeout)
        counts = {
            side: parameter_counts(config_from_dict(side_config(side, settings, work / side, work)))
            for side in SIDES
        }
        for round_ in range(1, args.rounds + 1):
            runs = {}
            for side in round_order(round_):
                runs[side] = run_side(side, work, settings, args.timeout, round_)
                print(
                    f"round {round_} {side}: {json.dumps(dataclasses.asdict(runs[side]))}",
                    flush=True,
                )
            rounds.append(runs)
    rows = summary_rows(rounds, counts)
    write_results(
        NAME,
        title=(
            f"raypo train, LoRA r=16 against full fine-tuning: {settings.pairs} pairs per step, "
            f"max length {settings.max_length}, {args.rounds} rounds"
        ),
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
        tables=[Table("Per side: medians over rounds (peaks: the largest)", rows, COLUMNS)],
        findings=findings(rows),
        settings=dataclasses.asdict(settings)
        | {
            "rounds": args.rounds,
            "quick": args.quick,
            "lora": LORA,
            "model": dataclasses.asdict(shape),
        },
        data={"rounds": [{s: dataclasses.asdict(r[s]) for s in r} for r in rounds]},
        out=args.out,
        started=started,
    )
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

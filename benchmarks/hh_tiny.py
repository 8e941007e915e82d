"""Held-out implicit-reward accuracy of DPO, MallowsPO-theta/phi and MixDPO on the 1,800 HH pairs,
at matched preference strength.

The embedded tiny Llama is first fine-tuned on the chosen completions of the training split by
``raypo sft`` (:func:`raypo.train.run.fit_tiny_model`, as ``model.tiny_fit_steps`` does, on one
Ray Train worker); the fitted model
is both the reference and every policy's starting point. The reference columns (log-probs and
entropies) are computed once over all pairs. Each objective then trains for ``--epochs`` epochs
over the training split with raypo's per-worker step (collate, :func:`raypo.step.preference_step`,
gradient clipping, AdamW; MixDPO's strength distribution with its own Adam, as in
:mod:`raypo.train.loop`) in one process per run, without Ray: dozens of Ray Train jobs do not fit
the time budget on two cores. The objectives are compared at the same strength: MallowsPO's
dispersion weight ``w(x)`` multiplies beta (by about 3 on these pairs), so each objective's
``loss.beta`` is set such that the mean initial slope of its loss in the margin, over the
training pairs, equals DPO's at the DPO beta of the comparison (MixDPO's mean strength is beta
itself); a small grid of DPO betas follows the headline one. A seed sets the order of the training
pairs and torch's RNG; the train/test split is fixed. The held-out metric is the fraction of test
pairs whose implicit reward ``beta (log pi - log pi_ref)`` is higher for the chosen response
(``eval/rewards/accuracies`` of a raypo run); differences from DPO are paired by seed and test
pair, with a bootstrap interval over both, so that the sampling of the 300 test pairs is in it.

    python benchmarks/hh_tiny.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Column,
    Interval,
    Table,
    add_output_argument,
    mean_ci,
    new_figure,
    write_results,
)
from scaling import hh_records

OBJECTIVES = ("dpo", "mallows_theta", "mallows_phi", "mixdpo")


@dataclass(frozen=True)
class Settings:
    """Training settings shared by every objective and seed."""

    epochs: float = 1.0
    pairs: int = 8
    """Pairs per step."""
    learning_rate: float = 5e-4
    dispersion_scale: float = 0.29
    max_length: int = 256
    test_pairs: int = 300
    fit_steps: int = 200
    """Steps of the `raypo sft` fit that makes the reference."""
    max_grad_norm: float = 1.0


def split_pairs(
    tokenizer: Any, settings: Settings, limit: int | None
) -> tuple[list, list, list[dict]]:
    """raypo's tokenisation of the HH pairs, shuffled once with seed 0 and cut into train and
    test (``settings.test_pairs``), and the raw HH records of the training split (what the fit
    reads); ``limit`` keeps only that many pairs first."""
    from raypo.config import DataConfig
    from raypo.data.formats import split_hh
    from raypo.data.records import PreferencePair
    from raypo.data.tokenize import TokenizedPair, tokenize_pairs

    pairs, records = [], []
    for row, record in enumerate(hh_records(limit), start=1):
        try:
            prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        except ValueError:
            continue
        pairs.append(PreferencePair(f"hh:{row}", prompt, chosen, rejected, None, "hh", row))
        records.append(record)
    data = DataConfig(
        max_length=settings.max_length, max_prompt_length=settings.max_length * 3 // 4
    )
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [
        ({key: getattr(pair, key) for key in keys}, record)
        for pair, record in zip(tokenize_pairs(pairs, tokenizer, data), records, strict=True)
        if isinstance(pair, TokenizedPair)
    ]
    random.Random(0).shuffle(rows)
    if len(rows) <= settings.test_pairs:
        raise ValueError(f"{len(rows)} usable pairs leave nothing to train beside the test split")
    train = rows[settings.test_pairs :]
    test = [row for row, _ in rows[: settings.test_pairs]]
    return [row for row, _ in train], test, [record for _, record in train]


def collate(rows: list[dict], pad_token_id: int) -> dict:
    """raypo's ``[2B, T]`` batch of ``rows`` with their ``ref_*`` columns."""
    from raypo.data.collate import collate_pairs

    return collate_pairs({key: [row[key] for row in rows] for key in rows[0]}, pad_token_id)


def add_reference_columns(model: Any, rows: list[dict], pad_token_id: int, size: int) -> None:
    """Adds the reference pass's four ``ref_*`` floats to each row, ``size`` pairs a batch."""
    from raypo.forward import reference_columns

    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        columns = reference_columns(model, collate(chunk, pad_token_id))
        for index, row in enumerate(chunk):
            row.update({name: float(values[index]) for name, values in columns.items()})


def fit_tiny(work: Path, settings: Settings, limit: int | None) -> tuple[Path, list, list]:
    """The tiny model fine-tuned on the training split's chosen completions, and the two
    splits."""
    from raypo.config import load_config
    from raypo.console import configure
    from raypo.models import load_tokenizer, resolve_model_path
    from raypo.ray_runtime import local_ray
    from raypo.train.run import fit_tiny_model

    configure(verbose=False, use_gpu=False)  # raypo's stage and progress lines, as raypo train's
    os.environ["RAYPO_CACHE_DIR"] = str(work / "cache")
    train, test, records = split_pairs(load_tokenizer(resolve_model_path("tiny")), settings, limit)
    data, text = work / "fit_pairs.jsonl", "".join(json.dumps(r) + "\n" for r in records)
    if not data.exists() or data.read_text() != text:
        # Rewritten only when it changes: its modification time is in the fit's fingerprint.
        data.write_text(text)
    config = load_config(
        None,
        [
            f"--run_dir={work / 'fit'}",
            f"--data.path={data}",
            "--data.schema=hh",
            "--data.eval_fraction=0",
            f"--data.max_length={settings.max_length}",
            f"--data.max_prompt_length={settings.max_length * 3 // 4}",
            "--data.num_cpus_per_op=0.5",
            f"--model.tiny_fit_steps={settings.fit_steps}",
            "--trainer.num_workers=1",
            "--trainer.torch_adam=true",
        ],
    )
    with local_ray():
        fitted = fit_tiny_model(config, "hh_tiny")
    return Path(fitted.model.name_or_path), train, test


def prepare_study(work: Path, settings: Settings, limit: int | None) -> tuple[Path, list, list]:
    """The fitted model and the two splits with their reference columns; kept in ``work`` and
    taken from there when an earlier call with the same settings left them (``--work-dir``)."""
    from raypo.models import load_policy

    cache = work / "study_rows.json"
    key = dataclasses.asdict(settings) | {"limit": limit}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved["settings"] != key:
            raise ValueError(f"{cache} was made with other settings: {saved['settings']}")
        return Path(saved["fitted"]), saved["train"], saved["test"]
    fitted, train, test = fit_tiny(work, settings, limit)
    reference, tokenizer = load_policy(str(fitted), "fp32")
    add_reference_columns(reference.eval(), train + test, tokenizer.pad_token_id, 16)
    saved = {"settings": key, "fitted": str(fitted), "train": train, "test": test}
    cache.write_text(json.dumps(saved))
    return fitted, train, test


def _loss_config(name: str, beta: float, settings: Settings) -> Any:
    from raypo.config import LossConfig

    return LossConfig(type=name, beta=beta, dispersion_scale=settings.dispersion_scale)


def _strength(name: str, beta: float, settings: Settings) -> Any:
    """MixDPO's strength distribution with mean ``beta``; None for the other objectives."""
    from raypo.losses import StrengthDistribution
    from raypo.objectives import objective

    if not objective(name).learns_strength:
        return None
    config = _loss_config(name, beta, settings)
    return StrengthDistribution(config.mixdpo_distribution, beta, config.mixdpo_init_cv)


def dispersion_weights(rows: list[dict], settings: Settings) -> Any:
    """MallowsPO's ``w(x)`` of each row from its reference entropies, ``[N]`` float64."""
    import torch

    from raypo.dispersion import dispersion_weight

    chosen = torch.tensor([row["ref_hn_chosen"] for row in rows], dtype=torch.float64)
    rejected = torch.tensor([row["ref_hn_rejected"] for row in rows], dtype=torch.float64)
    return dispersion_weight(chosen, rejected, settings.dispersion_scale)


def initial_slope(name: str, beta: float, weights: Any, settings: Settings) -> float:
    """Mean over the pairs of ``-d loss / d h`` at ``h = 0``: the strength with which the
    objective first pulls the margins apart (``beta / 2`` for DPO)."""
    import torch

    from raypo.losses import LOSS_FUNCTIONS

    h = torch.zeros_like(weights, requires_grad=True)
    config = _loss_config(name, beta, settings)
    strength = _strength(name, beta, settings)
    LOSS_FUNCTIONS[name](h, weights, config, strength).sum().backward()
    return -float(h.grad.mean())


def matched_beta(name: str, dpo_beta: float, weights: Any, settings: Settings) -> float:
    """The ``loss.beta`` of ``name`` whose initial slope over the training pairs equals DPO's at
    ``dpo_beta`` (MallowsPO's ``w(x)`` rescales beta; MixDPO's mean strength is beta itself).

    Raises:
        RuntimeError: the slope is not proportional to beta (the match would not hold).
    """
    target = initial_slope("dpo", dpo_beta, weights, settings)
    beta = dpo_beta * target / initial_slope(name, dpo_beta, weights, settings)
    reached = initial_slope(name, beta, weights, settings)
    if not math.isclose(reached, target, rel_tol=1e-6):
        raise RuntimeError(f"{name}: slope {reached} at beta {beta} does not match DPO's {target}")
    return beta


@dataclass(frozen=True)
class Job:
    """One training run of the study."""

    objective: str
    seed: int
    dpo_beta: float
    """The DPO strength this run is matched to."""
    beta: float
    """The objective's own ``loss.beta`` (:func:`matched_beta`)."""


@dataclass(frozen=True)
class RunResult:
    """One objective trained with one seed at one matched strength."""

    objective: str
    seed: int
    dpo_beta: float
    beta: float
    test_margins: list[float]
    """Per test pair, the log-ratio margin ``(log pi - log pi_ref)(chosen) - (...)(rejected)``:
    the implicit reward ranks the pair correctly when it is positive, whatever the beta."""
    final_train_loss: float
    """Mean training loss over the last 10% of steps."""
    strength: dict[str, float] | None
    """MixDPO's learned distribution of beta (mean, cv) at the end; None for the others."""
    steps: int
    seconds: float

    @property
    def test_accuracy(self) -> float:
        """Held-out implicit-reward accuracy."""
        return statistics.fmean(float(m > 0) for m in self.test_margins)


def batch_step(model: Any, rows: list[dict], job: Job, settings: Settings, strength: Any) -> Any:
    """:func:`raypo.step.preference_step` on the collated ``rows`` (their ``ref_*`` columns are
    the precomputed reference), as a raypo Train worker's ``micro_batch_step`` calls it."""
    from raypo.step import preference_step

    batch = collate(rows, model.config.pad_token_id)
    config = _loss_config(job.objective, job.beta, settings)
    return preference_step(model, batch, config, strength=strength)


def test_margins(model: Any, rows: list[dict], settings: Settings) -> list[float]:
    """The policy's log-ratio margin of every row (see :attr:`RunResult.test_margins`)."""
    import torch

    from raypo.forward import sequence_stats, split_pairs

    margins: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), settings.pairs):
            chunk = rows[start : start + settings.pairs]
            stats = sequence_stats(
                model, collate(chunk, model.config.pad_token_id), compute_entropy=False
            )
            chosen, rejected = split_pairs(stats.logps.double())
            for index, row in enumerate(chunk):
                margins.append(
                    float(chosen[index] - row["ref_chosen_logps"])
                    - float(rejected[index] - row["ref_rejected_logps"])
                )
    model.train()
    return margins


def train_one(fitted: Path, train: list, test: list, job: Job, settings: Settings) -> RunResult:
    """Train a copy of the fitted model as ``job`` says, then measure it on ``test``."""
    import torch

    from raypo.models import load_policy

    started = time.perf_counter()
    torch.manual_seed(job.seed)
    model, _ = load_policy(str(fitted), "fp32")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0)
    strength = _strength(job.objective, job.beta, settings)
    strength_optimizer = None
    if strength is not None:
        lr = _loss_config(job.objective, job.beta, settings).mixdpo_lr
        strength_optimizer = torch.optim.Adam(strength.parameters(), lr=lr)
    order = random.Random(job.seed)
    steps = max(1, round(settings.epochs * len(train) / settings.pairs))
    losses: list[float] = []
    queue: list[dict] = []
    for _ in range(steps):
        if len(queue) < settings.pairs:
            queue = order.sample(train, len(train))
        chunk, queue = queue[: settings.pairs], queue[settings.pairs :]
        loss = batch_step(model, chunk, job, settings, strength).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        for opt in (optimizer, strength_optimizer):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    learned = None
    if strength is not None:
        with torch.no_grad():
            moments = strength.moments()
        learned = {"mean": float(moments["mean"]), "cv": float(moments["cv"])}
    return RunResult(
        objective=job.objective,
        seed=job.seed,
        dpo_beta=job.dpo_beta,
        beta=job.beta,
        test_margins=test_margins(model, test, settings),
        final_train_loss=statistics.fmean(losses[-max(1, steps // 10) :]),
        strength=learned,
        steps=steps,
        seconds=round(time.perf_counter() - started, 1),
    )


def _train_in_worker(
    fitted: Path, train: list, test: list, job: Job, settings: Settings
) -> RunResult:
    import torch

    # Runs share the two cores as whole processes: one thread each beats two threads each on a
    # model this small.
    torch.set_num_threads(1)
    return train_one(fitted, train, test, job, settings)


def run_jobs(
    fitted: Path,
    train: list,
    test: list,
    jobs: list[Job],
    settings: Settings,
    processes: int,
    log: Path,
) -> list[RunResult]:
    """Every job, ``processes`` at a time, each result appended to ``log`` (JSON lines) and
    printed as it arrives; jobs already in ``log`` are taken from it, not run again."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            result = RunResult(**json.loads(line))
            done[(result.objective, result.seed, result.dpo_beta)] = result
    todo = [job for job in jobs if (job.objective, job.seed, job.dpo_beta) not in done]
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_train_in_worker, fitted, train, test, job, settings) for job in todo
        ]
        for future in futures:
            result = future.result()
            with log.open("a") as handle:
                handle.write(json.dumps(dataclasses.asdict(result)) + "\n")
            summary = dataclasses.asdict(result) | {"test_accuracy": result.test_accuracy}
            summary.pop("test_margins")
            print(json.dumps(summary), flush=True)
            done[(result.objective, result.seed, result.dpo_beta)] = result
    return [done[(job.objective, job.seed, job.dpo_beta)] for job in jobs]


def paired_difference(
    runs: list[RunResult], baseline: list[RunResult], samples: int, seed: int = 0
) -> Interval:
    """Mean accuracy difference ``runs - baseline`` over the seeds both have, with a 95%
    percentile interval from a bootstrap over seeds and test pairs together: the interval covers
    both the training order and the sampling of the held-out pairs."""
    import numpy as np

    by_seed = {r.seed: r for r in baseline}
    seeds = sorted(r.seed for r in runs if r.seed in by_seed)
    ours = {r.seed: r for r in runs}
    diff = np.array(
        [
            (np.array(ours[s].test_margins) > 0).astype(float)
            - (np.array(by_seed[s].test_margins) > 0)
            for s in seeds
        ]
    )
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, len(seeds), size=(samples, len(seeds)))
    pair_draws = rng.integers(0, diff.shape[1], size=(samples, diff.shape[1]))
    means = np.array(
        [diff[np.ix_(s, p)].mean() for s, p in zip(seed_draws, pair_draws, strict=True)]
    )
    low, high = np.percentile(means, [2.5, 97.5])
    return Interval(float(diff.mean()), float(low), float(high), len(seeds))


def dispersion_quintiles(test: list[dict]) -> list[int]:
    """The quintile (0 = lowest ``Hn(x)``, most agreement) of every test pair's reference
    dispersion, bucketed as ``raypo report`` buckets held-out pairs."""
    import numpy as np

    from raypo.eval.heldout import bucket_of

    hn = np.array([(r["ref_hn_chosen"] + r["ref_hn_rejected"]) / 2 for r in test])
    return bucket_of(hn).tolist()


def _verdict(interval: Interval) -> str:
    if interval.low > 0:
        return "ahead of DPO"
    if interval.high < 0:
        return "behind DPO"
    return "no difference shown"


def _difference_rows(results: list[RunResult], samples: int) -> list[dict]:
    rows = []
    for dpo_beta in dict.fromkeys(r.dpo_beta for r in results):
        at_beta = [r for r in results if r.dpo_beta == dpo_beta]
        baseline = [r for r in at_beta if r.objective == "dpo"]
        for name in dict.fromkeys(r.objective for r in at_beta):
            runs = [r for r in at_beta if r.objective == name]
            row = {
                "dpo_beta": dpo_beta,
                "objective": name,
                "beta": runs[0].beta,
                "accuracy": statistics.fmean(r.test_accuracy for r in runs),
                "seeds": len(runs),
            }
            if name != "dpo" and baseline:
                diff = paired_difference(runs, baseline, samples)
                row |= {
                    "difference": 100 * diff.mean,
                    "low": 100 * diff.low,
                    "high": 100 * diff.high,
                    "verdict": _verdict(diff),
                }
            rows.append(row)
    return rows


def _quintile_rows(results: list[RunResult], quintiles: list[int]) -> list[dict]:
    import numpy as np

    groups = np.array(quintiles)
    rows = []
    for name in dict.fromkeys(r.objective for r in results):
        runs = [r for r in results if r.objective == name]
        correct = np.mean([np.array(r.test_margins) > 0 for r in runs], axis=0)
        rows.append(
            {"objective": name}
            | {f"q{q + 1}": float(correct[groups == q].mean()) for q in range(5)}
        )
    return rows


def _strength_rows(results: list[RunResult], settings: Settings) -> list[dict]:
    rows = []
    for dpo_beta in dict.fromkeys(r.dpo_beta for r in results if r.strength):
        runs = [r for r in results if r.strength and r.dpo_beta == dpo_beta]
        rows.append(
            {
                "dpo_beta": dpo_beta,
                "start_cv": _loss_config("mixdpo", dpo_beta, settings).mixdpo_init_cv,
                "mean": statistics.fmean(r.strength["mean"] for r in runs),
                "cv": mean_ci(r.strength["cv"] for r in runs).text(".3f"),
                "seeds": len(runs),
            }
        )
    return rows


def _findings(differences: list[dict], quintiles: list[dict], strengths: list[dict]) -> list[str]:
    lines = []
    for row in differences:
        if "difference" in row:
            lines.append(
                f"{row['objective']} at the strength of DPO's beta {row['dpo_beta']:g} "
                f"(its own beta {row['beta']:.4g}): {row['difference']:+.2f} points "
                f"[{row['low']:+.2f}, {row['high']:+.2f}] over {row['seeds']} seed(s): "
                f"{row['verdict']}."
            )
    by_name = {row["objective"]: row for row in quintiles}
    for name, row in by_name.items():
        if name != "dpo" and "dpo" in by_name:
            gaps = [100 * (row[f"q{q}"] - by_name["dpo"][f"q{q}"]) for q in range(1, 6)]
            lines.append(
                f"{name} - dpo by dispersion quintile (lowest Hn(x) first), headline strength: "
                + ", ".join(f"{gap:+.1f}" for gap in gaps)
                + " points."
            )
    for row in strengths:
        lines.append(
            f"MixDPO's learned beta at DPO's beta {row['dpo_beta']:g}: mean {row['mean']:.4g} "
            f"(held at the start value), CV {row['cv']} from a start of {row['start_cv']:g}."
        )
    return lines


def _figure(differences: list[dict], quintiles: list[dict]) -> Any:
    figure, axes = new_figure(ncols=2, size=(5.5, 4.0))
    left, right = axes[0]
    colours = {name: f"C{index}" for index, name in enumerate(OBJECTIVES)}
    names = list(dict.fromkeys(r["objective"] for r in differences if "difference" in r))
    for offset, name in enumerate(names):
        rows = [r for r in differences if r["objective"] == name and "difference" in r]
        x = [r["dpo_beta"] * (1 + 0.06 * (offset - 1)) for r in rows]
        y = [r["difference"] for r in rows]
        errors = [
            [r["difference"] - r["low"] for r in rows],
            [r["high"] - r["difference"] for r in rows],
        ]
        left.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=name, color=colours.get(name))
    betas = sorted(dict.fromkeys(r["dpo_beta"] for r in differences))
    left.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    left.set_xscale("log")
    left.set_xticks(betas, [f"{beta:g}" for beta in betas])
    left.minorticks_off()
    left.set_xlabel("DPO beta the run is matched to")
    left.set_ylabel("accuracy - DPO's (points), 95% CI")
    left.set_title("Paired difference from DPO (seeds x test pairs)", fontsize=10)
    left.legend(fontsize=8)
    for row in quintiles:
        right.plot(
            range(1, 6),
            [row[f"q{q}"] for q in range(1, 6)],
            marker="o",
            label=row["objective"],
            color=colours.get(row["objective"]),
        )
    right.set_xticks(range(1, 6))
    right.set_xlabel("reference dispersion quintile (1 = lowest Hn(x))")
    right.set_ylabel("held-out implicit-reward accuracy")
    right.set_title("By dispersion, headline strength", fontsize=10)
    right.legend(fontsize=8)
    return figure


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Settings()
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--pairs", type=int, default=defaults.pairs, help="pairs per step")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--test-pairs", type=int, default=defaults.test_pairs)
    parser.add_argument("--fit-steps", type=int, default=defaults.fit_steps)
    parser.add_argument(
        "--betas",
        type=float,
        nargs="+",
        default=[0.1, 0.03, 0.3],
        help="DPO strengths every objective is matched to; the first is the headline",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--grid-seeds", type=int, default=2, help="seeds at the betas after the first"
    )
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--processes", type=int, default=2, help="runs trained at once")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap samples")
    parser.add_argument("--quick", action="store_true", help="200 pairs, few steps (smoke test)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep the fitted model, reference columns and finished runs here; a rerun with the "
        "same settings takes them from there",
    )
    add_output_argument(parser, "hh_tiny")
    return parser.parse_args(argv)


def study_jobs(args: argparse.Namespace, weights: Any, settings: Settings) -> list[Job]:
    """Every objective at every DPO strength (all seeds at the first, ``--grid-seeds`` at the
    others), each with its matched ``loss.beta``."""
    jobs = []
    for index, dpo_beta in enumerate(args.betas):
        seeds = args.seeds if index == 0 else args.seeds[: args.grid_seeds]
        betas = {name: matched_beta(name, dpo_beta, weights, settings) for name in args.objectives}
        jobs += [Job(name, seed, dpo_beta, betas[name]) for seed in seeds for name in betas]
    return jobs


def main(argv: list[str] | None = None) -> None:
    """Fit, precompute the reference, train every job, write the results."""
    args = _parse_args(argv)
    started = time.perf_counter()
    settings = Settings(
        epochs=args.epochs,
        pairs=args.pairs,
        learning_rate=args.learning_rate,
        test_pairs=args.test_pairs,
        fit_steps=args.fit_steps,
    )
    limit = None
    if args.quick:
        settings = dataclasses.replace(settings, epochs=0.2, test_pairs=40, fit_steps=20)
        limit = 200
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        fitted, train, test = prepare_study(work, settings, limit)
        jobs = study_jobs(args, dispersion_weights(train, settings), settings)
        log = work / "runs.jsonl"
        results = run_jobs(fitted, train, test, jobs, settings, args.processes, log)
    headline = [r for r in results if r.dpo_beta == args.betas[0]]
    differences = _difference_rows(results, args.bootstrap)
    quintiles = _quintile_rows(headline, dispersion_quintiles(test))
    strengths = _strength_rows(results, settings)
    reference_accuracy = statistics.fmean(
        float(r["ref_chosen_logps"] > r["ref_rejected_logps"]) for r in test
    )
    write_results(
        "hh_tiny",
        title="Held-out implicit-reward accuracy on HH at matched strength: DPO vs MallowsPO vs "
        "MixDPO (tiny model)",
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        + f" Pairs: {len(train)} train, {len(test)} test; the fitted reference ranks "
        f"{reference_accuracy:.3f} of the test pairs correctly by likelihood.",
        findings=_findings(differences, quintiles, strengths),
        tables=[
            Table(
                "Accuracy and paired difference from DPO at matched strength",
                differences,
                [
                    Column("dpo_beta", "DPO beta"),
                    Column("objective"),
                    Column("beta", "own beta", ".4g"),
                    Column("accuracy", "accuracy", ".3f"),
                    Column("difference", "- DPO (points)", "+.2f"),
                    Column("low", "95% low", "+.2f"),
                    Column("high", "95% high", "+.2f"),
                    Column("verdict"),
                    Column("seeds"),
                ],
                note="The interval is a bootstrap over seeds and test pairs together (paired: "
                "the same seed's DPO run, the same pairs).",
            ),
            Table(
                f"Accuracy by reference dispersion quintile, DPO beta {args.betas[0]:g}",
                quintiles,
                [Column("objective")] + [Column(f"q{q}", f"q{q}", ".3f") for q in range(1, 6)],
                note="q1 holds the fifth of the test pairs with the lowest Hn(x) (the reference "
                "most certain, MallowsPO's largest w(x)); mean over seeds.",
            ),
            Table(
                "MixDPO's learned strength distribution (lognormal)",
                strengths,
                [
                    Column("dpo_beta", "DPO beta"),
                    Column("start_cv", "start CV"),
                    Column("mean", "mean beta", ".4g"),
                    Column("cv", "learned CV (95% CI)"),
                    Column("seeds"),
                ],
            ),
        ],
        settings=dataclasses.asdict(settings) | {k: v for k, v in vars(args).items() if k != "out"},
        data={"runs": [dataclasses.asdict(r) for r in results]},
        figure=_figure(differences, quintiles),
        out=args.out,
        started=started,
    )


if __name__ == "__main__":
    main()

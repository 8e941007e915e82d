"""Held-out implicit-reward accuracy of DPO, MallowsPO-theta/phi and MixDPO on the 1,800 HH pairs.

The embedded tiny Llama is first fitted to the chosen dialogues of the training split
(:func:`raypo.data.tiny_fit.fit_reference`, as ``model.tiny_fit_steps`` does); the fitted model
is both the reference and every policy's starting point. The reference columns (log-probs and
entropies) are computed once over all pairs. Each objective then trains for ``--epochs`` epochs
over the training split with raypo's per-worker step (collate, :func:`raypo.step.preference_step`,
gradient clipping, AdamW; MixDPO's strength distribution with its own Adam, as in
:mod:`raypo.train.loop`) in one process, without Ray: twelve
Ray Train jobs (4 objectives x 3 seeds) do not fit the time budget on two cores. A seed sets the
order of the training pairs and torch's RNG; the train/test split is fixed. The held-out metric is
the fraction of test pairs whose implicit reward ``beta (log pi - log pi_ref)`` is higher for the
chosen response (``eval/rewards/accuracies`` of a raypo run).

    python benchmarks/hh_tiny.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import Column, Table, add_output_argument, mean_ci, new_figure, write_results
from scaling import hh_records

OBJECTIVES = ("dpo", "mallows_theta", "mallows_phi", "mixdpo")


@dataclass(frozen=True)
class Settings:
    """Training settings shared by every objective and seed."""

    epochs: float = 1.0
    pairs: int = 8
    """Pairs per step."""
    learning_rate: float = 5e-4
    beta: float = 0.1
    dispersion_scale: float = 0.29
    max_length: int = 256
    test_pairs: int = 300
    fit_steps: int = 200
    """Steps of the next-token fit that makes the reference."""
    max_grad_norm: float = 1.0


@dataclass(frozen=True)
class RunResult:
    """One objective trained with one seed."""

    objective: str
    seed: int
    test_accuracy: float
    test_margin: float
    """Mean implicit-reward margin (chosen minus rejected) on the test pairs."""
    final_train_loss: float
    """Mean training loss over the last 10% of steps."""
    steps: int
    seconds: float


def split_pairs(tokenizer: Any, settings: Settings, limit: int | None) -> tuple[list, list]:
    """raypo's tokenisation of the HH pairs, shuffled once with seed 0 and cut into train and
    test (``settings.test_pairs``); ``limit`` keeps only that many pairs first."""
    from raypo.config import DataConfig
    from raypo.data.formats import split_hh
    from raypo.data.records import PreferencePair
    from raypo.data.tokenize import TokenizedPair, tokenize_pairs

    pairs = []
    for row, record in enumerate(hh_records(limit), start=1):
        try:
            prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        except ValueError:
            continue
        pairs.append(PreferencePair(f"hh:{row}", prompt, chosen, rejected, None, "hh", row))
    data = DataConfig(
        max_length=settings.max_length, max_prompt_length=settings.max_length * 3 // 4
    )
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    rows = [
        {key: getattr(pair, key) for key in keys}
        for pair in tokenize_pairs(pairs, tokenizer, data)
        if isinstance(pair, TokenizedPair)
    ]
    random.Random(0).shuffle(rows)
    if len(rows) <= settings.test_pairs:
        raise ValueError(f"{len(rows)} usable pairs leave nothing to train beside the test split")
    return rows[settings.test_pairs :], rows[: settings.test_pairs]


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
    """The tiny model fitted to the training split's chosen dialogues, and the two splits."""
    from raypo.data.tiny_fit import fit_reference
    from raypo.models import load_tokenizer, resolve_model_path

    source = resolve_model_path("tiny", cache_dir=work / "cache")
    tokenizer = load_tokenizer(source)
    train, test = split_pairs(tokenizer, settings, limit)
    texts = [tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]) for row in train]
    fitted = fit_reference(
        source, texts, work / "fitted", steps=settings.fit_steps, max_length=settings.max_length
    )
    return fitted, train, test


def _loss_config(name: str, settings: Settings) -> Any:
    from raypo.config import LossConfig

    return LossConfig(type=name, beta=settings.beta, dispersion_scale=settings.dispersion_scale)


def batch_step(model: Any, rows: list[dict], name: str, settings: Settings, strength: Any) -> Any:
    """:func:`raypo.step.preference_step` on the collated ``rows`` (their ``ref_*`` columns are
    the precomputed reference), as a raypo Train worker's ``micro_batch_step`` calls it."""
    from raypo.step import preference_step

    batch = collate(rows, model.config.pad_token_id)
    return preference_step(model, batch, _loss_config(name, settings), strength=strength)


def evaluate(model: Any, rows: list[dict], name: str, settings: Settings, strength: Any) -> dict:
    """Pair-weighted mean of the held-out metrics over ``rows``."""
    import torch

    sums: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), settings.pairs):
            chunk = rows[start : start + settings.pairs]
            metrics = batch_step(model, chunk, name, settings, strength).metrics
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(chunk)
    model.train()
    return {key: value / len(rows) for key, value in sums.items()}


def train_one(
    fitted: Path, train: list, test: list, name: str, seed: int, settings: Settings
) -> RunResult:
    """Train a copy of the fitted model with objective ``name`` and seed, then evaluate it."""
    import torch

    from raypo.losses import StrengthDistribution
    from raypo.models import load_policy
    from raypo.objectives import objective

    started = time.perf_counter()
    torch.manual_seed(seed)
    model, _ = load_policy(str(fitted), "fp32")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0)
    strength = strength_optimizer = None
    if objective(name).learns_strength:
        config = _loss_config(name, settings)
        strength = StrengthDistribution(
            config.mixdpo_distribution, config.beta, config.mixdpo_init_cv
        )
        strength_optimizer = torch.optim.Adam(strength.parameters(), lr=config.mixdpo_lr)
    order = random.Random(seed)
    steps = max(1, round(settings.epochs * len(train) / settings.pairs))
    losses: list[float] = []
    queue: list[dict] = []
    for _ in range(steps):
        if len(queue) < settings.pairs:
            queue = order.sample(train, len(train))
        chunk, queue = queue[: settings.pairs], queue[settings.pairs :]
        loss = batch_step(model, chunk, name, settings, strength).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        for opt in (optimizer, strength_optimizer):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    metrics = evaluate(model, test, name, settings, strength)
    tail = losses[-max(1, steps // 10) :]
    return RunResult(
        objective=name,
        seed=seed,
        test_accuracy=metrics["rewards/accuracies"],
        test_margin=metrics["rewards/margins"],
        final_train_loss=statistics.fmean(tail),
        steps=steps,
        seconds=round(time.perf_counter() - started, 1),
    )


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", choices=OBJECTIVES, default=list(OBJECTIVES))
    parser.add_argument("--quick", action="store_true", help="200 pairs, few steps (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep the fitted model here")
    add_output_argument(parser, "hh_tiny")
    return parser.parse_args(argv)


def _summary(results: list[RunResult], reference_accuracy: float) -> list[dict]:
    rows = [{"objective": "reference (fitted tiny model)", "accuracy": reference_accuracy}]
    for name in dict.fromkeys(r.objective for r in results):
        runs = [r for r in results if r.objective == name]
        accuracy = mean_ci(r.test_accuracy for r in runs)
        rows.append(
            {
                "objective": name,
                "accuracy": accuracy.mean,
                "ci95": accuracy.half_width,
                "per_seed": ", ".join(f"{r.test_accuracy:.3f}" for r in runs),
                "margin": statistics.fmean(r.test_margin for r in runs),
                "final_train_loss": statistics.fmean(r.final_train_loss for r in runs),
                "seeds": len(runs),
            }
        )
    return rows


def _figure(rows: list[dict]) -> Any:
    figure, axes = new_figure(size=(6.0, 3.6))
    axes = axes[0][0]
    names = [row["objective"].replace(" (", "\n(") for row in rows]
    errors = [row.get("ci95", 0.0) for row in rows]
    bars = axes.bar(names, [row["accuracy"] for row in rows], yerr=errors, capsize=4)
    axes.bar_label(bars, fmt="%.3f", label_type="center", color="white", fontsize=8)
    axes.set_ylabel("held-out implicit-reward accuracy")
    axes.set_ylim(0.0, 1.0)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.tick_params(axis="x", labelsize=8)
    axes.set_title("HH harmless, tiny model; mean and 95% CI over seeds", fontsize=10)
    return figure


def main(argv: list[str] | None = None) -> None:
    """Fit, precompute the reference, train every objective x seed, write the results."""
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
    from raypo.models import load_policy

    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        fitted, train, test = fit_tiny(work, settings, limit)
        reference, tokenizer = load_policy(str(fitted), "fp32")
        add_reference_columns(reference.eval(), train + test, tokenizer.pad_token_id, 16)
        results = []
        for seed in args.seeds:
            for name in args.objectives:
                results.append(train_one(fitted, train, test, name, seed, settings))
                print(json.dumps(dataclasses.asdict(results[-1])), flush=True)
    reference_accuracy = statistics.fmean(
        float(r["ref_chosen_logps"] > r["ref_rejected_logps"]) for r in test
    )
    rows = _summary(results, reference_accuracy)
    write_results(
        "hh_tiny",
        title="Held-out implicit-reward accuracy on HH: DPO vs MallowsPO vs MixDPO (tiny model)",
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]
        + f" Pairs: {len(train)} train, {len(test)} test.",
        tables=[
            Table(
                "Test accuracy (mean over seeds, 95% Student-t CI)",
                rows,
                [
                    Column("objective"),
                    Column("accuracy", "accuracy", ".3f"),
                    Column("ci95", "± 95% CI", ".3f"),
                    Column("per_seed", "per seed"),
                    Column("margin", "reward margin", ".4f"),
                    Column("final_train_loss", "train loss (last 10%)", ".4f"),
                    Column("seeds"),
                ],
                note="The reference row is the fitted model's own log-prob accuracy "
                "(chosen more likely than rejected), the accuracy before preference training.",
            )
        ],
        settings=dataclasses.asdict(settings) | {"seeds": args.seeds, "quick": args.quick},
        data={"runs": [dataclasses.asdict(r) for r in results]},
        figure=_figure(rows),
        out=args.out,
        started=started,
    )


if __name__ == "__main__":
    main()

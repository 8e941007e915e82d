"""raypo's DPO step against TRL's DPOTrainer: pairs/s, tokens/s, peak memory, step-1 loss.

Both sides train the same Llama (the standard CPU benchmark: hidden 256, 4 layers, 4 heads, FFN
688, a BPE of 8,192 tokens trained on the 1,800 HH pairs) from the same weights against the same
reference weights (a second model of another seed, so that the first loss depends on both and is
not ln 2), on the same token ids (raypo's tokenisation of the HH pairs, handed to TRL as
``prompt_ids``/``chosen_ids``/``rejected_ids``), in the same batches in the same order, fp32,
AdamW at a constant learning rate, gradient norm clipped at 1, no gradient checkpointing.

Sides: ``trl`` (DPOTrainer, reference forward every step); ``raypo-online`` (the step a raypo
Train worker runs with ``reference.mode: online``: collate, :func:`raypo.step.preference_step`
with the reference model (one chosen+rejected forward of each with chunked log-probs, the loss),
clip, AdamW; no Ray or DeepSpeed); ``raypo-precomputed`` (the same without the reference forward:
the batch carries the ``ref_*`` columns of a pass before training, timed separately);
``raypo-precomputed-bucketed`` (a prototype, :func:`bucketed_step`: the batch's pairs in
length-sorted micro-batches, each through ``preference_step``, gradients accumulated). Each run
is a fresh subprocess (so its peak RSS is its own) and the sides alternate round by round (TRL,
raypo, TRL, raypo, ...) so that load on the shared machine hits them alike; the raypo/TRL ratio
is taken within each round.
Then raypo itself runs on 2 Ray Train workers (ZeRO-2, torch Adam, precomputed reference, the same
global batch).

    python benchmarks/throughput_vs_trl.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    Column,
    Table,
    add_output_argument,
    new_figure,
    peak_rss_bytes,
    write_results,
)
from scaling import QUICK, STANDARD, build_models, hh_records, ray_train_config, run_training

SIDES = ("trl", "raypo-online", "raypo-precomputed", "raypo-precomputed-bucketed")
"""``raypo-precomputed-bucketed`` is a prototype, not raypo's loop: :func:`bucketed_step`."""
BUCKETS = 4
"""Length-sorted micro-batches per step of the bucketed prototype."""
MIB = 2**20


@dataclass(frozen=True)
class Settings:
    """What both sides share."""

    pairs: int = 8
    """Pairs per optimizer step (TRL: ``per_device_train_batch_size``; no accumulation)."""
    max_length: int = 512
    warmup: int = 2
    """Steps run before timing starts."""
    steps: int = 4
    """Timed steps."""
    learning_rate: float = 1e-5
    beta: float = 0.1
    max_grad_norm: float = 1.0
    threads: int = 2
    """``torch.set_num_threads`` on both sides."""


@dataclass(frozen=True)
class SideRun:
    """One timed run of one side."""

    side: str
    step_s: list[float]
    """Wall time of every step (warm-up included): previous step's end to this step's end, so
    collation and the trainer's own bookkeeping count."""
    losses: list[float]
    """Training loss of every step."""
    reference_pass_s: float
    """raypo-precomputed: the reference pass over all batches before training; else 0."""
    baseline_rss_mib: float
    """RSS after the models and data are loaded, before the first step."""
    peak_rss_mib: float


def tokenized_rows(tokenizer: Any, count: int, max_length: int) -> list[dict[str, Any]]:
    """raypo's tokenisation of the first HH pairs (file order), ``count`` accepted ones."""
    from raypo.config import DataConfig
    from raypo.data.formats import split_hh
    from raypo.data.records import PreferencePair
    from raypo.data.tokenize import TokenizedPair, tokenize_pairs

    pairs = []
    # Twice the rows needed covers the few HH pairs that cannot be split or are rejected.
    for row, record in enumerate(hh_records(2 * count + 16), start=1):
        try:
            prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        except ValueError:
            continue
        pairs.append(PreferencePair(f"hh:{row}", prompt, chosen, rejected, None, "hh", row))
    data = DataConfig(max_length=max_length, max_prompt_length=max_length // 2)
    tokenized = [p for p in tokenize_pairs(pairs, tokenizer, data) if isinstance(p, TokenizedPair)]
    if len(tokenized) < count:
        raise ValueError(f"only {len(tokenized)} usable HH pairs, {count} needed")
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return [{key: getattr(pair, key) for key in keys} for pair in tokenized[:count]]


def batch_tokens(rows: list[dict[str, Any]]) -> int:
    """Real (unpadded) tokens of the chosen and rejected sequences of ``rows``."""
    return sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )


def raypo_batches(rows: list[dict[str, Any]], pairs: int, pad_token_id: int) -> list[dict]:
    """raypo's collated ``[2B, T]`` batches of ``pairs`` consecutive rows each."""
    from raypo.data.collate import collate_pairs

    batches = []
    for start in range(0, len(rows) - pairs + 1, pairs):
        chunk = rows[start : start + pairs]
        batches.append(collate_pairs({k: [r[k] for r in chunk] for k in chunk[0]}, pad_token_id))
    return batches


def _rss_mib() -> float:
    import resource

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / MIB


def length_groups(rows: list[dict], groups: int) -> list[list[int]]:
    """Indices of ``rows`` sorted by each pair's longer sequence (prompt + completion) and cut
    into ``groups`` consecutive parts of near-equal size (as ``numpy.array_split``)."""
    longest = [
        len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows
    ]
    order = sorted(range(len(rows)), key=longest.__getitem__)
    size, extra = divmod(len(order), groups)
    parts, first = [], 0
    for group in range(groups):
        last = first + size + (group < extra)
        if last > first:
            parts.append(order[first:last])
        first = last
    return parts


def bucketed_step(
    policy: Any,
    rows: list[dict],
    loss_config: Any,
    pad_token_id: int,
    groups: int,
    reference_model: Any = None,
) -> float:
    """Prototype of padding-saving micro-batches: the pairs of ``rows`` (with their precomputed
    ``ref_*`` values, or with ``reference_model`` online) in ``groups`` length-sorted
    micro-batches (:func:`length_groups`), each collated to its own longest sequence and run
    through :func:`raypo.step.preference_step`; each micro-batch's loss, weighted by its share of
    the pairs, is backpropagated at once (gradient accumulation), so the gradient and the
    returned loss are those of one step on all ``rows``, with most of the padding left out."""
    from raypo.data.collate import collate_pairs
    from raypo.step import preference_step

    total = 0.0
    for index in length_groups(rows, groups):
        part = [rows[i] for i in index]
        batch = collate_pairs({key: [r[key] for r in part] for key in part[0]}, pad_token_id)
        loss = preference_step(policy, batch, loss_config, reference_model=reference_model).loss
        (loss * (len(part) / len(rows))).backward()
        total += float(loss.detach()) * len(part) / len(rows)
    return total


def padding_share(rows: list[dict], pairs: int, groups: int = 1) -> float:
    """Share of the forward's token positions that are padding, over all batches of ``pairs``
    consecutive ``rows``, with the pairs of each batch in ``groups`` length-sorted micro-batches
    (:func:`length_groups`), each padded to its own longest sequence."""
    padded = real = 0
    for start in range(0, len(rows) - pairs + 1, pairs):
        chunk = rows[start : start + pairs]
        for index in length_groups(chunk, groups):
            lengths = [
                len(chunk[i]["prompt_ids"]) + len(chunk[i][key])
                for key in ("chosen_ids", "rejected_ids")
                for i in index
            ]
            padded += len(lengths) * max(lengths)
            real += sum(lengths)
    return 1 - real / padded


def with_reference_values(rows: list[dict], columns: dict) -> list[dict]:
    """``rows`` with the ``ref_*`` values of their batch's reference columns, one float each (as
    the reference pass stores them)."""
    return [
        row | {name: float(values[index]) for name, values in columns.items()}
        for index, row in enumerate(rows)
    ]


def run_raypo(
    policy_dir: Path,
    reference_dir: Path,
    rows: list[dict],
    settings: Settings,
    online: bool,
    buckets: int = 1,
) -> SideRun:
    """raypo's per-worker DPO step (:func:`raypo.step.preference_step`), in this process: online
    or precomputed reference; with ``buckets`` > 1 the :func:`bucketed_step` prototype."""
    import torch

    from raypo.config import LossConfig
    from raypo.forward import reference_columns
    from raypo.models import load_policy
    from raypo.step import preference_step

    torch.manual_seed(0)
    policy, tokenizer = load_policy(str(policy_dir), "fp32")
    reference, _ = load_policy(str(reference_dir), "fp32")
    policy.train()
    reference.requires_grad_(False)
    batches = raypo_batches(rows, settings.pairs, tokenizer.pad_token_id)
    chunks = [rows[i : i + settings.pairs] for i in range(0, len(rows), settings.pairs)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    loss_config = LossConfig(type="dpo", beta=settings.beta)
    pass_s = 0.0
    if not online:
        started = time.perf_counter()
        columns = [reference_columns(reference, batch) for batch in batches]
        pass_s = time.perf_counter() - started
    baseline = _rss_mib()
    step_s, losses = [], []
    last = time.perf_counter()
    for index, chunk in enumerate(chunks[: len(batches)]):
        optimizer.zero_grad(set_to_none=True)
        if buckets > 1:
            rows_with_ref = chunk if online else with_reference_values(chunk, columns[index])
            online_reference = reference if online else None
            loss = bucketed_step(
                policy,
                rows_with_ref,
                loss_config,
                tokenizer.pad_token_id,
                buckets,
                online_reference,
            )
        else:
            batch = raypo_batches(chunk, settings.pairs, tokenizer.pad_token_id)[0]
            if online:
                result = preference_step(policy, batch, loss_config, reference_model=reference)
            else:
                result = preference_step(policy, batch | columns[index], loss_config)
            result.loss.backward()
            loss = float(result.loss.detach())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), settings.max_grad_norm)
        optimizer.step()
        losses.append(loss)
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
    side = "raypo-online" if online else "raypo-precomputed"
    side += "-bucketed" if buckets > 1 else ""
    return SideRun(side, step_s, losses, pass_s, baseline, peak_rss_bytes() / MIB)


def trl_dataset(rows: list[dict[str, Any]]) -> Any:
    """The rows as the pre-tokenised ``datasets.Dataset`` TRL's collator reads."""
    from datasets import Dataset

    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return Dataset.from_dict({key: [list(r[key]) for r in rows] for key in keys})


def trl_trainer(
    policy_dir: Path, reference_dir: Path, rows: list[dict], settings: Settings, output: Path
) -> Any:
    """A TRL DPOTrainer on ``rows`` with raypo's token ids and the shared settings; its
    ``losses`` list receives every training loss and ``step_ends`` every step's end time."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from raypo.models import load_policy

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.step_ends.append(time.perf_counter())

    class PretokenizedDPOTrainer(DPOTrainer):
        """Takes the dataset as already tokenised (by raypo) and records each loss."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    policy, tokenizer = load_policy(str(policy_dir), "fp32")
    reference, _ = load_policy(str(reference_dir), "fp32")
    config = DPOConfig(
        output_dir=str(output),
        per_device_train_batch_size=settings.pairs,
        gradient_accumulation_steps=1,
        max_steps=len(rows) // settings.pairs,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=settings.max_grad_norm,
        optim="adamw_torch",
        beta=settings.beta,
        loss_type=["sigmoid"],
        max_length=settings.max_length,
        precompute_ref_log_probs=False,
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PretokenizedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=trl_dataset(rows),
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )
    trainer.losses, trainer.step_ends = [], []
    return trainer


def run_trl(policy_dir: Path, reference_dir: Path, rows: list[dict], settings: Settings) -> SideRun:
    """TRL's DPOTrainer, in this process, on the same rows and settings."""
    with tempfile.TemporaryDirectory() as output:
        trainer = trl_trainer(policy_dir, reference_dir, rows, settings, Path(output))
        baseline = _rss_mib()
        started = time.perf_counter()
        trainer.train()
    ends = [started, *trainer.step_ends]
    step_s = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return SideRun("trl", step_s, trainer.losses, 0.0, baseline, peak_rss_bytes() / MIB)


RESULT_PREFIX = "SIDE_RUN "


def _worker(args: argparse.Namespace) -> None:
    """Child process: one side's run on the prepared setup; prints a JSON line."""
    import torch

    settings = Settings(**json.loads(args.settings))
    torch.set_num_threads(settings.threads)
    setup = Path(args.setup)
    rows = json.loads((setup / "rows.json").read_text())
    models = (setup / "models" / "policy", setup / "models" / "reference")
    if args.worker == "trl":
        run = run_trl(*models, rows, settings)
    else:
        buckets = BUCKETS if args.worker.endswith("bucketed") else 1
        run = run_raypo(*models, rows, settings, args.worker == "raypo-online", buckets)
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(run)), flush=True)


def run_side(side: str, setup: Path, settings: Settings) -> SideRun:
    """One side's run in a fresh Python process (its own peak RSS, no state from other runs)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side]
    command += ["--setup", str(setup), "--settings", json.dumps(dataclasses.asdict(settings))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{side} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return SideRun(**json.loads(lines[-1][len(RESULT_PREFIX) :]))


def prepare_setup(shape: Any, settings: Settings, directory: Path) -> list[dict[str, Any]]:
    """Models (policy, reference, tokenizer) and the tokenised rows of all steps, in
    ``directory``; returns the rows."""
    from raypo.models import load_tokenizer

    policy, _ = build_models(shape, directory / "models")
    tokenizer = load_tokenizer(str(policy))
    count = settings.pairs * (settings.warmup + settings.steps)
    rows = tokenized_rows(tokenizer, count, settings.max_length)
    (directory / "rows.json").write_text(json.dumps(rows))
    return rows


def steady(run: SideRun, settings: Settings, rows: list[dict]) -> dict[str, float]:
    """Pairs/s, tokens/s and mean step time over the timed steps of one run (and, for the
    precomputed reference, with the pass's time spread over one epoch's steps)."""
    timed = run.step_s[settings.warmup :]
    seconds = sum(timed)
    tokens = batch_tokens(rows[settings.warmup * settings.pairs :])
    result = {
        "pairs_per_s": settings.pairs * len(timed) / seconds,
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(timed),
    }
    if run.reference_pass_s:
        per_step = seconds / len(timed) + run.reference_pass_s / len(run.step_s)
        result["pairs_per_s_with_pass"] = settings.pairs / per_step
    return result


def summary_rows(rounds: list[dict[str, SideRun]], settings: Settings, rows: list[dict]) -> list:
    """One table row per side: medians over rounds; the ratio to TRL is taken per round."""
    table = []
    trl_first = rounds[0]["trl"].losses
    for side in SIDES:
        stats = [steady(r[side], settings, rows) for r in rounds]
        ratios = [
            steady(r[side], settings, rows)["pairs_per_s"]
            / steady(r["trl"], settings, rows)["pairs_per_s"]
            for r in rounds
        ]
        first = rounds[0][side].losses
        row = {
            "side": side,
            "pairs_per_s": statistics.median(s["pairs_per_s"] for s in stats),
            "tokens_per_s": statistics.median(s["tokens_per_s"] for s in stats),
            "step_s": statistics.median(s["step_s"] for s in stats),
            "ratio_vs_trl": statistics.median(ratios),
            "peak_rss_mib": max(r[side].peak_rss_mib for r in rounds),
            "rss_growth_mib": max(r[side].peak_rss_mib - r[side].baseline_rss_mib for r in rounds),
            "loss_step1": first[0],
            "loss_step1_gap": abs(first[0] - trl_first[0]),
            "loss_max_gap": max(abs(a - b) for a, b in zip(first, trl_first, strict=True)),
        }
        table.append(row)
        if side == "raypo-precomputed":
            with_pass = statistics.median(s["pairs_per_s_with_pass"] for s in stats)
            trl = statistics.median(steady(r["trl"], settings, rows)["pairs_per_s"] for r in rounds)
            table.append(
                {
                    "side": "raypo-precomputed + reference pass (1 epoch)",
                    "pairs_per_s": with_pass,
                    "ratio_vs_trl": with_pass / trl,
                }
            )
    return table


def ray_row(models: tuple[Path, Path], settings: Settings, work: Path, trl: float) -> dict:
    """raypo on 2 Ray Train workers x 1 CPU (ZeRO-2, torch Adam, precomputed reference)."""
    from scaling import start_ray

    start_ray(4)
    config = ray_train_config(
        work / "ray2",
        *models,
        workers=2,
        cpus_per_worker=1.0,
        global_batch=settings.pairs,
        steps=settings.warmup + settings.steps,
        max_length=settings.max_length,
    )
    result = run_training("raypo, 2 Ray Train workers", config, settings.warmup)
    return {
        "side": "raypo, 2 Ray Train workers x 1 CPU (ZeRO-2, precomputed)",
        "pairs_per_s": result.pairs_per_s,
        "tokens_per_s": result.tokens_per_s,
        "step_s": result.step_s_median,
        "ratio_vs_trl": result.pairs_per_s / trl,
        "loss_step1": result.first_loss,
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Settings()
    parser.add_argument("--pairs", type=int, default=defaults.pairs, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed steps")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="timed steps")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of all sides")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--no-ray", action="store_true", help="skip the 2-worker Ray Train run")
    parser.add_argument("--quick", action="store_true", help="small model and steps (smoke test)")
    parser.add_argument("--work-dir", type=Path, help="keep models and runs here")
    add_output_argument(parser, "throughput_vs_trl")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.max_length, args.warmup, args.steps, args.rounds = 4, 128, 1, 2, 1
    return args


def _figure(table: list[dict]) -> Any:
    figure, axes = new_figure(ncols=2, size=(6.0, 4.2))
    names = [row["side"].replace(" (", "\n(").replace(" + ", "\n+ ") for row in table]
    bars = axes[0][0].barh(names, [row["pairs_per_s"] for row in table], color="tab:blue")
    labels = [f"{row['pairs_per_s']:.2f} ({row['ratio_vs_trl']:.2f}x TRL)" for row in table]
    axes[0][0].bar_label(bars, labels=labels, fontsize=7)
    axes[0][0].set_xlim(0, 1.5 * max(row["pairs_per_s"] for row in table))
    axes[0][0].set_xlabel("pairs/s (steady state)")
    axes[0][0].invert_yaxis()
    axes[0][0].tick_params(axis="y", labelsize=7)
    measured = [row for row in table if "peak_rss_mib" in row]
    axes[0][1].barh([r["side"] for r in measured], [r["peak_rss_mib"] for r in measured])
    axes[0][1].set_xlabel("peak RSS of the run's process (MiB)")
    axes[0][1].invert_yaxis()
    axes[0][1].tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    return figure


COLUMNS = [
    Column("side"),
    Column("pairs_per_s", "pairs/s", ".3f"),
    Column("tokens_per_s", "tokens/s", ".0f"),
    Column("step_s", "step s", ".3f"),
    Column("ratio_vs_trl", "raypo/TRL", ".2f"),
    Column("peak_rss_mib", "peak RSS MiB", ".0f"),
    Column("rss_growth_mib", "RSS growth in training MiB", ".0f"),
    Column("loss_step1", "loss step 1", ".7f"),
    Column("loss_step1_gap", "|loss 1 - TRL|", ".1e"),
    Column("loss_max_gap", "max |loss - TRL| all steps", ".1e"),
]


def _findings(table: list[dict], settings: Settings, rows: list[dict]) -> list[str]:
    by_side = {row["side"]: row for row in table}
    timed = rows[settings.warmup * settings.pairs :]
    lines = [
        f"{row['side']}: {row['ratio_vs_trl']:.2f}x TRL's pairs/s"
        for row in table
        if row["side"] != "trl"
    ]
    gap = max(by_side[s]["loss_step1_gap"] for s in SIDES)
    lines.append(
        f"Step-1 loss: TRL {by_side['trl']['loss_step1']:.7f}, raypo "
        f"{by_side['raypo-online']['loss_step1']:.7f}; largest gap {gap:.1e}, over all "
        f"{settings.warmup + settings.steps} steps "
        f"{max(by_side[s]['loss_max_gap'] for s in SIDES):.1e}."
    )
    lines.append(
        f"Padding: {100 * padding_share(timed, settings.pairs):.0f}% of the forward's token "
        f"positions in the timed batches (both sides pad to the batch's longest sequence); "
        f"{100 * padding_share(timed, settings.pairs, BUCKETS):.0f}% with the "
        f"{settings.pairs} pairs in {BUCKETS} length-sorted micro-batches (the bucketed "
        "prototype)."
    )
    return lines


def main(argv: list[str] | None = None) -> None:
    """Measure every side over alternating rounds, then raypo on Ray; write the results."""
    args = _parse_args(argv)
    if args.worker:
        _worker(args)
        return
    started = time.perf_counter()
    shape = QUICK if args.quick else STANDARD
    settings = Settings(
        pairs=args.pairs,
        max_length=args.max_length,
        warmup=args.warmup,
        steps=args.steps,
        threads=args.threads,
    )
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work_dir or Path(scratch)
        rows = prepare_setup(shape, settings, work)
        rounds = []
        for index in range(args.rounds):
            rounds.append({side: run_side(side, work, settings) for side in SIDES})
            print(f"round {index + 1}: " + json.dumps(summary_rows(rounds[-1:], settings, rows)))
        table = summary_rows(rounds, settings, rows)
        if not args.no_ray:
            models = (work / "models" / "policy", work / "models" / "reference")
            table.append(ray_row(models, settings, work, table[0]["pairs_per_s"]))
    write_results(
        "throughput_vs_trl",
        title="raypo vs TRL DPOTrainer: throughput, memory and step-1 loss",
        description=__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0],
        tables=[Table("Steady state, medians over rounds", table, COLUMNS)],
        findings=_findings(table, settings, rows),
        settings=dataclasses.asdict(settings)
        | {"rounds": args.rounds, "quick": args.quick, "model": dataclasses.asdict(shape)},
        data={"rounds": [{s: dataclasses.asdict(r[s]) for s in r} for r in rounds]},
        figure=_figure(table),
        out=args.out,
        started=started,
    )
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()

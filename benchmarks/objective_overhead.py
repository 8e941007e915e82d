"""Step time, tokens/s and peak memory of each objective against DPO, in one process, same batches.

The training step of raypo (:func:`raypo.step.preference_step` on a collated batch: one
concatenated chosen+rejected forward with chunked log-probs -> objective; then backward -> AdamW)
on real HH pairs, with the reference columns precomputed as in ``reference.mode: precomputed``.
Objectives are interleaved round-robin so machine noise hits them alike; the reported time is the
median over rounds.

    python benchmarks/objective_overhead.py
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import gc
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import (
    Column,
    Table,
    add_output_argument,
    current_rss_bytes,
    peak_rss_bytes,
    relative_percent,
    reset_peak_rss,
    round_robin_seconds,
    write_results,
)

from raypo.config import DataConfig, LossConfig
from raypo.data.collate import collate_pairs
from raypo.data.formats import split_hh
from raypo.data.records import PreferencePair
from raypo.data.tokenize import tokenize_pairs
from raypo.forward import reference_columns
from raypo.losses import StrengthDistribution
from raypo.models import TinyModelSpec, build_tiny_model, load_tokenizer
from raypo.step import preference_step

HH = Path(__file__).resolve().parents[1] / "tests" / "data" / "hh_harmless_1800.jsonl.gz"
OBJECTIVES = ("dpo", "mallows_theta", "mallows_phi", "mixdpo")


def _batches(tokenizer, pairs_per_step: int, steps: int, max_length: int) -> list[dict]:
    lines = gzip.decompress(HH.read_bytes()).decode().splitlines()
    pairs = []
    for row, line in enumerate(lines[: pairs_per_step * steps], start=1):
        record = json.loads(line)
        prompt, chosen, rejected = split_hh(record["chosen"], record["rejected"])
        pairs.append(PreferencePair(f"hh:{row}", prompt, chosen, rejected, None, "hh", row))
    data = DataConfig(max_length=max_length, max_prompt_length=max_length // 2)
    rows = [p.to_row() for p in tokenize_pairs(pairs, tokenizer, data) if hasattr(p, "to_row")]
    batches = []
    for start in range(0, len(rows) - pairs_per_step + 1, pairs_per_step):
        chunk = rows[start : start + pairs_per_step]
        columns = {name: [row[name] for row in chunk] for name in chunk[0]}
        batches.append(collate_pairs(columns, tokenizer.pad_token_id))
    return batches


def _step(model, optimizer, batch, name: str, strength) -> None:
    config = LossConfig(type=name, dispersion_scale=0.29)
    loss = preference_step(model, batch, config, strength=strength).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="distinct batches")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the batches")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    add_output_argument(parser, "objective_overhead")
    return parser.parse_args()


def _rows(
    seconds: dict[str, float], peaks: dict[str, int], tokens: int, pairs: int, steps: int
) -> list[dict]:
    overhead = relative_percent(seconds, "dpo")
    return [
        {
            "objective": name,
            "step_s": round(seconds[name] / steps, 4),
            "tokens_per_s": round(tokens / seconds[name]),
            "pairs_per_s": round(pairs * steps / seconds[name], 2),
            "overhead_vs_dpo_pct": round(overhead[name], 2),
            "step_peak_mib": round(peaks[name] / 2**20),
            "step_peak_vs_dpo_pct": round(100 * (peaks[name] / peaks["dpo"] - 1), 2),
        }
        for name in OBJECTIVES
    ]


def _step_peaks(epoch) -> dict[str, int]:
    """Per objective, how far RSS rose above its level before one pass over the batches
    (activations, gradients and optimizer temporaries; the models themselves are resident)."""
    libc = ctypes.CDLL("libc.so.6")
    peaks = {}
    for name in OBJECTIVES:
        gc.collect()
        libc.malloc_trim(0)  # hand freed heap back, or RSS would not rise above what is kept
        before = current_rss_bytes()
        reset_peak_rss()
        epoch(name)
        peaks[name] = peak_rss_bytes() - before
    return peaks


def main() -> None:
    args = _parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache:
        tokenizer = load_tokenizer("tiny", cache_dir=Path(cache))
    spec = TinyModelSpec(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        head_dim=64,
        intermediate_size=int(args.hidden * 2.6875),
        max_position_embeddings=max(1024, args.max_length),
    )
    reference = build_tiny_model(spec, tokenizer).eval()
    batches = _batches(tokenizer, args.pairs, args.steps, args.max_length)
    for batch in batches:
        batch |= reference_columns(reference, batch)

    models, optimizers, strengths = {}, {}, {}
    for name in OBJECTIVES:
        models[name] = build_tiny_model(spec, tokenizer).train()
        strengths[name] = StrengthDistribution("lognormal", 0.1, 0.5) if name == "mixdpo" else None
        params = list(models[name].parameters())
        params += list(strengths[name].parameters()) if strengths[name] else []
        optimizers[name] = torch.optim.AdamW(params, lr=1e-5)

    def epoch(name: str) -> None:
        for batch in batches:
            _step(models[name], optimizers[name], batch, name, strengths[name])

    times = round_robin_seconds(
        {name: functools.partial(epoch, name) for name in OBJECTIVES}, rounds=args.rounds
    )
    peaks = _step_peaks(epoch)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    rows = _rows(seconds, peaks, tokens, args.pairs, len(batches))
    table = Table(
        "step time per objective, same batches, interleaved",
        rows,
        [
            Column("objective"),
            Column("step_s", "step (s)"),
            Column("tokens_per_s", "tokens/s"),
            Column("pairs_per_s", "pairs/s"),
            Column("overhead_vs_dpo_pct", "overhead vs DPO (%)"),
            Column("step_peak_mib", "step peak RSS rise (MiB)"),
            Column("step_peak_vs_dpo_pct", "peak vs DPO (%)"),
        ],
        note=f"Llama hidden {args.hidden}, {args.layers} layers, vocab {spec.vocab_size}; "
        f"{args.pairs} pairs/step, max length {args.max_length}, {torch.get_num_threads()} torch "
        f"threads; peak RSS {round(peak_rss_bytes() / 2**20)} MiB. First round is warm-up; "
        "median of the other rounds; fp32; single process. Step peak: RSS rise above the level "
        "before one pass over the batches, measured after the timed rounds, one objective at a "
        "time (VmHWM reset between them).",
    )
    files = write_results(
        "objective_overhead",
        title="Objective overhead against DPO",
        description=__doc__.split("\n\n")[1],
        tables=[table],
        settings=args,
        data={"model": dataclasses.asdict(spec), "round_seconds": times},
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

"""Step time, tokens/s and peak memory of each objective against DPO, in one process, same batches.

The training step of raypo (collate -> one concatenated chosen+rejected forward with chunked
log-probs -> objective -> backward -> AdamW) on real HH pairs, with the reference columns
precomputed as in ``reference.mode: precomputed``. Objectives are interleaved round-robin so
machine noise hits them alike; the reported time is the median over rounds.

    python benchmarks/objective_overhead.py --out benchmarks/results/objective_overhead
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from raypo.config import DataConfig, LossConfig
from raypo.data.collate import collate_pairs
from raypo.data.formats import split_hh
from raypo.data.records import PreferencePair
from raypo.data.tokenize import tokenize_pairs
from raypo.forward import preference_batch, reference_columns, sequence_stats
from raypo.losses import StrengthDistribution, preference_loss
from raypo.models import TinyModelSpec, build_tiny_model, load_tokenizer

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


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return 1024 * int(next(line for line in status if line.startswith("VmHWM:")).split()[1])


def _step(model, optimizer, batch, name: str, strength) -> None:
    stats = sequence_stats(model, batch, compute_entropy=False)
    inputs = preference_batch(stats, batch, 0.29)
    loss, _ = preference_loss(dataclasses.replace(LossConfig(), type=name), inputs, strength)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step")
    parser.add_argument("--steps", type=int, default=4, help="distinct batches")
    parser.add_argument("--rounds", type=int, default=3, help="passes over the batches")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/objective_overhead")
    args = parser.parse_args()

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
    times: dict[str, list[float]] = {name: [] for name in OBJECTIVES}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    for _ in range(args.rounds + 1):
        for name in OBJECTIVES:
            started = time.perf_counter()
            for batch in batches:
                _step(models[name], optimizers[name], batch, name, strengths[name])
            times[name].append(time.perf_counter() - started)
    dpo = statistics.median(times["dpo"][1:])
    rows = []
    for name in OBJECTIVES:
        seconds = statistics.median(times[name][1:])
        rows.append(
            {
                "objective": name,
                "step_s": round(seconds / len(batches), 4),
                "tokens_per_s": round(tokens / seconds),
                "pairs_per_s": round(args.pairs * len(batches) / seconds, 2),
                "overhead_vs_dpo_pct": round(100 * (seconds / dpo - 1), 2),
            }
        )
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.platform()}, {psutil.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "model": dataclasses.asdict(spec),
        "pairs_per_step": args.pairs,
        "max_length": args.max_length,
        "peak_rss_mib": round(_peak_rss_bytes() / 2**20),
        "note": "first round is warm-up; median of the other rounds; fp32; single process",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    table = [
        "| objective | step (s) | tokens/s | pairs/s | overhead vs DPO |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['objective']} | {r['step_s']} | {r['tokens_per_s']} | {r['pairs_per_s']} | "
        f"{r['overhead_vs_dpo_pct']}% |"
        for r in rows
    ]
    header = f"# objective overhead ({meta['date']})\n\n{meta['machine']}; torch {meta['torch']}; "
    header += f"Llama hidden {args.hidden}, {args.layers} layers, vocab {spec.vocab_size}; "
    header += f"{args.pairs} pairs/step, max length {args.max_length}. {meta['note']}.\n\n"
    out.with_suffix(".md").write_text(header + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

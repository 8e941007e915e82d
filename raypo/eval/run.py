"""``raypo eval``: sample from the policy and a baseline, score both, write RUN_DIR/eval/.

1. The held-out pairs of the run (``RUN_DIR/prepared``, split eval; the data stage runs first
   when it is missing) give the prompts: the first ``eval.num_prompts`` by pair id.
2. The policy (``eval.policy``, default ``RUN_DIR/final``) and the baseline (``eval.baseline``:
   ``reference`` = the run's reference model, or another model) each sample ``eval.n``
   completions per prompt on the chosen backend (:mod:`raypo.eval.sampling`).
3. Ray tasks score them (:mod:`raypo.eval.scorers`): the policy and the reference model compute
   log-probs of the held-out pairs (implicit-reward accuracy, overall and per group) and of the
   sampled completions (the KL estimate); a reward model, when ``eval.reward_model`` is set,
   scores prompt + completion of both sides (rewards and the win rate).
4. ``results.json``, ``samples.jsonl`` (the format of the evaluation contract) and the resolved
   ``config.yaml`` of the evaluation are written to ``RUN_DIR/eval`` (and the config to
   ``RUN_DIR/config.yaml`` when the directory has none), then
   ``raypo.eval.report.build_report`` renders the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import ray

from raypo.config import RaypoConfig, save_config
from raypo.console import stage
from raypo.eval.sampling import (
    BackendChoice,
    EvalError,
    EvalPair,
    SampleRun,
    choose_backend,
    cluster_has_gpus,
    load_eval_pairs,
    sample_completions,
)
from raypo.eval.scorers import (
    generation_stats,
    implicit_reward,
    kl_estimate,
    pair_logps,
    reward_scores,
    reward_summary,
    win_rate,
)
from raypo.generation import SamplingSettings
from raypo.lora import adapter_settings, is_adapter_dir
from raypo.models import ModelLoadError, load_tokenizer, resolve_model_path
from raypo.ray_runtime import init_ray
from raypo.run_layout import ExportLayout, RunLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPaths:
    """The three models of an evaluation, resolved to directories or hub ids."""

    policy: str
    """The model evaluated."""
    baseline: str
    """The model it is compared with (the reference when ``eval.baseline`` is ``reference``)."""
    reference: str
    """The reference of the KL and the implicit reward."""
    baseline_label: str
    """``reference`` or the baseline's path, as results.json records it."""


def model_paths(config: RaypoConfig) -> ModelPaths:
    """Resolve ``eval.policy`` (default ``RUN_DIR/final``), ``eval.baseline`` and the reference."""
    policy = config.eval.policy
    if policy is None:
        final = RunLayout(config.run_path).final
        if not (ExportLayout(final).hf_config.is_file() or is_adapter_dir(final)):
            raise EvalError(
                f"no trained policy at {final}: finish training first (raypo train), or name the "
                "model to evaluate with --policy PATH"
            )
        policy = str(final)
    reference = resolve_model_path(config.reference_model_path)
    label = config.eval.baseline
    baseline = reference if label == "reference" else resolve_model_path(label)
    return ModelPaths(resolve_model_path(policy), baseline, reference, label)


VLLM_UNSERVED_ADAPTER_SETTINGS = ("use_dora", "modules_to_save")
"""The ``model.lora`` settings (PEFT's names) of an adapter that vLLM's LoRA does not serve."""


def check_backend_loads(backend: BackendChoice, paths: ModelPaths) -> None:
    """Refuse, for vLLM, a LoRA adapter directory (a run's ``final/adapter``, or ``final/`` of
    an adapter-only export) trained with a setting vLLM's LoRA does not serve (DoRA, modules
    trained in full). vLLM serves any other adapter on its base
    (:class:`raypo.eval.vllm_actor.VLLMSampler`); the hf backend loads every adapter merged
    into its base (:func:`raypo.models.load_policy`)."""
    if backend.name != "vllm":
        return
    for path in (paths.policy, paths.baseline):
        if not is_adapter_dir(path):
            continue
        settings = adapter_settings(path)
        unserved = [name for name in VLLM_UNSERVED_ADAPTER_SETTINGS if settings.get(name)]
        if unserved:
            raise EvalError(
                f"{path} is a LoRA adapter with {' and '.join(unserved)}, which vLLM's LoRA does "
                "not serve: evaluate the merged model a LoRA run writes beside it (RUN_DIR/final, "
                "unless model.lora.merge_on_export was false), or set eval.backend hf"
            )


def _task_options(config: RaypoConfig) -> dict[str, Any]:
    if cluster_has_gpus():
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": config.eval.cpus_per_actor}


def _logp_rows(pairs: list[EvalPair], policy: SampleRun, baseline: SampleRun) -> dict[str, list]:
    """Held-out pairs first, then one row per sample: (prompt, policy completion, baseline
    completion), so one pass of a model gives both the implicit reward and the KL terms."""
    prompts = [p.prompt_ids for p in pairs]
    sample_prompts = [prompts[g.prompt_index] for g in policy.generations]
    return {
        "prompt_ids": [p.prompt_ids for p in pairs] + sample_prompts,
        "chosen_ids": [p.chosen_ids for p in pairs] + [g.token_ids for g in policy.generations],
        "rejected_ids": [p.rejected_ids for p in pairs]
        + [g.token_ids for g in baseline.generations],
    }


def _score(
    config: RaypoConfig,
    paths: ModelPaths,
    pairs: list[EvalPair],
    prompt_texts: list[str],
    policy: SampleRun,
    baseline: SampleRun,
) -> dict[str, Any]:
    """Run the scoring tasks (policy and reference log-probs, reward model) concurrently."""
    options = _task_options(config)
    rows = _logp_rows(pairs, policy, baseline)
    logps = ray.remote(pair_logps).options(**options, num_returns=2)
    common = {
        **config.model.load_kwargs,
        "batch_size": config.eval.batch_size,
        "chunk_size": config.trainer.logits_chunk_size,
    }
    futures = {
        "policy": logps.remote(paths.policy, rows=rows, **common),
        "reference": logps.remote(paths.reference, rows=rows, **common),
    }
    if config.eval.reward_model is not None:
        texts = [
            prompt_texts[g.prompt_index] + g.text
            for run in (policy, baseline)
            for g in run.generations
        ]
        futures["rewards"] = (
            ray.remote(reward_scores)
            .options(**options)
            .remote(
                resolve_model_path(config.eval.reward_model),
                texts,
                batch_size=config.eval.batch_size,
            )
        )
    return {name: ray.get(future) for name, future in futures.items()}


def _reward_results(
    config: RaypoConfig, rewards: np.ndarray, num_prompts: int
) -> tuple[dict[str, Any], dict[str, Any], np.ndarray, np.ndarray]:
    policy, baseline = np.split(rewards, 2)
    shape = (num_prompts, config.eval.n)
    rate = win_rate(
        policy.reshape(shape),
        baseline.reshape(shape),
        bootstrap_samples=config.eval.bootstrap_samples,
        confidence_level=config.eval.confidence_level,
        seed=config.eval.seed,
    )
    summary = {"policy": reward_summary(policy), "baseline": reward_summary(baseline)}
    return summary, asdict(rate), policy, baseline


def _results(
    config: RaypoConfig,
    paths: ModelPaths,
    backend: Any,
    pairs: list[EvalPair],
    runs: tuple[SampleRun, SampleRun],
    scores: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, np.ndarray | None]]:
    """results.json's content (without ``seconds``) and the per-sample columns of
    samples.jsonl."""
    count = len(pairs)
    (pol_w, pol_l), (ref_w, ref_l) = scores["policy"], scores["reference"]
    implicit = implicit_reward(
        pol_w[:count], pol_l[:count], ref_w[:count], ref_l[:count], config.loss.beta,
        [p.group for p in pairs],
    )  # fmt: skip
    policy_run, baseline_run = runs
    prompt_index = np.array([g.prompt_index for g in policy_run.generations])
    kl = kl_estimate(pol_w[count:], ref_w[count:], prompt_index)
    rewards, rate, policy_rewards, baseline_rewards = None, None, None, None
    if "rewards" in scores:
        num_prompts = len(policy_run.generations) // config.eval.n
        rewards, rate, policy_rewards, baseline_rewards = _reward_results(
            config, scores["rewards"], num_prompts
        )
    generation = {
        side: asdict(
            generation_stats(
                [g.text for g in run.generations],
                [len(g.token_ids) for g in run.generations],
                run.seconds,
            )
        )
        for side, run in zip(("policy", "baseline"), runs, strict=True)
    }
    results = {
        "policy": paths.policy,
        "baseline": paths.baseline_label,
        "reference": paths.reference,
        "backend": backend.name,
        "backend_reason": backend.reason,
        "sampling": SamplingSettings.from_config(config.eval).to_json(),
        "num_prompts": len(policy_run.generations) // config.eval.n,
        "num_samples": len(policy_run.generations),
        "generation": generation,
        "kl": asdict(kl),
        "reward_model": config.eval.reward_model,
        "rewards": rewards,
        "win_rate": rate,
        "implicit_reward": implicit.to_json(),
    }
    columns = {
        "policy_logp": pol_w[count:],
        "reference_logp": ref_w[count:],
        "policy_reward": policy_rewards,
        "baseline_reward": baseline_rewards,
    }
    return results, columns


def _sample_lines(
    pairs: list[EvalPair],
    prompt_texts: list[str],
    runs: tuple[SampleRun, SampleRun],
    columns: dict[str, np.ndarray | None],
) -> list[str]:
    lines = []
    for k, (mine, theirs) in enumerate(zip(runs[0].generations, runs[1].generations, strict=True)):
        pair = pairs[mine.prompt_index]
        record = {
            "prompt_id": pair.id,
            "prompt": prompt_texts[mine.prompt_index],
            "group": pair.group,
            "sample_index": mine.sample_index,
            "policy_completion": mine.text,
            "baseline_completion": theirs.text,
            "policy_tokens": len(mine.token_ids),
            "baseline_tokens": len(theirs.token_ids),
        }
        for name, values in columns.items():
            record[name] = None if values is None else float(values[k])
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return lines


def evaluate(config: RaypoConfig, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Run the evaluation of ``config`` (module docstring) and return results.json's content."""
    started = time.perf_counter()
    paths = model_paths(config)
    init_ray()
    backend = choose_backend(config.eval.backend, paths.policy, gpus=cluster_has_gpus())
    check_backend_loads(backend, paths)
    log(f"sampling backend: {backend.name} ({backend.reason})")
    pairs = load_eval_pairs(config)
    prompt_pairs = pairs[: config.eval.num_prompts] if config.eval.num_prompts else pairs
    prompts = [p.prompt_ids for p in prompt_pairs]
    tokenizer = load_tokenizer(paths.policy, trust_remote_code=config.model.trust_remote_code)
    prompt_texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
    log(f"sampling {config.eval.n} x {len(prompts)} completions from policy and baseline")
    loading = config.model.load_kwargs
    runs = (
        sample_completions(backend.name, paths.policy, prompts, config.eval, **loading),
        sample_completions(backend.name, paths.baseline, prompts, config.eval, **loading),
    )
    sampled = time.perf_counter()
    scores = _score(config, paths, pairs, prompt_texts, *runs)
    scored = time.perf_counter()
    log(f"sampled in {sampled - started:.1f} s, scored in {scored - sampled:.1f} s")
    results, columns = _results(config, paths, backend, pairs, runs, scores)
    results["seconds"] = {
        "sampling": sampled - started,
        "scoring": scored - sampled,
        "total": time.perf_counter() - started,
    }
    layout = RunLayout(config.run_path)
    layout.eval_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, layout.eval_config)
    if not layout.config.exists():
        # A directory evaluated without training (--policy) becomes a run directory the report
        # can read; a training run's own config.yaml is never replaced.
        save_config(config, layout.config)
    layout.eval_results.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    lines = _sample_lines(prompt_pairs, prompt_texts, runs, columns)
    layout.eval_samples.write_text("".join(lines), encoding="utf-8")
    return results


def _summary(results: dict[str, Any], layout: RunLayout) -> list[str]:
    overall = results["implicit_reward"]["overall"]
    kl = results["kl"]
    lines = [
        f"implicit-reward accuracy {overall['accuracy']:.3f} (margin {overall['margin_mean']:.4f})"
        f" on {overall['pairs']} held-out pairs",
        f"KL(policy || reference) {kl['mean']:.3f} nats per completion over "
        f"{kl['num_samples']} samples",
    ]
    for side, stats in results["generation"].items():
        rate = stats["generations_per_s"]
        lines.append(
            f"{side}: {stats['mean_tokens']:.1f} tokens per completion, "
            + ("rate not measured" if rate is None else f"{rate:.1f} completions/s")
        )
    rate = results["win_rate"]
    if rate is not None:
        lines.append(
            f"win rate vs {results['baseline']}: {rate['value']:.3f} "
            f"[{rate['ci_low']:.3f}, {rate['ci_high']:.3f}] over {rate['num_pairs']} pairs"
        )
    lines.append(f"results: {layout.eval_results}")
    lines.append(f"samples: {layout.eval_samples}")
    return lines


def main(config: RaypoConfig, args: argparse.Namespace) -> int:
    """CLI entry of ``raypo eval``: evaluate, print a summary, then build the report."""
    del args
    try:
        results = evaluate(config, log=partial(stage, "eval"))
    except (EvalError, ModelLoadError) as error:
        print(f"raypo eval: {error}", file=sys.stderr)
        return 1
    print("\n".join(_summary(results, RunLayout(config.run_path))))
    try:
        from raypo.eval.report import build_report
    except ModuleNotFoundError as error:
        if error.name != "raypo.eval.report":
            raise
        print("report: skipped (this installation has no raypo.eval.report)")
        return 0
    print(f"report: {build_report(config.run_path)}")
    return 0

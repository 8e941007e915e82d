"""The during-training generation eval: prompt choice, rank shares, metrics, and completions that
do not depend on how the prompts are split over workers (the multi-worker ZeRO-3 run is in
tests/test_train_e2e.py)."""

from __future__ import annotations

import json

import pytest
import torch

from raypo.config import load_config
from raypo.config_base import ConfigError
from raypo.generation import SamplingSettings
from raypo.models import load_policy, resolve_model_path
from raypo.train.generation_eval import (
    GenerationPrompt,
    generation_metrics,
    rank_share,
    run_generation_eval,
    select_prompts,
)
from raypo.train.records import append_records

TEXTS = [
    "\n\nHuman: How do I bake bread?\n\nAssistant:",
    "\n\nHuman: hi\n\nAssistant:",
    "\n\nHuman: What is the capital of France? Tell me more about it.\n\nAssistant:",
    "\n\nHuman: Can you help me?\n\nAssistant:",
    "\n\nHuman: Why is the sky blue?\n\nAssistant:",
]


@pytest.mark.parametrize("num_prompts", [0, 1, 2, 5, 7])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_shares_are_equal_length_and_cover_every_prompt_once(
    num_prompts: int, world_size: int
) -> None:
    shares = [rank_share(num_prompts, rank, world_size) for rank in range(world_size)]
    assert len({len(indices) for indices, _ in shares}) == 1
    real = [i for indices, count in shares for i in indices[:count]]
    assert real == list(range(num_prompts))
    for indices, count in shares:
        assert all(0 <= i < max(num_prompts, 1) for i in indices)
        assert all(i == indices[count - 1] for i in indices[count:]) or count == 0


def test_select_prompts_takes_the_first_ids_in_order() -> None:
    rows = [{"id": f"p{i}", "prompt_ids": [i, i + 1]} for i in (3, 1, 2, 0)]
    chosen = select_prompts(rows, 3)
    assert chosen == [
        GenerationPrompt("p0", [0, 1]),
        GenerationPrompt("p1", [1, 2]),
        GenerationPrompt("p2", [2, 3]),
    ]
    assert len(select_prompts(rows, 10)) == 4


def test_generation_metrics_values() -> None:
    records = [
        {"completion": "a b a", "tokens": 4, "stopped": True},
        {"completion": "c", "tokens": 8, "stopped": False},
    ]
    metrics = generation_metrics(records, seconds=2.0)
    assert metrics == {
        "eval/gen/completions": 2.0,
        "eval/gen/mean_tokens": 6.0,
        "eval/gen/stopped": 0.5,
        "eval/gen/seconds": 2.0,
        "eval/gen/distinct_1": 3 / 4,  # a, b, c distinct among a b a c
        "eval/gen/distinct_2": 1.0,  # (a b), (b a)
    }


@pytest.fixture(scope="module")
def tiny_policy(raypo_cache: str):
    model, tokenizer = load_policy(resolve_model_path("tiny"), "fp32")
    prompts = [
        GenerationPrompt(f"id{i}", [tokenizer.bos_token_id, *tokenizer.encode(text)])
        for i, text in enumerate(TEXTS)
    ]
    return model, tokenizer, prompts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_completions_do_not_depend_on_the_worker_split(tiny_policy, temperature: float) -> None:
    """Two ranks' shares (each padded, gathered here by hand) give the completions one rank gives
    alone: greedy always, sampled because every batch is seeded by its first prompt's index and
    batches of one prompt are the same batches on every split."""
    model, tokenizer, prompts = tiny_policy
    model.train()
    n = 2 if temperature > 0 else 1  # greedy gives n identical completions (refused by config)
    settings = SamplingSettings(temperature=temperature, top_p=1.0, max_tokens=6, n=n, seed=3)
    common = {"batch_size": 1, "synced_gpus": False}
    state = torch.random.get_rng_state()
    whole, records = run_generation_eval(
        model, tokenizer, prompts, settings, rank=0, world_size=1, **common
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random draws untouched
    assert model.training  # left in the mode it was in
    split = []
    for rank in range(2):
        part = run_generation_eval(
            model, tokenizer, prompts, settings, rank=rank, world_size=2, **common
        )[1]
        split += part
    assert split == records
    assert [(r["id"], r["sample"]) for r in records] == [
        (p.id, s) for p in prompts for s in range(n)
    ]
    for record in records:
        assert 1 <= record["tokens"] <= 6
        assert record["prompt"] == tokenizer.decode(prompts[int(record["id"][2:])].prompt_ids)
    assert whole["eval/gen/completions"] == 5 * n
    assert whole["eval/gen/mean_tokens"] == pytest.approx(
        sum(r["tokens"] for r in records) / len(records)
    )


def test_generations_file_gets_one_line_per_completion(tmp_path) -> None:
    path = tmp_path / "run" / "generations.jsonl"
    append_records(path, 2, [{"id": "a", "completion": "x"}])
    append_records(path, 4, [{"id": "a", "completion": "y"}, {"id": "b", "completion": "z"}])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(line["step"], line["completion"]) for line in lines] == [
        (2, "x"),
        (4, "y"),
        (4, "z"),
    ]


def test_generation_eval_needs_eval_steps() -> None:
    with pytest.raises(ConfigError, match="set trainer.eval_steps > 0"):
        load_config(None, ["--eval.during_training_num_prompts=4", "--trainer.eval_steps=0"])
    config = load_config(None, ["--eval.during_training_num_prompts=4", "--trainer.eval_steps=5"])
    assert config.eval.during_training_num_prompts == 4


@pytest.mark.parametrize(("steps", "evaluations"), [(4, [4]), (5, [4, 5])])
def test_the_last_step_is_evaluated_once(monkeypatch: pytest.MonkeyPatch, steps, evaluations):
    """A run whose last step is a multiple of trainer.eval_steps: _after_step evaluates it and
    _finish reports those metrics with the final checkpoint without evaluating again."""
    from types import SimpleNamespace

    from raypo.train import loop
    from raypo.train.checkpoint import TrainState

    config = load_config(None, ["--trainer.eval_steps=2", "--trainer.logging_steps=100"])
    worker = SimpleNamespace(config=config, rank=0, world_size=1, plan=SimpleNamespace())
    worker.plan.step_callbacks = []
    evaluated: list[int] = []
    reported: list[tuple[int, dict]] = []

    def evaluate(worker, step: int) -> dict[str, float]:
        evaluated.append(step)
        return {"eval/loss": float(step)}

    monkeypatch.setattr(loop, "evaluate", evaluate)
    monkeypatch.setattr(loop, "_report", lambda metrics, state: None)
    monkeypatch.setattr(loop, "_log_metrics", lambda worker, sums, seconds: {"loss": 0.0})
    monkeypatch.setattr(
        loop, "_checkpoint", lambda worker, metrics, state: reported.append((state.step, metrics))
    )
    state, progress = TrainState(), loop._Progress()
    for _ in range(steps):
        state.step += 1
        loop._after_step(worker, state, progress)
    loop._finish(worker, state, progress)
    assert evaluated == [2, *evaluations]
    assert reported == [(steps, {"loss": 0.0, "eval/loss": float(steps)})]

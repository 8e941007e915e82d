"""The worker code of raypo.train.loop (DeepSpeed engine from the config, online reference, and the
public step raypo.step.preference_step) on 2 real Ray Train workers:

- every objective lowers its loss on a fixed set of 8 HH pairs under ZeRO-2 and ZeRO-3, and so do
  dpo, mallows_theta and mixdpo with LoRA adapters (the reference: the adapters disabled);
- the policy after one DeepSpeed step (2 workers x 4 pairs) gives the same log-probs as one plain
  single-process torch AdamW step on all 8 pairs (same groups, clipping and learning rate).

One Ray Train run holds all of it, so the workers start once.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
import ray.train
import torch
import torch.distributed as dist
from hh_pairs import hh_columns
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypo.config import RaypoConfig, load_config
from raypo.data.collate import collate_pairs
from raypo.forward import reference_columns, sequence_stats
from raypo.models import load_policy, resolve_model_path
from raypo.objectives import OBJECTIVES
from raypo.step import preference_step
from raypo.train.batches import MicroBatch
from raypo.train.loop import build_worker, micro_batch_step, param_groups, step_strength
from raypo.train.worker_plan import WorkerPlan

pytestmark = pytest.mark.slow

STEPS = 4
"""Optimizer steps per objective on the fixed set."""
STAGES = (2, 3)
LORA_OBJECTIVES = ("dpo", "mallows_theta", "mixdpo")
"""Objectives also trained with LoRA adapters (``model.lora``)."""


def _config(run_dir: Path) -> RaypoConfig:
    return load_config(
        None,
        [
            f"--run_dir={run_dir}",
            "--reference.mode=online",
            # The untrained tiny reference is near-uniform (Hn ~ 0.999): c = 50 gives w ~ 0.05.
            "--loss.dispersion_scale=50",
            "--trainer.num_workers=2",
            "--trainer.torch_adam=true",
            "--trainer.per_device_batch_size=4",
            "--trainer.learning_rate=3e-4",
            "--trainer.lr_scheduler=constant",
            "--trainer.warmup_ratio=0",
            "--trainer.max_steps=100",
        ],
    )


def _with(config: RaypoConfig, objective: str, stage: int) -> RaypoConfig:
    # IPO's target margin 1/(2 beta) is 0.5 at beta 1, narrower than one Adam step moves a sum of
    # ~40 token log-probs; beta 0.1 puts it at 5.
    beta = 0.1 if "ipo" in objective else 1.0
    return dataclasses.replace(
        config,
        loss=dataclasses.replace(config.loss, type=objective, beta=beta),
        trainer=dataclasses.replace(config.trainer, zero_stage=stage),
    )


def _global_mean(value: float) -> float:
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def _step(worker: Any, micro: MicroBatch) -> float:
    loss = micro_batch_step(worker, micro).loss
    worker.engine.backward(loss)
    step_strength(worker)
    worker.engine.step()
    return float(loss)


def _full_batch_logps(worker: Any, rows: dict[str, list]) -> list[float]:
    """Log-probs of all 8 pairs under the worker's (possibly ZeRO-3 partitioned) policy."""
    batch = collate_pairs(rows, worker.tokenizer.pad_token_id)
    with torch.no_grad():
        stats = sequence_stats(
            worker.engine.module,
            batch,
            compute_entropy=False,
            partitioned_head=worker.config.trainer.zero_stage == 3,
        )
    return stats.logps.tolist()


def _plan(plan: WorkerPlan, objective: str, stage: int) -> WorkerPlan:
    return dataclasses.replace(plan, config=_with(plan.config, objective, stage))


def _with_lora(plan: WorkerPlan) -> WorkerPlan:
    """``plan`` training rank-8 adapters, at a learning rate for adapters (B starts at 0)."""
    config = plan.config
    lora = dataclasses.replace(config.model.lora, enabled=True, rank=8, alpha=16.0)
    model = dataclasses.replace(config.model, lora=lora)
    trainer = dataclasses.replace(config.trainer, learning_rate=1e-2)
    return dataclasses.replace(
        plan, config=dataclasses.replace(config, model=model, trainer=trainer)
    )


def _first_and_final_loss(plan: WorkerPlan, micro: MicroBatch) -> list[float]:
    """The loss (mean over the workers) at the first of STEPS steps and after the last."""
    worker = build_worker(plan)
    assert worker.engine.module.training  # from_pretrained's eval mode would skip checkpointing
    first = _global_mean(_step(worker, micro))
    for _ in range(STEPS - 1):
        _step(worker, micro)
    with torch.no_grad():
        final = _global_mean(float(micro_batch_step(worker, micro).loss))
    return [first, final]


def _worker_loop(payload: dict[str, Any]) -> None:
    rank = ray.train.get_context().get_world_rank()
    rows, plan = payload["rows"], payload["plan"]
    micro = MicroBatch({name: column[rank::2] for name, column in rows.items()}, real=True)
    results: dict[str, Any] = {"losses": {}, "logps": {}}
    for stage in STAGES:
        for objective in sorted(OBJECTIVES):
            losses = _first_and_final_loss(_plan(plan, objective, stage), micro)
            results["losses"][f"{objective}/zero{stage}"] = losses
        for objective in LORA_OBJECTIVES:
            losses = _first_and_final_loss(_with_lora(_plan(plan, objective, stage)), micro)
            results["losses"][f"{objective}/zero{stage}/lora"] = losses
        worker = build_worker(_plan(plan, "dpo", stage))
        _step(worker, micro)
        results["logps"][f"zero{stage}"] = _full_batch_logps(worker, rows)
    if rank == 0:
        Path(payload["output"]).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def distributed_results(ray_session, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    directory = tmp_path_factory.mktemp("distributed")
    # Workers cannot import this test module: ship its functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _, tokenizer = load_policy("tiny")
    tiny = resolve_model_path("tiny")
    plan = WorkerPlan(
        config=_config(directory / "run"),
        total_steps=100,
        total_pairs=800,
        policy_path=tiny,
        reference_path=tiny,
        tokenizer_path=tiny,
        final_dir=str(directory / "final"),
        has_eval=False,
    )
    payload = {
        "plan": plan,
        "rows": hh_columns(tokenizer),
        "output": str(directory / "results.json"),
    }
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name="objectives", storage_path=str(directory / "ray")),
    )
    trainer.fit()
    return {**json.loads(Path(payload["output"]).read_text()), "payload": payload}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_every_objective_lowers_its_loss_on_two_workers(
    distributed_results: dict[str, Any], objective: str, stage: int
) -> None:
    first, final = distributed_results["losses"][f"{objective}/zero{stage}"]
    assert final < first * (1 - 1e-3), (objective, stage, first, final)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("objective", LORA_OBJECTIVES)
def test_lora_lowers_the_loss_on_two_workers(
    distributed_results: dict[str, Any], objective: str, stage: int
) -> None:
    first, final = distributed_results["losses"][f"{objective}/zero{stage}/lora"]
    assert first == pytest.approx(0.6931472, abs=1e-5)  # ln 2: fresh adapters (B = 0), h = 0
    assert final < first * (1 - 1e-3), (objective, stage, first, final)


def _plain_torch_step(payload: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Log-probs of the 8 pairs before and after one single-process AdamW step of DPO on all of
    them, with the optimizer settings DeepSpeed gets from the config."""
    plan = payload["plan"]
    config = _with(plan.config, "dpo", 2)
    trainer = config.trainer
    torch.manual_seed(config.seed)
    policy, tokenizer = load_policy(plan.policy_path)
    reference, _ = load_policy(plan.reference_path)
    batch = collate_pairs(payload["rows"], tokenizer.pad_token_id)
    with torch.no_grad():
        before = sequence_stats(policy, batch, compute_entropy=False).logps.tolist()
        batch |= reference_columns(reference, batch)
    optimizer = torch.optim.AdamW(
        param_groups(policy, trainer.weight_decay),
        lr=trainer.learning_rate,
        betas=(trainer.adam_beta1, trainer.adam_beta2),
        eps=trainer.adam_epsilon,
    )
    preference_step(policy, batch, config.loss).loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), trainer.max_grad_norm)
    optimizer.step()
    with torch.no_grad():
        after = sequence_stats(policy, batch, compute_entropy=False).logps.tolist()
    return before, after


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_step_on_two_workers_equals_a_plain_torch_step(
    distributed_results: dict[str, Any], stage: int
) -> None:
    before, expected = _plain_torch_step(distributed_results["payload"])
    got = distributed_results["logps"][f"zero{stage}"]
    moved = max(abs(a - b) for a, b in zip(expected, before, strict=True))
    assert moved > 0.1, moved  # the step changed the log-probs far beyond the tolerance below
    assert got == pytest.approx(expected, abs=2e-3), (got, expected)

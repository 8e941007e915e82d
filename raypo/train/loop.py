"""The training loop run by every Ray Train worker.

Read top to bottom: build the DeepSpeed engine around the policy from the driver's
:class:`raypo.train.worker_plan.WorkerPlan`, restore from the latest checkpoint if there is one,
then collate each micro-batch, hand it to the one public step
(:func:`raypo.step.preference_step`: forward, reference values, dispersion, objective) and step
the engine. This module keeps what is
distributed (engine, data shard, reports, checkpoints); the step keeps the mathematics. Metrics go
to Ray Train every ``logging_steps``; checkpoints every ``save_steps``; held-out metrics every
``eval_steps``, with a small generation eval (:mod:`raypo.train.generation_eval`) when
``eval.during_training_num_prompts`` is set.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import ray.train
import torch
import torch.distributed as dist
from torch import Tensor

from raypo.config import RaypoConfig
from raypo.data.collate import collate_pairs
from raypo.generation import SamplingSettings
from raypo.lora import adapters_disabled, add_adapters, causal_lm, trainable_summary
from raypo.mixdpo import StrengthDistribution
from raypo.models import disable_dropout_in_model, load_policy
from raypo.objectives import objective
from raypo.step import ForwardSettings, StepResult, preference_step
from raypo.train.batches import MicroBatch, lockstep_batches, until_accumulation_boundary
from raypo.train.checkpoint import (
    TrainState,
    checkpoint_to_restore,
    load_checkpoint,
    save_checkpoint,
)
from raypo.train.deepspeed_config import deepspeed_config, reference_deepspeed_config
from raypo.train.export import export_policy, export_strength
from raypo.train.generation_eval import run_generation_eval
from raypo.train.records import append_records, gather_records_to_rank_zero, pair_records
from raypo.train.schedule import build_scheduler, data_progress
from raypo.train.worker_plan import StepEvent, WorkerPlan

_NO_DECAY = ("bias", "norm", "embed")


@dataclass
class _Sums:
    """Pair-weighted sums of step metrics over a logging interval, kept on the device (adding a
    micro-batch's metrics never waits for the device); one all-reduce averages them."""

    values: dict[str, Tensor] = field(default_factory=dict)
    pairs: int = 0
    tokens: Tensor | int = 0

    def add(self, metrics: dict[str, Tensor], pairs: int, tokens: Tensor) -> None:
        for name, value in metrics.items():
            weighted = value.detach().double() * pairs
            self.values[name] = self.values[name] + weighted if name in self.values else weighted
        self.pairs += pairs
        self.tokens = self.tokens + tokens

    def reduce(self, device: torch.device) -> tuple[dict[str, float], int, int]:
        """Means over all workers' pairs, and the total pairs and tokens; ``device`` is where
        the collective runs (gloo: CPU, NCCL: the GPU)."""
        names = sorted(self.values)
        counts = [torch.tensor(self.pairs, device=device), torch.as_tensor(self.tokens)]
        values = [self.values[name] for name in names] + counts
        local = torch.stack([value.to(device, torch.float64) for value in values])
        if dist.is_initialized():
            dist.all_reduce(local)
        totals = local.tolist()
        pairs, tokens = int(totals[-2]), int(totals[-1])
        means = {name: totals[i] / max(pairs, 1) for i, name in enumerate(names)}
        return means, pairs, tokens


@dataclass
class Worker:
    """What one worker holds for the whole run."""

    plan: WorkerPlan
    engine: Any
    reference: Any
    """The online reference model; None with precomputed or no reference values."""
    reference_context: Callable[[], AbstractContextManager[Any]] | None
    """Entered around the online reference's forward: with LoRA, the policy's adapters
    switched off (``reference`` is then the policy itself); else None."""
    strength: StrengthDistribution | None
    strength_optimizer: torch.optim.Optimizer | None
    tokenizer: Any
    device: torch.device
    rank: int
    world_size: int

    @property
    def config(self) -> RaypoConfig:
        """The run's config."""
        return self.plan.config

    @property
    def policy(self) -> Any:
        """The transformers model the step and the generation eval run: the engine's module,
        or the model under its PEFT wrapper with LoRA (:func:`raypo.lora.causal_lm`)."""
        return causal_lm(self.engine.module)

    @property
    def forward(self) -> ForwardSettings:
        """How the policy and the online reference run their forwards."""
        trainer = self.config.trainer
        return ForwardSettings(
            trainer.logits_chunk_size,
            partitioned_head=trainer.zero_stage == 3,
            router_aux_loss_coef=self.config.model.router_aux_loss_coef,
            padding_free=trainer.padding_free,
        )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms and embeddings are not decayed (as in HF Trainer)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.ndim < 2 or any(part in name.lower() for part in _NO_DECAY)
            (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _load_for_training(config: RaypoConfig, path: str) -> tuple[Any, Any]:
    """The policy or reference model at ``path`` and its tokenizer, loaded as ``model.*`` says
    (in 4 bits with ``model.lora.load_in_4bit``)."""
    model, tokenizer = load_policy(
        path, **config.model.load_kwargs, load_in_4bit=config.model.lora.load_in_4bit
    )
    if config.model.disable_dropout:
        disable_dropout_in_model(model)
    return model, tokenizer


def _base_weights(config: RaypoConfig, path: str) -> Any:
    """The policy's starting weights at ``path`` in ``model.dtype``, on the CPU: what a QLoRA
    run's adapter is merged into for ``final/`` (:func:`raypo.lora.save_adapted`)."""
    return load_policy(path, **config.model.load_kwargs)[0]


def _adapted_policy(config: RaypoConfig, path: str) -> Any:
    """The policy at ``path`` with fresh adapters, outside DeepSpeed (whole, on the CPU)."""
    model, _ = _load_for_training(config, path)
    return add_adapters(model, config.model.lora)


def _online_reference(config: RaypoConfig, reference_path: str, world_size: int) -> Any:
    model, _ = _load_for_training(config, reference_path)
    model.requires_grad_(False)
    model.eval()
    if config.trainer.zero_stage == 3:
        ds_config = reference_deepspeed_config(config.trainer, config.model, world_size)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return engine.module
    device = torch.device("cuda" if config.trainer.use_gpu else "cpu")
    return model.to(device)


def _reference(
    plan: WorkerPlan, policy: Any, world_size: int
) -> tuple[Any, Callable[[], AbstractContextManager[Any]] | None]:
    """The online reference and the context its forward runs in (:class:`Worker`)."""
    config = plan.config
    if config.reference.mode != "online":
        return None, None
    if config.model.lora.enabled and plan.reference_path == plan.policy_path:
        # The policy's starting weights are its frozen base: no second copy.
        return causal_lm(policy), partial(adapters_disabled, policy)
    return _online_reference(config, plan.reference_path, world_size), None


def torch_threads(cpus_per_worker: float) -> int:
    """Intra-op threads of a worker holding ``cpus_per_worker`` CPUs: the nearest whole number,
    at least 1 (Ray's own ``OMP_NUM_THREADS`` rounds down: 1 thread for 1.5 CPUs)."""
    return max(1, math.floor(cpus_per_worker + 0.5))


def build_worker(plan: WorkerPlan) -> Worker:
    """The engine (and online reference, MixDPO strength) of this Ray Train worker."""
    config = plan.config
    torch.set_num_threads(torch_threads(config.trainer.cpus_per_worker))
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    policy, tokenizer = _load_for_training(config, plan.policy_path)
    # from_pretrained returns eval mode, in which transformers skips gradient checkpointing (and
    # dropout, where model.disable_dropout is off).
    policy.train()
    if config.model.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    if config.model.lora.enabled:
        # Before DeepSpeed: param_groups then holds only the adapters, and so does the optimizer.
        policy = add_adapters(policy, config.model.lora, config.model.gradient_checkpointing)
        if rank == 0:
            print(f"raypo train: LoRA adapters, {trainable_summary(policy)}")
    ds_config = deepspeed_config(config.trainer, config.model, world_size)
    engine, _, _, _ = deepspeed.initialize(
        model=policy,
        model_parameters=param_groups(policy, config.trainer.weight_decay),
        config=ds_config,
        lr_scheduler=partial(build_scheduler, trainer=config.trainer, total_steps=plan.total_steps),
    )
    strength = strength_optimizer = None
    if objective(config.loss.type).learns_strength:
        loss = config.loss
        strength = StrengthDistribution(
            family=loss.mixdpo_distribution,
            mean=loss.beta,
            cv=loss.mixdpo_init_cv,
            learn_mean=loss.mixdpo_learn_mean,
            estimator=loss.mixdpo_estimator,
            num_points=loss.mixdpo_num_points,
        ).to(engine.device)
        # Its own optimizer and learning rate, never decayed (MixDPO, docs/methods.md).
        strength_optimizer = torch.optim.Adam(strength.parameters(), lr=loss.mixdpo_lr)
    reference, reference_context = _reference(plan, engine.module, world_size)
    return Worker(
        plan=plan,
        engine=engine,
        reference=reference,
        reference_context=reference_context,
        strength=strength,
        strength_optimizer=strength_optimizer,
        tokenizer=tokenizer,
        device=engine.device,
        rank=rank,
        world_size=world_size,
    )


def micro_batch_step(worker: Worker, micro: MicroBatch, held_out: bool = False) -> StepResult:
    """:func:`raypo.step.preference_step` of the policy on one collated micro-batch (with grad
    when grad mode is on); ``held_out`` also measures the policy's entropy and the per-pair
    values."""
    collated = collate_pairs(micro.rows, worker.tokenizer.pad_token_id)
    batch = {name: value.to(worker.device) for name, value in collated.items()}
    return preference_step(
        worker.policy,
        batch,
        worker.config.loss,
        reference_model=worker.reference,
        reference_context=worker.reference_context,
        strength=worker.strength,
        forward=worker.forward,
        held_out=held_out,
    )


def run_micro_step(worker: Worker, micro: MicroBatch, held_out: bool = False) -> StepResult:
    """The plan's step on one micro-batch (``raypo sft``'s), else :func:`micro_batch_step`."""
    if worker.plan.micro_step is not None:
        return worker.plan.micro_step(worker, micro)
    return micro_batch_step(worker, micro, held_out)


def step_strength(worker: Worker) -> None:
    """Average the (replicated, un-engined) strength gradients over workers, then step them."""
    if worker.strength is None:
        return
    for param in worker.strength.parameters():
        if param.grad is not None and dist.is_initialized():
            dist.all_reduce(param.grad)
            param.grad /= worker.world_size
    worker.strength_optimizer.step()
    worker.strength_optimizer.zero_grad()


def _global_sum(count: int) -> int:
    """``count`` summed over all workers."""
    if not dist.is_initialized():
        return count
    total = torch.tensor([count], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())


def evaluate(worker: Worker, step: int) -> dict[str, float]:
    """Held-out metrics over the whole ``eval`` shard of every worker, as ``eval/<name>``, and
    the generation eval's ``eval/gen/*`` when it has prompts."""
    if not worker.plan.has_eval:
        return {}
    return _pair_eval(worker, step) | _generation_eval(worker, step)


def _pair_eval(worker: Worker, step: int) -> dict[str, float]:
    """The held-out means as ``eval/<name>``; rank 0 appends every pair's values to
    ``plan.heldout_pairs_path``."""
    shard = ray.train.get_dataset_shard("eval")
    sums = _Sums()
    records: list[dict[str, Any]] = []
    batches = shard.iter_batches(
        batch_size=worker.config.trainer.per_device_batch_size, batch_format="numpy"
    )
    worker.engine.module.eval()
    for micro in lockstep_batches(batches, consumed=set()):
        with torch.no_grad():
            result = run_micro_step(worker, micro, held_out=True)
        if micro.real:
            sums.add(result.metrics, len(micro.rows["id"]), result.tokens)
            records += pair_records(micro.ids, result.per_pair)
    worker.engine.module.train()
    means, pairs, _ = sums.reduce(worker.device)
    records = gather_records_to_rank_zero(records, worker.world_size)
    path = worker.plan.heldout_pairs_path
    if worker.rank == 0 and path is not None and records:
        append_records(Path(path), step, records)
    return {f"eval/{name}": value for name, value in means.items()} | {"eval/pairs": pairs}


def _generation_eval(worker: Worker, step: int) -> dict[str, float]:
    plan = worker.plan
    if not plan.generation_prompts:
        return {}
    config = worker.config
    metrics, records = run_generation_eval(
        worker.policy,
        worker.tokenizer,
        list(plan.generation_prompts),
        SamplingSettings.from_config(config.eval),
        rank=worker.rank,
        world_size=worker.world_size,
        batch_size=config.eval.batch_size,
        synced_gpus=config.trainer.zero_stage == 3,
    )
    if worker.rank == 0 and plan.generations_path is not None:
        append_records(Path(plan.generations_path), step, records)
    return metrics


def _report(metrics: dict[str, float], state: TrainState) -> None:
    """Report metrics to Ray Train (every worker must, at the same step)."""
    ray.train.report({**metrics, "step": state.step, "epoch": state.epoch})


def _checkpoint(worker: Worker, metrics: dict[str, float], state: TrainState) -> None:
    """Save every rank's part of a checkpoint and report it with the metrics."""
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(
            Path(directory),
            worker.engine,
            state,
            worker.rank,
            worker.world_size,
            worker.strength,
            worker.strength_optimizer,
        )
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({**metrics, "step": state.step, "epoch": state.epoch}, checkpoint)


@dataclass
class _Progress:
    """Metric sums since the last log line, and when that interval started; the step and the
    metrics of this process's last held-out evaluation."""

    sums: _Sums = field(default_factory=_Sums)
    started: float = field(default_factory=time.perf_counter)
    evaluated: tuple[int, dict[str, float]] | None = None

    def flush(self, worker: Worker) -> dict[str, float]:
        """The interval's metrics averaged over all workers; starts a new interval."""
        metrics = _log_metrics(worker, self.sums, time.perf_counter() - self.started)
        self.sums, self.started = _Sums(), time.perf_counter()
        return metrics


def _log_metrics(worker: Worker, sums: _Sums, seconds: float) -> dict[str, float]:
    means, pairs, tokens = sums.reduce(worker.device)
    optimizer = worker.engine.optimizer
    return {
        **means,
        "learning_rate": float(optimizer.param_groups[0]["lr"]),
        "grad_norm": float(worker.engine.get_global_grad_norm() or 0.0),
        "samples_per_s": pairs / max(seconds, 1e-9),
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "step_time_s": seconds,
    }


def _after_step(worker: Worker, state: TrainState, progress: _Progress) -> None:
    trainer = worker.config.trainer
    metrics_out: dict[str, float] = {}
    if state.step % trainer.logging_steps == 0:
        metrics_out = progress.flush(worker)
    if trainer.eval_steps and state.step % trainer.eval_steps == 0:
        evaluation = evaluate(worker, state.step)
        progress.evaluated = (state.step, evaluation)
        metrics_out |= evaluation
    if trainer.save_steps and state.step % trainer.save_steps == 0:
        _checkpoint(worker, metrics_out, state)
    elif metrics_out:
        _report(metrics_out, state)
    event = StepEvent(worker.rank, worker.world_size, state.step, state.epoch)
    for callback in worker.plan.step_callbacks:
        callback(event)


def _train_epoch(
    worker: Worker, state: TrainState, progress: _Progress, stop_at: int | None
) -> bool:
    """Train on this worker's shard until it and every other shard is exhausted, or until step
    ``stop_at``; True when stopped by the step limit."""
    trainer = worker.config.trainer
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_batches(batch_size=trainer.per_device_batch_size, batch_format="numpy")
    micro_batches = until_accumulation_boundary(
        lockstep_batches(batches, state.consumed), trainer.gradient_accumulation_steps
    )
    step_pairs = 0
    for micro in micro_batches:
        result = run_micro_step(worker, micro)
        boundary = worker.engine.is_gradient_accumulation_boundary()
        worker.engine.backward(result.loss if micro.real else result.loss * 0.0)
        if micro.real:
            progress.sums.add(result.metrics, len(micro.rows["id"]), result.tokens)
            state.record(micro.ids)
            step_pairs += len(micro.ids)
        if boundary:
            step_strength(worker)
            state.pairs_done += _global_sum(step_pairs)
            step_pairs = 0
            if stop_at is None:
                worker.engine.lr_scheduler.progress = data_progress(
                    state.pairs_done, worker.plan.total_pairs, worker.plan.total_steps
                )
        worker.engine.step()
        if not boundary:
            continue
        state.step += 1
        if state.step == stop_at:
            return True
        _after_step(worker, state, progress)
    return False


def _finish(worker: Worker, state: TrainState, progress: _Progress) -> None:
    """Last metrics, held-out evaluation and checkpoint of the run; a last step that
    :func:`_after_step` has just evaluated is not evaluated again (its metrics are reported
    once more with the final checkpoint)."""
    metrics_out = progress.flush(worker)
    if worker.config.trainer.eval_steps:
        if progress.evaluated is not None and progress.evaluated[0] == state.step:
            metrics_out |= progress.evaluated[1]
        else:
            metrics_out |= evaluate(worker, state.step)
    _checkpoint(worker, metrics_out, state)


def train_worker(plan: WorkerPlan) -> None:
    """Ray Train's ``train_loop_per_worker``: build, restore, train, export.

    With ``trainer.max_steps`` (or a fractional ``num_epochs``) training stops at that step count;
    otherwise every epoch runs until all its pairs are trained and ends with an optimizer step, so
    that a run restarted from a checkpoint trains each pair exactly once per epoch even when the
    rows left are spread unevenly over the workers; the learning-rate schedule then follows the
    pairs trained, not the steps (:mod:`raypo.train.schedule`).
    """
    worker = build_worker(plan)
    state = TrainState()
    checkpoint = checkpoint_to_restore(plan.resume_from, plan.skipped_checkpoints)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(
                Path(directory),
                worker.engine,
                worker.rank,
                worker.world_size,
                worker.strength,
                worker.strength_optimizer,
            )
    trainer = plan.config.trainer
    whole_epochs = trainer.max_steps is None and float(trainer.num_epochs).is_integer()
    stop_at = None if whole_epochs else plan.total_steps
    progress = _Progress()
    while stop_at is None or state.step < stop_at:
        if _train_epoch(worker, state, progress, stop_at):
            break
        if whole_epochs and state.epoch + 1 >= trainer.num_epochs:
            break
        state.next_epoch()
    _finish(worker, state, progress)
    final_dir = Path(plan.final_dir)
    export_policy(
        worker.engine,
        plan.tokenizer_path,
        final_dir,
        worker.rank,
        chat_template=plan.config.data.chat_template,
        trust_remote_code=plan.config.model.trust_remote_code,
        unpartitioned_policy=partial(_adapted_policy, plan.config, plan.policy_path),
        base_weights=partial(_base_weights, plan.config, plan.policy_path),
        merge=plan.config.model.lora.merge_on_export,
    )
    if worker.strength is not None and worker.rank == 0:
        export_strength(worker.strength, final_dir)

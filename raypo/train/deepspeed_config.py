"""DeepSpeed config dicts built from the trainer and model sections (DeepSpeed 0.19 schema).

The policy engine gets an ``optimizer`` block and no ``scheduler`` block: the loop passes its
parameter groups (decayed matrices, undecayed biases / norms / embeddings) as ``model_parameters``
and a torch ``LambdaLR`` factory as ``lr_scheduler`` to ``deepspeed.initialize``. DeepSpeed builds
the optimizer from this block with those groups unchanged (``engine._configure_basic_optimizer``
calls ``AdamW(model_parameters, **params)``), so a group's own ``weight_decay`` overrides the
block's; it then wraps it in its ZeRO optimizer and calls the scheduler factory with the unwrapped
optimizer. MixDPO's strength parameters are not in the engine: they have their own torch optimizer.

``torch_adam`` is read by ``engine.get_optimizer_configuration``: true gives ``torch.optim.AdamW``
(no build step, supported by every ZeRO stage, also under optimizer offload); false gives
DeepSpeed's compiled ``DeepSpeedCPUAdam`` with ``offload_optimizer`` and ``FusedAdam`` otherwise,
both JIT-built into ``$TORCH_EXTENSIONS_DIR`` on first use. The ``AdamW`` type forces decoupled
weight decay whatever ``adam_w_mode`` says, so that key is not written.
"""

from __future__ import annotations

from typing import Any

from raypo.config import ModelConfig, TrainerConfig

_BUCKET_ELEMENTS = 200_000_000
"""Elements per gradient reduce / all-gather bucket (ZeRO 1-3): 400 MB in bf16, smaller than
DeepSpeed's 5e8 default so an 8B model at stage 2 keeps headroom on a 40 GB GPU, and still large
enough that communication runs in few big messages."""

_STAGE3_PREFETCH_ELEMENTS = 50_000_000
"""Parameter elements ZeRO-3 fetches ahead of use (DeepSpeed's default)."""

_STAGE3_PERSISTENCE_ELEMENTS = 10_000
"""ZeRO-3 keeps parameters smaller than this unpartitioned: norm weights and biases of real models
(hidden sizes 2-8k) stay whole, every weight matrix is sharded. It is close to what Hugging Face's
``auto`` value (10 * hidden size) gives for 1-4k hidden sizes; DeepSpeed's default of 1e5 would keep
every matrix of the tiny test model whole, so ZeRO-3 tests would not exercise sharding."""

_STAGE3_LIVE_ELEMENTS = 1_000_000_000
"""Most gathered ZeRO-3 parameter elements alive at once, and the reuse distance under which a
gathered parameter is kept (DeepSpeed's defaults)."""

_QUIET_STEPS = 1_000_000_000
"""``steps_per_print``: raypo logs its own metrics, DeepSpeed's periodic prints are noise."""


def _precision(model: ModelConfig) -> dict[str, Any]:
    """bf16 / fp16 sections; fp32 writes both disabled.

    DeepSpeed keeps fp32 master weights and optimizer state for a 16-bit model. fp16 uses dynamic
    loss scaling (``loss_scale`` 0) and needs a GPU: DeepSpeed's CPU accelerator has no fp16, which
    ``RaypoConfig`` validation already rejects.
    """
    return {
        "bf16": {"enabled": model.dtype == "bf16"},
        "fp16": {"enabled": model.dtype == "fp16", "loss_scale": 0},
    }


def _offload(trainer: TrainerConfig) -> dict[str, Any]:
    """One offload target: CPU memory, pinned only with a GPU (pinning needs CUDA)."""
    return {"device": "cpu", "pin_memory": trainer.use_gpu}


def _stage3_settings(trainer: TrainerConfig) -> dict[str, Any]:
    """ZeRO-3 parameter partitioning; ``gather_16bit_weights_on_model_save`` lets the final export
    gather the full weights on rank 0 (``engine._zero3_consolidated_16bit_state_dict``)."""
    settings: dict[str, Any] = {
        "stage3_prefetch_bucket_size": _STAGE3_PREFETCH_ELEMENTS,
        "stage3_param_persistence_threshold": _STAGE3_PERSISTENCE_ELEMENTS,
        "stage3_max_live_parameters": _STAGE3_LIVE_ELEMENTS,
        "stage3_max_reuse_distance": _STAGE3_LIVE_ELEMENTS,
        "stage3_gather_16bit_weights_on_model_save": True,
    }
    if trainer.offload_params:
        settings["offload_param"] = _offload(trainer)
    return settings


def _zero_section(trainer: TrainerConfig) -> dict[str, Any]:
    """``zero_optimization`` of the policy engine for ``trainer.zero_stage``.

    Communication overlaps computation only on GPUs (it needs separate CUDA streams); gradients are
    copied into one contiguous buffer to avoid fragmentation. Offload options appear only when set
    (TrainerConfig validation ties optimizer offload to stage >= 1 and parameter offload to 3).
    """
    stage = trainer.zero_stage
    if stage == 0:
        return {"stage": 0}
    section: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": trainer.use_gpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": _BUCKET_ELEMENTS,
    }
    if stage < 3:
        section["allgather_bucket_size"] = _BUCKET_ELEMENTS
    if trainer.offload_optimizer:
        section["offload_optimizer"] = _offload(trainer)
    if stage == 3:
        section |= _stage3_settings(trainer)
    return section


def _optimizer(trainer: TrainerConfig) -> dict[str, Any]:
    """AdamW with the trainer's hyperparameters; ``weight_decay`` is the default of groups that
    set none (the loop's groups always set theirs)."""
    return {
        "type": "AdamW",
        "params": {
            "lr": trainer.learning_rate,
            "betas": [trainer.adam_beta1, trainer.adam_beta2],
            "eps": trainer.adam_epsilon,
            "weight_decay": trainer.weight_decay,
            "torch_adam": trainer.torch_adam,
        },
    }


def deepspeed_config(trainer: TrainerConfig, model: ModelConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine on ``world_size`` data-parallel ranks.

    ``train_batch_size`` (pairs per optimizer step over all ranks) = ``per_device_batch_size *
    gradient_accumulation_steps * world_size``, which DeepSpeed checks against the other two.
    ``gradient_clipping`` is ``max_grad_norm``; DeepSpeed treats 0 as no clipping. There is no
    ``scheduler`` block: the loop passes its own LambdaLR (see the module docstring).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    micro, accumulation = trainer.per_device_batch_size, trainer.gradient_accumulation_steps
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": trainer.max_grad_norm,
        "zero_optimization": _zero_section(trainer),
        "optimizer": _optimizer(trainer),
        **_precision(model),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }


def reference_deepspeed_config(
    trainer: TrainerConfig, model: ModelConfig, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config of a frozen reference model as a ZeRO-3 inference engine.

    Used for ``reference.mode: online`` when the policy runs at stage 3, so the reference is
    sharded like the policy instead of held whole on every rank. No optimizer: DeepSpeed then
    builds only ZeRO-3's parameter partitioner (no gradients, no optimizer state). The batch sizes
    are required by DeepSpeed's config check but only describe the forward micro-batches (one
    micro-batch per "step", nothing accumulates). Parameter offload follows
    ``trainer.offload_params``; the precision is the policy's.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    micro = trainer.per_device_batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "zero_optimization": {"stage": 3, **_stage3_settings(trainer)},
        **_precision(model),
        "steps_per_print": _QUIET_STEPS,
        "wall_clock_breakdown": False,
    }

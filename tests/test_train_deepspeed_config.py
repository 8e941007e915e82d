"""DeepSpeed config dicts, and real DeepSpeed engines built from them on the tiny model."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator
from functools import partial

import pytest
import torch

from raypo.config import ModelConfig, TrainerConfig
from raypo.train.deepspeed_config import deepspeed_config, reference_deepspeed_config
from raypo.train.schedule import build_scheduler, lr_lambda


def _zero(stage: int, **trainer: object) -> dict:
    return deepspeed_config(TrainerConfig(zero_stage=stage, **trainer), ModelConfig(), 1)[
        "zero_optimization"
    ]


def test_batch_sizes_and_clipping() -> None:
    trainer = TrainerConfig(per_device_batch_size=2, gradient_accumulation_steps=3)
    config = deepspeed_config(trainer, ModelConfig(), world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 24  # 2 pairs x 3 micro-steps x 4 ranks
    assert config["gradient_clipping"] == 1.0
    assert "scheduler" not in config
    unclipped = deepspeed_config(TrainerConfig(max_grad_norm=0.0), ModelConfig(), 1)
    assert unclipped["gradient_clipping"] == 0.0


def test_optimizer_block_carries_adamw_hyperparameters() -> None:
    trainer = TrainerConfig(
        learning_rate=3e-4,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        weight_decay=0.01,
        torch_adam=True,
    )
    optimizer = deepspeed_config(trainer, ModelConfig(), 1)["optimizer"]
    assert optimizer == {
        "type": "AdamW",
        "params": {
            "lr": 3e-4,
            "betas": [0.8, 0.95],
            "eps": 1e-6,
            "weight_decay": 0.01,
            "torch_adam": True,
        },
    }


def test_stage_zero_is_plain_data_parallel() -> None:
    assert _zero(0) == {"stage": 0}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_stages(stage: int) -> None:
    zero = _zero(stage)
    assert zero["stage"] == stage
    assert zero["overlap_comm"] is False  # CPU: no CUDA streams to overlap on
    assert zero["reduce_bucket_size"] > 0
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    assert ("allgather_bucket_size" in zero) == (stage < 3)
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert ("stage3_param_persistence_threshold" in zero) == (stage == 3)


@pytest.mark.parametrize(
    ("stage", "offload_optimizer", "offload_params"),
    [(1, True, False), (2, True, False), (3, True, False), (3, False, True), (3, True, True)],
)
@pytest.mark.parametrize("use_gpu", [False, True])
def test_offload(stage: int, offload_optimizer: bool, offload_params: bool, use_gpu: bool) -> None:
    zero = _zero(
        stage,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        use_gpu=use_gpu,
    )
    target = {"device": "cpu", "pin_memory": use_gpu}
    assert zero.get("offload_optimizer") == (target if offload_optimizer else None)
    assert zero.get("offload_param") == (target if offload_params else None)
    assert zero["overlap_comm"] is use_gpu


@pytest.mark.parametrize(
    ("dtype", "bf16", "fp16"),
    [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)],
)
def test_precision(dtype: str, bf16: bool, fp16: bool) -> None:
    model = ModelConfig(dtype=dtype)
    for config in (
        deepspeed_config(TrainerConfig(use_gpu=True), model, 1),
        reference_deepspeed_config(TrainerConfig(use_gpu=True, zero_stage=3), model, 1),
    ):
        assert config["bf16"]["enabled"] is bf16
        assert config["fp16"]["enabled"] is fp16


def test_reference_config_is_inference_only_zero3() -> None:
    trainer = TrainerConfig(
        zero_stage=3, per_device_batch_size=2, gradient_accumulation_steps=4, offload_params=True
    )
    config = reference_deepspeed_config(trainer, ModelConfig(dtype="bf16"), world_size=2)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 4  # 2 pairs x 2 ranks, nothing accumulates
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "offload_optimizer" not in zero
    kept = reference_deepspeed_config(TrainerConfig(zero_stage=3), ModelConfig(), 1)
    assert "offload_param" not in kept["zero_optimization"]


def test_world_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="world_size"):
        deepspeed_config(TrainerConfig(), ModelConfig(), 0)
    with pytest.raises(ValueError, match="world_size"):
        reference_deepspeed_config(TrainerConfig(zero_stage=3), ModelConfig(), 0)


@pytest.fixture(scope="module")
def single_process_group(raypo_cache: str) -> Iterator[None]:
    """A one-rank gloo group as DeepSpeed builds it; the first use on a machine JIT-compiles
    DeepSpeed's shared-memory comm op into $TORCH_EXTENSIONS_DIR (about 70 s on 2 cores)."""
    import deepspeed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        torch.distributed.destroy_process_group()


def _tiny_model() -> torch.nn.Module:
    from raypo.models import load_policy

    model, _ = load_policy("tiny")
    return model.train()


def _groups(model: torch.nn.Module) -> list[dict]:
    """Two groups with different weight decay, as the training loop passes them."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": matrices, "weight_decay": 0.5}, {"params": vectors, "weight_decay": 0.0}]


@pytest.mark.slow
def test_zero2_torch_adam_step_matches_plain_torch(single_process_group: None) -> None:
    """One ZeRO-2 step from our config equals one plain torch AdamW step with the same groups,
    clipping and scheduler: the config maps every hyperparameter as intended."""
    import deepspeed

    trainer = TrainerConfig(
        zero_stage=2,
        torch_adam=True,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_ratio=0.0,
        per_device_batch_size=2,
        max_grad_norm=1.0,
    )
    model = _tiny_model()
    plain = copy.deepcopy(model)
    initial = copy.deepcopy(model.state_dict())
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=_groups(model),
        config=deepspeed_config(trainer, ModelConfig(), world_size=1),
        lr_scheduler=partial(build_scheduler, trainer=trainer, total_steps=10),
    )
    # DeepSpeed built torch's AdamW from the config and kept each group's own weight decay.
    assert type(engine.basic_optimizer) is torch.optim.AdamW
    assert [g["weight_decay"] for g in engine.basic_optimizer.param_groups] == [0.5, 0.0]
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)

    input_ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()

    reference_optimizer = torch.optim.AdamW(_groups(plain), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    plain_loss = plain(input_ids=input_ids, labels=input_ids).loss
    plain_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    reference_optimizer.step()

    assert float(norm) > 1.0, "the test should exercise clipping"
    torch.testing.assert_close(loss, plain_loss)
    for (name, trained), expected in zip(
        engine.module.named_parameters(), plain.parameters(), strict=True
    ):
        assert not torch.equal(trained, initial[name]), f"{name} did not change"
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-6, msg=name)
    # The scheduler stepped once: lr = peak * multiplier of step 1 of 10 (cosine, no warmup).
    expected_lr = 1e-2 * lr_lambda(1, total_steps=10, warmup_steps=0, kind="cosine")
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr)


@pytest.mark.slow
def test_zero3_reference_engine_matches_plain_forward(single_process_group: None) -> None:
    """The inference-only ZeRO-3 engine shards the reference and still computes its logits."""
    import deepspeed

    trainer = TrainerConfig(zero_stage=3, per_device_batch_size=2)
    model = _tiny_model().eval().requires_grad_(False)
    plain = copy.deepcopy(model)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, config=reference_deepspeed_config(trainer, ModelConfig(), world_size=1)
    )
    engine.eval()
    # Matrices above the persistence threshold are partitioned (their local tensor is empty).
    head = engine.module.lm_head.weight
    assert head.numel() == 0 and head.ds_numel == plain.lm_head.weight.numel()
    input_ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sharded = engine.module(input_ids=input_ids).logits
        expected = plain(input_ids=input_ids).logits
    torch.testing.assert_close(sharded, expected, rtol=1e-5, atol=1e-5)

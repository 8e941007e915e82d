"""LoRA training end to end: real Ray Train workers, real DeepSpeed ZeRO-2 and ZeRO-3, the tiny
model, the online reference (the policy with its adapters disabled)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from faults import MARKER, KillOnce, ship_by_value
from peft import PeftModel
from test_train_e2e import _config, _epoch_config, _latest_checkpoint, _train_ids
from transformers import AutoModelForCausalLM

from raypo.models import load_tokenizer, resolve_model_path
from raypo.run_layout import ExportLayout
from raypo.train.checkpoint import ENGINE_TAG, trained_ids
from raypo.train.metrics import read_metrics
from raypo.train.run import TrainResult, train

pytestmark = pytest.mark.slow

LORA_DPO = (
    "--model.lora.enabled=true",
    "--model.lora.rank=8",
    "--model.lora.alpha=16",
    "--loss.type=dpo",
    "--loss.beta=1.0",
    "--reference.mode=online",
    "--trainer.learning_rate=1e-2",
    "--trainer.num_epochs=3",
)
"""Rank-8 adapters trained by DPO for three epochs over the same pairs, at a learning rate for
adapters (B starts at 0)."""


def _base_key(name: str) -> str:
    """A PEFT model's name of a base weight -> the transformers model's name of it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _check_adapters_trained_and_exported(result: TrainResult, checkpoint: Path) -> None:
    """Step 1's loss is ln 2 (fresh adapters: B = 0, so policy = reference and every margin
    h = 0); the epochs over the same pairs bring the training loss down; the checkpoint's base
    weights (gathered from the ZeRO shards) are the starting model's bit for bit; final/ is the
    merged model, final/adapter/ the adapter."""
    losses = [m["loss"] for m in read_metrics(result.run_path) if "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.05, losses

    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    module = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=ENGINE_TAG)
    base = {_base_key(k): v for k, v in module.items() if "lora_" not in k}
    for name, value in initial.state_dict().items():
        assert torch.equal(base[name], value), name
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in module.items())

    merged = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)
    adapted = PeftModel.from_pretrained(initial, ExportLayout(result.final_dir).adapter)
    ids = load_tokenizer(str(result.final_dir))("Human: hi", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)


def test_lora_dpo_under_zero3_trains_adapters_only_and_exports_merged_and_adapter(
    ray_session, tmp_path: Path
) -> None:
    """2 workers, ZeRO-3 (the export gathers the sharded weights), 24 pairs: 3 steps of 8 per
    epoch, no padding rows."""
    config = _config(
        tmp_path / "run",
        *LORA_DPO,
        "--data.max_rows=24",
        "--data.eval_fraction=0",
        "--trainer.zero_stage=3",
        "--trainer.save_steps=0",
    )
    result = train(config)
    _check_adapters_trained_and_exported(result, _latest_checkpoint(result.run_path, config.name))


def test_lora_killed_worker_restarts_from_checkpoint_without_losing_or_repeating_pairs(
    ray_session, tmp_path: Path
) -> None:
    """As the full fine-tuning test in tests/test_train_e2e.py, under ZeRO-2 with adapters, for
    three epochs of 47 pairs (6 steps each): the last rank dies at step 16, in the third epoch
    after its one mid-epoch checkpoint (step 15); the engine checkpoint restores the adapters
    and their optimizer, the third epoch trains each pair once (the run's last checkpoint), and
    the run ends trained and exported as an uninterrupted one."""
    ship_by_value()
    config = _epoch_config(
        tmp_path / "run", *LORA_DPO, "--trainer.save_steps=15", "--trainer.max_failures=1"
    )
    result = train(config, step_callbacks=[KillOnce(16, str(config.run_path))])
    assert (result.run_path / MARKER).exists()
    ids = _train_ids(result.run_path)
    assert len(ids) == 47
    checkpoint = _latest_checkpoint(result.run_path, config.name)
    assert trained_ids(checkpoint) == ids
    _check_adapters_trained_and_exported(result, checkpoint)

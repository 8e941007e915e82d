"""LoRA training end to end: real Ray Train workers, real DeepSpeed ZeRO-2, the tiny model."""

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
from raypo.train.run import train

pytestmark = pytest.mark.slow


def _base_key(name: str) -> str:
    """A PEFT model's name of a base weight -> the transformers model's name of it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_dpo_trains_adapters_only_and_exports_merged_and_adapter(
    ray_session, tmp_path: Path, stage: int
) -> None:
    """2 workers, the online reference = the policy with its adapters disabled. Step 1's loss is
    ln 2 (fresh adapters: B = 0, so policy = reference and every margin h = 0); three epochs
    over the same pairs bring the training loss down; the checkpoint's base weights (gathered
    from the ZeRO shards) are the starting model's bit for bit; final/ is the merged model,
    final/adapter/ the adapter."""
    config = _config(
        tmp_path / "run",
        "--data.eval_fraction=0",  # 48 pairs: 6 steps of 8 per epoch, no padding rows
        "--model.lora.enabled=true",
        "--model.lora.rank=8",
        "--model.lora.alpha=16",
        "--loss.type=dpo",
        "--loss.beta=1.0",
        "--reference.mode=online",
        f"--trainer.zero_stage={stage}",
        "--trainer.learning_rate=1e-2",
        "--trainer.num_epochs=3",
        "--trainer.save_steps=0",
    )
    result = train(config)
    losses = [m["loss"] for m in read_metrics(result.run_path) if "loss" in m]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third - 0.05, losses

    initial = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny"))
    checkpoint = _latest_checkpoint(result.run_path, config.name)
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


def test_lora_killed_worker_restarts_from_checkpoint_without_losing_or_repeating_pairs(
    ray_session, tmp_path: Path
) -> None:
    """As the full fine-tuning test in tests/test_train_e2e.py, with adapters and the
    precomputed reference: the engine checkpoint restores the adapters and their optimizer."""
    ship_by_value()
    config = _epoch_config(
        tmp_path / "run", "--model.lora.enabled=true", "--trainer.max_failures=1"
    )
    result = train(config, step_callbacks=[KillOnce(3, str(config.run_path))])
    assert (result.run_path / MARKER).exists()
    ids = _train_ids(result.run_path)
    assert len(ids) == 47
    assert trained_ids(_latest_checkpoint(result.run_path, config.name)) == ids
    assert (ExportLayout(result.final_dir).adapter / "adapter_config.json").exists()

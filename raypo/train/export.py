"""Export of the trained policy in Hugging Face format (``RUN_DIR/final``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from raypo.mixdpo import StrengthDistribution
from raypo.models import load_tokenizer
from raypo.run_layout import ExportLayout


def export_policy(engine: Any, tokenizer_path: str, output_dir: Path, rank: int) -> None:
    """Write ``save_pretrained`` weights and the tokenizer to ``output_dir`` from rank 0.

    Under ZeRO-3 every rank holds a shard: all ranks take part in gathering the full 16-bit (or
    fp32) state dict (DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``), rank 0 writes it.
    Below stage 3 rank 0's module already holds the whole model. The result loads with
    ``AutoModelForCausalLM.from_pretrained(output_dir)``.
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = None
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
        load_tokenizer(tokenizer_path).save_pretrained(str(output_dir))
    if dist.is_initialized():
        dist.barrier()


def strength_summary(strength: StrengthDistribution) -> dict[str, Any]:
    """Family, ``mixdpo_loss`` parameters (a, b) and closed-form moments of a strength
    distribution, as plain floats: lognormal a = mu, b = sigma; gamma a = shape, b = scale."""
    a, b = (value.detach() for value in strength.params())
    return {
        "family": strength.family,
        "a": float(a),
        "b": float(b),
        "moments": {name: float(value.detach()) for name, value in strength.moments().items()},
    }


def export_strength(strength: StrengthDistribution, output_dir: Path) -> Path:
    """Write :func:`strength_summary` to ``output_dir/mixdpo_strength.json``
    (:attr:`raypo.run_layout.ExportLayout.strength`)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = ExportLayout(output_dir).strength
    path.write_text(json.dumps(strength_summary(strength), indent=2) + "\n")
    return path

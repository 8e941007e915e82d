"""Export of the trained policy in Hugging Face format (``RUN_DIR/final``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist

from raypo.models import load_tokenizer


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

"""Export of the trained policy in Hugging Face format (``RUN_DIR/final``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from raypo.lora import is_adapted, is_quantized, save_adapted
from raypo.mixdpo import StrengthDistribution
from raypo.models import load_tokenizer
from raypo.run_layout import ExportLayout


def save_tokenizer(
    tokenizer_path: str,
    output_dir: Path,
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
) -> None:
    """Write the run's tokenizer to ``output_dir``.

    ``chat_template`` (``data.chat_template``) replaces the tokenizer's own template, so that the
    exported model renders chat messages as training tokenised them: vLLM and transformers'
    ``apply_chat_template`` read the template from the saved tokenizer. ``trust_remote_code``
    is ``model.trust_remote_code``.
    """
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(output_dir))


def export_policy(
    engine: Any,
    tokenizer_path: str,
    output_dir: Path,
    rank: int,
    *,
    chat_template: str | None = None,
    trust_remote_code: bool = False,
    unpartitioned_policy: Callable[[], Any] | None = None,
    base_weights: Callable[[], Any] | None = None,
    merge: bool = True,
) -> None:
    """Write ``save_pretrained`` weights and the tokenizer (:func:`save_tokenizer`, with
    ``chat_template`` and ``trust_remote_code``) to ``output_dir`` from rank 0.

    Under ZeRO-3 every rank holds a shard: all ranks take part in gathering the full 16-bit (or
    fp32) state dict (DeepSpeed's ``stage3_gather_16bit_weights_on_model_save``), rank 0 writes it.
    Below stage 3 rank 0's module already holds the whole model. The result loads with
    ``AutoModelForCausalLM.from_pretrained(output_dir)``. A LoRA policy (``model.lora``) is
    written merged, with its adapter and the tokenizer in ``output_dir/adapter``, or with
    ``merge`` false as the adapter alone (:func:`raypo.lora.save_adapted`, which merges in
    place: the engine's module is not trained further after this). Under ZeRO-3 rank 0 saves
    from ``unpartitioned_policy()``, a whole copy of the adapted policy (in CPU memory) that the
    gathered weights are loaded into. A 4-bit policy (QLoRA) is merged into ``base_weights()``,
    its base in the model's dtype, not into its own 4-bit layers.
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = None
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        directories = {output_dir}
        if is_adapted(module):
            if state_dict is not None:
                module = unpartitioned_policy()
                module.load_state_dict(state_dict)
            # With its tokenizer the adapter directory evaluates on its own (load_policy).
            base = base_weights if is_quantized(module) else None
            directories.add(save_adapted(module, output_dir, merge, base))
        else:
            module.save_pretrained(str(output_dir), state_dict=state_dict, safe_serialization=True)
        for directory in sorted(directories):
            save_tokenizer(
                tokenizer_path,
                directory,
                chat_template=chat_template,
                trust_remote_code=trust_remote_code,
            )
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

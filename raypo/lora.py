"""Low-rank adapters on the policy (``model.lora``), with the ``peft`` package.

The policy is wrapped once, after it is loaded and before DeepSpeed sees it
(:func:`add_adapters`): every weight of the model is frozen and only the adapters (and the
modules in ``modules_to_save``) require grad, so DeepSpeed's optimizer holds and all-reduces
only them. The reference of an online run is the same model with its adapters switched off
(:func:`adapters_disabled`), as TRL does: no second copy of the weights exists. The forward
code (:mod:`raypo.forward`) reads a transformers model's own parts (its decoder, its lm-head),
so it is handed :func:`causal_lm`, the transformers model that PEFT wraps, whose layers carry the
adapters. The trained policy is exported merged, its adapter beside it, or the adapter alone
(:func:`save_adapted`); an adapter directory loads merged into its base (:func:`merge_adapter`,
used by :func:`raypo.models.load_policy`). ``peft`` is imported only where adapters are in use:
it is an optional extra (``pip install 'raypo[lora]'``).

QLoRA (``model.lora.load_in_4bit``): the base is loaded in 4 bits by bitsandbytes
(:func:`four_bit_loading`, NF4 with double quantisation as in Dettmers et al. 2023) and prepared
as PEFT prepares a k-bit model before the adapters go on it; the reference is that 4-bit base
with the adapters off, and the export merges the adapter into the base loaded in the model's own
dtype instead (:func:`save_adapted`'s ``base``). bitsandbytes is imported by transformers, only
when such a model is loaded (``pip install 'raypo[qlora]'``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BitsAndBytesConfig

from raypo.config import LoraConfig
from raypo.config_inputs import ALL_LINEAR
from raypo.run_layout import ExportLayout

ADAPTER_CONFIG = "adapter_config.json"
"""The file that makes a directory a PEFT adapter (``save_pretrained`` of a PEFT model)."""


def peft_config(lora: LoraConfig) -> Any:
    """``model.lora`` as a ``peft.LoraConfig`` for a causal LM."""
    import peft

    targets = lora.target_modules
    return peft.LoraConfig(
        task_type=peft.TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # PEFT reads the shorthand only as a plain string, never inside a list.
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        modules_to_save=list(lora.modules_to_save) or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
    )


def four_bit_loading(compute_dtype: torch.dtype) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a 4-bit base (``model.lora.load_in_4bit``): QLoRA's
    NF4 with double quantisation (its absmax constants in 8 bits too), the matmuls computed in
    ``compute_dtype`` (the model's dtype, as TRL does), every layer on this process's current
    GPU (a Ray Train worker's or a GPU actor's), where bitsandbytes quantises it as it loads."""
    settings = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    return {"quantization_config": settings, "device_map": {"": torch.cuda.current_device()}}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` (or the transformers model under its PEFT wrapper) was loaded in 4
    bits."""
    return bool(getattr(causal_lm(model), "is_loaded_in_4bit", False))


def add_adapters(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False) -> Any:
    """``model`` wrapped by ``peft.get_peft_model``: its weights frozen, fresh adapters (B = 0,
    so the wrapped model computes what ``model`` computes) trainable.

    ``gradient_checkpointing``: the model recomputes activations in its backward. The embedding
    output is then made to require grad: with re-entrant checkpointing (transformers' default
    before v5) a checkpointed block whose inputs need no grad is never differentiated, and the
    adapters inside it would get no gradient.

    A 4-bit ``model`` (:func:`is_quantized`) first goes through PEFT's
    ``prepare_model_for_kbit_training``, as TRL does: every weight frozen, the layers
    bitsandbytes left in 16 bits (norms, embeddings, output layer) upcast to fp32. DeepSpeed's
    bf16 / fp16 engine casts them back to the model's dtype when it wraps the model, as TRL
    casts them back for bf16 itself; its fp32 master copies are of the adapters only.

    Raises:
        ValueError: the adapters reached the output layer, whose plain weight raypo's chunked
            log-probs read directly (:func:`raypo.model_parts.lm_head`).
    """
    import peft

    if is_quantized(model):
        # Checkpointing and the embedding output's grad are set up below as for plain LoRA.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    head = model.get_output_embeddings()
    wrapped = peft.get_peft_model(model, peft_config(lora))
    if type(causal_lm(wrapped).get_output_embeddings()) is not type(head):
        raise ValueError(
            "model.lora.target_modules / modules_to_save name the output layer: raypo computes "
            "log-probs from its weight in chunks, so it must stay a plain layer; leave it out"
        )
    if gradient_checkpointing:
        wrapped.enable_input_require_grads()
    return wrapped


def parameter_count(param: nn.Parameter) -> int:
    """The number of values ``param`` holds: a 4-bit weight packs two in each byte of its
    storage, and its quantisation state keeps the shape it stands for."""
    state = getattr(param, "quant_state", None)
    return param.numel() if state is None else state.shape.numel()


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``: what the optimizer holds against the model."""
    total = sum(parameter_count(param) for param in model.parameters())
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """``N of M parameters trainable (x%)``, from :func:`trainable_counts`."""
    trainable, total = trainable_counts(model)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"


def is_adapted(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (the policy of a ``model.lora`` run)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, adapters in its layers (a PEFT model's own
    attributes, ``base_model`` first, are PEFT's, not the transformers model's); any other
    model unchanged."""
    return model.get_base_model() if is_adapted(model) else model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside: ``model`` (a PEFT model) computes its base weights' outputs, in eval mode (as a
    separate reference model would: no dropout); on exit its adapters and mode are restored."""
    training = model.training
    try:
        with model.disable_adapter():
            model.eval()
            yield
    finally:
        model.train(training)


def save_adapted(
    model: nn.Module,
    output_dir: Path,
    merge: bool = True,
    base: Callable[[], nn.Module] | None = None,
) -> Path:
    """Write a trained PEFT model to ``output_dir``; return the adapter's directory.

    ``merge`` (``model.lora.merge_on_export``): the adapter in PEFT format goes to
    ``output_dir/adapter`` (:attr:`raypo.run_layout.ExportLayout.adapter`;
    ``PeftModel.from_pretrained`` and vLLM's LoRA support read it), then the merged model (base
    + adapter as plain weights) to ``output_dir`` with ``save_pretrained``, loadable as any
    transformers model. The merge is done in place: ``model`` holds merged weights and no
    adapters afterwards, so this is the last use of a trained policy (a copy would double the
    memory of rank 0). Without ``merge``, ``output_dir`` holds the adapter alone.

    ``base``: loads the base weights to merge into instead of ``model``'s own, for a 4-bit
    policy (QLoRA): merged into its 4-bit layers the adapter's update would be re-quantised to
    4 bits (much of it rounded away) and ``final/`` would not be the model in its own dtype; the
    saved adapter is merged into the base in the model's dtype instead (:func:`merge_adapter`).
    """
    if not merge:
        model.save_pretrained(str(output_dir), safe_serialization=True)
        return output_dir
    adapter = ExportLayout(output_dir).adapter
    model.save_pretrained(str(adapter), safe_serialization=True)
    merged = model.merge_and_unload() if base is None else merge_adapter(base(), adapter)
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    return adapter


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter and no model of its own (a LoRA
    run's ``final/adapter``), as opposed to a ``save_pretrained`` model directory."""
    directory = Path(path)
    return (directory / ADAPTER_CONFIG).is_file() and not (directory / "config.json").is_file()


def adapter_settings(path: str | Path) -> dict[str, Any]:
    """The PEFT settings an adapter directory was saved with (its ``adapter_config.json``)."""
    return json.loads((Path(path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def adapter_base(path: str | Path) -> str:
    """The base model an adapter directory was trained on (its ``base_model_name_or_path``)."""
    base = adapter_settings(path).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return str(base)


def merge_adapter(base: nn.Module, path: str | Path) -> nn.Module:
    """``base`` with the adapter in ``path`` merged into its weights (a plain transformers
    model again, as ``final/`` holds it)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()

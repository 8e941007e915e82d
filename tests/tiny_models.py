"""Tiny random causal LMs of the architectures raypo is used with, built in memory for the
tests that compare raypo's forwards and steps with a model's own (no files, no tokenizer)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

VOCAB = 320
PAD = 2
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=64,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=PAD,
)
"""Two layers of width 64 with grouped-query attention; the special token ids of ids 0-2."""
MOE = dict(num_experts_per_tok=2, experts_implementation="eager")  # grouped_mm has no float64

ARCHITECTURES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 30.0}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"final_logit_softcapping": 30.0}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 8.0}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.0625}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "phi": ("PhiConfig", "PhiForCausalLM", {}),  # an lm-head with a bias
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(MOE, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4)),
}
"""name -> (transformers config class, model class, the architecture's own settings): each
lm-head transform (softcapping, ``logits_scaling``, ``logit_scale``, a head bias) at a value
that changes the log-probs of a scaled-up head."""


def tiny_causal_lm(
    name: str,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    head_scale: float = 1.0,
    model_class: type[nn.Module] | None = None,
    **settings: object,
) -> nn.Module:
    """An eval-mode random model of architecture ``name`` (a key of :data:`ARCHITECTURES`) of
    :data:`SHAPE`, ``settings`` overriding both, initialised from ``seed`` without touching the
    global generator; its lm-head weight multiplied by ``head_scale`` so that the logits reach
    the sizes where the final-logit transforms matter. ``model_class`` replaces the architecture's
    own class (a subclass of it whose forward differs)."""
    config_name, model_name, extra = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**{**SHAPE, **extra, **settings})
    model_class = model_class or getattr(transformers, model_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(dtype).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(head_scale)
    return model

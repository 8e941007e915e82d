"""What raypo needs to know about a Hugging Face causal LM: its decoder, its lm-head, what its
``forward`` does around the head, and its router load-balancing loss.

Some causal LMs change the lm-head's output before it becomes their logits (Gemma-2's final-logit
softcapping, Granite's ``logits_scaling``, Cohere's ``logit_scale``, ...), or its input
(MiniCPM3). :data:`HEAD_TRANSFORMS` names, per model class, what its ``forward`` does;
:mod:`raypo.forward` applies the transform inside each chunk of log-probs, and
:mod:`raypo.model_checks` checks it once per model against the model's own ``forward``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn


class UnsupportedModelError(ValueError):
    """raypo cannot compute a model's own log-probs; the message names the model and why."""


def softcap(logits: Tensor, cap: float) -> Tensor:
    """``cap * tanh(logits / cap)``, in the operation order of Gemma-2's ``forward``."""
    logits = logits / cap
    logits = torch.tanh(logits)
    return logits * cap


def softcap_fp32(logits: Tensor, cap: float) -> Tensor:
    """:func:`softcap` of the logits upcast to float32 first (Beam, Inkling2, xLSTM)."""
    return softcap(logits.float(), cap)


def multiply(values: Tensor, factor: float) -> Tensor:
    """``values * factor`` (Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``)."""
    return values * factor


def divide(values: Tensor, divisor: float) -> Tensor:
    """``values / divisor`` (Granite's ``logits_scaling``; MiniCPM3's hidden-state scaling)."""
    return values / divisor


_OPERATIONS: dict[str, tuple[Callable[..., Tensor], str]] = {
    "softcap": (softcap, "cap"),
    "softcap_fp32": (softcap_fp32, "cap"),
    "multiply": (multiply, "factor"),
    "divide": (divide, "divisor"),
}
"""Operation name -> (function, the keyword its number binds to)."""


_SOFTCAP = ("after", "softcap", "final_logit_softcapping")


_SOFTCAP_FP32 = ("after", "softcap_fp32", "final_logit_softcapping")


_GRANITE = ("after", "divide", "logits_scaling")


_COHERE = ("after", "multiply", "logit_scale")


HEAD_TRANSFORMS: dict[str, tuple[str, str, str]] = {
    "Gemma2ForCausalLM": _SOFTCAP,
    "Gemma3ForCausalLM": _SOFTCAP,
    "Gemma3nForCausalLM": _SOFTCAP,
    "Gemma3nForConditionalGeneration": _SOFTCAP,
    "Gemma4ForCausalLM": _SOFTCAP,
    "Gemma4ForConditionalGeneration": _SOFTCAP,
    "Gemma4UnifiedForCausalLM": _SOFTCAP,
    "Gemma4UnifiedForConditionalGeneration": _SOFTCAP,
    "VaultGemmaForCausalLM": _SOFTCAP,
    "NanoChatForCausalLM": _SOFTCAP,
    "RecurrentGemmaForCausalLM": ("after", "softcap", "logits_soft_cap"),
    "BeamForCausalLM": _SOFTCAP_FP32,
    "Inkling2ForCausalLM": _SOFTCAP_FP32,
    "Inkling2LoopForCausalLM": _SOFTCAP_FP32,
    "xLSTMForCausalLM": ("after", "softcap_fp32", "output_logit_soft_cap"),
    "GraniteForCausalLM": _GRANITE,
    "GraniteSWAForCausalLM": _GRANITE,
    "GraniteMoeForCausalLM": _GRANITE,
    "GraniteMoeSWAForCausalLM": _GRANITE,
    "GraniteMoeHybridForCausalLM": _GRANITE,
    "GraniteMoeSharedForCausalLM": _GRANITE,
    "CohereForCausalLM": _COHERE,
    "Cohere2ForCausalLM": _COHERE,
    "Cohere2MoeForCausalLM": _COHERE,
    "CohereCompassForCausalLM": _COHERE,
    "HyperCLOVAXForCausalLM": ("after", "multiply", "logits_scaling"),
    "FalconH1ForCausalLM": ("after", "multiply", "lm_head_multiplier"),
    "MiniCPM3ForCausalLM": ("before", "divide", "logits_scaling"),
    "InklingForCausalLM": ("before", "divide", "logits_mup_width_multiplier"),
}
"""What a causal LM class's ``forward`` (transformers 5) does around its lm-head, by class name:
``(where, operation, attribute)``: ``where`` is ``"after"`` the head (on its output, the logits)
or ``"before"`` it (on the decoder's last hidden states); ``operation`` one of ``softcap``,
``softcap_fp32``, ``multiply``, ``divide``; ``attribute`` the text config's attribute holding the
number (no transform when it is None). A class not named here (nor any of its bases) has none:
its logits are the head's output. :func:`verified_head_transform` checks the entry against the
model's own ``forward``, so a wrong or missing entry is refused, never silently used."""


@dataclass(frozen=True)
class HeadTransform:
    """What a model's ``forward`` does around its lm-head: ``logits = after(head(before(h)))``."""

    before: Callable[[Tensor], Tensor] | None = None
    """Applied to the decoder's last hidden states ``[B, T, H]`` before the head, or None."""
    after: Callable[[Tensor], Tensor] | None = None
    """Applied to (each chunk of) the head's output ``[n, V]`` in its own dtype, or None."""
    description: str = "no transform around the lm-head"
    """For messages: e.g. ``"after the lm-head: softcap(final_logit_softcapping=30.0)"``."""

    def apply_before(self, hidden: Tensor) -> Tensor:
        return hidden if self.before is None else self.before(hidden)

    def apply_after(self, logits: Tensor) -> Tensor:
        return logits if self.after is None else self.after(logits)


def head_transform(model: nn.Module) -> HeadTransform:
    """The :data:`HEAD_TRANSFORMS` entry of ``model``'s class (or its nearest registered base),
    with the number read from ``model.config.get_text_config()``; unchecked."""
    spec = next(
        (HEAD_TRANSFORMS[c.__name__] for c in type(model).__mro__ if c.__name__ in HEAD_TRANSFORMS),
        None,
    )
    if spec is None:
        return HeadTransform()
    where, operation, attribute = spec
    value = getattr(model.config.get_text_config(), attribute, None)
    if value is None:
        return HeadTransform()
    operation_function, keyword = _OPERATIONS[operation]
    function = partial(operation_function, **{keyword: value})
    description = f"{where} the lm-head: {operation}({attribute}={value})"
    if where == "before":
        return HeadTransform(before=function, description=description)
    return HeadTransform(after=function, description=description)


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection of a HF causal LM (``get_output_embeddings``), checked to be linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"{model_name(model)}'s output embedding is {type(head).__name__}, not nn.Linear; "
            "raypo computes log-probs from the decoder's hidden states and a linear lm-head"
        )
    return head


def plain_linear_head(model: nn.Module) -> nn.Linear:
    """:func:`lm_head`, refused when its class overrides ``nn.Linear.forward`` (a learned logit
    scale, a quantised matmul): its weight and bias alone do not give its output."""
    head = lm_head(model)
    if type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(
            f"{model_name(model)}'s lm-head {type(head).__name__} overrides nn.Linear.forward, "
            "so raypo cannot compute its logits in chunks from its weight and bias"
        )
    return head


def decoder(model: nn.Module) -> nn.Module:
    """The module whose ``last_hidden_state`` the model's lm-head reads: ``model.base_model``, or
    ``model.model`` where ``base_model`` is the model itself (a ``base_model_prefix`` that names
    no submodule, as in Llama-4's and Mllama's causal LMs)."""
    base = model.base_model
    if base is model and isinstance(getattr(model, "model", None), nn.Module):
        return model.model
    if base is model:
        raise UnsupportedModelError(f"{model_name(model)} has no base model apart from its head")
    return base


def model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"


def last_hidden(output: object) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return output[0] if hidden is None else hidden


def decoder_output(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    *,
    position_ids: Tensor | None = None,
    output_router_logits: bool = False,
) -> object:
    """:func:`decoder`'s output for ``input_ids`` (and, where given, the attention mask and the
    positions of packed sequences), with each MoE layer's router logits (``router_logits``) when
    ``output_router_logits``; optional arguments are passed only when set, as not every decoder
    takes them. Without a cache: transformers reads packed ``position_ids`` only then."""
    extra: dict[str, object] = {}
    if position_ids is not None:
        extra["position_ids"] = position_ids
    if output_router_logits:
        extra["output_router_logits"] = True
    return decoder(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra
    )


def router_aux_loss_coef(model: nn.Module, override: float | None = None) -> float:
    """Weight of ``model``'s router load-balancing loss in the policy's loss, decided as TRL's
    DPOTrainer does: ``override`` (``model.router_aux_loss_coef``) when set, else the text
    config's own ``router_aux_loss_coef`` (0 when it declares none); always 0 for a model whose
    config has no ``output_router_logits`` (not a Mixture-of-Experts model that returns them).

    Raises:
        ValueError: a non-zero ``override`` for a model without ``output_router_logits``.
    """
    text_config = model.config.get_text_config()
    is_moe = hasattr(text_config, "output_router_logits")
    if override and not is_moe:
        raise ValueError(
            f"model.router_aux_loss_coef is {override} but {model_name(model)} is not a "
            "Mixture-of-Experts model that returns router logits, so there is no auxiliary loss "
            "to weight; set model.router_aux_loss_coef: null"
        )
    if not is_moe:
        return 0.0
    return float(
        getattr(text_config, "router_aux_loss_coef", 0.0) if override is None else override
    )


def load_balancing_loss(
    model: nn.Module, router_logits: tuple[Tensor, ...], attention_mask: Tensor
) -> Tensor:
    """``model``'s own router load-balancing loss of its decoder's per-layer ``router_logits``,
    as its ``forward`` computes ``aux_loss`` (transformers 5's Mixtral, Qwen2-MoE, Qwen3-MoE,
    OLMoE, ...): the ``load_balancing_loss_func`` of the module defining its class (or nearest
    base), with its ``num_experts`` and ``num_experts_per_tok``, padding masked out.

    Raises:
        UnsupportedModelError: the model lacks one of them, or the router logits are not a tuple.
    """
    modules = (sys.modules.get(cls.__module__) for cls in type(model).__mro__)
    function = next(
        (m.load_balancing_loss_func for m in modules if hasattr(m, "load_balancing_loss_func")),
        None,
    )
    experts = getattr(model, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None)
    if function is None or experts is None or top_k is None or not isinstance(router_logits, tuple):
        raise UnsupportedModelError(
            f"raypo cannot compute the router load-balancing loss of {model_name(model)}: it "
            "needs the load_balancing_loss_func of its modeling module, its num_experts and "
            "num_experts_per_tok, and per-layer router logits from its decoder; set "
            "model.router_aux_loss_coef: 0 to train without it"
        )
    return function(router_logits, experts, top_k, attention_mask)

"""One forward of a causal LM over a collated chosen+rejected batch, reduced per sequence.

Shared by the reference pass (:mod:`raypo.data.reference`) and the trainer, so that the policy and
the reference compute their log-probs and entropies the same way: the decoder's last hidden
states go through :func:`raypo.dispersion.sequence_logps_and_entropy` with the lm-head weight,
chunked over completion positions, so the fp32 ``[2B, T, V]`` logits never exist at once.

The log-probs are those of the model's own ``forward``: some causal LMs change the lm-head's
output before it becomes their logits (Gemma-2's final-logit softcapping, Granite's
``logits_scaling``, Cohere's ``logit_scale``, ...), or its input (MiniCPM3). :data:`HEAD_TRANSFORMS`
names, per model class, what its ``forward`` does; the transform is applied inside each chunk
(:class:`HeadTransform`), so the memory saving stays (one more ``[chunk, V]`` buffer). At a
model's first use :func:`verified_head_transform` runs its own ``forward`` once on a few tokens
of the batch and checks that raypo's path (the decoder, the transform, the lm-head, right
padding) reproduces its logits; a model that it does not reproduce (an unregistered transform,
a head that is not a plain linear layer, a model whose logits change with right padding, ...)
is refused with :class:`UnsupportedModelError` naming the model class and type. A
Mixture-of-Experts policy's router load-balancing loss comes from the same decoder forward
(:func:`sequence_stats_and_aux_loss`), likewise checked once against the model's own.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypo.dispersion import SequenceStats, sequence_logps_and_entropy

REFERENCE_PREFIX = "ref_"
"""The reference columns of the preference data (:func:`reference_columns`: ``ref_chosen_logps``,
``ref_rejected_logps``, ``ref_hn_chosen``, ``ref_hn_rejected``) are named with this prefix."""

PROBE_TOKENS = 16
"""Tokens of the first sequence of a batch that :func:`verified_head_transform` runs the model's
own ``forward`` on, once per model."""


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
            f"{_model_name(model)}'s output embedding is {type(head).__name__}, not nn.Linear; "
            "raypo computes log-probs from the decoder's hidden states and a linear lm-head"
        )
    return head


def _plain_linear_head(model: nn.Module) -> nn.Linear:
    """:func:`lm_head`, refused when its class overrides ``nn.Linear.forward`` (a learned logit
    scale, a quantised matmul): its weight and bias alone do not give its output."""
    head = lm_head(model)
    if type(head).forward is not nn.Linear.forward:
        raise UnsupportedModelError(
            f"{_model_name(model)}'s lm-head {type(head).__name__} overrides nn.Linear.forward, "
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
        raise UnsupportedModelError(f"{_model_name(model)} has no base model apart from its head")
    return base


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type {getattr(config, 'model_type', '?')!r})"


_VERIFIED: weakref.WeakKeyDictionary[nn.Module, HeadTransform] = weakref.WeakKeyDictionary()


def verified_head_transform(model: nn.Module, batch: Mapping[str, Tensor]) -> HeadTransform:
    """:func:`head_transform` of ``model``, checked once per model against its own ``forward``.

    The first call builds a ``[2, n]`` probe from the first ``n <= PROBE_TOKENS`` tokens of the
    batch's first sequence, the second row a copy whose last ``n // 2`` positions are padding
    (attention mask 0). It runs ``model(...)`` on it once in eval mode without grad, capturing
    the output of :func:`decoder` and the input and output of the lm-head with forward hooks,
    then runs the decoder once more as :func:`sequence_stats` does. Both forwards always run
    (under DeepSpeed ZeRO-3 every rank takes part in the same collectives); then it checks, each
    within a few units in the last place (ulp) of the model's dtype since the same operations
    run on the same tensors: the head's input is ``before(decoder output)``; for a plain
    ``nn.Linear`` head whose weight is whole (not ZeRO-3 partitioned), its output is
    ``F.linear(input, weight, bias)``; the logits are ``after(head output)``. Looser, as
    reduction orders may differ: calling the decoder directly gives the hidden states the
    model's ``forward`` gave its head (64 ulp), and right padding leaves the logits of the real
    positions unchanged (64 ulp or 1e-3 relative, whichever is larger).

    Raises:
        UnsupportedModelError: a check fails; the message names the model class and type, what
            differs and by how much.
    """
    transform = _VERIFIED.get(model)
    if transform is not None:
        return transform
    transform = head_transform(model)
    head = lm_head(model)
    ids, mask = _probe_inputs(model, batch)
    captured, logits, direct = _probe(model, head, ids, mask)
    problem = _mismatch(transform, head, captured, logits, direct)
    if problem is None:
        real = int(mask[1].sum())
        error = _relative_error(logits[1, :real], logits[0, :real])
        tolerance = max(64.0, 1e-3 / torch.finfo(logits.dtype).eps)
        if error > tolerance:
            problem = f"right padding changes the logits of the real tokens by {error:.3g} ulp"
    if problem is not None:
        raise UnsupportedModelError(
            f"raypo cannot reproduce the logits of {_model_name(model)}: {problem} (raypo "
            f"applies {transform.description}). raypo computes log-probs in chunks from the "
            "decoder's last hidden states and the lm-head on right-padded batches; a model "
            "whose forward does more must be described in raypo.forward.HEAD_TRANSFORMS"
        )
    _VERIFIED[model] = transform
    return transform


def _probe_inputs(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``[2, n]`` ids and attention mask: the batch's first ``n`` tokens, twice, the second row
    right-padded from ``n - n // 2`` on (with the batch's padding id, else the config's)."""
    length = min(PROBE_TOKENS, int(batch["attention_mask"][0].sum()))
    ids = batch["input_ids"][:1, :length].repeat(2, 1)
    mask = torch.ones_like(ids)
    padding = batch["input_ids"][batch["attention_mask"] == 0]
    pad_id = getattr(model.config, "pad_token_id", None) if padding.numel() == 0 else padding[0]
    ids[1, length - length // 2 :] = 0 if pad_id is None else pad_id
    mask[1, length - length // 2 :] = 0
    return ids, mask


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` (no dropout) for the block, then every submodule's own mode back."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _last_hidden(output: object) -> Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    return output[0] if hidden is None else hidden


@torch.no_grad()
def _probe(
    model: nn.Module, head: nn.Module, ids: Tensor, mask: Tensor
) -> tuple[dict[str, list[Tensor]], Tensor, Tensor]:
    """The model's forward on ``ids`` with the decoder's output and the head's input and output
    captured; its logits; and the decoder's output when called directly."""
    captured: dict[str, list[Tensor]] = {"base": [], "head_in": [], "head_out": []}

    def on_base(module: nn.Module, args: tuple, output: object) -> None:
        captured["base"].append(_last_hidden(output).clone())

    def on_head(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        captured["head_in"].append((args[0] if args else kwargs["input"]).clone())
        captured["head_out"].append(output.clone())

    with _eval_mode(model):
        handles = [
            decoder(model).register_forward_hook(on_base),
            head.register_forward_hook(on_head, with_kwargs=True),
        ]
        try:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        finally:
            for handle in handles:
                handle.remove()
        direct = _hidden_states(model, {"input_ids": ids, "attention_mask": mask})
    return captured, logits, direct


@torch.no_grad()
def _mismatch(
    transform: HeadTransform,
    head: nn.Linear,
    captured: dict[str, list[Tensor]],
    logits: Tensor,
    direct: Tensor,
) -> str | None:
    """What of raypo's path differs from the probed forward, or None."""
    if len(captured["base"]) != 1 or len(captured["head_in"]) != 1:
        return (
            f"its forward called the decoder {len(captured['base'])} times and the lm-head "
            f"{len(captured['head_in'])} times, not once each"
        )
    (base,), (head_in,), (head_out,) = captured["base"], captured["head_in"], captured["head_out"]
    checks = [("the lm-head's input is not the transformed last hidden state of the decoder", 4)]
    pairs = [(transform.apply_before(base), head_in)]
    whole = head.weight.shape == (head.out_features, head.in_features)
    if whole and type(head).forward is nn.Linear.forward:
        checks.append(("the lm-head's output is not F.linear(input, weight, bias)", 4))
        pairs.append((F.linear(head_in, head.weight, head.bias), head_out))
    checks.append(("its forward changes the lm-head's output in a way raypo does not apply", 4))
    pairs.append((transform.apply_after(head_out), logits))
    checks.append(("calling the decoder directly gives other hidden states than its forward", 64))
    pairs.append((direct, base))
    for (what, ulps), (actual, expected) in zip(checks, pairs, strict=True):
        error = _relative_error(actual, expected)
        if error > ulps:
            return f"{what} (max |difference| = {error:.3g} units in the last place)"
    return None


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| in units of the coarser dtype's epsilon times max(1, max |expected|);
    infinite for different shapes."""
    if actual.shape != expected.shape:
        return float("inf")
    eps = max(torch.finfo(actual.dtype).eps, torch.finfo(expected.dtype).eps)
    scale = max(1.0, float(expected.abs().max()))
    return float((actual.double() - expected.double()).abs().max()) / (eps * scale)


def _hidden_states(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """The decoder's last hidden states ``[B, T, H]`` for the batch's ids and mask."""
    return _last_hidden(_decoder_output(model, batch))


def _decoder_output(
    model: nn.Module, batch: Mapping[str, Tensor], output_router_logits: bool = False
) -> object:
    """:func:`decoder`'s output for the batch's ids and mask, with each MoE layer's router logits
    (``router_logits``) when ``output_router_logits``; the flag is passed only then, as dense
    decoders do not take it."""
    extra = {"output_router_logits": True} if output_router_logits else {}
    return decoder(model)(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        use_cache=False,
        **extra,
    )


def sequence_stats(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    partitioned_head: bool = False,
) -> SequenceStats:
    """Per-sequence summed completion log-probs (and Hn) of ``model`` on a collated batch, equal
    to those of ``log_softmax(model(input_ids).logits)`` (see the module docstring).

    Args:
        model: a HF causal LM (:func:`decoder` returns ``last_hidden_state``; linear lm-head).
        batch: :func:`raypo.data.collate.collate_pairs` output: ``input_ids``, ``attention_mask``,
            ``target_ids``, ``target_mask``, each ``[2B, T]``.
        chunk_size: completion positions per chunk of fp32 logits.
        compute_entropy: also return ``Hn`` (needed from the reference for MallowsPO).
        partitioned_head: the lm-head weight is sharded (DeepSpeed ZeRO-3) and only whole inside
            the head's own forward; the head then runs as a module on all hidden states and the
            chunking applies to the model's transform and the fp32 upcast of its logits (which
            the head returns in the model's dtype).
    Returns:
        :class:`raypo.dispersion.SequenceStats` over the ``2B`` sequences (chosen first).
    Raises:
        UnsupportedModelError: raypo's path does not reproduce the model's own logits
            (:func:`verified_head_transform`, checked at the model's first use).
    """
    transform = verified_head_transform(model, batch)
    return _stats_of_hidden(
        model,
        transform,
        _hidden_states(model, batch),
        batch,
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        partitioned_head=partitioned_head,
    )


def _stats_of_hidden(
    model: nn.Module,
    transform: HeadTransform,
    hidden: Tensor,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int,
    compute_entropy: bool,
    partitioned_head: bool,
) -> SequenceStats:
    """:func:`sequence_stats` from the decoder's last hidden states ``hidden``."""
    hidden = transform.apply_before(hidden)
    if partitioned_head:
        source = {"logits": lm_head(model)(hidden)}
    else:
        head = _plain_linear_head(model)
        source = {"hidden_states": hidden, "lm_head_weight": head.weight, "lm_head_bias": head.bias}
    return sequence_logps_and_entropy(
        batch["target_ids"],
        batch["target_mask"],
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        logits_transform=transform.after,
        **source,
    )


def sequence_stats_and_aux_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int = 1024,
    partitioned_head: bool = False,
) -> tuple[SequenceStats, Tensor]:
    """:func:`sequence_stats` (without entropy) of a Mixture-of-Experts model, and from the same
    forward its router load-balancing loss: the ``aux_loss`` that
    ``model(input_ids, attention_mask=..., output_router_logits=True)`` returns.

    The decoder runs once with ``output_router_logits=True`` on the batch's ``2B`` chosen and
    rejected sequences and their attention mask, as TRL's DPOTrainer runs the policy, so the
    loss counts the same real tokens (padding excluded) as TRL's. The loss is the model's own
    (:func:`load_balancing_loss`), checked once per model against its ``forward``
    (:func:`verify_aux_loss`).

    Raises:
        UnsupportedModelError: raypo's path does not reproduce the model's own logits or
            ``aux_loss``.
    """
    transform = verified_head_transform(model, batch)
    verify_aux_loss(model, batch)
    output = _decoder_output(model, batch, output_router_logits=True)
    stats = _stats_of_hidden(
        model,
        transform,
        _last_hidden(output),
        batch,
        chunk_size=chunk_size,
        compute_entropy=False,
        partitioned_head=partitioned_head,
    )
    return stats, load_balancing_loss(model, output.router_logits, batch["attention_mask"])


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
            f"model.router_aux_loss_coef is {override} but {_model_name(model)} is not a "
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
            f"raypo cannot compute the router load-balancing loss of {_model_name(model)}: it "
            "needs the load_balancing_loss_func of its modeling module, its num_experts and "
            "num_experts_per_tok, and per-layer router logits from its decoder; set "
            "model.router_aux_loss_coef: 0 to train without it"
        )
    return function(router_logits, experts, top_k, attention_mask)


_AUX_VERIFIED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def verify_aux_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> None:
    """Check, once per model, that :func:`load_balancing_loss` of the decoder's router logits is
    the ``aux_loss`` of the model's own ``forward`` with ``output_router_logits=True``.

    Runs both on :func:`verified_head_transform`'s probe (a few tokens of the batch, twice, the
    second copy right-padded) in eval mode without grad, so that a model whose loss raypo
    reproduces wrongly (another signature, another normalisation) is refused, never trained on;
    they must agree within 64 ulp (the same operations on router logits that the two forwards
    may reduce in different orders).

    Raises:
        UnsupportedModelError: they differ, or either is missing; the message names the model.
    """
    if model in _AUX_VERIFIED:
        return
    ids, mask = _probe_inputs(model, batch)
    with _eval_mode(model), torch.no_grad():
        own = model(
            input_ids=ids, attention_mask=mask, output_router_logits=True, use_cache=False
        ).aux_loss
        output = _decoder_output(model, {"input_ids": ids, "attention_mask": mask}, True)
        ours = load_balancing_loss(model, getattr(output, "router_logits", None), mask)
    error = float("inf") if own is None else _relative_error(ours.to(own.dtype), own)
    if error > 64:
        raise UnsupportedModelError(
            f"raypo cannot reproduce the router load-balancing loss of {_model_name(model)}: "
            f"its forward's aux_loss is {own}, raypo's {ours} ({error:.3g} units in the last "
            "place); set model.router_aux_loss_coef: 0 to train without it"
        )
    _AUX_VERIFIED.add(model)


def split_pairs(values: Tensor) -> tuple[Tensor, Tensor]:
    """Chosen and rejected halves ``[B]`` of a concatenated ``[2B]`` tensor."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


@torch.no_grad()
def reference_columns(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    chunk_size: int = 1024,
    partitioned_head: bool = False,
    compute_entropy: bool = True,
) -> dict[str, Tensor]:
    """The reference columns of the preference data, each ``[B]`` float32: the log-probs and,
    with ``compute_entropy`` (what MallowsPO's dispersion needs), the normalised entropies."""
    stats = sequence_stats(
        model,
        batch,
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        partitioned_head=partitioned_head,
    )
    chosen_logps, rejected_logps = split_pairs(stats.logps.float())
    columns = {"ref_chosen_logps": chosen_logps, "ref_rejected_logps": rejected_logps}
    if compute_entropy:
        hn_chosen, hn_rejected = split_pairs(stats.hn.float())
        columns |= {"ref_hn_chosen": hn_chosen, "ref_hn_rejected": hn_rejected}
    return columns

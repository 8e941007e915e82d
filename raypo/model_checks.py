"""Once-per-model checks that raypo's forward reproduces the model's own ``forward``.

At a model's first use :func:`verified_head_transform` runs its own ``forward`` once on a few
tokens of the batch and checks that raypo's path (the decoder, the head's transform, the lm-head,
right padding) reproduces its logits; :func:`verify_aux_loss` does the same for a
Mixture-of-Experts model's router load-balancing loss, and :func:`verify_packing` for packed
sequences (``trainer.padding_free: packed``). A model that fails is refused with
:class:`raypo.model_parts.UnsupportedModelError` naming the model class and type, never trained
on silently.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raypo.model_parts import (
    HeadTransform,
    UnsupportedModelError,
    decoder,
    decoder_output,
    head_transform,
    last_hidden,
    lm_head,
    load_balancing_loss,
    model_name,
)
from raypo.padding_free import packed_layout, unpack_hidden

PROBE_TOKENS = 16
"""Tokens of the first sequence of a batch that :func:`verified_head_transform` runs the model's
own ``forward`` on, once per model."""


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
            f"raypo cannot reproduce the logits of {model_name(model)}: {problem} (raypo "
            f"applies {transform.description}). raypo computes log-probs in chunks from the "
            "decoder's last hidden states and the lm-head on right-padded batches; a model "
            "whose forward does more must be described in raypo.model_parts.HEAD_TRANSFORMS"
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


@torch.no_grad()
def _probe(
    model: nn.Module, head: nn.Module, ids: Tensor, mask: Tensor
) -> tuple[dict[str, list[Tensor]], Tensor, Tensor]:
    """The model's forward on ``ids`` with the decoder's output and the head's input and output
    captured; its logits; and the decoder's output when called directly."""
    captured: dict[str, list[Tensor]] = {"base": [], "head_in": [], "head_out": []}

    def on_base(module: nn.Module, args: tuple, output: object) -> None:
        captured["base"].append(last_hidden(output).clone())

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
        direct = last_hidden(decoder_output(model, ids, mask))
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
        output = decoder_output(model, ids, mask, output_router_logits=True)
        ours = load_balancing_loss(model, getattr(output, "router_logits", None), mask)
    error = float("inf") if own is None else _relative_error(ours.to(own.dtype), own)
    if error > 64:
        raise UnsupportedModelError(
            f"raypo cannot reproduce the router load-balancing loss of {model_name(model)}: "
            f"its forward's aux_loss is {own}, raypo's {ours} ({error:.3g} units in the last "
            "place); set model.router_aux_loss_coef: 0 to train without it"
        )
    _AUX_VERIFIED.add(model)


_PACKING_VERIFIED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def verify_packing(model: nn.Module, batch: Mapping[str, Tensor]) -> None:
    """Check, once per model, that packed sequences (restarting ``position_ids``, no attention
    mask) give the decoder's hidden states of the same sequences run apart, right-padded.

    Runs on the probe of :func:`verified_head_transform` (a few tokens of the batch, and a
    shorter copy) plus a third sequence that packs into one row with the shorter copy, in eval
    mode without grad, within the padding check's tolerance (64 ulp or
    1e-3 relative): a model whose attention ignores packed positions lets the second sequence
    attend to the first, which moves its hidden states by far more.

    Raises:
        UnsupportedModelError: they differ; the message names the model and the fix.
    """
    if model in _PACKING_VERIFIED:
        return
    ids, mask = _probe_inputs(model, batch)
    length, half = ids.shape[1], ids.shape[1] // 2
    third, third_mask = ids[1:].clone(), torch.zeros_like(mask[1:])
    third[0, :half], third_mask[0, :half] = ids[0, length - half :], 1
    ids, mask = torch.cat([ids, third]), torch.cat([mask, third_mask])
    layout = packed_layout(ids, mask, pad_token_id=int(ids[0, 0]))
    (call,) = layout.calls
    with _eval_mode(model), torch.no_grad():
        padded = last_hidden(decoder_output(model, ids, mask))
        packed = last_hidden(
            decoder_output(model, call.input_ids, None, position_ids=call.position_ids)
        )
    real = mask.bool()
    error = _relative_error(unpack_hidden([packed], layout)[real], padded[real])
    if error > max(64.0, 1e-3 / torch.finfo(padded.dtype).eps):
        raise UnsupportedModelError(
            f"{model_name(model)} does not keep packed sequences apart: the decoder's hidden "
            f"states of sequences packed with restarting position_ids differ from those run "
            f"apart by {error:.3g} units in the last place; set trainer.padding_free: bucketed "
            "(or off)"
        )
    _PACKING_VERIFIED.add(model)

"""One forward of a causal LM over a collated chosen+rejected batch, reduced per sequence.

Shared by the reference pass (:mod:`raypo.data.reference`), the trainer and evaluation, so that
the policy and the reference compute their log-probs and entropies the same way: the decoder's
last hidden states go through :func:`raypo.dispersion.sequence_logps_and_entropy` with the
lm-head weight, chunked over completion positions, so the fp32 ``[2B, T, V]`` logits never exist
at once. The model's own transform around its head (:mod:`raypo.model_parts`) is applied inside
the chunks, and checked once per model against its ``forward`` (:mod:`raypo.model_checks`), so
the log-probs are those of ``log_softmax(model(input_ids).logits)``.

The decoder runs padding-free by default (``trainer.padding_free``, :mod:`raypo.padding_free`):
``bucketed`` (length-sorted groups, one right-padded forward each) or ``packed`` (sequences end
to end with restarting ``position_ids``, one forward); ``auto`` picks ``packed`` for flash
attention and under DeepSpeed ZeRO-3 (every rank must run the same number of forwards, as each
gathers the parameters collectively), else ``bucketed``; ``off`` runs the padded batch. Either
layout's hidden states are put back into the padded layout before the head, so everything after
the decoder is the same computation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from raypo.dispersion import SequenceStats, sequence_logps_and_entropy
from raypo.model_checks import verified_head_transform, verify_aux_loss, verify_packing
from raypo.model_parts import (
    HeadTransform,
    decoder_output,
    last_hidden,
    lm_head,
    load_balancing_loss,
    plain_linear_head,
)
from raypo.padding_free import (
    Layout,
    bucketed_layout,
    length_buckets,
    packed_layout,
    real_router_logits,
    unpack_hidden,
)

REFERENCE_PREFIX = "ref_"
"""The reference columns of the preference data (:func:`reference_columns`: ``ref_chosen_logps``,
``ref_rejected_logps``, ``ref_hn_chosen``, ``ref_hn_rejected``) are named with this prefix."""

PADDING_FREE_CHOICES = ("auto", "bucketed", "packed", "off")
"""Values of ``trainer.padding_free`` (see the module docstring)."""


def padding_free_layout(
    setting: str, attn_implementation: str | None, partitioned_head: bool = False
) -> str:
    """The layout ``setting`` means for a model with attention kernel ``attn_implementation``:
    ``auto`` resolved as the module docstring says; ``bucketed`` under ZeRO-3
    (``partitioned_head``) is refused, as ranks would run different numbers of forwards and
    their parameter gathers would never meet."""
    if setting not in PADDING_FREE_CHOICES:
        raise ValueError(f"padding_free must be one of {PADDING_FREE_CHOICES}, got {setting!r}")
    if setting == "bucketed" and partitioned_head:
        raise ValueError(
            "trainer.padding_free: bucketed runs a data-dependent number of forwards per step, "
            "which DeepSpeed ZeRO-3 ranks cannot do in step; use packed or auto"
        )
    if setting != "auto":
        return setting
    flash = str(attn_implementation or "").startswith("flash")
    return "packed" if partitioned_head or flash else "bucketed"


def _attention_kernel(model: nn.Module) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def _layout(model: nn.Module, batch: Mapping[str, Tensor], layout: str) -> Layout:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if layout == "packed":
        verify_packing(model, batch)
        return packed_layout(ids, mask, pad_token_id=int(ids[0, 0]))
    return bucketed_layout(ids, mask, length_buckets(mask.sum(dim=1).tolist()))


def _decoder_hidden(
    model: nn.Module, batch: Mapping[str, Tensor], layout: str, router_logits: bool = False
) -> tuple[Tensor, Tensor | None]:
    """The decoder's last hidden states ``[2B, T, H]`` in the batch's padded layout, computed in
    ``layout`` (``off``, ``bucketed`` or ``packed``); with ``router_logits``, also the model's
    router load-balancing loss over the real tokens (else None)."""
    if layout == "off":
        output = decoder_output(
            model, batch["input_ids"], batch["attention_mask"], output_router_logits=router_logits
        )
        aux = None
        if router_logits:
            aux = load_balancing_loss(model, output.router_logits, batch["attention_mask"])
        return last_hidden(output), aux
    plan = _layout(model, batch, layout)
    outputs = [
        decoder_output(
            model,
            call.input_ids,
            call.attention_mask,
            position_ids=call.position_ids,
            output_router_logits=router_logits,
        )
        for call in plan.calls
    ]
    hidden = unpack_hidden([last_hidden(output) for output in outputs], plan)
    if not router_logits:
        return hidden, None
    # Only real tokens, so no mask: the padded batch's attention mask counts the same tokens.
    real = real_router_logits([output.router_logits for output in outputs], plan)
    return hidden, load_balancing_loss(model, real, None)


def sequence_stats(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    partitioned_head: bool = False,
    padding_free: str = "auto",
) -> SequenceStats:
    """Per-sequence summed completion log-probs (and Hn) of ``model`` on a collated batch, equal
    to those of ``log_softmax(model(input_ids).logits)`` (see the module docstring).

    Args:
        model: a HF causal LM (its decoder returns ``last_hidden_state``; linear lm-head).
        batch: :func:`raypo.data.collate.collate_pairs` output: ``input_ids``, ``attention_mask``,
            ``target_ids``, ``target_mask``, each ``[2B, T]``.
        chunk_size: completion positions per chunk of fp32 logits.
        compute_entropy: also return ``Hn`` (needed from the reference for MallowsPO).
        partitioned_head: the lm-head weight is sharded (DeepSpeed ZeRO-3) and only whole inside
            the head's own forward; the head then runs as a module on all hidden states and the
            chunking applies to the model's transform and the fp32 upcast of its logits (which
            the head returns in the model's dtype).
        padding_free: ``trainer.padding_free`` (:func:`padding_free_layout`).
    Returns:
        :class:`raypo.dispersion.SequenceStats` over the ``2B`` sequences (chosen first).
    Raises:
        UnsupportedModelError: raypo's path does not reproduce the model's own logits
            (:func:`raypo.model_checks.verified_head_transform`, checked at the model's first
            use), or packs sequences that the model does not keep apart.
    """
    transform = verified_head_transform(model, batch)
    layout = padding_free_layout(padding_free, _attention_kernel(model), partitioned_head)
    hidden, _ = _decoder_hidden(model, batch, layout)
    return _stats_of_hidden(
        model,
        transform,
        hidden,
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
        head = plain_linear_head(model)
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
    compute_entropy: bool = False,
    partitioned_head: bool = False,
    padding_free: str = "auto",
) -> tuple[SequenceStats, Tensor]:
    """:func:`sequence_stats` (Hn only with ``compute_entropy``) of a Mixture-of-Experts model,
    and from the same forward its router load-balancing loss: the ``aux_loss`` that
    ``model(input_ids, attention_mask=..., output_router_logits=True)`` returns.

    The decoder runs with ``output_router_logits=True`` on the batch's ``2B`` chosen and
    rejected sequences, as TRL's DPOTrainer runs the policy, and the loss counts the same real
    tokens (padding excluded) as TRL's, whatever the layout. The loss is the model's own
    (:func:`raypo.model_parts.load_balancing_loss`), checked once per model against its
    ``forward`` (:func:`raypo.model_checks.verify_aux_loss`).

    Raises:
        UnsupportedModelError: raypo's path does not reproduce the model's own logits or
            ``aux_loss``.
    """
    transform = verified_head_transform(model, batch)
    verify_aux_loss(model, batch)
    layout = padding_free_layout(padding_free, _attention_kernel(model), partitioned_head)
    hidden, aux_loss = _decoder_hidden(model, batch, layout, router_logits=True)
    stats = _stats_of_hidden(
        model,
        transform,
        hidden,
        batch,
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        partitioned_head=partitioned_head,
    )
    return stats, aux_loss


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
    padding_free: str = "auto",
) -> dict[str, Tensor]:
    """The reference columns of the preference data, each ``[B]`` float32: the log-probs and,
    with ``compute_entropy`` (what MallowsPO's dispersion needs), the normalised entropies."""
    stats = sequence_stats(
        model,
        batch,
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        partitioned_head=partitioned_head,
        padding_free=padding_free,
    )
    chosen_logps, rejected_logps = split_pairs(stats.logps.float())
    columns = {"ref_chosen_logps": chosen_logps, "ref_rejected_logps": rejected_logps}
    if compute_entropy:
        hn_chosen, hn_rejected = split_pairs(stats.hn.float())
        columns |= {"ref_hn_chosen": hn_chosen, "ref_hn_rejected": hn_rejected}
    return columns

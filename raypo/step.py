"""One preference step: the loss and the TRL-named metrics of one collated batch of pairs.

Every Ray Train worker calls :func:`preference_step` for each micro-batch (training and held-out
evaluation), and so do the benchmarks and the tests: there is no other copy of it. It is
mathematics only (no Ray, no DeepSpeed): the caller owns the engine, the gradient mode and the
optimizer. Data flows one way through it:

1. the policy's forward over the ``2B`` chosen+rejected sequences, reduced to summed completion
   log-probs (:func:`raypo.forward.sequence_stats`); for a Mixture-of-Experts policy also its
   router load-balancing loss (:func:`raypo.forward.sequence_stats_and_aux_loss`), as TRL's
   DPOTrainer requests it;
2. the reference values: the batch's precomputed ``ref_*`` columns, or one forward of an online
   reference model (:func:`raypo.forward.reference_columns`), with the normalised entropies only
   when the objective needs the dispersion or for the held-out evaluation; nothing for
   reference-free objectives. With LoRA the online reference is the policy itself with its
   adapters disabled (``reference_context``); the policy's forward has run before, and its
   backward runs after the context is left;
3. the MallowsPO dispersion weight ``w(x)`` from the reference entropies
   (:func:`raypo.dispersion.dispersion_weight`), where the objective uses it;
4. the objective and its metrics (:func:`raypo.losses.preference_loss`), plus
   ``router_aux_loss_coef * aux_loss`` for a Mixture-of-Experts policy (TRL's metric ``aux_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from raypo.config import LossConfig
from raypo.dispersion import SequenceStats, dispersion_weight
from raypo.forward import (
    REFERENCE_PREFIX,
    reference_columns,
    sequence_stats,
    sequence_stats_and_aux_loss,
    split_pairs,
)
from raypo.losses import PreferenceBatch, implicit_rewards, preference_loss
from raypo.mixdpo import StrengthDistribution
from raypo.model_parts import router_aux_loss_coef
from raypo.objectives import Objective, objective


@dataclass(frozen=True)
class ForwardSettings:
    """How the policy and the reference turn a batch into per-sequence log-probs."""

    chunk_size: int = 1024
    """Completion positions per chunk of fp32 logits (``trainer.logits_chunk_size``)."""
    partitioned_head: bool = False
    """The lm-head weight is sharded (DeepSpeed ZeRO-3) and whole only inside its own forward."""
    router_aux_loss_coef: float | None = None
    """Weight of a Mixture-of-Experts policy's router load-balancing loss
    (``model.router_aux_loss_coef``); None = the model config's own
    (:func:`raypo.model_parts.router_aux_loss_coef`)."""
    padding_free: str = "auto"
    """How the decoder skips padding (``trainer.padding_free``: ``auto``, ``bucketed``,
    ``packed``, ``off``; :func:`raypo.forward.padding_free_layout`)."""


@dataclass(frozen=True)
class StepResult:
    """What one step computed."""

    loss: Tensor
    """Mean loss over the batch's pairs, 0-dim; carries the gradient when grad mode is on."""
    metrics: dict[str, Tensor]
    """TRL-named metrics (detached, 0-dim): ``loss``, ``rewards/*``, ``logps/*``, and where they
    apply ``dispersion/*``, ``mixdpo/*``, ``likelihood/accuracies`` (the fraction of pairs whose
    chosen completion the policy finds likelier), ``reference/accuracies`` (the same for the
    reference model), ``aux_loss`` (a Mixture-of-Experts policy's router
    load-balancing loss, already weighted into ``loss``) and, with ``held_out``,
    ``entropy/policy`` and ``entropy/reference``: the mean over pairs of ``policy_hn`` and
    ``reference_hn`` of :attr:`per_pair`."""
    tokens: Tensor
    """Real (non-padding) tokens of the forward, prompt and completions of both halves: a 0-dim
    int64 tensor on the batch's device, so that the caller decides when to wait for it."""
    per_pair: dict[str, Tensor] = field(default_factory=dict)
    """Detached ``[B]`` values of each pair, what the held-out evaluation records pair by pair
    (only with ``held_out``; empty otherwise, as training reads none of it):
    ``reward_chosen`` and ``reward_rejected`` (the implicit rewards of ``rewards/*``), and where
    known ``reference_hn`` and ``policy_hn``, the pair's normalised entropy
    ``Hn(x) = (Hn(y_w) + Hn(y_l)) / 2`` under the reference and the policy (unclamped)."""


def preference_step(
    policy: nn.Module,
    batch: Mapping[str, Tensor],
    loss: LossConfig,
    *,
    reference_model: nn.Module | None = None,
    reference_context: Callable[[], AbstractContextManager[Any]] | None = None,
    strength: StrengthDistribution | None = None,
    forward: ForwardSettings = ForwardSettings(),
    held_out: bool = False,
) -> StepResult:
    """Loss and metrics of ``loss.type`` on one batch (see the module docstring for the order).

    Args:
        policy: a Hugging Face causal LM (or a DeepSpeed engine's ``module``).
        batch: :func:`raypo.data.collate.collate_pairs` output on the policy's device; with
            ``reference.mode: precomputed`` it carries the ``ref_*`` columns.
        loss: the objective and its settings.
        reference_model: the frozen reference for ``reference.mode: online``; None = take the
            reference values from the batch's ``ref_*`` columns (or use none, for reference-free
            objectives).
        reference_context: entered around the online reference's forward, e.g.
            :func:`raypo.lora.adapters_disabled` of a LoRA policy, ``reference_model`` then
            being the policy's own transformers model (:func:`raypo.lora.causal_lm`), which
            computes the base weights' outputs inside; None = no context.
        strength: the MixDPO strength distribution (``loss.type: mixdpo``).
        forward: chunking and ZeRO-3 handling of both forwards, the router loss's weight.
        held_out: the held-out evaluation's step: also compute the policy's normalised entropy
            over the completions (``entropy/policy``, and ``entropy/reference`` where the
            reference's is known), one more pass over each chunk of logits, and
            :attr:`StepResult.per_pair`; training leaves it off.

    Raises:
        ValueError: the objective needs reference values the batch does not carry, or
            ``forward.router_aux_loss_coef`` is non-zero for a policy that is not a MoE model.
    """
    spec = objective(loss.type)
    coef = router_aux_loss_coef(policy, forward.router_aux_loss_coef)
    policy_stats, aux_loss = _policy_forward(
        policy, batch, forward, with_aux_loss=coef != 0.0, compute_entropy=held_out
    )
    # The reference is a constant of the objective: no graph, even when it is the policy's own
    # module (LoRA), whose embedding output may require grad for gradient checkpointing.
    with torch.no_grad(), (reference_context or nullcontext)():
        reference = _reference_values(spec, batch, reference_model, forward, held_out)
    dispersion = None
    if spec.uses_dispersion:
        hn_chosen, hn_rejected = reference["ref_hn_chosen"], reference["ref_hn_rejected"]
        dispersion = dispersion_weight(hn_chosen, hn_rejected, loss.dispersion_scale)
    chosen, rejected = split_pairs(policy_stats.logps)
    chosen_lengths, rejected_lengths = split_pairs(policy_stats.lengths)
    pairs = PreferenceBatch(
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        reference_chosen_logps=reference.get("ref_chosen_logps"),
        reference_rejected_logps=reference.get("ref_rejected_logps"),
        dispersion=dispersion,
    )
    value, metrics = preference_loss(loss, pairs, strength)
    if aux_loss is not None:
        value = value + coef * aux_loss.to(value.dtype)
        metrics |= {"loss": value.detach(), "aux_loss": aux_loss.detach()}
    # The policy's own likelihood accuracy: the same measure as reference/accuracies, so that a
    # held-out evaluation compares before (the reference) with after (the policy) like for like.
    metrics["likelihood/accuracies"] = (chosen > rejected).float().mean()
    if "ref_chosen_logps" in reference:
        ref_margin = reference["ref_chosen_logps"] - reference["ref_rejected_logps"]
        metrics["reference/accuracies"] = (ref_margin > 0).float().mean()
    per_pair: dict[str, Tensor] = {}
    if held_out:
        per_pair = _per_pair(loss, pairs, policy_stats, reference)
        metrics["entropy/policy"] = per_pair["policy_hn"].mean()
        if "reference_hn" in per_pair:
            metrics["entropy/reference"] = per_pair["reference_hn"].mean()
    return StepResult(value, metrics, batch["attention_mask"].sum(), per_pair)


def _per_pair(
    loss: LossConfig,
    pairs: PreferenceBatch,
    policy_stats: SequenceStats,
    reference: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """:attr:`StepResult.per_pair` of the batch."""
    reward_chosen, reward_rejected = implicit_rewards(loss, pairs)
    values = {"reward_chosen": reward_chosen, "reward_rejected": reward_rejected}
    if "ref_hn_chosen" in reference:
        hn = (reference["ref_hn_chosen"].float() + reference["ref_hn_rejected"].float()) / 2
        values["reference_hn"] = hn.detach()
    if policy_stats.hn is not None:
        hn_chosen, hn_rejected = split_pairs(policy_stats.hn.detach().float())
        values["policy_hn"] = (hn_chosen + hn_rejected) / 2
    return values


def _policy_forward(
    policy: nn.Module,
    batch: Mapping[str, Tensor],
    forward: ForwardSettings,
    with_aux_loss: bool,
    compute_entropy: bool,
) -> tuple[SequenceStats, Tensor | None]:
    """The policy's summed completion log-probs (with ``compute_entropy`` also Hn) and, with
    ``with_aux_loss``, its router load-balancing loss from the same forward (else None)."""
    settings = {
        "chunk_size": forward.chunk_size,
        "compute_entropy": compute_entropy,
        "partitioned_head": forward.partitioned_head,
        "padding_free": forward.padding_free,
    }
    if with_aux_loss:
        return sequence_stats_and_aux_loss(policy, batch, **settings)
    return sequence_stats(policy, batch, **settings), None


def _reference_values(
    spec: Objective,
    batch: Mapping[str, Tensor],
    reference_model: nn.Module | None,
    forward: ForwardSettings,
    held_out: bool,
) -> dict[str, Tensor]:
    """The reference columns this step uses: from the online model, the batch, or none. The
    online reference computes its entropies where the objective uses the dispersion, and for
    the held-out evaluation (``reference_hn``, by which ``raypo report`` buckets any run)."""
    if reference_model is not None:
        return reference_columns(
            reference_model,
            batch,
            forward.chunk_size,
            partitioned_head=forward.partitioned_head,
            compute_entropy=spec.uses_dispersion or held_out,
            padding_free=forward.padding_free,
        )
    columns = {name: value for name, value in batch.items() if name.startswith(REFERENCE_PREFIX)}
    needed = ["ref_chosen_logps", "ref_rejected_logps"] if spec.uses_reference else []
    needed += ["ref_hn_chosen", "ref_hn_rejected"] if spec.uses_dispersion else []
    missing = [name for name in needed if name not in columns]
    if missing:
        raise ValueError(
            f"the objective needs the reference columns {missing}, which the batch does not "
            "carry: precompute them (reference.mode: precomputed) or pass a reference model"
        )
    return columns

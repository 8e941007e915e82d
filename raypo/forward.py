"""One forward of a causal LM over a collated chosen+rejected batch, reduced per sequence.

Shared by the reference pass (:mod:`raypo.data.reference`) and the trainer, so that the policy and
the reference compute their log-probs and entropies the same way: the decoder's last hidden
states go through :func:`raypo.dispersion.sequence_logps_and_entropy` with the lm-head weight,
chunked over completion positions, so the fp32 ``[2B, T, V]`` logits never exist at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from raypo.dispersion import SequenceStats, sequence_logps_and_entropy

REFERENCE_PREFIX = "ref_"
"""The reference columns of the preference data (:func:`reference_columns`: ``ref_chosen_logps``,
``ref_rejected_logps``, ``ref_hn_chosen``, ``ref_hn_rejected``) are named with this prefix."""


def lm_head(model: nn.Module) -> nn.Linear:
    """The output projection of a HF causal LM (``get_output_embeddings``), checked to be linear."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"{type(model).__name__}'s output embedding is {type(head).__name__}, not nn.Linear; "
            "raypo computes log-probs from the decoder's hidden states and a linear lm-head"
        )
    return head


def sequence_stats(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    partitioned_head: bool = False,
) -> SequenceStats:
    """Per-sequence summed completion log-probs (and Hn) of ``model`` on a collated batch.

    Args:
        model: a HF causal LM (``base_model`` returns ``last_hidden_state``; linear lm-head).
        batch: :func:`raypo.data.collate.collate_pairs` output: ``input_ids``, ``attention_mask``,
            ``target_ids``, ``target_mask``, each ``[2B, T]``.
        chunk_size: completion positions per chunk of fp32 logits.
        compute_entropy: also return ``Hn`` (needed from the reference for MallowsPO).
        partitioned_head: the lm-head weight is sharded (DeepSpeed ZeRO-3) and only whole inside
            the head's own forward; the head then runs as a module on all hidden states and the
            chunking applies to the fp32 upcast of its logits (in the model's dtype).
    Returns:
        :class:`raypo.dispersion.SequenceStats` over the ``2B`` sequences (chosen first).
    """
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    head = lm_head(model)
    source = (
        {"logits": head(hidden)}
        if partitioned_head
        else {"hidden_states": hidden, "lm_head_weight": head.weight, "lm_head_bias": head.bias}
    )
    return sequence_logps_and_entropy(
        batch["target_ids"],
        batch["target_mask"],
        chunk_size=chunk_size,
        compute_entropy=compute_entropy,
        **source,
    )


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

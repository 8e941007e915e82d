"""The supervised fine-tuning loss of one batch: mean next-token NLL over completion tokens.

As TRL's ``SFTTrainer`` with ``completion_only_loss``: every completion token of the batch counts
once (a token mean over the whole batch, not a mean of per-sequence means); prompt and padding
positions are masked out by the collated ``target_mask``. Mathematics only (no Ray, no
DeepSpeed); the forward is :func:`raypo.forward.sequence_stats`, the same chunked, padding-free
path as the preference step's.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from raypo.forward import sequence_stats
from raypo.step import ForwardSettings, StepResult

COMPLETION_KEYS = ("input_ids", "attention_mask", "target_ids", "target_mask")
"""The collated columns one SFT forward reads, each ``[B, T]``."""


def sft_step(model: nn.Module, batch: Mapping[str, Tensor], forward: ForwardSettings) -> StepResult:
    """Completion-only next-token loss of ``model`` on ``batch``.

    Args:
        model: a Hugging Face causal LM (or a DeepSpeed engine's ``module``).
        batch: ``B`` prompt + completion sequences: ``input_ids``, ``attention_mask``,
            ``target_ids``, ``target_mask`` (``[B, T]``), shifted and masked as
            :func:`raypo.data.collate.collate_pairs` makes them.
        forward: chunking, ZeRO-3 head and padding-free layout of the forward.

    Returns:
        ``loss`` = -sum(log p(completion tokens)) / number of completion tokens (0-dim, with the
        gradient when grad mode is on; the collator refuses empty completions, so the count is
        never 0); metric ``loss``; ``tokens``: real tokens of the forward (prompt and completion).
    """
    stats = sequence_stats(
        model,
        {name: batch[name] for name in COMPLETION_KEYS},
        chunk_size=forward.chunk_size,
        compute_entropy=False,
        partitioned_head=forward.partitioned_head,
        padding_free=forward.padding_free,
    )
    loss = -stats.logps.sum() / stats.lengths.sum().to(stats.logps.dtype)
    return StepResult(loss, {"loss": loss.detach()}, batch["attention_mask"].sum())

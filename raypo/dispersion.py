"""Reference-model dispersion for MallowsPO: normalised entropy ``Hn`` and the weight ``w(x)``.

MallowsPO (Chen, Zhao, Lam, Yao, Tang, "MallowsPO: Fine-Tune Your LLM with Preference
Dispersions", ICLR 2025) gives every prompt ``x`` a dispersion ``phi(x)`` estimated from the
*reference* model's next-token entropy over the two completions (docs/methods.md, "Dispersion
estimate"):

- per completion ``y``:  ``Hn(y) = sum_t H_t m_t / (sum_t m_t * ln V)``, ``H_t`` the entropy in
  nats of the full next-token distribution at position ``t``, ``m_t`` the completion mask and
  ``V`` the logits' last dimension;
- per pair: ``Hn(x) = (Hn(y_w) + Hn(y_l)) / 2`` clamped to ``>= 1e-6``;
- weight: ``w(x) = -c ln Hn(x)`` with scale ``c > 0``; equivalently ``phi(x) = exp(-w(x))``.

The fp32 ``[batch, seq, V]`` logits tensor is the memory peak of a preference step, so
:func:`sequence_logps_and_entropy` computes label log-probs and entropies over chunks of positions
(and recomputes each chunk in the backward pass), never holding more than one chunk of fp32 logits.
Only torch is imported; importing this module does no work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

HN_FLOOR = 1e-6
"""Lower clamp of the pair entropy ``Hn(x)`` so that ``w(x) = -c ln Hn(x)`` stays finite."""


class SequenceStats(NamedTuple):
    """Per-sequence results of :func:`sequence_logps_and_entropy` (``B`` = batch size).

    logps: ``[B]`` summed log-probabilities of the labels over completion positions, float32
        (float64 when the input is float64); differentiable w.r.t. the logits or the hidden
        states / lm-head parameters it came from.
    hn: ``[B]`` normalised entropy ``Hn(y)`` in ``[0, 1]``, same dtype as ``logps``, never requires
        grad; ``None`` when ``compute_entropy=False``.
    lengths: ``[B]`` int64 number of completion positions (nonzero mask entries) per sequence.
    """

    logps: Tensor
    hn: Tensor | None
    lengths: Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics in float32 or wider: bf16/fp16 inputs are upcast, float64 is kept.
    return torch.promote_types(dtype, torch.float32)


def _masked_positions(mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices ``[N]`` and batch rows ``[N]`` of the nonzero entries of ``mask [B, T]``,
    and the per-row counts ``[B]`` (int64)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [batch, seq], got {tuple(mask.shape)}")
    selected = mask != 0
    flat_index = selected.reshape(-1).nonzero().squeeze(1)
    rows = torch.div(flat_index, mask.shape[1], rounding_mode="floor")
    return flat_index, rows, selected.sum(dim=1)


def _require_nonempty(lengths: Tensor) -> None:
    empty = (lengths == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"normalised entropy Hn is undefined for sequences with no completion positions: "
            f"mask is all zero at batch indices {empty}; drop those rows or fix the mask"
        )


def _require_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _require_vocab(vocab: int) -> None:
    if vocab < 2:
        raise ValueError(f"vocabulary size (logits' last dimension) must be >= 2, got {vocab}")


def _entropy_from_logp(logp: Tensor) -> Tensor:
    # entr(p) = -p ln p with entr(0) = 0, so -inf logits (masked vocab) give 0, not 0 * inf = NaN;
    # in place on the probabilities to hold one [n, V] temporary, not two.
    probs = logp.exp()
    return torch.special.entr(probs, out=probs).sum(dim=-1)


def _normalise(entropy_sums: Tensor, lengths: Tensor, vocab: int) -> Tensor:
    return entropy_sums / (lengths.to(entropy_sums.dtype) * math.log(vocab))


def normalized_entropy(logits: Tensor, mask: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Normalised entropy ``Hn(y)`` per sequence (MallowsPO, Chen et al., ICLR 2025).

    ``Hn(y) = sum_t H_t m_t / (sum_t m_t * ln V)`` with ``H_t = -sum_v p_tv ln p_tv`` of
    ``p_t = softmax(logits[b, t])`` in nats and ``V = logits.shape[-1]``; uniform logits give 1,
    a one-hot distribution gives 0.

    Args:
        logits: ``[B, T, V]`` any float dtype; softmax is computed in float32 or wider.
        mask: ``[B, T]``; nonzero entries are the completion positions ``m_t = 1``.
        chunk_size: number of masked positions (flattened over the batch) whose fp32
            softmax is held at once.

    Returns:
        ``[B]`` float32 (float64 for float64 logits), without grad: the estimate is a per-pair
        constant taken from the reference model.

    Raises:
        ValueError: a sequence has no completion position (``Hn`` would be 0/0); the message
            names the batch indices. Padding rows must be dropped before calling this.
    """
    if logits.dim() != 3 or logits.shape[:2] != mask.shape:
        raise ValueError(
            f"logits [batch, seq, V] and mask [batch, seq] disagree: "
            f"{tuple(logits.shape)} vs {tuple(mask.shape)}"
        )
    _require_chunk_size(chunk_size)
    vocab = logits.shape[-1]
    _require_vocab(vocab)
    dtype = _compute_dtype(logits.dtype)
    with torch.no_grad():
        flat_index, rows, lengths = _masked_positions(mask)
        _require_nonempty(lengths)
        selected = logits.reshape(-1, vocab).index_select(0, flat_index)
        token_entropy = torch.cat(
            [
                _entropy_from_logp(torch.log_softmax(chunk.to(dtype), dim=-1))
                for chunk in selected.split(chunk_size)
            ]
        )
        sums = torch.zeros(mask.shape[0], dtype=dtype, device=logits.device)
        return _normalise(sums.index_add_(0, rows, token_entropy), lengths, vocab)


def dispersion_weight(hn_chosen: Tensor, hn_rejected: Tensor, scale: float) -> Tensor:
    """MallowsPO dispersion weight ``w(x) = -c ln Hn(x)`` (Chen et al., ICLR 2025).

    ``Hn(x) = max((Hn(y_w) + Hn(y_l)) / 2, 1e-6)``; ``c = scale`` (the authors' default 0.29).
    ``w >= 0`` for ``Hn <= 1``; ``w = 0`` at maximal entropy and grows as the reference model
    becomes confident. MallowsPO-theta multiplies ``beta * h`` by ``w``; MallowsPO-phi uses
    ``phi = exp(-w)`` (:func:`dispersion_phi`).

    Args:
        hn_chosen, hn_rejected: ``[B]`` normalised entropies of the reference model.
        scale: ``c > 0``.

    Returns:
        ``[B]`` in the inputs' dtype, detached: the weight is a per-pair constant.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"dispersion scale must be a finite number > 0, got {scale}")
    if hn_chosen.shape != hn_rejected.shape:
        raise ValueError(
            f"hn_chosen and hn_rejected must have the same shape, got "
            f"{tuple(hn_chosen.shape)} and {tuple(hn_rejected.shape)}"
        )
    hn_pair = ((hn_chosen.detach() + hn_rejected.detach()) / 2).clamp_min(HN_FLOOR)
    return -scale * torch.log(hn_pair)


def dispersion_phi(weight: Tensor) -> Tensor:
    """Mallows dispersion ``phi(x) = exp(-w(x)) = Hn(x)^c`` in ``(0, 1]`` from ``w`` ``[B]``."""
    return torch.exp(-weight)


LogitsTransform = Callable[[Tensor], Tensor]
"""An elementwise map of a chunk of logits ``[n, V]`` (e.g. a model's final-logit softcapping)."""


def _chunk_stats(
    inputs: Tensor,
    labels: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    compute_entropy: bool,
    transform: LogitsTransform | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Label log-probs ``[n]`` and entropies ``[n]`` (or None) of one chunk of positions.

    ``inputs`` is ``[n, V]`` logits when ``weight`` is None, else ``[n, H]`` hidden states whose
    logits are ``inputs @ weight.T + bias`` in the hidden dtype (as the model's own lm-head would
    compute them); ``transform`` (if any) maps those logits in their own dtype, then they are
    upcast.
    """
    logits = inputs if weight is None else F.linear(inputs, weight, bias)
    if transform is not None:
        logits = transform(logits)
    # Rebinding, then deleting, `logits` frees each pre-softmax buffer as soon as its successor
    # exists: at most two [n, V] buffers are alive at once, here and in the entropy (three while
    # a transform such as softcap(z) = c tanh(z / c) holds its input and an intermediate).
    logits = logits.to(_compute_dtype(logits.dtype))
    logp = torch.log_softmax(logits, dim=-1)
    del logits
    # Gather before the entropy: under checkpoint, recomputation stops after the last tensor
    # saved for backward, so the entropy (grad-free) is not recomputed in the backward pass.
    token_logp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    if not compute_entropy:
        return token_logp, None
    with torch.no_grad():
        return token_logp, _entropy_from_logp(logp)


def _resolve_source(
    logits: Tensor | None,
    hidden_states: Tensor | None,
    lm_head_weight: Tensor | None,
    lm_head_bias: Tensor | None,
) -> tuple[Tensor, int]:
    """The ``[B, T, D]`` tensor to chunk and the vocabulary size ``V``."""
    if logits is not None:
        if hidden_states is not None or lm_head_weight is not None or lm_head_bias is not None:
            raise ValueError("pass either `logits` or `hidden_states` + `lm_head_weight`, not both")
        source, vocab = logits, logits.shape[-1]
    elif hidden_states is None or lm_head_weight is None:
        raise ValueError("pass `logits`, or both `hidden_states` and `lm_head_weight`")
    else:
        source, vocab = hidden_states, lm_head_weight.shape[0]
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != source.shape[-1]:
            raise ValueError(
                f"lm_head_weight must be [V, hidden={source.shape[-1]}], got "
                f"{tuple(lm_head_weight.shape)}"
            )
    if source.dim() != 3:
        raise ValueError(f"expected a [batch, seq, dim] tensor, got {tuple(source.shape)}")
    return source, vocab


def _require_agreement(
    labels: Tensor, mask: Tensor, source: Tensor, chunk_size: int, vocab: int
) -> None:
    if labels.shape != mask.shape or source.shape[:2] != mask.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)}, mask {tuple(mask.shape)} and the model output "
            f"{tuple(source.shape)} must agree on [batch, seq]"
        )
    _require_chunk_size(chunk_size)
    _require_vocab(vocab)


def _gather_labels(labels: Tensor, flat_index: Tensor, vocab: int) -> Tensor:
    selected = labels.reshape(-1).index_select(0, flat_index)
    bad = (selected < 0) | (selected >= vocab)
    if bad.any():
        raise ValueError(
            f"label {int(selected[bad][0])} at a completion position (mask != 0) is outside "
            f"[0, {vocab}); ignored labels such as -100 must have mask 0"
        )
    return selected


def _chunked_token_stats(
    inputs: Tensor,
    targets: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    chunk_size: int,
    compute_entropy: bool,
    transform: LogitsTransform | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`_chunk_stats` over ``[N, D]`` gathered positions, ``chunk_size`` rows at a time;
    checkpointed per chunk when a gradient is needed. Returns ``[N]`` log-probs and entropies."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (inputs, weight, bias)
    )
    token_logps, token_entropies = [], []
    for chunk, chunk_labels in zip(
        inputs.split(chunk_size), targets.split(chunk_size), strict=True
    ):
        args = (chunk, chunk_labels, weight, bias, compute_entropy, transform)
        if needs_grad:
            logp, entropy = checkpoint(_chunk_stats, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_stats(*args)
        token_logps.append(logp)
        token_entropies.append(entropy)
    token_entropy = torch.cat(token_entropies) if compute_entropy else None
    return torch.cat(token_logps), token_entropy


def sequence_logps_and_entropy(
    labels: Tensor,
    mask: Tensor,
    *,
    logits: Tensor | None = None,
    hidden_states: Tensor | None = None,
    lm_head_weight: Tensor | None = None,
    lm_head_bias: Tensor | None = None,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    logits_transform: LogitsTransform | None = None,
) -> SequenceStats:
    """Summed label log-probs and ``Hn(y)`` per sequence, chunked over completion positions.

    ``logps[b] = sum_t m_bt log softmax(z_bt)[labels_bt]`` (the DPO/MallowsPO sequence
    log-likelihood) and ``hn[b] = Hn(y_b)`` as in :func:`normalized_entropy` (MallowsPO, Chen et
    al., ICLR 2025), from either ``logits`` or ``hidden_states`` and the lm-head.

    How the memory is kept down (a deviation from computing full ``[B, T, V]`` logits, with
    identical results up to float rounding):

    - only positions with ``mask != 0`` are computed: they are gathered first (prompt and padding
      positions never reach the softmax), then split into chunks of ``chunk_size`` positions
      counted over the flattened batch;
    - each chunk's logits are upcast to float32 (or wider) for the softmax, so at most one chunk
      of fp32 ``[chunk_size, V]`` logits exists at a time;
    - when a gradient is needed each chunk runs under ``torch.utils.checkpoint`` and is
      recomputed in the backward pass, so the backward holds one chunk too (costing one extra
      lm-head matmul per chunk). From ``logits`` the gathered ``[N, V]`` copy in the logits'
      dtype is kept for the backward.

    Args:
        labels: ``[B, T]`` int64 target ids, already shifted (``labels[:, t]`` is predicted at
            position ``t``); values at positions with mask 0 are ignored (e.g. -100).
        mask: ``[B, T]``; nonzero entries are the completion positions.
        logits: ``[B, T, V]`` any float dtype; or
        hidden_states: ``[B, T, H]`` final hidden states, with
        lm_head_weight: ``[V, H]`` and optional ``lm_head_bias`` ``[V]``, in the hidden dtype.
        chunk_size: number of completion positions per chunk (flattened over the batch). On
            CPU with glibc keep ``chunk_size * V * 4`` bytes >= 32 MiB (or run with
            ``MALLOC_MMAP_THRESHOLD_=65536``): freed buffers below glibc's dynamic mmap
            threshold stay in a fragmenting heap, and at V = 32000 chunks of 256 positions
            peaked at about 2.1 GiB RSS against 0.12 GiB with the fixed threshold
            (``benchmarks/memory_entropy.py``).
        compute_entropy: also return ``hn``; the entropy is computed without grad since only the
            reference model's is used. Requires every sequence to have a completion position.
        logits_transform: what the model's forward does to the lm-head's output (e.g. Gemma-2's
            softcapping), applied to each chunk's logits in their dtype before the upcast; it
            must be elementwise (so per-chunk equals full) and keep ``V``. None = identity.

    Returns:
        :class:`SequenceStats` ``(logps [B], hn [B] | None, lengths [B])``.

    Raises:
        ValueError: not exactly one of ``logits`` / (``hidden_states``, ``lm_head_weight``);
            shapes disagree; ``chunk_size < 1``; a label at a completion position is outside
            ``[0, V)``; ``compute_entropy`` with an all-zero mask row.
    """
    source, vocab = _resolve_source(logits, hidden_states, lm_head_weight, lm_head_bias)
    _require_agreement(labels, mask, source, chunk_size, vocab)
    flat_index, rows, lengths = _masked_positions(mask)
    if compute_entropy:
        _require_nonempty(lengths)
    targets = _gather_labels(labels, flat_index, vocab)
    inputs = source.reshape(-1, source.shape[-1]).index_select(0, flat_index)
    weight, bias = (None, None) if logits is not None else (lm_head_weight, lm_head_bias)
    token_logp, token_entropy = _chunked_token_stats(
        inputs, targets, weight, bias, chunk_size, compute_entropy, logits_transform
    )
    zeros = token_logp.new_zeros(mask.shape[0])
    logps = zeros.index_add(0, rows, token_logp)
    hn = None
    if compute_entropy:
        entropy_sums = zeros.index_add(0, rows, token_entropy)
        hn = _normalise(entropy_sums, lengths, vocab)
    return SequenceStats(logps=logps, hn=hn, lengths=lengths)

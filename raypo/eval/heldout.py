"""The held-out pairs of a run as its last evaluation left them, and their dispersion buckets.

``RUN_DIR/heldout_pairs.jsonl`` (:mod:`raypo.train.records`) holds one line per held-out pair at
every evaluation during training. The report reads the last evaluation's lines: the implicit
rewards ``r = beta (log pi - log pi_ref)`` of each pair's chosen and rejected completion (not
scaled by the dispersion, so DPO's and MallowsPO's are on one scale for a given beta) and the
reference's normalised entropy ``Hn(x)`` of the pair, the quantity behind MallowsPO's dispersion
``w(x) = -c ln Hn(x)`` (METHODS.md): a low ``Hn(x)`` is a confident reference, a low-dispersion
prompt, where MallowsPO's weight is largest. The buckets are the quintiles of ``Hn(x)`` over the
held-out pairs (the same cut as ``benchmarks/hh_tiny.py``'s accuracy by dispersion quintile).
Pure numpy; nothing here reads a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BUCKETS = 5
"""Dispersion buckets: quintiles of the reference's ``Hn(x)``."""


@dataclass(frozen=True)
class HeldOut:
    """Every held-out pair's values at one evaluation, in pair-id order (arrays of one length)."""

    step: int
    """The optimizer step of the evaluation."""
    ids: list[str]
    """Pair ids."""
    reward_chosen: np.ndarray
    """Implicit reward of each chosen completion."""
    reward_rejected: np.ndarray
    """Implicit reward of each rejected completion."""
    reference_hn: np.ndarray | None
    """The reference's ``Hn(x)`` of each pair; None when the evaluation had no reference
    entropies (an online reference for an objective without the dispersion)."""
    policy_hn: np.ndarray | None
    """The policy's ``Hn(x)`` on the pair's completions; None when not recorded."""

    @property
    def margins(self) -> np.ndarray:
        """``r(x, y_w) - r(x, y_l)`` of each pair."""
        return self.reward_chosen - self.reward_rejected


@dataclass(frozen=True)
class Bucket:
    """The held-out pairs of one dispersion quintile."""

    index: int
    """0 = lowest ``Hn(x)`` (most confident reference), ``BUCKETS - 1`` = highest."""
    hn_low: float | None
    """Smallest ``Hn(x)`` in the bucket; None when it is empty."""
    hn_high: float | None
    """Largest ``Hn(x)`` in the bucket; None when it is empty."""
    pairs: int
    """Pairs in the bucket."""
    accuracy: float | None
    """Fraction with a strictly positive margin; None when empty."""
    margin_mean: float | None
    """Mean implicit-reward margin; None when empty."""
    margin_sem: float | None
    """Standard error of that mean (sample std / sqrt(pairs)); None under two pairs."""


def _column(rows: Sequence[dict[str, Any]], name: str) -> np.ndarray | None:
    """``name`` of every row as float64, or None when some row lacks it."""
    if not all(row.get(name) is not None for row in rows):
        return None
    return np.array([row[name] for row in rows], dtype=np.float64)


def last_evaluation(records: Sequence[dict[str, Any]]) -> HeldOut | None:
    """The last evaluation's pairs in ``records`` (heldout_pairs.jsonl's lines); a pair written
    twice at that step (a run resumed from a checkpoint before it) counts once, its last line.
    None when there are no records."""
    if not records:
        return None
    step = max(int(row["step"]) for row in records)
    by_id = {str(row["id"]): row for row in records if int(row["step"]) == step}
    rows = [by_id[pair_id] for pair_id in sorted(by_id)]
    return HeldOut(
        step=step,
        ids=sorted(by_id),
        reward_chosen=np.array([row["reward_chosen"] for row in rows], dtype=np.float64),
        reward_rejected=np.array([row["reward_rejected"] for row in rows], dtype=np.float64),
        reference_hn=_column(rows, "reference_hn"),
        policy_hn=_column(rows, "policy_hn"),
    )


def bucket_of(hn: np.ndarray, count: int = BUCKETS) -> np.ndarray:
    """The quantile bucket (0 .. count-1) of each ``Hn(x)``: edges at the 1/count, 2/count, ...
    quantiles (numpy's linear interpolation), a value on an edge going to the upper bucket."""
    edges = np.quantile(hn, np.arange(1, count) / count)
    return np.searchsorted(edges, hn, side="right")


def _bucket(index: int, hn: np.ndarray, margins: np.ndarray) -> Bucket:
    if not len(margins):
        return Bucket(index, None, None, 0, None, None, None)
    sem = float(np.std(margins, ddof=1) / np.sqrt(len(margins))) if len(margins) > 1 else None
    return Bucket(
        index=index,
        hn_low=float(hn.min()),
        hn_high=float(hn.max()),
        pairs=len(margins),
        accuracy=float(np.mean(margins > 0)),
        margin_mean=float(np.mean(margins)),
        margin_sem=sem,
    )


def dispersion_buckets(held_out: HeldOut, count: int = BUCKETS) -> list[Bucket]:
    """Accuracy and margin of the pairs in each quantile bucket of the reference's ``Hn(x)``.

    Raises:
        ValueError: the evaluation recorded no reference entropies.
    """
    if held_out.reference_hn is None:
        raise ValueError("the held-out pairs carry no reference entropies reference_hn")
    hn, margins = held_out.reference_hn, held_out.margins
    buckets = bucket_of(hn, count)
    return [_bucket(i, hn[buckets == i], margins[buckets == i]) for i in range(count)]

"""Text-level checks of a normalised pair, and the summary of what was accepted and rejected.

:func:`check_texts` finds the problems that make a pair useless whatever the tokenizer: an empty
prompt or completion, and identical completions. :class:`DataSummary` counts rows per reason and
per source; summaries of separate tasks :meth:`~DataSummary.merge`, and
:meth:`~DataSummary.check` stops a run whose rejection rate is above ``data.max_reject_fraction``
before any training starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypo.data.records import REJECT_REASONS, PreferencePair, Rejection, Text

TOP_REASONS = 3
"""Reasons named in a :class:`DataQualityError` message."""


class DataQualityError(ValueError):
    """Too many rows were rejected (or none accepted); the message names the counts, the
    threshold, the rejects file and the most frequent reasons."""


def is_blank(text: Text) -> bool:
    """Whether a text is empty or whitespace only (a message list: every content is)."""
    if isinstance(text, str):
        return not text.strip()
    return all(not message["content"].strip() for message in text)


def check_texts(prompt: Text, chosen: Text, rejected: Text | None) -> tuple[str, str] | None:
    """``(reason, detail)`` of the first text-level problem of a normalised pair, else None; an
    SFT example (``rejected`` None) is checked for an empty prompt or completion only."""
    if is_blank(prompt):
        return "empty_prompt", "the prompt is empty or whitespace only"
    pair = [("the chosen", chosen), ("the rejected", rejected)]
    completions = [("the", chosen)] if rejected is None else pair
    for name, completion in completions:
        if is_blank(completion):
            return "empty_completion", f"{name} completion is empty or whitespace only"
    if chosen == rejected:
        return "identical_completions", "chosen and rejected completions are identical"
    return None


@dataclass
class DataSummary:
    """Counts of the rows read: accepted, rejected per reason, and both per source label.

    ``per_source[label]`` is ``{"total": n, "accepted": a, "rejected": r}``. Invariant:
    ``total == accepted + rejected == sum(per_reason.values()) + accepted``.
    """

    total: int = 0
    accepted: int = 0
    rejected: int = 0
    per_reason: dict[str, int] = field(default_factory=dict)
    per_source: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Iterable[PreferencePair | Rejection | Any]) -> DataSummary:
        """Summary of records that each carry ``source``: a Rejection counts as rejected,
        anything else (a PreferencePair, a tokenised pair) as accepted."""
        summary = cls()
        for record in records:
            if isinstance(record, Rejection):
                summary.add_rejection(record)
            else:
                summary.add_accepted(record.source)
        return summary

    def add_accepted(self, source: str, count: int = 1) -> None:
        """Count ``count`` accepted rows of ``source``."""
        self._count(source, "accepted", count)

    def add_rejection(self, rejection: Rejection) -> None:
        """Count one rejected row under its reason and source."""
        self._count(rejection.source, "rejected", 1)
        self.per_reason[rejection.reason] = self.per_reason.get(rejection.reason, 0) + 1

    def _count(self, source: str, outcome: str, count: int) -> None:
        counts = self.per_source.setdefault(source, {"total": 0, "accepted": 0, "rejected": 0})
        counts["total"] += count
        counts[outcome] += count
        self.total += count
        setattr(self, outcome, getattr(self, outcome) + count)

    def merge(self, other: DataSummary) -> DataSummary:
        """A new summary counting the rows of both."""
        merged = DataSummary.from_json(self.to_json())
        merged.total += other.total
        merged.accepted += other.accepted
        merged.rejected += other.rejected
        for reason, count in other.per_reason.items():
            merged.per_reason[reason] = merged.per_reason.get(reason, 0) + count
        for source, counts in other.per_source.items():
            mine = merged.per_source.setdefault(source, {"total": 0, "accepted": 0, "rejected": 0})
            for key, value in counts.items():
                mine[key] += value
        return merged

    @property
    def reject_fraction(self) -> float:
        """rejected / total (0 when nothing was read)."""
        return self.rejected / self.total if self.total else 0.0

    def top_reasons(self) -> list[tuple[str, int]]:
        """``(reason, count)`` from the most frequent, ties by name."""
        return sorted(self.per_reason.items(), key=lambda item: (-item[1], item[0]))

    def to_json(self) -> dict[str, Any]:
        """Plain dicts and ints (``data_summary.json``); :meth:`from_json` reads it back."""
        return {
            "total": self.total,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "reject_fraction": self.reject_fraction,
            "per_reason": dict(self.top_reasons()),
            "per_source": {name: dict(counts) for name, counts in sorted(self.per_source.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataSummary:
        """The summary :meth:`to_json` wrote."""
        return cls(
            total=int(data["total"]),
            accepted=int(data["accepted"]),
            rejected=int(data["rejected"]),
            per_reason={str(k): int(v) for k, v in data["per_reason"].items()},
            per_source={
                str(name): {str(k): int(v) for k, v in counts.items()}
                for name, counts in data["per_source"].items()
            },
        )

    def format_table(self) -> str:
        """The summary as aligned text lines for the terminal."""
        lines = [
            f"rows read   {self.total:>9,}",
            f"accepted    {self.accepted:>9,}",
            f"rejected    {self.rejected:>9,}  ({100 * self.reject_fraction:.1f}%)",
        ]
        lines += [
            f"  {reason:<24}{count:>9,}  {REJECT_REASONS.get(reason, '')}"
            for reason, count in self.top_reasons()
        ]
        if len(self.per_source) > 1:
            lines.append("per source (accepted / read):")
            lines += [
                f"  {counts['accepted']:>9,} / {counts['total']:<9,} {name}"
                for name, counts in sorted(self.per_source.items())
            ]
        return "\n".join(lines)

    def check(self, max_reject_fraction: float, rejects_path: str | Path | None = None) -> None:
        """Raise :class:`DataQualityError` when nothing was accepted, or when more than
        ``max_reject_fraction`` of the rows read were rejected."""
        where = f"; see {rejects_path}" if rejects_path is not None else ""
        top = ", ".join(f"{reason} {count:,}" for reason, count in self.top_reasons()[:TOP_REASONS])
        if self.total == 0:
            raise DataQualityError("no rows were read; check data.path and data.split")
        if self.accepted == 0:
            raise DataQualityError(
                f"none of the {self.total:,} rows read was accepted{where}; top reasons: {top}"
            )
        if self.reject_fraction > max_reject_fraction:
            raise DataQualityError(
                f"{self.rejected:,} of {self.total:,} rows ({100 * self.reject_fraction:.1f}%) "
                f"were rejected, above data.max_reject_fraction = {max_reject_fraction}{where}; "
                f"top reasons: {top}"
            )

"""The records every stage of raypo's data layer passes on, and the reasons a row is rejected.

A :class:`Source` names one readable unit (a file, or a shard of a ``datasets`` split); reading it
turns every row into exactly one :class:`PreferencePair` or one :class:`Rejection`, so that
accepted + rejected == rows read. Row numbers are 1-based line numbers for JSONL and 0-based row
indices for Parquet and ``datasets`` splits (what ``head -n`` and ``table[i]`` use respectively).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Message = dict[str, str]
"""One chat message: ``{"role": str, "content": str}`` and no other keys (a content of text parts
is joined to one string when the row is read)."""
Text = str | list[Message]
"""A prompt or completion: plain text, or a list of chat messages."""

RAW_CHARS = 500
"""Characters of the raw row kept in a :class:`Rejection` (and so in ``rejects.jsonl``)."""

REJECT_REASONS: dict[str, str] = {
    "undecodable_bytes": "the line is not valid UTF-8",
    "blank_line": "an empty or whitespace-only line in a JSONL file",
    "malformed_json": "the line is not valid JSON",
    "not_an_object": "the row is a JSON value other than an object (list, string, number)",
    "missing_field": "a configured field (chosen, rejected, prompt, completion, messages, id, "
    "group) is absent or null, or a row with one completion is read for preference training",
    "non_text_value": "a field holds a number, mapping or list where text is expected",
    "invalid_messages": "a message list is not [{'role': str, 'content': str or text parts}, "
    "...], a completion does not start with an assistant message or a messages row does not end "
    "with one",
    "empty_prompt": "the prompt is empty or whitespace only, chosen and rejected share no start "
    "to take as the prompt, or no prompt token is left before the completions",
    "empty_completion": "the chosen or rejected completion is empty or whitespace only",
    "identical_completions": "chosen and rejected are the same",
    "hh_unsplittable": "chosen and rejected HH dialogues share no prefix ending at "
    "'\\n\\nAssistant:'",
    "duplicate_id": "the id column repeats a value already read from this source",
    "prompt_too_long": "the prompt has more tokens than data.max_prompt_length allows under "
    "truncation_mode reject",
    "non_text_content": "a message content holds a part other than text (an image, audio)",
    "chat_template_mismatch": "the tokenised prompt shares no leading token with the tokenised "
    "prompt + completion (the chat template renders them differently from the start)",
    "chat_template_missing": "the pair holds chat messages but the tokenizer has no chat template "
    "and data.chat_template is unset",
    "chat_template_error": "the chat template raised an error rendering the messages",
}
"""Rejection reason code -> one-line description (``rejects.jsonl`` and the summary use codes)."""


@dataclass(frozen=True)
class Source:
    """One unit of input read by one task: a JSONL or Parquet file, or a shard of a split.

    ``kind``: ``jsonl`` (also ``.jsonl.gz``), ``parquet``, ``hf_disk`` (``save_to_disk``
    directory) or ``hf`` (``datasets.load_dataset`` spec, ``path`` its name or data files).
    Shard ``shard_index`` of ``num_shards`` holds rows ``[i n / k, (i + 1) n / k)`` of the ``n``
    rows (Parquet: row groups); row numbers stay those of the whole file or split, so ids do not
    depend on the sharding. ``split``: the split read (``hf``, ``hf_disk`` dataset dicts).
    ``name``: what :attr:`label` calls the source instead of its path (packaged data).
    ``subset``: the ``data.subsets`` entry it belongs to, the group of its pairs (a ``hf``
    source's ``data_dir``).
    """

    kind: Literal["jsonl", "parquet", "hf_disk", "hf"]
    path: str
    shard_index: int = 0
    num_shards: int = 1
    split: str | None = None
    name: str | None = None
    subset: str | None = None

    @property
    def label(self) -> str:
        """The data this source reads, as rejects, summaries and default ids name it:
        ``data/train.jsonl``, ``hf:Anthropic/hh-rlhf[train]``, ``builtin:hh_sample`` (``name``
        when set, so that ids and the held-out split do not depend on where the package is
        installed); a ``hf`` source's subset follows its path (``hf:Anthropic/hh-rlhf/
        helpful-base[train]``), so that the subsets' ids differ; independent of sharding."""
        if self.name is not None:
            name = self.name
        elif self.kind == "hf":
            name = f"hf:{self.path}" if self.subset is None else f"hf:{self.path}/{self.subset}"
        else:
            name = self.path
        return f"{name}[{self.split}]" if self.split is not None else name

    @property
    def description(self) -> str:
        """:attr:`label` plus the shard, for progress and error messages."""
        if self.num_shards == 1:
            return self.label
        return f"{self.label} shard {self.shard_index + 1}/{self.num_shards}"


@dataclass(frozen=True)
class PreferencePair:
    """A normalised, text-valid preference pair, or an SFT example (``rejected`` None).

    ``prompt``/``chosen``/``rejected`` are all strings or all message lists (completions then
    hold only the new messages; they start with an assistant message unless the prompt was
    extracted from them, with no prompt column, and they first differ in another role's message).
    ``rejected`` is None only in data read for ``raypo sft``: a row with one completion (its
    ``chosen``), or a pair whose rejected completion SFT does not train on.
    ``id``: the id column's value when ``data.id_field`` is set, else ``f"{source}:{row}"``
    (unique and stable across runs). ``source``: :attr:`Source.label`; ``row``: see the module
    docstring.
    """

    id: str
    prompt: Text
    chosen: Text
    rejected: Text | None
    group: str | None
    source: str
    row: int


@dataclass(frozen=True)
class Rejection:
    """A row that cannot be used: where it is, why (a key of :data:`REJECT_REASONS`), a detail
    naming the field and value, and the first :data:`RAW_CHARS` characters of the raw row."""

    source: str
    row: int
    reason: str
    detail: str
    raw: str

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")

    def to_json(self) -> dict[str, Any]:
        """One line of ``rejects.jsonl``: source, row, reason, description, detail, raw."""
        return {
            "source": self.source,
            "row": self.row,
            "reason": self.reason,
            "description": REJECT_REASONS[self.reason],
            "detail": self.detail,
            "raw": self.raw,
        }

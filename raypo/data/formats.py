"""One raw row -> a normalised :class:`PreferencePair`, or a :class:`Rejection` saying why not.

Three row shapes (``data.schema``), with the column names of ``data.*_field``:

- ``pairs``: prompt, chosen and rejected strings.
- ``hh``: chosen and rejected each a whole raw dialogue (``\\n\\nHuman: ...\\n\\nAssistant: ...``),
  no prompt column. The prompt is the longest common prefix of the two that ends with
  ``\\n\\nAssistant:`` (inclusive); the completions are the rest (their leading space kept). Real
  pairs sometimes diverge before the last Assistant turn; they split at an earlier turn.
- ``conversational``: message lists ``[{"role", "content"}, ...]``. A string prompt is a user
  message and a string completion an assistant message. Completions that repeat the prompt
  messages at their start (UltraFeedback binarized) have them removed; without a prompt column
  the prompt is the longest shared message prefix after which both continue with an assistant
  message. Messages keep only ``role`` and ``content``.

``auto`` decides per row, from the row alone, so that any shard of a file gives the same result:
a message list in any of the three fields -> conversational; else a prompt -> pairs; else hh.
"""

from __future__ import annotations

import json
from typing import Any

from raypo.config import DataConfig
from raypo.data.records import RAW_CHARS, Message, PreferencePair, Rejection
from raypo.data.validate import check_texts

HH_ASSISTANT = "\n\nAssistant:"
"""The marker that ends an HH prompt."""

_LISTED_FIELDS = 8
"""Field names listed in a missing-field message."""


class RowProblem(Exception):
    """A row to reject: ``reason`` (a key of REJECT_REASONS) and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def raw_text(row: object) -> str:
    """The first characters of a decoded row as JSON, for a rejection's ``raw``."""
    return json.dumps(row, ensure_ascii=False, default=str)[:RAW_CHARS]


def normalise_row(
    row: object, cfg: DataConfig, source: str, number: int, raw: str
) -> PreferencePair | Rejection:
    """``row`` (a decoded JSON value or Arrow row) as a pair of ``source``'s row ``number``, or
    the rejection of its first problem; ``raw`` is the row's text kept in a rejection."""
    try:
        return _pair(row, cfg, source, number)
    except RowProblem as problem:
        return Rejection(source, number, problem.reason, problem.detail, raw[:RAW_CHARS])


def _pair(row: object, cfg: DataConfig, source: str, number: int) -> PreferencePair:
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise RowProblem("not_an_object", f"the row is a JSON {kind}, expected an object")
    chosen = _required(row, cfg.chosen_field, "chosen")
    rejected = _required(row, cfg.rejected_field, "rejected")
    prompt = row.get(cfg.prompt_field)
    schema = cfg.schema if cfg.schema != "auto" else detect_schema(prompt, chosen, rejected)
    if schema == "hh":
        prompt, chosen, rejected = split_hh(
            _text(chosen, cfg.chosen_field), _text(rejected, cfg.rejected_field)
        )
    elif schema == "conversational":
        prompt, chosen, rejected = split_conversation(prompt, chosen, rejected, cfg)
    else:
        prompt = _text(_required(row, cfg.prompt_field, "prompt"), cfg.prompt_field)
        chosen = _text(chosen, cfg.chosen_field)
        rejected = _text(rejected, cfg.rejected_field)
    problem = check_texts(prompt, chosen, rejected)
    if problem is not None:
        raise RowProblem(*problem)
    return PreferencePair(
        id=_label(row, cfg.id_field, "id") if cfg.id_field else f"{source}:{number}",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        group=_label(row, cfg.group_field, "group") if cfg.group_field else None,
        source=source,
        row=number,
    )


def detect_schema(prompt: object, chosen: object, rejected: object) -> str:
    """``conversational``, ``pairs`` or ``hh`` for a row's three values (see module docstring)."""
    if any(isinstance(value, list) for value in (prompt, chosen, rejected)):
        return "conversational"
    return "hh" if prompt is None else "pairs"


def _required(row: dict[str, Any], name: str, role: str) -> Any:
    value = row.get(name)
    if value is not None:
        return value
    if name in row:
        raise RowProblem("missing_field", f"the {role} field {name!r} is null")
    fields = ", ".join(list(map(str, row))[:_LISTED_FIELDS]) or "none"
    hint = f"; set data.{role}_field to the right column"
    raise RowProblem("missing_field", f"no {role} field {name!r} (the row has: {fields}){hint}")


def _text(value: object, name: str) -> str:
    if isinstance(value, str):
        return value
    hint = "; use data.schema conversational for message lists" if isinstance(value, list) else ""
    raise RowProblem("non_text_value", f"{name!r} is a {type(value).__name__}, not text{hint}")


def _label(row: dict[str, Any], name: str, role: str) -> str:
    """An id or group value as text: strings and integers are accepted."""
    value = _required(row, name, role)
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise RowProblem("non_text_value", f"{role} field {name!r} is a {type(value).__name__}")


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` of a raw HH pair: the prompt is the longest common prefix
    ending with ``\\n\\nAssistant:``; raises :class:`RowProblem` ``hh_unsplittable`` if none."""
    end = chosen.rfind(HH_ASSISTANT)
    while end >= 0:
        cut = end + len(HH_ASSISTANT)
        # Prefixes are nested, so the first marker from the end that both share is the longest.
        if rejected.startswith(chosen[:cut]):
            return chosen[:cut], chosen[cut:], rejected[cut:]
        end = chosen.rfind(HH_ASSISTANT, 0, end)
    if HH_ASSISTANT not in chosen:
        detail = "chosen has no '\\n\\nAssistant:' turn"
    else:
        detail = "chosen and rejected diverge before their first '\\n\\nAssistant:' turn"
    hint = "; for prompt/chosen/rejected columns set data.prompt_field or data.schema pairs"
    raise RowProblem("hh_unsplittable", detail + hint)


def split_conversation(
    prompt: object, chosen: object, rejected: object, cfg: DataConfig
) -> tuple[list[Message], list[Message], list[Message]]:
    """Message lists ``(prompt, chosen, rejected)`` with the prompt messages removed from the
    completions (see module docstring)."""
    chosen_messages = messages(chosen, cfg.chosen_field, "assistant")
    rejected_messages = messages(rejected, cfg.rejected_field, "assistant")
    if prompt is None:
        size = _shared_prompt_size(chosen_messages, rejected_messages)
        if size == 0:
            detail = "chosen and rejected share no messages before an assistant reply"
            raise RowProblem(
                "empty_prompt", detail + "; set data.prompt_field to the prompt column"
            )
        prompt_messages = chosen_messages[:size]
    else:
        prompt_messages = messages(prompt, cfg.prompt_field, "user")
    completions = []
    for name, completion in (
        (cfg.chosen_field, chosen_messages),
        (cfg.rejected_field, rejected_messages),
    ):
        repeats_prompt = completion[: len(prompt_messages)] == prompt_messages
        rest = completion[len(prompt_messages) :] if repeats_prompt else completion
        if rest and rest[0]["role"] != "assistant":
            raise RowProblem(
                "invalid_messages",
                f"{name!r} continues the prompt with a {rest[0]['role']!r} message, "
                "expected 'assistant' (does the prompt match the start of the conversation?)",
            )
        completions.append(rest)
    return prompt_messages, completions[0], completions[1]


def _shared_prompt_size(chosen: list[Message], rejected: list[Message]) -> int:
    """Messages shared at the start after which both lists continue with an assistant message."""
    size = 0
    while size < min(len(chosen), len(rejected)) and chosen[size] == rejected[size]:
        size += 1
    while size > 0 and not all(
        size < len(side) and side[size]["role"] == "assistant" for side in (chosen, rejected)
    ):
        size -= 1
    return size


def messages(value: object, name: str, role: str) -> list[Message]:
    """``value`` as a message list with only role and content; a string is one ``role`` message.
    Raises :class:`RowProblem` ``invalid_messages`` naming the bad element."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise RowProblem("non_text_value", f"{name!r} is a {type(value).__name__}, not messages")
    result = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise RowProblem("invalid_messages", f"{name}[{index}] is a {kind}, not a message")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                kind = type(message.get(key)).__name__
                detail = f"{name}[{index}].{key} is {kind}, expected a string"
                raise RowProblem("invalid_messages", detail)
        if not message["role"].strip():
            raise RowProblem("invalid_messages", f"{name}[{index}].role is empty")
        result.append({"role": message["role"], "content": message["content"]})
    return result

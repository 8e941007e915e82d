"""One raw row -> a normalised :class:`PreferencePair`, or a :class:`Rejection` saying why not.

Four preference row shapes (``data.schema``), with the column names of ``data.*_field``:

- ``pairs``: prompt, chosen and rejected strings.
- ``hh``: chosen and rejected each a whole raw dialogue (``\\n\\nHuman: ...\\n\\nAssistant: ...``),
  no prompt column. The prompt is the longest common prefix of the two that ends with
  ``\\n\\nAssistant:`` (inclusive); the completions are the rest (their leading space kept). Real
  pairs sometimes diverge before the last Assistant turn; they split at an earlier turn.
- ``implicit``: chosen and rejected strings that both start with the prompt, no prompt column
  (TRL's implicit prompt). The rule of TRL's ``extract_prompt``: they split at the first character
  in which they differ, or one earlier when the character before it is a space (the completions
  then start with the space, as BPE pre-tokenisers keep a space with the word after it); when one
  is a prefix of the other, before their last shared character.
- ``conversational``: message lists ``[{"role", "content"}, ...]``. A string prompt is a user
  message and a string completion an assistant message. Completions that repeat the prompt
  messages at their start (UltraFeedback binarized) have them removed; without a prompt column
  the prompt is the messages before the first one in which chosen and rejected differ (before the
  last shared one when one list is a prefix of the other), as TRL's ``extract_prompt`` has it.
  Messages keep only ``role`` and ``content``; a content given as a list of parts
  (``[{"type": "text", "text": ...}, ...]``) becomes its text parts joined with nothing between
  them, which is what the chat templates that accept parts (Qwen2.5-VL, Qwen3.5, LFM2.5) render
  for them; any other part (an image) rejects the row (``non_text_content``).

Two shapes hold one completion and are read only for ``raypo sft`` (``sft=True``), as TRL's
``SFTTrainer`` reads them; preference training rejects them (``missing_field``):

- ``completion``: prompt and completion columns, both strings or (either one a message list)
  messages, TRL's prompt-completion format: the completion must start with an assistant message.
- ``messages``: one message list (TRL's conversational language-modelling format). The completion
  is its last message, which must be an assistant message, and the prompt every message before
  it: the loss covers the last assistant turn only, where TRL's ``assistant_only_loss`` covers
  every assistant turn (and TRL's default the whole conversation).

Read for SFT, a pair keeps its chosen completion only (``rejected`` None): SFT never trains on
the rejected one, which only serves to find the prompt of hh and implicit rows.

``auto`` decides per row, from the row alone, so that any shard of a file gives the same result:
no chosen and no rejected field -> messages when the row has the messages field, else completion
when it has the completion field; otherwise a message list in any of the three fields ->
conversational; else a prompt -> pairs; else hh when chosen and rejected both hold
``\\n\\nAssistant:``, else implicit.
"""

from __future__ import annotations

import json
from typing import Any

from raypo.config import DataConfig
from raypo.data.records import RAW_CHARS, Message, PreferencePair, Rejection, Text
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


SINGLE_COMPLETION_SCHEMAS = ("completion", "messages")
"""Row shapes with one completion, read only for ``raypo sft``."""


def normalise_row(
    row: object,
    cfg: DataConfig,
    source: str,
    number: int,
    raw: str,
    *,
    group: str | None = None,
    sft: bool = False,
) -> PreferencePair | Rejection:
    """``row`` (a decoded JSON value or Arrow row) as a pair of ``source``'s row ``number``, or
    the rejection of its first problem; ``raw`` is the row's text kept in a rejection. ``group``:
    the pair's group when ``data.group_field`` is null (its source's subset). ``sft``: read for
    ``raypo sft`` (rows with one completion accepted, pairs without their rejected completion;
    see the module docstring)."""
    try:
        return _pair(row, cfg, source, number, group, sft)
    except RowProblem as problem:
        return Rejection(source, number, problem.reason, problem.detail, raw[:RAW_CHARS])


def _pair(
    row: object, cfg: DataConfig, source: str, number: int, group: str | None, sft: bool
) -> PreferencePair:
    if not isinstance(row, dict):
        kind = type(row).__name__
        raise RowProblem("not_an_object", f"the row is a JSON {kind}, expected an object")
    schema = cfg.schema if cfg.schema != "auto" else detect_schema(row, cfg)
    if schema in SINGLE_COMPLETION_SCHEMAS:
        if not sft:
            raise RowProblem(
                "missing_field",
                f"a {schema} row holds one completion and no {cfg.chosen_field!r} and "
                f"{cfg.rejected_field!r} pair; fine-tune on it with raypo sft, or set "
                "data.chosen_field and data.rejected_field to the pair's columns",
            )
        prompt, chosen = single_completion(row, cfg, schema)
        rejected = None
    else:
        prompt, chosen, rejected = _preference_texts(row, cfg, schema)
        if sft:
            rejected = None
    problem = check_texts(prompt, chosen, rejected)
    if problem is not None:
        raise RowProblem(*problem)
    return PreferencePair(
        id=_label(row, cfg.id_field, "id") if cfg.id_field else f"{source}:{number}",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        group=_label(row, cfg.group_field, "group") if cfg.group_field else group,
        source=source,
        row=number,
    )


def _preference_texts(row: dict[str, Any], cfg: DataConfig, schema: str) -> tuple[Text, Text, Text]:
    """``(prompt, chosen, rejected)`` of a preference row of ``schema``."""
    chosen = _required(row, cfg.chosen_field, "chosen")
    rejected = _required(row, cfg.rejected_field, "rejected")
    if schema in ("hh", "implicit"):
        split = split_hh if schema == "hh" else split_implicit
        return split(_text(chosen, cfg.chosen_field), _text(rejected, cfg.rejected_field))
    if schema == "conversational":
        return split_conversation(row.get(cfg.prompt_field), chosen, rejected, cfg)
    prompt = _text(_required(row, cfg.prompt_field, "prompt"), cfg.prompt_field)
    return prompt, _text(chosen, cfg.chosen_field), _text(rejected, cfg.rejected_field)


def single_completion(row: dict[str, Any], cfg: DataConfig, schema: str) -> tuple[Text, Text]:
    """``(prompt, completion)`` of a ``completion`` or ``messages`` row (see the module
    docstring); raises :class:`RowProblem` naming the field at fault."""
    if schema == "messages":
        name = cfg.messages_field
        conversation = _required(row, name, "messages")
        if not isinstance(conversation, list):
            kind = type(conversation).__name__
            raise RowProblem("non_text_value", f"{name!r} is a {kind}, not a message list")
        listed = messages(conversation, name, "user")
        if not listed:
            raise RowProblem("invalid_messages", f"{name!r} is an empty list")
        if listed[-1]["role"] != "assistant":
            detail = f"{name!r} ends with a {listed[-1]['role']!r} message; the completion is the "
            raise RowProblem("invalid_messages", detail + "last message, an assistant message")
        if len(listed) == 1:
            detail = f"{name!r} holds only the assistant message, no prompt before it"
            raise RowProblem("empty_prompt", detail)
        return listed[:-1], listed[-1:]
    prompt = _required(row, cfg.prompt_field, "prompt")
    completion = _required(row, cfg.completion_field, "completion")
    if not (isinstance(prompt, list) or isinstance(completion, list)):
        return _text(prompt, cfg.prompt_field), _text(completion, cfg.completion_field)
    reply = messages(completion, cfg.completion_field, "assistant")
    if reply and reply[0]["role"] != "assistant":
        detail = f"{cfg.completion_field!r} starts with a {reply[0]['role']!r} message"
        raise RowProblem("invalid_messages", detail + ", expected 'assistant'")
    return messages(prompt, cfg.prompt_field, "user"), reply


def detect_schema(row: dict[str, Any], cfg: DataConfig) -> str:
    """The schema of a row (see the module docstring): ``messages``, ``completion``,
    ``conversational``, ``pairs``, ``hh`` or ``implicit``."""
    if row.get(cfg.chosen_field) is None and row.get(cfg.rejected_field) is None:
        has_messages = row.get(cfg.messages_field) is not None
        if has_messages or row.get(cfg.completion_field) is not None:
            return "messages" if has_messages else "completion"
    prompt, chosen, rejected = (
        row.get(name) for name in (cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    )
    if any(isinstance(value, list) for value in (prompt, chosen, rejected)):
        return "conversational"
    if prompt is not None:
        return "pairs"
    dialogues = all(
        isinstance(value, str) and HH_ASSISTANT in value for value in (chosen, rejected)
    )
    return "hh" if dialogues else "implicit"


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
    hint = (
        "; for a prompt column set data.prompt_field, for texts that start with the prompt but "
        "are no HH dialogues data.schema implicit"
    )
    raise RowProblem("hh_unsplittable", detail + hint)


def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen, rejected)`` of strings that hold the prompt, split by TRL's
    ``extract_prompt`` rule (see the module docstring); raises :class:`RowProblem`
    ``empty_prompt`` when they share no text to make a prompt of."""
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RowProblem("empty_completion", f"the {name} text is empty or whitespace only")
    size = min(len(chosen), len(rejected))
    cut = next((i for i in range(size) if chosen[i] != rejected[i]), None)
    if cut is None:
        # TRL's loop ends on the last shared index when nothing differs, keeping it out of the
        # prompt; identical completions are rejected later by check_texts.
        cut = size - 1
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    if cut <= 0 or not chosen[:cut].strip():
        detail = "chosen and rejected share no leading text to take as the prompt"
        raise RowProblem("empty_prompt", detail + "; set data.prompt_field to the prompt column")
    return chosen[:cut], chosen[cut:], rejected[cut:]


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
            detail = "chosen and rejected differ from their first message"
            raise RowProblem(
                "empty_prompt", detail + "; set data.prompt_field to the prompt column"
            )
        prompt_messages = chosen_messages[:size]
        return prompt_messages, chosen_messages[size:], rejected_messages[size:]
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
    """Messages of the implicit prompt, by TRL's ``extract_prompt``: those before the first one
    that differs; all but the last shared one when a list is a prefix of the other."""
    size = min(len(chosen), len(rejected))
    differs = next((i for i in range(size) if chosen[i] != rejected[i]), None)
    return max(size - 1, 0) if differs is None else differs


def messages(value: object, name: str, role: str) -> list[Message]:
    """``value`` as a message list with only role and content; a string is one ``role`` message,
    a content of parts becomes its text (see the module docstring). Raises :class:`RowProblem`
    ``invalid_messages`` or ``non_text_content`` naming the bad element."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise RowProblem("non_text_value", f"{name!r} is a {type(value).__name__}, not messages")
    result = []
    for index, message in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            kind = type(message).__name__
            raise RowProblem("invalid_messages", f"{where} is a {kind}, not a message")
        if not isinstance(message.get("role"), str):
            kind = type(message.get("role")).__name__
            raise RowProblem("invalid_messages", f"{where}.role is {kind}, expected a string")
        if not message["role"].strip():
            raise RowProblem("invalid_messages", f"{where}.role is empty")
        content = _content_text(message.get("content"), f"{where}.content")
        result.append({"role": message["role"], "content": content})
    return result


def _content_text(content: object, where: str) -> str:
    """A message content as text: a string as it is, a list of parts as its text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        kind = type(content).__name__
        detail = f"{where} is {kind}, expected a string or a list of text parts"
        raise RowProblem("invalid_messages", detail)
    texts = []
    for index, part in enumerate(content):
        if not isinstance(part, dict):
            kind = type(part).__name__
            raise RowProblem("invalid_messages", f"{where}[{index}] is a {kind}, not a part")
        kind = part.get("type", "text")
        if kind != "text":
            detail = f"{where}[{index}] is a {kind!r} part; raypo trains on text only"
            raise RowProblem("non_text_content", detail)
        if not isinstance(part.get("text"), str):
            kind = type(part.get("text")).__name__
            detail = f"{where}[{index}].text is {kind}, expected a string"
            raise RowProblem("invalid_messages", detail)
        texts.append(part["text"])
    return "".join(texts)

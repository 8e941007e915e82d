"""Tokenising preference pairs as TRL's ``DPOTrainer`` does: prompt and completions as id lists.

Each pair is tokenised as three texts, as TRL 1.16 (``DPOTrainer._prepare_dataset``) does: the
prompt alone, the prompt followed by the chosen completion, and the prompt followed by the
rejected one. The prompt's ids are those that the prompt shares with both joined sequences at
their start (the shorter of the two common prefixes); each completion is the rest of its joined
sequence. So the ids are those the model reads in the whole sequence, also where BPE merges
across the prompt/completion boundary: with byte-level BPE, ``"Answer: " + "Yes"`` is ``Answer``,
``:``, ``ĠYes``, not ``Answer``, ``:``, ``Ġ``, ``Yes``, and the prompt's last token ``Ġ`` moves
into the completions. When a prompt loses tokens so, a warning says so once per process with the
number of such pairs in that batch (TRL warns once). An SFT example (``rejected`` None,
:mod:`raypo.data.formats`) is two texts, the prompt alone and followed by its completion, and
gets empty ``rejected_ids``.

- Strings are tokenised as ``tokenizer(text)`` with the tokenizer's own special tokens (Llama
  adds BOS, Pythia and the tiny tokenizer nothing). With ``data.append_eos`` each completion is
  followed by the EOS token's text unless it ends with it already, so EOS ends the completion
  once (TRL's rule, and TRL always appends it).
- Message lists are rendered with ``data.chat_template`` or else the tokenizer's chat template,
  the prompt with ``add_generation_prompt=True``, and tokenised without added special tokens
  (what ``apply_chat_template(tokenize=True)`` does), so a template that writes BOS gives one
  BOS. A template that renders the prompt alone differently from the start of the whole
  conversation (Gemma 4's empty thought block) gets the common prefix as the prompt, as in TRL;
  only a pair whose renderings share no token is rejected (``chat_template_mismatch``). The
  template ends the assistant turn its own way, so with ``data.append_eos`` EOS is appended only
  when the completion holds no EOS at all (Qwen's ``<|im_end|>\\n`` stays as it is; TRL appends
  nothing to chat pairs).

Beyond TRL: BOS is never doubled (a text prompt that starts with the BOS text on a tokenizer that
adds BOS: TRL keeps both) nor is EOS (a tokenizer that appends EOS itself); pairs it cannot use
are rejections with a reason, not errors.

Truncation: a prompt over ``data.max_prompt_length`` keeps its last tokens (``keep_end``; a
leading BOS is kept as well), its first tokens (``keep_start``) or rejects the pair (``reject``:
``prompt_too_long``). Each completion then keeps its first
``min(data.max_completion_length, data.max_length - prompt tokens)`` tokens, so a cut completion
loses its EOS. Nothing else is dropped; chosen and rejected may share their kept tokens when they
differ only past the cut.

:func:`tokenize_pairs` encodes all texts of a batch of pairs in one tokenizer call per kind
(strings, chat renderings), as the Rust tokenizer spreads a batch over its threads;
:func:`tokenize_pair` is the one-pair form. Encoding the prompt three times costs time: on the
1,800 HH pairs of ``tests/data`` with the tiny tokenizer (batches of 256, a busy 2-core machine)
about 1,000 pairs/s against 1,600 when the three texts were encoded apart, which gave the same
ids on those pairs (each prompt ends with ``Assistant:``, each completion starts with a space: a
token boundary).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from raypo.config import DataConfig
from raypo.data.records import RAW_CHARS, Message, PreferencePair, Rejection

TOKENIZED_COLUMNS = (
    "id",
    "group",
    "source",
    "row",
    "prompt_ids",
    "chosen_ids",
    "rejected_ids",
    "prompt_truncated",
    "chosen_truncated",
    "rejected_truncated",
    "prompt_length",
    "chosen_length",
    "rejected_length",
)
"""Columns of :meth:`TokenizedPair.to_row`, in order (the prepared Parquet schema)."""


@dataclass(frozen=True)
class TokenizedPair:
    """One accepted pair as token ids; the completions exclude the prompt."""

    id: str
    group: str | None
    source: str
    row: int
    prompt_ids: list[int]
    """The prompt after truncation, BOS included when there is one."""
    chosen_ids: list[int]
    """The preferred completion after truncation, EOS included when it survived."""
    rejected_ids: list[int]
    """The dispreferred completion after truncation, EOS included when it survived; empty for an
    SFT example."""
    prompt_truncated: bool
    chosen_truncated: bool
    rejected_truncated: bool

    def to_row(self) -> dict[str, Any]:
        """Arrow-friendly columns :data:`TOKENIZED_COLUMNS`: the fields plus token lengths."""
        row = asdict(self)
        row["prompt_length"] = len(self.prompt_ids)
        row["chosen_length"] = len(self.chosen_ids)
        row["rejected_length"] = len(self.rejected_ids)
        return {name: row[name] for name in TOKENIZED_COLUMNS}


@dataclass(frozen=True)
class _Specials:
    """The tokenizer's special tokens as tokenisation uses them."""

    bos_id: int | None
    """The tokenizer's BOS id (kept in front of a ``keep_end`` prompt, never doubled)."""
    eos_id: int | None
    """The tokenizer's EOS id (never doubled)."""
    eos_text: str | None
    """The EOS text that ends text completions; None = ``data.append_eos`` is off."""
    special_ids: frozenset[int]


@dataclass(frozen=True)
class _Texts:
    """A pair rendered to the texts that are tokenised: the prompt alone, then the prompt followed
    by each completion (chosen, and rejected unless it is an SFT example)."""

    texts: tuple[str, ...]
    chat: bool


@dataclass(frozen=True)
class _Split:
    """A pair's ids split at the prompt (before truncation)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int] | None
    """None for an SFT example."""
    prompt_cut: list[int]
    """The prompt's last tokens that the completions tokenise differently (usually none)."""


_REPORTED: set[str] = set()
"""Tokenizers whose moved prompt ends this process has reported (a warning once, as TRL)."""

logger = logging.getLogger(__name__)


def tokenize_pair(
    pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> TokenizedPair | Rejection:
    """Tokenise and truncate one pair (see the module docstring), or say why it cannot be."""
    return tokenize_pairs([pair], tokenizer, cfg)[0]


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> list[TokenizedPair | Rejection]:
    """Tokenise and truncate ``pairs``; one result per pair, in order.

    Rejection reasons: ``chat_template_missing``, ``chat_template_error``,
    ``chat_template_mismatch`` (message pairs), ``prompt_too_long`` (``truncation_mode:
    reject``), ``empty_prompt`` (no prompt token left before the completions), ``empty_completion``
    (no token but special tokens).

    Raises:
        ValueError: ``data.append_eos`` is set but the tokenizer has no EOS token.
    """
    specials = _specials(tokenizer, cfg)
    rendered = [_render(pair, tokenizer, cfg.chat_template, specials) for pair in pairs]
    results: list[TokenizedPair | Rejection] = []
    moved: list[_Split] = []
    for pair, item, ids in zip(pairs, rendered, _encode_all(tokenizer, rendered), strict=True):
        split = item if isinstance(item, Rejection) else _split(pair, item.chat, ids, specials)
        if isinstance(split, Rejection):
            results.append(split)
            continue
        if split.prompt_cut:
            moved.append(split)
        results.append(_assemble(pair, item.chat, split, specials, cfg))
    if moved:
        _report_moved(tokenizer, moved, len(pairs))
    return results


def _specials(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> _Specials:
    eos_id = tokenizer.eos_token_id
    if cfg.append_eos and eos_id is None:
        raise ValueError(
            f"data.append_eos is true but tokenizer {tokenizer.name_or_path!r} has no eos_token; "
            "set data.append_eos: false or use a tokenizer with an EOS token"
        )
    return _Specials(
        bos_id=tokenizer.bos_token_id,
        eos_id=eos_id,
        eos_text=tokenizer.eos_token if cfg.append_eos else None,
        special_ids=frozenset(tokenizer.all_special_ids),
    )


def _encode_all(
    tokenizer: PreTrainedTokenizerBase, rendered: list[_Texts | Rejection]
) -> list[tuple[list[int], ...]]:
    """The ids of each rendered pair's texts (``()`` for a rejection): strings with the
    tokenizer's special tokens, as ``tokenizer(text)``; chat renderings without, as
    ``apply_chat_template(tokenize=True)``; one batched call per kind."""
    texts: dict[bool, list[str]] = {False: [], True: []}
    for item in rendered:
        if isinstance(item, _Texts):
            texts[item.chat] += item.texts
    encoded = {chat: iter(_encode(tokenizer, texts[chat], not chat)) for chat in (False, True)}
    return [
        () if isinstance(item, Rejection) else tuple(next(encoded[item.chat]) for _ in item.texts)
        for item in rendered
    ]


def _encode(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of each text in one call (fast tokenizers batch it)."""
    if not texts:
        return []
    encoded = tokenizer(
        texts,
        add_special_tokens=add_special_tokens,
        return_attention_mask=False,
        verbose=False,
    )
    return encoded["input_ids"]


def _render(
    pair: PreferencePair,
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    specials: _Specials,
) -> _Texts | Rejection:
    """The pair's texts: joined as they are for strings, through the chat template (``template``
    or the tokenizer's) for messages."""
    completions = [pair.chosen] if pair.rejected is None else [pair.chosen, pair.rejected]
    if isinstance(pair.prompt, str):
        eos = specials.eos_text
        ends = [text if eos is None or text.endswith(eos) else text + eos for text in completions]
        return _Texts((pair.prompt, *(pair.prompt + text for text in ends)), chat=False)
    if template is None and tokenizer.chat_template is None:
        return _reject(
            pair,
            "chat_template_missing",
            f"the pair holds chat messages but tokenizer {tokenizer.name_or_path!r} has no chat "
            "template; set data.chat_template, use a tokenizer with one "
            "(model.tokenizer_name_or_path) or text pairs",
        )
    prompt = list(pair.prompt)
    try:
        texts = [
            _apply_template(tokenizer, template, prompt, generation_prompt=True),
            *(_apply_template(tokenizer, template, prompt + list(c)) for c in completions),
        ]
    except TemplateError as error:
        return _reject(pair, "chat_template_error", f"the chat template failed: {error}")
    return _Texts(tuple(texts), chat=True)


def _apply_template(
    tokenizer: PreTrainedTokenizerBase,
    template: str | None,
    messages: list[Message],
    generation_prompt: bool = False,
) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _split(
    pair: PreferencePair, chat: bool, ids: tuple[list[int], ...], specials: _Specials
) -> _Split | Rejection:
    """The prompt as the ids the sequences share at their start, completions the rest."""
    prompt, *joined = (_single_specials(seq, specials) for seq in ids)
    size = min(_common_prefix(prompt, sequence) for sequence in joined)
    if size == 0:
        reason = "chat_template_mismatch" if chat and prompt else "empty_prompt"
        names = ("prompt + chosen", "prompt + rejected")
        shown = " or ".join(f"{name} {seq[:8]}" for name, seq in zip(names, joined, strict=False))
        detail = f"the tokenised prompt {prompt[:8]} shares no first token with {shown}"
        return _reject(pair, reason, detail)
    rejected = joined[1][size:] if len(joined) > 1 else None
    return _Split(prompt[:size], joined[0][size:], rejected, prompt[size:])


def _single_specials(ids: list[int], specials: _Specials) -> list[int]:
    """``ids`` without a second leading BOS or a second trailing EOS (see module docstring)."""
    if specials.bos_id is not None and ids[:2] == [specials.bos_id] * 2:
        ids = ids[1:]
    if specials.eos_id is not None and ids[-2:] == [specials.eos_id] * 2:
        ids = ids[:-1]
    return ids


def _common_prefix(ids: list[int], other: list[int]) -> int:
    """Number of leading tokens the two lists share (TRL's ``common_prefix_length``)."""
    size = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        size += 1
    return size


def _report_moved(tokenizer: PreTrainedTokenizerBase, moved: list[_Split], total: int) -> None:
    """Warn, once per tokenizer and process, that prompt ends moved into the completions."""
    if tokenizer.name_or_path in _REPORTED:
        return
    _REPORTED.add(tokenizer.name_or_path)
    logger.warning(
        "%d of %d pairs in this batch: the tokenised prompt is not a prefix of the tokenised "
        "prompt + completion, because tokens merge across the boundary or the chat template "
        "renders the prompt alone differently. As in TRL, the completions start where the two "
        "diverge and the prompt's end (here %r) is left out of the prompt. Shown once per "
        "process; later batches are likely alike. To avoid it, end prompts on a token boundary "
        "(no trailing space) or use a template that renders the prompt alike in both cases.",
        len(moved),
        total,
        tokenizer.decode(moved[0].prompt_cut),
    )


def _assemble(
    pair: PreferencePair, chat: bool, split: _Split, specials: _Specials, cfg: DataConfig
) -> TokenizedPair | Rejection:
    """Check, end with EOS and truncate the split ids of one pair."""
    completions = [("chosen", split.chosen)]
    if split.rejected is not None:
        completions.append(("rejected", split.rejected))
    for name, ids in completions:
        if all(token in specials.special_ids for token in ids):
            return _reject(
                pair, "empty_completion", f"{name} has no tokens besides special tokens: {ids}"
            )
    prompt_ids = split.prompt
    if len(prompt_ids) > cfg.max_prompt_length and cfg.truncation_mode == "reject":
        return _reject(
            pair,
            "prompt_too_long",
            f"the prompt has {len(prompt_ids)} tokens, above data.max_prompt_length = "
            f"{cfg.max_prompt_length} (data.truncation_mode: reject)",
        )
    prompt = _truncate_prompt(prompt_ids, cfg, specials.bos_id)
    budget = cfg.max_length - len(prompt)
    if cfg.max_completion_length is not None:
        budget = min(budget, cfg.max_completion_length)
    eos_id = specials.eos_id if cfg.append_eos else None
    chosen = _with_eos(split.chosen, eos_id, chat)
    rejected = [] if split.rejected is None else _with_eos(split.rejected, eos_id, chat)
    return TokenizedPair(
        id=pair.id,
        group=pair.group,
        source=pair.source,
        row=pair.row,
        prompt_ids=prompt,
        chosen_ids=chosen[:budget],
        rejected_ids=rejected[:budget],
        prompt_truncated=len(prompt) < len(prompt_ids),
        chosen_truncated=len(chosen) > budget,
        rejected_truncated=len(rejected) > budget,
    )


def _truncate_prompt(ids: list[int], cfg: DataConfig, bos_id: int | None) -> list[int]:
    """At most ``max_prompt_length`` tokens: the head, or the tail behind a kept leading BOS."""
    limit = cfg.max_prompt_length
    if len(ids) <= limit:
        return ids
    if cfg.truncation_mode == "keep_start":
        return ids[:limit]
    # A model trained with BOS has never seen a sequence without it; keep it in front of the tail.
    head = ids[:1] if bos_id is not None and ids[0] == bos_id else []
    return head + ids[len(ids) - (limit - len(head)) :]


def _with_eos(ids: list[int], eos_id: int | None, chat: bool) -> list[int]:
    """``ids`` ending with EOS (``eos_id`` None: unchanged); see the module docstring."""
    if eos_id is None:
        return ids
    has_eos = eos_id in ids if chat else ids[-1:] == [eos_id]
    return ids if has_eos else [*ids, eos_id]


def _reject(pair: PreferencePair, reason: str, detail: str) -> Rejection:
    raw = json.dumps(
        {"id": pair.id, "prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected},
        ensure_ascii=False,
    )
    return Rejection(
        source=pair.source, row=pair.row, reason=reason, detail=detail, raw=raw[:RAW_CHARS]
    )

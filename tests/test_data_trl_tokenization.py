"""raypo's token ids equal TRL's for the same preference pairs, and data.chat_template.

TRL's side is TRL 1.16's own dataset preparation, ``DPOTrainer._prepare_dataset`` (prompt
extraction, EOS, tokenisation, the common-prefix split), called on a ``datasets.Dataset`` with a
stand-in for the trainer: the method reads only ``self._tokenizer`` and three arguments, so no model
or accelerator is needed. raypo's side is what ``raypo prepare`` runs per row:
:func:`raypo.data.formats.normalise_row` then :func:`raypo.data.tokenize.tokenize_pairs`.
"""

from __future__ import annotations

import copy
import json
import logging
import types
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from raypo import models
from raypo.config import ConfigError, DataConfig
from raypo.data import tokenize
from raypo.data.formats import normalise_row
from raypo.data.records import PreferencePair, Rejection
from raypo.data.tokenize import TokenizedPair, tokenize_pairs

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

WIDE = DataConfig(max_length=4096, max_prompt_length=4000)
"""No truncation: TRL's preparation truncates nothing (``max_length=None``)."""
Ids = tuple[list[int], list[int], list[int]]

PARTS_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<' + message['role'] + '>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<assistant>' -}}{%- endif -%}"
)
"""Renders list-of-parts content by joining the text parts (as Qwen2.5-VL's template does) and
writes BOS itself."""


def trl_ids(rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase) -> list[Ids]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids`` of TRL's prepared dataset."""
    trainer = types.SimpleNamespace(_tokenizer=tokenizer)
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_end")
    dataset = datasets.Dataset.from_list(rows)
    prepared = trl.DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "train")
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared]


def raypo_ids(
    rows: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig = WIDE
) -> list[Ids]:
    pairs = [normalise_row(row, cfg, "test", n, json.dumps(row)) for n, row in enumerate(rows)]
    assert all(isinstance(pair, PreferencePair) for pair in pairs), pairs
    results = tokenize_pairs(pairs, tokenizer, cfg)
    assert all(isinstance(result, TokenizedPair) for result in results), results
    return [(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in results]


def separate_ids(rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> list[Ids]:
    """The ids of tokenising prompt, chosen + EOS and rejected + EOS each on their own."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = [tokenizer.eos_token_id]
    return [
        (encode(r["prompt"]), encode(r["chosen"]) + eos, encode(r["rejected"]) + eos) for r in rows
    ]


MERGING = [
    # The prompt's trailing space merges with the completion's first word (" Yes", " it").
    {"prompt": "Question: is it safe? Answer: ", "chosen": "Yes", "rejected": "it is not"},
    {"prompt": "\n\nHuman: Hi\n\nAssistant: ", "chosen": "Hello there!", "rejected": "Go away."},
    # A word cut between prompt and completion.
    {"prompt": "\n\nHuman: Say hello\n\nAssistant: Hel", "chosen": "lo!", "rejected": "p!"},
    # No merge: the prompt ends on a token boundary.
    {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello.", "rejected": " No."},
]


def test_text_pairs_equal_trl_where_tokens_merge_across_the_boundary(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    expected = trl_ids(MERGING, tokenizer)
    assert raypo_ids(MERGING, tokenizer) == expected
    # Tokenising the three texts apart gives other ids in the merging rows: this test would
    # catch a return to it.
    separate = separate_ids(MERGING, tokenizer)
    assert [s != e for s, e in zip(separate, expected, strict=True)] == [True, True, True, False]


def test_hh_sample_equals_trl(tokenizer: PreTrainedTokenizerBase) -> None:
    """The packaged HH pairs, split by raypo's hh rule, given to TRL as explicit prompts."""
    lines = models.builtin_data_path("hh_sample").read_text(encoding="utf-8").splitlines()
    pairs = [
        normalise_row(json.loads(line), WIDE, "hh", n, line) for n, line in enumerate(lines[:120])
    ]
    rows = [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        for p in pairs
        if isinstance(p, PreferencePair)
    ]
    assert len(rows) > 100
    assert raypo_ids(rows, tokenizer) == trl_ids(rows, tokenizer)


def test_implicit_prompts_equal_trl(tokenizer: PreTrainedTokenizerBase) -> None:
    rows = [
        {"chosen": "Q: what is 2+2? A: 4", "rejected": "Q: what is 2+2? A: 5"},
        # Differ right after a space: the split backs up over it.
        {"chosen": "Translate chat: Katze", "rejected": "Translate chat: Hund"},
        # One a prefix of the other: the prompt stops before the last shared character.
        {"chosen": "The answer is no", "rejected": "The answer is no, sorry"},
    ]
    assert raypo_ids(rows, tokenizer) == trl_ids(rows, tokenizer)
    prompts = [normalise_row(row, WIDE, "t", 0, "").prompt for row in rows]
    extracted = [trl.extract_prompt(row)["prompt"] for row in rows]
    assert prompts == extracted == ["Q: what is 2+2? A:", "Translate chat:", "The answer is n"]


MESSAGES = [
    {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?"},
        ],
        "chosen": [{"role": "assistant", "content": "Well, thanks."}],
        "rejected": [{"role": "assistant", "content": "Leave."}],
    },
    {
        "prompt": [{"role": "user", "content": "Name a colour"}],
        "chosen": [{"role": "assistant", "content": " red"}],
        "rejected": [{"role": "assistant", "content": "Blue"}],
    },
]


@pytest.mark.parametrize("bos", [False, True], ids=["template_bos", "template_and_tokenizer_bos"])
def test_chat_pairs_equal_trl(
    tokenizer: PreTrainedTokenizerBase, with_bos: PreTrainedTokenizerBase, bos: bool
) -> None:
    """The tiny template writes BOS; with ``with_bos`` the tokenizer would add one as well, but
    chat renderings are tokenised without added special tokens: one BOS either way."""
    chosen = with_bos if bos else tokenizer
    ids = raypo_ids(MESSAGES, chosen)
    assert ids == trl_ids(MESSAGES, chosen)
    assert all(prompt[:2] == [tokenizer.bos_token_id, 201] for prompt, _, _ in ids)


def test_implicit_conversations_equal_trl(tokenizer: PreTrainedTokenizerBase) -> None:
    user = {"role": "user", "content": "Hi"}
    good = {"role": "assistant", "content": "Hello"}
    rows = [
        {"chosen": [user, good], "rejected": [user, {"role": "assistant", "content": "Go"}]},
        # They differ first in a user message: the prompt holds the shared answer, the template's
        # generation prompt is left out by the common-prefix split.
        {
            "chosen": [user, good, {"role": "user", "content": "Bye"}, good],
            "rejected": [user, good, {"role": "user", "content": "Why"}, good],
        },
    ]
    assert raypo_ids(rows, tokenizer) == trl_ids(rows, tokenizer)


def test_text_with_bos_equals_trl_and_never_doubles_it(
    with_bos: PreTrainedTokenizerBase,
) -> None:
    bos = with_bos.bos_token_id
    assert raypo_ids(MERGING, with_bos) == trl_ids(MERGING, with_bos)
    assert all(prompt[0] == bos != prompt[1] for prompt, _, _ in raypo_ids(MERGING, with_bos))
    # A prompt that writes the BOS text itself: TRL keeps both BOS, raypo one.
    row = {**MERGING[3], "prompt": with_bos.bos_token + MERGING[3]["prompt"]}
    ((trl_prompt, *trl_completions),) = trl_ids([row], with_bos)
    ((prompt, *completions),) = raypo_ids([row], with_bos)
    assert trl_prompt[:2] == [bos, bos] and prompt == trl_prompt[1:]
    assert completions == trl_completions


def test_list_of_parts_and_data_chat_template_equal_trl(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Text parts joined; ``data.chat_template`` (a file) for a tokenizer without a template
    renders what TRL renders with the same template set on the tokenizer."""

    def parts(role: str, *texts: str) -> dict[str, Any]:
        return {"role": role, "content": [{"type": "text", "text": text} for text in texts]}

    rows = [
        {
            "prompt": [parts("user", "What is ", "2+2?")],
            "chosen": [parts("assistant", "It is", " 4.")],
            "rejected": [parts("assistant", "5")],
        }
    ]
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    path = tmp_path / "template.jinja"
    path.write_text(PARTS_TEMPLATE, encoding="utf-8")
    cfg = DataConfig(max_length=4096, max_prompt_length=4000, chat_template=str(path))
    assert cfg.chat_template == PARTS_TEMPLATE
    reference = copy.deepcopy(tokenizer)
    reference.chat_template = PARTS_TEMPLATE
    ids = raypo_ids(rows, bare, cfg)
    assert ids == trl_ids(rows, reference)
    assert tokenizer.decode(ids[0][0]) == f"{models.BOS_TOKEN}<user>What is 2+2?<assistant>"
    # Without data.chat_template the bare tokenizer cannot render messages.
    pair = normalise_row(rows[0], WIDE, "test", 1, "")
    (missing,) = tokenize_pairs([pair], bare, WIDE)
    assert isinstance(missing, Rejection) and missing.reason == "chat_template_missing"
    assert "data.chat_template" in missing.detail


def test_template_rendering_the_prompt_differently_is_split_as_trl(
    tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    """A generation prompt the whole conversation does not repeat (Gemma 4's empty thought
    block): trained on the common prefix, as TRL does, and reported once."""
    thinking = copy.deepcopy(tokenizer)
    thinking.chat_template = models.CHAT_TEMPLATE.replace(
        "'\\n\\nAssistant:' -}}{%- endif -%}", "'\\n\\nAssistant: <think></think>' -}}{%- endif -%}"
    )
    assert thinking.chat_template != models.CHAT_TEMPLATE
    tokenize._REPORTED.discard(thinking.name_or_path)
    with caplog.at_level(logging.WARNING, logger=tokenize.__name__):
        ids = raypo_ids(MESSAGES, thinking)
    assert ids == trl_ids(MESSAGES, thinking)
    assert "<think>" not in thinking.decode(ids[0][0])
    (record,) = [r for r in caplog.records if r.name == tokenize.__name__]
    assert record.getMessage().startswith("2 of 2 pairs in this batch")
    assert "<think></think>" in record.getMessage()


def test_chat_template_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.chat_template .*not a valid Jinja template"):
        DataConfig(chat_template="{% for m in messages %}{{ m }}")
    with pytest.raises(ConfigError, match="neither an existing file nor a Jinja template"):
        DataConfig(chat_template=str(tmp_path / "missing.jinja"))
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ConfigError, match="data.chat_template .*cannot read"):
        DataConfig(chat_template=str(binary))
    # Loop controls and the {% generation %} block of training templates compile, as in
    # transformers.
    training = (
        "{% for m in messages %}{% if m.role == 'x' %}{% break %}{% endif %}"
        "{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    assert DataConfig(chat_template=training).chat_template == training
    # A template's text longer than a file name may be, and a NUL in it, are still templates.
    long = models.CHAT_TEMPLATE.replace("System: ", "System: " + "x" * 300)
    assert DataConfig(chat_template=long).chat_template == long
    assert DataConfig(chat_template="{{ bos_token }}\0").chat_template == "{{ bos_token }}\0"
    assert DataConfig().chat_template is None

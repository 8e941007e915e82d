"""Tests of raypo.data.tokenize and raypo.data.collate on the tiny tokenizer and model.

Expected ids come from encoding the same texts directly with the tokenizer (no special tokens
added), so each test pins what tokenisation adds or cuts: BOS, EOS, truncation, the chat template.
The texts here meet on token boundaries, where encoding prompt and completions apart gives the
ids of raypo's joint encoding; tests/test_data_trl_tokenization.py has the pairs where it does not.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from raypo import models
from raypo.config import DataConfig
from raypo.data.collate import collate_pairs
from raypo.data.records import RAW_CHARS, REJECT_REASONS, PreferencePair, Rejection
from raypo.data.tokenize import TOKENIZED_COLUMNS, TokenizedPair, tokenize_pair, tokenize_pairs
from raypo.dispersion import sequence_logps_and_entropy

EOS = models.EOS_TOKEN
LONG_PROMPT = "\n\nHuman: " + " ".join(f"question {i}" for i in range(40)) + "\n\nAssistant:"
LONG_COMPLETION = " " + " ".join(f"answer {i}" for i in range(40))


@pytest.fixture(scope="module")
def model(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    return models.build_tiny_model(models.TinyModelSpec(), tokenizer)


def _pair(prompt, chosen, rejected, row: int = 1) -> PreferencePair:
    return PreferencePair(
        id=f"test:{row}",
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        group="g",
        source="test",
        row=row,
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenized(result: TokenizedPair | Rejection) -> TokenizedPair:
    assert isinstance(result, TokenizedPair), result
    return result


def _rejection(result: TokenizedPair | Rejection, reason: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason == reason and reason in REJECT_REASONS
    assert (result.source, result.row) == ("test", 1)
    return result


def _hh_pairs(count: int) -> list[PreferencePair]:
    """The first ``count`` packaged HH rows, split at their last shared Assistant turn."""
    marker = "\n\nAssistant:"
    pairs = []
    lines = models.builtin_data_path("hh_sample").read_text(encoding="utf-8").splitlines()
    for row, line in enumerate(lines[:count], start=1):
        chosen, rejected = json.loads(line)["chosen"], json.loads(line)["rejected"]
        shared = next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b)
        end = chosen.rfind(marker, 0, shared) + len(marker)
        pairs.append(_pair(chosen[:end], chosen[end:], rejected[end:], row=row))
    return pairs


def test_text_pair_is_separate_encodings_with_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt, chosen, rejected = "\n\nHuman: Hi\n\nAssistant:", " Hello there!", " Go away."
    result = _tokenized(tokenize_pair(_pair(prompt, chosen, rejected), tokenizer, DataConfig()))
    eos = tokenizer.eos_token_id
    # The tiny tokenizer adds no BOS to plain text, so text prompts get none either.
    assert result.prompt_ids == _encode(tokenizer, prompt)
    assert result.chosen_ids == [*_encode(tokenizer, chosen), eos]
    assert result.rejected_ids == [*_encode(tokenizer, rejected), eos]
    assert not (result.prompt_truncated or result.chosen_truncated or result.rejected_truncated)
    row = result.to_row()
    assert tuple(row) == TOKENIZED_COLUMNS
    assert (row["id"], row["group"], row["source"], row["row"]) == ("test:1", "g", "test", 1)
    assert row["prompt_length"] == len(_encode(tokenizer, prompt))
    assert row["chosen_length"] == len(_encode(tokenizer, chosen)) + 1
    assert row["rejected_length"] == len(_encode(tokenizer, rejected)) + 1


def test_eos_is_not_doubled_and_can_be_switched_off(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.eos_token_id
    pair = _pair("\n\nHuman: Hi\n\nAssistant:", " Hello." + EOS, " No.")
    result = _tokenized(tokenize_pair(pair, tokenizer, DataConfig()))
    assert result.chosen_ids == [*_encode(tokenizer, " Hello."), eos]
    assert result.rejected_ids == [*_encode(tokenizer, " No."), eos]
    plain = _tokenized(tokenize_pair(pair, tokenizer, DataConfig(append_eos=False)))
    assert plain.chosen_ids == [*_encode(tokenizer, " Hello."), eos]
    assert plain.rejected_ids == _encode(tokenizer, " No.")


def test_bos_is_prepended_when_the_tokenizer_adds_one(
    tokenizer: PreTrainedTokenizerBase, with_bos: PreTrainedTokenizerBase
) -> None:
    bos = with_bos.bos_token_id
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    result = _tokenized(tokenize_pair(_pair(prompt, " a", " b"), with_bos, DataConfig()))
    assert result.prompt_ids == [bos, *_encode(tokenizer, prompt)]
    assert result.chosen_ids[0] != bos
    cfg = DataConfig(max_length=16, max_prompt_length=6)
    cut = _tokenized(tokenize_pair(_pair(LONG_PROMPT, " a", " b"), with_bos, cfg))
    assert cut.prompt_ids == [bos, *_encode(tokenizer, LONG_PROMPT)[-5:]]


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_long_prompt_keeps_its_end_or_start(tokenizer: PreTrainedTokenizerBase, mode: str) -> None:
    cfg = DataConfig(max_length=32, max_prompt_length=8, truncation_mode=mode)
    result = _tokenized(tokenize_pair(_pair(LONG_PROMPT, " Yes.", " No."), tokenizer, cfg))
    full = _encode(tokenizer, LONG_PROMPT)
    assert len(full) > 8
    assert result.prompt_ids == (full[-8:] if mode == "keep_end" else full[:8])
    assert result.prompt_truncated and not result.chosen_truncated
    assert result.chosen_ids == [*_encode(tokenizer, " Yes."), tokenizer.eos_token_id]


def test_reject_mode_rejects_long_prompts_only(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(max_length=32, max_prompt_length=12, truncation_mode="reject")
    rejection = _rejection(
        tokenize_pair(_pair(LONG_PROMPT, " Yes.", " No."), tokenizer, cfg), "prompt_too_long"
    )
    assert f"{len(_encode(tokenizer, LONG_PROMPT))} tokens" in rejection.detail
    assert "data.max_prompt_length = 12" in rejection.detail
    # The raw pair as JSON, cut to RAW_CHARS (the long prompt alone is longer).
    assert rejection.raw.startswith('{"id": "test:1", "prompt": "\\n\\nHuman: question 0 ')
    assert len(rejection.raw) == RAW_CHARS
    short = "\n\nHuman: Hi\n\nAssistant:"
    assert len(_encode(tokenizer, short)) <= cfg.max_prompt_length
    assert isinstance(tokenize_pair(_pair(short, " Yes.", " No."), tokenizer, cfg), TokenizedPair)


def test_completions_are_cut_to_their_budget(tokenizer: PreTrainedTokenizerBase) -> None:
    eos = tokenizer.eos_token_id
    completion = [*_encode(tokenizer, LONG_COMPLETION), eos]
    prompt = "\n\nHuman: Hi\n\nAssistant:"
    short = [*_encode(tokenizer, " No."), eos]
    capped = DataConfig(max_length=64, max_prompt_length=16, max_completion_length=5)
    result = _tokenized(tokenize_pair(_pair(prompt, LONG_COMPLETION, " No."), tokenizer, capped))
    assert result.chosen_ids == completion[:5] and result.chosen_truncated
    assert result.rejected_ids == short and not result.rejected_truncated
    # Without max_completion_length the budget is what max_length leaves after the prompt,
    # here after a prompt cut to its full 16 tokens.
    cfg = DataConfig(max_length=40, max_prompt_length=16)
    result = _tokenized(tokenize_pair(_pair(LONG_PROMPT, " No.", LONG_COMPLETION), tokenizer, cfg))
    assert len(result.prompt_ids) == 16
    assert result.rejected_ids == completion[:24] and result.rejected_truncated
    assert result.chosen_ids == short and not result.chosen_truncated
    # The budget binding exactly: EOS is the last token that fits, nothing is cut.
    exact = DataConfig(max_length=64, max_prompt_length=16, max_completion_length=len(short))
    result = _tokenized(tokenize_pair(_pair(prompt, " No.", " No!"), tokenizer, exact))
    assert result.chosen_ids == short and not result.chosen_truncated


@pytest.mark.parametrize("completion", ["", EOS])
def test_completion_without_real_tokens_is_rejected(
    tokenizer: PreTrainedTokenizerBase, completion: str
) -> None:
    result = tokenize_pair(_pair("\n\nHuman: Hi", " fine", completion), tokenizer, DataConfig())
    assert "rejected" in _rejection(result, "empty_completion").detail


def test_chat_pair_uses_the_template(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    chosen = [{"role": "assistant", "content": "Well, thanks."}]
    rejected = [{"role": "assistant", "content": "Leave."}]
    result = _tokenized(tokenize_pair(_pair(prompt, chosen, rejected), tokenizer, DataConfig()))
    # The renderings of models.CHAT_TEMPLATE, written out by hand.
    prompt_text = (
        f"{models.BOS_TOKEN}\n\nSystem: Be kind.\n\nHuman: Hi\n\nAssistant: Hello!{EOS}"
        "\n\nHuman: How are you?\n\nAssistant:"
    )
    assert result.prompt_ids == _encode(tokenizer, prompt_text)
    assert result.prompt_ids[0] == tokenizer.bos_token_id
    # The template's own EOS ends the turn; append_eos adds no second one.
    assert result.chosen_ids == _encode(tokenizer, f" Well, thanks.{EOS}")
    assert result.rejected_ids == _encode(tokenizer, f" Leave.{EOS}")
    assert result.chosen_ids.count(tokenizer.eos_token_id) == 1
    cfg = DataConfig(max_length=32, max_prompt_length=8)
    cut = _tokenized(tokenize_pair(_pair(prompt, chosen, rejected), tokenizer, cfg))
    assert cut.prompt_ids == [tokenizer.bos_token_id, *_encode(tokenizer, prompt_text)[-7:]]


def test_chat_template_problems_are_rejections(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = [{"role": "user", "content": "Hi"}]
    chosen = [{"role": "assistant", "content": "Hello"}]
    rejected = [{"role": "assistant", "content": "Bye"}]
    counting = copy.deepcopy(tokenizer)
    # A header that depends on the number of messages: the prompt alone renders "1 messages",
    # the conversation "2 messages", so the prompt is not a prefix of prompt + completion.
    counting.chat_template = (
        "{{- messages | length }} messages{% for m in messages %} {{ m['content'] }}{% endfor %}"
    )
    mismatch = tokenize_pair(_pair(prompt, chosen, rejected), counting, DataConfig())
    assert "prompt + chosen" in _rejection(mismatch, "chat_template_mismatch").detail
    missing = copy.deepcopy(tokenizer)
    missing.chat_template = None
    result = tokenize_pair(_pair(prompt, chosen, rejected), missing, DataConfig())
    _rejection(result, "chat_template_missing")
    tool = [{"role": "tool", "content": "42"}]
    result = tokenize_pair(_pair(prompt, tool, rejected), tokenizer, DataConfig())
    assert "unknown chat role: tool" in _rejection(result, "chat_template_error").detail


def test_an_sft_example_gets_the_ids_of_its_pair_without_rejected_ids(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """An SFT example (rejected None) is the chosen side of the same pair: equal prompt and
    chosen ids, text and chat alike, alone or in a batch with pairs, and no rejected ids."""
    cfg = DataConfig(max_length=24, max_prompt_length=16)
    text = ("\n\nHuman: Hi\n\nAssistant:", " Hello there!", " Bye.")
    chat = (
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Hello there!"}],
        [{"role": "assistant", "content": "Bye."}],
    )
    pairs = [_pair(*text), _pair(*chat)]
    examples = [dataclasses.replace(pair, rejected=None) for pair in pairs]
    mixed = tokenize_pairs([pairs[0], examples[0], examples[1], pairs[1]], tokenizer, cfg)
    assert mixed == [
        tokenize_pair(item, tokenizer, cfg) for item in (*pairs[:1], *examples, pairs[1])
    ]
    for pair, example in zip((mixed[0], mixed[3]), mixed[1:3], strict=True):
        pair, example = _tokenized(pair), _tokenized(example)
        assert (example.prompt_ids, example.chosen_ids) == (pair.prompt_ids, pair.chosen_ids)
        assert example.chosen_ids[-1] == tokenizer.eos_token_id
        row = example.to_row()
        assert (row["rejected_ids"], row["rejected_length"], row["rejected_truncated"]) == (
            [],
            0,
            False,
        )
    long = dataclasses.replace(examples[0], chosen=LONG_COMPLETION)
    cut = _tokenized(tokenize_pair(long, tokenizer, cfg))
    assert cut.chosen_truncated and len(cut.prompt_ids) + len(cut.chosen_ids) == 24
    empty = dataclasses.replace(examples[0], chosen=EOS)
    assert "chosen" in _rejection(tokenize_pair(empty, tokenizer, cfg), "empty_completion").detail


def test_append_eos_needs_an_eos_token(tokenizer: PreTrainedTokenizerBase) -> None:
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    pair = _pair("\n\nHuman: Hi", " a", " b")
    with pytest.raises(ValueError, match="data.append_eos"):
        tokenize_pair(pair, no_eos, DataConfig())
    assert tokenize_pair(pair, no_eos, DataConfig(append_eos=False)).chosen_ids == [
        *_encode(tokenizer, " a")
    ]


def test_batch_equals_one_at_a_time(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = DataConfig(max_length=96, max_prompt_length=64, truncation_mode="reject")
    messages = _pair(
        [{"role": "user", "content": "Hi"}],
        [{"role": "assistant", "content": "Yo"}],
        [{"role": "assistant", "content": "No"}],
    )
    pairs = [*_hh_pairs(20), messages, _pair("\n\nHuman: Hi", "", " b")]
    batch = tokenize_pairs(pairs, tokenizer, cfg)
    assert batch == [tokenize_pair(pair, tokenizer, cfg) for pair in pairs]
    reasons = {result.reason for result in batch if isinstance(result, Rejection)}
    assert reasons == {"prompt_too_long", "empty_completion"}
    assert tokenize_pairs([], tokenizer, cfg) == []


def _columns(pairs: list[TokenizedPair]) -> dict[str, np.ndarray]:
    """Column-major numpy batch as Ray Data's ``iter_batches(batch_format="numpy")`` gives it."""
    rows = [pair.to_row() for pair in pairs]
    columns = {}
    for name in TOKENIZED_COLUMNS:
        values = [row[name] for row in rows]
        if name.endswith("_ids"):
            column = np.empty(len(values), dtype=object)
            column[:] = [np.asarray(ids, dtype=np.int64) for ids in values]
            columns[name] = column
        else:
            columns[name] = np.asarray(values)
    return columns


def _tokenized_batch(tokenizer: PreTrainedTokenizerBase, count: int) -> list[TokenizedPair]:
    """A short hand-written pair and ``count - 1`` HH pairs: prompts of 10 and 64 tokens,
    completions of 3 to 24."""
    short = _pair("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Bye now, my friend.")
    cfg = DataConfig(max_length=96, max_prompt_length=64, max_completion_length=24)
    pairs = tokenize_pairs([short, *_hh_pairs(count - 1)], tokenizer, cfg)
    return [_tokenized(result) for result in pairs]


def test_collate_layout_and_masks(tokenizer: PreTrainedTokenizerBase) -> None:
    pairs = _tokenized_batch(tokenizer, 5)
    columns = _columns(pairs)
    columns["ref_chosen_logps"] = np.arange(5, dtype=np.float64) - 10.0
    pad = tokenizer.pad_token_id
    batch = collate_pairs(columns, pad, pad_to_multiple_of=16)
    sequences = [(p.prompt_ids, p.chosen_ids) for p in pairs]
    sequences += [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    assert batch["input_ids"].shape == (10, -(-width // 16) * 16)
    assert batch["input_ids"].dtype == batch["target_ids"].dtype == torch.int64
    assert batch["target_mask"].dtype == torch.bool
    for index, (prompt, completion) in enumerate(sequences):
        length = len(prompt) + len(completion)
        ids = batch["input_ids"][index].tolist()
        assert ids == prompt + completion + [pad] * (len(ids) - length)
        assert batch["attention_mask"][index].tolist() == [1] * length + [0] * (len(ids) - length)
        mask = batch["target_mask"][index]
        assert mask.nonzero().flatten().tolist() == list(range(len(prompt) - 1, length - 1))
        assert batch["target_ids"][index][mask].tolist() == completion
        assert batch["target_ids"][index, length - 1 :].eq(pad).all()
    assert batch["completion_lengths"].tolist() == [len(c) for _, c in sequences]
    assert batch["target_mask"].sum(1).tolist() == batch["completion_lengths"].tolist()
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-10.0, -9.0, -8.0, -7.0, -6.0]
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "target_ids",
        "target_mask",
        "completion_lengths",
        "ref_chosen_logps",
    }
    unpadded = collate_pairs(columns, pad)
    assert unpadded["input_ids"].shape == (10, width)


def test_collate_rejects_bad_batches(tokenizer: PreTrainedTokenizerBase) -> None:
    pair = _tokenized_batch(tokenizer, 1)[0]
    with pytest.raises(ValueError, match="empty chosen"):
        collate_pairs(_columns([dataclasses.replace(pair, chosen_ids=[])]), 0)
    with pytest.raises(ValueError, match="no 'rejected_ids' column"):
        collate_pairs({"prompt_ids": [[1]], "chosen_ids": [[2]]}, 0)
    with pytest.raises(ValueError, match="ref_hn_chosen"):
        collate_pairs({**_columns([pair]), "ref_hn_chosen": np.zeros(2)}, 0)


def test_collated_logps_match_an_unpadded_float64_loop(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel
) -> None:
    pairs = _tokenized_batch(tokenizer, 4)
    batch = collate_pairs(_columns(pairs), tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        stats = sequence_logps_and_entropy(
            batch["target_ids"], batch["target_mask"], logits=logits, compute_entropy=False
        )
        reference = copy.deepcopy(model).double()
        expected = []
        for prompt, completion in [(p.prompt_ids, p.chosen_ids) for p in pairs] + [
            (p.prompt_ids, p.rejected_ids) for p in pairs
        ]:
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(reference(input_ids=ids).logits[0], dim=-1)
            expected.append(
                sum(logp[t, ids[0, t + 1]].item() for t in range(len(prompt) - 1, ids.shape[1] - 1))
            )
    assert stats.lengths.tolist() == batch["completion_lengths"].tolist()
    # float32, batched and padded vs float64, unpadded: sums of up to 24 log-probs near -6.2
    # (= -ln 512, a random model) agree to float32 rounding; the largest difference observed
    # when this test was written was 3.1e-5 (on a sum of about -151).
    torch.testing.assert_close(
        stats.logps.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-5
    )

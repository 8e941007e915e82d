"""Tests of raypo.models: packaged data, tiny tokenizer, tiny model, caching and loading errors."""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from raypo import models

DATA_DIR = Path(__file__).parent / "data"
FULL_DATA = DATA_DIR / "hh_harmless_1800.jsonl.gz"

DIALOGUE = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]


def _full_rows() -> list[dict[str, str]]:
    with gzip.open(FULL_DATA, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@functools.cache
def _default_tokenizer() -> PreTrainedTokenizerFast:
    """Trained once per session; shared by fixtures and by hypothesis tests (which take none)."""
    return models.train_tiny_tokenizer(models._default_tokenizer_texts())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return models._default_tokenizer_texts()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _default_tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_packaged_sample_is_first_400_rows_of_full_data() -> None:
    packaged = models.builtin_data_path("hh_sample").read_text(encoding="utf-8").splitlines()
    assert len(packaged) == 400
    assert [json.loads(line) for line in packaged] == _full_rows()[:400]
    assert len(_full_rows()) == 1800


def test_licence_ships_with_both_copies_of_the_data() -> None:
    packaged = models.builtin_data_path("hh_sample").parent / "hh_LICENSE"
    assert packaged.read_text() == (DATA_DIR / "hh_LICENSE").read_text()
    assert packaged.read_text().startswith("MIT License")


def test_builtin_data_path_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="hh_sample"):
        models.builtin_data_path("nope")


def test_tokenizer_has_specials_and_requested_size(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == 512
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|bos|>",
        "<|eos|>",
        "<|pad|>",
    )
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    ids = tokenizer("Hello world")["input_ids"]
    assert not {0, 1, 2} & set(ids), "plain encoding must not add special tokens"


def test_tokenizer_round_trips_rows_it_was_not_trained_on(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    held_out = [text for row in _full_rows()[400:] for text in (row["chosen"], row["rejected"])]
    non_ascii = [text for text in held_out if not text.isascii()]
    ascii_only = [text for text in held_out if text.isascii()]
    assert non_ascii and ascii_only
    for text in non_ascii[:20] + ascii_only[:20]:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_unicode(text: str) -> None:
    tokenizer = _default_tokenizer()
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_compresses_dialogue_text(
    tokenizer: PreTrainedTokenizerFast, texts: list[str]
) -> None:
    # With 253 merges learned, BPE must beat one token per byte on the text it was trained on.
    sample = texts[0]
    assert len(tokenizer(sample)["input_ids"]) < 0.7 * len(sample.encode("utf-8"))


def test_tokenizer_training_is_deterministic(
    tokenizer: PreTrainedTokenizerFast, texts: list[str]
) -> None:
    again = models.train_tiny_tokenizer(texts)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_chat_template_renders_hh_format(tokenizer: PreTrainedTokenizerFast) -> None:
    rendered = tokenizer.apply_chat_template(DIALOGUE, tokenize=False)
    assert rendered == (
        "<|bos|>\n\nSystem: Be kind.\n\nHuman: Hi there\n\nAssistant: Hello!<|eos|>"
        "\n\nHuman: How are you?"
    )
    prompt = tokenizer.apply_chat_template(DIALOGUE, tokenize=False, add_generation_prompt=True)
    assert prompt == rendered + "\n\nAssistant:"


def test_generation_prompt_is_a_token_prefix_of_the_answered_dialogue(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    answered = [*DIALOGUE, {"role": "assistant", "content": "Fine, thanks."}]
    prompt = tokenizer.apply_chat_template(DIALOGUE, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(answered, tokenize=False)
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(full)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    assert full_ids[-1] == tokenizer.eos_token_id


def test_chat_template_rejects_unknown_roles(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tiny_model_shape_and_parameter_count(tokenizer: PreTrainedTokenizerFast) -> None:
    model = models.build_tiny_model(models.TinyModelSpec(), tokenizer)
    # Embedding and untied LM head 2 * 512 * 64 = 65,536; per layer q, k, v, o 4 * 64 * 64 =
    # 16,384, SwiGLU 3 * 64 * 128 = 24,576, two RMSNorms 128, so 2 * 41,088 = 82,176; final norm 64.
    assert model.num_parameters() == 65_536 + 82_176 + 64 == 147_776
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)
    assert model.config.pad_token_id == 2


def test_seeded_builds_are_identical_and_seed_matters(tokenizer: PreTrainedTokenizerFast) -> None:
    first = models.build_tiny_model(models.TinyModelSpec(seed=3), tokenizer).state_dict()
    second = models.build_tiny_model(models.TinyModelSpec(seed=3), tokenizer).state_dict()
    other = models.build_tiny_model(models.TinyModelSpec(seed=4), tokenizer).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


def test_build_leaves_global_rng_untouched(tokenizer: PreTrainedTokenizerFast) -> None:
    state = torch.random.get_rng_state()
    models.build_tiny_model(models.TinyModelSpec(), tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_build_rejects_tokenizer_larger_than_vocab(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        models.build_tiny_model(models.TinyModelSpec(vocab_size=256), tokenizer)


def test_saved_model_loads_with_auto_classes_and_gives_same_logits(
    tiny_dir: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    in_memory = models.build_tiny_model(models.TinyModelSpec(), tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tiny_dir, local_files_only=True)
    prompt = loaded_tokenizer.apply_chat_template(DIALOGUE, tokenize=False)
    assert prompt == tokenizer.apply_chat_template(DIALOGUE, tokenize=False)
    ids = torch.tensor([loaded_tokenizer(prompt)["input_ids"]])
    assert ids[0].tolist() == tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)


def test_forward_on_a_padded_batch(tiny_dir: Path) -> None:
    model, tokenizer = models.load_policy(str(tiny_dir))
    batch = tokenizer(["\n\nHuman: hi\n\nAssistant: hello", "\n\nHuman: ok"], padding=True)
    input_ids = torch.tensor(batch["input_ids"])
    mask = torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        output = model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
    assert output.logits.shape == (2, input_ids.shape[1], 512)
    assert torch.isfinite(output.logits).all()
    # Random init spreads probability over 512 tokens: the loss is close to ln 512 = 6.24.
    assert abs(output.loss.item() - 6.24) < 0.5


def test_second_save_reuses_the_directory(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tiny_dir / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("save_tiny_model rebuilt a cached model")

    monkeypatch.setattr(models, "build_tiny_model", fail)
    monkeypatch.setattr(models, "train_tiny_tokenizer", fail)
    assert models.save_tiny_model(tiny_dir) == tiny_dir
    assert weights.stat().st_mtime_ns == stamp


def test_save_refuses_a_directory_holding_something_else(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(models.ModelLoadError, match="delete it or choose another"):
        models.save_tiny_model(tiny_dir, spec=models.TinyModelSpec(seed=1))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(models.ModelLoadError, match="not empty"):
        models.save_tiny_model(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_save_into_an_existing_empty_directory(tmp_path: Path) -> None:
    path = models.save_tiny_model(tmp_path, texts=["tiny text " * 50])
    assert (path / models.MARKER_FILE).is_file()
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}-")]


def test_load_policy_tiny_uses_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAYPO_CACHE_DIR", str(tmp_path))
    model, tokenizer = models.load_policy("tiny", dtype="bf16")
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith("tiny-")
    assert models.resolve_model_path("tiny") == str(cached)
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token == "<|pad|>"
    assert models.load_tokenizer("tiny").chat_template == tokenizer.chat_template


def test_load_policy_names_a_missing_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(models.ModelLoadError) as caught:
        models.load_policy(str(missing))
    assert str(missing) in str(caught.value)
    assert "no such directory" in str(caught.value)
    assert "model.name_or_path: tiny" in str(caught.value)


def test_load_policy_wraps_a_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(models.ModelLoadError, match="save_pretrained"):
        models.load_policy(str(tmp_path))


def test_load_policy_rejects_unknown_dtype(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="fp32"):
        models.load_policy(str(tiny_dir), dtype="float64")


def test_load_tokenizer_sets_pad_to_eos_when_missing(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    unpadded = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>"
    )
    unpadded.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<|eos|>"
    assert loaded.pad_token_id == 1


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_attn_implementation_reaches_the_model(tiny_dir: Path, kernel: str) -> None:
    model, _ = models.load_policy(str(tiny_dir), attn_implementation=kernel)
    assert model.config._attn_implementation == kernel


def test_model_config_load_kwargs_reach_from_pretrained(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """attn_implementation and trust_remote_code reach the model's and the tokenizer's
    from_pretrained; trust_remote_code is warned about once per model, naming it."""
    from raypo.config import ModelConfig

    calls: list[tuple[str, dict]] = []
    for auto in (AutoModelForCausalLM, AutoTokenizer):
        original = auto.from_pretrained.__func__

        def record(cls, source, *args, _original=original, **kwargs):
            calls.append((cls.__name__, kwargs))
            return _original(cls, source, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(record))
    monkeypatch.setattr(models, "_REMOTE_CODE_WARNED", set())
    config = ModelConfig(name_or_path=str(tiny_dir), attn_implementation="eager")
    remote = ModelConfig(name_or_path=str(tiny_dir), trust_remote_code=True)
    model, _ = models.load_policy(str(tiny_dir), **config.load_kwargs)
    assert model.config._attn_implementation == "eager"
    assert {name: kwargs["trust_remote_code"] for name, kwargs in calls} == {
        "AutoModelForCausalLM": False,
        "AutoTokenizer": False,
    }
    assert "trust_remote_code is on" not in caplog.text
    calls.clear()
    for _ in range(2):
        models.load_policy(str(tiny_dir), **remote.load_kwargs)
    assert {kwargs["trust_remote_code"] for _, kwargs in calls} == {True}
    assert {name for name, _ in calls} == {"AutoModelForCausalLM", "AutoTokenizer"}
    warning = f"model.trust_remote_code is on: running Python code shipped with {tiny_dir}"
    assert caplog.text.count(warning) == 1


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="has flash-attn")
def test_a_missing_attention_kernel_names_the_setting(tiny_dir: Path) -> None:
    with pytest.raises(models.ModelLoadError, match="model.attn_implementation: sdpa"):
        models.load_policy(str(tiny_dir), attn_implementation="flash_attention_2")


def _train_mode_logps(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    from raypo.data.collate import collate_pairs
    from raypo.forward import sequence_stats

    columns = {
        "prompt_ids": [tokenizer("\n\nHuman: hi\n\nAssistant:")["input_ids"]],
        "chosen_ids": [tokenizer(" hello there")["input_ids"]],
        "rejected_ids": [tokenizer(" go away")["input_ids"]],
    }
    model.train()
    with torch.no_grad():
        return sequence_stats(model, collate_pairs(columns, tokenizer.pad_token_id)).logps


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_makes_train_mode_log_probs_deterministic(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, disable: bool
) -> None:
    """Llama's attention dropout is a float attribute the attention kernel reads in train mode,
    not an nn.Dropout: disable_dropout_in_model zeroes it too (TRL's misses it)."""
    model = models.build_tiny_model(models.TinyModelSpec(), tokenizer)
    model.config.attention_dropout = 0.5
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = models.load_policy(str(tmp_path))
    assert loaded.model.layers[0].self_attn.attention_dropout == 0.5
    if disable:
        models.disable_dropout_in_model(loaded)
    first = _train_mode_logps(loaded, loaded_tokenizer)
    second = _train_mode_logps(loaded, loaded_tokenizer)
    assert torch.equal(first, second) == disable
    assert loaded.config.attention_dropout == 0.5  # an exported model keeps its own rate


def test_disable_dropout_zeroes_dropout_modules_and_rates() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3))
    model[0].hidden_dropout = 0.2
    model[0].resid_pdrop = 0.1
    model[0].use_dropout = True  # a flag, not a rate
    models.disable_dropout_in_model(model)
    assert model[1].p == 0.0
    assert (model[0].hidden_dropout, model[0].resid_pdrop, model[0].use_dropout) == (0, 0, True)

"""Loading policies and tokenizers; building the tiny offline model for tests and the quickstart.

The name ``"tiny"`` (the default of ``model.name_or_path``) means a randomly initialised
Llama-architecture model of about 150k parameters with a 512-token byte-level BPE tokenizer trained
on the packaged HH sample. It is built locally in about a second, cached under
``$RAYPO_CACHE_DIR`` (default ``~/.cache/raypo``) in a directory named by a fingerprint of its
spec, training text and library versions, and loaded from there like any Hugging Face checkpoint.
Every other name is passed to ``from_pretrained``: a local directory or a hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers.models import BPE
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from raypo.config_inputs import TINY_MODEL
from raypo.lora import adapter_base, four_bit_loading, is_adapter_dir, merge_adapter

TINY_NAME = TINY_MODEL
"""The ``model.name_or_path`` value that selects the embedded tiny model."""

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"

MARKER_FILE = "raypo_tiny.json"
"""Written last into a tiny-model directory; its fingerprint says what the directory holds."""

_FORMAT_VERSION = 1
_BUILTIN_DATA = {"hh_sample": "hh_sample.jsonl"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_REMOTE_CODE_WARNED: set[str] = set()
"""Models whose trust_remote_code warning this process has logged."""

logger = logging.getLogger(__name__)

# Renders the raw Anthropic HH format ("\n\nHuman: ...\n\nAssistant: ...") after a BOS, so that a
# prompt rendered with add_generation_prompt is a text prefix of the same dialogue rendered with its
# answer. Every output goes through {{ }} string literals because transformers compiles templates
# with trim_blocks, which would eat newlines written between tags.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '\\n\\nSystem: ' + message['content'] -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '\\n\\nHuman: ' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '\\n\\nAssistant: ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '\\n\\nAssistant:' -}}"
    "{%- endif -%}"
)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names the path and the fix."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the embedded tiny Llama model (about 150k parameters with the defaults)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 2
    """Attention heads per layer (query and key/value: plain multi-head attention, no GQA)."""
    head_dim: int = 32
    """Width of each attention head; num_heads * head_dim need not equal hidden_size."""
    intermediate_size: int = 128
    """Width of the SwiGLU MLP."""
    vocab_size: int = 512
    """Tokenizer vocabulary size asked of BPE training and the model's embedding rows."""
    max_position_embeddings: int = 1024
    """Longest sequence in tokens; also the tokenizer's model_max_length."""
    seed: int = 0
    """Seed of the weight initialisation (torch's global RNG is left untouched)."""


def train_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    All 256 bytes are in the initial alphabet, so every string round-trips exactly through
    ``decode(encode(text))``. Ids 0, 1, 2 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``. Encoding adds
    no special tokens; the chat template (:data:`CHAT_TEMPLATE`, HH format) starts with BOS and
    ends each assistant turn with EOS. Training is deterministic for the same texts in the same
    order.
    """
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """Build a randomly initialised Llama model of shape ``spec`` for ``tokenizer``, in fp32.

    The weights depend only on ``spec`` (seeded inside a forked RNG). Input embedding and LM head
    are untied, as in the Llama and Pythia checkpoints the real configs use, so training exercises
    the same separate ``lm_head`` parameter.
    """
    if len(tokenizer) > spec.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but TinyModelSpec.vocab_size is "
            f"{spec.vocab_size}; raise vocab_size or train the tokenizer with fewer tokens"
        )
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def builtin_data_path(name: str) -> Path:
    """Path of a data file shipped in ``raypo/resources`` (``"hh_sample"``: 400 HH pairs)."""
    if name not in _BUILTIN_DATA:
        raise ValueError(f"unknown builtin data {name!r}; choose one of {sorted(_BUILTIN_DATA)}")
    path = Path(str(files("raypo").joinpath("resources", _BUILTIN_DATA[name])))
    if not path.is_file():
        raise FileNotFoundError(f"packaged data file {path} is missing; reinstall raypo")
    return path


def _default_tokenizer_texts() -> list[str]:
    """The chosen and rejected dialogues of the packaged HH sample, in file order."""
    with builtin_data_path("hh_sample").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [text for row in rows for text in (row["chosen"], row["rejected"])]


def tiny_fingerprint(spec: TinyModelSpec, texts: list[str]) -> str:
    """Hex digest naming what a tiny-model directory holds: spec, texts and library versions."""
    text_hash = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        text_hash.update(len(encoded).to_bytes(8, "little"))
        text_hash.update(encoded)
    key = {
        "format": _FORMAT_VERSION,
        "spec": asdict(spec),
        "texts_sha256": text_hash.hexdigest(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _read_marker(directory: Path) -> str | None:
    """Fingerprint recorded in ``directory``'s marker, or None when there is no valid marker."""
    try:
        return json.loads((directory / MARKER_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_tiny_model(
    output_dir: str | os.PathLike[str],
    spec: TinyModelSpec | None = None,
    texts: Iterable[str] | None = None,
) -> Path:
    """Build the tiny tokenizer and model and ``save_pretrained`` both into ``output_dir``.

    ``spec`` defaults to ``TinyModelSpec()``; ``texts`` trains the tokenizer (default: the packaged
    HH sample's chosen and rejected dialogues). When ``output_dir`` already holds a tiny model with
    the same fingerprint it is reused as is. The build happens in a sibling temporary directory
    that is renamed into place with its marker written, so concurrent callers (Ray workers on one
    node) never see a partial directory. A non-empty ``output_dir`` holding anything else is an
    error, never overwritten.
    """
    output = Path(output_dir).expanduser()
    spec = TinyModelSpec() if spec is None else spec
    text_list = _default_tokenizer_texts() if texts is None else list(texts)
    fingerprint = tiny_fingerprint(spec, text_list)
    if _read_marker(output) == fingerprint:
        return output
    if output.exists() and any(output.iterdir()):
        raise ModelLoadError(
            f"{output} is not empty and does not hold this tiny model (no {MARKER_FILE} with "
            f"fingerprint {fingerprint}); delete it or choose another directory"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        _build_into(staging, spec, text_list, fingerprint)
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except OSError:
        if _read_marker(output) != fingerprint:
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _build_into(directory: Path, spec: TinyModelSpec, texts: list[str], fingerprint: str) -> None:
    """Train, build and save tokenizer and model into ``directory``; the marker goes last."""
    start = time.perf_counter()
    tokenizer = train_tiny_tokenizer(
        texts, vocab_size=spec.vocab_size, model_max_length=spec.max_position_embeddings
    )
    model = build_tiny_model(spec, tokenizer)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    marker = {
        "fingerprint": fingerprint,
        "spec": asdict(spec),
        "num_texts": len(texts),
        "tokenizer_size": len(tokenizer),
        "num_parameters": model.num_parameters(),
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    (directory / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def default_cache_dir() -> Path:
    """``$RAYPO_CACHE_DIR`` when set, else ``~/.cache/raypo``."""
    return Path(os.environ.get("RAYPO_CACHE_DIR", "~/.cache/raypo")).expanduser()


def resolve_model_path(name_or_path: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Directory or hub id to hand to ``from_pretrained`` (and to vLLM) for ``name_or_path``.

    ``"tiny"`` builds (or reuses) the embedded tiny model under ``cache_dir`` (default
    :func:`default_cache_dir`) and returns its directory. A name that looks like a filesystem
    path (absolute, or starting with ``.`` or ``~``, or with more than one ``/``) must exist.
    Anything else is returned unchanged as a hub id.
    """
    if name_or_path == TINY_NAME:
        root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        texts = _default_tokenizer_texts()
        fingerprint = tiny_fingerprint(TinyModelSpec(), texts)
        return str(save_tiny_model(root / f"tiny-{fingerprint}", texts=texts))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    looks_like_path = path.is_absolute() or name_or_path.startswith((".", "~"))
    if looks_like_path or name_or_path.count("/") > 1:
        raise ModelLoadError(
            f"model {name_or_path!r}: no such directory; pass a directory written by "
            f"save_pretrained, a hub id such as 'EleutherAI/pythia-2.8b', or set "
            f"model.name_or_path: {TINY_NAME} to use the embedded tiny model"
        )
    return name_or_path


def _from_pretrained(auto_class: type, kind: str, source: str, **kwargs: object) -> object:
    """``auto_class.from_pretrained(source)``, local files first, failures as ModelLoadError.

    Trying the local directory or hub cache first keeps cached models loadable offline and spares
    the hub one request per Ray worker; only a hub id missing from the cache goes online, and not
    under ``HF_HUB_OFFLINE``.
    """
    try:
        return auto_class.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
        if offline or Path(source).is_dir():
            raise _load_error(kind, source, error) from error
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as error:
        raise _load_error(kind, source, error) from error


def _load_error(kind: str, name_or_path: str, error: Exception) -> ModelLoadError:
    """A ModelLoadError for a failed ``from_pretrained`` of a directory or hub id."""
    return ModelLoadError(
        f"could not load {kind} {name_or_path!r} ({type(error).__name__}: {error}). If it is a "
        f"hub id, download it first (`hf download {name_or_path}`) or check the name and your "
        f"access; if it is a directory, it must contain the files save_pretrained writes. Set "
        f"model.name_or_path: {TINY_NAME} to use the embedded tiny model offline"
    )


def load_tokenizer(
    name_or_path: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    trust_remote_code: bool = False,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer by name (see :func:`resolve_model_path`), guaranteeing a pad token.

    ``trust_remote_code`` lets ``from_pretrained`` run a tokenizer class shipped with the model
    (``model.trust_remote_code``). A tokenizer without a pad token gets ``pad_token =
    eos_token``: padded positions are masked out of every loss, so reusing EOS is harmless and
    avoids resizing the embeddings.
    """
    source = resolve_model_path(name_or_path, cache_dir)
    if trust_remote_code:
        _warn_remote_code(name_or_path)
    tokenizer = _from_pretrained(
        AutoTokenizer, "tokenizer", source, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(
                f"tokenizer {name_or_path!r} has neither a pad nor an eos token; add a pad token "
                f"to its tokenizer_config.json"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(
    name_or_path: str,
    dtype: str = "fp32",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer in ``dtype`` (``fp32`` | ``bf16`` | ``fp16``).

    ``name_or_path`` is resolved by :func:`resolve_model_path` (``"tiny"`` = the embedded tiny
    model's directory) and loaded with ``from_pretrained``, which also gets
    ``attn_implementation`` (``eager`` | ``sdpa`` | ``flash_attention_2``; None = transformers'
    default for the model) and ``trust_remote_code`` (model and tokenizer):
    ``ModelConfig.load_kwargs`` gives all three. The model's ``config.pad_token_id`` is set to
    the tokenizer's pad id when it has none. A PEFT adapter directory (a LoRA run's
    ``final/adapter``) loads as its base model with the adapter merged in (needs ``peft``).
    ``load_in_4bit`` (``model.lora.load_in_4bit``, training only) loads the linear layers in 4
    bits onto the current GPU (:func:`raypo.lora.four_bit_loading`), computing in ``dtype``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    source = resolve_model_path(name_or_path, cache_dir)
    if is_adapter_dir(source):
        return _load_adapted(source, dtype, cache_dir, attn_implementation, trust_remote_code)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    options: dict[str, object] = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:
        options["attn_implementation"] = attn_implementation
    if load_in_4bit:
        options |= four_bit_loading(_DTYPES[dtype])
    try:
        model = _from_pretrained(AutoModelForCausalLM, "model", source, **options)
    except ImportError as error:
        # transformers raises ImportError for a kernel whose package is missing (flash-attn).
        raise ModelLoadError(
            f"could not load model {name_or_path!r} with attn_implementation="
            f"{attn_implementation!r} ({error}); install the missing package or set "
            f"model.attn_implementation: sdpa"
        ) from error
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_adapted(
    source: str,
    dtype: str,
    cache_dir: str | os.PathLike[str] | None,
    attn_implementation: str | None,
    trust_remote_code: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The adapter directory ``source`` merged into its base (:func:`load_policy`), with the
    adapter's own tokenizer where it has one (raypo's export writes it), else the base's."""
    base, tokenizer = load_policy(
        adapter_base(source),
        dtype,
        cache_dir,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    if (Path(source) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    return merge_adapter(base, source), tokenizer


def _warn_remote_code(name_or_path: str) -> None:
    """Log, once per process and model, that ``from_pretrained`` will run the model's code."""
    if name_or_path in _REMOTE_CODE_WARNED:
        return
    _REMOTE_CODE_WARNED.add(name_or_path)
    logger.warning(
        "model.trust_remote_code is on: running Python code shipped with %s", name_or_path
    )


def disable_dropout_in_model(model: nn.Module) -> None:
    """Turn off every dropout of ``model`` in place (``model.disable_dropout``).

    As TRL's ``disable_dropout_in_model``, every ``nn.Dropout`` gets ``p = 0``. transformers'
    attention layers take their dropout rate from a float attribute instead (Llama's
    ``attention_dropout``, passed to the attention kernel in train mode), which that misses, so
    every float attribute of a module whose name holds ``dropout`` or ``pdrop`` is set to 0 as
    well. The model's config is left alone: an exported model keeps its own rates.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if type(value) is float and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)

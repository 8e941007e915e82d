"""Generation shared by evaluation (:mod:`raypo.eval`) and the generation eval during training
(:mod:`raypo.train.generation_eval`): the sampling settings, the completion record, transformers
``generate`` on token-id prompts, and distinct-n.

Every sampler sees the prompt's token ids as the data pipeline tokenised them (chat template and
truncation included) and returns :class:`Generation` records: the generated ids up to and
including the EOS that ended the completion (so a completion is never empty and its log-prob
includes the decision to stop) and their text decoded by the policy's Hugging Face tokenizer
without special tokens. Seeds: vLLM (:mod:`raypo.eval.vllm_actor`) seeds every request with
``seed + prompt index``, so its samples do not depend on how prompts are split over actors or
batched; :func:`generate_batch` seeds every batch with ``seed + first prompt index``, so its
samples are reproducible for the same batch size and split of the prompts. Greedy decoding
(temperature 0) gives the same ids on both (``tests/test_eval_sampling.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from raypo.config import EvalConfig


@dataclass(frozen=True)
class Generation:
    """One completion: ``text`` decoded from ``token_ids`` (EOS kept in the ids when generated)."""

    prompt_index: int
    """Position of the prompt in the list given to the sampler."""
    sample_index: int
    """0 .. n-1 among the completions of that prompt."""
    text: str
    """Decoded completion without special tokens."""
    token_ids: list[int]
    """Generated token ids, the stopping EOS included."""


@dataclass(frozen=True)
class SamplingSettings:
    """The sampling parameters of ``eval`` that every sampler applies."""

    temperature: float
    """0 = greedy."""
    top_p: float
    """Nucleus mass; 1 = off."""
    max_tokens: int
    """Most new tokens per completion."""
    n: int
    """Completions per prompt."""
    seed: int
    """Base seed (see the module docstring for how each sampler derives its seeds)."""

    @classmethod
    def from_config(cls, config: EvalConfig) -> SamplingSettings:
        """The settings of an ``eval`` config section."""
        return cls(config.temperature, config.top_p, config.max_tokens, config.n, config.seed)

    def to_json(self) -> dict[str, Any]:
        """Plain dict for results.json."""
        return asdict(self)


def finish_completion(token_ids: list[int], eos_token_id: int | None) -> list[int]:
    """``token_ids`` up to and including the first EOS (what follows is generate's padding)."""
    if eos_token_id is not None and eos_token_id in token_ids:
        return token_ids[: token_ids.index(eos_token_id) + 1]
    return token_ids


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    settings: SamplingSettings,
    first_index: int,
    synced_gpus: bool = False,
) -> list[Generation]:
    """``settings.n`` completions of each prompt with transformers ``generate``, seeded with
    ``settings.seed + first_index``; ``first_index`` numbers the prompts. ``synced_gpus`` keeps
    every rank of a ZeRO-3 model stepping until all ranks are done (each must call this the same
    number of times)."""
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    width = max(len(ids) for ids in prompts)
    # Left padding keeps every prompt's last token in the last column, where generation starts.
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    sampling: dict[str, Any] = {"do_sample": False}
    if settings.temperature > 0:
        # top_k 0 turns off generate's default top-k of 50, which vLLM does not apply.
        sampling = {"do_sample": True, "temperature": settings.temperature}
        sampling |= {"top_p": settings.top_p, "top_k": 0}
    generation_config = GenerationConfig(
        max_new_tokens=settings.max_tokens,
        num_return_sequences=settings.n,
        eos_token_id=eos,
        pad_token_id=pad,
        **sampling,
    )
    # The caller's random state is left as it was: sampling must not change what training draws.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed + first_index)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
            synced_gpus=synced_gpus,
        )
    new_tokens = output[:, width:].cpu().tolist()
    generations = []
    for row, ids in enumerate(new_tokens):
        kept = finish_completion(ids, eos)
        text = tokenizer.decode(kept, skip_special_tokens=True)
        index, sample = divmod(row, settings.n)
        generations.append(Generation(first_index + index, sample, text, kept))
    return generations


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """distinct-n (Li et al. 2016): distinct word n-grams / all word n-grams over ``texts``
    (words split on whitespace); None when no text has ``n`` words."""
    grams = [
        tuple(words[i : i + n])
        for words in (text.split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None

"""Scorers of ``raypo eval``: reward model, implicit reward, win rate, KL and diversity.

The statistics are pure numpy functions of arrays so that each one is checked against a hand
computation; the two functions that load a model (:func:`pair_logps`, :func:`reward_scores`) run
inside Ray tasks started by :mod:`raypo.eval.run`.

- Implicit reward (DPO, Rafailov et al. 2023, eq. 5): ``r(x, y) = beta * (log pi(y|x) - log
  pi_ref(y|x))``; a held-out pair is ranked correctly when ``r(x, y_w) > r(x, y_l)`` (strictly,
  as TRL's ``rewards/accuracies``). Log-probs come from :func:`raypo.forward.sequence_stats`, the
  routine training uses.
- KL(policy || reference): ``E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)]``, estimated by the mean
  over sampled completions of their summed per-token log-ratio. Unbiased only when the
  completions were sampled from ``pi`` itself (temperature 1, top_p 1); with other sampling
  settings it is the log-ratio's mean under the sampling distribution, a biased estimate.
- Win rate: the fraction of (prompt, sample) pairs whose policy completion gets a higher reward
  than the baseline's, ties counting one half, with a percentile bootstrap interval that resamples
  prompts (the samples of one prompt are not independent).
- distinct-n (Li et al. 2016, :func:`raypo.generation.distinct_n`): distinct word n-grams over
  all n-grams of one side's completions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypo.data.collate import collate_pairs
from raypo.forward import sequence_stats, split_pairs
from raypo.generation import distinct_n


@dataclass(frozen=True)
class MarginStats:
    """Implicit-reward ranking of held-out pairs."""

    accuracy: float
    """Fraction of pairs with ``r(x, y_w) > r(x, y_l)``."""
    margin_mean: float
    """Mean of ``r(x, y_w) - r(x, y_l)`` (nats scaled by beta)."""
    margin_std: float
    """Population standard deviation (ddof 0) of the margins."""
    pairs: int
    """Number of pairs."""


@dataclass(frozen=True)
class ImplicitReward:
    """Implicit-reward ranking overall and per group of the data's group column."""

    overall: MarginStats
    """All held-out pairs."""
    groups: dict[str, MarginStats]
    """Group name -> its pairs; empty when no pair has a group."""

    def to_json(self) -> dict[str, Any]:
        """``{"overall": {...}, "groups": {name: {...}}}`` as in the results.json contract."""
        return {
            "overall": asdict(self.overall),
            "groups": {name: asdict(stats) for name, stats in self.groups.items()},
        }


@dataclass(frozen=True)
class KLEstimate:
    """Monte Carlo estimate of KL(policy || reference) in nats per completion."""

    mean: float
    """Mean over completions of ``sum_t log pi(y_t|...) - log pi_ref(y_t|...)``."""
    std_error: float | None
    """Standard error of ``mean`` from the spread of the per-prompt means (samples of a prompt
    are correlated); None with a single prompt."""
    num_samples: int
    """Completions averaged."""


@dataclass(frozen=True)
class WinRate:
    """Policy-vs-baseline win rate under a reward model, with a bootstrap interval."""

    value: float
    """Mean over (prompt, sample) pairs of 1 (policy reward higher), 0.5 (equal) or 0."""
    ci_low: float
    """Lower percentile bound of the bootstrap interval."""
    ci_high: float
    """Upper percentile bound of the bootstrap interval."""
    confidence_level: float
    """Coverage of ``[ci_low, ci_high]``."""
    ties: float
    """Fraction of pairs with exactly equal rewards."""
    num_pairs: int
    """(prompt, sample) pairs compared."""
    bootstrap_samples: int
    """Resamples of the prompts behind the interval."""


@dataclass(frozen=True)
class GenerationStats:
    """Length and diversity of one side's completions, and how fast they were sampled."""

    mean_tokens: float
    """Mean generated tokens per completion (a closing EOS counts)."""
    distinct_1: float | None
    """distinct-1 over whitespace words; None when the completions hold no word."""
    distinct_2: float | None
    """distinct-2 over whitespace words; None when no completion has two words."""
    generations_per_s: float | None
    """Completions per second of generation wall time (engine start-up excluded)."""


def margin_stats(margins: np.ndarray) -> MarginStats:
    """Accuracy (strictly positive margins), mean and population std of implicit margins."""
    values = np.asarray(margins, dtype=np.float64)
    if values.size == 0:
        raise ValueError("margin_stats needs at least one pair")
    return MarginStats(
        accuracy=float(np.mean(values > 0)),
        margin_mean=float(values.mean()),
        margin_std=float(values.std()),
        pairs=int(values.size),
    )


def implicit_reward(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    reference_chosen: np.ndarray,
    reference_rejected: np.ndarray,
    beta: float,
    groups: Sequence[str | None] | None = None,
) -> ImplicitReward:
    """Implicit-reward accuracy and margins of held-out pairs, overall and per group.

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: ``[P]`` summed
            completion log-probs of the chosen / rejected completions under each model.
        beta: ``loss.beta``, the scale of the implicit reward.
        groups: ``[P]`` group of each pair; None or empty strings = no group.
    Returns:
        margins ``beta * ((pi_w - ref_w) - (pi_l - ref_l))`` summarised by :func:`margin_stats`.
    """
    margins = beta * (
        (np.asarray(policy_chosen, np.float64) - np.asarray(reference_chosen, np.float64))
        - (np.asarray(policy_rejected, np.float64) - np.asarray(reference_rejected, np.float64))
    )
    names = np.array(["" if g is None else str(g) for g in (groups or [""] * margins.size)])
    if names.shape != margins.shape:
        raise ValueError(f"{names.size} groups for {margins.size} pairs")
    per_group = {
        name: margin_stats(margins[names == name]) for name in sorted(set(names.tolist())) if name
    }
    return ImplicitReward(overall=margin_stats(margins), groups=per_group)


def kl_estimate(
    policy_logps: np.ndarray, reference_logps: np.ndarray, prompt_index: np.ndarray
) -> KLEstimate:
    """KL(policy || reference) from the summed log-probs of completions sampled from the policy.

    ``prompt_index[i]`` names the prompt of completion ``i``; the standard error is that of the
    mean of per-prompt means (``std(ddof=1) / sqrt(prompts)``), which stays honest when a
    prompt has several correlated samples.
    """
    ratios = np.asarray(policy_logps, np.float64) - np.asarray(reference_logps, np.float64)
    prompts = np.asarray(prompt_index)
    if ratios.size == 0 or ratios.shape != prompts.shape:
        raise ValueError(f"kl_estimate needs matching non-empty arrays, got {ratios.shape}")
    _, inverse = np.unique(prompts, return_inverse=True)
    per_prompt = np.bincount(inverse, weights=ratios) / np.bincount(inverse)
    error = None
    if per_prompt.size > 1:
        error = float(per_prompt.std(ddof=1) / np.sqrt(per_prompt.size))
    return KLEstimate(mean=float(ratios.mean()), std_error=error, num_samples=int(ratios.size))


def _outcomes(policy: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    return (policy > baseline).astype(np.float64) + 0.5 * (policy == baseline)


def win_rate(
    policy_rewards: np.ndarray,
    baseline_rewards: np.ndarray,
    *,
    bootstrap_samples: int,
    confidence_level: float,
    seed: int,
) -> WinRate:
    """Win rate of the policy over the baseline with a prompt-level percentile bootstrap.

    Args:
        policy_rewards, baseline_rewards: ``[prompts, n]`` rewards; column ``j`` of a row holds
            the ``j``-th sample of each side for that prompt.
        bootstrap_samples: resamples; each draws ``prompts`` rows with replacement
            (``numpy.random.Generator(PCG64(seed))``) and takes the mean outcome.
        confidence_level: the interval is the ``(1 -/+ level) / 2`` percentiles of the resampled
            win rates.
        seed: seed of the resampling.
    """
    policy = np.asarray(policy_rewards, np.float64)
    baseline = np.asarray(baseline_rewards, np.float64)
    if policy.ndim != 2 or policy.shape != baseline.shape or policy.size == 0:
        raise ValueError(
            f"win_rate needs two non-empty [prompts, n] arrays of one shape, got {policy.shape} "
            f"and {baseline.shape}"
        )
    per_prompt = _outcomes(policy, baseline).mean(axis=1)
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, per_prompt.size, size=(bootstrap_samples, per_prompt.size))
    resampled = per_prompt[rows].mean(axis=1)
    tail = (1.0 - confidence_level) / 2.0
    low, high = np.quantile(resampled, [tail, 1.0 - tail])
    return WinRate(
        value=float(per_prompt.mean()),
        ci_low=float(low),
        ci_high=float(high),
        confidence_level=float(confidence_level),
        ties=float(np.mean(policy == baseline)),
        num_pairs=int(policy.size),
        bootstrap_samples=int(bootstrap_samples),
    )


def generation_stats(
    texts: Sequence[str], token_counts: Sequence[int], seconds: float | None
) -> GenerationStats:
    """Mean length, distinct-1/2 and throughput of one side's completions."""
    if not texts or len(texts) != len(token_counts):
        raise ValueError("generation_stats needs one token count per completion, at least one")
    rate = len(texts) / seconds if seconds else None
    return GenerationStats(
        mean_tokens=float(np.mean(token_counts)),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        generations_per_s=rate,
    )


def reward_summary(values: np.ndarray) -> dict[str, float]:
    """``{"mean", "std"}`` (population std) of a side's rewards."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def pair_logps(
    model_path: str,
    dtype: str,
    rows: Mapping[str, Sequence[Sequence[int]]],
    *,
    batch_size: int,
    chunk_size: int,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed completion log-probs of a causal LM over pairs, as float64 ``[P]`` arrays.

    ``rows`` holds equal-length columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (token
    id lists); the batches go through :func:`raypo.data.collate.collate_pairs` and
    :func:`raypo.forward.sequence_stats` exactly as in training; the model is loaded with
    ``dtype``, ``attn_implementation`` and ``trust_remote_code`` (``ModelConfig.load_kwargs``).
    Returns (chosen, rejected).
    """
    from raypo.models import load_policy

    model, tokenizer = load_policy(
        model_path,
        dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    device = _device()
    model.to(device).eval()
    chosen: list[np.ndarray] = []
    rejected: list[np.ndarray] = []
    total = len(rows["prompt_ids"])
    for start in range(0, total, batch_size):
        batch = {name: list(column[start : start + batch_size]) for name, column in rows.items()}
        tensors = collate_pairs(batch, tokenizer.pad_token_id)
        inputs = {name: value.to(device) for name, value in tensors.items()}
        stats = sequence_stats(model, inputs, chunk_size=chunk_size, compute_entropy=False)
        first, second = split_pairs(stats.logps.double().cpu())
        chosen.append(first.numpy())
        rejected.append(second.numpy())
    return np.concatenate(chosen), np.concatenate(rejected)


@torch.no_grad()
def reward_scores(model_path: str, texts: Sequence[str], *, batch_size: int) -> np.ndarray:
    """Scalar reward of each text under a sequence-classification reward model (float64 ``[N]``).

    Each text is the prompt followed by the completion, tokenised by the reward model's own
    tokenizer (special tokens added, truncated to its ``model_max_length``) and right-padded;
    the model must have one label and a pad token id so it finds each row's last token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path)
    if model.config.num_labels != 1:
        raise ValueError(
            f"reward model {model_path!r} has {model.config.num_labels} labels; eval.reward_model "
            "must be a sequence-classification model with num_labels=1 (a scalar score)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    device = _device()
    model.to(device).eval()
    tokenizer.padding_side = "right"
    scores = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(device)
        scores.append(model(**encoded).logits[:, 0].double().cpu().numpy())
    return np.concatenate(scores)


def save_tiny_reward_model(output_dir: str | Path, base_model: str, seed: int = 0) -> Path:
    """Write a randomly initialised one-label ``LlamaForSequenceClassification`` with the config
    and tokenizer of the causal LM at ``base_model`` (e.g. the tiny model) into ``output_dir``,
    for tests and offline trials of the reward-model scorers."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(base_model)
    config.num_labels = 1
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    output = Path(output_dir)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output

"""The evaluation scorers: hand-computed statistics, and the model-backed scorers against a direct
float64 / unbatched computation on the tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from raypo.eval.scorers import (
    generation_stats,
    implicit_reward,
    kl_estimate,
    pair_logps,
    reward_scores,
    reward_summary,
    save_tiny_reward_model,
    win_rate,
)
from raypo.generation import distinct_n
from raypo.models import resolve_model_path


def test_distinct_n_by_hand() -> None:
    """Words a b a b | c: unigrams a,b,a,b,c -> 3 distinct of 5 = 0.6; bigrams (a b), (b a),
    (a b) -> 2 distinct of 3; a bigram never spans two texts."""
    texts = ["a b a b", "c"]
    assert distinct_n(texts, 1) == pytest.approx(0.6)
    assert distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert distinct_n(["x", "y"], 2) is None
    assert distinct_n(["", " "], 1) is None


def test_generation_stats_by_hand() -> None:
    """3 completions of 2, 4 and 6 tokens in 1.5 s: mean 4 tokens, 2 completions/s."""
    stats = generation_stats(["a", "a b", "c"], [2, 4, 6], 1.5)
    assert stats.mean_tokens == 4.0
    assert stats.generations_per_s == pytest.approx(2.0)
    assert stats.distinct_1 == pytest.approx(3 / 4)  # a, a, b, c -> 3 distinct of 4
    assert stats.distinct_2 == 1.0  # only (a b)
    with pytest.raises(ValueError, match="one token count per completion"):
        generation_stats(["a"], [1, 2], 1.0)


def test_implicit_reward_by_hand() -> None:
    """beta 0.5; h = (pw - rw) - (pl - rl):
    pair 0: (-1 - -2) - (-3 - -3) = 1    -> margin 0.5   group a
    pair 1: (-2 - -1) - (-2 - -2) = -1   -> margin -0.5  group a
    pair 2: (-1 - -1) - (-4 - -2) = 2    -> margin 1.0   group b
    overall accuracy 2/3, mean 1/3, std sqrt(((1/6)^2 + (5/6)^2 + (2/3)^2) / 3)."""
    result = implicit_reward(
        np.array([-1.0, -2.0, -1.0]),
        np.array([-3.0, -2.0, -4.0]),
        np.array([-2.0, -1.0, -1.0]),
        np.array([-3.0, -2.0, -2.0]),
        beta=0.5,
        groups=["a", "a", "b"],
    )
    assert result.overall.accuracy == pytest.approx(2 / 3)
    assert result.overall.margin_mean == pytest.approx(1 / 3)
    expected_std = np.sqrt(((1 / 6) ** 2 + (5 / 6) ** 2 + (2 / 3) ** 2) / 3)
    assert result.overall.margin_std == pytest.approx(expected_std)
    assert result.overall.pairs == 3
    assert sorted(result.groups) == ["a", "b"]
    assert result.groups["a"].accuracy == 0.5
    assert result.groups["a"].margin_mean == pytest.approx(0.0)
    assert result.groups["b"].margin_mean == pytest.approx(1.0)
    assert result.to_json()["groups"]["b"]["pairs"] == 1
    ungrouped = implicit_reward(np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), 0.1, None)
    assert ungrouped.groups == {}
    assert ungrouped.overall.accuracy == 0.0  # a zero margin is not a correct ranking


def test_kl_estimate_by_hand() -> None:
    """log-ratios 0.5, 0, -1 of prompts 0, 0, 1: mean -1/6; per-prompt means 0.25 and -1, their
    std (ddof 1) 1.25/sqrt(2), standard error 1.25/sqrt(2)/sqrt(2) = 0.625."""
    policy, reference = np.array([-1.0, -2.0, -3.0]), np.array([-1.5, -2.0, -2.0])
    kl = kl_estimate(policy, reference, np.array([0, 0, 1]))
    assert kl.mean == pytest.approx(-1 / 6)
    assert kl.std_error == pytest.approx(0.625)
    assert kl.num_samples == 3
    single = kl_estimate(np.array([-1.0, -2.0]), np.array([-1.0, -1.0]), np.array([4, 4]))
    assert single.std_error is None
    assert single.mean == pytest.approx(-0.5)


def test_win_rate_by_hand() -> None:
    """Outcomes win, tie, loss -> 0.5 with ties 1/3; all wins -> interval [1, 1]."""
    rate = win_rate(
        np.array([[2.0], [1.0], [0.0]]),
        np.array([[1.0], [1.0], [1.0]]),
        bootstrap_samples=200,
        confidence_level=0.9,
        seed=0,
    )
    assert rate.value == 0.5
    assert rate.ties == pytest.approx(1 / 3)
    assert rate.num_pairs == 3
    assert 0.0 <= rate.ci_low <= rate.value <= rate.ci_high <= 1.0
    wins = win_rate(np.ones((4, 2)), np.zeros((4, 2)), bootstrap_samples=50, confidence_level=0.95,
                    seed=1)  # fmt: skip
    assert (wins.value, wins.ci_low, wins.ci_high, wins.ties) == (1.0, 1.0, 1.0, 0.0)


def test_win_rate_bootstrap_resamples_prompts() -> None:
    """One prompt with outcomes 1, 0, 1, 0 over its 4 samples: resampling prompts always draws
    that prompt, so the interval has zero width (resampling samples would not). Two prompts with
    mean outcomes 1 and 0: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so
    the 30% and 70% percentiles (confidence level 0.4) are both 0.5."""
    one = win_rate(np.array([[1.0, 0.0, 1.0, 0.0]]), np.zeros((1, 4)), bootstrap_samples=500,
                   confidence_level=0.95, seed=0)  # fmt: skip
    assert (one.value, one.ci_low, one.ci_high) == (0.75, 0.75, 0.75)
    two = win_rate(np.array([[1.0], [-1.0]]), np.zeros((2, 1)), bootstrap_samples=20000,
                   confidence_level=0.4, seed=3)  # fmt: skip
    assert (two.ci_low, two.ci_high) == (0.5, 0.5)
    again = win_rate(np.array([[1.0], [-1.0]]), np.zeros((2, 1)), bootstrap_samples=20000,
                     confidence_level=0.95, seed=3)  # fmt: skip
    assert (again.ci_low, again.ci_high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="prompts, n"):
        win_rate(np.ones(3), np.ones(3), bootstrap_samples=10, confidence_level=0.9, seed=0)


def test_reward_summary() -> None:
    """Rewards 1, 3: mean 2, population std 1."""
    assert reward_summary(np.array([1.0, 3.0])) == {"mean": 2.0, "std": 1.0}


def _direct_logp(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """Summed completion log-prob from one unpadded float64 forward (log_softmax + gather)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, :-1].double()
    logp = torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1 :].sum())


def test_pair_logps_match_direct_float64(raypo_cache: str) -> None:
    """pair_logps (collate_pairs + sequence_stats, fp32, batches of 2 with padding) against an
    unpadded float64 forward of the same tiny model, pair by pair; tolerance 1e-4 relative (fp32
    sums of ~20 log-probs of magnitude ~6)."""
    path = resolve_model_path("tiny")
    rng = np.random.default_rng(0)
    rows = {
        name: [rng.integers(3, 500, size=int(rng.integers(2, 9))).tolist() for _ in range(5)]
        for name in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    chosen, rejected = pair_logps(path, "fp32", rows, batch_size=2, chunk_size=7)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
        for i in range(5):
            expected_w = _direct_logp(model, rows["prompt_ids"][i], rows["chosen_ids"][i])
            expected_l = _direct_logp(model, rows["prompt_ids"][i], rows["rejected_ids"][i])
            assert chosen[i] == pytest.approx(expected_w, rel=1e-4)
            assert rejected[i] == pytest.approx(expected_l, rel=1e-4)
    assert chosen.dtype == np.float64 and chosen.shape == (5,)


def test_reward_model_scores_match_unpadded(raypo_cache: str, tmp_path) -> None:
    """reward_scores batches texts of different lengths with right padding; each score must equal
    the one-label head's output on the text alone (tolerance 1e-5, fp32), and the scores must
    differ between texts (a constant scorer would pass the first check only by accident)."""
    path = save_tiny_reward_model(tmp_path / "rm", resolve_model_path("tiny"), seed=3)
    texts = ["\n\nHuman: hi\n\nAssistant: hello there", "ok", "\n\nHuman: why?\n\nAssistant: no"]
    scores = reward_scores(str(path), texts, batch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    with torch.no_grad():
        for text, score in zip(texts, scores, strict=True):
            alone = float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])
            assert score == pytest.approx(alone, abs=1e-5)
    assert len(set(np.round(scores, 6).tolist())) == 3

"""``raypo sft``'s loss (:func:`raypo.sft.step.sft_step`) against an independent float64
completion-only next-token NLL on the tiny model, with the prompt and the padding masked."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hh_pairs import hh_columns

from raypo.data.collate import collate_pairs
from raypo.models import load_policy
from raypo.sft.step import COMPLETION_KEYS, sft_step
from raypo.step import ForwardSettings
from raypo.train.batches import MicroBatch
from raypo.train.sft import sft_micro_step


@pytest.fixture(scope="module")
def model_and_batch(raypo_cache: str):
    torch.manual_seed(0)
    model, tokenizer = load_policy("tiny")
    columns = hh_columns(tokenizer, count=4)
    return model.eval(), columns, tokenizer.pad_token_id


def _float64_nll(model, columns) -> float:
    """Summed -log p of every chosen completion token over their count, one unpadded sequence at
    a time, from the model's own logits in float64: the prompt never enters the sum."""
    total, count = 0.0, 0
    for prompt, completion in zip(columns["prompt_ids"], columns["chosen_ids"], strict=True):
        ids = torch.tensor([list(prompt) + list(completion)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        targets = ids[0, len(prompt) :]
        total -= float(logp.gather(1, targets[:, None]).sum())
        count += len(completion)
    return total / count


def _sft_batch(columns, pad_id: int) -> dict[str, torch.Tensor]:
    """The prompt + chosen rows of the collated pairs, as :func:`raypo.train.sft.sft_micro_step`
    takes them (padded to the longest pair, so that the shorter rows carry padding)."""
    collated = collate_pairs(columns, pad_id)
    size = len(columns["prompt_ids"])
    return {name: collated[name][:size] for name in COMPLETION_KEYS}


@pytest.mark.parametrize("padding_free", ["off", "bucketed"])
def test_sft_loss_is_the_completion_only_token_nll(model_and_batch, padding_free: str) -> None:
    """Within 1e-5 (fp32 forward against float64 logits): the token mean, not the mean of
    per-sequence means, since the completions differ in length."""
    model, columns, pad_id = model_and_batch
    batch = _sft_batch(columns, pad_id)
    lengths = batch["target_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # the token mean and the sequence mean differ here
    with torch.no_grad():
        result = sft_step(model, batch, ForwardSettings(padding_free=padding_free))
    expected = _float64_nll(model, columns)
    assert float(result.loss) == pytest.approx(expected, rel=1e-5)
    assert float(result.metrics["loss"]) == float(result.loss)
    assert int(result.tokens) == int(batch["attention_mask"].sum())


def test_prompt_tokens_do_not_change_the_loss(model_and_batch) -> None:
    """Replacing the prompt's target ids (masked positions) leaves the loss unchanged, while the
    same change at a completion position moves it: the prompt is masked, the completion is not."""
    model, columns, pad_id = model_and_batch
    batch = _sft_batch(columns, pad_id)
    forward = ForwardSettings(padding_free="off")
    with torch.no_grad():
        base = float(sft_step(model, batch, forward).loss)
        masked = {**batch, "target_ids": batch["target_ids"].clone()}
        masked["target_ids"][~batch["target_mask"]] = 0
        assert float(sft_step(model, masked, forward).loss) == base
        first = int(batch["target_mask"][0].nonzero()[0])
        moved = {**batch, "target_ids": batch["target_ids"].clone()}
        moved["target_ids"][0, first] = (moved["target_ids"][0, first] + 1) % 50
        assert float(sft_step(model, moved, forward).loss) != pytest.approx(base, rel=1e-6)


def test_the_loss_carries_the_gradient(model_and_batch) -> None:
    model, columns, pad_id = model_and_batch
    result = sft_step(model, _sft_batch(columns, pad_id), ForwardSettings())
    result.loss.backward()
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    model.zero_grad()
    assert grads and any(bool(grad.abs().sum() > 0) for grad in grads)


def test_the_worker_step_trains_rows_with_one_completion(model_and_batch) -> None:
    """The data read for SFT leaves ``rejected_ids`` empty (prompt/completion and messages rows,
    pairs without their rejected completion); the workers' step on such rows is the same
    completion-only NLL, within 1e-5 of the float64 computation."""
    model, columns, pad_id = model_and_batch
    rows = {**columns, "rejected_ids": [[] for _ in columns["prompt_ids"]]}
    worker = SimpleNamespace(
        policy=model,
        tokenizer=SimpleNamespace(pad_token_id=pad_id),
        device=torch.device("cpu"),
        forward=ForwardSettings(padding_free="off"),
    )
    with torch.no_grad():
        result = sft_micro_step(worker, MicroBatch(rows, real=True))
    assert float(result.loss) == pytest.approx(_float64_nll(model, columns), rel=1e-5)
